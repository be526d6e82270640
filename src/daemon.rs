//! `pgkeep daemon`, the sidecar: starts and supervises the WAL stream, the jobs (scheduled
//! backups) and the HTTP API. SIGTERM drains: the stream uploads what it receives until Postgres
//! ends it, a backup in flight finishes; both within `shutdown_timeout_secs`, shortly before which
//! a backup still running is cancelled (and says so) rather than dropped silently.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::http::{AppState, router};
use crate::jobs::Jobs;
use crate::metrics::Metrics;
use crate::pg::replication::ReplConnection;
use crate::storage::Repo;
use crate::wal::prefetch::Prefetcher;
use crate::wal::streamer::{self, StreamState};

pub async fn run(cfg: Config) -> anyhow::Result<()> {
    let repo = Repo::open(&cfg.storage_settings(), true)?;
    if repo.keys().encrypts() {
        tracing::info!(
            recipients = %repo.keys().recipient_fingerprints().join(","),
            "new objects holding database content are encrypted to these age recipients"
        );
    }
    if let Some(f) = &cfg.encryption.identity_file {
        tracing::warn!(file = %f.display(), "the daemon never decrypts: keep the identity (secret key) out of the sidecar and give it only to restore and restore_command");
    }
    let cfg = Arc::new(cfg);
    let stream = Arc::new(StreamState::default());
    let sysid = Arc::new(AtomicU64::new(cfg.system_identifier.unwrap_or(0)));
    // `stop`: shutdown begins (drain); `abort`: its deadline passed. The HTTP server outlives the
    // drain: the preStop hook (`wal-switch`) polls /status while the daemon drains, and a pod's
    // containers get SIGTERM at the same time.
    let (stop, abort, http_stop) = (
        CancellationToken::new(),
        CancellationToken::new(),
        CancellationToken::new(),
    );
    let jobs = Arc::new(Jobs::new(
        cfg.clone(),
        repo.clone(),
        stream.clone(),
        stop.clone(),
        abort.clone(),
    ));
    // A directory that cannot be used costs recovery speed, never streaming: the daemon runs
    // on without prefetching.
    let prefetch = Arc::new(
        match Prefetcher::new(
            cfg.prefetch_dir.clone(),
            cfg.prefetch_segments,
            cfg.prefetch_max_bytes,
        ) {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(dir = %cfg.prefetch_dir.display(), "cannot use the prefetch directory (prefetch_dir): {e}; WAL is served without prefetching");
                Prefetcher::off(cfg.prefetch_dir.clone())
            }
        },
    );
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("listening on {}", cfg.listen))?;
    tracing::info!(listen = %cfg.listen, storage = %cfg.storage, slot = %cfg.slot_name, "pgkeep daemon starting");
    let app = router(AppState {
        metrics: Arc::new(Metrics::new(stream.clone(), jobs.clone(), &prefetch)),
        stream: stream.clone(),
        jobs: jobs.clone(),
        repo: repo.clone(),
        system_identifier: sysid.clone(),
        cfg: cfg.clone(),
        prefetch: prefetch.clone(),
        wal_bodies: crate::http_limits::wal_bodies(),
        token: match crate::http_token::Token::create(&cfg.http_token_file) {
            Ok(t) => Some(Arc::new(t)),
            Err(e) => {
                tracing::warn!(
                    file = %cfg.http_token_file.display(),
                    "cannot write the daemon's token (http_token_file): {e}; wal-fetch and wal-switch will not trust this daemon, and POST /wal-switch and /backups are closed"
                );
                None
            }
        },
    });
    let mut http = tokio::spawn({
        let http_stop = http_stop.clone();
        let idle = cfg.http_idle_timeout;
        async move {
            let listener = crate::http_limits::BoundedListener::new(
                listener,
                crate::http_limits::MAX_CONNECTIONS,
                idle,
            );
            axum::serve(
                listener,
                app.into_make_service_with_connect_info::<crate::http_limits::Peer>(),
            )
            .with_graceful_shutdown(http_stop.cancelled_owned())
            .await
        }
    });
    // Segments wal-fetch takes from the hand-off directory move the prefetch on.
    tokio::spawn(prefetch.watch(http_stop.clone()));
    let ident = tokio::spawn(identify(cfg.clone(), sysid, stop.clone()));
    let mut streaming = tokio::spawn(streamer::run(
        (*cfg).clone(),
        repo,
        stream.clone(),
        stop.clone(),
    ));
    let schedule = tokio::spawn({
        let jobs = jobs.clone();
        async move {
            // Backups and the checks side by side; both end at `stop`.
            tokio::join!(jobs.run_schedule(), jobs.checks.run_schedule());
        }
    });
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let early = tokio::select! {
        r = &mut streaming => Some(r),
        _ = term.recv() => None,
        _ = int.recv() => None,
    };
    stop.cancel();
    ident.abort();
    let outcome = match early {
        Some(r) => {
            // The stream failed for good: a backup in flight could never get its WAL.
            abort.cancel();
            let _ = tokio::time::timeout(Duration::from_secs(10), schedule).await;
            r.context("the streaming task")?
        }
        None => drain(&cfg, &stream, &jobs, streaming, schedule, &abort).await,
    };
    // Requests still in flight get a moment, not the time of a whole WAL switch.
    http_stop.cancel();
    match tokio::time::timeout(Duration::from_secs(2), &mut http).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => tracing::error!("the HTTP server failed: {e}"),
        Ok(Err(e)) => tracing::error!("the HTTP server task failed: {e}"),
        Err(_) => {
            http.abort();
            tracing::warn!("HTTP requests still running at exit were cut off");
        }
    }
    tracing::info!(durable = %stream.durable_lsn(), "pgkeep daemon stopped");
    outcome
}

