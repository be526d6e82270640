//! Storage that misbehaves under a recovering Postgres: `wal-fetch` (restore_command) rides out an
//! outage shorter than `wal_fetch_outage_secs` (a 1-second blip must not stop recovery with a
//! FATAL) and stops recovery (126, never 1) once it lasts longer. The S3 server is really stopped
//! and started again on its port. A silent server on the daemon's address costs at most 10 s.

mod common;

use std::time::{Duration, Instant};

use common::*;

#[test]
fn wal_fetch_rides_out_a_storage_outage_and_gives_up_past_its_limit() {
    let dir = TestDir::new("outage");
    let mut storage = Storage::new(Backend::S3, &dir);
    // The server itself, to stop and start (the storage's settings still name it).
    let mut s3 = storage.s3.take().unwrap();
    let bin = dir.install_pgkeep();
    let mut pg = archiving_cluster(&dir, &storage, &bin, "primary", 1);
    pg.start();
    pg.psql("create table t as select generate_series(1, 10000) g");
    let seg = pg.switch_and_wait_archived();
    let data = pg.data.clone();
    let original = std::fs::read(data.join("pg_wal").join(&seg)).unwrap();
    let dest = dir.path().join("RECOVERYXLOG");
    let no_daemon = format!("127.0.0.1:{}", free_port());
    let fetch = |name: &str, outage: &str| {
        let started = Instant::now();
        let out = storage.pgkeep_in(
            &bin,
            &["wal-fetch", name, dest.to_str().unwrap()],
            Some(&data),
            &[
                ("PGKEEP_WAL_FETCH_OUTAGE_SECS", outage),
                ("PGKEEP_LISTEN", &no_daemon),
            ],
        );
        (out, started.elapsed())
    };

    // An outage of 4 s under a limit of 60: the fetch waits it out and delivers.
    s3.stop();
    let back = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(4));
        s3.resume();
        s3
    });
    let (out, took) = fetch(&seg, "60");
    let mut s3 = back.join().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        took >= Duration::from_secs(3),
        "the fetch did not wait: {took:?}"
    );
    assert_eq!(std::fs::read(&dest).unwrap(), original);

    // Past the limit: 126 (Postgres stops recovery), for a missing file as for a present one.
    s3.stop();
    for name in [seg.as_str(), "0000000100000000000000FF"] {
        let (out, took) = fetch(name, "3");
        assert_eq!(out.status.code(), Some(126), "{name}: {}", stderr(&out));
        assert!(
            took >= Duration::from_secs(2) && took < Duration::from_secs(30),
            "{name}: gave up after {took:?} with a 3 s limit"
        );
    }
    s3.resume();
    let (out, _) = fetch("0000000100000000000000FF", "3");
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));

    // Something on `listen` that accepts and never answers costs at most the daemon question's
    // own timeout (10 s), not the storage request timeout (60 s); then storage delivers. (The
    // daemon's token is there, as after a daemon ran: without one, nothing on `listen` is asked.)
    pgkeep::http_token::Token::create(&storage.config.with_file_name("http").join("token"))
        .unwrap();
    let hung = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let hung_at = format!("127.0.0.1:{}", hung.local_addr().unwrap().port());
    std::thread::spawn(move || {
        let mut held = vec![];
        for c in hung.incoming().take(8) {
            held.push(c);
        }
        std::thread::sleep(Duration::from_secs(120));
    });
    std::fs::remove_file(&dest).unwrap();
    let started = Instant::now();
    let out = storage.pgkeep_in(
        &bin,
        &["wal-fetch", &seg, dest.to_str().unwrap()],
        Some(&data),
        &[("PGKEEP_LISTEN", &hung_at)],
    );
    let took = started.elapsed();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(std::fs::read(&dest).unwrap(), original);
    assert!(
        took >= Duration::from_secs(9) && took < Duration::from_secs(25),
        "a silent daemon held wal-fetch for {took:?}"
    );
    pg.stop("fast");
}
