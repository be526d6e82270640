//! The daemon's scheduled checks: `pgkeep verify` every `verify_interval_hours`, and a restore drill
//! every `drill_interval_hours` when `drill_dir` is set. They run as jobs of the daemon's own (never
//! in an HTTP handler or the streamer), one after the other, once the archive holds a backup; each
//! result is kept for `/status` and `/metrics` and recorded in `spool_dir/checks.json`, so a
//! restarted daemon keeps to the schedule instead of checking again at once.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::drill::{DrillReport, DrillSettings};
use crate::progress::unix_now;
use crate::storage::{Archive, Repo};
use crate::verify::{Problem, Report};
use crate::wal::streamer::StreamState;

/// The last verify's outcome.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct VerifyStatus {
    /// Unix time (s) the last verify ended (0: never).
    pub last_run_unix: u64,
    /// Unix time (s) of the last verify that found nothing wrong (0: never).
    pub last_success_unix: u64,
    /// Problems the last verify found (None: it did not run to the end).
    pub problems: Option<usize>,
    /// The first few of them.
    pub first_problems: Vec<Problem>,
    pub seconds: f64,
    /// Why it could not run.
    pub error: Option<String>,
    /// The recoverable window the last verify found (None: nothing restorable).
    pub window: Option<Window>,
    /// How many backups the last verify found restorable.
    pub restorable_backups: Option<usize>,
}

/// From the end of the oldest restorable backup to the end of the WAL that follows without a gap.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Window {
    pub from_lsn: crate::pg::Lsn,
    pub from_time: chrono::DateTime<chrono::Utc>,
    pub to_lsn: crate::pg::Lsn,
}

/// The last drill's outcome.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DrillStatus {
    pub last_run_unix: u64,
    pub last_success_unix: u64,
    /// None: no drill yet.
    pub ok: Option<bool>,
    pub seconds: f64,
    pub backup: Option<String>,
    pub error: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CheckStatus {
    pub verify: VerifyStatus,
    pub drill: DrillStatus,
}

impl CheckStatus {
    fn record_verify(&mut self, result: &anyhow::Result<Report>, took: Duration) {
        let v = &mut self.verify;
        v.last_run_unix = unix_now();
        v.seconds = crate::progress::round3(took.as_secs_f64());
        match result {
            Ok(r) => {
                v.problems = Some(r.problems.len());
                v.first_problems = r.problems.iter().take(5).cloned().collect();
                v.error = None;
                v.window = window(r);
                v.restorable_backups = Some(r.restorable.len());
                if r.ok() {
                    v.last_success_unix = v.last_run_unix;
                }
            }
            Err(e) => {
                v.problems = None;
                v.restorable_backups = None;
                v.window = None;
                v.first_problems.clear();
                v.error = Some(format!("{e:#}"));
            }
        }
    }

    fn record_drill(&mut self, result: &Result<DrillReport, String>) {
        let d = &mut self.drill;
        d.last_run_unix = unix_now();
        match result {
            Ok(r) => {
                d.ok = Some(r.ok);
                d.seconds = r.total_seconds;
                d.backup = r.backup.clone();
                d.error = r.error.clone();
                if r.ok {
                    d.last_success_unix = d.last_run_unix;
                }
            }
            Err(e) => {
                d.ok = Some(false);
                d.seconds = 0.0;
                d.backup = None;
                d.error = Some(e.clone());
            }
        }
    }
}

/// The window a verify report shows: the oldest restorable backup's end to the furthest point
/// recovery can reach.
fn window(r: &Report) -> Option<Window> {
    let oldest = r.restorable.iter().min_by_key(|b| b.from_lsn)?;
    let to = r.restorable.iter().map(|b| b.recoverable_to_lsn).max()?;
    Some(Window {
        from_lsn: oldest.from_lsn,
        from_time: oldest.from_time,
        to_lsn: to,
    })
}

pub struct Checks {
    cfg: Arc<Config>,
    repo: Repo,
    stream: Arc<StreamState>,
    pub status: Mutex<CheckStatus>,
    /// Checks that could not run at all.
    pub errors: prometheus_client::metrics::counter::Counter,
    record: PathBuf,
    stop: CancellationToken,
}

impl Checks {
    pub fn new(
        cfg: Arc<Config>,
        repo: Repo,
        stream: Arc<StreamState>,
        stop: CancellationToken,
    ) -> Checks {
        let record = cfg.spool_dir.join("checks.json");
        // A record this daemon cannot read is no reason not to start: the checks run again.
        let status = std::fs::read(&record)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        Checks {
            cfg,
            repo,
            stream,
            status: Mutex::new(status),
            errors: Default::default(),
            record,
            stop,
        }
    }

    pub fn snapshot(&self) -> CheckStatus {
        self.status.lock().expect("not poisoned").clone()
    }

