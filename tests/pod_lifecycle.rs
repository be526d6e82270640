//! The Helm chart (deploy/helm/pgkeep): it lints, renders and validates offline for every values
//! file, and the pod it describes lives its life on this machine (tests/chart/podsim.py runs the
//! rendered containers' own commands, arguments and environment in mount namespaces shaped like the
//! pod), against the S3 server and against the default file:// storage, as a primary and as a
//! standby replica, with the pre-upgrade backup Job.
//!
//! Needs root (mount namespaces) and the chart tools: `scripts/install-deps.sh helm`.
mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::*;

/// The Python environment with helm-python-sdk, kubernetes-validate and PyYAML.
fn python() -> PathBuf {
    let p = std::env::var_os("PGKEEPTEST_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/pyenv/bin/python"));
    assert!(
        p.is_file(),
        "{} is missing: run scripts/install-deps.sh helm (scripts/test.sh does)",
        p.display()
    );
    p
}

fn podsim(args: &[&str], env: &[(String, String)]) -> Output {
    Command::new(python())
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/chart/podsim.py"))
        .args(args)
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .output()
        .expect("run podsim.py")
}

/// The findings podsim prints as its last line, after checking it succeeded.
fn findings(out: &Output) -> serde_json::Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "podsim failed ({}):\n{stdout}\n{}",
        out.status,
        stderr(out)
    );
    let last = stdout.lines().last().expect("podsim printed nothing");
    serde_json::from_str(last).unwrap_or_else(|e| panic!("{e}: {last}"))
}

