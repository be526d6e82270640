//! Synchronous mode (#15, item 3), on file:// and S3: with `synchronous = true` and Postgres'
//! `synchronous_standby_names = 'pgkeep'`, a COMMIT returns only once its WAL is in storage.
//! - Right after a burst of acknowledged commits, kill -9 Postgres and the daemon and delete the
//!   data directory and the spool: a restore from storage holds every acknowledged commit.
//! - With storage unavailable, a commit waits instead of being acknowledged, and completes once
//!   storage is back.
//! - A restarted daemon, which streams its open segment again from its start, never replaces the
//!   stored `.partial` with fewer bytes: the last acknowledged commits survive a second loss.

mod common;

use std::time::{Duration, Instant};

use common::*;

fn synchronous(backend: Backend) {
    let dir = TestDir::new("sync");
    let mut storage = Storage::new(backend, &dir);
    let bin = dir.install_pgkeep();
    let mut pg = PgCluster::init(dir.path(), "primary", 1, &storage.env);
    pg.set(&[
        ("synchronous_standby_names", "'pgkeep'"),
        ("synchronous_commit", "on"),
    ]);
    pg.start();
    let settings = [
        ("PGKEEP_SYNCHRONOUS", "true"),
        ("PGKEEP_STATUS_INTERVAL_SECS", "1"),
        // Async uploads alone would leave up to an hour of WAL out of storage.
        ("PGKEEP_PARTIAL_UPLOAD_SECS", "3600"),
        ("PGKEEP_STORAGE_MAX_RETRIES", "1"),
        ("PGKEEP_STORAGE_REQUEST_TIMEOUT_SECS", "5"),
    ];
    let mut daemon = Daemon::start(&dir, &storage, &bin, &pg, &settings);
    wait_for(
        "Postgres to take pgkeep as its synchronous standby",
        Duration::from_secs(30),
        || {
            (pg.psql("select coalesce(string_agg(sync_state, ','), '') from pg_stat_replication where application_name = 'pgkeep'") == "sync").then_some(())
        },
    );
    let out = storage.pgkeep_pg(&bin, &["backup"], &pg.client_env());
    assert!(out.status.success(), "backup: {}", stderr(&out));
    pg.psql("create table acked (i int primary key)");

    // A burst: 200 commits, each its own transaction, all acknowledged once psql returns.
    let burst = |from: u32| {
        let script: String = (from..from + 200)
            .map(|i| format!("insert into acked values ({i});\n"))
            .collect();
        let started = Instant::now();
        pg.psql_script(&script);
        started.elapsed()
    };
    let took = burst(0);
    eprintln!("200 synchronous commits took {took:?}");

    // Storage unavailable: a commit waits, and completes once storage is back.
    let blocked = block(&mut storage);
    let (tx, rx) = std::sync::mpsc::channel();
    let port = pg.port;
    std::thread::spawn(move || {
        let out = std::process::Command::new("psql")
            .args([
                "-X",
                "-q",
                "-h",
                "127.0.0.1",
                "-U",
                "postgres",
                "-d",
                "postgres",
            ])
            .args([
                "-p",
                &port.to_string(),
                "-c",
                "insert into acked values (100000)",
            ])
            .output()
            .unwrap();
        let _ = tx.send(out.status.success());
    });
    assert!(
        rx.recv_timeout(Duration::from_secs(4)).is_err(),
        "a commit was acknowledged while storage was unavailable"
    );
    unblock(&mut storage, blocked);
    assert_eq!(
        rx.recv_timeout(Duration::from_secs(90)),
        Ok(true),
        "the waiting commit did not complete once storage was back:\n{}",
        daemon.log()
    );

    // A daemon restarted mid-segment streams it again from its start: its first upload of that
    // segment's partial holds at least what storage held (never fewer bytes: a pod lost right
    // then would lose acknowledged commits). Then the second burst, and the pod is lost.
    let stored_partial = || {
        let key = stored_keys(&storage)
            .into_iter()
            .rfind(|k| k.contains("/streaming/") && k.ends_with(".partial"))
            .expect("a stored partial");
        let bytes = std::fs::read(storage.object_file(&key)).unwrap();
        let header = pgkeep::storage::object::check(&bytes).unwrap();
        (key, header.plain_len)
    };
    let (key, before) = stored_partial();
    let seg = key.rsplit('/').next().unwrap().to_string();
    daemon.signal("KILL");
    daemon.wait(Duration::from_secs(10));
    let mut restarted: Vec<(&str, &str)> = settings.to_vec();
    restarted.extend([
        ("PGKEEP_LOG_FORMAT", "json"),
        ("PGKEEP_LOG_LEVEL", "pgkeep=debug,info"),
    ]);
    let mut daemon = Daemon::start(&dir, &storage, &bin, &pg, &restarted);
    let first = wait_for(
        "the restarted daemon's first upload of the open segment",
        Duration::from_secs(30),
        || {
            daemon.log().lines().find_map(|l| {
                let e: serde_json::Value = serde_json::from_str(l).ok()?;
                (e["message"] == "partial segment uploaded" && e["wal"] == seg.as_str())
                    .then(|| e["bytes"].as_u64().expect("bytes"))
            })
        },
    );
    assert!(
        first >= before,
        "the restarted daemon replaced the stored {seg} ({before} bytes) with {first} bytes"
    );
    assert!(stored_partial().1 >= before);
    burst(1000);
    daemon.signal("KILL");
    pg.kill9();
    daemon.wait(Duration::from_secs(10));
    std::fs::remove_dir_all(&pg.data).unwrap();
    for e in std::fs::read_dir(dir.path()).unwrap().flatten() {
        if e.file_name().to_string_lossy().starts_with("spool-") {
            std::fs::remove_dir_all(e.path()).unwrap();
        }
    }

    let target = dir.mkdir("restored");
    let out = storage.pgkeep_pg(
        &bin,
        &["restore", "--target-dir", target.to_str().unwrap()],
        &[],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let mut copy = PgCluster::adopt(dir.path(), target, &storage.env);
    copy.set(&[("synchronous_standby_names", "''")]);
    copy.start();
    copy.wait_promoted();
    assert_eq!(
        copy.psql("select count(*) || ' ' || count(*) filter (where i >= 1000 and i < 1200) || ' ' || count(*) filter (where i = 100000) from acked"),
        "401 200 1",
        "every acknowledged commit is in storage"
    );
}

/// Makes storage unavailable to the daemon (S3: the server stopped; file://: the archive's
/// folders read-only for the postgres user the daemon runs as).
fn block(storage: &mut Storage) -> Option<S3Server> {
    match storage.s3.take() {
        Some(mut s3) => {
            s3.stop();
            Some(s3)
        }
        None => {
            set_tree_writable(&storage.objects_dir, false);
            None
        }
    }
}

fn unblock(storage: &mut Storage, s3: Option<S3Server>) {
    match s3 {
        Some(mut s3) => {
            s3.resume();
            storage.s3 = Some(s3);
        }
        None => set_tree_writable(&storage.objects_dir, true),
    }
}

fn set_tree_writable(dir: &std::path::Path, writable: bool) {
    use std::os::unix::fs::PermissionsExt;
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        if e.file_type().unwrap().is_dir() {
            set_tree_writable(&e.path(), writable);
        }
    }
    let mode = if writable { 0o700 } else { 0o500 };
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode)).unwrap();
}

#[test]
fn file_storage_synchronous() {
    synchronous(Backend::File);
}

#[test]
fn s3_storage_synchronous() {
    synchronous(Backend::S3);
}
