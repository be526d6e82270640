//! Restore as an init container meets it, on both storage backends: re-run on a restored cluster
//! (no-op), an interrupted restore (redone), a non-empty target (refused), no backup (exit 0, or 1
//! with --require-backup), a corrupted chunk (fails, names the object), and a backup killed midway
//! (not listed, not restorable, and the next backup works).

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;

struct Setup {
    dir: TestDir,
    storage: Storage,
    bin: std::path::PathBuf,
    primary: PgCluster,
}

fn setup(backend: Backend, label: &str) -> Setup {
    let dir = TestDir::new(label);
    let storage = Storage::new(backend, &dir);
    let bin = dir.install_pgkeep();
    // Checked with pg_verifybackup: the tools' major.
    let mut primary = archiving_cluster_major(&dir, &storage, &bin, "primary", 1, TOOLS_MAJOR);
    primary.start();
    Setup {
        dir,
        storage,
        bin,
        primary,
    }
}

fn restore(s: &Setup, target: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec!["restore", "--target-dir", target.to_str().unwrap()];
    args.extend_from_slice(extra);
    s.storage.pgkeep_pg(&s.bin, &args, &[])
}

#[track_caller]
fn assert_ok(out: &std::process::Output) -> String {
    assert!(
        out.status.success(),
        "failed ({}): {}",
        out.status,
        stderr(out)
    );
    stderr(out)
}

#[track_caller]
fn assert_fails(out: &std::process::Output, needles: &[&str]) {
    assert!(!out.status.success(), "should have failed: {}", stderr(out));
    for n in needles {
        assert!(
            stderr(out).contains(n),
            "stderr should mention {n:?}: {}",
            stderr(out)
        );
    }
}

/// Table `t` (created with `table_options`) gets rows, a backup is taken, more rows follow and are
/// archived; returns the table's checksum.
fn rows_backup_rows(s: &Setup, table_options: &str) -> String {
    s.primary.psql(&format!(
        "create table t (id serial primary key, v text) {table_options}"
    ));
    s.primary
        .psql("insert into t (v) select md5(g::text) from generate_series(1, 20000) g");
    assert_ok(
        &s.storage
            .pgkeep_pg(&s.bin, &["backup"], &s.primary.client_env()),
    );
    s.primary
        .psql("insert into t (v) select 'after' || g from generate_series(1, 1000) g");
    let expected = s.primary.table_checksum("t");
    s.primary.switch_and_wait_archived();
    expected
}

fn start_and_check(s: &Setup, target: &Path, expected: &str) {
    let c = start_restored(&s.dir, &s.storage, target.to_path_buf());
    assert_eq!(c.table_checksum("t"), expected);
}

