//! Retention on both storage backends: with backup_count = 2 (and no age rule), after three backups
//! `pgkeep prune --dry-run` changes nothing, `pgkeep prune` deletes the oldest backup and the WAL
//! before the oldest kept backup, and each kept backup still restores to latest with every row.

mod common;

use common::*;

fn retention(backend: Backend) {
    let dir = TestDir::new("retention");
    let storage = Storage::new(backend, &dir);
    let bin = dir.install_pgkeep();
    let mut pg = archiving_cluster(&dir, &storage, &bin, "primary", 1);
    pg.start();
    pg.psql("create table t (id serial primary key, v text)");
    let mut ids = vec![];
    for round in 0..3 {
        pg.psql(&format!(
            "insert into t (v) select 'r{round}-' || md5(g::text) from generate_series(1, 20000) g"
        ));
        let out = storage.pgkeep_pg(&bin, &["backup"], &pg.client_env());
        assert!(out.status.success(), "backup: {}", stderr(&out));
        ids.push(String::from_utf8_lossy(&out.stdout).trim().to_string());
        pg.psql("select pg_switch_wal()");
        std::thread::sleep(std::time::Duration::from_millis(1100)); // ids are per second
    }
    pg.psql("insert into t (v) select 'last-' || g from generate_series(1, 100) g");
    let expected = pg.table_checksum("t");
    pg.switch_and_wait_archived();
    let oldest_wal_before: Vec<String> = stored_keys(&storage)
        .into_iter()
        .filter(|k| k.contains("/wal/"))
        .collect();

    let settings = [
        ("PGKEEP_BACKUP_COUNT".to_string(), "2".to_string()),
        ("PGKEEP_BACKUP_MAX_AGE_HOURS".to_string(), "0".to_string()),
    ];
    let before = stored_keys(&storage);
    let out = storage.pgkeep_pg(&bin, &["prune", "--dry-run"], &settings);
    assert!(out.status.success(), "{}", stderr(&out));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains(&format!("would delete 1 backup(s): {}", ids[0])),
        "{said}"
    );
    assert_eq!(stored_keys(&storage), before, "--dry-run changed storage");

    let out = storage.pgkeep_pg(&bin, &["prune"], &settings);
    assert!(out.status.success(), "{}", stderr(&out));
    let after = stored_keys(&storage);
    assert!(
        !after.iter().any(|k| k.contains(&ids[0])),
        "the oldest backup is still there"
    );
    for id in &ids[1..] {
        assert!(
            after
                .iter()
                .any(|k| k.ends_with(&format!("{id}/backup.json"))),
            "{id} was deleted"
        );
    }
    let out = storage.pgkeep_pg(&bin, &["list", "--json"], &[]);
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(listed["backups"].as_array().unwrap().len(), 2);
    // WAL before the second backup's start is gone; from it on, all of it is still there.
    let second_start = listed["backups"][1]["start_lsn"]
        .as_str()
        .unwrap()
        .to_string();
    let start_seg = parse_lsn(&second_start) >> 20; // 1 MiB segments
    let wal_after: Vec<&String> = after.iter().filter(|k| k.contains("/wal/")).collect();
    let mut deleted = 0;
    for k in &oldest_wal_before {
        let name = k.rsplit('/').next().unwrap();
        let kept = wal_after.contains(&k);
        if name.ends_with(".history") {
            assert!(kept, "{name}");
            continue;
        }
        let seg = u64::from_str_radix(&name[16..24], 16).unwrap()
            + (u64::from_str_radix(&name[8..16], 16).unwrap() << 12);
        assert_eq!(
            kept,
            seg >= start_seg,
            "{name} (the oldest kept backup starts in segment {start_seg:X})"
        );
        deleted += usize::from(!kept);
    }
    assert!(deleted > 0, "no WAL was deleted");
    // A second prune finds nothing more to do.
    let out = storage.pgkeep_pg(&bin, &["prune"], &settings);
    assert!(String::from_utf8_lossy(&out.stdout).contains("deleted 0 backup(s)"));
    pg.stop("fast");

    for id in &ids[1..] {
        let target = dir.mkdir(&format!("restore-{id}"));
        let out = storage.pgkeep_pg(
            &bin,
            &[
                "restore",
                "--backup",
                id,
                "--target-dir",
                target.to_str().unwrap(),
            ],
            &[],
        );
        assert!(out.status.success(), "{}", stderr(&out));
        let mut c = start_restored(&dir, &storage, target);
        assert_eq!(c.table_checksum("t"), expected, "restore of {id}");
        c.stop("fast");
    }
}

#[test]
fn file_storage_retention() {
    retention(Backend::File);
}

#[test]
fn s3_storage_retention() {
    retention(Backend::S3);
}

