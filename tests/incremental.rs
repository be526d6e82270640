//! Incremental backups (Postgres 17's native INCREMENTAL), on both storage backends: a full backup,
//! pgbench writes (and a table dropped, one created), an incremental one, more writes and a named
//! restore point, a second incremental one; the cluster destroyed; `pgkeep restore` rebuilds the
//! newest from the chain: the manifest it writes checks out (its own checksum, every file's size and
//! CRC-32C, and Postgres' pg_verifybackup), every table equals the original, the dropped table's
//! file is gone. PITR to the point between the incrementals restores the first incremental's chain.
//! A damaged chunk of the full backup makes the restore of the newest fail loudly, and retention
//! keeps the chain as long as its newest is kept.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;

const TABLES: [&str; 4] = [
    "pgbench_accounts",
    "pgbench_branches",
    "pgbench_tellers",
    "markers",
];

/// The major of the test: incremental backups need 17 or later.
fn major() -> u32 {
    default_major().max(17)
}

fn backup(storage: &Storage, bin: &Path, pg: &PgCluster, args: &[&str]) -> String {
    let mut all = vec!["backup"];
    all.extend_from_slice(args);
    let out = storage.pgkeep_pg(bin, &all, &pg.client_env());
    assert!(out.status.success(), "backup {args:?}: {}", stderr(&out));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn list(storage: &Storage, bin: &Path) -> serde_json::Value {
    let out = storage.pgkeep_pg(bin, &["list", "--json"], &[]);
    assert!(out.status.success(), "list: {}", stderr(&out));
    serde_json::from_slice(&out.stdout).expect("list --json prints JSON")
}

fn listed(storage: &Storage, bin: &Path) -> Vec<String> {
    list(storage, bin)["backups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["id"].as_str().unwrap().to_string())
        .collect()
}

/// The SHA-256 a manifest's `Manifest-Checksum` must hold: of everything up to and including the
/// next-to-last newline.
fn manifest_sum(text: &str) -> String {
    use sha2::Digest;
    let cut = text[..text.len() - 1].rfind('\n').unwrap() + 1;
    hex::encode(sha2::Sha256::digest(&text.as_bytes()[..cut]))
}

/// Checks a restored directory against its `backup_manifest` as pg_verifybackup does (the manifest's
/// own checksum, each file's size and CRC-32C, no file missing), then runs Postgres 15's
/// pg_verifybackup on a copy of the manifest in version 1 (15's tool reads no later one; the
/// version adds only the system identifier, checked here against the control file's).
fn verify_rebuilt(dir: &Path, scratch: &Path) {
    let text = std::fs::read_to_string(dir.join("backup_manifest")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["Manifest-Checksum"], manifest_sum(&text).as_str());
    let control = std::fs::read(dir.join("global/pg_control")).unwrap();
    let sysid = u64::from_le_bytes(control[..8].try_into().unwrap());
    assert_eq!(v["System-Identifier"].as_u64(), Some(sysid));
    let files = v["Files"].as_array().unwrap();
    for f in files {
        let path = f["Path"].as_str().unwrap();
        assert!(!path.contains("INCREMENTAL."), "{path}");
        // The restore's recovery settings change it; pg_verifybackup skips it too.
        if path == "postgresql.auto.conf" {
            continue;
        }
        let data = std::fs::read(dir.join(path)).unwrap_or_else(|e| panic!("{path}: {e}"));
        assert_eq!(f["Size"].as_u64(), Some(data.len() as u64), "{path}");
        let crc = pgkeep::wal::handoff::crc32c(&data);
        assert_eq!(
            f["Checksum"].as_str(),
            Some(hex::encode(crc.to_le_bytes()).as_str()),
            "{path}"
        );
    }
    let label = std::fs::read_to_string(dir.join("backup_label")).unwrap();
    assert!(!label.contains("INCREMENTAL"), "{label}");
    // Version 1 for 15's pg_verifybackup, checksum made anew.
    let mut v1: String = text
        .lines()
        .filter(|l| {
            !l.starts_with("\"System-Identifier\"") && !l.starts_with("\"Manifest-Checksum\"")
        })
        .map(|l| format!("{l}\n"))
        .collect::<String>()
        .replacen(
            "\"PostgreSQL-Backup-Manifest-Version\": 2,",
            "\"PostgreSQL-Backup-Manifest-Version\": 1,",
            1,
        );
    let sum = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(v1.as_bytes()))
    };
    v1.push_str(&format!("\"Manifest-Checksum\": \"{sum}\"}}\n"));
    let copy = scratch.join("manifest-v1");
    std::fs::write(&copy, v1).unwrap();
    run_ok(
        Command::new(pg_bin("pg_verifybackup"))
            .arg("--no-parse-wal")
            .arg("-m")
            .arg(&copy)
            .arg(dir),
    );
}

