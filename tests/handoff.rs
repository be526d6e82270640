//! The hand-off directory (#17): segments the daemon prefetched reach `wal-fetch` as local files
//! (decoded; as stored when storage is encrypted, the daemon holding no key).
//! A handed-off segment is byte-equal to the stored one; a damaged one is detected, removed and
//! fetched again, never handed to Postgres; a killed daemon's leftovers are ignored when damaged
//! and removed by the next daemon; and a recovery across a promotion replays both timelines, the
//! prefetch never going past the point where the old timeline was left. Without a daemon,
//! `wal-fetch`'s own prefetch (a helper process) fills the directory, gives way to a daemon that
//! starts, and ends by itself leaving nothing behind.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;

/// A folder in /dev/shm (a tmpfs, another file system than the test's), removed at the end.
struct ShmDir(PathBuf);

impl ShmDir {
    fn new() -> ShmDir {
        let p = PathBuf::from(format!(
            "/dev/shm/pgkeep-handoff-{}-{}",
            std::process::id(),
            free_port()
        ));
        ShmDir(p)
    }
}

impl Drop for ShmDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The segments stored for timeline `tli`, in order.
fn stored_segments(storage: &Storage, tli: &str) -> Vec<String> {
    let mut segs: Vec<String> = stored_keys(storage)
        .iter()
        .filter(|k| k.contains(&format!("/wal/{tli}/")))
        .filter_map(|k| k.rsplit('/').next().map(str::to_string))
        .filter(|n| n.len() == 24 && n.chars().all(|c| c.is_ascii_hexdigit()))
        .collect();
    segs.sort();
    segs
}

/// The hand-off file of `segment` in `dir`, once there.
fn handed(dir: &Path, segment: &str) -> Option<PathBuf> {
    std::fs::read_dir(dir).ok()?.find_map(|e| {
        let e = e.ok()?;
        let name = e.file_name().into_string().ok()?;
        (name.starts_with(&format!("{segment}.")) && !name.ends_with(".pgkeep-tmp"))
            .then(|| e.path())
    })
}

fn via(out: &std::process::Output) -> &'static str {
    let said = stderr(out);
    ["handoff", "daemon", "storage"]
        .into_iter()
        .find(|v| said.contains(&format!("via=\"{v}\"")) || said.contains(&format!("via={v}")))
        .unwrap_or_else(|| panic!("no via in: {said}"))
}

