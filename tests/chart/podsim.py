"""The Helm chart, checked offline and its pod's life simulated on this machine.

  podsim.py check
      Lints the chart (strict), renders it with the default values and with each example values file
      (deploy/helm/examples/values-*.yaml), and validates every rendered object with
      `kubernetes-validate --strict`. First proves the validator rejects a broken object.

  podsim.py simulate --scenario primary|standby --pgkeep BIN --workdir DIR [--storage s3|file]
      Renders the chart and runs, as the postgres user, exactly the commands, arguments and
      environment the rendered StatefulSet's containers declare, in pod order (init containers,
      native sidecars with their startup probes, main containers with theirs, preStop hooks, SIGTERM
      in Kubernetes' order), with each volume a folder of its own: the mount paths in commands,
      arguments, environment and ConfigMap files are mapped onto those folders, and the pgkeep
      image's /usr/local/bin/pgkeep onto the binary under test. Nothing else is adapted: a flag the
      binary does not know, an environment variable the chart forgets, a path no volume provides,
      each fails the run.
        primary: pod 1 (empty storage: initdb, the daemon's first backup) -> a write load -> the
        rendered pre-upgrade Job (`pgkeep backup`) -> more writes -> preStop -> SIGTERM -> pod 2 on
        empty volumes restores and recovers -> every committed row is there.
        standby: a primary pod, then a second release with the standby values restored with
        --standby; rows written on the primary appear on the standby.
      S3 settings come from the environment (AWS_*) and PGKEEP_SIM_BUCKET, as the Rust test that
      starts the S3 server passes them. Prints one JSON line of findings last.
Needs helm-python-sdk, kubernetes-validate and PyYAML (scripts/install-deps.sh helm).
"""
import argparse
import base64
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import helm_python
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CHART = os.path.join(ROOT, "deploy", "helm", "pgkeep")
EXAMPLES = os.path.join(ROOT, "deploy", "helm", "examples")
PGBIN = os.environ.get("PGKEEPTEST_PG_BIN", "/usr/lib/postgresql/15/bin")
IS_ROOT = os.getuid() == 0


def log(msg):
    print(f"[podsim {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def fail(msg):
    raise SystemExit(f"podsim: {msg}")


# ---------------------------------------------------------------- rendering, lint, validation

def load_values(paths):
    merged = {}
    for p in paths:
        with open(p) as f:
            merged = deep_merge(merged, yaml.safe_load(f) or {})
    return merged


def deep_merge(a, b):
    out = dict(a)
    for k, v in b.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def render(values, name, namespace="default", upgrade=False):
    """The chart's objects (hooks included) and NOTES.txt."""
    chart = helm_python.Chart.load(os.environ.get("PGKEEP_SIM_CHART", CHART))
    out = chart.render(values, name=name, namespace=namespace, is_install=not upgrade, is_upgrade=upgrade)
    objects, notes = [], ""
    for path, text in sorted(out.items()):
        if path.endswith("NOTES.txt"):
            notes = text
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                objects.append(doc)
    return objects, notes


def validate(objects, label):
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, f"{label}.yaml")
        with open(path, "w") as f:
            yaml.safe_dump_all(objects, f)
        validator = os.path.join(os.path.dirname(sys.executable), "kubernetes-validate")
        r = subprocess.run([validator, "--strict", "--quiet", path], capture_output=True, text=True)
        return r.returncode, r.stdout + r.stderr


def check():
    # The validator must be able to say no, or its yes means nothing.
    bad = [{"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": "x"},
            "spec": {"serviceName": "x", "selector": {"matchLabels": {"a": "b"}},
                     "template": {"metadata": {"labels": {"a": "b"}},
                                  "spec": {"containers": [{"name": "c", "image": "i", "comand": ["x"]}]}}}}]
    code, out = validate(bad, "negative-control")
    if code == 0:
        fail("kubernetes-validate --strict accepted a misspelt field: the check would prove nothing")
    sets = [("default", [])] + [
        (f, [os.path.join(EXAMPLES, f)]) for f in sorted(os.listdir(EXAMPLES)) if f.endswith(".yaml")
    ]
    rendered = {}
    for label, files in sets:
        values = load_values(files)
        lint = helm_python.lint(CHART, values, strict=True)
        if lint.get("errors") or lint.get("messages"):
            fail(f"{label}: helm lint --strict: {json.dumps(lint, indent=1)}")
        for upgrade in (False, True):
            objects, notes = render(values, name="db", namespace="pg", upgrade=upgrade)
            kinds = sorted(f"{o['kind']}/{o['metadata']['name']}" for o in objects)
            # The Prometheus Operator's kinds have no schema here: checked by monitoring_findings.
            core = [o for o in objects if not o["apiVersion"].startswith("monitoring.coreos.com/")]
            code, out = validate(core, label)
            if code != 0:
                fail(f"{label}: kubernetes-validate --strict failed:\n{out}")
            if not notes.strip():
                fail(f"{label}: no NOTES.txt")
        rendered[label] = kinds
        log(f"{label}: lints clean; {len(objects)} objects render and validate --strict: {', '.join(kinds)}")
    # The Postgres major is a setting: it picks the image; one pgkeep does not support is refused.
    images = {}
    for major in (13, 18):
        objects, _ = render(deep_merge(load_values([]), {"postgres": {"major": major}}), name="db")
        sts = next(o for o in objects if o["kind"] == "StatefulSet")
        pg = next(c for c in sts["spec"]["template"]["spec"]["containers"] if c["name"] == "postgres")
        path = next(e["value"] for e in pg["env"] if e["name"] == "PATH")
        if f"/usr/lib/postgresql/{major}/bin" not in path.split(":"):
            fail(f"postgres.major {major}: the Postgres container's PATH misses its binaries: {path}")
        images[str(major)] = pg["image"]
    try:
        render({"postgres": {"major": 12}}, name="db")
        refused = ""
    except Exception as e:  # helm's fail() surfaces as a render error
        refused = str(e)
    # Digest pins: repository:tag@digest for both images; a malformed digest is refused.
    d = "sha256:" + "ab" * 32
    objects, _ = render(deep_merge(load_values([]), {"image": {"digest": d}, "postgres": {"image": {"digest": d}}}), name="db")
    sts = next(o for o in objects if o["kind"] == "StatefulSet")["spec"]["template"]["spec"]
    images["pinned"] = sorted({c["image"] for c in sts["initContainers"] + sts["containers"]})
    try:
        render(deep_merge(load_values([]), {"image": {"digest": "latest"}}), name="db")
        images["bad_digest"] = ""
    except Exception as e:
        images["bad_digest"] = str(e)
    print(json.dumps({"rendered": rendered, "images": images, "major_12": refused,
                      "encryption": encryption_findings(), "monitoring": monitoring_findings(),
                      "tls": tls_findings(), "synchronous": synchronous_findings(),
                      "credentials": credentials_findings(), "summaries": summaries_findings()}))


def summaries_findings():
    """Postgres 17 and later run with summarize_wal = on (incremental backups need it); earlier
    majors, which have no such setting, without it."""
    out = {}
    for major in (15, 17, 18):
        objects, _ = render(deep_merge(load_values([]), {"postgres": {"major": major}}), name="db")
        sts = next(o for o in objects if o["kind"] == "StatefulSet")
        pg = next(c for c in sts["spec"]["template"]["spec"]["containers"] if c["name"] == "postgres")
        out[str(major)] = [a for a in pg["args"] if a.startswith("summarize_wal")]
    return out


