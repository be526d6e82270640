//! The sidecar's hard days, on both storage backends:
//! - kill -9 of the daemon under load, and a restart: no gap, every segment equal to Postgres' own;
//! - the preStop hook (`pgkeep wal-switch`) returns once the switched WAL is in storage;
//! - kill -9 of Postgres: what was committed more than the partial-upload interval before is in the
//!   `.partial` in storage, and a restore from storage alone recovers it;
//! - a restored standby: the daemon streams nothing while it is in recovery, follows it onto
//!   timeline 2 once promoted (storing 00000002.history), and a later restore to latest lands on
//!   timeline 2 with every row.

mod common;

use std::time::Duration;

use common::*;

fn count(pg: &PgCluster, table: &str) -> String {
    pg.psql(&format!("select count(*) from {table}"))
}

fn lifecycle(backend: Backend) {
    let dir = TestDir::new("lifecycle");
    let storage = Storage::new(backend, &dir);
    let bin = dir.install_pgkeep();
    let fast = [
        ("PGKEEP_STATUS_INTERVAL_SECS", "1"),
        ("PGKEEP_PARTIAL_UPLOAD_SECS", "1"),
    ];
    let mut pg = PgCluster::init(dir.path(), "primary", 1, &storage.env);
    pg.set(&[("wal_keep_size", "'2GB'"), ("max_wal_size", "'2GB'")]);
    pg.start();
    let daemon = Daemon::start(&dir, &storage, &bin, &pg, &fast);
    run_ok(&mut pg.pgbench(&["-i", "-s", "2", "-q"]));
    let out = storage.pgkeep_pg(&bin, &["backup"], &pg.client_env());
    assert!(out.status.success(), "backup: {}", stderr(&out));

    // kill -9 the daemon under load, then start it again.
    let mut load = pg.pgbench(&["-c", "2", "-T", "5", "-n"]).spawn().unwrap();
    std::thread::sleep(Duration::from_secs(2));
    daemon.signal("KILL");
    drop(daemon);
    std::thread::sleep(Duration::from_millis(500));
    let daemon = Daemon::start(&dir, &storage, &bin, &pg, &fast);
    assert!(load.wait().unwrap().success());

    // The preStop hook: once it returns, the switched segment is in storage as a whole segment.
    daemon.wal_switch(&storage, &bin, &pg);
    let current = pg.psql("select pg_walfile_name(pg_current_wal_lsn())");
    let last_done = format!(
        "{}{:08X}",
        &current[..16],
        u32::from_str_radix(&current[16..], 16).unwrap() - 1
    );

    // No gap: every segment from the first streamed to the switched one is in storage, equal to pg_wal.
    let names: Vec<String> = stored_keys(&storage)
        .iter()
        .filter_map(|k| {
            k.rsplit('/')
                .next()
                .filter(|n| n.len() == 24)
                .map(str::to_string)
        })
        .collect();
    assert!(names.contains(&last_done), "{last_done} not in {names:?}");
    let first = u32::from_str_radix(&names[0][16..], 16).unwrap();
    let last = u32::from_str_radix(&last_done[16..], 16).unwrap();
    let fetched = dir.path().join("fetched");
    for seg in first..=last {
        let name = format!("{}{seg:08X}", &names[0][..16]);
        let out = storage.pgkeep(&bin, &["wal-fetch", &name, fetched.to_str().unwrap()]);
        assert!(out.status.success(), "gap at {name}: {}", stderr(&out));
        assert!(
            std::fs::read(&fetched).unwrap()
                == std::fs::read(pg.data.join("pg_wal").join(&name)).unwrap(),
            "{name} differs"
        );
    }

    // kill -9 Postgres: rows committed well before it are in the .partial.
    pg.psql("create table before_kill as select generate_series(1, 1234) g");
    let expected = pg.table_checksum("pgbench_accounts");
    std::thread::sleep(Duration::from_millis(3500));
    pg.kill9();
    daemon.signal("TERM");
    drop(daemon);
    std::fs::remove_dir_all(&pg.data).unwrap();

    // From storage alone, as a standby first: the daemon must not stream while it is in recovery.
    let target = dir.mkdir("restored");
    let out = storage.pgkeep_pg(
        &bin,
        &[
            "restore",
            "--standby",
            "--target-dir",
            target.to_str().unwrap(),
        ],
        &[],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let mut restored = PgCluster::adopt(dir.path(), target, &storage.env);
    restored.start();
    wait_for(
        "the standby to replay the archive",
        Duration::from_secs(60),
        || {
            let out = restored.try_psql("select count(*) from before_kill");
            (out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "1234")
                .then_some(())
        },
    );
    assert_eq!(restored.table_checksum("pgbench_accounts"), expected);
    let before: Vec<String> = stored_keys(&storage);
    let daemon = Daemon::start(&dir, &storage, &bin, &restored, &fast);
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        stored_keys(&storage),
        before,
        "the daemon wrote to storage while Postgres was in recovery"
    );

    // Promotion: timeline 2, followed by the daemon.
    restored.psql("select pg_promote()");
    restored.wait_promoted();
    restored.psql("create table on_timeline_2 as select generate_series(1, 4321) g");
    daemon.wal_switch(&storage, &bin, &restored);
    let keys = stored_keys(&storage);
    assert!(
        keys.iter()
            .any(|k| k.ends_with("/wal/00000002/00000002.history")),
        "{keys:?}"
    );
    assert!(
        keys.iter()
            .any(|k| k.contains("/wal/00000002/00000002") && k.len() > 30),
        "{keys:?}"
    );
    let expected_tl2 = restored.table_checksum("on_timeline_2");
    daemon.signal("TERM");
    restored.stop("fast");
    drop(daemon);

    // A later restore to latest follows timeline 2 and holds every row.
    let again = dir.mkdir("again");
    let out = storage.pgkeep_pg(
        &bin,
        &["restore", "--target-dir", again.to_str().unwrap()],
        &[],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let latest = start_restored(&dir, &storage, again);
    assert_eq!(
        latest.table_checksum("on_timeline_2"),
        expected_tl2,
        "{}",
        latest.log()
    );
    assert_eq!(count(&latest, "before_kill"), "1234");
    assert!(
        latest
            .log()
            .contains("restored log file \"00000002.history\" from archive"),
        "{}",
        latest.log()
    );
}

#[test]
fn file_storage_daemon_lifecycle() {
    lifecycle(Backend::File);
}

#[test]
fn s3_storage_daemon_lifecycle() {
    lifecycle(Backend::S3);
}

/// wal-switch without a daemon: fails after its timeout and says so.
#[test]
fn wal_switch_without_a_daemon_times_out() {
    let dir = TestDir::new("walswitch");
    let storage = Storage::new(Backend::File, &dir);
    let bin = dir.install_pgkeep();
    let mut pg = PgCluster::init(dir.path(), "pg", 1, &[]);
    pg.start();
    let mut env = pg.client_env();
    env.push(("PGKEEP_LISTEN".into(), format!("127.0.0.1:{}", free_port())));
    let started = std::time::Instant::now();
    let out = storage.pgkeep_pg(&bin, &["wal-switch", "--timeout", "2"], &env);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("did not reach storage within 2s"),
        "{}",
        stderr(&out)
    );
    assert!(started.elapsed() < Duration::from_secs(20));
}

