//! The daemon's scheduled work: a base backup every `backup_interval_hours` (and at start when
//! storage holds none), then retention; and the checks of [`crate::checks`] (verify, drills). The schedule and the HTTP handlers both go through
//! [`Jobs`], which runs one backup at a time and keeps the counters `/metrics` reports.
//!
//! Shutdown: `stop` ends the schedule and refuses new backups, a backup in flight goes on (it
//! needs the WAL the stream is still draining); `abort` (the shutdown deadline) cancels it, and
//! a cancelled backup fails loudly and leaves nothing that is listed.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::bail;
use prometheus_client::metrics::counter::Counter;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::storage::layout::BackupId;
use crate::storage::{Archive, Repo};
use crate::wal::streamer::StreamState;

/// What the jobs did, for status and metrics.
#[derive(Debug, Default)]
pub struct JobState {
    /// Unix time (s) the last scheduled or requested base backup finished (0: none by this daemon).
    pub last_backup_unix: AtomicU64,
    /// How long that backup took, in milliseconds.
    pub last_backup_ms: AtomicU64,
    /// Unix time (s) the newest backup in storage ended, as last seen (0: none seen).
    pub newest_backup_unix: AtomicU64,
    pub backup_failures: Counter,
}

pub struct Jobs {
    cfg: Arc<Config>,
    repo: Repo,
    stream: Arc<StreamState>,
    pub state: JobState,
    /// The scheduled verify and restore drill, and their last results.
    pub checks: crate::checks::Checks,
    /// One backup at a time (a scheduled and a requested one queue behind each other).
    running: tokio::sync::Mutex<()>,
    /// A base backup (not its retention) is being taken.
    backing_up: std::sync::atomic::AtomicBool,
    /// Shutdown began: no new backup starts.
    stop: CancellationToken,
    /// The shutdown deadline passed: a backup in flight is cancelled.
    abort: CancellationToken,
}

impl Jobs {
    pub fn new(
        cfg: Arc<Config>,
        repo: Repo,
        stream: Arc<StreamState>,
        stop: CancellationToken,
        abort: CancellationToken,
    ) -> Jobs {
        Jobs {
            checks: crate::checks::Checks::new(
                cfg.clone(),
                repo.clone(),
                stream.clone(),
                stop.clone(),
            ),
            cfg,
            repo,
            stream,
            state: JobState::default(),
            running: tokio::sync::Mutex::new(()),
            backing_up: Default::default(),
            stop,
            abort,
        }
    }

    /// Takes one backup now and applies retention; returns the backup's id. Counts a failure.
    pub async fn backup_now(&self) -> anyhow::Result<BackupId> {
        let result = self.backup_and_prune().await;
        // A backup refused or cancelled because the daemon stops is no failure of the backups.
        if result.is_err() && !self.stop.is_cancelled() {
            self.state.backup_failures.inc();
        }
        result
    }

    async fn backup_and_prune(&self) -> anyhow::Result<BackupId> {
        let _one = self.running.lock().await;
        if self.stop.is_cancelled() {
            bail!("the daemon is shutting down: no new backup starts");
        }
        let started = std::time::Instant::now();
        self.backing_up.store(true, Ordering::Release);
        let taken = crate::backup::take_backup(
            &self.cfg,
            &self.repo,
            &self.abort,
            crate::backup::BackupMode::Scheduled,
        )
        .await;
        self.backing_up.store(false, Ordering::Release);
        let meta = taken?;
        self.state
            .last_backup_ms
            .store(started.elapsed().as_millis() as u64, Ordering::Relaxed);
        let ended = meta.end_time.timestamp().max(0) as u64;
        self.state.last_backup_unix.store(ended, Ordering::Relaxed);
        self.state
            .newest_backup_unix
            .fetch_max(ended, Ordering::Relaxed);
        let archive = Archive::new(self.repo.clone(), meta.system_identifier);
        let plan = crate::retention::prune(&self.cfg, &archive, false).await?;
        if !plan.delete_backups.is_empty() || !plan.delete_wal.is_empty() {
            tracing::info!(
                "retention: {}",
                crate::retention::render(&plan, false)
                    .trim()
                    .replace('\n', "; ")
            );
        }
        Ok(meta.id)
    }