def synchronous_findings():
    """daemon.synchronous sets both sides: pgkeep.toml and synchronous_standby_names (unless
    postgres.extraSettings names its own)."""
    def look(values):
        objects, _ = render(values, name="db")
        sts = next(o for o in objects if o["kind"] == "StatefulSet")
        pg = next(c for c in sts["spec"]["template"]["spec"]["containers"] if c["name"] == "postgres")
        toml = next(o["data"]["pgkeep.toml"] for o in objects
                    if o["kind"] == "ConfigMap" and o["metadata"]["name"] == "db-pgkeep")
        return {"args": [a for a in pg["args"] if a.startswith("synchronous_standby_names")],
                "toml": [l for l in toml.splitlines() if l.startswith("synchronous")]}
    on = {"daemon": {"synchronous": True}}
    try:
        render(deep_merge(load_values([]), {"config": {"synchronous": True}}), name="db")
        refused = ""
    except Exception as e:
        refused = str(e)
    return {"off": look(load_values([])), "on": look(deep_merge(load_values([]), on)),
            "own": look(deep_merge(load_values([]), {**on, "postgres": {"extraSettings": {
                "synchronous_standby_names": "ANY 1 (pgkeep, standby1)"}}})),
            "config_refused": refused}


def credentials_findings():
    """Least privilege in the rendered chart: for each container, the Secrets' keys it can read
    (mounted files; no envFrom, no secretKeyRef), the role it connects as, what it may do with
    storage; the NetworkPolicy and the service-account token."""
    def look(values):
        objects, _ = render(values, name="db", upgrade=True)
        secrets = {o["metadata"]["name"]: sorted((o.get("data") or {}).keys())
                   for o in objects if o["kind"] == "Secret"}
        out = {"secrets": secrets, "containers": {}, "env_secrets": [],
               "network_policy": [o["metadata"]["name"] for o in objects if o["kind"] == "NetworkPolicy"],
               "token_mounted": []}
        for o in objects:
            if o["kind"] not in ("StatefulSet", "Job"):
                continue
            spec = o["spec"]["template"]["spec"]
            if spec.get("automountServiceAccountToken") is not False:
                out["token_mounted"].append(f"{o['kind']}/{o['metadata']['name']}")
            vols = {}
            for v in spec.get("volumes", []):
                srcs = [{"secret": v["secret"]}] if "secret" in v else (v.get("projected") or {}).get("sources", [])
                keys = []
                for src in srcs:
                    ref = src.get("secret")
                    if not ref:
                        continue
                    name = ref.get("name") or ref.get("secretName")
                    items = ref.get("items")
                    keys += [f"{name}:{i['key']}" for i in items] if items else [f"{name}:*"]
                if keys:
                    vols[v["name"]] = keys
            for c in spec.get("initContainers", []) + spec["containers"]:
                label = f"{o['kind']}/{c['name']}"
                env = {e["name"]: e.get("value") for e in c.get("env", [])}
                if c.get("envFrom") or any("valueFrom" in e for e in c.get("env", [])):
                    out["env_secrets"].append(label)
                out["containers"][label] = {
                    "reads": sorted(k for m in c.get("volumeMounts", []) for k in vols.get(m["name"], [])),
                    "archive_rw": any(m["name"] == "archive" and not m.get("readOnly") for m in c.get("volumeMounts", [])),
                    "wal_fetch_storage": env.get("PGKEEP_WAL_FETCH_STORAGE", "true"),
                    "pg": env.get("PGKEEP_PG", ""),
                }
        cm = next(o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"] == "db-pgkeep")
        out["config_pg"] = next(l for l in cm["data"]["pgkeep.toml"].splitlines() if l.startswith("pg ="))
        out["hba"] = [l.strip() for l in cm["data"]["start-postgres.sh"].splitlines() if "scram-sha-256\"" in l or "reject\"" in l]
        return out
    s3 = {"storage": {"url": "s3://bucket/db"},
          "secret": {"env": {"AWS_ACCESS_KEY_ID": "AKIDWRITE", "AWS_SECRET_ACCESS_KEY": "write-secret"}}}
    ro = deep_merge(s3, {"secret": {"readOnlyEnv": {"AWS_ACCESS_KEY_ID": "AKIDREAD", "AWS_SECRET_ACCESS_KEY": "read-secret"}}})
    try:
        render(deep_merge(load_values([]), {"secret": {"env": {"HOME": "/x"}}}), name="db")
        stranger = ""
    except Exception as e:
        stranger = str(e)
    return {"file": look(load_values([])),
            "s3": look(deep_merge(load_values([]), s3)),
            "s3_readonly": look(deep_merge(load_values([]), ro)),
            "standby": look(load_values([os.path.join(EXAMPLES, "values-s3.yaml"), os.path.join(EXAMPLES, "values-standby.yaml")])),
            "stranger_refused": stranger}


def tls_findings():
    """postgres.tls: Postgres serves the Secret's certificate, its key reaches the Postgres
    container only, the Job gets the CA alone and connects with verify-full, a new cluster's
    pg_hba.conf takes outside connections over TLS only; and none of it by default."""
    def look(values):
        objects, _ = render(values, name="db", upgrade=True)
        out = {"key_in": [], "ca_in": [], "ssl_args": [], "hba_type": "", "job_pg": ""}
        tls = values.get("postgres", {}).get("tls", {})
        secret, ca_key = tls.get("secretName", ""), tls.get("caKey", "ca.crt")
        for o in objects:
            if o["kind"] not in ("StatefulSet", "Job"):
                continue
            spec = o["spec"]["template"]["spec"]
            items = {v["name"]: [i["key"] for i in v["secret"].get("items", [])]
                     for v in spec.get("volumes", []) if secret and v.get("secret", {}).get("secretName") == secret}
            for c in spec.get("initContainers", []) + spec["containers"]:
                label = f"{o['kind']}/{c['name']}"
                keys = [k for m in c.get("volumeMounts", []) for k in items.get(m["name"], [])]
                if "tls.key" in keys:
                    out["key_in"].append(label)
                if ca_key in keys:
                    out["ca_in"].append(label)
                env = {e["name"]: e.get("value", "") for e in c.get("env", [])}
                if c["name"] == "postgres":
                    out["ssl_args"] = [a for a in c.get("args", []) if a.startswith("ssl")]
                    out["hba_type"] = env.get("HBA_TYPE", "")
                if o["kind"] == "Job":
                    out["job_pg"] = env.get("PGKEEP_PG", "")
        return out
    return {"on": look(load_values([os.path.join(EXAMPLES, "values-tls.yaml")])),
            "off": look(load_values([]))}


def monitoring_findings():
    """The monitoring example's objects: the PrometheusRule's groups pass `promtool check rules`
    (when promtool is installed), the dashboard ConfigMap holds the dashboard JSON, and the
    PodMonitor scrapes the daemon's named port."""
    values = load_values([os.path.join(EXAMPLES, "values-monitoring.yaml")])
    objects, _ = render(values, name="db")
    by_kind = {o["kind"]: o for o in objects if o["metadata"]["name"].startswith("db")}
    rule = by_kind.get("PrometheusRule")
    promtool = shutil.which("promtool")
    checked = "no PrometheusRule"
    alerts = []
    if rule:
        alerts = [r["alert"] for g in rule["spec"]["groups"] for r in g["rules"] if "alert" in r]
        with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
            yaml.safe_dump({"groups": rule["spec"]["groups"]}, f)
        if promtool:
            p = subprocess.run([promtool, "check", "rules", f.name], capture_output=True, text=True)
            checked = "ok" if p.returncode == 0 else f"promtool: {p.stdout}{p.stderr}"
        else:
            checked = "promtool not installed"
        os.unlink(f.name)
    dashboard = next((o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"].endswith("-dashboard")), None)
    panels = len(json.loads(dashboard["data"]["pgkeep.json"])["panels"]) if dashboard else 0
    pm = by_kind.get("PodMonitor")
    ports = [e["port"] for e in pm["spec"]["podMetricsEndpoints"]] if pm else []
    default_kinds = {o["kind"] for o in render(load_values([]), name="db")[0]}
    return {"alerts": alerts, "rules_check": checked, "dashboard_panels": panels,
            "pod_monitor_ports": ports,
            "off_by_default": not (default_kinds & {"PodMonitor", "ServiceMonitor", "PrometheusRule"})}


def encryption_findings():
    """Where the encrypted example puts the identity and the recipients, and what is refused."""
    values = load_values([os.path.join(EXAMPLES, "values-encrypted.yaml")])
    objects, _ = render(values, name="db", upgrade=True)
    identity_in, recipients_in = [], []
    configs = {o["metadata"]["name"]: o["data"]["pgkeep.toml"] for o in objects if o["kind"] == "ConfigMap"}
    for o in objects:
        if o["kind"] not in ("StatefulSet", "Job"):
            continue
        spec = o["spec"]["template"]["spec"]
        secret_volumes = {v["name"] for v in spec.get("volumes", [])
                          if v.get("secret", {}).get("secretName") == values["encryption"]["identitySecret"]}
        config_volumes = {v["name"]: v["configMap"]["name"] for v in spec.get("volumes", []) if "configMap" in v}
        for c in spec.get("initContainers", []) + spec["containers"]:
            label = f"{o['kind']}/{c['name']}"
            mounts = {m["name"] for m in c.get("volumeMounts", [])}
            env = {e["name"] for e in c.get("env", [])}
            if mounts & secret_volumes or "PGKEEP_ENCRYPTION_IDENTITY_FILE" in env:
                identity_in.append(label)
            if any("encryption_recipients" in configs.get(config_volumes.get(m, ""), "") for m in mounts):
                recipients_in.append(label)
    try:
        render(deep_merge(values, {"encryption": {"identitySecret": ""}}), name="db")
        without_identity = ""
    except Exception as e:
        without_identity = str(e)
    try:
        render(deep_merge(values, {"encryption": {"recipients": ["AGE-SECRET-KEY-1XYZ"]}}), name="db")
        secret_as_recipient = ""
    except Exception as e:
        secret_as_recipient = str(e)
    tokens = sorted(f"{o['kind']}={json.dumps(o['spec']['template']['spec'].get('automountServiceAccountToken'))}"
                    for o in objects if o["kind"] in ("StatefulSet", "Job"))
    policy = next((o for o in objects if o["kind"] == "NetworkPolicy"), None)
    policy_ports = sorted(p["port"] for rule in (policy or {}).get("spec", {}).get("ingress", [])
                          for p in rule.get("ports", []))
    return {"identity_in": sorted(identity_in), "recipients_in": sorted(recipients_in),
            "service_account_tokens": tokens, "network_policy_ports": policy_ports,
            "without_identity": without_identity,
            "secret_as_recipient": "AGE-SECRET-KEY-1XYZ" not in secret_as_recipient and secret_as_recipient}


# ---------------------------------------------------------------- the pod simulation

_PORTS_TRIED = set()


def free_port():
    """A loopback port nobody uses now, for a server started later.

    Drawn from below the kernel's ephemeral range (32768-60999): a port from bind(0) lies in that
    range, where an outgoing connection of a parallel test may hold it by the time Postgres binds
    ("could not bind ... Address already in use", seen in CI)."""
    import random
    rng = random.Random(os.getpid() ^ time.time_ns())
    for _ in range(200):
        port = rng.randrange(20000, 32000)
        if port in _PORTS_TRIED:
            continue
        _PORTS_TRIED.add(port)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise SystemExit("podsim: no free loopback port in 20000..32000")


def postgres_ids():
    import pwd
    p = pwd.getpwnam("postgres")
    return p.pw_uid, p.pw_gid


def give_to_postgres(path):
    if IS_ROOT:
        uid, gid = postgres_ids()
        for dirpath, dirnames, filenames in os.walk(path):
            os.chown(dirpath, uid, gid)
            for n in filenames:
                os.chown(os.path.join(dirpath, n), uid, gid)


class Release:
    """A rendered release and the objects it puts in the (simulated) namespace."""

    def __init__(self, sim, name, values):
        self.sim, self.name, self.values = sim, name, values
        self.objects, self.notes = render(values, name=name, upgrade=False)
        self.hooks, _ = render(values, name=name, upgrade=True)
        for o in self.objects:
            if o["kind"] in ("Secret", "ConfigMap", "Service"):
                sim.namespace[(o["kind"], o["metadata"]["name"])] = o

    def one(self, kind):
        found = [o for o in self.objects if o["kind"] == kind
                 and "helm.sh/hook" not in (o["metadata"].get("annotations") or {})]
        if len(found) != 1:
            fail(f"expected one {kind} in release {self.name}, found {len(found)}")
        return found[0]

    def hook_objects(self, event):
        return [o for o in self.hooks
                if event in (o["metadata"].get("annotations") or {}).get("helm.sh/hook", "").split(",")]


class Process:
    def __init__(self, name, popen, logpath):
        self.name, self.popen, self.logpath = name, popen, logpath

    def tail(self, n=40):
        try:
            with open(self.logpath, errors="replace") as f:
                return "".join(f.readlines()[-n:])
        except OSError:
            return ""


class Pod:
    """One pod of the StatefulSet (or a Job's pod): its volumes are folders under `root`."""

    def __init__(self, sim, release, pod_spec, name, root, claims):
        self.sim, self.release, self.spec, self.name, self.root = sim, release, pod_spec, name, root
        self.claims = claims  # volume name -> folder (PVCs, outlive the pod)
        self.procs = {}
        os.makedirs(root, exist_ok=True)
        self.volumes = {}
        for v in pod_spec.get("volumes", []):
            if "emptyDir" in v:
                self.volumes[v["name"]] = ("dir", self.fresh_dir(f"emptydir-{v['name']}"))
            elif "configMap" in v:
                self.volumes[v["name"]] = ("configmap", v["configMap"]["name"])
            elif "persistentVolumeClaim" in v:
                claim = v["persistentVolumeClaim"]["claimName"]
                self.volumes[v["name"]] = ("dir", sim.claim_dir(claim))
            elif "secret" in v or "projected" in v:
                self.volumes[v["name"]] = ("dir", self.secret_volume(v))
            else:
                fail(f"{name}: volume kind not simulated: {v}")
        for vol, folder in claims.items():
            self.volumes.setdefault(vol, ("dir", folder))

    def secret_volume(self, v):
        """A Secret (or projected Secrets) volume as the kubelet writes one: the files in a
        timestamped folder, `..data` linking to it and each key a link through `..data`; owned by
        root, group fsGroup (here: postgres), mode defaultMode. A missing Secret or key fails, as
        the pod would not start."""
        if "secret" in v:
            sources, mode = [{"secret": v["secret"]}], v["secret"].get("defaultMode", 0o644)
        else:
            sources, mode = v["projected"]["sources"], v["projected"].get("defaultMode", 0o644)
        files = {}
        for src in sources:
            ref = src.get("secret")
            if ref is None:
                fail(f"{self.name}: projected source not simulated: {src}")
            name = ref.get("name") or ref.get("secretName")
            sec = self.sim.namespace.get(("Secret", name))
            if sec is None:
                fail(f"{self.name}: volume {v['name']}: Secret {name} does not exist in the namespace")
            data = {k: base64.b64decode(x) for k, x in (sec.get("data") or {}).items()}
            items = ref.get("items")
            if items is None:
                files.update(data)
            for it in items or []:
                if it["key"] not in data:
                    fail(f"{self.name}: volume {v['name']}: Secret {name} has no key {it['key']}")
                files[it["path"]] = data[it["key"]]
        d = self.fresh_dir(f"secret-{v['name']}")
        stamp = "..2026_12_02_00_00_00.000000001"
        os.makedirs(os.path.join(d, stamp))
        _, gid = postgres_ids() if IS_ROOT else (None, os.getgid())
        for k, data in files.items():
            path = os.path.join(d, stamp, k)
            with open(path, "wb") as f:
                f.write(data)
            os.chmod(path, mode)
            if IS_ROOT:
                os.chown(path, 0, gid)
            os.symlink(os.path.join("..data", k), os.path.join(d, k))
        os.symlink(stamp, os.path.join(d, "..data"))
        if IS_ROOT:
            os.chown(os.path.join(d, stamp), 0, gid)
            os.chown(d, 0, gid)
        os.chmod(os.path.join(d, stamp), 0o750)
        os.chmod(d, 0o750)
        return d

    def fresh_dir(self, label):
        d = os.path.join(self.root, label)
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
        os.chmod(d, 0o750)
        give_to_postgres(d)
        return d

    def mounts(self, c):
        """(container path, folder, read-only) for container c; its ConfigMaps are written out."""
        out = []
        for m in c.get("volumeMounts", []):
            kind, what = self.volumes.get(m["name"], (None, None))
            if kind is None:
                fail(f"{c['name']}: mounts volume {m['name']}, which the pod does not declare")
            if kind == "configmap":
                cm = self.sim.namespace.get(("ConfigMap", what))
                if cm is None:
                    fail(f"{c['name']}: ConfigMap {what} does not exist in the namespace")
                # Written once per container: a running container's mount keeps pointing here
                # while probes and hooks start more processes in it.
                folder = os.path.join(self.root, f"cm-{c['name']}-{m['name']}")
                if os.path.isdir(folder):
                    out.append((m["mountPath"], folder, True))
                    continue
                os.makedirs(folder)
                for key, text in cm.get("data", {}).items():
                    with open(os.path.join(folder, key), "w") as f:
                        f.write(text)
                    os.chmod(os.path.join(folder, key), 0o644)
                os.chmod(folder, 0o755)
                out.append((m["mountPath"], folder, True))
            else:
                out.append((m["mountPath"], what, bool(m.get("readOnly"))))
        return out

    def env(self, c):
        env = {"HOSTNAME": self.name}
        for ef in c.get("envFrom", []):
            if "secretRef" in ef:
                sec = self.sim.namespace.get(("Secret", ef["secretRef"]["name"]))
                if sec is None:
                    fail(f"{c['name']}: Secret {ef['secretRef']['name']} does not exist in the namespace")
                for k, v in (sec.get("data") or {}).items():
                    env[k] = base64.b64decode(v).decode()
                for k, v in (sec.get("stringData") or {}).items():
                    env[k] = v
            elif "configMapRef" in ef:
                cm = self.sim.namespace[("ConfigMap", ef["configMapRef"]["name"])]
                env.update(cm.get("data", {}))
        for e in c.get("env", []):
            if "value" in e:
                env[e["name"]] = str(e["value"])
            elif "valueFrom" in e and "secretKeyRef" in e["valueFrom"]:
                ref = e["valueFrom"]["secretKeyRef"]
                sec = self.sim.namespace[("Secret", ref["name"])]
                env[e["name"]] = base64.b64decode(sec["data"][ref["key"]]).decode()
            else:
                fail(f"{c['name']}: env {e} not simulated")
        # The images' own PATH (docker/Dockerfile: Debian's; postgres:15: with its server binaries).
        env.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
                       + ("" if self.sim.is_pgkeep_image(c["image"]) else ":/usr/lib/postgresql/15/bin"))
        return env

    def spawn(self, c, words=None, label=None, stdout_path=None):
        """Starts a process as container c would: in a mount namespace of its own whose root is a
        fresh tmpfs with this machine's /usr (the images' programs: Debian's, Postgres 15's), the
        pgkeep image's /usr/local/bin holding only the binary under test, the container's volumes
        at their mount paths, /etc/hosts naming the namespace's Services (DNS), a read-only root
        when the container asks for one, and exactly the declared environment, as the postgres
        user. Nothing is translated: a path, flag or variable the chart gets wrong fails here."""
        label = label or c["name"]
        env = self.env(c)
        words = words or (c.get("command", []) + c.get("args", []))
        root = os.path.join(self.root, f"root-{label}")
        os.makedirs(root, exist_ok=True)
        hosts = os.path.join(self.root, f"hosts-{label}")
        with open(hosts, "w") as f:
            f.write("127.0.0.1 localhost " + " ".join([self.name] + self.sim.service_names()) + "\n::1 localhost\n")
        os.chmod(hosts, 0o644)
        q = shlex.quote
        script = ["set -e", f"R={q(root)}", 'mount -t tmpfs -o mode=755 pod-root "$R"',
                  'for d in bin sbin lib lib32 lib64 libx32; do',
                  '  if [ -L "/$d" ]; then ln -s "$(readlink "/$d")" "$R/$d"; elif [ -d "/$d" ]; then mkdir "$R/$d"; mount --rbind "/$d" "$R/$d"; fi',
                  'done',
                  'mkdir "$R/usr" "$R/proc" "$R/dev" "$R/sys" "$R/etc" "$R/.host-etc" "$R/tmp" "$R/run" "$R/var"',
                  'chmod 1777 "$R/tmp"',
                  'mount --rbind /usr "$R/usr"; mount --rbind /proc "$R/proc"; mount --rbind /dev "$R/dev"; mount --rbind /sys "$R/sys"',
                  'mount --rbind /etc "$R/.host-etc"',
                  'for e in /etc/* /etc/.[!.]*; do [ -e "$e" ] || [ -L "$e" ] || continue; n=${e#/etc/}; [ "$n" = hosts ] || ln -s "/.host-etc/$n" "$R/etc/$n"; done',
                  f'cp {q(hosts)} "$R/etc/hosts"',
                  'ln -s ../run "$R/var/run"']
        if self.sim.is_pgkeep_image(c["image"]):
            script.append(f'mount --bind {q(os.path.dirname(self.sim.image_pgkeep))} "$R/usr/local/bin"')
        for path, folder, ro in sorted(self.mounts(c), key=lambda m: len(m[0])):
            script.append(f'if [ -L "$R"{q(path)} ]; then rm "$R"{q(path)}; fi; mkdir -p "$R"{q(path)}; mount --bind {q(folder)} "$R"{q(path)}')
            if ro:
                script.append(f'mount -o remount,bind,ro "$R"{q(path)}')
        if (c.get("securityContext") or {}).get("readOnlyRootFilesystem"):
            script.append('mount -o remount,ro pod-root "$R"')
        user = ["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups"]
        script.append('exec chroot "$R" ' + " ".join(q(w) for w in user + ["env", "-i"]
                      + [f"{k}={v}" for k, v in env.items()] + [str(w) for w in words]))
        logpath = os.path.join(self.root, f"{label}.log")
        logf = open(logpath, "ab")
        p = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "/bin/sh", "-c", "\n".join(script)],
                             cwd="/", stdout=open(stdout_path, "wb") if stdout_path else logf, stderr=logf,
                             stdin=subprocess.DEVNULL, start_new_session=True)
        return Process(label, p, logpath)

    def run(self, c, words=None, label=None, timeout=120, check=True):
        """Runs to completion (an init container, an exec probe, a hook, `kubectl exec`): exit
        code, stdout, and what it logged (stderr)."""
        label = label or c["name"]
        stdout_path = os.path.join(self.root, f"{label}.out")
        p = self.spawn(c, words, label, stdout_path=stdout_path)
        try:
            code = p.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.popen.kill()
            fail(f"{p.name} did not finish within {timeout}s:\n{p.tail()}")
        if check and code != 0:
            fail(f"{p.name} exited {code}:\n{p.tail()}")
        with open(stdout_path, errors="replace") as f:
            out = f.read()
        with open(p.logpath, errors="replace") as f:
            return code, out, f.read()

    def probe(self, c, kind, limit=180):
        pr = c.get(kind)
        if not pr:
            return
        period = min(pr.get("periodSeconds", 10), 2)
        deadline = time.monotonic() + min(limit, pr.get("periodSeconds", 10) * pr.get("failureThreshold", 3) + 5)
        while True:
            if self.probe_once(c, pr):
                return
            proc = self.procs.get(c["name"])
            if proc and proc.popen.poll() is not None:
                fail(f"{c['name']} exited {proc.popen.returncode} before its {kind} passed:\n{proc.tail()}")
            if time.monotonic() > deadline:
                fail(f"{c['name']}: {kind} did not pass:\n{proc.tail() if proc else ''}")
            time.sleep(period)

    def probe_once(self, c, pr):
        if "httpGet" in pr:
            port = pr["httpGet"]["port"]
            if isinstance(port, str):
                port = next(p["containerPort"] for p in c.get("ports", []) if p.get("name") == port)
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}{pr['httpGet']['path']}", timeout=5) as r:
                    return 200 <= r.status < 400
            except Exception:
                return False
        if "exec" in pr:
            code, _, _ = self.run(c, pr["exec"]["command"], label=f"{c['name']}-probe", timeout=30, check=False)
            return code == 0
        fail(f"probe kind not simulated: {pr}")

    def start(self):
        """Init containers in order (native sidecars stay running once started), then the main
        containers; returns once every startup and readiness probe passes."""
        for c in self.spec.get("initContainers", []):
            if c.get("restartPolicy") == "Always":
                log(f"{self.name}: sidecar {c['name']} starts")
                self.procs[c["name"]] = self.spawn(c)
                self.probe(c, "startupProbe")
            else:
                log(f"{self.name}: init container {c['name']}: {' '.join(c.get('command', []) + c.get('args', []))}")
                _, out, logged = self.run(c, timeout=600)
                self.init_logs = getattr(self, "init_logs", {})
                self.init_logs[c["name"]] = out + logged
        for c in self.spec["containers"]:
            log(f"{self.name}: container {c['name']} starts")
            self.procs[c["name"]] = self.spawn(c)
        for c in self.spec["containers"]:
            self.probe(c, "startupProbe", limit=600)
        for c in self.spec.get("initContainers", []) + self.spec["containers"]:
            if c["name"] in self.procs:
                self.probe(c, "readinessProbe", limit=300)
        log(f"{self.name}: ready")

    def container(self, name):
        for c in self.spec.get("initContainers", []) + self.spec["containers"]:
            if c["name"] == name:
                return c
        fail(f"no container {name} in {self.name}")

    def stop(self):
        """Kubernetes' order: main containers get their preStop hook, then SIGTERM (those without a
        hook get SIGTERM at once); native sidecars get SIGTERM after every main container has
        exited, in reverse order. Everything must exit 0 within the grace period."""
        grace = self.spec.get("terminationGracePeriodSeconds", 30)
        deadline = time.monotonic() + grace
        mains = self.spec["containers"]
        for c in mains:
            if not c.get("lifecycle", {}).get("preStop"):
                os.kill(self.procs[c["name"]].popen.pid, signal.SIGTERM)
        results = {}
        for c in mains:
            hook = c.get("lifecycle", {}).get("preStop")
            if hook:
                t = time.monotonic()
                code, _, out = self.run(c, hook["exec"]["command"], label=f"{c['name']}-preStop",
                                     timeout=max(1, deadline - time.monotonic()), check=False)
                results[f"{c['name']}-preStop"] = {"exit": code, "seconds": round(time.monotonic() - t, 2)}
                if code != 0:
                    fail(f"{self.name}: preStop of {c['name']} exited {code}:\n{out}")
                os.kill(self.procs[c["name"]].popen.pid, signal.SIGTERM)
        for c in mains:
            results[c["name"]] = self.wait_exit(c["name"], deadline)
        for c in reversed(self.spec.get("initContainers", [])):
            if c["name"] in self.procs:
                os.kill(self.procs[c["name"]].popen.pid, signal.SIGTERM)
                results[c["name"]] = self.wait_exit(c["name"], deadline)
        log(f"{self.name}: stopped {results}")
        return results

    def wait_exit(self, name, deadline):
        p = self.procs[name]
        t = time.monotonic()
        try:
            code = p.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.popen.kill()
            fail(f"{self.name}: {name} did not exit within the grace period:\n{p.tail()}")
        if code != 0:
            fail(f"{self.name}: {name} exited {code} on SIGTERM:\n{p.tail()}")
        return {"exit": code, "seconds": round(time.monotonic() - t, 2)}

    def kill(self):
        """What a deleted pod's cgroup gets: SIGKILL to every process of every container."""
        for p in self.procs.values():
            try:
                os.killpg(p.popen.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.popen.wait()


class Sim:
    def __init__(self, pgkeep, workdir):
        self.workdir = workdir
        self.namespace = {}
        self.claims = {}
        bindir = os.path.join(workdir, "image-bin")
        os.makedirs(bindir, exist_ok=True)
        self.image_pgkeep = os.path.join(bindir, "pgkeep")
        shutil.copy(pgkeep, self.image_pgkeep)
        os.chmod(self.image_pgkeep, 0o755)
        os.chmod(bindir, 0o755)
        self.pgkeep_repo = None
        self.pods = []

    def is_pgkeep_image(self, image):
        return image.split(":")[0] == self.pgkeep_repo

    def claim_dir(self, claim):
        if claim not in self.claims:
            d = os.path.join(self.workdir, "pvc", claim)
            os.makedirs(d)
            give_to_postgres(d)
            self.claims[claim] = d
        return self.claims[claim]

    def service_names(self):
        """The namespace's Services, which its DNS resolves (here: to loopback)."""
        return sorted(name for (kind, name) in self.namespace if kind == "Service")

    def pod(self, release, ordinal, generation, keep=()):
        """Pod <sts>-<ordinal>, with volume claims made for this generation (a new generation is a
        pod on new, empty volumes: another node, a lost disk), but for the claims in `keep`, which
        are generation 1's."""
        sts = release.one("StatefulSet")
        self.pgkeep_repo = release.values.get("image", {}).get("repository") or "ghcr.io/pgkeep/pgkeep"
        name = f"{sts['metadata']['name']}-{ordinal}"
        claims = {}
        for t in sts["spec"].get("volumeClaimTemplates", []):
            vol = t["metadata"]["name"]
            claims[vol] = self.claim_dir(f"{vol}-{name}-g{1 if vol in keep else generation}")
        spec = sts["spec"]["template"]["spec"]
        p = Pod(self, release, spec, name, os.path.join(self.workdir, f"{name}-g{generation}"), claims)
        self.pods.append(p)
        return p

    def run_job(self, release, job, generation, check=True, tag=""):
        """A Job's pod: its one container, run to completion, against the claims of the given
        StatefulSet pod generation (what a Job mounts by claim name)."""
        spec = job["spec"]["template"]["spec"]
        for v in spec.get("volumes", []):
            if "persistentVolumeClaim" in v:
                claim = v["persistentVolumeClaim"]["claimName"]
                self.claims.setdefault(claim, self.claims.get(f"{claim}-g{generation}", None) or self.claim_dir(claim))
        p = Pod(self, release, spec, job["metadata"]["name"], os.path.join(self.workdir, job["metadata"]["name"] + tag), {})
        (c,) = spec["containers"]
        code, out, err = p.run(c, timeout=job["spec"].get("activeDeadlineSeconds", 600), check=check)
        return out if check else (code, out, err)


# ---------------------------------------------------------------- Postgres as a client sees it

class Client:
    def __init__(self, port, password):
        self.port, self.password = port, password

    def sql(self, query, db="postgres"):
        r = subprocess.run(
            [os.path.join(PGBIN, "psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
             "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-d", db, "-c", query],
            capture_output=True, text=True, env={**os.environ, "PGPASSWORD": self.password, "PGCONNECT_TIMEOUT": "5"},
            timeout=120)
        if r.returncode != 0:
            fail(f"psql {query!r}: {r.stderr}")
        return r.stdout.strip()

    def pgbench(self, *args):
        r = subprocess.run([os.path.join(PGBIN, "pgbench"), "-h", "127.0.0.1", "-p", str(self.port),
                            "-U", "postgres", *args, "postgres"],
                           capture_output=True, text=True, env={**os.environ, "PGPASSWORD": self.password},
                           timeout=300)
        if r.returncode != 0:
            fail(f"pgbench {args}: {r.stderr}")
        return r.stdout

    def checksum(self, table):
        return self.sql(f"SELECT count(*) || ':' || coalesce(md5(string_agg(t::text, ',' ORDER BY t::text)), '') FROM {table} t")

    def ledger(self):
        return self.sql("SELECT coalesce(string_agg(id::text, ',' ORDER BY id), '') FROM ledger")


def write_rows(client, first, count):
    """Rows committed one by one; returns the ids Postgres acknowledged."""
    acked = []
    for i in range(first, first + count):
        client.sql(f"INSERT INTO ledger (id, note) VALUES ({i}, 'row {i}')")
        acked.append(i)
    return acked


# ---------------------------------------------------------------- scenarios

def values_for(storage, pg_port, daemon_port, extra_files=(), ordinary_sidecar=False):
    """The documented values files, plus what a machine without a cluster must change: loopback
    ports and addresses, and the S3 server's endpoint and keys."""
    files = []
    if storage == "s3":
        files.append(os.path.join(EXAMPLES, "values-s3-compatible.yaml"))
    files += [os.path.join(EXAMPLES, f) for f in extra_files]
    values = load_values(files)
    local = {
        "postgres": {"port": pg_port, "listenAddresses": "127.0.0.1"},
        "daemon": {"port": daemon_port, "listenAddress": "127.0.0.1"},
        # Fast enough for a test: the open segment reaches storage within a second.
        "config": {"partial_upload_ms": 1000},
    }
    if ordinary_sidecar:
        local["daemon"]["nativeSidecar"] = False
    if storage == "s3":
        local["storage"] = {
            "url": f"s3://{os.environ['PGKEEP_SIM_BUCKET']}/db",
            "env": {"AWS_ENDPOINT": os.environ["AWS_ENDPOINT"], "AWS_ALLOW_HTTP": "true",
                    "AWS_REGION": os.environ.get("AWS_REGION", "us-east-1")},
        }
        local["secret"] = {"env": {"AWS_ACCESS_KEY_ID": os.environ["AWS_ACCESS_KEY_ID"],
                                   "AWS_SECRET_ACCESS_KEY": os.environ["AWS_SECRET_ACCESS_KEY"]}}
    return deep_merge(values, local)


def backups(pod):
    code, out, _ = pod.run(pod.container("pgkeep"), ["pgkeep", "list", "--json"], label="list", check=False)
    if code != 0:
        return []
    return json.loads(out)["backups"]


def wait(what, seconds, check):
    deadline = time.monotonic() + seconds
    while True:
        v = check()
        if v:
            return v
        if time.monotonic() > deadline:
            fail(f"timed out after {seconds}s waiting for {what}")
        time.sleep(0.5)


def password_of(sim, release):
    sec = sim.namespace[("Secret", release.values.get("secret", {}).get("existingSecret") or f"{release.name}-pgkeep")]
    return base64.b64decode(sec["data"]["postgres-password"]).decode()


def start_primary(sim, storage, ordinary_sidecar=False):
    pg_port, daemon_port = free_port(), free_port()
    rel = Release(sim, "db", values_for(storage, pg_port, daemon_port, ordinary_sidecar=ordinary_sidecar))
    pod = sim.pod(rel, 0, 1)
    pod.start()
    client = Client(pg_port, password_of(sim, rel))
    if "holds no base backup" not in pod.init_logs.get("restore", ""):
        fail(f"pod 1's restore should have found no backup:\n{pod.init_logs.get('restore')}")
    # The daemon takes the first backup itself: storage held none.
    first = wait("the daemon's first backup", 120, lambda: backups(pod))
    log(f"first backup by the daemon: {first[0]['id']}")
    return rel, pod, client


def primary(sim, storage, ordinary_sidecar):
    findings = {}
    rel, pod, client = start_primary(sim, storage, ordinary_sidecar)
    client.sql("CREATE TABLE ledger (id int PRIMARY KEY, note text)")
    # pgkeep runs as its own role (made by the Postgres container), not as the superuser.
    findings["pgkeep_role"] = client.sql(
        "SELECT rolname || ':super=' || rolsuper || ':replication=' || rolreplication FROM pg_roles WHERE rolname = 'pgkeep'")
    findings["walsender_users"] = wait("the daemon's walsender", 30, lambda: client.sql(
        "SELECT string_agg(DISTINCT usename, ',') FROM pg_stat_replication"))
    acked = write_rows(client, 1, 50)
    client.pgbench("-i", "-s", "2", "-q")
    client.pgbench("-c", "2", "-T", "4", "-n")
    acked += write_rows(client, 51, 50)

    # helm upgrade: the rendered pre-upgrade hooks, in weight order (the ConfigMap and Secret
    # copies first, then the Job), against the running pod; `over` changes the values.
    def upgrade_hooks(over, tag, check=True):
        objects, _ = render(deep_merge(rel.values, over), name=rel.name, upgrade=True)
        hooks = sorted([o for o in objects if "pre-upgrade" in (o["metadata"].get("annotations") or {}).get("helm.sh/hook", "")],
                       key=lambda o: int(o["metadata"]["annotations"].get("helm.sh/hook-weight", "0")))
        for o in hooks:
            if o["kind"] in ("ConfigMap", "Secret"):
                sim.namespace[(o["kind"], o["metadata"]["name"])] = o
        job = next(o for o in hooks if o["kind"] == "Job")
        return [f"{o['kind']}/{o['metadata']['name']}" for o in hooks], sim.run_job(rel, job, 1, check=check, tag=tag)

    # The default hook: a mark, durable in storage, in seconds.
    started = time.monotonic()
    findings["pre_upgrade_hooks"], out = upgrade_hooks({}, "-mark")
    findings["hook_mark_seconds"] = round(time.monotonic() - started, 2)
    mark = out.strip().splitlines()[-1].split()[0]
    code, listing, _ = pod.run(pod.container("pgkeep"), ["pgkeep", "list", "--json"], label="list-marks", check=False)
    marks = [m["name"] for m in json.loads(listing)["marks"]] if code == 0 else []
    if mark not in marks:
        fail(f"the pre-upgrade Job's mark {mark} is not listed: {marks}\n{out}")
    findings["hook_mark"] = mark
    log(f"pre-upgrade Job took mark {mark} in {findings['hook_mark_seconds']}s")
    at_mark = {"ledger": client.ledger(), **{t: client.checksum(t) for t in ("pgbench_accounts", "pgbench_branches", "pgbench_tellers")}}
    acked_at_mark = list(acked)

    # The migration: schema and rows change.
    client.sql("ALTER TABLE ledger ADD COLUMN migrated boolean DEFAULT true")
    client.sql("UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid <= 5000")

    # backupHook.mode=backup: the mark (there already: the same revision), then a full backup.
    before = {b["id"] for b in backups(pod)}
    started = time.monotonic()
    _, out = upgrade_hooks({"backupHook": {"mode": "backup"}}, "-backup")
    findings["hook_backup_seconds"] = round(time.monotonic() - started, 2)
    after = {b["id"] for b in backups(pod)}
    new = after - before
    if len(new) != 1 or out.strip().splitlines()[-1].strip() not in new:
        fail(f"the pre-upgrade Job should have made exactly one new backup (before {before}, after {after}):\n{out}")
    findings["hook_backup"] = new.pop()
    log(f"pre-upgrade Job made backup {findings['hook_backup']}")

    # A change of major in the values: the hook fails the upgrade, saying why.
    other = 16 if int(rel.values.get("postgres", {}).get("major", 15)) != 16 else 17
    _, (code, out, err) = upgrade_hooks({"postgres": {"major": other}}, "-major", check=False)
    findings["major_change"] = {"exit": code, "says": next((l for l in err.splitlines() if "is asked for" in l), err[-400:])}

    acked += write_rows(client, 101, 50)
    client.pgbench("-c", "2", "-T", "3", "-n")
    acked += write_rows(client, 151, 10)
    sums = {t: client.checksum(t) for t in ("pgbench_accounts", "pgbench_branches", "pgbench_tellers", "pgbench_history")}
    findings["stop_pod1"] = pod.stop()

    # A new pod on empty volumes: the init container restores, Postgres recovers from storage.
    # With file:// storage on the pod's archive volume, that volume is what survives.
    pod2 = sim.pod(rel, 0, 2, keep=("archive",))
    pod2.start()
    if "restored; start Postgres" not in pod2.init_logs.get("restore", ""):
        fail(f"pod 2's init container did not restore:\n{pod2.init_logs.get('restore')}")
    wait("Postgres to finish recovery", 180, lambda: client.sql("SELECT pg_is_in_recovery()") == "f")
    got = client.ledger()
    want = ",".join(map(str, acked))
    if got != want:
        fail(f"rows lost: committed {want}\nrestored  {got}")
    for t, s in sums.items():
        if client.checksum(t) != s:
            fail(f"{t} differs after the restore")
    # restore_command's wal-fetch logs to Postgres' log: the WAL came from the pod's daemon.
    with open(pod2.procs["postgres"].logpath, errors="replace") as f:
        replay_log = f.read()
    findings["wal_fetched"] = {"daemon": replay_log.count('"via":"daemon"'),
                               "storage": replay_log.count('"via":"storage"')}
    findings["rows"] = len(acked)
    findings["tables_equal"] = sorted(sums)
    findings["timeline"] = client.sql("SELECT timeline_id FROM pg_control_checkpoint()")
    # A restart on the same volumes: the init container leaves the cluster alone.
    findings["stop_pod2"] = pod2.stop()
    pod2b = Pod(sim, rel, pod2.spec, pod2.name, pod2.root + "-restart", pod2.claims)
    pod2b.start()
    if client.ledger() != want:
        fail("rows differ after a restart on the same volumes")
    if "already holds a cluster" not in pod2b.init_logs.get("restore", ""):
        fail(f"the restart's init container did not leave the cluster alone:\n{pod2b.init_logs.get('restore')}")
    pod2b.stop()

    # Rollback to the mark, in place: restore.rollbackTo on the running volumes (helm upgrade,
    # the pod restarts). The data directory is set aside, not deleted; every table is as it was
    # at the mark, without the migration's column; a restart does not roll back twice.
    secret = sim.namespace[("Secret", f"{rel.name}-pgkeep")]["data"]
    keep = {k: base64.b64decode(v).decode() for k, v in secret.items()}
    rb_values = deep_merge(rel.values, {"restore": {"rollbackTo": mark},
                                        "secret": {"postgresPassword": keep["postgres-password"],
                                                   "pgkeepPassword": keep["pgkeep-password"]}})
    rb = Release(sim, rel.name, rb_values)
    rb_spec = rb.one("StatefulSet")["spec"]["template"]["spec"]
    pod3 = Pod(sim, rb, rb_spec, pod2.name, pod2.root + "-rollback", pod2.claims)
    sim.pods.append(pod3)
    pod3.start()
    if "rolling back to the mark" not in pod3.init_logs.get("restore", ""):
        fail(f"pod 3's init container did not roll back to the mark:\n{pod3.init_logs.get('restore')}")
    wait("the rolled-back Postgres to finish recovery", 180, lambda: client.sql("SELECT pg_is_in_recovery()") == "f")
    got = {"ledger": client.ledger(), **{t: client.checksum(t) for t in ("pgbench_accounts", "pgbench_branches", "pgbench_tellers")}}
    if got != at_mark:
        fail(f"the rollback to {mark} differs from the state at the mark:\n{got}\n{at_mark}")
    findings["rollback_rows"] = len(acked_at_mark)
    findings["rollback_migrated_column"] = client.sql(
        "SELECT count(*) FROM information_schema.columns WHERE table_name = 'ledger' AND column_name = 'migrated'")
    aside = os.path.join(pod2.claims["data"], f"pgdata.before-rollback-{mark}")
    findings["set_aside_kept"] = os.path.isfile(os.path.join(aside, "PG_VERSION"))
    client.sql("INSERT INTO ledger (id, note) VALUES (9001, 'after the rollback')")
    findings["stop_pod3"] = pod3.stop()
    pod3b = Pod(sim, rb, rb_spec, pod2.name, pod2.root + "-rollback-again", pod2.claims)
    sim.pods.append(pod3b)
    pod3b.start()
    again = pod3b.init_logs.get("restore", "")
    findings["rollback_again"] = {"done_already": "was done already" in again,
                                  "left_alone": "already holds a cluster" in again,
                                  "row_after_rollback": client.sql("SELECT count(*) FROM ledger WHERE id = 9001")}
    findings["stop_pod3b"] = pod3b.stop()
    return findings


def start_standby(sim, name, values, primary_fullname, pg_port):
    """A standby release `name` of the primary release whose fullname is `primary_fullname`: the
    read-only storage Secret its values name is made from the primary's keys (the S3 server here
    has one key pair; what matters is where they go). Returns once it runs in recovery."""
    ro = values["secret"]["existingStorageSecret"]
    primary_storage = sim.namespace[("Secret", f"{primary_fullname}-storage")]
    sim.namespace[("Secret", ro)] = {"kind": "Secret", "metadata": {"name": ro}, "data": dict(primary_storage["data"])}
    srel = Release(sim, name, values)
    spod = sim.pod(srel, 0, 1)
    spod.start()
    sclient = Client(pg_port, password_of(sim, srel))
    if sclient.sql("SELECT pg_is_in_recovery()") != "t":
        fail(f"the standby {name} is not in recovery")
    return srel, spod, sclient


def standby(sim, storage):
    findings = {}
    rel, pod, client = start_primary(sim, storage)
    client.sql("CREATE TABLE ledger (id int PRIMARY KEY, note text)")
    acked = write_rows(client, 1, 20)
    sb_pg, sb_daemon = free_port(), free_port()
    values = values_for(storage, sb_pg, sb_daemon, ["values-standby.yaml"])
    # What the example asks the user to create: read-only keys to the primary's archive (the S3
    # server here has one key pair, so they are the primary's; what matters is where they go).
    srel, spod, sclient = start_standby(sim, "replica", values, f"{rel.name}-pgkeep", sb_pg)
    acked += write_rows(client, 21, 30)
    # The primary's daemon streams the open segment as .partial; a switch completes it.
    client.sql("SELECT pg_switch_wal()")
    want = ",".join(map(str, acked))
    wait("the standby to replay the primary's rows", 120, lambda: sclient.sql(
        "SELECT coalesce(string_agg(id::text, ',' ORDER BY id), '') FROM ledger") == want
        if sclient.sql("SELECT to_regclass('ledger') IS NOT NULL") == "t" else False)
    findings["standby_rows"] = len(acked)
    status = lambda port: json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=5).read())
    findings["standby_daemon_status"] = status(sb_daemon)
    findings["primary_daemon_status"] = status(rel.values["daemon"]["port"])
    findings["stop_standby"] = spod.stop()
    findings["stop_primary"] = pod.stop()
    return findings


