//! End to end: a real cluster archives WAL through `pgkeep archive-push` under a write load; every
//! archived segment decodes to exactly the bytes Postgres wrote; a second cluster started from a
//! `pg_basebackup` of the first recovers through `pgkeep wal-fetch` and holds the same rows,
//! including those committed after the base backup.

mod common;

use std::time::Duration;

use common::*;

fn roundtrip(backend: Backend, wal_segsize_mb: u32) {
    let dir = TestDir::new("roundtrip");
    let storage = Storage::new(backend, &dir);
    let bin = dir.install_pgkeep();
    let archive_command = archive_command(&bin, &storage);
    let restore_command = format!(
        "'{} --config {} wal-fetch %f %p'",
        bin.display(),
        storage.config.display()
    );

    // Compared with pg_basebackup, whose only version here is Postgres 15's.
    let mut primary = PgCluster::init_major(
        dir.path(),
        "primary",
        wal_segsize_mb,
        &storage.env,
        TOOLS_MAJOR,
    );
    primary.set(&[
        ("archive_mode", "on"),
        ("archive_command", &archive_command),
        // Keep every segment in pg_wal so that the archive can be compared with Postgres' own files.
        ("wal_keep_size", "'8GB'"),
        ("max_wal_size", "'8GB'"),
    ]);
    primary.start();
    primary.psql("create table t (id bigserial primary key, v text not null, at timestamptz default clock_timestamp())");

    let load = |rounds: usize, tag: &str| {
        for i in 0..rounds {
            primary.psql(&format!(
                "insert into t (v) select '{tag}-{i}-' || g || repeat(md5(g::text), 8) from generate_series(1, 3000) g"
            ));
            primary.psql("update t set v = v || '+' where id % 97 = 0");
            primary.psql("select pg_switch_wal()");
        }
    };
    load(8, "before");

    // A base backup without WAL: recovery must get all of it from the archive.
    let base = dir.path().join("restored");
    run_ok(
        as_postgres(pg_bin("pg_basebackup"), &[])
            .args([
                "-h",
                "127.0.0.1",
                "-U",
                "postgres",
                "-p",
                &primary.port.to_string(),
            ])
            .arg("-D")
            .arg(&base)
            .args(["-X", "none", "-c", "fast", "--no-sync"]),
    );

    load(8, "after");
    // Rows in the segment that is open now, committed after the backup and archived only by the switch below.
    primary.psql("insert into t (v) select 'last-' || g from generate_series(1, 500) g");
    let expected = primary.table_checksum("t");
    let last = primary.switch_and_wait_archived();
    assert_eq!(
        primary.psql("select failed_count from pg_stat_archiver"),
        "0",
        "{}",
        primary.log()
    );
    primary.stop("fast");

    // Every archived segment decodes to the bytes in pg_wal.
    let mut compared = 0;
    let fetched = dir.path().join("fetched");
    for key in stored_keys(&storage) {
        let name = key.rsplit('/').next().unwrap().to_string();
        if name.len() != 24 {
            continue;
        }
        let out = storage.pgkeep(&bin, &["wal-fetch", &name, fetched.to_str().unwrap()]);
        assert!(out.status.success(), "wal-fetch {name}: {}", stderr(&out));
        let ours = std::fs::read(&fetched).unwrap();
        let theirs = std::fs::read(primary.data.join("pg_wal").join(&name))
            .unwrap_or_else(|e| panic!("{name} is archived but not in pg_wal: {e}"));
        assert_eq!(ours.len(), theirs.len(), "{name}: length");
        assert!(ours == theirs, "{name}: archived bytes differ from pg_wal");
        compared += 1;
    }
    assert!(
        compared >= 17,
        "only {compared} segments were archived (last {last})"
    );
    // Stored objects are compressed (snappy by default): smaller than the segments in total.
    let stored: u64 = stored_keys(&storage)
        .iter()
        .map(|k| std::fs::metadata(storage.object_file(k)).unwrap().len())
        .sum();
    assert!(
        stored < (compared as u64 * wal_segsize_mb as u64) << 20,
        "nothing was compressed"
    );

    // Restore: the base backup plus restore_command through pgkeep.
    let mut restored = PgCluster::adopt(dir.path(), base, &storage.env);
    restored.set(&[
        ("restore_command", &restore_command),
        ("archive_mode", "on"),
        ("archive_command", &archive_command),
    ]);
    std::fs::write(restored.data.join("recovery.signal"), "").unwrap();
    give_to_postgres(&restored.data);
    restored.start();
    wait_for(
        "the restored cluster to finish recovery",
        Duration::from_secs(180),
        || (restored.psql("select pg_is_in_recovery()") == "f").then_some(()),
    );
    assert_eq!(
        restored.table_checksum("t"),
        expected,
        "restored rows differ"
    );
    assert_eq!(
        restored.psql("select count(*) from t where v like 'last-%'"),
        "500"
    );
    let log = restored.log();
    assert!(
        log.contains(&format!("restored log file \"{last}\" from archive")),
        "{log}"
    );
    assert!(log.contains("archive recovery complete"), "{log}");

    // The promoted cluster (timeline 2) archives its timeline history into the same archive.
    restored.switch_and_wait_archived();
    let keys = stored_keys(&storage);
    assert!(
        keys.iter()
            .any(|k| k.ends_with("/wal/00000002/00000002.history")),
        "{keys:?}"
    );
}

#[test]
fn file_storage_round_trip_16mb_segments() {
    roundtrip(Backend::File, 16);
}

#[test]
fn s3_storage_round_trip_1mb_segments() {
    roundtrip(Backend::S3, 1);
}