/// Recovery served by the daemon: restore_command (pgkeep wal-fetch) asks the daemon, which
/// prefetches the following segments; all rows arrive and the prefetch shows in /metrics. The same
/// recovery straight from storage is timed beside it.
fn served_recovery(backend: Backend) {
    let dir = TestDir::new("served");
    let storage = Storage::new(backend, &dir);
    let bin = dir.install_pgkeep();
    // The directory the daemon and restore_command share (#17): prefetched segments are taken
    // from it without a request.
    let shared = dir.path().join("handoff");
    let fast = [
        ("PGKEEP_STATUS_INTERVAL_SECS", "1"),
        ("PGKEEP_PARTIAL_UPLOAD_SECS", "1"),
        ("PGKEEP_PREFETCH_DIR", shared.to_str().unwrap()),
    ];
    // archive_command pushes into the same storage as the daemon streams: identical content is
    // accepted from either, and neither ever fails.
    let mut pg = archiving_cluster(&dir, &storage, &bin, "primary", 1);
    pg.start();
    let daemon = Daemon::start(&dir, &storage, &bin, &pg, &fast);
    run_ok(&mut pg.pgbench(&["-i", "-s", "1", "-q"]));
    let out = storage.pgkeep_pg(&bin, &["backup"], &pg.client_env());
    assert!(out.status.success(), "backup: {}", stderr(&out));
    run_ok(&mut pg.pgbench(&["-c", "2", "-t", "3000", "-n"]));
    let expected = pg.table_checksum("pgbench_accounts");
    let mut env = storage.env.clone();
    env.extend(pg.client_env());
    env.push(("PGKEEP_LISTEN".into(), format!("127.0.0.1:{}", daemon.port)));
    let out = storage.pgkeep_pg(&bin, &["wal-switch"], &env);
    assert!(out.status.success(), "wal-switch: {}", stderr(&out));
    pg.switch_and_wait_archived();
    assert_eq!(
        pg.psql("select failed_count from pg_stat_archiver"),
        "0",
        "{}",
        pg.log()
    );
    // Which writer comes second is a race; whichever it was accepted the other's identical copy.
    assert!(
        pg.log().contains("already archived with identical content")
            || daemon.log().contains("archive_command was first"),
        "the two writers never met"
    );
    pg.stop("fast");

    let mut timings = vec![];
    for (label, port) in [
        ("via the daemon", daemon.port),
        ("straight from storage", free_port()),
    ] {
        let target = dir.mkdir(&format!("restored-{port}"));
        let handoff = if port == daemon.port {
            shared.clone()
        } else {
            // (Its parent does not exist: no prefetch of wal-fetch's own either.)
            dir.path().join("absent").join("no-handoff")
        };
        let listen = [
            ("PGKEEP_LISTEN".to_string(), format!("127.0.0.1:{port}")),
            (
                "PGKEEP_PREFETCH_DIR".to_string(),
                handoff.display().to_string(),
            ),
        ];
        let out = storage.pgkeep_pg(
            &bin,
            &["restore", "--target-dir", target.to_str().unwrap()],
            &listen,
        );
        assert!(out.status.success(), "{}", stderr(&out));
        let mut c = PgCluster::adopt(dir.path(), target, &storage.env);
        c.set(&[("archive_mode", "off")]);
        let started = std::time::Instant::now();
        c.start();
        c.wait_promoted();
        let took = started.elapsed();
        assert_eq!(c.table_checksum("pgbench_accounts"), expected, "{label}");
        let replayed = c.log().matches("restored log file").count();
        let handed = c.log().matches("via=\"handoff\"").count();
        if port == daemon.port {
            assert!(handed >= 5, "{handed} segments handed off: {}", c.log());
        } else {
            assert_eq!(handed, 0, "{label}");
        }
        timings.push(format!(
            "{label}: {replayed} files ({handed} handed off) in {:.2}s",
            took.as_secs_f64()
        ));
        c.stop("fast");
    }
    eprintln!("recovery replay: {}", timings.join("; "));
    let metrics = String::from_utf8(http("GET", daemon.port, "/metrics").1).unwrap();
    let value = |name: &str| -> f64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name} missing: {metrics}"))
    };
    assert!(
        value("pgkeep_wal_served_total") + value("pgkeep_wal_handed_off_total") >= 10.0,
        "{metrics}"
    );
    assert!(value("pgkeep_wal_handed_off_total") >= 5.0, "{metrics}");
}

