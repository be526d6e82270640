//! Client-side encryption with age, end to end on both storage backends. One cluster's life:
//! 1. plain: the daemon streams and `backup` runs without encryption (and the scan below finds the
//!    marker rows in those objects, so it can find them);
//! 2. under key A: the daemon and `backup` run with the recipient only (no identity anywhere);
//! 3. under key B (rotation: the new recipient applies to new objects), with a restore point.
//!
//! Then: no object written under 2 or 3 holds a marker or is unencrypted (metadata aside); a WAL
//! object decrypts with the `age` tool and decodes to Postgres' own segment; `wal-fetch` without
//! an identity or with a wrong one exits 126 with the problem named, and through the daemon
//! (which holds no identity) with one; restore without an identity fails and leaves nothing;
//! with an identity file holding A and B, the plain backup restores to latest through plain, A
//! and B WAL with every row, and the newest backup restores to the restore point; with B alone,
//! the backup under A is refused with the key named.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

const MARKERS: [&str; 3] = [
    "plain-zebra-71c3",
    "under-a-okapi-9e2d",
    "under-b-quokka-44f0",
];

fn insert_markers(pg: &PgCluster, marker: &str) {
    pg.psql(&format!(
        "insert into secrets select g, '{marker}-' || g from generate_series(1, 2000) g"
    ));
}

/// Every stored object's key and bytes.
fn snapshot(storage: &Storage) -> Vec<(String, Vec<u8>)> {
    stored_keys(storage)
        .into_iter()
        .filter(|k| !k.contains(".s3s") && !k.ends_with(".tmp"))
        .map(|k| {
            let bytes = std::fs::read(storage.object_file(&k)).unwrap();
            (k, bytes)
        })
        .collect()
}

fn contains(hay: &[u8], needle: &str) -> bool {
    hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}

fn identity_file(dir: &TestDir, name: &str, parts: &[&Path]) -> PathBuf {
    let text: String = parts
        .iter()
        .map(|p| std::fs::read_to_string(p).unwrap())
        .collect();
    let path = dir.path().join(name);
    std::fs::write(&path, text).unwrap();
    give_to_postgres(&path);
    path
}

fn restore(
    dir: &TestDir,
    storage: &Storage,
    bin: &Path,
    name: &str,
    identity: Option<&Path>,
    args: &[&str],
) -> (PathBuf, std::process::Output) {
    let target = dir.path().join(name);
    let mut full = vec!["restore", "--target-dir", target.to_str().unwrap()];
    full.extend_from_slice(args);
    let env: Vec<(String, String)> = identity
        .map(|p| {
            vec![(
                "PGKEEP_ENCRYPTION_IDENTITY_FILE".to_string(),
                p.display().to_string(),
            )]
        })
        .unwrap_or_default();
    give_to_postgres(dir.path());
    let out = storage.pgkeep_pg(bin, &full, &env);
    (target, out)
}

fn rows(pg: &PgCluster) -> String {
    pg.table_checksum("secrets")
}

