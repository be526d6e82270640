//! `pgkeep daemon`, the sidecar: WAL streaming and the HTTP API, supervised; SIGTERM drains WAL
//! (bounded by `shutdown_timeout_secs`) instead of dropping it.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::Context;
use tokio::sync::watch;

use crate::config::Config;
use crate::http::{AppState, router};
use crate::storage::Repo;
use crate::wal::streamer::{self, StreamState};

pub async fn run(cfg: Config) -> anyhow::Result<()> {
    let repo = Repo::open(&cfg, true)?;
    let stream = Arc::new(StreamState::default());
    let sysid = Arc::new(AtomicU64::new(cfg.system_identifier.unwrap_or(0)));
    let (stop_tx, stop_rx) = watch::channel(false);
    // The HTTP server outlives the drain: the preStop hook (`wal-switch`) polls /status while the
    // daemon drains, and a pod's containers get SIGTERM at the same time.
    let (http_stop_tx, http_stop_rx) = watch::channel(false);

    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("listening on {}", cfg.listen))?;
    tracing::info!(listen = %cfg.listen, storage = %cfg.storage, slot = %cfg.slot_name, "pgkeep daemon starting");
    let app = router(AppState {
        stream: stream.clone(),
        repo: repo.clone(),
        system_identifier: sysid.clone(),
        cfg: Arc::new(cfg.clone()),
        prefetch: Arc::new(
            crate::wal::prefetch::Prefetcher::new(
                cfg.spool_dir.join("prefetch"),
                cfg.prefetch_segments,
            )
            .with_context(|| {
                format!("creating the prefetch cache in {}", cfg.spool_dir.display())
            })?,
        ),
    });
    let mut http_stop = http_stop_rx;
    let http = tokio::spawn(async move {
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<std::net::SocketAddr>(),
        )
        .with_graceful_shutdown(async move {
            let _ = http_stop.wait_for(|s| *s).await;
        })
        .await
    });

    // The cluster's identity, for serving WAL, once the streamer has learned it.
    let ident_cfg = cfg.clone();
    let ident = tokio::spawn({
        let sysid = sysid.clone();
        async move {
            while sysid.load(Ordering::Acquire) == 0 {
                if let Ok(mut c) =
                    crate::pg::replication::ReplConnection::connect(&ident_cfg.pg).await
                    && let Ok(sys) = c.identify_system().await
                {
                    sysid.store(sys.system_identifier, Ordering::Release);
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_secs(2)).await;
            }
        }
    });

    let mut streaming = tokio::spawn(streamer::run(cfg.clone(), stream.clone(), stop_rx.clone()));
    let schedule = tokio::spawn(schedule(cfg.clone(), stream.clone(), stop_rx.clone()));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let result = tokio::select! {
        r = &mut streaming => Some(r),
        _ = term.recv() => None,
        _ = int.recv() => None,
    };
    let _ = stop_tx.send(true);
    ident.abort();
    schedule.abort();
    let outcome = match result {
        Some(r) => r.context("the streaming task")?,
        None => {
            tracing::info!(
                timeout_s = cfg.shutdown_timeout.as_secs(),
                "signal received: draining WAL"
            );
            match tokio::time::timeout(cfg.shutdown_timeout, &mut streaming).await {
                Ok(r) => r.context("the streaming task")?,
                Err(_) => {
                    streaming.abort();
                    Err(anyhow::anyhow!(
                        "the WAL stream did not end within shutdown_timeout_secs ({}s); WAL up to {} is in storage",
                        cfg.shutdown_timeout.as_secs(),
                        stream.durable_lsn()
                    ))
                }
            }
        }
    };
    let _ = http_stop_tx.send(true);
    match http.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::error!("the HTTP server failed: {e}"),
        Err(e) => tracing::error!("the HTTP server task failed: {e}"),
    }
    tracing::info!(durable = %stream.durable_lsn(), "pgkeep daemon stopped");
    outcome
}

