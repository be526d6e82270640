//! Disk full, on small file systems the test mounts (tmpfs; needs root, as CI runs): the spool of
//! a streaming daemon and a `file://` store. A full disk is a clear error, no durable position
//! passes what storage holds, nothing half-written is listed, and once space frees everything
//! catches up, every stored segment equal to Postgres' own.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;

/// A tmpfs of `mb` MiB at `dir`, owned by postgres; unmounted on drop.
struct SmallFs(PathBuf);

impl SmallFs {
    fn mount(dir: &Path, mb: u32) -> SmallFs {
        std::fs::create_dir_all(dir).unwrap();
        let (uid, gid) = postgres_ids();
        run_ok(std::process::Command::new("mount").args([
            "-t",
            "tmpfs",
            "-o",
            &format!("size={mb}m,uid={uid},gid={gid},mode=0700"),
            "tmpfs",
            dir.to_str().unwrap(),
        ]));
        SmallFs(dir.to_path_buf())
    }

    /// Fills the file system but for `leave` bytes, with a file to delete later.
    fn fill(&self, leave: u64) -> PathBuf {
        let filler = self.0.join("filler");
        let free = free_bytes(&self.0);
        let data = vec![0xA5u8; free.saturating_sub(leave) as usize];
        std::fs::write(&filler, data).unwrap();
        filler
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

fn free_bytes(dir: &Path) -> u64 {
    let out = std::process::Command::new("df")
        .args(["-B1", "--output=avail"])
        .arg(dir)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .nth(1)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn a_full_spool_stops_durability_and_recovers_once_space_frees() {
    if !is_root() {
        eprintln!("needs root to mount a small file system");
        return;
    }
    let dir = TestDir::new("spool-full");
    let storage = Storage::new(Backend::File, &dir);
    let bin = dir.install_pgkeep();
    let spool = SmallFs::mount(&dir.path().join("spool"), 16);
    let mut pg = PgCluster::init(dir.path(), "primary", 1, &storage.env);
    pg.set(&[("wal_keep_size", "'1GB'")]);
    pg.start();
    let daemon = Daemon::start(
        &dir,
        &storage,
        &bin,
        &pg,
        &[
            ("PGKEEP_SPOOL_DIR", spool.0.to_str().unwrap()),
            ("PGKEEP_PARTIAL_UPLOAD_SECS", "1"),
            ("PGKEEP_STATUS_INTERVAL_SECS", "1"),
        ],
    );
    pg.psql("create table t (g int, pad text)");
    pg.psql("select pg_switch_wal()");
    let before = parse_lsn(&pg.psql("select pg_current_wal_lsn()"));
    wait_for("streaming to start", Duration::from_secs(30), || {
        (daemon.durable() >= before).then_some(())
    });

    // Less than a segment of room: the next segments cannot be spooled.
    let filler = spool.fill(256 << 10);
    pg.psql("insert into t select g, repeat('x', 200) from generate_series(1, 20000) g");
    pg.psql("select pg_switch_wal()");
    let written = parse_lsn(&pg.psql("select pg_current_wal_lsn()"));
    let status = wait_for(
        "the full spool to be reported",
        Duration::from_secs(60),
        || {
            let s = daemon.status();
            s.contains("No space left on device").then_some(s)
        },
    );
    eprintln!("status with the spool full: {status}");
    // Nothing past what storage holds is durable, nor released by the slot.
    let stuck = daemon.durable();
    assert!(
        stuck < written,
        "durable {stuck:X} passed the unspooled WAL: {status}"
    );
    let restart = parse_lsn(&pg.psql(
        "select coalesce(restart_lsn::text, '0/0') from pg_replication_slots where slot_name = 'pgkeep'",
    ));
    assert!(
        restart <= stuck,
        "the slot released WAL that is not in storage"
    );
    for key in stored_keys(&storage) {
        let name = key.rsplit('/').next().unwrap();
        if name.len() == 24 {
            let seg_end = (u64::from_str_radix(&name[8..16], 16).unwrap() << 32)
                + ((u64::from_str_radix(&name[16..24], 16).unwrap() + 1) << 20);
            assert!(
                seg_end <= stuck,
                "{name} is stored past the durable position {stuck:X}"
            );
        }
    }
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        daemon.durable(),
        stuck,
        "durable moved while the spool is full"
    );

    // Space again: the stream catches up, and every stored segment is Postgres' own.
    std::fs::remove_file(&filler).unwrap();
    wait_for("the stream to catch up", Duration::from_secs(90), || {
        (daemon.durable() >= written).then_some(())
    });
    let compared = assert_stored_segments_equal(&storage, &storage.env, &bin, &pg);
    assert!(compared >= 4, "only {compared} segments");
    let s = daemon.status();
    assert!(s.contains("\"stream_error\":null"), "{s}");
    drop(daemon);
    pg.stop("fast");
}

#[test]
fn a_full_file_store_fails_loudly_and_lists_nothing_half_written() {
    if !is_root() {
        eprintln!("needs root to mount a small file system");
        return;
    }
    let dir = TestDir::new("store-full");
    let store = SmallFs::mount(&dir.path().join("archive"), 96);
    let config = dir.path().join("pgkeep.toml");
    std::fs::write(
        &config,
        format!("storage = \"file://{}\"\n", store.0.display()),
    )
    .unwrap();
    give_to_postgres(&config);
    let bin = dir.install_pgkeep();
    let env = vec![("PGKEEP_CONFIG".to_string(), config.display().to_string())];
    let mut pg = PgCluster::init(dir.path(), "primary", 1, &env);
    pg.set(&[
        ("archive_mode", "on"),
        (
            "archive_command",
            &format!(
                "'{} --config {} archive-push %p'",
                bin.display(),
                config.display()
            ),
        ),
    ]);
    pg.start();
    pg.psql("create table t as select g from generate_series(1, 1000) g");
    pg.switch_and_wait_archived();

    // A base backup into a store with no room: it fails saying so, and nothing is listed.
    let filler = store.fill(64 << 10);
    let run = |args: &[&str]| {
        as_postgres(&bin, &pg.client_env())
            .arg("--config")
            .arg(&config)
            .args(args)
            .current_dir("/")
            .output()
            .unwrap()
    };
    let out = run(&["backup"]);
    eprintln!("backup into the full store: {}", stderr(&out));
    assert!(
        !out.status.success(),
        "a backup into a full store succeeded"
    );
    assert!(
        stderr(&out).contains("No space left on device"),
        "{}",
        stderr(&out)
    );
    let out = run(&["list", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let inv: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(inv["backups"].as_array().unwrap().len(), 0, "{inv}");

    // archive-push into the full store: Postgres is told it failed (and keeps the segment).
    pg.psql("insert into t select generate_series(1, 50000)");
    let seg = pg.psql("select pg_walfile_name(pg_current_wal_lsn())");
    pg.psql("select pg_switch_wal()");
    wait_for("archiving to fail", Duration::from_secs(60), || {
        pg.log().contains("No space left on device").then_some(())
    });
    assert!(
        pg.data.join("pg_wal").join(&seg).exists(),
        "Postgres removed a segment that was never archived"
    );
    let failed: u64 = pg
        .psql("select failed_count from pg_stat_archiver")
        .parse()
        .unwrap();
    assert!(failed >= 1);

    // Space again: archiving catches up, and a backup completes and restores.
    std::fs::remove_file(&filler).unwrap();
    pg.switch_and_wait_archived();
    let out = run(&["backup"]);
    assert!(out.status.success(), "backup: {}", stderr(&out));
    let expected = pg.table_checksum("t");
    let target = dir.mkdir("restored");
    let out = as_postgres(&bin, &[])
        .arg("--config")
        .arg(&config)
        .args(["restore", "--target-dir", target.to_str().unwrap()])
        .current_dir("/")
        .output()
        .unwrap();
    assert!(out.status.success(), "restore: {}", stderr(&out));
    pg.stop("fast");
    let mut restored = PgCluster::adopt(dir.path(), target, &env);
    restored.set(&[("archive_mode", "off")]);
    restored.start();
    restored.wait_promoted();
    assert_eq!(restored.table_checksum("t"), expected);
}
