//! Moving a database into a new release (`restore --seed-from URL`), on both storage backends: the
//! new release's first restore copies the latest backup, its WAL, the history files and the marks
//! from the old release's archive into its own storage (read only there), restores from its own
//! storage and then archives there; a standby of the new release restores from the new storage
//! and follows the new primary. The old archive is byte for byte what it was, a second seed
//! copies nothing, and bad sources are refused with the reason.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use sha2::{Digest, Sha256};

/// Every object file of a storage with the SHA-256 of its bytes.
fn snapshot(storage: &Storage) -> BTreeMap<String, String> {
    stored_keys(storage)
        .into_iter()
        .map(|k| {
            let bytes = std::fs::read(storage.object_file(&k)).unwrap();
            (k, hex::encode(Sha256::digest(&bytes)))
        })
        .collect()
}

/// A second storage beside `storage`, in the same place kind (the same S3 server, another prefix;
/// another directory), with its config file in `dir`.
fn new_release_storage(storage: &Storage, dir: &TestDir) -> Storage {
    let (url, objects_dir) = match storage.backend {
        Backend::File => {
            let root = dir.mkdir("archive");
            (format!("file://{}", root.display()), root)
        }
        Backend::S3 => {
            let bucket = storage
                .url
                .trim_start_matches("s3://")
                .split('/')
                .next()
                .unwrap();
            let prefix = "prod/db-new";
            let s3 = storage.s3.as_ref().unwrap();
            (
                format!("s3://{bucket}/{prefix}"),
                s3.dir.join(bucket).join(prefix),
            )
        }
    };
    let config = dir.path().join("pgkeep.toml");
    std::fs::write(&config, format!("storage = \"{url}\"\n")).unwrap();
    Storage {
        backend: storage.backend,
        url,
        env: storage.env.clone(),
        config,
        objects_dir,
        s3: None,
    }
}

fn ledger(pg: &PgCluster) -> String {
    pg.psql("select string_agg(id::text || ':' || note, ',' order by id) from ledger")
}

fn move_into_a_new_release(backend: Backend) {
    // The old release: a cluster archiving to its storage, two backups, a mark.
    let old_dir = TestDir::new("move-old");
    let old = Storage::new(backend, &old_dir);
    let bin = old_dir.install_pgkeep();
    let mut pg = archiving_cluster(&old_dir, &old, &bin, "old", 1);
    pg.start();
    pg.psql("create table ledger (id int primary key, note text)");
    pg.psql("insert into ledger select g, 'first ' || g from generate_series(1, 100) g");
    let backup = |what: &str| {
        let out = old.pgkeep_pg(&bin, &["backup"], &pg.client_env());
        assert!(out.status.success(), "{what}: {}", stderr(&out));
    };
    backup("the first backup");
    pg.psql("insert into ledger select g, 'second ' || g from generate_series(101, 150) g");
    backup("the second backup");
    pg.psql("update ledger set note = note || ' changed' where id % 7 = 0");
    let out = old.pgkeep_pg(&bin, &["mark", "before-move"], &pg.client_env());
    assert!(out.status.success(), "mark: {}", stderr(&out));
    pg.psql("insert into ledger select g, 'last ' || g from generate_series(151, 160) g");
    pg.switch_and_wait_archived();
    let want = ledger(&pg);
    // The old release is retired before the move (its preStop made its WAL durable).
    pg.stop("fast");
    let before = snapshot(&old);

    // The new release's first pod: its init container seeds and restores.
    let new_dir = TestDir::new("move-new");
    let new = new_release_storage(&old, &new_dir);
    let data = new_dir.path().join("data");
    let restore = |target: &std::path::Path, extra: &[&str]| {
        let mut args = vec!["restore", "--target-dir", target.to_str().unwrap()];
        args.extend_from_slice(extra);
        new.pgkeep_pg(&bin, &args, &[])
    };
    let out = restore(&data, &["--seed-from", &old.url]);
    let log = stderr(&out);
    assert!(out.status.success(), "the seeded restore: {log}");
    assert!(log.contains("seeded this release's storage"), "{log}");
    // Only the latest backup came along, with the mark.
    let listed = new.pgkeep_pg(&bin, &["list", "--json"], &[]);
    let listed: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    assert_eq!(listed["backups"].as_array().unwrap().len(), 1, "{listed}");
    assert!(listed.to_string().contains("before-move"), "{listed}");
    // It recovers from its own storage, then archives there.
    let mut primary = PgCluster::adopt(new_dir.path(), data, &new.env);
    primary.set(&[
        ("archive_mode", "on"),
        ("archive_command", &archive_command(&bin, &new)),
    ]);
    primary.start();
    primary.wait_promoted();
    assert_eq!(ledger(&primary), want, "the moved database differs");
    primary.psql("insert into ledger values (9001, 'after the move')");
    primary.switch_and_wait_archived();
    assert!(
        stored_keys(&new)
            .iter()
            .any(|k| k.ends_with("00000002.history")),
        "the new primary's timeline is not in its storage: {:?}",
        stored_keys(&new)
    );

    // A standby of the new release restores from the new release's storage and follows the
    // new primary there.
    let sb_data = new_dir.path().join("standby");
    let out = restore(&sb_data, &["--standby"]);
    assert!(
        out.status.success(),
        "the standby's restore: {}",
        stderr(&out)
    );
    let mut standby = PgCluster::adopt(new_dir.path(), sb_data, &new.env);
    standby.start();
    primary.psql("insert into ledger values (9002, 'while the standby follows')");
    primary.switch_and_wait_archived();
    let want_new = ledger(&primary);
    wait_for("the standby to follow", Duration::from_secs(60), || {
        let out = standby.try_psql("select count(*) from ledger where id = 9002");
        (out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "1").then_some(())
    });
    assert_eq!(
        ledger(&standby),
        want_new,
        "the standby differs from the primary"
    );
    assert_eq!(standby.psql("select pg_is_in_recovery()"), "t");

    // Seeding again (a restore of a lost volume): the new storage holds a backup of the cluster,
    // so nothing is copied and the restore uses the new storage.
    let again = new_dir.path().join("again");
    let out = restore(&again, &["--seed-from", &old.url]);
    let log = stderr(&out);
    assert!(out.status.success(), "{log}");
    assert!(
        log.contains("holds a backup of the cluster already"),
        "{log}"
    );
    assert!(!log.contains("seeded this release's storage"), "{log}");

    // Bad sources: this release's own storage, and a place holding no archive; nothing written.
    let out = restore(&new_dir.path().join("bad1"), &["--seed-from", &new.url]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("is this release's own storage"),
        "{}",
        stderr(&out)
    );
    let empty = new_dir.mkdir("empty-archive");
    let other = TestDir::new("move-other");
    let fresh = new_release_storage(&old, &other);
    let out = fresh.pgkeep_pg(
        &bin,
        &[
            "restore",
            "--target-dir",
            other.path().join("data").to_str().unwrap(),
            "--seed-from",
            &format!("file://{}", empty.display()),
        ],
        &[],
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("no pgkeep archive there"),
        "{}",
        stderr(&out)
    );
    assert!(!other.path().join("data").exists());

    // The source archive was only read.
    assert_eq!(snapshot(&old), before, "the old release's archive changed");
    standby.stop("fast");
    primary.stop("fast");
}

#[test]
fn file_storage_move_into_a_new_release() {
    move_into_a_new_release(Backend::File);
}

#[test]
fn s3_storage_move_into_a_new_release() {
    move_into_a_new_release(Backend::S3);
}
