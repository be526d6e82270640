//! Which backup an incremental one is taken against: the newest complete backup of the same major.
//! On Postgres 17 and later its stored manifest is sent to the server (`UPLOAD_MANIFEST`) before
//! `BASE_BACKUP (INCREMENTAL)`; the server then sends only the blocks changed since that backup
//! (from its WAL summaries, `summarize_wal = on`), and the restore rebuilds the files from the
//! chain (`restore/incremental.rs`). On 13 to 16 the server sends everything, and a delta backup
//! stores only the files changed since the parent (`tarfilter.rs`), the others as references to
//! where the chain stored them.

use std::collections::{BTreeMap, HashMap};

use anyhow::anyhow;

use super::BackupMode;
use super::tarfilter::Known;
use crate::config::Config;
use crate::pg::replication::{ReplConnection, ServerIdentity};
use crate::storage::catalog::BackupKind;
use crate::storage::layout::ArchiveName;
use crate::storage::{Archive, BackupMeta};
use crate::verify::contents::{ManifestFile, manifest_entries};

/// What a backup builds on.
pub(super) enum Plan {
    Full,
    /// Postgres 17+: the parent and its manifest, for UPLOAD_MANIFEST.
    Incremental(Box<BackupMeta>, Vec<u8>),
    /// Postgres 13 to 16: the parent and what it knows of each file.
    Delta(Box<DeltaBase>),
}

pub(super) struct DeltaBase {
    pub parent: BackupMeta,
    /// By archive, by path in the archive.
    pub files: HashMap<ArchiveName, HashMap<String, Known>>,
    /// The parent's manifest: size and checksum by manifest path.
    pub manifest: BTreeMap<String, ManifestFile>,
}

impl Plan {
    pub(super) fn kind(&self) -> BackupKind {
        match self {
            Plan::Full => BackupKind::Full,
            Plan::Incremental(..) => BackupKind::Incremental,
            Plan::Delta(_) => BackupKind::Delta,
        }
    }

    /// The backup it builds on.
    pub(super) fn parent(&self) -> Option<&BackupMeta> {
        match self {
            Plan::Full => None,
            Plan::Incremental(p, _) => Some(p),
            Plan::Delta(d) => Some(&d.parent),
        }
    }
}

/// What to build on. `Incremental` fails with the reason when no incremental (or delta) backup
/// can be taken; `Scheduled` takes a full one instead and says why. Either takes a full one when
/// the chain is at `backup_max_incrementals`.
pub(super) async fn choose(
    cfg: &Config,
    conn: &mut ReplConnection,
    server: &ServerIdentity,
    archive: &Archive,
    mode: BackupMode,
) -> anyhow::Result<Plan> {
    let Some((parent, manifest)) = choose_parent(cfg, conn, server, archive, mode).await? else {
        return Ok(Plan::Full);
    };
    if server.major() >= 17 {
        return Ok(Plan::Incremental(Box::new(parent), manifest));
    }
    let explicit = mode == BackupMode::Incremental;
    let index = match archive.file_index(&parent).await {
        Ok(Some(index)) => index,
        Ok(None) => {
            let why = format!(
                "backup {} has no file index (taken by an older pgkeep): a delta backup cannot build on it",
                parent.id
            );
            if explicit {
                anyhow::bail!("cannot take an incremental backup: {why}");
            }
            tracing::info!("taking a full backup: {why}");
            return Ok(Plan::Full);
        }
        Err(e) if !explicit => {
            tracing::warn!(
                "taking a full backup: backup {}'s file index: {e}",
                parent.id
            );
            return Ok(Plan::Full);
        }
        Err(e) => return Err(e.into()),
    };
    let mut files: HashMap<ArchiveName, HashMap<String, Known>> = HashMap::new();
    for e in index.files {
        files.entry(e.archive.clone()).or_default().insert(
            e.path,
            Known {
                size: e.size,
                mtime: e.mtime,
                origin: e.from.unwrap_or_else(|| parent.id.clone()),
                offset: e.offset,
            },
        );
    }
    let manifest =
        manifest_entries(&manifest).map_err(|e| anyhow!("backup {}'s manifest: {e}", parent.id))?;
    Ok(Plan::Delta(Box::new(DeltaBase {
        parent,
        files,
        manifest,
    })))
}

/// The parent and its manifest for an incremental or delta backup, or None for a full one.
async fn choose_parent(
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
    let summarize = match server.major() {
        ..17 => "on".to_string(), // a delta backup needs no WAL summaries
        _ => conn.show("summarize_wal").await?,
    };
    if summarize != "on" {
        return cannot(
            "the server has summarize_wal = off; incremental backups need summarize_wal = on \
             (set it in postgresql.conf and reload; the Helm chart sets it), and a full backup \
             taken after that to build on"
                .into(),
        );
    }
    // Newest first; a damaged backup.json is none to build on (verify names it), and does not
    // stop the backup.
    let (backups, _damaged) = archive.backups_and_damaged().await?;
    // Of this major, on this timeline or an earlier one, ended before where the server is now (a
    // backup of a branch left behind by a rollback is no parent).
    let Some(parent) = backups.into_iter().find(|b| {
        b.pg_version.split('.').next() == Some(&server.major().to_string())
            && b.timeline <= server.timeline
            && b.end_lsn <= server.xlogpos
    }) else {
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
