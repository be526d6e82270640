//! `pgkeep verify` on both storage backends, on an encrypted archive with two timelines (a
//! restored copy promoted and archiving into the same storage): it passes on healthy storage
//! with the identity (without it, it says the timeline switch points are unreadable), and fails with exit 1 naming the object for a WAL segment
//! deleted from the middle of the chain, a deleted backup chunk, a flipped byte in a chunk and a
//! missing `.history` file, and (with the identity) a manifest that lists another size than the
//! chunks hold; each repaired, it passes again.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;

fn hex_string(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Does something bad to the file of a stored object.
type Fault = Box<dyn Fn(&Path)>;

fn verify(storage: &Storage, bin: &Path, identity: Option<&Path>) -> (i32, String) {
    let id = identity.map(|p| p.display().to_string());
    let mut extra = vec![];
    if let Some(id) = &id {
        extra.push(("PGKEEP_ENCRYPTION_IDENTITY_FILE", id.as_str()));
    }
    let out = storage.pgkeep_in(bin, &["verify"], None, &extra);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    (
        out.status.code().unwrap_or(-1),
        format!("{text}{}", stderr(&out)),
    )
}

fn verify_life(backend: Backend) {
    let dir = TestDir::new("verify");
    let storage = Storage::new(backend, &dir);
    let bin = dir.install_pgkeep();
    let key = dir.path().join("id.key");
    let out = Command::new(&bin)
        .args(["keygen", "-o"])
        .arg(&key)
        .output()
        .unwrap();
    let recipient = stderr(&out)
        .trim()
        .trim_start_matches("Public key: ")
        .to_string();
    give_to_postgres(&key);
    // Everything archives encrypted; only restore and restore_command get the identity.
    std::fs::write(
        &storage.config,
        format!(
            "storage = \"{}\"\nencryption_recipients = [\"{recipient}\"]\n",
            storage.url
        ),
    )
    .unwrap();
    let mut pg = archiving_cluster(&dir, &storage, &bin, "primary", 1);
    pg.start();
    pg.psql("create table t as select generate_series(1, 50000) g");
    let out = storage.pgkeep_pg(&bin, &["backup"], &pg.client_env());
    assert!(out.status.success(), "backup: {}", stderr(&out));
    let backup = String::from_utf8_lossy(&out.stdout).trim().to_string();
    for _ in 0..4 {
        pg.psql("insert into t select generate_series(1, 20000)");
        pg.switch_and_wait_archived();
    }
    pg.stop("fast");

    // Timeline 2: a restored copy, promoted, archiving into the same storage.
    let target = dir.mkdir("copy");
    let id_env = vec![(
        "PGKEEP_ENCRYPTION_IDENTITY_FILE".to_string(),
        key.display().to_string(),
    )];
    let out = storage.pgkeep_pg(
        &bin,
        &["restore", "--target-dir", target.to_str().unwrap()],
        &id_env,
    );
    assert!(out.status.success(), "restore: {}", stderr(&out));
    let mut copy = PgCluster::adopt(dir.path(), target, &storage.env);
    copy.start();
    copy.wait_promoted();
    copy.psql("insert into t select generate_series(1, 20000)");
    copy.switch_and_wait_archived();
    drop(copy);

    let keys = stored_keys(&storage);
    let history = keys
        .iter()
        .find(|k| k.ends_with("/wal/00000002/00000002.history"))
        .expect("timeline 2's history is stored")
        .clone();
    let tl1: Vec<&String> = keys
        .iter()
        .filter(|k| k.contains("/wal/00000001/") && k.len() - k.rfind('/').unwrap() == 25)
        .collect();
    let chunk = keys
        .iter()
        .find(|k| k.contains(&format!("basebackups/{backup}/data/base/")))
        .expect("a chunk")
        .clone();

    // Healthy. Without the identity every stored byte is checked, but the encrypted .history
    // files hide the switch points: it says that continuity across timelines is unverified
    // (exit 1) rather than guess.
    let (code, text) = verify(&storage, &bin, None);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("stored bytes only"), "{text}");
    assert!(
        text.contains("continuity across timelines was not verified"),
        "{text}"
    );
    assert_eq!(
        text.lines().filter(|l| l.starts_with("PROBLEM")).count(),
        1,
        "{text}"
    );
    assert!(
        text.contains(&format!("backup {backup} restores")),
        "{text}"
    );
    let (code, text) = verify(&storage, &bin, Some(&key));
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains("content decoded") && text.contains("timelines by history files"),
        "{text}"
    );

    // Each fault: exit 1 naming the object; repaired, verify passes again.
    // After the backup's start (four segments were archived after it), before the switch.
    let middle = tl1[tl1.len() - 2].clone();
    let faults: Vec<(&str, String, Fault)> = vec![
        (
            "missing from the WAL chain",
            middle,
            Box::new(|p: &Path| std::fs::remove_file(p).unwrap()),
        ),
        (
            "missing",
            chunk.clone(),
            Box::new(|p: &Path| std::fs::remove_file(p).unwrap()),
        ),
        (
            "damaged",
            chunk.clone(),
            Box::new(|p: &Path| {
                let mut b = std::fs::read(p).unwrap();
                let at = b.len() / 2;
                b[at] ^= 0x10;
                std::fs::write(p, b).unwrap();
            }),
        ),
        (
            "has WAL but no history file",
            history,
            Box::new(|p: &Path| std::fs::remove_file(p).unwrap()),
        ),
    ];
    for (what, key_name, fault) in faults {
        let file = storage.object_file(&key_name);
        let saved = std::fs::read(&file).unwrap();
        fault(&file);
        for identity in [None, Some(key.as_path())] {
            let (code, text) = verify(&storage, &bin, identity);
            assert_eq!(
                code, 1,
                "{key_name} ({what}), identity {identity:?}: {text}"
            );
            let line = text
                .lines()
                .find(|l| l.starts_with("PROBLEM") && l.contains(key_name.as_str()))
                .unwrap_or_else(|| panic!("{key_name} not named: {text}"));
            assert!(line.contains(what), "{line}");
        }
        std::fs::write(&file, saved).unwrap();
        give_to_postgres(&file);
        let (code, text) = verify(&storage, &bin, Some(&key));
        assert_eq!(code, 0, "after repairing {key_name}: {text}");
    }

    // A manifest that does not list what the chunks hold (rewritten, with backup.json updated to
    // name it, as a forger would): with the identity the files are compared and the difference
    // named; without it the manifest cannot be read, and only its checksum is checked.
    let manifest_key = keys
        .iter()
        .find(|k| k.ends_with(&format!("basebackups/{backup}/backup_manifest")))
        .expect("the manifest")
        .clone();
    let meta_key = keys
        .iter()
        .find(|k| k.ends_with(&format!("basebackups/{backup}/backup.json")))
        .expect("backup.json")
        .clone();
    let sealer = pgkeep::storage::Keys::from_settings(&pgkeep::storage::EncryptionSettings {
        recipients: vec![recipient.clone()],
        identity_file: Some(key.clone()),
    })
    .unwrap();
    let (manifest_file, meta_file) = (
        storage.object_file(&manifest_key),
        storage.object_file(&meta_key),
    );
    let (saved_manifest, saved_meta) = (
        std::fs::read(&manifest_file).unwrap(),
        std::fs::read(&meta_file).unwrap(),
    );
    let (header, plain) = pgkeep::storage::object::open(&saved_manifest, &sealer).unwrap();
    let text = String::from_utf8(plain).unwrap();
    let forged = text.replacen(
        "\"Path\": \"PG_VERSION\", \"Size\": 3,",
        "\"Path\": \"PG_VERSION\", \"Size\": 4,",
        1,
    );
    assert_ne!(forged, text, "PG_VERSION not found in the manifest");
    let (new_header, sealed) =
        pgkeep::storage::object::seal(header.codec, forged.as_bytes(), &sealer);
    let (_, meta_plain) = pgkeep::storage::object::open(&saved_meta, &Default::default()).unwrap();
    let mut meta: serde_json::Value = serde_json::from_slice(&meta_plain).unwrap();
    meta["manifest_sha256"] = hex_string(&new_header.checksum).into();
    let (_, meta_sealed) = pgkeep::storage::object::seal(
        pgkeep::codec::Codec::None,
        &serde_json::to_vec(&meta).unwrap(),
        &Default::default(),
    );
    std::fs::write(&manifest_file, sealed).unwrap();
    std::fs::write(&meta_file, meta_sealed).unwrap();
    let (code, text) = verify(&storage, &bin, Some(&key));
    assert_eq!(code, 1, "{text}");
    let line = text
        .lines()
        .find(|l| l.starts_with("PROBLEM") && l.contains(&manifest_key))
        .unwrap_or_else(|| panic!("the manifest is not named: {text}"));
    assert!(
        line.contains("PG_VERSION is 3 bytes in the backup but 4 in the manifest"),
        "{line}"
    );
    let (_, text) = verify(&storage, &bin, None);
    assert!(!text.contains("PG_VERSION"), "{text}");
    std::fs::write(&manifest_file, saved_manifest).unwrap();
    std::fs::write(&meta_file, saved_meta).unwrap();
    give_to_postgres(&manifest_file);
    give_to_postgres(&meta_file);
    let (code, text) = verify(&storage, &bin, Some(&key));
    assert_eq!(code, 0, "after repairing the manifest: {text}");

    // Could not run at all: exit 2.
    let out = storage.pgkeep_in(&bin, &["verify", "--backup", "nonsense"], None, &[]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
}

#[test]
fn verify_on_the_default_file_storage() {
    verify_life(Backend::File);
}

#[test]
fn verify_on_s3() {
    verify_life(Backend::S3);
}
