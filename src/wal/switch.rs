//! `pgkeep wal-switch` (the preStop hook): `pg_switch_wal()`, then wait until the daemon reports
//! that WAL up to the switch is durable in storage.

use std::time::{Duration, Instant};

use anyhow::{anyhow, bail};

use crate::config::Config;
use crate::pg::{Lsn, sql};

/// Switches WAL and waits (at most `timeout`) until `durable()` reaches the switch. `Ok(None)`
/// when Postgres is in recovery (nothing of its own to switch).
pub async fn switch_and_wait<F, Fut>(
    cfg: &Config,
    timeout: Duration,
    mut durable: F,
) -> anyhow::Result<Option<Lsn>>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Lsn>>,
{
    let client = sql::connect(&cfg.pg).await?;
    if sql::is_in_recovery(&client).await? {
        tracing::info!("Postgres is in recovery: no WAL of its own to switch");
        return Ok(None);
    }
    let target = sql::switch_wal(&client).await?;
    tracing::info!(target = %target, "switched WAL; waiting until it is durable in storage");
    let started = Instant::now();
    let mut last = Lsn(0);
    let mut last_error: Option<String> = None;
    loop {
        match durable().await {
            Ok(d) if d >= target => {
                tracing::info!(durable = %d, seconds = crate::progress::round3(started.elapsed().as_secs_f64()), "WAL up to the switch is in storage");
                return Ok(Some(target));
            }
            Ok(d) => last = d,
            Err(e) => {
                let e = format!("{e:#}");
                // Said once, not five times a second.
                if last_error.as_deref() != Some(e.as_str()) {
                    tracing::warn!("asking the daemon: {e}");
                }
                last_error = Some(e);
            }
        }
        if started.elapsed() >= timeout {
            let why = last_error.map_or(format!("the daemon reports {last} as durable"), |e| {
                format!("the last answer: {e}")
            });
            bail!(
                "WAL up to {target} did not reach storage within {}s ({why})",
                timeout.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The durable position the daemon at `cfg.listen` reports.
/// Taken only with the proof that the daemon holds the token in `http_token_file`: another
/// process on `listen` could otherwise claim WAL is durable that is not.
pub async fn daemon_durable(cfg: &Config) -> anyhow::Result<Lsn> {
    let answer = crate::http_token::ask(
        cfg.listen,
        &cfg.http_token_file,
        "/status",
        Duration::from_secs(5),
        1 << 20,
    )
    .await?;
    let r = &answer.response;
    if r.status != 200 {
        bail!("the daemon answered /status with {}", r.status);
    }
    if !answer.proves(&r.body) {
        bail!(
            "what answers on {} did not prove it is the pgkeep daemon (no or a wrong proof of the token in {})",
            cfg.listen,
            cfg.http_token_file.display()
        );
    }
    let v: serde_json::Value = serde_json::from_slice(&r.body)?;
    v["durable_lsn"]
        .as_str()
        .ok_or_else(|| anyhow!("no durable_lsn in the daemon's status"))?
        .parse()
        .map_err(Into::into)
}
