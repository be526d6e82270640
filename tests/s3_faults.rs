//! S3 that misbehaves, through a fault-injecting proxy (tests/common/s3_faults.rs) in front of the
//! real S3 server: 503/500/429 answers, a 500 after the request was done, connections closed
//! without an answer, stalls past the request timeout, bodies cut short. pgkeep runs with few
//! retries and a short request timeout, so the faults reach its own retry paths.
//! - the daemon streams under pgbench with 20% of requests faulty: the slot never passes the
//!   durable position, failed uploads are counted, and once the faults stop every stored segment
//!   is byte-equal to Postgres' own;
//! - `archive-push` with 30% faulty requests never reports success for a segment that is not
//!   stored as Postgres wrote it;
//! - `wal-fetch` with 30% faulty requests never exits 1 (which ends recovery) for a stored segment,
//!   and hands over only correct bytes;
//! - `pgkeep backup` with 20% faulty requests either completes and restores every row, or fails
//!   and lists nothing.

mod common;

use std::time::Duration;

use common::s3_faults::FaultProxy;
use common::*;

/// Few retries and a short timeout: faults reach pgkeep's own handling.
const TIGHT: [(&str, &str); 3] = [
    ("PGKEEP_STORAGE_MAX_RETRIES", "1"),
    ("PGKEEP_STORAGE_REQUEST_TIMEOUT_SECS", "2"),
    ("PGKEEP_STORAGE_RETRY_TIMEOUT_SECS", "10"),
];

