//! End to end, on both storage backends: a pgbench cluster (scale 10) is backed up with `pgkeep
//! backup` while pgbench writes, writes go on with archive_command = pgkeep archive-push, markers
//! are set for each kind of PITR target, the cluster is destroyed, and `pgkeep restore` brings it
//! back: pg_verifybackup passes before start, every table equals the original at "latest", and each
//! PITR restore holds exactly the markers before its target.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;

const TABLES: [&str; 5] = [
    "pgbench_accounts",
    "pgbench_branches",
    "pgbench_tellers",
    "pgbench_history",
    "markers",
];

struct Restored {
    cluster: PgCluster,
}

/// `pgkeep restore` (as the postgres user, like an init container) into `root/name`, then
/// pg_verifybackup, then start with archiving off (a PITR copy must not archive into the
/// original's storage).
fn restore_and_start(
    dir: &TestDir,
    storage: &Storage,
    bin: &Path,
    name: &str,
    args: &[&str],
) -> Restored {
    let target = dir.mkdir(name);
    let mut full = vec!["restore", "--target-dir", target.to_str().unwrap()];
    full.extend_from_slice(args);
    let out = storage.pgkeep_pg(bin, &full, &[]);
    assert!(out.status.success(), "restore {args:?}: {}", stderr(&out));
    assert!(!target.join(pgkeep::restore::MARKER).exists());
    run_ok(std::process::Command::new(pg_bin("pg_verifybackup")).arg(&target));
    Restored {
        cluster: start_restored(dir, storage, target),
    }
}

fn markers(c: &PgCluster) -> Vec<String> {
    let out = c.psql("select coalesce(string_agg(name, ',' order by id), '') from markers");
    out.split(',')
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

fn backup_and_restore(backend: Backend) {
    let dir = TestDir::new("backup");
    let storage = Storage::new(backend, &dir);
    let bin = dir.install_pgkeep();
    // Checked with pg_verifybackup, whose only version here (15's) reads the manifests of 13 to 16.
    let mut primary = archiving_cluster_major(&dir, &storage, &bin, "primary", 16, TOOLS_MAJOR);
    primary.set(&[("max_wal_size", "'1GB'")]);
    primary.start();
    run_ok(&mut primary.pgbench(&["-i", "-s", "10", "-q"]));
    primary.psql("create table markers (id serial primary key, name text not null)");

    // The backup runs while pgbench writes.
    let mut load = primary
        .pgbench(&["-c", "2", "-T", "6", "-n"])
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let out = storage.pgkeep_pg(&bin, &["backup"], &primary.client_env());
    assert!(out.status.success(), "backup: {}", stderr(&out));
    let backup_id = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(load.wait().unwrap().success(), "pgbench failed");
    run_ok(&mut primary.pgbench(&["-c", "2", "-t", "300", "-n"]));

    // One marker row on each side of each PITR target.
    let insert =
        |name: &str| primary.psql(&format!("insert into markers (name) values ('{name}')"));
    insert("m0");
    std::thread::sleep(Duration::from_millis(1100));
    let target_time = primary.psql("select now()::text");
    std::thread::sleep(Duration::from_millis(1100));
    insert("m1");
    insert("m2");
    primary.psql("select pg_create_restore_point('before_m3')");
    insert("m3");
    let xid = primary.psql("insert into markers (name) values ('m4') returning xmin");
    insert("m5");
    insert("m6");
    let lsn = primary.psql("select pg_current_wal_insert_lsn()");
    insert("m7");
    run_ok(&mut primary.pgbench(&["-c", "1", "-t", "100", "-n"]));
    insert("m8");
    let expected: Vec<String> = TABLES.iter().map(|t| primary.table_checksum(t)).collect();
    primary.switch_and_wait_archived();

    let out = storage.pgkeep_pg(&bin, &["list"], &[]);
    let listing = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && listing.contains(&backup_id),
        "list: {listing}{}",
        stderr(&out)
    );
    assert!(listing.contains("recoverable: from"), "{listing}");
    let out = storage.pgkeep_pg(&bin, &["list", "--json"], &[]);
    let json: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("list --json prints JSON");
    assert_eq!(json["backups"][0]["id"], backup_id.as_str());

    // The cluster is destroyed.
    primary.stop("immediate");
    std::fs::remove_dir_all(&primary.data).unwrap();

    let latest = restore_and_start(&dir, &storage, &bin, "latest", &[]);
    let got: Vec<String> = TABLES
        .iter()
        .map(|t| latest.cluster.table_checksum(t))
        .collect();
    assert_eq!(got, expected, "restored tables differ from the original");
    assert_eq!(
        markers(&latest.cluster),
        ["m0", "m1", "m2", "m3", "m4", "m5", "m6", "m7", "m8"]
    );
    drop(latest);

    let all = ["m0", "m1", "m2", "m3", "m4", "m5", "m6", "m7", "m8"];
    let targets: [(&str, &str, usize); 4] = [
        ("--target-time", &target_time, 1),
        ("--target-name", "before_m3", 3),
        ("--target-xid", &xid, 5),
        ("--target-lsn", &lsn, 7),
    ];
    for (flag, value, upto) in targets {
        let name = flag.trim_start_matches("--");
        let r = restore_and_start(&dir, &storage, &bin, name, &[flag, value]);
        assert_eq!(
            markers(&r.cluster),
            all[..upto],
            "restore with {flag} {value}"
        );
        assert!(
            r.cluster.log().contains("recovery stopping"),
            "{}",
            r.cluster.log()
        );
    }
}

#[test]
fn file_storage_backup_restore_and_pitr() {
    backup_and_restore(Backend::File);
}

#[test]
fn s3_storage_backup_restore_and_pitr() {
    backup_and_restore(Backend::S3);
}