/// With `encrypted`, storage is encrypted: the daemon (which holds no key) places segments as
/// stored, and wal-fetch decrypts them.
fn handoff(backend: Backend, encrypted: bool) {
    let dir = TestDir::new("handoff");
    let mut storage = Storage::new(backend, &dir);
    let bin = dir.install_pgkeep();
    if encrypted {
        let (recipient, identity) = keygen(&bin, &dir, "restore.key");
        storage
            .env
            .push(("PGKEEP_ENCRYPTION_RECIPIENTS".into(), recipient));
        storage.env.push((
            "PGKEEP_ENCRYPTION_IDENTITY_FILE".into(),
            identity.display().to_string(),
        ));
    }
    let form = if encrypted { ".pgko" } else { ".wal" };
    // On S3 the directory is on another file system than the destination (as a pod's volume is
    // not PGDATA's): wal-fetch copies instead of renaming.
    let _shm;
    let shared = if backend == Backend::S3 {
        _shm = ShmDir::new();
        _shm.0.clone()
    } else {
        dir.path().join("handoff")
    };
    let mut pg = archiving_cluster(&dir, &storage, &bin, "primary", 1);
    pg.start();
    let settings = [
        ("PGKEEP_PREFETCH_DIR", shared.to_str().unwrap()),
        ("PGKEEP_PREFETCH_SEGMENTS", "4"),
    ];
    let mut daemon = Daemon::start(&dir, &storage, &bin, &pg, &settings);
    run_ok(&mut pg.pgbench(&["-i", "-s", "1", "-q"]));
    pg.switch_and_wait_archived();
    let segs = stored_segments(&storage, "00000001");
    assert!(segs.len() >= 12, "{segs:?}");

    let fetch = |segment: &str, port: u16, handoff: &Path, tag: &str| {
        let dest = dir.path().join(format!("got-{segment}-{tag}"));
        let out = storage.pgkeep_pg(
            &bin,
            &["wal-fetch", segment, dest.to_str().unwrap()],
            &[
                ("PGKEEP_LISTEN".into(), format!("127.0.0.1:{port}")),
                ("PGKEEP_PREFETCH_DIR".into(), handoff.display().to_string()),
                ("PGKEEP_PGDATA".into(), pg.data.display().to_string()),
            ],
        );
        assert!(out.status.success(), "{segment} {tag}: {}", stderr(&out));
        (out, std::fs::read(&dest).unwrap())
    };
    // What storage holds, read straight from it (no daemon, no hand-off; a directory whose parent
    // does not exist, so no prefetch of wal-fetch's own either).
    let nowhere = dir.path().join("absent").join("no-handoff");
    let stored = |segment: &str| {
        let (out, bytes) = fetch(segment, free_port(), &nowhere, "stored");
        assert_eq!(via(&out), "storage");
        bytes
    };

    // The first request goes to the daemon, which then prefetches the next segments into the
    // shared directory.
    let (out, _) = fetch(&segs[2], daemon.port, &shared, "first");
    assert_eq!(via(&out), "daemon", "{}", stderr(&out));
    let next = wait_for(
        "the next segment handed off",
        Duration::from_secs(30),
        || handed(&shared, &segs[3]),
    );
    assert!(next.to_str().unwrap().ends_with(form), "{next:?}");
    // Taken from the directory, byte-equal to the stored segment; the file is gone.
    let (out, bytes) = fetch(&segs[3], daemon.port, &shared, "handed");
    assert_eq!(via(&out), "handoff", "{}", stderr(&out));
    assert!(
        bytes == stored(&segs[3]),
        "the handed-off segment differs from storage's"
    );
    assert!(handed(&shared, &segs[3]).is_none());

    // A damaged prefetched file is detected, removed and fetched again: Postgres gets the
    // stored bytes.
    let file = wait_for(
        "a later segment handed off",
        Duration::from_secs(30),
        || handed(&shared, &segs[4]),
    );
    let mut damaged = std::fs::read(&file).unwrap();
    let middle = damaged.len() / 2;
    damaged[middle] ^= 0x40;
    std::fs::write(&file, &damaged).unwrap();
    let (out, bytes) = fetch(&segs[4], daemon.port, &shared, "damaged");
    let said = stderr(&out);
    let check = if encrypted { "SHA-256" } else { "CRC-32C" };
    assert!(
        said.contains("not usable") && said.contains(check),
        "{said}"
    );
    assert_eq!(via(&out), "daemon", "{said}");
    assert!(bytes == stored(&segs[4]), "a damaged file reached %p");
    assert!(
        handed(&shared, &segs[4]).is_none(),
        "the damaged file was kept"
    );

    // A client that does not see the directory asks over HTTP: the decoded file answers it,
    // sealed again.
    wait_for("a segment handed off", Duration::from_secs(30), || {
        handed(&shared, &segs[5])
    });
    let (out, bytes) = fetch(&segs[5], daemon.port, &nowhere, "over-http");
    assert_eq!(via(&out), "daemon", "{}", stderr(&out));
    assert!(
        bytes == stored(&segs[5]),
        "the prefetched file served over HTTP differs"
    );
    assert!(handed(&shared, &segs[5]).is_none());

    let metrics = String::from_utf8(http("GET", daemon.port, "/metrics").1).unwrap();
    let handed_off = metrics
        .lines()
        .find_map(|l| l.strip_prefix("pgkeep_wal_handed_off_total "))
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or_else(|| panic!("{metrics}"));
    assert!(handed_off >= 1.0, "{metrics}");
    assert!(
        metrics.contains("pgkeep_wal_prefetch_hits_total 1"),
        "{metrics}"
    );

    // A killed daemon leaves its files behind. A damaged leftover is not taken; storage serves.
    let placed = wait_for("more segments handed off", Duration::from_secs(30), || {
        handed(&shared, &segs[6])
    });
    // Asked over HTTP by a client that shares the directory (it looked before the file was
    // placed, or the request waited for its download): told to take it there, nothing sent, the
    // file left for it. A client that names another directory is sent it.
    let id = pgkeep::wal::handoff::dir_identity(&shared).unwrap();
    let (code, body) = http(
        "GET",
        daemon.port,
        &format!("/wal/{}?handoff={id}", segs[6]),
    );
    assert_eq!((code, body.len()), (303, 0));
    assert!(placed.exists());
    let (code, body) = http("GET", daemon.port, &format!("/wal/{}?handoff=1.2", segs[6]));
    assert_eq!(code, 200);
    if !encrypted {
        let (_, plain) = pgkeep::storage::object::open(&body, &Default::default()).unwrap();
        assert!(
            plain == stored(&segs[6]),
            "the file sent differs from storage's"
        );
    }
    // Recovery starts again from an earlier segment (a crash during recovery, or another
    // restore): the prefetch follows it back.
    let (out, _) = fetch(&segs[1], daemon.port, &shared, "again");
    assert_eq!(via(&out), "daemon", "{}", stderr(&out));
    wait_for(
        "the prefetch to follow recovery back",
        Duration::from_secs(30),
        || handed(&shared, &segs[2]),
    );
    let (out, bytes) = fetch(&segs[2], daemon.port, &shared, "again");
    assert_eq!(via(&out), "handoff", "{}", stderr(&out));
    assert!(bytes == stored(&segs[2]));
    daemon.signal("KILL");
    let _ = daemon.wait(Duration::from_secs(10));
    // Past anything the prefetch (4 ahead of segs[6] at most) may have placed before the kill.
    let planted = shared.join(format!("{}.0badf00d.wal", segs[11]));
    std::fs::write(&planted, vec![7u8; 1 << 20]).unwrap();
    give_to_postgres(&planted);
    let (out, bytes) = fetch(&segs[11], free_port(), &shared, "leftover");
    assert_eq!(via(&out), "storage", "{}", stderr(&out));
    assert!(bytes == stored(&segs[11]));
    assert!(!planted.exists());
    // The next daemon removes what the killed one left.
    std::fs::write(&planted, b"left").unwrap();
    give_to_postgres(&planted);
    let daemon = Daemon::start(&dir, &storage, &bin, &pg, &settings);
    assert!(
        daemon
            .log()
            .contains("removed the prefetched files an earlier run left"),
        "{}",
        daemon.log()
    );
    // The read from storage above (no daemon answered) started wal-fetch's own prefetch in the
    // same directory; it ends once a daemon has started, taking its files with it.
    let helper_log =
        || std::fs::read_to_string(shared.join(".pgkeep-prefetch.log")).unwrap_or_default();
    wait_for(
        "the helper to give way to the daemon",
        Duration::from_secs(20),
        || helper_log().contains("a daemon started").then_some(()),
    );
    assert_eq!(handoff_files(&shared), Vec::<String>::new());
}

