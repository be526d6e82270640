//! `archive-push` with the daemon streaming (#17, item 3): a segment the daemon's stream stored,
//! with exactly the content Postgres hands to archive_command, is not read, compressed and
//! uploaded a second time; the daemon's proven word is taken. Content that differs from what the
//! daemon stored is refused loudly, storage unchanged; with the daemon gone or the setting off,
//! `archive-push` stores (here: compares) the segment itself; and a segment the stream has begun
//! but not yet stored (storage down) is waited for, not uploaded beside the daemon.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;

const BY_DAEMON: &str = "the daemon's stream stored it";

/// The file under the storage folder holding segment `seg`'s object.
fn object_of(storage: &Storage, seg: &str) -> PathBuf {
    let key = stored_keys(storage)
        .into_iter()
        .find(|k| k.ends_with(&format!("/{seg}")))
        .unwrap_or_else(|| panic!("{seg} is not in storage: {:?}", stored_keys(storage)));
    storage.object_file(&key)
}

/// The segment that the next switch completes.
fn current_segment(pg: &PgCluster) -> String {
    pg.psql("select pg_walfile_name(pg_current_wal_lsn())")
        .trim()
        .to_string()
}

fn push(
    storage: &Storage,
    bin: &Path,
    pg: &PgCluster,
    file: &Path,
    extra: &[(&str, &str)],
) -> (bool, String) {
    let out = storage.pgkeep_in(
        bin,
        &["archive-push", file.to_str().unwrap()],
        Some(&pg.data),
        extra,
    );
    (out.status.success(), stderr(&out))
}

fn archive_push_takes_the_daemons_word(backend: Backend) {
    let dir = TestDir::new("via-daemon");
    let mut storage = Storage::new(backend, &dir);
    let bin = dir.install_pgkeep();
    let mut pg = PgCluster::init(dir.path(), "primary", 1, &storage.env);
    pg.start();
    // A segment completed before the daemon's stream began: the daemon will never store it.
    pg.psql("create table before as select generate_series(1, 20000) g");
    let older = current_segment(&pg);
    pg.psql("select pg_switch_wal()");
    let older_file = dir.mkdir("older").join(&older);
    std::fs::copy(pg.data.join("pg_wal").join(&older), &older_file).unwrap();
    // (A new slot reserves WAL from the last checkpoint's redo point on.)
    pg.psql("checkpoint");
    let daemon = Daemon::start(&dir, &storage, &bin, &pg, &[]);
    let listen = format!("127.0.0.1:{}", daemon.port);
    let at_daemon = [("PGKEEP_LISTEN", listen.as_str())];
    pg.psql("create table t as select generate_series(1, 20000) g");
    let seg = current_segment(&pg);
    daemon.wal_switch(&storage, &bin, &pg);
    let file = pg.data.join("pg_wal").join(&seg);
    let object = object_of(&storage, &seg);
    let stored = std::fs::read(&object).unwrap();

    // The daemon's word: nothing uploaded, storage's object untouched.
    let (ok, log) = push(&storage, &bin, &pg, &file, &at_daemon);
    assert!(ok, "{log}");
    assert!(log.contains(BY_DAEMON), "{log}");
    assert!(std::fs::read(&object).unwrap() == stored);
    assert!(assert_stored_segments_equal(&storage, &storage.env, &bin, &pg) >= 1);

    // Other content under that name (a byte changed inside a record, page headers intact): the
    // daemon says it stored something else, and archive-push refuses it itself.
    let forged_dir = dir.mkdir("forged");
    let forged = forged_dir.join(&seg);
    let mut bytes = std::fs::read(&file).unwrap();
    bytes[0x3000 + 100] ^= 0xff;
    std::fs::write(&forged, &bytes).unwrap();
    let (ok, log) = push(&storage, &bin, &pg, &forged, &at_daemon);
    assert!(!ok, "{log}");
    assert!(log.contains("this daemon stored other content"), "{log}");
    assert!(log.contains("refusing to overwrite"), "{log}");
    assert!(std::fs::read(&object).unwrap() == stored);

    // A segment from before the stream: the daemon says at once that it did not store it (it
    // does not wait for an upload that never comes), and archive-push stores it itself.
    let started = Instant::now();
    let (ok, log) = push(&storage, &bin, &pg, &older_file, &at_daemon);
    assert!(ok, "{log}");
    assert!(
        !log.contains(BY_DAEMON) && log.contains("archived"),
        "{log}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "waited {:?} for the daemon",
        started.elapsed()
    );
    object_of(&storage, &older);

    // The setting off: archive-push compares with storage itself.
    let (ok, log) = push(
        &storage,
        &bin,
        &pg,
        &file,
        &[
            ("PGKEEP_LISTEN", &listen),
            ("PGKEEP_ARCHIVE_VIA_DAEMON", "false"),
        ],
    );
    assert!(ok, "{log}");
    assert!(
        !log.contains(BY_DAEMON) && log.contains("already archived with identical content"),
        "{log}"
    );

    // Storage down while the stream takes in a segment: archive-push waits for the daemon's
    // upload (it does not read storage itself), and has its word once storage is back.
    if let Some(mut s3) = storage.s3.take() {
        pg.psql("insert into t select generate_series(1, 20000)");
        let seg = current_segment(&pg);
        s3.stop();
        pg.psql("select pg_switch_wal()");
        let file = pg.data.join("pg_wal").join(&seg);
        let started = Instant::now();
        let (ok, log) = std::thread::scope(|s| {
            let pushed = s.spawn(|| push(&storage, &bin, &pg, &file, &at_daemon));
            std::thread::sleep(Duration::from_secs(2));
            assert!(
                !pushed.is_finished(),
                "archive-push did not wait for the daemon"
            );
            s3.resume();
            pushed.join().unwrap()
        });
        assert!(ok, "{log}");
        assert!(log.contains(BY_DAEMON), "{log}");
        assert!(started.elapsed() >= Duration::from_secs(2));
        storage.s3 = Some(s3);
        assert!(assert_stored_segments_equal(&storage, &storage.env, &bin, &pg) >= 2);
    }

    // No daemon: archive-push compares with storage itself.
    drop(daemon);
    let (ok, log) = push(&storage, &bin, &pg, &file, &at_daemon);
    assert!(ok, "{log}");
    assert!(
        !log.contains(BY_DAEMON) && log.contains("already archived with identical content"),
        "{log}"
    );
    pg.stop("fast");
}

#[test]
fn file_storage_archive_push_takes_the_daemons_word() {
    archive_push_takes_the_daemons_word(Backend::File);
}

#[test]
fn s3_storage_archive_push_takes_the_daemons_word() {
    archive_push_takes_the_daemons_word(Backend::S3);
}