fn encrypted_life(backend: Backend) {
    let dir = TestDir::new("encryption");
    let storage = Storage::new(backend, &dir);
    let bin = dir.install_pgkeep();
    let (key_a, id_a) = keygen(&bin, &dir, "a.key");
    let (key_b, id_b) = keygen(&bin, &dir, "b.key");
    let (_, id_c) = keygen(&bin, &dir, "c.key");
    let fast = [
        ("PGKEEP_STATUS_INTERVAL_SECS", "1"),
        ("PGKEEP_PARTIAL_UPLOAD_SECS", "1"),
    ];
    let mut pg = PgCluster::init(dir.path(), "primary", 1, &storage.env);
    // Segments stay in pg_wal, to compare stored ones with.
    pg.set(&[("wal_keep_size", "'1GB'")]);
    pg.start();
    pg.psql("create table secrets (id int, v text)");

    // 1. Plain.
    let daemon = Daemon::start(&dir, &storage, &bin, &pg, &fast);
    insert_markers(&pg, MARKERS[0]);
    let backup = |extra: &[(String, String)]| {
        let mut env = pg.client_env();
        env.extend(extra.iter().cloned());
        let out = storage.pgkeep_pg(&bin, &["backup"], &env);
        assert!(out.status.success(), "backup: {}", stderr(&out));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let plain_backup = backup(&[]);
    daemon.wal_switch(&storage, &bin, &pg);
    drop(daemon);
    let plain = snapshot(&storage);
    assert!(
        plain.iter().any(|(_, b)| contains(b, MARKERS[0])),
        "the marker is not visible in plain objects: this scan could not find it"
    );

    // 2. Under A; then 3. under B. Neither the daemon nor `backup` has an identity.
    let mut backups = vec![plain_backup];
    let mut before_b_rows = String::new();
    for (i, key) in [&key_a, &key_b].into_iter().enumerate() {
        let recipients = ("PGKEEP_ENCRYPTION_RECIPIENTS", key.as_str());
        let mut env = fast.to_vec();
        env.push(recipients);
        let daemon = Daemon::start(&dir, &storage, &bin, &pg, &env);
        insert_markers(&pg, MARKERS[i + 1]);
        backups.push(backup(&[(recipients.0.into(), recipients.1.into())]));
        if i == 1 {
            before_b_rows = rows(&pg);
            pg.psql("select pg_create_restore_point('before_more')");
            pg.psql("insert into secrets values (-1, 'after the restore point')");
        }
        daemon.wal_switch(&storage, &bin, &pg);
        drop(daemon);
    }
    let final_rows = rows(&pg);

    // `list` (no identity) says which key each backup needs, newest first.
    let out = storage.pgkeep_pg(&bin, &["list", "--json"], &[]);
    assert!(out.status.success(), "list: {}", stderr(&out));
    let inv: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let fp = |k: &str| {
        use pgkeep::storage::crypt;
        crypt::fingerprint_hex(&crypt::fingerprint(&crypt::parse_recipient(k).unwrap()))
    };
    let listed: Vec<(String, serde_json::Value)> = inv["backups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["id"].as_str().unwrap().to_string(),
                b["encrypted_to"].clone(),
            )
        })
        .collect();
    assert_eq!(
        listed,
        vec![
            (backups[2].clone(), serde_json::json!([fp(&key_b)])),
            (backups[1].clone(), serde_json::json!([fp(&key_a)])),
            (backups[0].clone(), serde_json::Value::Null),
        ]
    );

    // No new or rewritten object holds a marker, and each holding content is encrypted.
    let mut encrypted_wal = None;
    let mut checked = 0;
    for (key, bytes) in snapshot(&storage) {
        if plain.iter().any(|(k, b)| *k == key && *b == bytes) {
            continue;
        }
        checked += 1;
        for m in MARKERS {
            assert!(!contains(&bytes, m), "{key} holds the marker {m}");
        }
        if key.ends_with(".json") {
            continue;
        }
        assert_eq!(&bytes[0..4], b"PGKO", "{key}");
        assert_eq!(bytes[6], 1, "{key} is not encrypted");
        let name = key.rsplit('/').next().unwrap();
        if name.len() == 24 && key.contains("/wal/") && encrypted_wal.is_none() {
            encrypted_wal = Some((name.to_string(), bytes));
        }
    }
    assert!(checked > 5, "only {checked} objects were written encrypted");

    // By hand: the age tool decrypts it, and it decodes to Postgres' own segment.
    let (seg, stored) = encrypted_wal.expect("an encrypted WAL segment");
    let body = dir.path().join("body.age");
    std::fs::write(&body, &stored[64..]).unwrap();
    let decrypted = dir.path().join("body");
    for id in [&id_a, &id_b] {
        let out = Command::new("age")
            .arg("-d")
            .arg("-i")
            .arg(id)
            .arg("-o")
            .arg(&decrypted)
            .arg(&body)
            .output()
            .unwrap();
        if out.status.success() {
            break;
        }
    }
    let codec = pgkeep::codec::Codec::from_id(stored[5]).unwrap();
    let plain_seg =
        pgkeep::codec::decode(codec, &std::fs::read(&decrypted).unwrap(), 1 << 30).unwrap();
    assert_eq!(
        plain_seg,
        std::fs::read(pg.data.join("pg_wal").join(&seg)).unwrap(),
        "{seg} decrypted by age differs from Postgres' own"
    );

    // wal-fetch: 126 without an identity and with a wrong one, each naming the problem.
    let dest = dir.path().join("fetched");
    let both = identity_file(&dir, "ab.keys", &[&id_a, &id_b]);
    let fetch = |identity: Option<&Path>, listen: Option<u16>| {
        let mut extra = vec![];
        let id_text;
        if let Some(p) = identity {
            id_text = p.display().to_string();
            extra.push(("PGKEEP_ENCRYPTION_IDENTITY_FILE", id_text.as_str()));
        }
        let listen_text = listen.map(|p| format!("127.0.0.1:{p}"));
        let pgdata = pg.data.display().to_string();
        if let Some(l) = &listen_text {
            // The daemon is asked for the cluster the data directory names.
            extra.push(("PGKEEP_LISTEN", l.as_str()));
            extra.push(("PGDATA", pgdata.as_str()));
        }
        storage.pgkeep_in(
            &bin,
            &["wal-fetch", &seg, dest.to_str().unwrap()],
            None,
            &extra,
        )
    };
    let out = fetch(None, None);
    assert_eq!(out.status.code(), Some(126), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("no identity is configured"),
        "{}",
        stderr(&out)
    );
    let out = fetch(Some(&id_c), None);
    assert_eq!(out.status.code(), Some(126), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("none of which matches"),
        "{}",
        stderr(&out)
    );
    assert!(!dest.exists());
    // Through the daemon, which has the recipient and no identity: it hands over the stored object.
    let daemon = Daemon::start(
        &dir,
        &storage,
        &bin,
        &pg,
        &[("PGKEEP_ENCRYPTION_RECIPIENTS", key_b.as_str())],
    );
    let out = fetch(Some(&both), Some(daemon.port));
    assert!(out.status.success(), "{}", stderr(&out));
    let log = stderr(&out);
    assert!(
        log.contains("via=\"daemon\"") || log.contains("via=daemon"),
        "not served by the daemon: {log}"
    );
    assert_eq!(std::fs::read(&dest).unwrap(), plain_seg);
    drop(daemon);
    drop(pg);

    // Restore without an identity: a clear error, nothing left behind.
    let (target, out) = restore(&dir, &storage, &bin, "no-key", None, &[]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("no identity is configured"),
        "{}",
        stderr(&out)
    );
    assert!(!target.join("PG_VERSION").exists());
    // With B alone, the backup under A is refused, naming what it needs.
    let only_b = identity_file(&dir, "b-only.keys", &[&id_b]);
    let (_, out) = restore(
        &dir,
        &storage,
        &bin,
        "only-b",
        Some(&only_b),
        &["--backup", &backups[1]],
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("none of which matches"),
        "{}",
        stderr(&out)
    );

    // With both keys: the plain backup to latest (through plain WAL, WAL under A and under B),
    // the backup under A to latest, and PITR from the newest (under B) to the restore point.
    let cases: [(&str, [&str; 2], &String); 3] = [
        ("from-plain", ["--backup", &backups[0]], &final_rows),
        ("from-a", ["--backup", &backups[1]], &final_rows),
        ("pitr", ["--target-name", "before_more"], &before_b_rows),
    ];
    for (name, args, want) in cases {
        let (target, out) = restore(&dir, &storage, &bin, name, Some(&both), &args);
        assert!(out.status.success(), "restore {name}: {}", stderr(&out));
        let c = start_restored(&dir, &storage, target);
        assert_eq!(rows(&c), *want, "{name}");
    }
}

#[test]
fn encrypted_life_on_the_default_file_storage() {
    encrypted_life(Backend::File);
}

#[test]
fn encrypted_life_on_s3() {
    encrypted_life(Backend::S3);
}
