//! The README's first command, as a new user runs it: `scripts/quickstart.sh` starts Postgres 15
//! with the sidecar streaming to file:// storage and prints a tour; `restore` brings a copy back
//! with every row; `stop` leaves nothing running.
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
        restored.contains("OK: the copy holds every row"),
        "{restored}"
    );
    let lines: Vec<&str> = restored
        .lines()
        .filter(|l| l.contains(" rows, md5 "))
        .collect();
    assert_eq!(lines.len(), 2, "{restored}");
    assert_eq!(
        lines[0].trim_start_matches("primary:").trim(),
        lines[1].trim_start_matches("restored:").trim()
    );

    ok(&quickstart(&work, "stop"), "stop");
    assert!(!alive(pid), "the daemon stopped");
    assert!(
        !work.join("primary/postmaster.pid").exists(),
        "Postgres stopped"
    );
    assert!(
        !work.join("restored/postmaster.pid").exists(),
        "the copy stopped"
    );
}