    /// Runs the checks when due until `stop`; a check in flight is cancelled at `stop` (a drill
    /// stops its Postgres and removes its directory first).
    pub async fn run_schedule(&self) {
        let verify_every = hours(self.cfg.verify_interval_hours);
        let drill_every = match &self.cfg.drill_dir {
            Some(_) => hours(self.cfg.drill_interval_hours),
            None => None,
        };
        if verify_every.is_none() && drill_every.is_none() {
            return;
        }
        while !self.stop.is_cancelled() {
            let now = unix_now();
            let (last_verify, verify_failed, last_drill) = {
                let s = self.status.lock().expect("not poisoned");
                (
                    s.verify.last_run_unix,
                    s.verify.error.is_some(),
                    s.drill.last_run_unix,
                )
            };
            // A verify that could not run (storage unreachable, say) is tried again in 10 minutes.
            let verify_every = verify_every.map(|e| match verify_failed {
                true => e.min(Duration::from_secs(600)),
                false => e,
            });
            let verify_due =
                verify_every.is_some_and(|e| now.saturating_sub(last_verify) >= e.as_secs());
            let drill_due =
                drill_every.is_some_and(|e| now.saturating_sub(last_drill) >= e.as_secs());
            if !verify_due && !drill_due {
                self.pause(Duration::from_secs(60)).await;
                continue;
            }
            // Only when something is due: the archive (a connection to Postgres) and a backup.
            let Some(archive) = self.archive_with_backups().await else {
                self.pause(Duration::from_secs(2)).await;
                continue;
            };
            if verify_due {
                self.verify(&archive).await;
            }
            if let (true, Some(dir)) = (drill_due, &self.cfg.drill_dir)
                && !self.stop.is_cancelled()
            {
                self.drill(dir.clone()).await;
            }
            self.pause(Duration::from_secs(60)).await;
        }
    }

    async fn verify(&self, archive: &Archive) {
        tracing::info!("scheduled verify starting");
        let started = Instant::now();
        let (archive2, parallelism, stop) =
            (archive.clone(), self.cfg.parallelism, self.stop.clone());
        let run = on_own_thread(move || async move {
            tokio::select! {
                r = crate::verify::verify(&archive2, None, parallelism) => Some(r),
                _ = stop.cancelled() => None,
            }
        });
        let result = match run.await {
            Ok(Some(r)) => r,
            Ok(None) => return,
            Err(e) => Err(anyhow::anyhow!("the verify task failed: {e}")),
        };
        match &result {
            Ok(r) if r.ok() => tracing::info!(
                objects = r.objects_checked,
                seconds = crate::progress::round3(started.elapsed().as_secs_f64()),
                "scheduled verify: everything restorable"
            ),
            Ok(r) => {
                for p in &r.problems {
                    tracing::error!(key = %p.key, affects = %p.affects, "verify: {}", p.problem);
                }
                tracing::error!(
                    problems = r.problems.len(),
                    "scheduled verify found problems"
                );
            }
            Err(e) => {
                self.errors.inc();
                tracing::error!("scheduled verify could not run: {e:#}");
            }
        }
        self.update(|s| s.record_verify(&result, started.elapsed()));
    }

    async fn drill(&self, dir: PathBuf) {
        tracing::info!(dir = %dir.display(), "scheduled restore drill starting");
        let settings = DrillSettings {
            dir,
            pg_bin_dir: self.cfg.pg_bin_dir.clone(),
            timeout: self.cfg.drill_timeout,
        };
        let (cfg, stop) = (self.cfg.clone(), self.stop.clone());
        let result =
            on_own_thread(move || async move { crate::drill::drill(&cfg, &settings, &stop).await })
                .await
                .map_err(|e| format!("the drill's task failed: {e}"))
                .and_then(|r| r.map_err(|e| e.to_string()));
        if self.stop.is_cancelled() {
            return;
        }
        match &result {
            Ok(r) if r.ok => tracing::info!(
                backup = r.backup.as_deref().unwrap_or("?"),
                seconds = r.total_seconds,
                "scheduled restore drill passed"
            ),
            Ok(r) => tracing::error!(
                "scheduled restore drill failed: {}",
                r.error.as_deref().unwrap_or("?")
            ),
            Err(e) => {
                self.errors.inc();
                tracing::error!("scheduled restore drill could not run: {e}");
            }
        }
        self.update(|s| s.record_drill(&result));
    }

    fn update(&self, f: impl FnOnce(&mut CheckStatus)) {
        let snapshot = {
            let mut s = self.status.lock().expect("not poisoned");
            f(&mut s);
            s.clone()
        };
        let json = serde_json::to_vec_pretty(&snapshot).expect("serialisable");
        if let Err(e) = std::fs::create_dir_all(&self.cfg.spool_dir)
            .and_then(|_| crate::fsutil::write_atomic(&self.record, &json))
        {
            tracing::warn!(record = %self.record.display(), "cannot record the checks' results: {e}");
        }
    }

    /// The cluster's archive once it holds a base backup (a verify before the first backup would
    /// only say that there is none).
    async fn archive_with_backups(&self) -> Option<Archive> {
        self.stream.streaming_timeline()?;
        let found = async {
            let (_, server) =
                crate::pg::replication::ReplConnection::connect_identified(&self.cfg.pg).await?;
            let archive = Archive::new(self.repo.clone(), server.system_identifier);
            let any = !archive.backups().await?.is_empty();
            anyhow::Ok(any.then_some(archive))
        };
        match found.await {
            Ok(a) => a,
            Err(e) => {
                tracing::debug!("checks: {e:#}");
                None
            }
        }
    }

    async fn pause(&self, d: Duration) {
        tokio::select! {
            _ = tokio::time::sleep(d) => {}
            _ = self.stop.cancelled() => {}
        }
    }
}

/// Runs the future `make` builds on a blocking thread of its own, driving the runtime from there:
/// the restore's and verify's futures are not provably `Send` (they borrow across their
/// buffered streams), so they cannot be spawned as tasks, and they need no task of the daemon's.
async fn on_own_thread<T, F, Fut>(make: F) -> Result<T, tokio::task::JoinError>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = T>,
    T: Send + 'static,
{
    let handle = tokio::runtime::Handle::current();
    tokio::task::spawn_blocking(move || handle.block_on(make())).await
}

fn hours(h: u64) -> Option<Duration> {
    (h > 0).then(|| Duration::from_secs(h * 3600))
}