#[test]
fn file_storage_handoff() {
    handoff(Backend::File, false);
}

#[test]
fn s3_storage_handoff() {
    handoff(Backend::S3, false);
}

#[test]
fn file_storage_encrypted_handoff() {
    handoff(Backend::File, true);
}

#[test]
fn s3_storage_encrypted_handoff() {
    handoff(Backend::S3, true);
}

/// A recovery across a promotion, served by the daemon through the hand-off directory: the old
/// timeline went on past the point where the new one branched off (as an old primary does after
/// a failover), and none of that WAL is prefetched or replayed.
fn across_a_promotion(backend: Backend) {
    let dir = TestDir::new("handoff-tli");
    let storage = Storage::new(backend, &dir);
    let bin = dir.install_pgkeep();
    let shared = dir.path().join("handoff");
    let mut p = archiving_cluster(&dir, &storage, &bin, "primary", 1);
    p.start();
    let daemon = Daemon::start(
        &dir,
        &storage,
        &bin,
        &p,
        &[
            ("PGKEEP_PREFETCH_DIR", shared.to_str().unwrap()),
            ("PGKEEP_LOG_LEVEL", "info,pgkeep::wal::prefetch=debug"),
        ],
    );
    p.psql("create table t (id int primary key, v text)");
    p.psql("insert into t select g, 'base' from generate_series(1, 1000) g");
    let out = storage.pgkeep_pg(&bin, &["backup"], &p.client_env());
    assert!(out.status.success(), "backup: {}", stderr(&out));
    let write = |pg: &PgCluster, tag: &str, from: usize, rounds: usize| {
        for i in 0..rounds {
            let at = from + i * 1000;
            pg.psql(&format!(
                "insert into t select g, '{tag}' || repeat('x', 500) from generate_series({at}, {}) g",
                at + 999
            ));
            pg.psql("select pg_switch_wal()");
        }
    };
    write(&p, "shared", 10_000, 3);
    let switch = p.psql("select pg_current_wal_lsn()");
    // The old timeline goes on.
    write(&p, "old-timeline", 100_000, 6);
    p.switch_and_wait_archived();
    let old = stored_segments(&storage, "00000001");

    // The new timeline: restored to the switch point, promoted, archiving into the same storage.
    let branch = dir.mkdir("branch");
    let out = storage.pgkeep_pg(
        &bin,
        &[
            "restore",
            "--target-dir",
            branch.to_str().unwrap(),
            "--target-lsn",
            &switch,
        ],
        &[],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let mut b = PgCluster::adopt(dir.path(), branch, &storage.env);
    b.set(&[
        ("archive_mode", "on"),
        ("archive_command", &archive_command(&bin, &storage)),
    ]);
    b.start();
    b.wait_promoted();
    write(&b, "new-timeline", 200_000, 4);
    b.switch_and_wait_archived();
    let expected = b.table_checksum("t");
    b.stop("fast");
    p.stop("fast");
    let new = stored_segments(&storage, "00000002");
    assert!(!new.is_empty());
    // Where timeline 1 was left: the first segment timeline 2 holds.
    let first_new = &new[0][8..];
    assert!(
        old.iter().any(|s| &s[8..] > first_new),
        "the old timeline did not go on past the switch: {old:?} {new:?}"
    );

    // The latest state, served by the daemon through the hand-off directory.
    let target = dir.mkdir("latest");
    let out = storage.pgkeep_pg(
        &bin,
        &["restore", "--target-dir", target.to_str().unwrap()],
        &[
            ("PGKEEP_LISTEN".into(), format!("127.0.0.1:{}", daemon.port)),
            ("PGKEEP_PREFETCH_DIR".into(), shared.display().to_string()),
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let latest = start_restored(&dir, &storage, target);
    assert_eq!(latest.table_checksum("t"), expected);
    assert_eq!(
        latest.psql("select count(*) from t where v like 'old-timeline%'"),
        "0"
    );
    assert_eq!(
        latest.psql("select count(*) from t where v like 'new-timeline%'"),
        "4000"
    );
    let log = latest.log();
    assert!(
        log.contains("via=\"handoff\"") || log.contains("via=handoff"),
        "{log}"
    );
    // No segment of timeline 1 at or past the switch was prefetched.
    let said = daemon.log();
    assert!(said.contains("prefetch stops at segment"), "{said}");
    for seg in old.iter().filter(|s| &s[8..] >= first_new) {
        assert!(
            !said.contains(&format!("prefetched wal={seg}")),
            "{seg} (timeline 1 past the switch) was prefetched:\n{said}"
        );
    }
}

#[test]
fn file_storage_prefetch_across_a_promotion() {
    across_a_promotion(Backend::File);
}

#[test]
fn s3_storage_prefetch_across_a_promotion() {
    across_a_promotion(Backend::S3);
}

/// The hand-off files (plain or stored form) in `dir`.
fn handoff_files(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".wal") || n.ends_with(".pgko") || n.ends_with(".recent"))
                .collect()
        })
        .unwrap_or_default()
}