fn tight() -> Vec<(String, String)> {
    TIGHT
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The S3 storage of a test, and a proxy in front of it; `storage.env` goes through the proxy,
/// `direct` does not.
fn faulty_storage(dir: &TestDir, seed: u64) -> (Storage, FaultProxy, Vec<(String, String)>) {
    let mut storage = Storage::new(Backend::S3, dir);
    let upstream = storage.s3.as_ref().unwrap().port;
    let proxy = FaultProxy::start(upstream, seed, Duration::from_secs(4));
    let direct = storage.env.clone();
    storage.env = proxy.env(&direct);
    (storage, proxy, direct)
}

/// A primary (1 MiB segments, WAL kept for the slot) streamed by a daemon whose S3 requests go
/// through the fault proxy, with the tight retry settings, partials and status every second, and
/// `extra`; pgbench's tables initialized (scale 1).
struct Streamed {
    dir: TestDir,
    storage: Storage,
    proxy: FaultProxy,
    direct: Vec<(String, String)>,
    bin: std::path::PathBuf,
    pg: PgCluster,
    daemon: Daemon,
}

fn streamed_primary(name: &str, seed: u64, extra: &[(&str, &str)]) -> Streamed {
    let dir = TestDir::new(name);
    let (storage, proxy, direct) = faulty_storage(&dir, seed);
    let bin = dir.install_pgkeep();
    let mut pg = PgCluster::init(dir.path(), "primary", 1, &storage.env);
    pg.set(&[("wal_keep_size", "'2GB'"), ("max_wal_size", "'2GB'")]);
    pg.start();
    let mut settings: Vec<(&str, &str)> = TIGHT.to_vec();
    settings.extend([
        ("PGKEEP_PARTIAL_UPLOAD_SECS", "1"),
        ("PGKEEP_STATUS_INTERVAL_SECS", "1"),
    ]);
    settings.extend(extra);
    let daemon = Daemon::start(&dir, &storage, &bin, &pg, &settings);
    run_ok(&mut pg.pgbench(&["-i", "-s", "1", "-q"]));
    Streamed {
        dir,
        storage,
        proxy,
        direct,
        bin,
        pg,
        daemon,
    }
}

/// The pid of the walsender serving the daemon ("" when none, "a,b" when several).
fn walsender(pg: &PgCluster) -> String {
    pg.psql("select coalesce(string_agg(pid::text, ','), '') from pg_stat_replication where application_name = 'pgkeep'")
}

#[test]
fn streaming_under_faults_loses_nothing() {
    let Streamed {
        dir: _dir,
        storage,
        proxy,
        direct,
        bin,
        mut pg,
        daemon,
    } = streamed_primary(
        "s3-faults-stream",
        0x5eed_0001,
        // No retry inside the client: each fault on an upload is a failed upload the daemon
        // counts and recovers from (with one, two faults in a row were needed, and a CI run saw
        // all eight faults absorbed).
        &[("PGKEEP_STORAGE_MAX_RETRIES", "0")],
    );
    let sender = wait_for("the stream to start", Duration::from_secs(30), || {
        Some(walsender(&pg)).filter(|s| !s.is_empty())
    });
    proxy.set_rate(200);
    let mut load = pg.pgbench(&["-c", "2", "-T", "10", "-n"]).spawn().unwrap();
    let mut samples = 0;
    while load.try_wait().unwrap().is_none() {
        let restart = pg.psql(
            "select coalesce(restart_lsn::text, '0/0') from pg_replication_slots where slot_name = 'pgkeep'",
        );
        let durable = daemon.durable();
        assert!(
            parse_lsn(&restart) <= durable,
            "slot restart_lsn {restart} passed the durable position {durable:X}"
        );
        samples += 1;
        std::thread::sleep(Duration::from_millis(250));
    }
    assert!(load.wait().unwrap().success());
    assert!(samples >= 10);
    let injected = proxy.injected_total();
    let (code, metrics) = http("GET", daemon.port, "/metrics");
    assert_eq!(code, 200);
    let metrics = String::from_utf8(metrics).unwrap();
    let errors: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("pgkeep_upload_errors_total "))
        .unwrap()
        .parse()
        .unwrap();
    eprintln!(
        "{} requests, {injected} faults injected, {errors} failed uploads counted",
        proxy.requests.load(std::sync::atomic::Ordering::Relaxed)
    );
    assert!(injected >= 3, "only {injected} faults injected");
    assert!(errors >= 1.0, "no failed upload counted:\n{metrics}");

    // The faults stop: everything catches up, byte for byte.
    proxy.set_rate(0);
    pg.psql("select pg_switch_wal()");
    let end = parse_lsn(&pg.psql("select pg_current_wal_lsn()"));
    wait_for("the stream to catch up", Duration::from_secs(120), || {
        (daemon.durable() >= end).then_some(())
    });
    // Read past the proxy.
    let compared = assert_stored_segments_equal(&storage, &direct, &bin, &pg);
    assert!(compared >= 8, "only {compared} segments compared");
    // The faults were met on the same replication connection: uploads are retried beside it.
    assert_eq!(
        walsender(&pg),
        sender,
        "the replication connection was replaced"
    );
    let status: serde_json::Value = serde_json::from_str(&daemon.status()).unwrap();
    assert_eq!(status["reconnects"], 0, "{status}");
    drop(daemon);
    pg.stop("fast");
}

