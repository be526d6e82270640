//! Durability on `file://` storage, seen from the system calls: pgkeep runs under `strace`, and the
//! order of its syncs, renames and creations is checked. A base backup's chunks are synced (one
//! syncfs) before `backup.json` names them; a restore syncs its files before it removes its
//! in-progress marker; `archive-push` syncs the object it stored before it exits 0; the daemon
//! syncs every streamed segment and `.partial` (and its folder) before it reports to Postgres a
//! flush position that the object covers. (The daemon's spool needs no sync: what is in it is
//! never reported flushed, so a crash loses only WAL that the slot still holds.)

mod common;

use std::path::Path;
use std::time::Duration;

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

/// One system call of a `strace -f` log: which thread, the call's text (its start), and the line
/// where it returned (a call other threads interrupted is logged as `<unfinished ...>`, then
/// `<... name resumed>`).
struct Call {
    text: String,
    started: usize,
    returned: usize,
}

fn calls(lines: &[String]) -> Vec<Call> {
    let mut open: std::collections::HashMap<String, usize> = Default::default();
    let mut out: Vec<Call> = vec![];
    for (i, line) in lines.iter().enumerate() {
        let (pid, rest) = line.split_once(' ').unwrap_or(("", line));
        let rest = rest.trim_start();
        if rest.starts_with("<...") {
            if let Some(k) = open.remove(pid) {
                out[k].returned = i;
            }
            continue;
        }
        if rest.ends_with("<unfinished ...>") {
            open.insert(pid.to_string(), out.len());
        }
        out.push(Call {
            text: rest.to_string(),
            started: i,
            returned: i,
        });
    }
    out
}

/// Where the last call of `syscall` whose text holds `needle` and that `when` accepts returned.
fn last_call(
    calls: &[Call],
    syscall: &str,
    needle: &str,
    when: impl Fn(&Call) -> bool,
) -> Option<usize> {
    calls
        .iter()
        .filter(|c| c.text.starts_with(syscall) && c.text.contains(needle) && when(c))
        .map(|c| c.returned)
        .max()
}

/// The flush position of a standby status update written to the replication socket (a CopyData
/// message of 38 bytes holding an 'r' message), from strace's `-x` hex form of the buffer.
fn reported_flush(call: &str) -> Option<u64> {
    let (_, rest) = call.split_once("\"\\x64\\x00\\x00\\x00\\x26\\x72")?;
    let hex: String = rest
        .split('"')
        .next()?
        .split("\\x")
        .filter(|b| !b.is_empty())
        .skip(8)
        .take(8)
        .collect();
    (hex.len() == 16).then(|| u64::from_str_radix(&hex, 16).ok())?
}

