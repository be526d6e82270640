"""Helpers the benchmarks share: a Postgres 15 cluster run as `postgres`, the pgkeep daemon, a
real S3-compatible server (tools/s3-server, as the tests use) on loopback, and one small PUT's round trip to
either storage (the floor any upload pays there)."""
import datetime
import hashlib
import hmac
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request

PGBIN = os.environ.get("PGBIN", "/usr/lib/postgresql/15/bin")
# The client tools (pgbench), which serve every major: Debian's 15.
TOOLS = "/usr/lib/postgresql/15/bin"
ROOT = os.getuid() == 0


def as_pg(cmd, env=None):
    extra = [f"{k}={v}" for k, v in (env or {}).items()]
    return (["runuser", "-u", "postgres", "--"] if ROOT else []) + ["env", *extra, *cmd]


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def lsn(text):
    hi, lo = text.strip().split("/")
    return (int(hi, 16) << 32) | int(lo, 16)


def pct(values, p):
    v = sorted(values)
    return v[min(len(v) - 1, int(len(v) * p / 100))] if v else float("nan")


def workdir(path, pgkeep):
    """A fresh folder owned by postgres (which cannot enter /root) holding a copy of the binary."""
    if not os.path.exists(pgkeep):
        subprocess.run(["cargo", "build", "--release", "--bin", "pgkeep"], check=True)
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
    os.chmod(path, 0o755)
    if ROOT:
        shutil.chown(path, "postgres", "postgres")
    binary = os.path.join(path, "pgkeep")
    shutil.copy(pgkeep, binary)
    return binary