#[test]
fn archive_push_wal_fetch_and_backup_under_faults() {
    let dir = TestDir::new("s3-faults-cmds");
    let (storage, proxy, direct) = faulty_storage(&dir, 0x5eed_0002);
    let bin = dir.install_pgkeep();
    // Postgres archives through the proxy with tight settings: a failed archive-push is retried
    // by Postgres itself.
    let mut pg = archiving_cluster(&dir, &storage, &bin, "primary", 1);
    pg.start();
    pg.psql("create table t as select generate_series(1, 20000) g");
    pg.switch_and_wait_archived();

    // archive-push by hand, 30% faulty: success only for what is stored, as Postgres wrote it.
    proxy.set_rate(300);
    let (mut pushed, mut failed) = (0, 0);
    let mut tight_env = storage.env.clone();
    tight_env.extend(tight());
    for round in 0..12 {
        pg.psql(&format!(
            "insert into t select generate_series(1, 3000) -- {round}"
        ));
        let seg = pg.psql("select pg_walfile_name(pg_current_wal_lsn())");
        pg.psql("select pg_switch_wal()");
        // A copy of the finished segment, pushed under another name than Postgres' archiver would
        // race with: a fresh cluster-less key is not possible, so push Postgres' own file.
        let path = pg.data.join("pg_wal").join(&seg);
        let out = as_postgres(&bin, &tight_env)
            .arg("--config")
            .arg(&storage.config)
            .args(["archive-push", path.to_str().unwrap()])
            .current_dir(&pg.data)
            .output()
            .unwrap();
        if out.status.success() {
            pushed += 1;
            // Reported stored: it is, byte for byte (read past the proxy).
            let fetched = dir.path().join("pushed");
            let back = as_postgres(&bin, &direct)
                .arg("--config")
                .arg(&storage.config)
                .args(["wal-fetch", &seg, fetched.to_str().unwrap()])
                .current_dir("/")
                .output()
                .unwrap();
            assert!(
                back.status.success(),
                "{seg} reported archived but: {}",
                stderr(&back)
            );
            assert!(std::fs::read(&fetched).unwrap() == std::fs::read(&path).unwrap());
        } else {
            failed += 1;
        }
    }
    eprintln!("archive-push under faults: {pushed} reported stored, {failed} failed");
    assert!(pushed >= 1, "no push got through");

    // wal-fetch, 30% faulty: never 1 for a stored segment, never wrong bytes.
    pg.switch_and_wait_archived();
    proxy.set_rate(0);
    let stored: Vec<String> = stored_keys(&storage)
        .into_iter()
        .filter(|k| k.contains("/wal/") && k.len() - k.rfind('/').unwrap() == 25)
        .map(|k| k.rsplit('/').next().unwrap().to_string())
        .collect();
    proxy.set_rate(300);
    let before = proxy.injected_total();
    let fetched = dir.path().join("fetched");
    let mut fetches = 0;
    for name in stored.iter().rev().take(8) {
        let out = as_postgres(&bin, &tight_env)
            .arg("--config")
            .arg(&storage.config)
            .args(["wal-fetch", name, fetched.to_str().unwrap()])
            .current_dir("/")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(0), "{name}: {}", stderr(&out));
        let ours = pg.data.join("pg_wal").join(name);
        if ours.exists() {
            assert!(std::fs::read(&fetched).unwrap() == std::fs::read(&ours).unwrap());
        }
        fetches += 1;
    }
    assert!(fetches >= 4);
    assert!(proxy.injected_total() > before, "no fault met wal-fetch");

    // A base backup, 20% faulty: it completes and restores, or fails and is not listed.
    proxy.set_rate(200);
    let expected = pg.table_checksum("t");
    let mut env = pg.client_env();
    env.extend(tight());
    let mut completed = None;
    for _ in 0..4 {
        let out = storage.pgkeep_pg(&bin, &["backup"], &env);
        let listed = {
            let out = as_postgres(&bin, &direct)
                .arg("--config")
                .arg(&storage.config)
                .args(["list", "--json"])
                .current_dir("/")
                .output()
                .unwrap();
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            v["backups"].as_array().unwrap().len()
        };
        if out.status.success() {
            completed = Some(String::from_utf8_lossy(&out.stdout).trim().to_string());
            assert_eq!(listed, 1);
            break;
        }
        eprintln!("backup under faults failed (as it may): {}", stderr(&out));
        assert_eq!(listed, 0, "a failed backup is listed");
    }
    let id = completed.expect("no backup completed in 4 tries under 20% faults");
    proxy.set_rate(0);
    pg.switch_and_wait_archived();
    pg.stop("fast");
    let target = dir.mkdir("restored");
    let out = as_postgres(&bin, &direct)
        .arg("--config")
        .arg(&storage.config)
        .args([
            "restore",
            "--backup",
            &id,
            "--target-dir",
            target.to_str().unwrap(),
        ])
        .current_dir("/")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let mut restored = PgCluster::adopt(dir.path(), target, &direct);
    restored.set(&[("archive_mode", "off")]);
    restored.start();
    restored.wait_promoted();
    assert_eq!(restored.table_checksum("t"), expected);
    eprintln!(
        "faults injected: {} of {} requests (stalls {}, short bodies {}, 500 after forwarding {})",
        proxy.injected_total(),
        proxy.requests.load(std::sync::atomic::Ordering::Relaxed),
        proxy.injected_of(common::s3_faults::Fault::Stall),
        proxy.injected_of(common::s3_faults::Fault::ShortBody),
        proxy.injected_of(common::s3_faults::Fault::InternalAfterForward),
    );
}