/// After SIGTERM: lets the stream and a backup in flight finish within `shutdown_timeout_secs`.
/// A backup still running shortly before the deadline is cancelled (so that removing what it
/// wrote fits in the time left), and the daemon then exits with an error that says so.
async fn drain(
    cfg: &Config,
    stream: &StreamState,
    jobs: &Jobs,
    mut streaming: tokio::task::JoinHandle<anyhow::Result<()>>,
    mut schedule: tokio::task::JoinHandle<()>,
    abort: &CancellationToken,
) -> anyhow::Result<()> {
    tracing::info!(
        timeout_s = cfg.shutdown_timeout.as_secs(),
        "signal received: draining WAL and any backup in flight"
    );
    let deadline = tokio::time::Instant::now() + cfg.shutdown_timeout;
    let grace = (cfg.shutdown_timeout / 4).min(Duration::from_secs(5));
    let backups = async {
        let mut drained = std::pin::pin!(async {
            let _ = (&mut schedule).await;
            jobs.idle().await;
        });
        if tokio::time::timeout_at(deadline - grace, &mut drained)
            .await
            .is_ok()
        {
            return false;
        }
        let cancelled = jobs.busy();
        if cancelled {
            tracing::error!(
                "a base backup was still running {}s before the shutdown deadline: cancelling it (it will not be listed)",
                grace.as_secs_f64()
            );
        }
        abort.cancel();
        let _ = tokio::time::timeout_at(deadline, drained).await;
        cancelled
    };
    let (streamed, cancelled) =
        tokio::join!(tokio::time::timeout_at(deadline, &mut streaming), backups);
    match streamed {
        Ok(r) => r.context("the streaming task")??,
        Err(_) => {
            streaming.abort();
            anyhow::bail!(
                "the WAL stream did not end within shutdown_timeout_secs ({}s); WAL up to {} is in storage",
                cfg.shutdown_timeout.as_secs(),
                stream.durable_lsn()
            )
        }
    }
    if cancelled {
        anyhow::bail!(
            "a base backup was cancelled at the shutdown deadline (shutdown_timeout_secs = {}s)",
            cfg.shutdown_timeout.as_secs()
        );
    }
    Ok(())
}

/// Learns the cluster's identity, for serving WAL, as soon as Postgres answers.
async fn identify(cfg: Arc<Config>, sysid: Arc<AtomicU64>, stop: CancellationToken) {
    while sysid.load(Ordering::Acquire) == 0 && !stop.is_cancelled() {
        if let Ok(mut c) = ReplConnection::connect(&cfg.pg).await
            && let Ok(sys) = c.identify_system().await
        {
            sysid.store(sys.system_identifier, Ordering::Release);
            break;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}