class Cluster:
    def __init__(self, work, name="data", conf="", initdb_args=()):
        self.work, self.data, self.port = work, os.path.join(work, name), free_port()
        subprocess.run(as_pg([f"{PGBIN}/initdb", "-D", self.data, "-A", "trust", "-U", "postgres", "--no-sync",
                              *initdb_args]), check=True, stdout=subprocess.DEVNULL)
        with open(os.path.join(self.data, "postgresql.conf"), "a") as f:
            f.write(f"port = {self.port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{work}'\n"
                    f"max_wal_size = '2GB'\n{conf}")
        self.pg_ctl("start")
        self.running = True

    def pg_ctl(self, action):
        subprocess.run(as_pg([f"{PGBIN}/pg_ctl", "-D", self.data, "-l", f"{self.work}/pg.log", "-w", "-m", "fast",
                              action]), check=True, stdout=subprocess.DEVNULL)

    def psql_cmd(self):
        return ["psql", "-X", "-A", "-t", "-q", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres",
                "-d", "postgres"]

    def sql(self, query):
        return subprocess.run(self.psql_cmd() + ["-c", query], check=True, capture_output=True,
                              text=True).stdout.strip()

    def set(self, name, value, restart=False):
        self.sql(f"alter system set {name} = '{value}'")
        if restart:
            self.pg_ctl("restart")
        else:
            self.sql("select pg_reload_conf()")

    def pgbench(self, *args, **kw):
        return subprocess.run([f"{TOOLS}/pgbench", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", *args,
                               "postgres"], check=True, capture_output=True, text=True, **kw).stdout

    def stop(self):
        if self.running:
            subprocess.run(as_pg([f"{PGBIN}/pg_ctl", "-D", self.data, "-m", "immediate", "stop"]),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            self.running = False


def tps_of(pgbench_output):
    return float(next(line for line in pgbench_output.splitlines() if line.startswith("tps")).split()[2])


class S3:
    """The S3 test server on a loopback port serving bucket `bench`, with signed requests, as the tests run it."""
    ACCESS, SECRET, BUCKET, REGION = "pgkeepbench", "pgkeep-bench-secret-key", "bench", "us-east-1"

    def __init__(self, work):
        # tools/s3-server: s3s-fs's store, served with TCP_NODELAY (the s3s-fs binary stalls ~40 ms
        # on small bodies: Nagle against the client's delayed ACK).
        binary = shutil.which("pgkeep-s3-test-server") or os.path.expanduser("~/.cargo/bin/pgkeep-s3-test-server")
        if not os.path.exists(binary):
            raise SystemExit("pgkeep-s3-test-server is not installed: run scripts/install-deps.sh s3s-fs")
        root = os.path.join(work, "s3")
        os.makedirs(os.path.join(root, self.BUCKET))
        self.port = free_port()
        self.proc = subprocess.Popen([binary, "--host", "127.0.0.1", "--port", str(self.port), "--access-key",
                                      self.ACCESS, "--secret-key", self.SECRET, root],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise SystemExit("the S3 test server did not start")

    def env(self):
        return {"AWS_ACCESS_KEY_ID": self.ACCESS, "AWS_SECRET_ACCESS_KEY": self.SECRET,
                "AWS_ENDPOINT": f"http://127.0.0.1:{self.port}", "AWS_ALLOW_HTTP": "true", "AWS_REGION": self.REGION}

    def put(self, conn, key, body):
        """One SigV4-signed PUT on a kept-alive connection, as object_store sends it."""
        now = datetime.datetime.now(datetime.timezone.utc)
        amz, day = now.strftime("%Y%m%dT%H%M%SZ"), now.strftime("%Y%m%d")
        digest = hashlib.sha256(body).hexdigest()
        headers = {"host": f"127.0.0.1:{self.port}", "x-amz-content-sha256": digest, "x-amz-date": amz}
        signed = ";".join(sorted(headers))
        canonical = "\n".join(["PUT", f"/{self.BUCKET}/{key}", "",
                               "".join(f"{k}:{headers[k]}\n" for k in sorted(headers)), signed, digest])
        scope = f"{day}/{self.REGION}/s3/aws4_request"
        to_sign = "\n".join(["AWS4-HMAC-SHA256", amz, scope, hashlib.sha256(canonical.encode()).hexdigest()])
        k = ("AWS4" + self.SECRET).encode()
        for part in (day, self.REGION, "s3", "aws4_request"):
            k = hmac.new(k, part.encode(), hashlib.sha256).digest()
        headers["authorization"] = (f"AWS4-HMAC-SHA256 Credential={self.ACCESS}/{scope}, SignedHeaders={signed}, "
                                    f"Signature={hmac.new(k, to_sign.encode(), hashlib.sha256).hexdigest()}")
        conn.request("PUT", f"/{self.BUCKET}/{key}", body=body, headers=headers)
        resp = conn.getresponse()
        resp.read()
        if resp.status != 200:
            raise SystemExit(f"the S3 test server refused a PUT: {resp.status}")

    def stop(self):
        self.proc.kill()
        self.proc.wait()


def small_put_ms(kind, work, s3=None, n=50):
    """Median time of one 4 KiB durable write to the storage: on file://, write + fsync + rename +
    fsync of the folder (what pgkeep does per object); on S3, one signed PUT."""
    times = []
    if kind == "s3":
        conn = http.client.HTTPConnection("127.0.0.1", s3.port, timeout=10)
        for i in range(n):
            t = time.perf_counter()
            s3.put(conn, f"probe/{i}", os.urandom(4096))
            times.append((time.perf_counter() - t) * 1000)
        conn.close()
        return pct(times, 50)
    folder = os.path.join(work, "probe")
    os.makedirs(folder, exist_ok=True)
    for i in range(n):
        t = time.perf_counter()
        tmp = os.path.join(folder, f".probe{i}.tmp")
        with open(tmp, "wb") as f:
            f.write(os.urandom(4096))
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, os.path.join(folder, f"probe{i}"))
        d = os.open(folder, os.O_RDONLY)
        os.fsync(d)
        os.close(d)
        times.append((time.perf_counter() - t) * 1000)
    shutil.rmtree(folder)
    return pct(times, 50)


def storage_env(kind, work, s3=None, prefix="db"):
    """The daemon's environment naming the storage of `kind` ("file" or "s3")."""
    if kind == "s3":
        return {"PGKEEP_STORAGE": f"s3://{S3.BUCKET}/{prefix}", **s3.env()}
    return {"PGKEEP_STORAGE": f"file://{work}/archive-{prefix}"}


class Daemon:
    def __init__(self, binary, work, cluster, env):
        self.http = free_port()
        self.binary = binary
        full = {"PGHOST": "127.0.0.1", "PGPORT": str(cluster.port), "PGUSER": "postgres",
                "PGKEEP_SPOOL_DIR": f"{work}/spool", "PGKEEP_LISTEN": f"127.0.0.1:{self.http}",
                "PGKEEP_BACKUP_INTERVAL_HOURS": "0", "PGKEEP_VERIFY_INTERVAL_HOURS": "0", **env}
        self.log = open(f"{work}/daemon.log", "a")
        self.proc = subprocess.Popen(as_pg([binary, "daemon"], full), cwd="/", stderr=self.log)
        self.url = f"http://127.0.0.1:{self.http}/status"
        for _ in range(300):
            try:
                if self.status(timeout=1)["timeline"]:
                    return
            except Exception:
                pass
            if self.proc.poll() is not None:
                raise SystemExit(f"the daemon exited; see {work}/daemon.log")
            time.sleep(0.1)
        raise SystemExit(f"the daemon did not start streaming; see {work}/daemon.log")

    def status(self, timeout=5):
        return json.load(urllib.request.urlopen(self.url, timeout=timeout))

    def durable(self):
        return lsn(self.status()["durable_lsn"])

    def catch_up(self, cluster, limit=300):
        """Waits until everything the server has written is durable (a backlog left by a stop)."""
        target = lsn(cluster.sql("select pg_current_wal_lsn()"))
        end = time.monotonic() + limit
        while self.durable() < target:
            if time.monotonic() > end:
                raise SystemExit("the daemon did not catch up with the server")
            time.sleep(0.1)

    def signal(self, sig):
        # The daemon runs as postgres under runuser: signal the daemon itself, not runuser (which
        # would kill it two seconds later, in the middle of its drain).
        pids = subprocess.run(["pgrep", "-f", f"{self.binary} daemon"], capture_output=True, text=True).stdout.split()
        for pid in pids:
            try:
                with open(f"/proc/{pid}/comm") as f:
                    if f.read().strip() == "pgkeep":
                        os.kill(int(pid), sig)
            except OSError:
                pass

    def stop(self):
        # SIGTERM drains until Postgres ends the stream (its shutdown), up to a minute while the
        # server runs on; a bench that goes on with the server wants the daemon gone now. What
        # it stored stays, and the next daemon resumes from there (Postgres keeps the slot).
        self.signal(signal.SIGKILL)
        self.proc.wait()
