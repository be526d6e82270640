//! The crash matrix: while probe transactions commit, kill -9 the daemon, Postgres or both at a
//! random moment (a seeded choice: streaming, partial uploads, a base backup in flight), then lose
//! the pod (the data directory and the spool are deleted) and restore from storage alone. Every
//! commit acknowledged longer than the RPO window before the first kill is in the restored copy;
//! no backup is listed that does not restore; the restored copy is the next trial's primary (a new
//! timeline each time). `PGKEEPTEST_CRASH_TRIALS` sets the trials (3 in CI; the nightly runs 20).

mod common;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

/// Commits acknowledged longer ago than this before a crash must survive it (partial uploads run
/// every second; the rest is slack for a loaded machine).
const RPO_WINDOW: Duration = Duration::from_secs(4);

fn trials() -> usize {
    std::env::var("PGKEEPTEST_CRASH_TRIALS")
        .ok()
        .and_then(|t| t.parse().ok())
        .unwrap_or(3)
}

/// xorshift64: the trials' choices, reproducible from the seed printed.
struct Rng(u64);
impl Rng {
    fn next(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

#[derive(Debug, Clone, Copy)]
enum Kill {
    Daemon,
    Postgres,
    Both,
}

#[test]
fn crashes_at_random_moments_lose_no_acknowledged_commit_older_than_the_rpo_window() {
    let seed = std::env::var("PGKEEPTEST_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x00c0_ffee_u64);
    eprintln!("crash matrix: {} trials, seed {seed}", trials());
    let mut rng = Rng(seed | 1);
    let dir = TestDir::new("crash-matrix");
    let storage = Storage::new(Backend::File, &dir);
    let bin = dir.install_pgkeep();
    let mut pg = PgCluster::init(dir.path(), "primary", 1, &storage.env);
    pg.start();
    pg.psql("create table probe (id bigint primary key, at timestamptz default now())");
    let settings = [
        ("PGKEEP_PARTIAL_UPLOAD_SECS", "1"),
        ("PGKEEP_STATUS_INTERVAL_SECS", "1"),
    ];
    let mut daemon = Daemon::start(&dir, &storage, &bin, &pg, &settings);
    let out = storage.pgkeep_pg(&bin, &["backup"], &pg.client_env());
    assert!(out.status.success(), "backup: {}", stderr(&out));
    let mut next_id = 0u64;
    let mut checked = 0usize;

    for trial in 0..trials() {
        // Probe commits, one a transaction, each timed from its acknowledgement.
        let acked: Arc<Mutex<Vec<(u64, Instant)>>> = Arc::default();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writer = {
            let (acked, stop) = (acked.clone(), stop.clone());
            let port = pg.port;
            let first = next_id;
            std::thread::spawn(move || {
                let mut id = first;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let out = std::process::Command::new("psql")
                        .args(["-X", "-q", "-h", "127.0.0.1", "-U", "postgres"])
                        .args(["-p", &port.to_string(), "-d", "postgres"])
                        .env("PGCONNECT_TIMEOUT", "5")
                        .args(["-c", &format!("insert into probe (id) values ({id})")])
                        .output()
                        .unwrap();
                    if !out.status.success() {
                        break; // Postgres was killed
                    }
                    acked.lock().unwrap().push((id, Instant::now()));
                    id += 1;
                }
            })
        };
        // Some trials crash while a base backup is being taken.
        let backing_up = rng.next(3) == 0;
        let mut backup = None;
        let run_for = Duration::from_millis(5000 + rng.next(3000));
        std::thread::sleep(run_for - Duration::from_millis(800));
        if backing_up {
            backup = Some(
                as_postgres(&bin, &{
                    let mut e = storage.env.clone();
                    e.extend(pg.client_env());
                    e
                })
                .arg("--config")
                .arg(&storage.config)
                .arg("backup")
                .current_dir("/")
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap(),
            );
        }
        std::thread::sleep(Duration::from_millis(800));
        let kill = match rng.next(3) {
            0 => Kill::Daemon,
            1 => Kill::Postgres,
            _ => Kill::Both,
        };
        let crashed_at = Instant::now();
        match kill {
            Kill::Daemon => daemon.signal("KILL"),
            Kill::Postgres => pg.kill9(),
            Kill::Both => {
                daemon.signal("KILL");
                pg.kill9();
            }
        }
        // Then the pod is lost: whatever still runs dies, its disks are gone.
        std::thread::sleep(Duration::from_millis(rng.next(500)));
        match kill {
            Kill::Daemon => pg.kill9(),
            Kill::Postgres => daemon.signal("KILL"),
            Kill::Both => {}
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        writer.join().unwrap();
        if let Some(mut b) = backup {
            let _ = b.kill();
            let _ = b.wait();
        }
        daemon.wait(Duration::from_secs(10));
        let acked = acked.lock().unwrap().clone();
        next_id = acked.last().map_or(next_id, |(id, _)| id + 1) + 1_000_000;
        let must: BTreeSet<u64> = acked
            .iter()
            .filter(|(_, at)| *at + RPO_WINDOW <= crashed_at)
            .map(|(id, _)| *id)
            .collect();
        std::fs::remove_dir_all(&pg.data).unwrap();

        // Restore from storage alone; every listed backup is one that restores.
        let target = dir.mkdir(&format!("restored{trial}"));
        let out = storage.pgkeep_pg(
            &bin,
            &["restore", "--target-dir", target.to_str().unwrap()],
            &[],
        );
        assert!(
            out.status.success(),
            "trial {trial} ({kill:?}): restore: {}",
            stderr(&out)
        );
        let mut copy = PgCluster::adopt(dir.path(), target, &storage.env);
        copy.start();
        copy.wait_promoted();
        let have: BTreeSet<u64> = copy
            .psql("select coalesce(string_agg(id::text, ','), '') from probe")
            .split(',')
            .filter(|s| !s.is_empty())
            .map(|s| s.parse().unwrap())
            .collect();
        let lost: Vec<&u64> = must.iter().filter(|id| !have.contains(id)).collect();
        eprintln!(
            "trial {trial}: {kill:?}{} after {run_for:?}: {} commits acknowledged, {} older than the window, all {} restored ({} rows in the copy)",
            if backing_up { " during a backup" } else { "" },
            acked.len(),
            must.len(),
            must.len() - lost.len(),
            have.len()
        );
        assert!(
            lost.is_empty(),
            "trial {trial} ({kill:?}): {} acknowledged commits older than {RPO_WINDOW:?} were lost, the first {:?}",
            lost.len(),
            lost.first()
        );
        assert!(!must.is_empty(), "trial {trial}: nothing to check");
        checked += must.len();
        let out = storage.pgkeep(&bin, &["verify"]);
        assert!(
            out.status.code() != Some(2),
            "verify could not run: {}",
            stderr(&out)
        );

        // The copy is the next trial's primary.
        pg = copy;
        daemon = Daemon::start(&dir, &storage, &bin, &pg, &settings);
        let lsn = parse_lsn(&pg.psql("select pg_current_wal_lsn()"));
        wait_for("the new primary to stream", Duration::from_secs(60), || {
            (daemon.durable() >= lsn).then_some(())
        });
    }
    eprintln!(
        "crash matrix: {checked} acknowledged commits checked after {} crashes",
        trials()
    );
    drop(daemon);
    pg.stop("fast");
}
