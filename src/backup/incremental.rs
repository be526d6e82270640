//! Which backup an incremental one is taken against (Postgres 17 and later): the newest complete
//! backup of the same major, whose stored manifest the server is sent (`UPLOAD_MANIFEST`) before
//! `BASE_BACKUP (INCREMENTAL)`. The server then sends only the blocks changed since that backup
//! (from its WAL summaries, `summarize_wal = on`), and the restore rebuilds the files from the
//! chain (`restore/incremental.rs`).

use anyhow::anyhow;

use super::BackupMode;
use crate::config::Config;
use crate::pg::replication::{ReplConnection, ServerIdentity};
use crate::storage::{Archive, BackupMeta};

/// The parent and its manifest for an incremental backup, or None for a full one. `Incremental`
/// fails with the reason when the server cannot take one; `Scheduled` takes a full one instead and
/// says why. Either takes a full one when the chain is at `backup_max_incrementals`.
pub(super) async fn choose_parent(
    cfg: &Config,
    conn: &mut ReplConnection,
    server: &ServerIdentity,
    archive: &Archive,
    mode: BackupMode,
) -> anyhow::Result<Option<(BackupMeta, Vec<u8>)>> {
    let explicit = match mode {
        BackupMode::Full => return Ok(None),
        BackupMode::Scheduled if cfg.backup_full_interval_hours == 0 => return Ok(None),
        BackupMode::Scheduled => false,
        BackupMode::Incremental => true,
    };
    // What cannot be done: an error when asked for, a full backup on the schedule.
    let cannot = |why: String| -> anyhow::Result<Option<(BackupMeta, Vec<u8>)>> {
        if explicit {
            Err(anyhow!("cannot take an incremental backup: {why}"))
        } else {
            tracing::info!("taking a full backup: {why}");
            Ok(None)
        }
    };
    if server.major() < 17 {
        return cannot(format!(
            "incremental backups need Postgres 17 or later, and the server runs {}",
            server.version
        ));
    }
    let summarize = conn.show("summarize_wal").await?;
    if summarize != "on" {
        return cannot(
            "the server has summarize_wal = off; incremental backups need summarize_wal = on \
             (set it in postgresql.conf and reload; the Helm chart sets it), and a full backup \
             taken after that to build on"
                .into(),
        );
    }
    let backups = archive.backups().await?; // newest first
    let Some(parent) = backups
        .into_iter()
        .find(|b| b.pg_version.split('.').next() == Some(&server.major().to_string()))
    else {
        return cannot(format!(
            "storage holds no backup of this cluster's Postgres {} to build on",
            server.major()
        ));
    };
    let chain = match archive.chain(&parent).await {
        Ok(chain) => chain,
        Err(e) => return cannot(format!("{e:#}")),
    };
    let full = &chain[0];
    let incrementals = chain.len() - 1;
    if incrementals >= cfg.backup_max_incrementals {
        tracing::info!(
            full = %full.id,
            incrementals,
            "taking a full backup: the chain on the newest full backup holds backup_max_incrementals"
        );
        return Ok(None);
    }
    if !explicit {
        let age = chrono::Utc::now() - full.end_time;
        if age >= chrono::Duration::hours(cfg.backup_full_interval_hours as i64) {
            tracing::info!(full = %full.id, "taking a full backup: the newest full backup is older than backup_full_interval_hours");
            return Ok(None);
        }
    }
    let key = archive.layout().backup_manifest(&parent.id);
    let manifest = match archive.repo().get_with_header(&key).await {
        Ok((header, m)) if hex::encode(header.checksum) == parent.manifest_sha256 => m,
        Ok(_) => {
            return cannot(format!(
                "{key} does not match the checksum recorded in backup {}'s metadata",
                parent.id
            ));
        }
        Err(e) => return cannot(format!("reading backup {}'s manifest: {e}", parent.id)),
    };
    Ok(Some((parent, manifest)))
}