def snapshot(root):
    """Every file below `root` with the SHA-256 of its bytes."""
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            path = os.path.join(d, f)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, root)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def move(sim, storage):
    """A standalone release's database moved into a new release (values-move.yaml: restore.seedFrom
    names the old release's storage), with a standby release following the new primary: rows
    equal on both, the old archive byte for byte what it was."""
    if storage != "s3":
        fail("the move scenario needs object storage (a file:// archive lives on the old release's volume)")
    findings = {}
    rel, pod, client = start_primary(sim, storage)
    client.sql("CREATE TABLE ledger (id int PRIMARY KEY, note text)")
    acked = write_rows(client, 1, 40)
    client.pgbench("-i", "-s", "1", "-q")
    sums = {t: client.checksum(t) for t in ("pgbench_accounts", "pgbench_branches")}
    # The old release is retired first: its preStop makes its last WAL durable.
    findings["stop_old"] = pod.stop()
    bucket = os.environ["PGKEEP_SIM_BUCKET"]
    old_url = rel.values["storage"]["url"]
    old_dir = os.path.join(os.environ["PGKEEP_SIM_S3_DIR"], bucket, old_url.split("/", 3)[3])
    before = snapshot(old_dir)
    if not before:
        fail(f"nothing in the old archive at {old_dir}")

    pg_port, daemon_port = free_port(), free_port()
    values = deep_merge(values_for(storage, pg_port, daemon_port, ["values-move.yaml"]),
                        {"storage": {"url": f"s3://{bucket}/db-moved"},
                         "restore": {"seedFrom": old_url},
                         "secret": {"existingSecret": f"{rel.name}-pgkeep"}})
    new = Release(sim, "moved", values)
    npod = sim.pod(new, 0, 1)
    npod.start()
    seeded = npod.init_logs.get("restore", "")
    if "seeded this release's storage" not in seeded or "restored; start Postgres" not in seeded:
        fail(f"the new release's init container did not seed and restore:\n{seeded}")
    findings["seeded"] = next(json.loads(l) for l in seeded.splitlines() if "seeded this release" in l)
    nclient = Client(pg_port, password_of(sim, new))
    wait("the moved Postgres to finish recovery", 180, lambda: nclient.sql("SELECT pg_is_in_recovery()") == "f")
    if nclient.ledger() != ",".join(map(str, acked)):
        fail(f"rows differ after the move: {nclient.ledger()}")
    for t, v in sums.items():
        if nclient.checksum(t) != v:
            fail(f"{t} differs after the move")
    acked += write_rows(nclient, 41, 10)

    # A standby of the new release: restores from the new release's storage, follows its primary.
    sb_pg, sb_daemon = free_port(), free_port()
    svalues = deep_merge(values_for(storage, sb_pg, sb_daemon, ["values-standby.yaml"]),
                         {"storage": {"url": f"s3://{bucket}/db-moved"},
                          "secret": {"existingSecret": f"{rel.name}-pgkeep",
                                     "existingStorageSecret": "moved-pgkeep-storage-readonly",
                                     "existingReadOnlyStorageSecret": "moved-pgkeep-storage-readonly"}})
    srel, spod, sclient = start_standby(sim, "moved-replica", svalues, "moved-pgkeep", sb_pg)
    acked += write_rows(nclient, 51, 10)
    nclient.sql("SELECT pg_switch_wal()")
    want = ",".join(map(str, acked))
    wait("the standby to replay the new primary's rows", 120, lambda: sclient.ledger() == want
         if sclient.sql("SELECT to_regclass('ledger') IS NOT NULL") == "t" else False)
    findings["primary_rows"] = len(nclient.ledger().split(","))
    findings["standby_rows"] = len(sclient.ledger().split(","))
    findings["standby_tables_equal"] = all(sclient.checksum(t) == v for t, v in sums.items())
    findings["new_timeline"] = nclient.sql("SELECT timeline_id FROM pg_control_checkpoint()")
    findings["stop_standby"] = spod.stop()
    findings["stop_new"] = npod.stop()
    after = snapshot(old_dir)
    findings["source_unchanged"] = after == before
    findings["source_objects"] = len(before)
    if after != before:
        changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
        findings["source_changed"] = changed[:20]
    return findings


