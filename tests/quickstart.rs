//! The README's first command, as a new user runs it: `scripts/quickstart.sh` starts Postgres 15
//! with the sidecar streaming to file:// storage and prints a tour; `restore` brings a copy back
//! with every row of every table (and refuses, changing nothing, once stopped); `stop` leaves nothing running.
mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::*;

fn quickstart(work: &Path, step: &str) -> Output {
    Command::new("bash")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/quickstart.sh"))
        .arg(step)
        .env("QUICKSTART_DIR", work)
        .env("QUICKSTART_PGKEEP", env!("CARGO_BIN_EXE_pgkeep"))
        .output()
        .unwrap()
}

fn ok(out: &Output, step: &str) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "quickstart.sh {step} failed ({}):\n{stdout}\n{}",
        out.status,
        stderr(out)
    );
    stdout
}

/// Stops whatever the quickstart started, also when the test fails half-way.
struct StopOnDrop<'a>(&'a Path);
impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        let _ = quickstart(self.0, "stop");
    }
}

/// Whether the process runs (a zombie waiting for its reaper does not).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().to_string())
        })
        .is_some_and(|rest| !rest.starts_with('Z'))
}

#[test]
fn quickstart_starts_the_sidecar_restores_and_stops() {
    let dir = TestDir::new("quickstart");
    let work = dir.path().join("qs");
    let _stop = StopOnDrop(&work);

    let tour = ok(&quickstart(&work, "start"), "start");
    assert!(tour.contains("pgkeep is running"), "{tour}");
    // The tour shows the daemon's live status and its first base backup.
    assert!(tour.contains("\"durable_lsn\""), "{tour}");
    assert!(tour.contains("1 base backup(s)"), "{tour}");
    let pid: u32 = std::fs::read_to_string(work.join("daemon.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(alive(pid), "the daemon runs");

    let restored = ok(&quickstart(&work, "restore"), "restore");
    assert!(
        restored.contains("OK: the copy holds every row of every table"),
        "{restored}"
    );
    // Every table, not one: the quickstart's orders and pgbench's four.
    let tables = |side: &str| -> Vec<String> {
        restored
            .lines()
            .filter_map(|l| l.strip_prefix(side))
            .map(|l| l.trim().to_string())
            .collect()
    };
    let (primary, copy) = (tables("primary:"), tables("restored:"));
    assert_eq!(primary, copy, "{restored}");
    assert_eq!(primary.len(), 5, "{restored}");
    for t in [
        "public.orders: 20000 rows, md5 ",
        "public.pgbench_accounts: 100000 rows",
    ] {
        assert!(primary.iter().any(|l| l.starts_with(t)), "{t}: {restored}");
    }

    ok(&quickstart(&work, "stop"), "stop");
    assert!(!alive(pid), "the daemon stopped");
    // restore after stop: says to start the quickstart, and leaves the copy where it was.
    let out = quickstart(&work, "restore");
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("the quickstart is not running")
            && stderr(&out).contains("start it first with scripts/quickstart.sh"),
        "{}",
        stderr(&out)
    );
    assert!(
        work.join("restored/PG_VERSION").exists(),
        "the copy was kept"
    );
    assert!(
        !work.join("primary/postmaster.pid").exists(),
        "Postgres stopped"
    );
    assert!(
        !work.join("restored/postmaster.pid").exists(),
        "the copy stopped"
    );
}