/// Storage unreachable for a minute (`PGKEEPTEST_OUTAGE_SECS`, default 60) while WAL keeps
/// coming: the replication connection stays (same walsender, no reconnect), the spool fills to
/// `spool_max_mb` and receiving pauses (Postgres keeps the WAL in the slot, which never passes the
/// durable position), a base backup started meanwhile fails loudly and is not listed; once storage
/// is back the queue uploads several segments at once and everything stored equals Postgres' own.
#[test]
fn a_storage_outage_pauses_receiving_keeps_the_connection_and_loses_nothing() {
    let outage = Duration::from_secs(
        std::env::var("PGKEEPTEST_OUTAGE_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(60),
    );
    let Streamed {
        dir: _dir,
        storage,
        proxy,
        direct,
        bin,
        mut pg,
        daemon,
    } = streamed_primary(
        "s3-outage",
        0x5eed_0003,
        // Three of the harness' 1 MiB segments.
        &[("PGKEEP_SPOOL_MAX_MB", "3"), ("PGKEEP_WAL_UPLOADS", "4")],
    );
    pg.psql("select pg_switch_wal()");
    let end = parse_lsn(&pg.psql("select pg_current_wal_lsn()"));
    wait_for("the stream to start", Duration::from_secs(60), || {
        (daemon.durable() >= end).then_some(())
    });
    let sender = walsender(&pg);
    assert!(!sender.is_empty() && !sender.contains(','), "{sender}");
    let status = |key: &str| -> u64 {
        let v: serde_json::Value = serde_json::from_str(&daemon.status()).unwrap();
        v[key].as_u64().unwrap_or_else(|| panic!("{key} in {v}"))
    };

    proxy.set_down(true);
    let down_at = std::time::Instant::now();
    let durable_before = daemon.durable();
    // A backup during the outage.
    let mut env = pg.client_env();
    env.extend(tight());
    let backup = {
        let (bin, storage_env, config) = (bin.clone(), storage.env.clone(), storage.config.clone());
        std::thread::spawn(move || {
            let mut all = storage_env;
            all.extend(env);
            as_postgres(&bin, &all)
                .arg("--config")
                .arg(&config)
                .arg("backup")
                .current_dir("/")
                .output()
                .unwrap()
        })
    };
    // About 100 MB of WAL: more than the spool may hold.
    run_ok(&mut pg.pgbench(&["-i", "-s", "6", "-q"]));
    wait_for("receiving to pause", Duration::from_secs(60), || {
        (status("spooled_segments") >= 3).then_some(())
    });
    let out = backup.join().unwrap();
    assert!(
        !out.status.success(),
        "a backup succeeded with storage down: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    eprintln!("backup during the outage: {}", stderr(&out));
    while down_at.elapsed() < outage {
        let restart = pg.psql(
            "select coalesce(restart_lsn::text, '0/0') from pg_replication_slots where slot_name = 'pgkeep'",
        );
        let durable = daemon.durable();
        assert!(
            parse_lsn(&restart) <= durable,
            "slot {restart} passed {durable:X}"
        );
        assert_eq!(durable, durable_before, "durable moved with storage down");
        assert!(
            status("spooled_segments") <= 3,
            "the spool grew past its limit"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let (code, metrics) = http("GET", daemon.port, "/metrics");
    assert_eq!(code, 200);
    let metrics = String::from_utf8(metrics).unwrap();
    let metric = |name: &str| -> f64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no {name}:\n{metrics}"))
    };
    assert!(metric("pgkeep_wal_backpressure_events_total") >= 1.0);
    assert_eq!(metric("pgkeep_wal_spooled_segments"), 3.0);
    assert!(metric("pgkeep_wal_pending_seconds") >= outage.as_secs_f64() / 2.0);
    assert_eq!(metric("pgkeep_stream_failing"), 1.0);
    assert!(
        daemon.log().contains("the spool is full"),
        "{}",
        daemon.log()
    );

    // Storage is back: the queue drains, several uploads at once, on the same connection.
    proxy.set_down(false);
    pg.psql("select pg_switch_wal()");
    let end = parse_lsn(&pg.psql("select pg_current_wal_lsn()"));
    let caught_up = std::time::Instant::now();
    wait_for("the stream to catch up", Duration::from_secs(120), || {
        (daemon.durable() >= end).then_some(())
    });
    eprintln!(
        "outage {:?}: caught up {:?} after storage returned, at most {} uploads at once",
        outage,
        caught_up.elapsed(),
        status("uploads_in_flight_max")
    );
    assert!(status("uploads_in_flight_max") >= 2);
    assert_eq!(
        walsender(&pg),
        sender,
        "the replication connection was replaced"
    );
    assert_eq!(status("reconnects"), 0);
    let compared = assert_stored_segments_equal(&storage, &direct, &bin, &pg);
    assert!(compared >= 6, "only {compared} segments compared");
    let listed = as_postgres(&bin, &direct)
        .arg("--config")
        .arg(&storage.config)
        .args(["list", "--json"])
        .current_dir("/")
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    assert_eq!(v["backups"].as_array().unwrap().len(), 0, "{v}");
    drop(daemon);
    pg.stop("fast");
}

/// On S3 an upload is verified by the store, not by reading it back (#17): the signed payload
/// carries the body's SHA-256 and the server refuses a body that does not match it. With every PUT
/// body damaged in transit, `archive-push` fails loudly and storage holds nothing under the name;
/// once the damage stops, the same push stores Postgres' own bytes.
#[test]
fn a_body_damaged_in_transit_is_refused_and_never_stored() {
    let dir = TestDir::new("s3-damaged-put");
    let (storage, proxy, direct) = faulty_storage(&dir, 0x5eed_0004);
    let bin = dir.install_pgkeep();
    let mut pg = PgCluster::init(dir.path(), "primary", 1, &storage.env);
    pg.set(&[("wal_keep_size", "'1GB'")]);
    pg.start();
    let push = |seg: &str, env: &[(String, String)]| {
        let path = pg.data.join("pg_wal").join(seg);
        as_postgres(&bin, env)
            .arg("--config")
            .arg(&storage.config)
            .args(["archive-push", path.to_str().unwrap()])
            .current_dir(&pg.data)
            .output()
            .unwrap()
    };
    let switch = || {
        pg.psql(
            "create table if not exists t (g int); insert into t select generate_series(1, 5000)",
        );
        pg.psql("select pg_walfile_name(pg_switch_wal())")
    };
    let mut env = storage.env.clone();
    env.extend(tight());
    // The cluster's marker is stored first, undamaged, so that the damage meets a segment.
    let first = switch();
    let out = push(&first, &env);
    assert!(out.status.success(), "{}", stderr(&out));

    let seg = switch();
    proxy.set_corrupt_puts(true);
    let out = push(&seg, &env);
    proxy.set_corrupt_puts(false);
    assert!(proxy.corrupted.load(std::sync::atomic::Ordering::Relaxed) >= 1);
    assert!(
        !out.status.success(),
        "a damaged upload was reported archived: {}",
        stderr(&out)
    );
    assert!(
        stderr(&out).contains(&seg),
        "the error names the segment: {}",
        stderr(&out)
    );
    assert!(
        !stored_keys(&storage).iter().any(|k| k.ends_with(&seg)),
        "the damaged upload left an object: {:?}",
        stored_keys(&storage)
    );

    let out = push(&seg, &env);
    assert!(out.status.success(), "{}", stderr(&out));
    let fetched = dir.path().join("fetched");
    let back = as_postgres(&bin, &direct)
        .arg("--config")
        .arg(&storage.config)
        .args(["wal-fetch", &seg, fetched.to_str().unwrap()])
        .current_dir("/")
        .output()
        .unwrap();
    assert!(back.status.success(), "{}", stderr(&back));
    assert!(
        std::fs::read(&fetched).unwrap()
            == std::fs::read(pg.data.join("pg_wal").join(&seg)).unwrap(),
        "the stored segment differs from Postgres' own"
    );
}