fn simulate(scenario: &str, backend: Backend, extra: &[&str]) -> (serde_json::Value, TestDir) {
    let dir = TestDir::new(&format!("pod-{scenario}"));
    let bin = dir.install_pgkeep();
    let mut env = vec![];
    let s3 = (backend == Backend::S3).then(|| S3Server::start(dir.path()));
    if let Some(s3) = &s3 {
        env = s3.env();
        env.push(("PGKEEP_SIM_BUCKET".into(), s3.bucket.clone()));
        env.push(("PGKEEP_SIM_S3_DIR".into(), s3.dir.display().to_string()));
    }
    let work = dir.mkdir("sim");
    let storage = if backend == Backend::S3 { "s3" } else { "file" };
    let mut args = vec![
        "simulate",
        "--scenario",
        scenario,
        "--storage",
        storage,
        "--pgkeep",
        bin.to_str().unwrap(),
        "--workdir",
        work.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let out = podsim(&args, &env);
    let f = findings(&out);
    if let Some(s3) = &s3 {
        // Backups of the cluster are in the bucket, under the chart's prefix.
        let backups = std::fs::read_dir(s3.dir.join(&s3.bucket).join("db/clusters"))
            .unwrap()
            .map(|c| c.unwrap().path().join("basebackups"))
            .filter(|p| p.is_dir())
            .flat_map(|p| std::fs::read_dir(p).unwrap())
            .count();
        // The daemon's first backup, and the pre-upgrade Job's in the primary's upgrade.
        let want = if scenario == "primary" { 2 } else { 1 };
        assert!(
            backups >= want,
            "expected {want} backups in S3, found {backups}"
        );
    }
    (f, dir)
}

fn assert_clean_stop(stop: &serde_json::Value) {
    for c in ["postgres-preStop", "postgres", "pgkeep"] {
        assert_eq!(stop[c]["exit"], 0, "{c} in {stop}");
    }
}

fn assert_primary(f: &serde_json::Value) {
    // file:// storage needs no storage credentials, so no hook copy of them.
    let hooks = if f["storage"] == "file" {
        serde_json::json!(["ConfigMap/db-pgkeep-backup-hook", "Job/db-pgkeep-backup"])
    } else {
        serde_json::json!([
            "ConfigMap/db-pgkeep-backup-hook",
            "Secret/db-pgkeep-backup-hook",
            "Job/db-pgkeep-backup"
        ])
    };
    assert_eq!(
        f["pre_upgrade_hooks"], hooks,
        "the hook's config and credentials come before the Job"
    );
    assert!(f["hook_backup"].as_str().is_some_and(|id| !id.is_empty()));
    // The default hook took a mark; a change of major failed the hook, saying why; the
    // rollback to the mark holds every table as it was then, without the migration's column.
    // pre-upgrade-r<revision>-<render time>-<release>
    let mark = f["hook_mark"].as_str().unwrap_or_default();
    assert!(
        mark.starts_with("pre-upgrade-r1-") && mark.ends_with("-db") && mark.len() == 31,
        "{f}"
    );
    assert_ne!(f["major_change"]["exit"], 0, "{f}");
    assert!(
        f["major_change"]["says"]
            .as_str()
            .unwrap()
            .contains("physical backups cannot cross majors"),
        "{f}"
    );
    assert_eq!(f["rollback_rows"], 100, "{f}");
    assert_eq!(f["rollback_migrated_column"], "0", "{f}");
    assert_eq!(
        f["set_aside_kept"], true,
        "the pre-rollback data directory is kept: {f}"
    );
    assert_clean_stop(&f["stop_pod3"]);
    // Started again with the same values: no second rollback, the row written after it stays.
    assert_eq!(
        f["rollback_again"],
        serde_json::json!({"done_already": true, "left_alone": true, "row_after_rollback": "1"}),
        "{f}"
    );
    assert_clean_stop(&f["stop_pod3b"]);
    assert_eq!(
        f["pgkeep_role"], "pgkeep:super=false:replication=true",
        "{f}"
    );
    assert_eq!(f["walsender_users"], "pgkeep", "{f}");
    assert_eq!(f["rows"], 160, "every committed row came back");
    // Replay fetched WAL through the new pod's daemon (before Postgres is consistent, too).
    assert!(
        f["wal_fetched"]["daemon"].as_u64().unwrap() > 0,
        "{}",
        f["wal_fetched"]
    );
    assert_eq!(f["tables_equal"].as_array().unwrap().len(), 4);
    // Recovered past the end of the archive and promoted.
    assert_eq!(f["timeline"], "2");
    assert_clean_stop(&f["stop_pod1"]);
    assert_clean_stop(&f["stop_pod2"]);
}

#[test]
fn chart_lints_renders_and_validates_for_every_values_file() {
    let f = findings(&podsim(&["check"], &[]));
    assert_eq!(f["images"]["13"], "postgres:13-bookworm", "{f}");
    assert_eq!(f["images"]["18"], "postgres:18-bookworm", "{f}");
    // Digest pins, the tag beside them for humans.
    let d = format!("sha256:{}", "ab".repeat(32));
    assert_eq!(
        f["images"]["pinned"],
        serde_json::json!([
            format!("ghcr.io/pgkeep/pgkeep:0.1.0@{d}"),
            format!("postgres:15-bookworm@{d}")
        ]),
        "{f}"
    );
    assert!(
        f["images"]["bad_digest"]
            .as_str()
            .unwrap()
            .contains("image.digest \"latest\": expected sha256:"),
        "{f}"
    );
    assert!(
        f["major_12"]
            .as_str()
            .is_some_and(|e| e.contains("supports Postgres 13 to 18")),
        "{f}"
    );
    // Encryption: the identity only where backups are read; the recipients everywhere pgkeep runs.
    let enc = &f["encryption"];
    assert_eq!(
        enc["identity_in"],
        serde_json::json!(["StatefulSet/postgres", "StatefulSet/restore"]),
        "{f}"
    );
    for c in [
        "StatefulSet/pgkeep",
        "StatefulSet/restore",
        "StatefulSet/postgres",
        "Job/backup",
    ] {
        assert!(
            enc["recipients_in"]
                .as_array()
                .unwrap()
                .iter()
                .any(|x| x == c),
            "{c}: {f}"
        );
    }
    assert!(
        enc["without_identity"]
            .as_str()
            .is_some_and(|e| e.contains("identitySecret is not")),
        "{f}"
    );
    assert!(
        enc["secret_as_recipient"]
            .as_str()
            .is_some_and(|e| e.contains("age public key")),
        "{f}"
    );
    // TLS for Postgres: the key in the Postgres container only, the CA alone in the Job, which
    // connects with verify-full; a new cluster refuses outside connections without TLS.
    let tls = &f["tls"]["on"];
    assert_eq!(
        tls["key_in"],
        serde_json::json!(["StatefulSet/postgres"]),
        "{f}"
    );
    assert_eq!(tls["ca_in"], serde_json::json!(["Job/backup"]), "{f}");
    assert_eq!(
        tls["ssl_args"],
        serde_json::json!([
            "ssl=on",
            "ssl_cert_file=/etc/postgres-tls/tls.crt",
            "ssl_key_file=/etc/postgres-tls/tls.key"
        ]),
        "{f}"
    );
    assert_eq!(tls["hba_type"], "hostssl", "{f}");
    assert!(
        tls["job_pg"]
            .as_str()
            .unwrap()
            .ends_with(" sslmode=verify-full sslrootcert=/etc/postgres-tls/ca.crt"),
        "{f}"
    );
    let off = &f["tls"]["off"];
    assert_eq!(off["ssl_args"], serde_json::json!([]), "{f}");
    assert_eq!(off["hba_type"], "host", "{f}");
    assert!(!off["job_pg"].as_str().unwrap().contains("ssl"), "{f}");
    // Postgres 17+ keeps WAL summaries for incremental backups; 15 has no such setting.
    let sums = &f["summaries"];
    assert_eq!(sums["15"], serde_json::json!([]), "{f}");
    for major in ["17", "18"] {
        assert_eq!(sums[major], serde_json::json!(["summarize_wal=on"]), "{f}");
    }
    // Synchronous mode sets both sides; a standby list of the user's own is kept.
    let sync = &f["synchronous"];
    assert_eq!(sync["off"]["args"], serde_json::json!([]), "{f}");
    assert_eq!(sync["off"]["toml"], serde_json::json!([]), "{f}");
    assert_eq!(
        sync["on"]["args"],
        serde_json::json!(["synchronous_standby_names=pgkeep"]),
        "{f}"
    );
    assert_eq!(
        sync["on"]["toml"],
        serde_json::json!(["synchronous = true"]),
        "{f}"
    );
    assert_eq!(
        sync["own"]["args"],
        serde_json::json!(["synchronous_standby_names=ANY 1 (pgkeep, standby1)"]),
        "{f}"
    );
    assert!(
        sync["config_refused"]
            .as_str()
            .is_some_and(|e| e.contains("daemon.synchronous")),
        "{f}"
    );
    // The monitoring pack: off by default; when enabled, the rules pass promtool, the dashboard
    // is there and the PodMonitor scrapes the daemon's port.
    let mon = &f["monitoring"];
    assert_eq!(mon["off_by_default"], true, "{f}");
    assert_eq!(mon["rules_check"], "ok", "{f}");
    assert!(mon["alerts"].as_array().unwrap().len() >= 8, "{f}");
    assert!(mon["dashboard_panels"].as_u64().unwrap() >= 10, "{f}");
    assert_eq!(mon["pod_monitor_ports"], serde_json::json!(["http"]), "{f}");
    // Least privilege: no API token in any pod; ingress only to Postgres unless metrics are opened.
    assert_eq!(
        enc["service_account_tokens"],
        serde_json::json!(["Job=false", "StatefulSet=false"]),
        "{f}"
    );
    assert_eq!(
        enc["network_policy_ports"],
        serde_json::json!(["postgres"]),
        "{f}"
    );
    // Credentials: files, each container only its own; the pgkeep role, not the superuser.
    let cred = &f["credentials"];
    let reads = |set: &str, c: &str| -> Vec<String> {
        cred[set]["containers"][c]["reads"]
            .as_array()
            .unwrap_or_else(|| panic!("{set} {c}: {cred}"))
            .iter()
            .map(|k| k.as_str().unwrap().to_string())
            .collect()
    };
    for set in ["file", "s3", "s3_readonly", "standby"] {
        assert_eq!(
            cred[set]["env_secrets"],
            serde_json::json!([]),
            "{set}: {cred}"
        );
        assert_eq!(cred[set]["token_mounted"], serde_json::json!([]), "{set}");
        assert_eq!(
            cred[set]["network_policy"],
            serde_json::json!(["db-pgkeep"]),
            "{set}"
        );
        assert!(
            cred[set]["config_pg"]
                .as_str()
                .unwrap()
                .contains("user=pgkeep "),
            "{set}: {cred}"
        );
        // Nothing but the Postgres container (initdb) reads the superuser's password, and the
        // Postgres container never holds the write credentials.
        for (c, v) in cred[set]["containers"].as_object().unwrap() {
            let keys = reads(set, c);
            if c != "StatefulSet/postgres" {
                assert!(
                    !keys.iter().any(|k| k.ends_with(":postgres-password")),
                    "{set} {c}: {keys:?}"
                );
            } else {
                assert!(
                    !keys
                        .iter()
                        .any(|k| k.ends_with("-storage:*") || k.ends_with("-backup-hook:*")),
                    "{set}: the Postgres container reads the write credentials: {keys:?}"
                );
            }
            if c.starts_with("Job/") {
                assert!(
                    v["pg"].as_str().unwrap().contains("user=pgkeep "),
                    "{set}: {v}"
                );
            }
        }
    }
    assert_eq!(
        reads("s3", "StatefulSet/pgkeep"),
        ["db-pgkeep-storage:*", "db-pgkeep:pgkeep-password"],
        "{cred}"
    );
    // Cloud storage without read-only keys: the Postgres container reads WAL only through the
    // daemon; with them, it reads storage with those.
    assert_eq!(
        cred["s3"]["containers"]["StatefulSet/postgres"]["wal_fetch_storage"],
        "false"
    );
    assert!(
        reads("s3_readonly", "StatefulSet/postgres")
            .contains(&"db-pgkeep-storage-readonly:*".to_string())
    );
    assert_eq!(
        reads("s3_readonly", "StatefulSet/restore"),
        ["db-pgkeep-storage-readonly:*"]
    );
    assert_eq!(
        cred["s3_readonly"]["containers"]["StatefulSet/postgres"]["wal_fetch_storage"],
        "true"
    );
    // The standby example: read-only keys everywhere, the primary's passwords.
    for c in [
        "StatefulSet/pgkeep",
        "StatefulSet/restore",
        "StatefulSet/postgres",
    ] {
        let keys = reads("standby", c);
        assert!(
            keys.contains(&"db-pgkeep-storage-readonly:*".to_string()),
            "{c}: {keys:?}"
        );
        assert!(
            !keys.iter().any(|k| k.starts_with("db-pgkeep-storage:")),
            "{c}: {keys:?}"
        );
    }
    // The file:// archive volume: written by the sidecar and the backup Job only.
    for (c, rw) in [
        ("StatefulSet/pgkeep", true),
        ("Job/backup", true),
        ("StatefulSet/postgres", false),
        ("StatefulSet/restore", false),
    ] {
        assert_eq!(cred["file"]["containers"][c]["archive_rw"], rw, "{c}");
    }
    let hba = cred["file"]["hba"].to_string();
    assert!(
        hba.contains("host all $BACKUP_ROLE all reject")
            && hba.contains("$hba replication $BACKUP_ROLE all scram-sha-256"),
        "{hba}"
    );
    assert!(
        cred["stranger_refused"]
            .as_str()
            .unwrap()
            .contains("\"HOME\" is not a storage credential"),
        "{cred}"
    );
    let rendered = f["rendered"].as_object().unwrap();
    let mut files: Vec<String> =
        std::fs::read_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/helm/examples"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".yaml"))
            .collect();
    files.push("default".into());
    for name in &files {
        let kinds = rendered[name.as_str()]
            .as_array()
            .unwrap_or_else(|| panic!("{name} not rendered"));
        assert!(
            kinds.iter().any(|k| k == "StatefulSet/db-pgkeep"),
            "{name}: {kinds:?}"
        );
    }
    // The standby release takes no backups of its own, so it has no backup hook.
    assert!(
        rendered["default"]
            .as_array()
            .unwrap()
            .iter()
            .any(|k| k == "Job/db-pgkeep-backup")
    );
    assert!(
        !rendered["values-standby.yaml"]
            .as_array()
            .unwrap()
            .iter()
            .any(|k| k == "Job/db-pgkeep-backup")
    );
}

#[test]
fn pod_lifecycle_primary_on_s3() {
    let (f, _dir) = simulate("primary", Backend::S3, &[]);
    assert_primary(&f);
}

/// With the daemon as an ordinary container (daemon.nativeSidecar=false) it gets SIGTERM while the
/// preStop hook still waits for it: it must keep answering and drain.
#[test]
fn pod_lifecycle_primary_on_the_default_file_storage_with_an_ordinary_sidecar() {
    let (f, _dir) = simulate("primary", Backend::File, &["--ordinary-sidecar"]);
    assert_primary(&f);
}

#[test]
fn pod_lifecycle_standby_replica_follows_the_primary_on_s3() {
    let (f, _dir) = simulate("standby", Backend::S3, &[]);
    assert_eq!(f["standby_rows"], 50);
    // The standby's daemon serves the primary's cluster and uploads nothing of its own.
    let (standby, primary) = (&f["standby_daemon_status"], &f["primary_daemon_status"]);
    assert_eq!(standby["system_identifier"], primary["system_identifier"]);
    assert_eq!(standby["segments_uploaded"], 0, "{standby}");
    assert_eq!(standby["partial_uploads"], 0, "{standby}");
    assert!(
        primary["segments_uploaded"].as_u64().unwrap() > 0,
        "{primary}"
    );
    assert_clean_stop(&f["stop_standby"]);
    assert_clean_stop(&f["stop_primary"]);
}

/// Moving a database into a new release (values-move.yaml): the new release's first pod seeds its
/// storage from the old release's archive and restores; a standby release of the new one follows
/// it; the rows are equal on both, and the old archive is byte for byte what it was.
#[test]
fn pod_lifecycle_move_into_a_new_release_with_a_standby_on_s3() {
    let (f, _dir) = simulate("move", Backend::S3, &[]);
    eprintln!("findings: {f}");
    assert_eq!(f["source_unchanged"], true, "{f}");
    assert!(f["source_objects"].as_u64().unwrap() > 0, "{f}");
    // 40 rows before the move, 10 after it, 10 while the standby follows.
    assert_eq!(f["primary_rows"], 60, "{f}");
    assert_eq!(f["standby_rows"], 60, "{f}");
    assert_eq!(f["standby_tables_equal"], true, "{f}");
    assert!(f["seeded"]["objects"].as_u64().unwrap() > 0, "{f}");
    assert_eq!(f["new_timeline"], "2", "{f}");
    for stop in ["stop_old", "stop_new", "stop_standby"] {
        assert_clean_stop(&f[stop]);
    }
}

/// The simulation is only worth something if it fails when the chart and the binary disagree.
#[test]
fn pod_simulation_fails_when_the_chart_and_the_binary_disagree() {
    let chart = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/helm/pgkeep");
    for (file, from, to, expect) in [
        // A flag the binary does not know.
        (
            "templates/statefulset.yaml",
            "--pgkeep-path=",
            "--pgkeep-binary=",
            "--pgkeep-binary",
        ),
        // An environment variable the binary does not read.
        (
            "templates/_helpers.tpl",
            "name: PGKEEP_CONFIG,",
            "name: PGKEEP_CONFIG_FILE,",
            "PGKEEP_CONFIG_FILE",
        ),
    ] {
        let dir = TestDir::new("pod-mutant");
        let bin = dir.install_pgkeep();
        let copy = dir.path().join("chart");
        run_ok(Command::new("cp").arg("-r").arg(&chart).arg(&copy));
        let path = copy.join(file);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains(from), "{file} no longer holds {from:?}");
        std::fs::write(&path, text.replace(from, to)).unwrap();
        let work = dir.mkdir("sim");
        let out = podsim(
            &[
                "simulate",
                "--scenario",
                "primary",
                "--storage",
                "file",
                "--pgkeep",
                bin.to_str().unwrap(),
                "--workdir",
                work.to_str().unwrap(),
                "--chart",
                copy.to_str().unwrap(),
            ],
            &[],
        );
        assert!(!out.status.success(), "the simulation passed with {to:?}");
        let err = stderr(&out);
        assert!(
            err.contains(expect),
            "the failure should name {expect:?}:\n{err}"
        );
    }
}