/// No daemon at all (a restore in an init container, a laptop): the first `wal-fetch` that reads
/// storage starts a prefetch of its own, the segments after it reach Postgres through the
/// hand-off directory, the restored table equals the original, and the helper ends by itself
/// once recovery asks for nothing more, leaving no file behind.
fn wal_fetch_alone_prefetches(backend: Backend) {
    let dir = TestDir::new("handoff-alone");
    let storage = Storage::new(backend, &dir);
    let bin = dir.install_pgkeep();
    let own = dir.path().join("own-prefetch");
    let mut p = archiving_cluster(&dir, &storage, &bin, "primary", 1);
    p.start();
    p.psql("create table t (id int primary key, v text)");
    p.psql("insert into t select g, 'base' from generate_series(1, 1000) g");
    let out = storage.pgkeep_pg(&bin, &["backup"], &p.client_env());
    assert!(out.status.success(), "backup: {}", stderr(&out));
    for i in 0..12 {
        let at = 10_000 + i * 1000;
        p.psql(&format!(
            "insert into t select g, repeat('x', 700) from generate_series({at}, {}) g",
            at + 999
        ));
        p.psql("select pg_switch_wal()");
    }
    p.switch_and_wait_archived();
    let expected = p.table_checksum("t");
    p.stop("fast");

    let target = dir.mkdir("restored");
    let out = storage.pgkeep_pg(
        &bin,
        &["restore", "--target-dir", target.to_str().unwrap()],
        &[
            // No daemon answers there.
            ("PGKEEP_LISTEN".into(), format!("127.0.0.1:{}", free_port())),
            ("PGKEEP_PREFETCH_DIR".into(), own.display().to_string()),
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let restored = start_restored(&dir, &storage, target);
    assert_eq!(restored.table_checksum("t"), expected);
    let log = restored.log();
    let handed = log.matches("via=handoff").count() + log.matches("via=\"handoff\"").count();
    assert!(
        handed >= 6,
        "only {handed} segments came through the hand-off:\n{log}"
    );
    let helper_log =
        || std::fs::read_to_string(own.join(".pgkeep-prefetch.log")).unwrap_or_default();
    assert!(
        helper_log().contains("wal-fetch's prefetch starts"),
        "{}",
        helper_log()
    );
    wait_for(
        "wal-fetch's prefetch to end",
        Duration::from_secs(40),
        || {
            helper_log()
                .contains("wal-fetch's prefetch ends")
                .then_some(())
        },
    );
    assert_eq!(handoff_files(&own), Vec::<String>::new());
}

#[test]
fn file_storage_wal_fetch_alone_prefetches() {
    wal_fetch_alone_prefetches(Backend::File);
}

#[test]
fn s3_storage_wal_fetch_alone_prefetches() {
    wal_fetch_alone_prefetches(Backend::S3);
}
