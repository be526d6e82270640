//! The sidecar on both storage backends: WAL streamed through the slot (no archive_command) is
//! byte-equal to Postgres' own segments, the slot never releases WAL that is not in storage, the
//! HTTP API validates names and speaks Prometheus, and SIGTERM drains: after the daemon and then
//! Postgres stop, a restore from storage alone holds every committed row.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use common::*;

fn streaming(backend: Backend) {
    let dir = TestDir::new("daemon");
    let storage = Storage::new(backend, &dir);
    let bin = dir.install_pgkeep();
    let mut pg = PgCluster::init(dir.path(), "primary", 1, &storage.env);
    // Keep every segment in pg_wal for the comparison; no archive_command: streaming alone.
    pg.set(&[("wal_keep_size", "'2GB'"), ("max_wal_size", "'2GB'")]);
    pg.start();
    let mut daemon = Daemon::start(
        &dir,
        &storage,
        &bin,
        &pg,
        &[
            ("PGKEEP_STATUS_INTERVAL_SECS", "1"),
            ("PGKEEP_PARTIAL_UPLOAD_SECS", "1"),
            ("PGKEEP_LOG_FORMAT", "json"),
        ],
    );

    // Under pgbench, sample the slot: its restart_lsn never passes what the daemon has in storage.
    run_ok(&mut pg.pgbench(&["-i", "-s", "2", "-q"]));
    let mut load = pg.pgbench(&["-c", "2", "-T", "6", "-n"]).spawn().unwrap();
    let mut samples = 0;
    while load.try_wait().unwrap().is_none() {
        let restart = pg.psql("select coalesce(restart_lsn::text, '0/0') from pg_replication_slots where slot_name = 'pgkeep'");
        let durable = daemon.durable();
        assert!(
            parse_lsn(&restart) <= durable,
            "slot restart_lsn {restart} passed the durable position {durable:X}"
        );
        samples += 1;
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(samples >= 10, "only {samples} samples");
    assert!(load.wait().unwrap().success());

    // Backups work with WAL that only streaming delivers.
    let out = storage.pgkeep_pg(&bin, &["backup"], &pg.client_env());
    assert!(out.status.success(), "backup: {}", stderr(&out));

    // Every completed segment in storage equals Postgres' own.
    // Some WAL first: right after the backup's own switch, pg_switch_wal() would switch nothing
    // and name an empty segment (seen on 17 and 18).
    pg.psql("select pg_logical_emit_message(false, 'pgkeep-test', 'switch')");
    let last = pg.psql("select pg_walfile_name(pg_switch_wal())");
    let end = parse_lsn(&pg.psql("select pg_current_wal_lsn()"));
    wait_for(
        "the switched segment to be durable",
        Duration::from_secs(60),
        || (daemon.durable() >= end).then_some(()),
    );
    let compared = assert_stored_segments_equal(&storage, &storage.env, &bin, &pg);
    assert!(
        compared >= 10,
        "only {compared} segments streamed (last {last})"
    );

    // HTTP: the WAL itself, bad names, unknown names, metrics.
    let (code, body) = http("GET", daemon.port, &format!("/wal/{last}"));
    assert_eq!(code, 200);
    // The stored object as it is (header, compressed content): wal-fetch opens it.
    let (_, content) = pgkeep::storage::object::open(&body, &Default::default()).unwrap();
    assert!(content == std::fs::read(pg.data.join("pg_wal").join(&last)).unwrap());
    assert_eq!(http("HEAD", daemon.port, &format!("/wal/{last}")).0, 200);
    for bad in [
        "/wal/..%2F..%2Fetc%2Fpasswd",
        "/wal/000000010000000000000001%2F..",
        "/wal/RECOVERYXLOG",
        "/wal/0000000100000000000000zz",
    ] {
        assert_eq!(http("GET", daemon.port, bad).0, 400, "{bad}");
    }
    assert_eq!(
        http("GET", daemon.port, "/wal/0000000100000000000000F0").0,
        404
    );
    let (code, metrics) = http("GET", daemon.port, "/metrics");
    assert_eq!(code, 200);
    let metrics = String::from_utf8(metrics).unwrap();
    let mut seen = 0;
    for line in metrics
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (name, value) = line.rsplit_once(' ').expect("name value");
        // A histogram's buckets carry a label: name{le="0.5"}.
        let name = match name.split_once('{') {
            Some((n, labels)) => {
                assert!(
                    labels.starts_with("le=\"") && labels.ends_with("\"}"),
                    "{line}"
                );
                n
            }
            None => name,
        };
        assert!(
            name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'),
            "{line}"
        );
        value.parse::<f64>().unwrap_or_else(|_| panic!("{line}"));
        seen += 1;
    }
    assert!(
        seen >= 8 && metrics.contains("pgkeep_durable_lsn_bytes"),
        "{metrics}"
    );

    // Rows committed after the last switch exist only in the open segment. SIGTERM the daemon, then
    // stop Postgres: the daemon drains until the walsender ends, so Postgres stops promptly.
    // The checksum first: its scan prunes pages pgbench updated, which writes WAL that a later
    // commit flushes. Read after it, the position could stop where Postgres' write of that WAL
    // did (seen: exactly at a segment's end, with the rest still in its buffers).
    let expected = pg.table_checksum("pgbench_accounts");
    pg.psql("create table last_rows as select generate_series(1, 777) g");

    // One definition of how far the archive reaches: once the stream is quiet, `list` (from
    // storage alone, through the streamed partial's length) and `/status` name the same point,
    // and it is past the rows just committed.
    let committed = parse_lsn(&pg.psql("select pg_current_wal_lsn()"));
    let mut seen = vec![];
    wait_for("list and /status to agree", Duration::from_secs(30), || {
        let before = daemon.durable();
        let out = storage.pgkeep(&bin, &["list", "--json"]);
        assert!(out.status.success(), "{}", stderr(&out));
        let inv: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let to = parse_lsn(inv["recoverable_window"]["to_lsn"].as_str().unwrap());
        let after = daemon.durable();
        let status: serde_json::Value = serde_json::from_str(&daemon.status()).unwrap();
        let received = parse_lsn(status["received_lsn"].as_str().unwrap());
        seen.push((before, to, after));
        // Quiet: everything received is durable (the last .partial uploaded), and unchanged.
        (before == after && to == after && received == after && to >= committed).then_some(())
    });
    let (_, to, _) = *seen.last().unwrap();
    assert!(
        to % (1 << 20) != 0,
        "the window should end inside the streamed partial, not at a segment boundary: {seen:X?}"
    );
    daemon.signal("TERM");
    let stop_started = std::time::Instant::now();
    pg.stop("fast");
    assert!(
        stop_started.elapsed() < Duration::from_secs(30),
        "Postgres took {:?} to stop",
        stop_started.elapsed()
    );
    assert!(
        daemon.wait(Duration::from_secs(60)).success(),
        "the daemon failed to drain"
    );
    // JSON logs: one object a line; a streamed segment's event carries its timeline and segment.
    let log = daemon.log();
    let events: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let streamed = events
        .iter()
        .find(|e| e["message"] == "segment streamed to storage")
        .expect("a segment event");
    assert_eq!(streamed["spans"][0]["timeline"], 1, "{streamed}");
    assert!(
        streamed["span"]["wal"]
            .as_str()
            .is_some_and(|w| w.len() == 24),
        "{streamed}"
    );
    std::fs::remove_dir_all(&pg.data).unwrap();

    // The last rows are only in the daemon's upload of its open segment, kept apart from WAL that
    // Postgres archives.
    let keys = stored_keys(&storage);
    assert!(
        keys.iter()
            .any(|k| k.contains("/streaming/00000001/") && k.ends_with(".partial")),
        "{keys:?}"
    );
    assert!(
        !keys
            .iter()
            .any(|k| k.contains("/wal/") && k.ends_with(".partial")),
        "{keys:?}"
    );
    // From storage alone: the base backup, the streamed segments and the final .partial.
    let target = dir.mkdir("restored");
    let handoff = dir.mkdir("handoff");
    std::fs::set_permissions(&handoff, std::fs::Permissions::from_mode(0o700)).unwrap();
    let out = storage.pgkeep_pg(
        &bin,
        &["restore", "--target-dir", target.to_str().unwrap()],
        &[("PGKEEP_PREFETCH_DIR".into(), handoff.display().to_string())],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let mut restored = PgCluster::adopt(dir.path(), target, &storage.env);
    restored.start();
    restored.wait_promoted();
    assert_eq!(
        restored.psql("select count(*) from last_rows"),
        "777",
        "{}",
        restored.log()
    );
    assert_eq!(restored.table_checksum("pgbench_accounts"), expected);
    // Postgres asks for the segment of the final .partial twice as recovery ends (it reads the
    // last record again): the second time from the copy the first wal-fetch kept.
    let log = restored.log();
    assert!(
        log.contains("form=recent") || log.contains("form=\"recent\""),
        "the second request for the streamed .partial did not take the kept copy:\n{log}"
    );
}

#[test]
fn file_storage_streaming() {
    streaming(Backend::File);
}

#[test]
fn s3_storage_streaming() {
    streaming(Backend::S3);
}

/// A trickle of commits with the default settings: each round stores only the new bytes of the
/// open segment, as a piece after its `.partial`. The segment that `wal-fetch` assembles from
/// them (from storage, and through the daemon's `/wal`) is byte-equal to Postgres' own as far as
/// the daemon reported it durable; `verify` and `list` count the pieces; after kill -9 of both
/// and the data directory deleted, a restore holds every commit the pieces carry.
fn trickle_in_pieces(backend: Backend) {
    let dir = TestDir::new("pieces");
    let storage = Storage::new(backend, &dir);
    let bin = dir.install_pgkeep();
    let mut pg = PgCluster::init(dir.path(), "primary", 1, &storage.env);
    pg.start();
    let mut daemon = Daemon::start(
        &dir,
        &storage,
        &bin,
        &pg,
        &[("PGKEEP_STATUS_INTERVAL_SECS", "1")],
    );
    run_ok(&mut pg.pgbench(&["-i", "-s", "1", "-q"]));
    let out = storage.pgkeep_pg(&bin, &["backup"], &pg.client_env());
    assert!(out.status.success(), "backup: {}", stderr(&out));
    let expected = pg.table_checksum("pgbench_accounts");
    pg.psql("create table trickle (i int)");
    // A fresh segment, so that the trickle is all in one open segment.
    pg.psql("select pg_switch_wal()");
    for i in 1..=30 {
        pg.psql(&format!("insert into trickle values ({i})"));
        if i == 15 {
            // A restore point only in the open segment's pieces (no WAL switch after it).
            pg.psql("select pg_create_restore_point('mid-trickle')");
        }
        std::thread::sleep(Duration::from_millis(70));
    }
    let committed = parse_lsn(&pg.psql("select pg_current_wal_lsn()"));
    let open = pg.psql("select pg_walfile_name(pg_current_wal_lsn())");
    let durable = wait_for("the trickle to be durable", Duration::from_secs(30), || {
        let d = daemon.durable();
        (d >= committed).then_some(d)
    });
    let status: serde_json::Value = serde_json::from_str(&daemon.status()).unwrap();
    let pieces = status["partial_pieces"].as_u64().unwrap();
    assert!(pieces >= 5, "only {pieces} pieces: {status}");
    // Pieces stored under the open segment. The daemon folds them into a new `.partial` now and
    // then (a listing right after a fold finds none): one more small commit adds one after it.
    pg.psql("create table nudge (i int)");
    wait_for(
        "a piece stored under the open segment",
        Duration::from_secs(30),
        || {
            let found = stored_keys(&storage)
                .iter()
                .any(|k| k.contains(&format!("/streaming/00000001/{open}.pieces/")));
            if !found {
                pg.psql("insert into nudge values (1)");
                std::thread::sleep(Duration::from_millis(300));
            }
            found.then_some(())
        },
    );
    // Each piece holds little: far less than the segment it continues.
    let status_bytes = status["partial_bytes_uploaded"].as_u64().unwrap();
    let uploads = status["partial_uploads"].as_u64().unwrap();
    assert!(
        status_bytes / uploads < 256 << 10,
        "{status_bytes} bytes in {uploads} uploads"
    );

    // The open segment as wal-fetch assembles it, from storage and through the daemon, equals
    // Postgres' own file up to the durable position.
    let offset = (durable % (1 << 20)) as usize;
    let ours = std::fs::read(pg.data.join("pg_wal").join(&open)).unwrap();
    for (via, listen) in [
        ("storage", format!("127.0.0.1:{}", free_port())),
        ("daemon", format!("127.0.0.1:{}", daemon.port)),
    ] {
        let dest = dir.path().join(format!("fetched-{via}"));
        let out = storage.pgkeep_pg(
            &bin,
            &["wal-fetch", &open, dest.to_str().unwrap()],
            &[
                ("PGKEEP_LISTEN".into(), listen),
                ("PGKEEP_PGDATA".into(), pg.data.display().to_string()),
            ],
        );
        assert!(out.status.success(), "{via}: {}", stderr(&out));
        assert!(
            stderr(&out).contains(&format!("via=\"{via}\""))
                || stderr(&out).contains(&format!("via={via}")),
            "{via}: {}",
            stderr(&out)
        );
        let got = std::fs::read(&dest).unwrap();
        assert_eq!(got.len(), 1 << 20, "{via}");
        assert!(
            got[..offset] == ours[..offset],
            "{via}: differs from Postgres' own"
        );
    }

    // list reaches where the daemon said; verify checks the pieces and finds nothing wrong.
    let out = storage.pgkeep(&bin, &["list", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let inv: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let to = parse_lsn(inv["recoverable_window"]["to_lsn"].as_str().unwrap());
    assert!(to >= committed, "list ends at {to:X}, before {committed:X}");
    let out = storage.pgkeep(&bin, &["verify"]);
    assert!(
        out.status.success(),
        "verify: {}{}",
        stderr(&out),
        String::from_utf8_lossy(&out.stdout)
    );

    // Lost pod: nothing drains, nothing stores the segment whole.
    daemon.signal("KILL");
    pg.kill9();
    let _ = daemon.wait(Duration::from_secs(10));
    std::fs::remove_dir_all(&pg.data).unwrap();
    // `--target-name` finds the restore point in the pieces (not only in whole segments and
    // `.partial` bases) and recovery stops there.
    let target = dir.mkdir("to-point");
    let out = storage.pgkeep_pg(
        &bin,
        &[
            "restore",
            "--target-dir",
            target.to_str().unwrap(),
            "--target-name",
            "mid-trickle",
        ],
        &[],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let to_point = start_restored(&dir, &storage, target);
    assert_eq!(to_point.psql("select count(*) from trickle"), "15");
    drop(to_point);
    let target = dir.mkdir("restored");
    let out = storage.pgkeep_pg(
        &bin,
        &["restore", "--target-dir", target.to_str().unwrap()],
        &[],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let mut restored = PgCluster::adopt(dir.path(), target, &storage.env);
    restored.start();
    restored.wait_promoted();
    assert_eq!(
        restored.psql("select count(*) from trickle"),
        "30",
        "{}",
        restored.log()
    );
    assert_eq!(restored.table_checksum("pgbench_accounts"), expected);
}

#[test]
fn file_storage_trickle_in_pieces() {
    trickle_in_pieces(Backend::File);
}

#[test]
fn s3_storage_trickle_in_pieces() {
    trickle_in_pieces(Backend::S3);
}