/// `pgkeep restore` into `root/name`; the directory and what the restore logged.
fn restore(
    storage: &Storage,
    bin: &Path,
    dir: &TestDir,
    name: &str,
    args: &[&str],
) -> (std::path::PathBuf, String) {
    let target = dir.mkdir(name);
    let mut all = vec!["restore", "--target-dir", target.to_str().unwrap()];
    all.extend_from_slice(args);
    let out = storage.pgkeep_pg(bin, &all, &[]);
    assert!(out.status.success(), "restore {args:?}: {}", stderr(&out));
    (target, stderr(&out))
}

fn markers(c: &PgCluster) -> String {
    c.psql("select coalesce(string_agg(name, ',' order by id), '') from markers")
}

fn incremental_chain(backend: Backend) {
    let dir = TestDir::new("incremental");
    let storage = Storage::new(backend, &dir);
    let bin = dir.install_pgkeep();
    let mut primary = archiving_cluster_major(&dir, &storage, &bin, "primary", 16, major());
    primary.set(&[("max_wal_size", "'1GB'")]);
    primary.start();
    run_ok(&mut primary.pgbench(&["-i", "-s", "5", "-q"]));
    primary.psql("create table markers (id serial primary key, name text not null)");
    primary.psql("create table gone as select g from generate_series(1, 10000) g");
    let gone_file = primary.psql("select pg_relation_filepath('gone')");
    // A tablespace, with a table changed between the backups.
    let ts_old = dir.mkdir("ts_old");
    primary.psql(&format!(
        "create tablespace extra location '{}'",
        ts_old.display()
    ));
    primary.psql(
        "create table spaced tablespace extra as select g as id, 0 as v from generate_series(1, 20000) g",
    );
    let map = |name: &str| format!("{}={}", ts_old.display(), dir.path().join(name).display());

    // Without summarize_wal, and without a backup to build on: refused, saying why.
    let out = storage.pgkeep_pg(&bin, &["backup", "--incremental"], &primary.client_env());
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("summarize_wal = on"),
        "{}",
        stderr(&out)
    );
    primary.psql("alter system set summarize_wal = on");
    primary.psql("select pg_reload_conf()");
    let out = storage.pgkeep_pg(&bin, &["backup", "--incremental"], &primary.client_env());
    assert!(!out.status.success());
    assert!(stderr(&out).contains("no backup"), "{}", stderr(&out));

    let full = backup(&storage, &bin, &primary, &["--full"]);
    primary.psql("insert into markers (name) values ('m0')");
    run_ok(&mut primary.pgbench(&["-c", "2", "-t", "200", "-n"]));
    primary.psql("update spaced set v = 1 where id between 100 and 300");
    primary.psql("drop table gone");
    primary.psql("create table born as select g from generate_series(1, 5000) g");
    let inc1 = backup(&storage, &bin, &primary, &["--incremental"]);

    primary.psql("insert into markers (name) values ('m1')");
    primary.psql("select pg_create_restore_point('between')");
    primary.psql("insert into markers (name) values ('m2')");
    run_ok(&mut primary.pgbench(&["-c", "2", "-t", "200", "-n"]));
    let inc2 = backup(&storage, &bin, &primary, &["--incremental"]);
    primary.psql("insert into markers (name) values ('m3')");
    let expected: Vec<String> = TABLES.iter().map(|t| primary.table_checksum(t)).collect();
    let born = primary.table_checksum("born");
    let spaced = primary.table_checksum("spaced");
    primary.switch_and_wait_archived();

    // `list` says what each is and what it added.
    let inv = list(&storage, &bin);
    let b = inv["backups"].as_array().unwrap();
    assert_eq!(b.len(), 3);
    assert_eq!(b[0]["id"], inc2.as_str());
    assert_eq!(b[0]["kind"], "incremental");
    assert_eq!(b[0]["parent"], inc1.as_str());
    assert_eq!(b[1]["parent"], full.as_str());
    assert!(b[2].get("kind").is_none() && b[2].get("parent").is_none());
    let (full_bytes, inc_bytes) = (
        b[2]["plain_bytes"].as_str().map_or_else(
            || b[2]["plain_bytes"].as_u64().unwrap(),
            |s| s.parse().unwrap(),
        ),
        b[1]["plain_bytes"].as_str().map_or_else(
            || b[1]["plain_bytes"].as_u64().unwrap(),
            |s| s.parse().unwrap(),
        ),
    );
    assert!(
        inc_bytes * 3 < full_bytes,
        "an incremental backup of a few hundred transactions holds {inc_bytes} bytes, the full one {full_bytes}"
    );
    let out = storage.pgkeep_pg(&bin, &["list"], &[]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("incremental") && text.contains("KIND"),
        "{text}"
    );
    let out = storage.pgkeep_pg(&bin, &["verify"], &[]);
    assert!(out.status.success(), "verify: {}", stderr(&out));

    primary.stop("immediate");
    std::fs::remove_dir_all(&primary.data).unwrap();

    // The newest, rebuilt from all three.
    let (latest, log) = restore(
        &storage,
        &bin,
        &dir,
        "latest",
        &["--tablespace-map", &map("ts_latest")],
    );
    assert!(
        log.contains(&format!("backup={inc2}")) && log.contains("chain=3"),
        "{log}"
    );
    // Files no incremental changed keep the full backup's checksum, unread (checked below).
    let reused: u64 = log
        .split("checksum_reused=")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{log}"));
    assert!(reused > 100, "{log}");
    assert!(
        !latest.join(&gone_file).exists(),
        "the dropped table's file was restored"
    );
    verify_rebuilt(&latest, dir.path());
    let c = start_restored(&dir, &storage, latest);
    let got: Vec<String> = TABLES.iter().map(|t| c.table_checksum(t)).collect();
    assert_eq!(
        got, expected,
        "tables restored from the chain differ from the original"
    );
    assert_eq!(c.table_checksum("born"), born);
    assert_eq!(c.table_checksum("spaced"), spaced);
    assert_eq!(markers(&c), "m0,m1,m2,m3");
    drop(c);

    // To the point between the incrementals: the first incremental's chain.
    let (pitr, log) = restore(
        &storage,
        &bin,
        &dir,
        "pitr",
        &[
            "--target-name",
            "between",
            "--tablespace-map",
            &map("ts_pitr"),
        ],
    );
    assert!(
        log.contains(&format!("chosen backup backup={inc1}")) && log.contains("chain=2"),
        "{log}"
    );
    verify_rebuilt(&pitr, dir.path());
    let c = start_restored(&dir, &storage, pitr);
    assert_eq!(markers(&c), "m0,m1");
    assert!(c.log().contains("recovery stopping"), "{}", c.log());
    drop(c);

    // Retention with backup_count = 1 keeps what the newest builds on.
    let mut cfg = std::fs::read_to_string(&storage.config).unwrap();
    cfg.push_str("backup_count = 1\nbackup_max_age_hours = 0\n");
    std::fs::write(&storage.config, cfg).unwrap();
    let out = storage.pgkeep_pg(&bin, &["prune"], &[]);
    assert!(out.status.success(), "prune: {}", stderr(&out));
    assert_eq!(
        listed(&storage, &bin),
        [inc2.clone(), inc1.clone(), full.clone()]
    );

    // A damaged chunk of the full backup: the newest cannot be rebuilt, and the restore says so.
    let sysid = inv["system_identifier"].as_str().unwrap();
    let first = storage.object_file(&format!(
        "clusters/{sysid}/basebackups/{full}/data/base/000000"
    ));
    let mut bytes = std::fs::read(&first).unwrap();
    let at = bytes.len() - 100;
    bytes[at] ^= 0x55;
    std::fs::write(&first, bytes).unwrap();
    let target = dir.mkdir("damaged");
    let ts_damaged = map("ts_damaged");
    let out = storage.pgkeep_pg(
        &bin,
        &[
            "restore",
            "--target-dir",
            target.to_str().unwrap(),
            "--tablespace-map",
            &ts_damaged,
        ],
        &[],
    );
    assert!(
        !out.status.success(),
        "a restore on a damaged full backup succeeded"
    );
    let err = stderr(&out);
    assert!(
        err.contains(&full) && (err.contains("checksum") || err.contains("damaged")),
        "{err}"
    );
    assert!(!target.join("PG_VERSION").exists());
}

