//! Durability on `file://` storage, seen from the system calls: pgkeep runs under `strace`, and the
//! order of its syncs, renames and creations is checked. A base backup's chunks are synced (one
//! syncfs) before `backup.json` names them; a restore syncs its files before it removes its
//! in-progress marker; `archive-push` syncs the object it stored before it exits 0.

mod common;

use std::path::Path;

use common::*;

/// Runs `bin args` as the postgres user under strace; the calls it made, one per line.
fn traced(
    storage: &Storage,
    bin: &Path,
    args: &[&str],
    env: &[(String, String)],
    log: &Path,
) -> Vec<String> {
    let mut all = storage.env.clone();
    all.extend(env.iter().cloned());
    let out = as_postgres("strace", &all)
        .args(["-f", "-qq", "-s", "256", "-o"])
        .arg(log)
        .args([
            "-e",
            "trace=fsync,fdatasync,syncfs,rename,renameat,renameat2,openat,unlink,unlinkat",
        ])
        .arg(bin)
        .arg("--config")
        .arg(&storage.config)
        .args(args)
        .current_dir("/")
        .output()
        .unwrap();
    assert!(out.status.success(), "{args:?}: {}", stderr(&out));
    std::fs::read_to_string(log)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

/// The index of the first call line that matches all `needles`.
fn first(calls: &[String], needles: &[&str]) -> Option<usize> {
    calls
        .iter()
        .position(|l| needles.iter().all(|n| l.contains(n)))
}

fn last(calls: &[String], needles: &[&str]) -> Option<usize> {
    calls
        .iter()
        .rposition(|l| needles.iter().all(|n| l.contains(n)))
}

#[test]
fn file_storage_syncs_before_anything_names_what_it_wrote() {
    let dir = TestDir::new("durability");
    let storage = Storage::new(Backend::File, &dir);
    let bin = dir.install_pgkeep();
    let mut pg = archiving_cluster(&dir, &storage, &bin, "primary", 1);
    pg.start();
    pg.psql("create table t as select g, md5(g::text) from generate_series(1, 50000) g");

    // A base backup: the last chunk is in place, then a syncfs, then backup.json is created.
    let backup = traced(
        &storage,
        &bin,
        &["backup"],
        &pg.client_env(),
        &dir.path().join("backup.trace"),
    );
    let chunk = last(&backup, &["rename", "/data/base/"]).expect("chunks were stored by rename");
    let meta = first(&backup, &["openat", "backup.json", "O_CREAT"]).expect("backup.json written");
    let sync = backup[chunk..meta]
        .iter()
        .position(|l| l.contains("syncfs("))
        .unwrap_or_else(|| {
            panic!(
                "no syncfs between the last chunk and backup.json:\n{}",
                backup[chunk..=meta].join("\n")
            )
        });
    assert!(chunk + sync < meta);
    // And backup.json itself is synced before the command ends.
    let meta_rename =
        last(&backup, &["rename", "backup.json"]).expect("backup.json renamed into place");
    assert!(
        backup[meta_rename..].iter().any(|l| l.contains("fsync(")),
        "backup.json is not synced after it is renamed into place"
    );

    // archive-push: the object is synced after it is renamed into place.
    pg.psql("insert into t select g, 'x' from generate_series(1, 1000) g");
    let seg = pg.psql("select pg_walfile_name(pg_current_wal_lsn())");
    pg.psql("select pg_switch_wal()");
    let copy = dir.path().join(&seg);
    std::fs::copy(pg.data.join("pg_wal").join(&seg), &copy).unwrap();
    give_to_postgres(&copy);
    let env = [(
        "PGKEEP_SYSTEM_IDENTIFIER".to_string(),
        pg.psql("select system_identifier from pg_control_system()"),
    )];
    let push = traced(
        &storage,
        &bin,
        &["archive-push", copy.to_str().unwrap()],
        &env,
        &dir.path().join("push.trace"),
    );
    let placed = last(&push, &["rename", &format!("/{seg}")]);
    match placed {
        Some(i) => assert!(
            push[i..].iter().any(|l| l.contains("fsync(")),
            "the archived segment is not synced after its rename:\n{}",
            push[i..].join("\n")
        ),
        // The archiver was quicker: the same content is already stored, which is success too.
        None => assert!(stored_keys(&storage).iter().any(|k| k.ends_with(&seg))),
    }

    // A restore: syncfs, then the marker goes.
    let target = dir.mkdir("restored");
    give_to_postgres(&target);
    let restore = traced(
        &storage,
        &bin,
        &["restore", "--target-dir", target.to_str().unwrap()],
        &[],
        &dir.path().join("restore.trace"),
    );
    let marker =
        last(&restore, &["unlink", ".pgkeep-restore-in-progress"]).expect("the marker is removed");
    let sync = last(&restore, &["syncfs("]).expect("the restore syncs");
    assert!(
        sync < marker,
        "the marker went before the files were synced"
    );
    let version = last(&restore, &["rename", "PG_VERSION"]).expect("PG_VERSION is put in place");
    assert!(version < sync, "PG_VERSION was put in place after the sync");
    pg.stop("fast");
}