#[test]
fn streamed_wal_is_synced_before_its_flush_is_reported() {
    const SEG: u64 = 1 << 20;
    let dir = TestDir::new("durability-stream");
    let storage = Storage::new(Backend::File, &dir);
    let bin = dir.install_pgkeep();
    let mut pg = PgCluster::init(dir.path(), "primary", 1, &storage.env);
    pg.start();
    let log = dir.path().join("daemon.trace");
    let log_arg = log.display().to_string();
    let mut daemon = Daemon::start_under(
        &dir,
        &storage,
        &bin,
        &pg,
        &[
            ("PGKEEP_STATUS_INTERVAL_SECS", "1"),
            ("PGKEEP_PARTIAL_UPLOAD_SECS", "1"),
        ],
        &[
            "strace",
            "-f",
            "-qq",
            "-x",
            "-y",
            "-s",
            "48",
            "-o",
            &log_arg,
            "-e",
            "trace=fsync,fdatasync,syncfs,rename,renameat,renameat2,write,writev,sendto,sendmsg",
        ],
    );
    // Whole segments, then a trickle that only partial uploads make durable.
    run_ok(&mut pg.pgbench(&["-i", "-s", "1", "-q"]));
    for i in 0..4 {
        pg.psql(&format!(
            "insert into pgbench_history (tid, bid, aid, delta, mtime) values ({i}, 1, 1, 1, now())"
        ));
        std::thread::sleep(Duration::from_millis(700));
    }
    let end = parse_lsn(&pg.psql("select pg_current_wal_lsn()"));
    wait_for("the WAL to be durable", Duration::from_secs(60), || {
        (daemon.durable() >= end).then_some(())
    });
    std::thread::sleep(Duration::from_millis(1500));
    // A stopping daemon drains until Postgres ends the stream.
    daemon.signal("TERM");
    pg.stop("fast");
    daemon.wait(Duration::from_secs(30));

    let lines: Vec<String> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    let calls = calls(&lines);
    let wal_dir = "/wal/00000001";
    let streaming_dir = "/streaming/00000001";
    // Objects are named by their path in `-y`'s <...> decoration of the fsync'd descriptor, and
    // in a rename's quoted target.
    let synced_at = |path_end: &str, before: usize| {
        last_call(&calls, "fsync(", &format!("{path_end}>"), |c| {
            c.returned < before
        })
    };
    let placed_at = |path_end: &str, before: usize| {
        last_call(&calls, "rename", &format!("{path_end}\""), |c| {
            c.started < before
        })
    };
    let name = |seg: u64| format!("00000001{:08X}{:08X}", seg / 4096, seg % 4096);
    let first_seg = (0..4096 * 4)
        .find(|s| placed_at(&format!("{wal_dir}/{}", name(*s)), usize::MAX).is_some())
        .expect("the daemon stored whole segments");
    let (mut reports, mut checked_partials, mut best) = (0, 0, 0u64);
    for c in &calls {
        let Some(flush) = reported_flush(&c.text) else {
            continue;
        };
        reports += 1;
        if flush <= best || flush <= first_seg * SEG {
            continue;
        }
        best = flush;
        // Every whole segment the position covers, and the .partial of the one it ends in, was
        // synced after it was last put in place, and its folder after that, before the report.
        let mut covered: Vec<(String, String)> = (first_seg..flush / SEG)
            .map(|s| (format!("{wal_dir}/{}", name(s)), wal_dir.to_string()))
            .collect();
        if flush % SEG != 0 {
            let seg = name(flush / SEG);
            let whole = format!("{wal_dir}/{seg}");
            if placed_at(&whole, c.started).is_some() {
                covered.push((whole, wal_dir.to_string()));
            } else {
                // The piece that ends there (only the new bytes), else the whole `.partial`.
                let ends = format!("-{:08X}", flush % SEG);
                let pieces = format!("{streaming_dir}/{seg}.pieces");
                let piece = calls
                    .iter()
                    .take_while(|p| p.started < c.started)
                    .find_map(|p| {
                        let at = p.text.find(&format!("{pieces}/"))?;
                        let key = &p.text[at..at + pieces.len() + 18];
                        (p.text.starts_with("rename") && key.ends_with(&ends))
                            .then(|| key.to_string())
                    });
                match piece {
                    Some(key) => covered.push((key, pieces)),
                    None => covered.push((
                        format!("{streaming_dir}/{seg}.partial"),
                        streaming_dir.to_string(),
                    )),
                }
                checked_partials += 1;
            }
        }
        for (object, folder) in covered {
            let placed = placed_at(&object, c.started)
                .unwrap_or_else(|| panic!("flush {flush:X} reported before {object} was stored"));
            let synced = synced_at(&object, c.started).filter(|&s| s > placed);
            let synced = synced.unwrap_or_else(|| {
                panic!("flush {flush:X} reported (line {}) before {object}, put in place at line {placed}, was synced", c.started)
            });
            let folder_synced = synced_at(&folder, c.started).filter(|&s| s > synced);
            assert!(
                folder_synced.is_some(),
                "flush {flush:X} reported (line {}) before the folder of {object} was synced after it",
                c.started
            );
        }
    }
    assert!(
        best >= end,
        "the last reported flush {best:X} is below {end:X}"
    );
    assert!(reports >= 5, "only {reports} status updates seen");
    assert!(
        checked_partials >= 1,
        "no flush report was covered by a .partial (of {reports} reports)"
    );
}