#[test]
fn file_storage_incremental_chain() {
    incremental_chain(Backend::File);
}

#[test]
fn s3_storage_incremental_chain() {
    incremental_chain(Backend::S3);
}

/// A backup without --full or --incremental follows the schedule's settings: full with
/// `backup_full_interval_hours` unset; incremental once it is set, until the chain holds
/// `backup_max_incrementals`; then full again. A server without summarize_wal gets a full one.
#[test]
fn scheduled_backups_are_incremental_until_the_chain_is_full() {
    let dir = TestDir::new("incremental-schedule");
    let storage = Storage::new(Backend::File, &dir);
    let bin = dir.install_pgkeep();
    let mut pg = archiving_cluster_major(&dir, &storage, &bin, "primary", 16, major());
    pg.start();
    pg.psql("create table t as select g from generate_series(1, 1000) g");
    let kinds = |storage: &Storage| -> Vec<String> {
        list(storage, &bin)["backups"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["kind"].as_str().unwrap_or("full").to_string())
            .collect()
    };
    backup(&storage, &bin, &pg, &[]);
    let mut cfg = std::fs::read_to_string(&storage.config).unwrap();
    cfg.push_str("backup_full_interval_hours = 168\nbackup_max_incrementals = 2\n");
    std::fs::write(&storage.config, cfg).unwrap();
    // summarize_wal is off: a full one, and the log says why.
    let out = storage.pgkeep_pg(&bin, &["backup"], &pg.client_env());
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("summarize_wal"), "{}", stderr(&out));
    pg.psql("alter system set summarize_wal = on");
    pg.psql("select pg_reload_conf()");
    for _ in 0..4 {
        pg.psql("insert into t select g from generate_series(1, 100) g");
        backup(&storage, &bin, &pg, &[]);
    }
    // Newest first: two incrementals on the second full one, then a full one (the chain held
    // backup_max_incrementals), and an incremental on that.
    assert_eq!(
        kinds(&storage),
        [
            "incremental",
            "full",
            "incremental",
            "incremental",
            "full",
            "full"
        ]
    );
}

