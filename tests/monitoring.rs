//! The daemon's scheduled checks and the monitoring pack: with `verify_interval_hours` and a
//! `drill_dir`, the daemon verifies storage and runs a restore drill once it holds a backup, and
//! `/status` and `/metrics` report the results (no problem, the recoverable window, the drill
//! passed); a restarted daemon keeps the results and the schedule instead of checking again at
//! once. Every metric the alert rules and the Grafana dashboard name is one the daemon exposes.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use common::*;

/// The names of the samples in a Prometheus text exposition.
fn exposed(metrics: &str) -> BTreeSet<String> {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| l.split([' ', '{']).next().unwrap().to_string())
        .collect()
}

/// Every `pgkeep_…` metric name in a text (PromQL in the rules and the dashboard).
fn named(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("pgkeep_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
            .unwrap_or(tail.len());
        // Not a part of a longer word (a label value such as job="pgkeep" has no underscore).
        let before = rest[..i].chars().last();
        if !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            out.insert(tail[..end].to_string());
        }
        rest = &tail[end..];
    }
    out
}

fn metric(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .unwrap_or_else(|| panic!("no {name} in:\n{metrics}"))
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn scheduled_checks_and_the_monitoring_pack() {
    let dir = TestDir::new("monitoring");
    let storage = Storage::new(Backend::File, &dir);
    let bin = dir.install_pgkeep();
    let mut pg = PgCluster::init(dir.path(), "primary", 1, &storage.env);
    pg.start();
    pg.psql("create table t as select generate_series(1, 10000) g");
    let drills = dir.mkdir("drills");
    let spool = dir.mkdir("spool");
    let bin_dir = server_bin_dir(default_major()).display().to_string();
    let settings = [
        ("PGKEEP_BACKUP_INTERVAL_HOURS", "24"),
        ("PGKEEP_VERIFY_INTERVAL_HOURS", "24"),
        ("PGKEEP_DRILL_DIR", &format!("{}/copy", drills.display())),
        ("PGKEEP_DRILL_INTERVAL_HOURS", "24"),
        ("PGKEEP_PG_BIN_DIR", &bin_dir),
        ("PGKEEP_SPOOL_DIR", &spool.display().to_string()),
        ("PGKEEP_PARTIAL_UPLOAD_SECS", "1"),
    ];
    let mut daemon = Daemon::start(&dir, &storage, &bin, &pg, &settings);

    // The first backup (storage held none), then the verify and the drill.
    let status = wait_for(
        "the scheduled verify and drill",
        Duration::from_secs(180),
        || {
            let s: serde_json::Value = serde_json::from_str(&daemon.status()).unwrap();
            (s["checks"]["drill"]["ok"] != serde_json::Value::Null).then_some(s)
        },
    );
    let checks = &status["checks"];
    assert_eq!(
        checks["verify"]["problems"],
        0,
        "{status}\n{}",
        daemon.log()
    );
    assert!(
        checks["verify"]["last_success_unix"].as_u64().unwrap() > 0,
        "{status}"
    );
    assert_eq!(checks["verify"]["restorable_backups"], 1, "{status}");
    let window = &checks["verify"]["window"];
    assert!(
        parse_lsn(window["to_lsn"].as_str().unwrap())
            >= parse_lsn(window["from_lsn"].as_str().unwrap()),
        "{status}"
    );
    assert_eq!(checks["drill"]["ok"], true, "{status}\n{}", daemon.log());
    assert!(
        checks["drill"]["seconds"].as_f64().unwrap() > 0.0,
        "{status}"
    );
    assert!(
        std::fs::read_dir(&drills).unwrap().next().is_none(),
        "the drill left files behind"
    );

    let (code, body) = http("GET", daemon.port, "/metrics");
    assert_eq!(code, 200);
    let metrics = String::from_utf8(body).unwrap();
    assert_eq!(metric(&metrics, "pgkeep_verify_problems"), 0.0);
    assert_eq!(metric(&metrics, "pgkeep_verify_restorable_backups"), 1.0);
    assert_eq!(metric(&metrics, "pgkeep_drill_last_ok"), 1.0);
    assert!(metric(&metrics, "pgkeep_drill_duration_seconds") > 0.0);
    assert!(metric(&metrics, "pgkeep_verify_last_success_timestamp_seconds") > 1.7e9);
    assert!(metric(&metrics, "pgkeep_recoverable_window_end_lsn_bytes") > 0.0);
    assert!(metric(&metrics, "pgkeep_newest_backup_timestamp_seconds") > 1.7e9);

    // Every metric the rules and the dashboard name is exposed.
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/helm/pgkeep/files");
    let rules = std::fs::read_to_string(root.join("prometheus-rules.yaml")).unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("grafana-dashboard.json")).unwrap(),
    )
    .unwrap();
    let mut exprs = String::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for t in panel["targets"].as_array().unwrap() {
            exprs.push_str(t["expr"].as_str().unwrap());
            exprs.push('\n');
        }
    }
    exprs.push_str(dashboard["templating"].to_string().as_str());
    let have = exposed(&metrics);
    for (what, text) in [("the alert rules", &rules), ("the dashboard", &exprs)] {
        let names = named(text);
        assert!(names.len() >= 10, "{what} name only {names:?}");
        let unknown: Vec<&String> = names.iter().filter(|n| !have.contains(*n)).collect();
        assert!(
            unknown.is_empty(),
            "{what} name metrics the daemon does not expose: {unknown:?}\nexposed: {have:?}"
        );
    }
    // The check can fail: a name the daemon does not expose is caught.
    let bogus = named("rate(pgkeep_wal_uploaded_segments_total[5m]) > 0");
    assert!(bogus.iter().any(|n| !have.contains(n)), "{bogus:?}");

    // A restart keeps the results and the schedule: no second verify at once.
    let before = checks["verify"]["last_run_unix"].as_u64().unwrap();
    // (The daemon drains until Postgres ends the stream, as in a pod stopping.)
    daemon.signal("TERM");
    pg.stop("fast");
    assert!(
        daemon.wait(Duration::from_secs(60)).success(),
        "{}",
        daemon.log()
    );
    pg.start();
    let daemon = Daemon::start(&dir, &storage, &bin, &pg, &settings);
    std::thread::sleep(Duration::from_secs(3));
    let s: serde_json::Value = serde_json::from_str(&daemon.status()).unwrap();
    assert_eq!(s["checks"]["verify"]["last_run_unix"], before, "{s}");
    assert_eq!(s["checks"]["drill"]["ok"], true, "{s}");
    assert!(
        !daemon.log().contains("scheduled verify starting"),
        "{}",
        daemon.log()
    );
    drop(daemon);
    pg.stop("fast");
}
