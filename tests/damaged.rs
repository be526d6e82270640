//! Damaged objects, on both storage backends: a WAL segment, the daemon's streamed `.partial`, a
//! `.history` file, a backup chunk, a backup manifest and `backup.json`, each with a byte flipped,
//! truncated to half, emptied, and deleted. Every reader names the object: `wal-fetch` exits 126
//! for damage (1 only for a file that is not there, the answer that ends recovery), restore
//! refuses, `list` and `verify` report it; repaired, everything reads again.

mod common;

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use common::*;

#[derive(Clone, Copy, Debug)]
enum Damage {
    Flip,
    Truncate,
    Empty,
    Delete,
}

impl Damage {
    fn apply(self, file: &Path) {
        match self {
            Damage::Flip => {
                let mut b = std::fs::read(file).unwrap();
                let at = b.len() / 2;
                b[at] ^= 0x20;
                std::fs::write(file, b).unwrap();
            }
            Damage::Truncate => {
                let b = std::fs::read(file).unwrap();
                std::fs::write(file, &b[..b.len() / 2]).unwrap();
            }
            Damage::Empty => std::fs::write(file, b"").unwrap(),
            Damage::Delete => std::fs::remove_file(file).unwrap(),
        }
    }
}

/// What a reader must answer for a damaged object.
enum Reader {
    /// `wal-fetch NAME`: 126 naming the key (1 when deleted).
    WalFetch(String),
    /// `restore`: fails naming the key.
    Restore,
    /// `list`: fails naming the key (a deleted `backup.json`: the backup is not listed).
    List,
}

fn code(out: &Output) -> i32 {
    out.status.code().unwrap_or(-1)
}