/// The file index entry of `path` (a manifest path of the data directory) in backup `id`.
fn indexed(storage: &Storage, sysid: &str, id: &str, path: &str) -> serde_json::Value {
    let raw = std::fs::read(
        storage.object_file(&format!("clusters/{sysid}/basebackups/{id}/files.json")),
    )
    .unwrap();
    // A sealed object in the backup's codec: read back through pgkeep's own object format.
    let (_, plain) = pgkeep::storage::object::open(&raw, &pgkeep::storage::Keys::default())
        .expect("files.json opens");
    let v: serde_json::Value = serde_json::from_slice(&plain).unwrap();
    v["files"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["path"] == path)
        .unwrap_or_else(|| panic!("{path} is not in {id}'s index"))
        .clone()
}

/// Postgres 13 to 16: a delta backup stores only the files changed since its parent; an unchanged
/// file is a reference to the backup that stored it (through a chain of two deltas), and the
/// restore of the newest equals the original and passes pg_verifybackup.
fn delta_chain(backend: Backend) {
    let dir = TestDir::new("delta");
    let storage = Storage::new(backend, &dir);
    let bin = dir.install_pgkeep();
    let mut pg = archiving_cluster_major(&dir, &storage, &bin, "primary", 16, TOOLS_MAJOR);
    pg.start();
    run_ok(&mut pg.pgbench(&["-i", "-s", "2", "-q"]));
    pg.psql("create table markers (id serial primary key, name text not null)");
    pg.psql(
        "create table still as select g, repeat('x', 200) as pad from generate_series(1, 100000) g",
    );
    pg.psql("create table gone as select g from generate_series(1, 10000) g");
    let still = pg.psql("select pg_relation_filepath('still')");
    let gone = pg.psql("select pg_relation_filepath('gone')");
    pg.psql("checkpoint");
    // Files written in the second a backup starts are stored again by the next delta.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let full = backup(&storage, &bin, &pg, &["--full"]);
    pg.psql("insert into markers (name) values ('m0')");
    run_ok(&mut pg.pgbench(&["-c", "2", "-t", "200", "-n"]));
    pg.psql("drop table gone");
    pg.psql("checkpoint");
    let d1 = backup(&storage, &bin, &pg, &["--incremental"]);
    pg.psql("insert into markers (name) values ('m1')");
    run_ok(&mut pg.pgbench(&["-c", "2", "-t", "200", "-n"]));
    pg.psql("checkpoint");
    let d2 = backup(&storage, &bin, &pg, &["--incremental"]);
    pg.psql("insert into markers (name) values ('m2')");
    let expected: Vec<String> = TABLES.iter().map(|t| pg.table_checksum(t)).collect();
    let still_sum = pg.table_checksum("still");
    pg.switch_and_wait_archived();

    let inv = list(&storage, &bin);
    let sysid = inv["system_identifier"].as_str().unwrap().to_string();
    let b = inv["backups"].as_array().unwrap();
    assert_eq!(
        (b[0]["kind"].as_str(), b[0]["parent"].as_str()),
        (Some("delta"), Some(d1.as_str()))
    );
    assert_eq!(
        (b[1]["kind"].as_str(), b[1]["parent"].as_str()),
        (Some("delta"), Some(full.as_str()))
    );
    // The unchanged table's file: stored by the full backup only, referred to by both deltas.
    let size = std::fs::metadata(pg.data.join(&still)).unwrap().len();
    assert!(size > 64 << 10, "{size}");
    for id in [&d1, &d2] {
        let e = indexed(&storage, &sysid, id, &still);
        assert_eq!(e["from"], full.as_str(), "{id}: {e}");
    }
    assert!(
        indexed(&storage, &sysid, &full, &still)
            .get("from")
            .is_none()
    );
    let bytes = |i: usize| b[i]["plain_bytes"].as_u64().unwrap();
    assert!(
        bytes(0) + size <= bytes(2) + (1 << 20),
        "a delta holds {} bytes, the full backup {} (the unchanged file: {size})",
        bytes(0),
        bytes(2)
    );
    let out = storage.pgkeep_pg(&bin, &["verify"], &[]);
    assert!(
        out.status.success(),
        "verify: {}{}",
        stderr(&out),
        String::from_utf8_lossy(&out.stdout)
    );

    pg.stop("immediate");
    std::fs::remove_dir_all(&pg.data).unwrap();
    let (latest, log) = restore(&storage, &bin, &dir, "latest", &[]);
    assert!(log.contains(&format!("backup={d2}")), "{log}");
    assert!(
        !latest.join(&gone).exists(),
        "the dropped table's file was restored"
    );
    verify_restored(&latest);
    let c = start_restored(&dir, &storage, latest);
    let got: Vec<String> = TABLES.iter().map(|t| c.table_checksum(t)).collect();
    assert_eq!(
        got, expected,
        "tables restored from the delta differ from the original"
    );
    assert_eq!(c.table_checksum("still"), still_sum);
    assert_eq!(markers(&c), "m0,m1,m2");
}