/// An object retention cannot delete (here: a backup folder root owns, as after a `pgkeep
/// backup` run by hand as root on file://) is named; the rest is still done, and the backup whose
/// metadata stays keeps every object (it never looks half-deleted).
#[test]
fn retention_names_what_it_cannot_delete_and_does_the_rest() {
    if !is_root() {
        eprintln!("needs root to make a folder the postgres user cannot change");
        return;
    }
    let dir = TestDir::new("retention-perm");
    let storage = Storage::new(Backend::File, &dir);
    let bin = dir.install_pgkeep();
    let mut pg = archiving_cluster(&dir, &storage, &bin, "primary", 1);
    pg.start();
    let mut ids = vec![];
    for round in 0..2 {
        pg.psql(&format!(
            "create table t{round} as select generate_series(1, 5000) g"
        ));
        let out = storage.pgkeep_pg(&bin, &["backup"], &pg.client_env());
        assert!(out.status.success(), "backup: {}", stderr(&out));
        ids.push(String::from_utf8_lossy(&out.stdout).trim().to_string());
        pg.psql("select pg_switch_wal()");
        std::thread::sleep(std::time::Duration::from_millis(1100));
    }
    pg.switch_and_wait_archived();
    let folder = stored_keys(&storage)
        .into_iter()
        .find(|k| k.ends_with(&format!("{}/backup.json", ids[0])))
        .map(|k| storage.object_file(&k).parent().unwrap().to_path_buf())
        .unwrap();
    // Readable by the postgres user, not writable: its objects cannot be deleted.
    run_ok(
        std::process::Command::new("chown")
            .arg("root:root")
            .arg(&folder),
    );
    run_ok(std::process::Command::new("chmod").arg("0755").arg(&folder));
    let before: Vec<String> = stored_keys(&storage)
        .into_iter()
        .filter(|k| k.contains(&ids[0]))
        .collect();
    let wal_before = stored_keys(&storage)
        .iter()
        .filter(|k| k.contains("/wal/"))
        .count();
    let settings = [
        ("PGKEEP_BACKUP_COUNT".to_string(), "1".to_string()),
        ("PGKEEP_BACKUP_MAX_AGE_HOURS".to_string(), "0".to_string()),
    ];
    let out = storage.pgkeep_pg(&bin, &["prune"], &settings);
    assert!(!out.status.success(), "{}", stderr(&out));
    for want in [
        "could not delete 1 object(s)",
        "backup.json",
        &ids[0],
        "did the rest",
    ] {
        assert!(stderr(&out).contains(want), "{want}: {}", stderr(&out));
    }
    let after = stored_keys(&storage);
    let kept: Vec<String> = after
        .iter()
        .filter(|k| k.contains(&ids[0]))
        .cloned()
        .collect();
    assert_eq!(
        kept, before,
        "the backup that could not be deleted lost objects"
    );
    let wal_after = after.iter().filter(|k| k.contains("/wal/")).count();
    assert!(
        wal_after < wal_before,
        "the WAL no kept backup needs was not deleted"
    );
    pg.stop("fast");
}

/// A backup run by hand as root into a file:// archive the postgres user owns is handed to that
/// owner: every object and folder it made belongs to postgres, and retention run as postgres
/// (as the daemon runs it) deletes it like any other.
#[test]
fn a_backup_run_as_root_belongs_to_the_archive_owner() {
    if !is_root() {
        eprintln!("needs root to run a backup as another user than the archive's owner");
        return;
    }
    use std::os::unix::fs::MetadataExt;
    let dir = TestDir::new("retention-owner");
    let storage = Storage::new(Backend::File, &dir);
    let bin = dir.install_pgkeep();
    let mut pg = archiving_cluster(&dir, &storage, &bin, "primary", 1);
    pg.start();
    let client: Vec<(String, String)> = pg.client_env();
    let client: Vec<(&str, &str)> = client
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let out = storage.pgkeep_in(&bin, &["backup"], None, &client);
    assert!(out.status.success(), "backup as root: {}", stderr(&out));
    let by_root = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let owner = std::fs::metadata(&storage.objects_dir).unwrap().uid();
    assert_ne!(owner, 0, "the archive belongs to postgres");
    let mut checked = 0;
    for key in stored_keys(&storage) {
        let mut p = storage.object_file(&key);
        while p != storage.objects_dir {
            let m = std::fs::symlink_metadata(&p).unwrap();
            assert_eq!(m.uid(), owner, "{} belongs to uid {}", p.display(), m.uid());
            p = p.parent().unwrap().to_path_buf();
        }
        checked += 1;
    }
    assert!(checked >= 4, "only {checked} objects");

    pg.psql("create table later as select generate_series(1, 1000) g");
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let out = storage.pgkeep_pg(&bin, &["backup"], &pg.client_env());
    assert!(out.status.success(), "backup: {}", stderr(&out));
    pg.switch_and_wait_archived();
    let settings = [
        ("PGKEEP_BACKUP_COUNT".to_string(), "1".to_string()),
        ("PGKEEP_BACKUP_MAX_AGE_HOURS".to_string(), "0".to_string()),
    ];
    let out = storage.pgkeep_pg(&bin, &["prune"], &settings);
    assert!(out.status.success(), "prune as postgres: {}", stderr(&out));
    assert!(
        !stored_keys(&storage).iter().any(|k| k.contains(&by_root)),
        "the root-run backup {by_root} was not deleted"
    );
    pg.stop("fast");
}
