//! `pgkeep verify --restore-drill DIR` on both storage backends: the newest backup restored, started,
//! recovered through the stored WAL and promoted, queried, stopped and removed, each step timed
//! (exit 0); with a WAL segment the newest backup needs deleted from storage, the drill fails with
//! exit 1 naming it, and still leaves nothing behind; an existing empty folder is kept (emptied);
//! a directory that is not empty, a link, or a run as root is refused with exit 2 before anything
//! is touched.

mod common;

use std::path::Path;

use common::*;

fn drill(storage: &Storage, bin: &Path, dir: &Path, json: bool) -> (i32, String, String) {
    let mut args = vec!["verify", "--restore-drill", dir.to_str().unwrap()];
    if json {
        args.push("--json");
    }
    let bin_dir = server_bin_dir(default_major());
    let out = storage.pgkeep_pg(
        bin,
        &args,
        &[(
            "PGKEEP_PG_BIN_DIR".to_string(),
            bin_dir.display().to_string(),
        )],
    );
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr(&out),
    )
}

fn drills(backend: Backend) {
    let dir = TestDir::new("drill");
    let storage = Storage::new(backend, &dir);
    let bin = dir.install_pgkeep();
    let mut pg = archiving_cluster(&dir, &storage, &bin, "primary", 1);
    pg.start();
    pg.psql("create table t as select generate_series(1, 20000) g");
    let out = storage.pgkeep_pg(&bin, &["backup"], &pg.client_env());
    assert!(out.status.success(), "backup: {}", stderr(&out));
    let backup = String::from_utf8_lossy(&out.stdout).trim().to_string();
    // WAL after the backup: the drill replays it.
    pg.psql("create table after_backup as select generate_series(1, 5000) g");
    pg.switch_and_wait_archived();
    let archived_to = parse_lsn(&pg.psql("select pg_current_wal_lsn()"));

    // The drill restores into a directory of its own (beside others the user has).
    let parent = dir.mkdir("drills");
    let target = parent.join("copy");
    let (code, stdout, err) = drill(&storage, &bin, &target, true);
    assert_eq!(code, 0, "{stdout}\n{err}");
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(report["ok"], true, "{report}");
    assert_eq!(report["backup"], backup.as_str(), "{report}");
    let steps: Vec<&str> = report["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        steps,
        ["restore", "start", "recover", "query", "stop", "remove"],
        "{report}"
    );
    for s in report["steps"].as_array().unwrap() {
        assert_eq!(s["ok"], true, "{report}");
        assert!(s["seconds"].as_f64().unwrap() >= 0.0, "{report}");
    }
    // Recovery went through the WAL archived after the backup.
    let recovered = parse_lsn(report["recovered_to_lsn"].as_str().unwrap());
    assert!(
        recovered >= archived_to,
        "recovered to {recovered:X}, WAL archived to {archived_to:X}"
    );
    assert!(!target.exists(), "the drill left {}", target.display());
    assert_eq!(
        std::fs::read_dir(&parent).unwrap().count(),
        0,
        "the drill left files beside its directory"
    );
    // The promoted copy archived nothing: storage holds one timeline.
    assert!(
        !stored_keys(&storage)
            .iter()
            .any(|k| k.ends_with(".history") || k.contains("/00000002")),
        "the drill wrote to the archive"
    );

    // Text output: each step timed, then the verdict.
    let (code, stdout, err) = drill(&storage, &bin, &target, false);
    eprintln!("{stdout}");
    assert_eq!(code, 0, "{stdout}\n{err}");
    for step in ["restore", "start", "recover", "query", "stop", "remove"] {
        assert!(
            stdout.contains(&format!("drill step {step}")),
            "{step}: {stdout}"
        );
    }
    assert!(stdout.contains("restore drill: backup"), "{stdout}");
    assert!(stdout.trim_end().ends_with("OK"), "{stdout}");

    // The newest backup's own WAL deleted: the drill fails, naming it, and cleans up.
    let meta: serde_json::Value = {
        let out = storage.pgkeep(&bin, &["list", "--json"]);
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let start_lsn = parse_lsn(meta["backups"][0]["start_lsn"].as_str().unwrap());
    // 1 MiB segments: 4096 of them per 4 GiB.
    let segment = format!(
        "00000001{:08X}{:08X}",
        start_lsn >> 32,
        (start_lsn >> 20) & 0xFFF
    );
    let key = stored_keys(&storage)
        .into_iter()
        .find(|k| k.ends_with(&format!("/wal/00000001/{segment}")))
        .unwrap_or_else(|| panic!("no stored {segment}"));
    let file = storage.object_file(&key);
    let saved = std::fs::read(&file).unwrap();
    std::fs::remove_file(&file).unwrap();
    let (code, stdout, err) = drill(&storage, &bin, &target, false);
    eprintln!("{stdout}");
    assert_eq!(code, 1, "{stdout}\n{err}");
    assert!(stdout.contains("restore drill FAILED"), "{stdout}");
    assert!(
        stdout.contains(&segment) || err.contains(&segment),
        "the failure does not name {segment}: {stdout}\n{err}"
    );
    assert!(stdout.contains("drill step restore"), "{stdout}");
    assert!(
        !target.exists(),
        "the failed drill left {}",
        target.display()
    );
    assert_eq!(std::fs::read_dir(&parent).unwrap().count(), 0);
    std::fs::write(&file, saved).unwrap();
    give_to_postgres(&file);

    // An empty folder that exists (a volume's mount point, say) is kept, and emptied.
    let mount = dir.mkdir("mounted");
    let (code, stdout, err) = drill(&storage, &bin, &mount, false);
    assert_eq!(code, 0, "{stdout}\n{err}");
    assert!(mount.is_dir(), "the drill removed the folder it was given");
    assert_eq!(std::fs::read_dir(&mount).unwrap().count(), 0);
    // A link is refused: the drill would write through it and remove only the link.
    let link = dir.path().join("link");
    std::os::unix::fs::symlink(dir.mkdir("elsewhere"), &link).unwrap();
    let (code, _, err) = drill(&storage, &bin, &link, false);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("a link is refused"), "{err}");

    // Refused before anything is touched: a directory that holds something.
    let busy = dir.mkdir("busy");
    std::fs::write(busy.join("keep.txt"), "mine").unwrap();
    give_to_postgres(&busy);
    let (code, _, err) = drill(&storage, &bin, &busy, false);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("not empty"), "{err}");
    assert_eq!(
        std::fs::read_to_string(busy.join("keep.txt")).unwrap(),
        "mine"
    );
    if is_root() {
        let out = storage.pgkeep(
            &bin,
            &["verify", "--restore-drill", target.to_str().unwrap()],
        );
        assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
        assert!(
            stderr(&out).contains("does not run as root"),
            "{}",
            stderr(&out)
        );
        assert!(!target.exists());
    }
    pg.stop("fast");
}

#[test]
fn file_storage_drill() {
    drills(Backend::File);
}

#[test]
fn s3_storage_drill() {
    drills(Backend::S3);
}