#[test]
fn file_storage_delta_chain() {
    delta_chain(Backend::File);
}

#[test]
fn s3_storage_delta_chain() {
    delta_chain(Backend::S3);
}

/// A tablespace dropped between the full backup and an incremental one: the chain restores, and
/// nothing of the tablespace (no files, no link) comes back.
#[test]
fn a_tablespace_dropped_within_a_chain_is_not_restored() {
    let dir = TestDir::new("incremental-dropped-ts");
    let storage = Storage::new(Backend::File, &dir);
    let bin = dir.install_pgkeep();
    let mut pg = archiving_cluster_major(&dir, &storage, &bin, "primary", 16, major());
    pg.set(&[("summarize_wal", "on")]);
    pg.start();
    let ts = dir.mkdir("ts");
    pg.psql(&format!(
        "create tablespace gone_ts location '{}'",
        ts.display()
    ));
    pg.psql("create table t tablespace gone_ts as select g from generate_series(1, 5000) g");
    pg.psql("create table kept as select g from generate_series(1, 5000) g");
    backup(&storage, &bin, &pg, &["--full"]);
    pg.psql("drop table t");
    pg.psql("drop tablespace gone_ts");
    pg.psql("insert into kept select g from generate_series(1, 100) g");
    let inc = backup(&storage, &bin, &pg, &["--incremental"]);
    let expected = pg.table_checksum("kept");
    pg.switch_and_wait_archived();
    pg.stop("immediate");
    std::fs::remove_dir_all(&pg.data).unwrap();
    // The old location still holds the (now empty) tablespace folder: nothing is written there.
    let before: Vec<_> = walk(&ts);
    let (target, log) = restore(&storage, &bin, &dir, "restored", &[]);
    assert!(log.contains(&format!("backup={inc}")), "{log}");
    assert_eq!(
        walk(&ts),
        before,
        "the dropped tablespace's location was written to"
    );
    assert_eq!(
        std::fs::read_dir(target.join("pg_tblspc")).unwrap().count(),
        0
    );
    let c = start_restored(&dir, &storage, target);
    assert_eq!(c.table_checksum("kept"), expected);
}