fn damaged(backend: Backend) {
    let dir = TestDir::new("damaged");
    let storage = Storage::new(backend, &dir);
    let bin = dir.install_pgkeep();
    let mut pg = archiving_cluster(&dir, &storage, &bin, "primary", 1);
    pg.start();
    pg.psql("create table t as select generate_series(1, 5000) g");
    let out = storage.pgkeep_pg(&bin, &["backup"], &pg.client_env());
    assert!(out.status.success(), "backup: {}", stderr(&out));
    let backup = String::from_utf8_lossy(&out.stdout).trim().to_string();
    pg.psql("insert into t select generate_series(1, 5000)");
    pg.switch_and_wait_archived();
    pg.psql("insert into t select generate_series(1, 5000)");
    pg.switch_and_wait_archived();

    // The daemon's streamed .partial of the open segment (kill -9 leaves it in storage).
    let mut daemon = Daemon::start(
        &dir,
        &storage,
        &bin,
        &pg,
        &[("PGKEEP_PARTIAL_UPLOAD_SECS", "1")],
    );
    pg.psql("insert into t select generate_series(1, 100)");
    let partial = wait_for("a streamed .partial", Duration::from_secs(60), || {
        stored_keys(&storage)
            .into_iter()
            .find(|k| k.contains("/streaming/") && k.ends_with(".partial"))
    });
    daemon.signal("KILL");
    daemon.wait(Duration::from_secs(10));
    // Killed too, so that its open segment is never archived whole: only the .partial holds it.
    pg.kill9();

    // A history file, archived as Postgres archives one.
    let history = dir.path().join("00000002.history");
    std::fs::write(&history, "1\t0/3000000\tno recovery target specified\n").unwrap();
    give_to_postgres(&history);
    let mut env = pg.client_env();
    env.push(("PGDATA".into(), pg.data.display().to_string()));
    let out = storage.pgkeep_pg(&bin, &["archive-push", history.to_str().unwrap()], &env);
    assert!(out.status.success(), "{}", stderr(&out));

    let keys = stored_keys(&storage);
    let find = |pred: &dyn Fn(&str) -> bool| -> String {
        keys.iter()
            .find(|k| pred(k))
            .unwrap_or_else(|| panic!("not stored: {keys:?}"))
            .clone()
    };
    let segments: Vec<&String> = keys
        .iter()
        .filter(|k| k.contains("/wal/00000001/") && k.len() - k.rfind('/').unwrap() == 25)
        .collect();
    // In the middle of the chain after the backup: deleted, it is a gap verify must name.
    let segment = segments[segments.len() - 2].clone();
    let name = |k: &str| k.rsplit('/').next().unwrap().to_string();
    let partial_segment = name(&partial).trim_end_matches(".partial").to_string();
    let cases: Vec<(String, Reader)> = vec![
        (segment.clone(), Reader::WalFetch(name(&segment))),
        (partial.clone(), Reader::WalFetch(partial_segment)),
        (
            find(&|k| k.ends_with("/00000002.history")),
            Reader::WalFetch("00000002.history".into()),
        ),
        (
            find(&|k| k.contains(&format!("basebackups/{backup}/data/base/"))),
            Reader::Restore,
        ),
        (
            find(&|k| k.ends_with(&format!("basebackups/{backup}/backup_manifest"))),
            Reader::Restore,
        ),
        (
            find(&|k| k.ends_with(&format!("basebackups/{backup}/backup.json"))),
            Reader::List,
        ),
    ];
    let dest = dir.path().join("fetched");
    let mut checked = 0;
    for (key, reader) in &cases {
        let file = storage.object_file(key);
        let saved = std::fs::read(&file).unwrap();
        for damage in [
            Damage::Flip,
            Damage::Truncate,
            Damage::Empty,
            Damage::Delete,
        ] {
            damage.apply(&file);
            let what = format!("{key} {damage:?}");
            let deleted = matches!(damage, Damage::Delete);
            match reader {
                Reader::WalFetch(wal) => {
                    let out = storage.pgkeep(&bin, &["wal-fetch", wal, dest.to_str().unwrap()]);
                    if deleted {
                        assert_eq!(code(&out), 1, "{what}: {}", stderr(&out));
                    } else {
                        assert_eq!(code(&out), 126, "{what}: {}", stderr(&out));
                        assert!(
                            stderr(&out).contains(key.as_str()),
                            "{what}: {}",
                            stderr(&out)
                        );
                    }
                    assert!(!dest.exists(), "{what}: a damaged file reached %p");
                }
                Reader::Restore => {
                    let target = dir.path().join(format!("restore-{checked}"));
                    let out = storage.pgkeep_pg(
                        &bin,
                        &["restore", "--target-dir", target.to_str().unwrap()],
                        &[],
                    );
                    assert!(!out.status.success(), "{what}: restored");
                    assert!(
                        stderr(&out).contains(key.as_str()),
                        "{what}: {}",
                        stderr(&out)
                    );
                    assert!(
                        !target.join("PG_VERSION").exists(),
                        "{what}: the failed restore looks like a cluster"
                    );
                }
                Reader::List => {
                    let out = storage.pgkeep(&bin, &["list"]);
                    if deleted {
                        assert!(out.status.success(), "{what}: {}", stderr(&out));
                        assert!(
                            !String::from_utf8_lossy(&out.stdout).contains(&backup),
                            "{what}: a backup without its backup.json is listed"
                        );
                    } else {
                        assert!(!out.status.success(), "{what}: listed");
                        assert!(
                            stderr(&out).contains(key.as_str()),
                            "{what}: {}",
                            stderr(&out)
                        );
                    }
                }
            }
            // verify names the object (a deleted backup.json leaves no backup to check: it says
            // so).
            // Nothing says the newest .partial or a history file must exist: deleted, they are
            // no gap.
            let optional = key == &partial || key.ends_with(".history");
            let out = storage.pgkeep(&bin, &["verify"]);
            let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), stderr(&out));
            if deleted && optional {
                std::fs::write(&file, &saved).unwrap();
                give_to_postgres(&file);
                checked += 1;
                continue;
            }
            assert_eq!(code(&out), 1, "verify, {what}: {text}");
            let named = if deleted && matches!(reader, Reader::List) {
                "storage holds no base backup".to_string()
            } else {
                key.clone()
            };
            assert!(
                text.lines()
                    .any(|l| l.starts_with("PROBLEM") && l.contains(&named)),
                "verify, {what}: {text}"
            );
            std::fs::write(&file, &saved).unwrap();
            give_to_postgres(&file);
            checked += 1;
        }
    }
    assert_eq!(checked, 24);
    // Repaired: everything reads.
    let out = storage.pgkeep(&bin, &["verify"]);
    assert_eq!(
        code(&out),
        0,
        "after the repairs: {}{}",
        String::from_utf8_lossy(&out.stdout),
        stderr(&out)
    );
    let target = dir.mkdir("restored");
    let out = storage.pgkeep_pg(
        &bin,
        &["restore", "--target-dir", target.to_str().unwrap()],
        &[],
    );
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn file_storage_damaged_objects() {
    damaged(Backend::File);
}

#[test]
fn s3_storage_damaged_objects() {
    damaged(Backend::S3);
}