def simulate(args):
    if not IS_ROOT:
        fail("the pod simulation runs each container in a mount namespace of its own: run it as root")
    workdir = os.path.abspath(args.workdir)
    os.makedirs(workdir, exist_ok=True)
    sim = Sim(args.pgkeep, workdir)
    try:
        if args.scenario == "primary":
            findings = primary(sim, args.storage, args.ordinary_sidecar)
        elif args.scenario == "move":
            findings = move(sim, args.storage)
        else:
            findings = standby(sim, args.storage)
    finally:
        for p in sim.pods:
            p.kill()
    print(json.dumps({"scenario": args.scenario, "storage": args.storage, **findings}, default=str))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("check")
    s = sub.add_parser("simulate")
    s.add_argument("--scenario", choices=["primary", "standby", "move"], required=True)
    s.add_argument("--storage", choices=["s3", "file"], default="s3")
    s.add_argument("--pgkeep", required=True)
    s.add_argument("--workdir", required=True)
    s.add_argument("--chart", help="another copy of the chart (default: deploy/helm/pgkeep)")
    s.add_argument("--ordinary-sidecar", action="store_true",
                   help="daemon.nativeSidecar=false: the daemon is a container beside Postgres and gets SIGTERM with it")
    args = ap.parse_args()
    if getattr(args, "chart", None):
        os.environ["PGKEEP_SIM_CHART"] = args.chart
    check() if args.cmd == "check" else simulate(args)


if __name__ == "__main__":
    main()
