//! Ordinary SQL connections (tokio-postgres), for what the replication protocol cannot do.

use anyhow::Context;
use tokio_postgres::NoTls;

use super::Lsn;
use super::conninfo::PgConnInfo;

/// Connects; the connection task runs in the background until the client is dropped.
/// The stream is pgkeep's own (`tls::dial`: TLS as `sslmode` says), watched by an
/// [`AuthGuard`](super::tls::AuthGuard) so that a cleartext or md5 request is refused unanswered.
pub async fn connect(info: &PgConnInfo) -> anyhow::Result<tokio_postgres::Client> {
    let context = || format!("connecting to Postgres ({info})");
    // One connect_timeout for the whole of it: dialling, TLS, startup and authentication.
    let deadline = tokio::time::Instant::now() + info.connect_timeout;
    let (stream, _tls) = match super::tls::dial(info).await {
        Ok(s) => s,
        // Names the server already.
        Err(e @ super::error::PgError::Connect { .. }) => return Err(e.into()),
        Err(e) => return Err(anyhow::Error::from(e).context(context())),
    };
    let guarded = super::tls::AuthGuard::new(stream, info.allow_weak_auth, &info.user);
    let (client, conn) = tokio::time::timeout_at(
        deadline,
        info.to_tokio_postgres().connect_raw(guarded, NoTls),
    )
    .await
    .map_err(|_| anyhow::anyhow!("timed out after {:?}", info.connect_timeout))
    .with_context(context)?
    .with_context(context)?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!("SQL connection ended: {e}");
        }
    });
    Ok(client)
}

pub async fn is_in_recovery(client: &tokio_postgres::Client) -> anyhow::Result<bool> {
    Ok(client
        .query_one("select pg_is_in_recovery()", &[])
        .await?
        .get(0))
}

/// `pg_switch_wal()`: closes the current segment; returns the position everything before which
/// must reach storage for the switch to be complete.
pub async fn switch_wal(client: &tokio_postgres::Client) -> anyhow::Result<Lsn> {
    let row = client
        .query_one("select pg_switch_wal()::text", &[])
        .await
        .context("pg_switch_wal()")?;
    let switch: Lsn = row.get::<_, String>(0).parse()?;
    Ok(switch)
}