fn cases(backend: Backend) {
    let s = setup(backend, "restore-cases");

    // No backup yet: exit 0 with a message (Postgres may initialise a new cluster), or 1 on demand.
    let empty = s.dir.mkdir("empty");
    let out = restore(&s, &empty, &[]);
    assert!(
        assert_ok(&out).contains("no base backup"),
        "{}",
        stderr(&out)
    );
    assert!(
        std::fs::read_dir(&empty).unwrap().next().is_none(),
        "restore wrote into the directory"
    );
    assert_fails(
        &restore(&s, &empty, &["--require-backup"]),
        &["no base backup"],
    );

    let expected = rows_backup_rows(&s, "");

    // A non-empty directory that is not a cluster is refused and left as it was.
    let busy = s.dir.mkdir("busy");
    std::fs::write(busy.join("notes.txt"), "mine").unwrap();
    give_to_postgres(&busy);
    assert_fails(&restore(&s, &busy, &[]), &["not empty", "--overwrite"]);
    assert_eq!(
        std::fs::read_to_string(busy.join("notes.txt")).unwrap(),
        "mine"
    );
    assert_eq!(std::fs::read_dir(&busy).unwrap().count(), 1);
    // ...unless --overwrite says so.
    assert_ok(&restore(&s, &busy, &["--overwrite"]));
    assert!(!busy.join("notes.txt").exists());

    // A restore, then the same init container on the next pod start: a no-op.
    let target = s.dir.mkdir("pgdata");
    assert_ok(&restore(&s, &target, &[]));
    let before = std::fs::read(target.join("postgresql.auto.conf")).unwrap();
    std::fs::write(target.join("sentinel"), "x").unwrap();
    let out = restore(&s, &target, &[]);
    assert!(
        assert_ok(&out).contains("already holds a cluster"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        std::fs::read(target.join("postgresql.auto.conf")).unwrap(),
        before
    );
    assert!(target.join("sentinel").exists());
    std::fs::remove_file(target.join("sentinel")).unwrap();

    // An interrupted restore: the marker is still there and part of the files are missing or junk.
    std::fs::write(target.join(pgkeep::restore::MARKER), "interrupted").unwrap();
    std::fs::remove_dir_all(target.join("base")).unwrap();
    std::fs::write(target.join("global/pg_control"), "torn").unwrap();
    let out = restore(&s, &target, &[]);
    assert!(assert_ok(&out).contains("interrupted"), "{}", stderr(&out));
    assert!(!target.join(pgkeep::restore::MARKER).exists());
    verify_restored(&target);
    start_and_check(&s, &target, &expected);

    // A restore that fails before it writes anything leaves no directory it made.
    let never = s.dir.path().join("never-made");
    assert_fails(
        &restore(&s, &never, &["--backup", "20000101T000000Z"]),
        &["there is no backup 20000101T000000Z"],
    );
    assert!(
        !never.exists(),
        "a failed restore left {} behind",
        never.display()
    );

    // A corrupted chunk: the restore fails, names the object, and leaves the marker so the next
    // attempt starts over.
    let chunk = stored_keys(&s.storage)
        .into_iter()
        .find(|k| k.contains("/data/base/"))
        .expect("a chunk of base.tar");
    let path = s.storage.object_file(&chunk);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[30] ^= 0x01;
    std::fs::write(&path, &bytes).unwrap();
    let bad = s.dir.mkdir("bad");
    assert_fails(&restore(&s, &bad, &[]), &[&chunk, "corrupted"]);
    assert!(
        bad.join(pgkeep::restore::MARKER).exists(),
        "an unusable restore must stay marked as interrupted"
    );
    assert!(!bad.join("recovery.signal").exists());

    // A restore that fails after unpacking everything (here: a damaged manifest) leaves no
    // PG_VERSION, which the postgres image's entrypoint would take for a cluster.
    bytes[30] ^= 0x01;
    std::fs::write(&path, &bytes).unwrap();
    let manifest = stored_keys(&s.storage)
        .into_iter()
        .find(|k| k.ends_with("/backup_manifest"))
        .expect("a manifest");
    let mpath = s.storage.object_file(&manifest);
    let mut mbytes = std::fs::read(&mpath).unwrap();
    let last = mbytes.len() - 1;
    mbytes[last] ^= 0x01;
    std::fs::write(&mpath, &mbytes).unwrap();
    let late = s.dir.mkdir("late");
    assert_fails(&restore(&s, &late, &[]), &["backup_manifest"]);
    assert!(late.join("base").exists(), "the data was unpacked");
    assert!(
        !late.join("PG_VERSION").exists(),
        "a failed restore looks like a cluster"
    );
    assert!(late.join(pgkeep::restore::MARKER).exists());
}

#[test]
fn file_storage_restore_cases() {
    cases(Backend::File);
}

#[test]
fn s3_storage_restore_cases() {
    cases(Backend::S3);
}

/// A backup killed midway is not listed, not restorable, and does not stop the next one.
fn killed_backup(backend: Backend) {
    let s = setup(backend, "killed-backup");
    run_ok(&mut s.primary.pgbench(&["-i", "-s", "4", "-q"]));
    // Small chunks, one at a time, so there is time to kill it after the first is stored.
    let slow = [
        ("PGKEEP_BACKUP_CHUNK_SIZE_MB".to_string(), "1".to_string()),
        ("PGKEEP_PARALLELISM".to_string(), "1".to_string()),
    ];
    let mut env = s.storage.env.clone();
    env.extend(s.primary.client_env());
    env.extend(slow.iter().cloned());
    let mut child = as_postgres(&s.bin, &env)
        .arg("--config")
        .arg(&s.storage.config)
        .arg("backup")
        .current_dir("/")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_for("the first chunk", Duration::from_secs(60), || {
        stored_keys(&s.storage)
            .iter()
            .any(|k| k.contains("/data/base/000001"))
            .then_some(())
    });
    // SIGKILL: no cleanup runs. The pattern names the backup alone: killing an archive-push too
    // would make the server's archiver pause for a minute.
    let pattern = format!(
        "{} --config {} backup",
        s.bin.display(),
        s.storage.config.display()
    );
    run_ok(std::process::Command::new("pkill").args(["-KILL", "-f", &pattern]));
    let _ = child.wait();
    assert!(
        stored_keys(&s.storage)
            .iter()
            .any(|k| k.contains("/basebackups/")),
        "the test killed it too early"
    );
    assert!(
        !stored_keys(&s.storage)
            .iter()
            .any(|k| k.ends_with("backup.json"))
    );

    let out = s.storage.pgkeep_pg(&s.bin, &["list"], &[]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("0 base backup(s)"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let target = s.dir.mkdir("target");
    let out = restore(&s, &target, &["--require-backup"]);
    assert_fails(&out, &["no base backup"]);

    // The next backup works and restores.
    s.primary
        .psql("create table t (id serial primary key, v text)");
    s.primary
        .psql("insert into t (v) select md5(g::text) from generate_series(1, 5000) g");
    assert_ok(
        &s.storage
            .pgkeep_pg(&s.bin, &["backup"], &s.primary.client_env()),
    );
    let expected = s.primary.table_checksum("t");
    s.primary.switch_and_wait_archived();
    let out = s.storage.pgkeep_pg(&s.bin, &["list"], &[]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("1 base backup(s)"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_ok(&restore(&s, &target, &[]));
    start_and_check(&s, &target, &expected);
}

#[test]
fn file_storage_killed_backup() {
    killed_backup(Backend::File);
}

#[test]
fn s3_storage_killed_backup() {
    killed_backup(Backend::S3);
}

/// A tablespace is backed up as its own archive and restored where --tablespace-map says, with the
/// pg_tblspc link pointing there.
fn tablespaces(backend: Backend) {
    let s = setup(backend, "tablespace");
    let old_loc = s.dir.mkdir("ts_old");
    s.primary.psql(&format!(
        "create tablespace extra location '{}'",
        old_loc.display()
    ));
    let expected = rows_backup_rows(&s, "tablespace extra");

    // The old location is still in use by the primary: restoring there is refused before anything
    // is written, however often it is tried, and the primary's tablespace is untouched.
    let target = s.dir.mkdir("ts_target");
    let live_before = std::fs::read_dir(&old_loc).unwrap().count();
    for _ in 0..2 {
        assert_fails(
            &restore(&s, &target, &[]),
            &["tablespace directory", "not empty", "--tablespace-map"],
        );
        assert!(
            std::fs::read_dir(&target).unwrap().next().is_none(),
            "the refused restore wrote into the target"
        );
    }
    assert_eq!(std::fs::read_dir(&old_loc).unwrap().count(), live_before);
    assert_eq!(s.primary.table_checksum("t"), expected);

    let new_loc = s.dir.path().join("ts_new");
    let map = format!("{}={}", old_loc.display(), new_loc.display());
    // Run as root (an init container's default) into the database user's folder: every file,
    // in the target and in the tablespace folder it makes, is that user's, so Postgres starts.
    let args = [
        "restore",
        "--target-dir",
        target.to_str().unwrap(),
        "--tablespace-map",
        &map,
    ];
    assert_ok(&s.storage.pgkeep(&s.bin, &args));
    if is_root() {
        use std::os::unix::fs::MetadataExt;
        let owner = std::fs::metadata(&target).unwrap().uid();
        assert_ne!(owner, 0);
        let mut seen = 0;
        let mut todo = vec![target.clone(), new_loc.clone()];
        while let Some(p) = todo.pop() {
            let m = std::fs::symlink_metadata(&p).unwrap();
            assert_eq!(m.uid(), owner, "{} is uid {}'s", p.display(), m.uid());
            seen += 1;
            if m.is_dir() {
                todo.extend(std::fs::read_dir(&p).unwrap().map(|e| e.unwrap().path()));
            }
        }
        assert!(seen > 100, "only {seen} files checked");
    }
    let links: Vec<_> = std::fs::read_dir(target.join("pg_tblspc"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(links.len(), 1, "{links:?}");
    assert_eq!(std::fs::read_link(&links[0]).unwrap(), new_loc);
    let major = s.primary.major;
    assert!(
        std::fs::read_dir(&new_loc).unwrap().any(|e| e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .starts_with(&format!("PG_{major}_"))),
        "the tablespace's files are at the new location"
    );
    s.primary.psql("select 1"); // the primary keeps its own tablespace untouched
    let mut primary = s.primary;
    primary.stop("fast");
    let c = start_restored(&s.dir, &s.storage, target.clone());
    assert_eq!(c.table_checksum("t"), expected);
    assert_eq!(
        c.psql("select pg_tablespace_location(oid) from pg_tablespace where spcname = 'extra'"),
        new_loc.display().to_string()
    );
}

#[test]
fn file_storage_tablespaces() {
    tablespaces(Backend::File);
}

#[test]
fn s3_storage_tablespaces() {
    tablespaces(Backend::S3);
}

/// A forged backup (anyone with the bucket's keys can write one, checksums and all): its
/// base.tar is rebuilt with links out of the target under the names restore writes itself
/// (`pg_wal`, the manifest's temporary file) and a setuid file, or holding other files than its
/// manifest lists. The restore refuses it by name and writes nothing outside the target.
#[test]
fn a_forged_backup_writes_nothing_outside_the_target() {
    let s = setup(Backend::File, "forged");
    rows_backup_rows(&s, "");
    let out = s.storage.pgkeep_pg(&s.bin, &["list", "--json"], &[]);
    let inv: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let id = inv["backups"][0]["id"].as_str().unwrap().to_string();
    let sysid = inv["system_identifier"].as_str().unwrap().to_string();
    let outside = s.dir.mkdir("outside");
    give_to_postgres(&outside);

    let forge = |entries: &[(&str, tar::EntryType, Option<&Path>, u32)]| {
        let mut tar = tar::Builder::new(vec![]);
        for (name, kind, link, mode) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(*kind);
            h.set_mode(*mode);
            h.set_size(if kind.is_file() { 1 } else { 0 });
            if let Some(l) = link {
                h.set_link_name(l).unwrap();
            }
            let data: &[u8] = if kind.is_file() { b"x" } else { b"" };
            tar.append_data(&mut h, name, data).unwrap();
        }
        let tar = tar.into_inner().unwrap();
        let (header, sealed) =
            pgkeep::storage::object::seal(pgkeep::codec::Codec::None, &tar, &Default::default());
        let base = format!("clusters/{sysid}/basebackups/{id}");
        std::fs::write(
            s.storage.object_file(&format!("{base}/data/base/000000")),
            &sealed,
        )
        .unwrap();
        // backup.json names the forged chunk, with its checksum (one chunk of base.tar).
        let meta_file = s.storage.object_file(&format!("{base}/backup.json"));
        let (_, plain) =
            pgkeep::storage::object::open(&std::fs::read(&meta_file).unwrap(), &Default::default())
                .unwrap();
        let mut meta: serde_json::Value = serde_json::from_slice(&plain).unwrap();
        let archive = meta["archives"]
            .as_array_mut()
            .unwrap()
            .iter_mut()
            .find(|a| a["name"] == "base.tar")
            .unwrap();
        archive["chunks"] = serde_json::json!([{
            "plain_len": tar.len(),
            "stored_len": sealed.len(),
            "sha256": hex::encode(header.checksum),
        }]);
        let json = serde_json::to_vec(&meta).unwrap();
        let (_, sealed_meta) =
            pgkeep::storage::object::seal(pgkeep::codec::Codec::None, &json, &Default::default());
        std::fs::write(&meta_file, sealed_meta).unwrap();
    };
    use tar::EntryType::{Link, Regular, Symlink};
    // A link in the data directory is not recreated (and then the WAL goes into a real pg_wal).
    forge(&[("pg_wal", Symlink, Some(outside.as_path()), 0o777)]);
    let target = s.dir.mkdir("target-link");
    give_to_postgres(&target);
    let _ = restore(&s, &target, &[]);
    assert!(
        !std::fs::symlink_metadata(target.join("pg_wal")).is_ok_and(|m| m.file_type().is_symlink()),
        "the backup's pg_wal link was recreated"
    );
    assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);
    for (entries, why) in [
        (
            vec![(
                ".backup_manifest.pgkeep-tmp",
                Symlink,
                Some(outside.as_path()),
                0o777,
            )],
            "a name the restore writes itself",
        ),
        (
            vec![(".pgkeep-restore-in-progress", Regular, None, 0o644)],
            "a name the restore writes itself",
        ),
        (
            vec![(
                "global/pg_control",
                Link,
                Some(Path::new("/etc/passwd")),
                0o644,
            )],
            "hard link",
        ),
    ] {
        forge(&entries);
        let target = s
            .dir
            .mkdir(&format!("target-{}", entries[0].0.replace('/', "_")));
        give_to_postgres(&target);
        let out = restore(&s, &target, &[]);
        assert_fails(&out, &["refusing the archive entry", entries[0].0, why]);
        assert_eq!(
            std::fs::read_dir(&outside).unwrap().count(),
            0,
            "the restore wrote outside its target"
        );
    }
    // A forged base.tar that passes every check of its own (backup.json records its checksum)
    // but does not hold what the backup's manifest lists: refused, and no PG_VERSION appears.
    forge(&[("PG_VERSION", Regular, None, 0o644)]);
    let target = s.dir.mkdir("target-manifest");
    give_to_postgres(&target);
    let out = restore(&s, &target, &[]);
    assert_fails(
        &out,
        &[
            "the restored files do not match the backup's manifest",
            "the backup was altered",
        ],
    );
    assert!(!target.join("PG_VERSION").exists());
    // Setuid bits do not survive (the restore itself then fails later: the forged tar is no
    // cluster, which is not what this checks).
    forge(&[("suid", Regular, None, 0o4755)]);
    let target = s.dir.mkdir("target-suid");
    give_to_postgres(&target);
    let _ = restore(&s, &target, &[]);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(target.join("suid"))
        .expect("the file was unpacked")
        .permissions()
        .mode();
    assert_eq!(mode & 0o7000, 0, "a setuid bit was restored");
}