#[test]
fn file_storage_served_recovery() {
    served_recovery(Backend::File);
}

#[test]
fn s3_storage_served_recovery() {
    served_recovery(Backend::S3);
}

/// The schedule: with no backup in storage the daemon takes one at start; POST /backups takes
/// another; /backups lists them and /metrics reports the last one.
fn scheduled_backups(backend: Backend) {
    let dir = TestDir::new("schedule");
    let storage = Storage::new(backend, &dir);
    let bin = dir.install_pgkeep();
    let mut pg = PgCluster::init(dir.path(), "primary", 1, &storage.env);
    pg.start();
    pg.psql("create table t as select generate_series(1, 10000) g");
    let daemon = Daemon::start(
        &dir,
        &storage,
        &bin,
        &pg,
        &[
            ("PGKEEP_BACKUP_INTERVAL_HOURS", "24"),
            ("PGKEEP_PARTIAL_UPLOAD_SECS", "1"),
        ],
    );
    // Until the first object is stored, /backups answers 502 (storage holds no archive yet).
    let listed = || daemon.backups();
    daemon.wait_backups(1);
    // The POST routes act on the database: without the daemon's token they are refused, with a
    // message naming the file that holds it; with it, the backup is taken.
    for bad in [None, Some("Bearer 00"), Some("Basic cG9zdGdyZXM6eA==")] {
        let headers: Vec<(&str, &str)> = bad.iter().map(|b| ("authorization", *b)).collect();
        let (code, body) = http_with("POST", daemon.port, "/backups", &headers);
        let body = String::from_utf8_lossy(&body);
        assert_eq!(code, 401, "{bad:?}: {body}");
        assert!(body.contains(&daemon.token.display().to_string()), "{body}");
        let (code, _) = http_with("POST", daemon.port, "/wal-switch", &headers);
        assert_eq!(code, 401, "{bad:?}");
    }
    let (code, body) = http_with(
        "POST",
        daemon.port,
        "/backups",
        &[("authorization", &daemon.bearer())],
    );
    assert_eq!(code, 201, "{}", String::from_utf8_lossy(&body));
    let id: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(listed()["backups"][0]["id"], id["id"]);
    assert_eq!(listed()["backups"].as_array().unwrap().len(), 2);
    let metrics = String::from_utf8(http("GET", daemon.port, "/metrics").1).unwrap();
    let since: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("pgkeep_seconds_since_last_backup "))
        .unwrap()
        .parse()
        .unwrap();
    assert!((0.0..60.0).contains(&since), "{metrics}");
    pg.stop("fast");
}