/// Every path below `dir`, sorted.
fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = vec![];
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                todo.push(p.clone());
            }
            out.push(p);
        }
    }
    out.sort();
    out
}

/// With encryption, an incremental backup reads its parent's encrypted manifest: with the identity
/// it is taken and restores; without it `--incremental` fails saying why, and a scheduled backup
/// is full.
#[test]
fn encrypted_incremental_backups_need_the_identity() {
    let dir = TestDir::new("incremental-encrypted");
    let storage = Storage::new(Backend::File, &dir);
    let bin = dir.install_pgkeep();
    let (recipient, identity) = keygen(&bin, &dir, "age.key");
    let mut cfg = std::fs::read_to_string(&storage.config).unwrap();
    cfg.push_str(&format!(
        "encryption_recipients = [\"{recipient}\"]\nbackup_full_interval_hours = 168\n"
    ));
    std::fs::write(&storage.config, cfg).unwrap();
    let mut pg = archiving_cluster_major(&dir, &storage, &bin, "primary", 16, major());
    pg.set(&[("summarize_wal", "on")]);
    pg.start();
    pg.psql("create table t as select g from generate_series(1, 5000) g");
    backup(&storage, &bin, &pg, &["--full"]);
    pg.psql("insert into t select g from generate_series(1, 100) g");
    // Without the identity.
    let out = storage.pgkeep_pg(&bin, &["backup", "--incremental"], &pg.client_env());
    assert!(!out.status.success());
    assert!(stderr(&out).contains("manifest"), "{}", stderr(&out));
    let out = storage.pgkeep_pg(&bin, &["backup"], &pg.client_env());
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("taking a full backup"),
        "{}",
        stderr(&out)
    );
    // With it.
    let with_id = [(
        "PGKEEP_ENCRYPTION_IDENTITY_FILE".to_string(),
        identity.display().to_string(),
    )];
    let mut env = pg.client_env();
    env.extend(with_id.iter().cloned());
    pg.psql("insert into t select g from generate_series(1, 100) g");
    let out = storage.pgkeep_pg(&bin, &["backup", "--incremental"], &env);
    assert!(out.status.success(), "{}", stderr(&out));
    let inc = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let expected = pg.table_checksum("t");
    pg.switch_and_wait_archived();
    pg.stop("immediate");
    std::fs::remove_dir_all(&pg.data).unwrap();
    let target = dir.mkdir("restored");
    let out = storage.pgkeep_pg(
        &bin,
        &["restore", "--target-dir", target.to_str().unwrap()],
        &with_id,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(&format!("backup={inc}")),
        "{}",
        stderr(&out)
    );
    let c = start_restored(&dir, &storage, target);
    assert_eq!(c.table_checksum("t"), expected);
}