/// No Docker engine runs here, so the image is checked against what the chart assumes of it: the
/// binary where the chart's commands and copy step expect it, the user the chart runs as, a build
/// pinned by the lock file, and the same Rust the project builds with.
#[test]
fn the_dockerfile_gives_the_chart_what_it_expects() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let docker = std::fs::read_to_string(root.join("docker/Dockerfile")).unwrap();
    let values = std::fs::read_to_string(root.join("deploy/helm/pgkeep/values.yaml")).unwrap();
    let sts = std::fs::read_to_string(root.join("deploy/helm/pgkeep/templates/statefulset.yaml"))
        .unwrap();
    let stages: Vec<&str> = docker.split("\nFROM ").collect();
    assert_eq!(
        stages.len(),
        3,
        "comments, a build stage and a runtime stage"
    );
    let runtime = stages[2];
    assert!(
        runtime.contains("COPY --from=build /src/target/release/pgkeep /usr/local/bin/pgkeep"),
        "the runtime image has pgkeep at /usr/local/bin/pgkeep"
    );
    assert!(sts.contains(r#"["cp", "/usr/local/bin/pgkeep", "/pgkeep/bin/pgkeep"]"#));
    let uid = values
        .lines()
        .find_map(|l| l.trim().strip_prefix("runAsUser: "))
        .expect("securityContext.runAsUser in values.yaml");
    assert!(runtime.contains(&format!("USER {uid}:{uid}")), "USER {uid}");
    assert!(docker.contains("cargo build --release --locked --bin pgkeep"));
    let rustc = String::from_utf8(
        Command::new("rustc")
            .arg("--version")
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    let version: Vec<&str> = rustc
        .split_whitespace()
        .nth(1)
        .unwrap()
        .split('.')
        .collect();
    assert!(
        docker.contains(&format!(
            "ARG BUILD_IMAGE=rust:{}.{}-slim-bookworm\n",
            version[0], version[1]
        )) && docker.contains("FROM ${BUILD_IMAGE} AS build"),
        "the build stage uses this machine's Rust ({rustc})"
    );
    // Nothing copied into the build that the build does not need; no secrets baked in.
    assert!(!docker.contains("ENV PGKEEP_") && !docker.contains("AWS_"));
}