#[test]
fn file_storage_scheduled_backups() {
    scheduled_backups(Backend::File);
}

#[test]
fn s3_storage_scheduled_backups() {
    scheduled_backups(Backend::S3);
}

/// SIGTERM while a scheduled backup runs: the daemon drains it within `shutdown_timeout_secs`.
/// With time enough the backup completes and is listed; past the deadline it is cancelled, says
/// so, and nothing of it is listed. Either way the daemon exits within the timeout. The backup is
/// made slow on purpose (zstd level 19, one upload at a time).
fn sigterm_during_a_scheduled_backup(shutdown_secs: u64, completes: bool) {
    let dir = TestDir::new("sigterm-backup");
    let storage = Storage::new(Backend::File, &dir);
    let bin = dir.install_pgkeep();
    let mut pg = PgCluster::init(dir.path(), "primary", 1, &storage.env);
    // No autovacuum: its WAL (full pages of the new table) would make the stream, compressed as
    // slowly as the backup, the slow part.
    pg.set(&[("autovacuum", "off")]);
    pg.start();
    // Slow enough to be running at SIGTERM; for the drain, small enough to finish well within the
    // timeout on a loaded machine (300000 rows took over 60 s beside the version matrix).
    let rows = if completes { 120_000 } else { 300_000 };
    pg.psql(&format!(
        "create table t as select g, md5(g::text) m from generate_series(1, {rows}) g"
    ));
    pg.psql("checkpoint");
    let secs = shutdown_secs.to_string();
    let mut daemon = Daemon::start(
        &dir,
        &storage,
        &bin,
        &pg,
        &[
            ("PGKEEP_BACKUP_INTERVAL_HOURS", "24"),
            ("PGKEEP_PARTIAL_UPLOAD_SECS", "1"),
            ("PGKEEP_COMPRESSION", "zstd"),
            ("PGKEEP_COMPRESSION_LEVEL", "19"),
            ("PGKEEP_PARALLELISM", "1"),
            ("PGKEEP_BACKUP_CHUNK_SIZE_MB", "1"),
            ("PGKEEP_SHUTDOWN_TIMEOUT_SECS", &secs),
        ],
    );
    wait_for(
        "the scheduled backup to start",
        Duration::from_secs(60),
        || daemon.log().contains("starting base backup").then_some(()),
    );
    let listed = || -> usize {
        let out = storage.pgkeep_pg(&bin, &["list", "--json"], &[]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        v["backups"].as_array().map_or(0, Vec::len)
    };
    assert_eq!(
        listed(),
        0,
        "the backup finished before SIGTERM: make it slower"
    );
    let signalled = std::time::Instant::now();
    daemon.signal("TERM");
    if completes {
        wait_for(
            "the drained backup to be listed",
            Duration::from_secs(shutdown_secs),
            || (listed() == 1).then_some(()),
        );
        // Postgres' own shutdown ends the stream: the daemon then leaves at once.
        pg.stop("fast");
    }
    let status = daemon.wait(Duration::from_secs(shutdown_secs + 15));
    let took = signalled.elapsed();
    let log = daemon.log();
    assert!(
        took < Duration::from_secs(shutdown_secs + 5),
        "the daemon took {took:?} to exit (shutdown_timeout_secs = {shutdown_secs}):\n{log}"
    );
    if completes {
        assert!(status.success(), "{log}");
        assert!(log.contains("base backup complete"), "{log}");
    } else {
        assert!(!status.success(), "{log}");
        assert!(log.contains("cancelled"), "{log}");
        assert_eq!(listed(), 0, "a cancelled backup is listed:\n{log}");
        // What it had written is gone too.
        let leftovers: Vec<String> = stored_keys(&storage)
            .into_iter()
            .filter(|k| k.contains("basebackups"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
        pg.stop("fast");
    }
}

#[test]
fn sigterm_during_a_scheduled_backup_drains_it() {
    sigterm_during_a_scheduled_backup(60, true);
}

#[test]
fn sigterm_during_a_scheduled_backup_past_the_deadline_cancels_it() {
    sigterm_during_a_scheduled_backup(6, false);
}

/// SIGTERM while the daemon waits between reconnects, with Postgres up again as a primary and
/// WAL the daemon has not streamed: it streams that WAL before it leaves, so the preStop hook's
/// `wal-switch`, run at the same moment (the daemon as an ordinary container gets SIGTERM at once)
/// succeeds. The daemon used to leave at once, and the hook waited for a closed port.
#[test]
fn sigterm_between_reconnects_still_streams_the_pending_wal() {
    let dir = TestDir::new("sigterm-reconnect");
    let storage = Storage::new(Backend::File, &dir);
    let bin = dir.install_pgkeep();
    let mut pg = PgCluster::init(dir.path(), "primary", 1, &storage.env);
    pg.start();
    let mut daemon = Daemon::start(
        &dir,
        &storage,
        &bin,
        &pg,
        &[("PGKEEP_PARTIAL_UPLOAD_SECS", "1")],
    );
    wait_for("streaming", Duration::from_secs(30), || {
        daemon
            .log()
            .contains("starting WAL streaming")
            .then_some(())
    });
    pg.stop("fast");
    // Postgres is gone: the reconnects back off until the daemon sleeps 8 s between them.
    wait_for("the backoff to grow", Duration::from_secs(60), || {
        daemon.log().contains("reconnecting in 8.0s").then_some(())
    });
    pg.start();
    pg.psql("create table after_restart as select g from generate_series(1, 1000) g");
    std::thread::scope(|s| {
        let hook = s.spawn(|| daemon.wal_switch(&storage, &bin, &pg));
        std::thread::sleep(Duration::from_millis(200));
        daemon.signal("TERM");
        hook.join().expect("the wal-switch hook");
    });
    let switched = pg.psql("select pg_walfile_name(pg_current_wal_lsn() - 1)");
    pg.stop("fast");
    let status = daemon.wait(Duration::from_secs(30));
    let log = daemon.log();
    assert!(status.success(), "{log}");
    assert!(
        log.contains("stopping: draining WAL until the server ends the stream"),
        "{log}"
    );
    // The segment the hook switched away from is in storage, as Postgres wrote it.
    assert!(
        stored_keys(&storage)
            .iter()
            .any(|k| k.contains("/wal/") && k.contains(&switched)),
        "{switched} is not in storage:\n{log}"
    );
    assert_stored_segments_equal(&storage, &storage.env, &bin, &pg);
}