/// The daemon: with `backup_full_interval_hours` set, its backup at start is full (none to build
/// on) and the next (`POST /backups`, as the schedule takes them) incremental on it; both restore
/// as a chain.
#[test]
fn the_daemon_takes_incremental_backups_on_its_schedule() {
    let dir = TestDir::new("incremental-daemon");
    let storage = Storage::new(Backend::File, &dir);
    let bin = dir.install_pgkeep();
    let mut pg = PgCluster::init_major(dir.path(), "primary", 1, &storage.env, major());
    pg.set(&[("summarize_wal", "on")]);
    pg.start();
    pg.psql("create table t as select generate_series(1, 10000) g");
    let daemon = Daemon::start(
        &dir,
        &storage,
        &bin,
        &pg,
        &[
            ("PGKEEP_BACKUP_INTERVAL_HOURS", "24"),
            ("PGKEEP_BACKUP_FULL_INTERVAL_HOURS", "168"),
            ("PGKEEP_PARTIAL_UPLOAD_SECS", "1"),
        ],
    );
    // The backup at start: full, with none to build on.
    let listed = daemon.wait_backups(1);
    let full = listed["backups"][0]["id"].as_str().unwrap().to_string();
    assert!(listed["backups"][0].get("kind").is_none(), "{listed}");
    pg.psql("insert into t select generate_series(1, 1000)");
    let (code, body) = http_with(
        "POST",
        daemon.port,
        "/backups",
        &[("authorization", &daemon.bearer())],
    );
    assert_eq!(code, 201, "{}", String::from_utf8_lossy(&body));
    let listed = daemon.backups();
    let newest = &listed["backups"][0];
    assert_eq!(newest["kind"], "incremental", "{newest}");
    assert_eq!(newest["parent"], full.as_str(), "{newest}");
    let expected = pg.table_checksum("t");
    daemon.wal_switch(&storage, &bin, &pg);
    pg.stop("immediate");
    std::fs::remove_dir_all(&pg.data).unwrap();
    let (target, log) = restore(&storage, &bin, &dir, "restored", &[]);
    assert!(log.contains("chain=2"), "{log}");
    let c = start_restored(&dir, &storage, target);
    assert_eq!(c.table_checksum("t"), expected);
}
