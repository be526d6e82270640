//! `pgkeep verify` on both storage backends, on an encrypted archive with two timelines (a
//! restored copy promoted and archiving into the same storage): it passes on healthy storage
//! with the identity (without it, it says the timeline switch points are unreadable), and fails with exit 1 naming the object for a WAL segment
//! deleted from the middle of the chain, a deleted backup chunk, a flipped byte in a chunk and a
//! missing `.history` file; each repaired, it passes again.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;

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