/// Takes a base backup (and then applies retention) every `backup_interval_hours`, and at start
/// when storage holds none; never while Postgres is in recovery.
async fn schedule(cfg: Config, state: Arc<StreamState>, mut stop: watch::Receiver<bool>) {
    if cfg.backup_interval_hours == 0 {
        return;
    }
    let interval = chrono::Duration::hours(cfg.backup_interval_hours as i64);
    // Consecutive failures: of backups (retried after 30 s, doubling up to 5 minutes, so a cluster
    // without a backup gets one soon without a failing backup hammering Postgres), and of the check
    // whether one is due (said as a warning once they last a minute).
    let (mut failed, mut unsure) = (0u32, 0u32);
    loop {
        // Not before the stream runs: a backup needs its WAL in storage, and a slot created after
        // the backup started could begin past the backup's first segment, which would then never
        // be streamed (seen under load: the first backup waited out its WAL timeout).
        if state.timeline.load(Ordering::Acquire) == 0 {
            tokio::select! {
                _ = tokio::time::sleep(std::time::Duration::from_millis(500)) => continue,
                _ = stop.changed() => return,
            }
        }
        let pause = match due(&cfg, interval).await {
            Ok(false) => {
                unsure = 0;
                std::time::Duration::from_secs(60)
            }
            Ok(true) => {
                unsure = 0;
                match take_and_prune(&cfg, &state).await {
                    Ok(_) => {
                        failed = 0;
                        std::time::Duration::from_secs(60)
                    }
                    Err(e) => {
                        failed += 1;
                        state.backup_failures.fetch_add(1, Ordering::Relaxed);
                        let retry = (30u64 << (failed - 1).min(4)).min(300);
                        tracing::error!("scheduled backup failed: {e:#}; trying again in {retry}s");
                        std::time::Duration::from_secs(retry)
                    }
                }
            }
            Err(e) => {
                unsure += 1;
                if unsure == 6 {
                    tracing::warn!("cannot tell whether a backup is due (for a minute now): {e:#}");
                } else {
                    tracing::debug!("backup schedule: {e:#}");
                }
                std::time::Duration::from_secs(10)
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = stop.changed() => return,
        }
    }
}

/// Whether a backup is due: Postgres is a primary, and the newest backup is older than the interval
/// (or there is none).
async fn due(cfg: &Config, interval: chrono::Duration) -> anyhow::Result<bool> {
    let sql = crate::pg::sql::connect(&cfg.pg).await?;
    if crate::pg::sql::is_in_recovery(&sql).await? {
        return Ok(false);
    }
    let sys = crate::pg::replication::ReplConnection::connect(&cfg.pg)
        .await?
        .identify_system()
        .await?;
    let repo = Repo::open(cfg, true)?;
    let cluster = crate::storage::ClusterLayout::new(sys.system_identifier);
    let newest = crate::backup::list_backups(&repo, &cluster)
        .await?
        .into_iter()
        .next();
    Ok(newest.is_none_or(|b| chrono::Utc::now() - b.end_time >= interval))
}

/// Takes one backup now and applies retention; returns the backup's id.
pub async fn take_and_prune(cfg: &Config, state: &StreamState) -> anyhow::Result<String> {
    let started = std::time::Instant::now();
    let meta = crate::backup::take_backup(cfg).await?;
    state
        .last_backup_ms
        .store(started.elapsed().as_millis() as u64, Ordering::Relaxed);
    state
        .last_backup_unix
        .store(meta.end_time.timestamp().max(0) as u64, Ordering::Relaxed);
    let plan = crate::retention::prune(cfg, false).await?;
    if !plan.delete_backups.is_empty() || !plan.delete_wal.is_empty() {
        tracing::info!(
            "retention: {}",
            crate::retention::render(&plan, false)
                .trim()
                .replace('\n', "; ")
        );
    }
    Ok(meta.id.to_string())
}