    /// Waits until no backup runs (the drain at shutdown).
    pub async fn idle(&self) {
        drop(self.running.lock().await);
    }

    /// Whether a base backup is being taken now (retention after it does not count: it is not
    /// cancelled at the deadline).
    pub fn busy(&self) -> bool {
        self.backing_up.load(Ordering::Acquire)
    }

    /// Takes a base backup every `backup_interval_hours`, and at start when storage holds none;
    /// never while Postgres is in recovery. Returns once `stop` is cancelled and no backup it
    /// started is running (a backup in flight is drained, bounded by `abort`).
    pub async fn run_schedule(&self) {
        if self.cfg.backup_interval_hours == 0 {
            return;
        }
        let interval = chrono::Duration::hours(self.cfg.backup_interval_hours as i64);
        // Consecutive failures: of backups (retried after 30 s, doubling up to 5 minutes, so a
        // cluster without a backup gets one soon without a failing backup hammering Postgres), and
        // of the check whether one is due (said as a warning once they last a minute).
        let (mut failed, mut unsure) = (0u32, 0u32);
        while !self.stop.is_cancelled() {
            // Not before the stream runs: a backup needs its WAL in storage, and a slot created
            // after the backup started could begin past the backup's first segment, which would
            // then never be streamed.
            if self.stream.streaming_timeline().is_none() {
                self.pause(Duration::from_millis(500)).await;
                continue;
            }
            let pause = match self.due(interval).await {
                Ok(false) => {
                    unsure = 0;
                    Duration::from_secs(60)
                }
                Ok(true) => {
                    unsure = 0;
                    match self.backup_now().await {
                        Ok(_) => {
                            failed = 0;
                            Duration::from_secs(60)
                        }
                        Err(e) if self.stop.is_cancelled() => {
                            tracing::error!("scheduled backup failed during shutdown: {e:#}");
                            return;
                        }
                        Err(e) => {
                            failed += 1;
                            let retry = (30u64 << (failed - 1).min(4)).min(300);
                            tracing::error!(
                                "scheduled backup failed: {e:#}; trying again in {retry}s"
                            );
                            Duration::from_secs(retry)
                        }
                    }
                }
                Err(e) => {
                    unsure += 1;
                    if unsure == 6 {
                        tracing::warn!(
                            "cannot tell whether a backup is due (for a minute now): {e:#}"
                        );
                    } else {
                        tracing::debug!("backup schedule: {e:#}");
                    }
                    Duration::from_secs(10)
                }
            };
            self.pause(pause).await;
        }
    }

    /// Sleeps, or less when shutdown begins.
    async fn pause(&self, d: Duration) {
        tokio::select! {
            _ = tokio::time::sleep(d) => {}
            _ = self.stop.cancelled() => {}
        }
    }

    /// Whether a backup is due: Postgres is a primary, and the newest backup is older than the
    /// interval (or there is none).
    async fn due(&self, interval: chrono::Duration) -> anyhow::Result<bool> {
        let sql = crate::pg::sql::connect(&self.cfg.pg).await?;
        if crate::pg::sql::is_in_recovery(&sql).await? {
            return Ok(false);
        }
        let (_, server) =
            crate::pg::replication::ReplConnection::connect_identified(&self.cfg.pg).await?;
        let archive = Archive::new(self.repo.clone(), server.system_identifier);
        let newest = archive.backups().await?.into_iter().next();
        if let Some(b) = &newest {
            self.state
                .newest_backup_unix
                .store(b.end_time.timestamp().max(0) as u64, Ordering::Relaxed);
        }
        Ok(newest.is_none_or(|b| chrono::Utc::now() - b.end_time >= interval))
    }
}
