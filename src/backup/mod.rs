//! Base backups over the replication protocol (`BASE_BACKUP`), cut into chunks that are
//! compressed and uploaded in parallel with bounded memory. The metadata object is written last
//! and is what makes a backup exist: an interrupted backup leaves only chunks that nothing lists.
//! `stream.rs` speaks to the server, `chunks.rs` stores what it sends.

mod chunks;
mod incremental;
mod stream;
mod tarfilter;

use incremental::Plan;

use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::pg::replication::{ReplConnection, ServerIdentity};
use crate::pg::{Lsn, TimelineId};
use crate::progress::human_bytes;
use crate::storage::catalog::{BackupKind, META_VERSION, META_VERSION_INCREMENTAL, required_wal};
use crate::storage::index::FileIndex;
use crate::storage::layout::BackupId;
use crate::storage::{Archive, ArchiveMeta, BackupMeta, ClusterInfo, Repo};

/// What kind of base backup to take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackupMode {
    /// Every file.
    Full,
    /// Incremental on the newest backup (Postgres 17 and later, `summarize_wal = on`); an error
    /// when the server cannot take one. A full one when the chain on the newest full backup
    /// already holds `backup_max_incrementals`.
    Incremental,
    /// The daemon's schedule: incremental when `backup_full_interval_hours` is set, the newest
    /// full backup is younger than that, the chain is shorter than `backup_max_incrementals` and
    /// the server can take one; otherwise full (and the log says why).
    Scheduled,
}

/// Takes one base backup now and waits until it exists in storage (data, manifest, its WAL,
/// metadata). Cancelling `cancel` stops it: nothing of it is then listed, and the error says so.
pub async fn take_backup(
    cfg: &Config,
    repo: &Repo,
    cancel: &CancellationToken,
    mode: BackupMode,
) -> anyhow::Result<BackupMeta> {
    match attempt(cfg, repo, cancel, mode).await {
        Err(e) if e.downcast_ref::<FullInstead>().is_some() => {
            tracing::warn!("{e}; taking a full backup instead");
            attempt(cfg, repo, cancel, BackupMode::Full).await
        }
        other => other,
    }
}

/// Why a backup that was to build on another is taken again as a full one: the server refused or
/// failed a scheduled incremental backup (the parent's manifest, or its WAL summaries not reaching
/// back to the parent, say), or a delta backup left out a file whose time and size said unchanged
/// and whose checksum says otherwise.
#[derive(Debug)]
struct FullInstead(String);

impl std::fmt::Display for FullInstead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for FullInstead {}

async fn attempt(
    cfg: &Config,
    repo: &Repo,
    cancel: &CancellationToken,
    mode: BackupMode,
) -> anyhow::Result<BackupMeta> {
    let (mut conn, server) = ReplConnection::connect_identified(&cfg.pg).await?;
    let archive = repo.ensure_cluster(&ClusterInfo::from(&server)).await?;
    let plan = incremental::choose(cfg, &mut conn, &server, &archive, mode).await?;
    let (id, start_time) = free_backup_id(&archive).await?;
    tracing::info!(backup = %id, kind = %plan.kind(), parent = plan.parent().map(|p| p.id.to_string()), system_identifier = server.system_identifier, "starting base backup");
    let work = async {
        if let Plan::Incremental(p, manifest) = &plan {
            conn.upload_manifest(manifest).await.with_context(|| {
                format!(
                    "the server refused an incremental backup on backup {}",
                    p.id
                )
            })?;
        }
        let streamed = stream::stream_backup(cfg, &mut conn, &server, &archive, &id, &plan).await?;
        finish(cfg, &archive, &server, &id, start_time, streamed, &plan).await
    };
    let result = tokio::select! {
        r = work => r,
        _ = cancel.cancelled() => Err(anyhow!("backup {id} cancelled by shutdown before it was complete")),
    };
    let server_said = |e: &anyhow::Error| {
        e.chain().any(|c| {
            matches!(
                c.downcast_ref::<crate::pg::error::PgError>(),
                Some(crate::pg::error::PgError::Server { .. })
            )
        })
    };
    let result = match result {
        Err(e)
            if mode == BackupMode::Scheduled
                && matches!(plan, Plan::Incremental(..))
                && server_said(&e) =>
        {
            Err(FullInstead(format!("the incremental backup failed: {e:#}")).into())
        }
        other => other,
    };
    match result {
        Ok(meta) => {
            tracing::info!(
                backup = %meta.id,
                kind = %meta.kind,
                start_lsn = %meta.start_lsn,
                end_lsn = %meta.end_lsn,
                timeline = meta.timeline.get(),
                size = %human_bytes(meta.plain_bytes),
                stored = %human_bytes(meta.stored_bytes),
                seconds = (meta.end_time - meta.start_time).num_milliseconds() as f64 / 1000.0,
                "base backup complete"
            );
            Ok(meta)
        }
        Err(e) => {
            cleanup(&archive, &id).await;
            Err(e)
        }
    }
}

/// Ids are start times to the second. One already taken (a backup running, or the leftovers of
/// one that was killed) is skipped by waiting for the next second.
async fn free_backup_id(archive: &Archive) -> anyhow::Result<(BackupId, DateTime<Utc>)> {
    for _ in 0..5 {
        let start_time = Utc::now();
        let id = BackupId::from_time(start_time);
        if !archive.backup_folder_used(&id).await? {
            return Ok((id, start_time));
        }
        tokio::time::sleep(Duration::from_millis(
            1000 - u64::from(start_time.timestamp_subsec_millis()).min(999),
        ))
        .await;
    }
    bail!(
        "no free backup id: objects exist under {}",
        archive.layout().backups_dir()
    )
}

/// What the copy stream delivered.
pub(crate) struct Streamed {
    archives: Vec<ArchiveMeta>,
    /// Where each regular file's bytes are.
    files: Vec<crate::storage::index::FileEntry>,
    /// Files a delta backup left out, to confirm against the manifest.
    left_out: Vec<tarfilter::LeftOut>,
    manifest: Vec<u8>,
    start: Lsn,
    end: Lsn,
    timeline: TimelineId,
}

/// Confirms what a delta backup left out, stores the manifest and the file index, waits for the
/// backup's WAL, makes the chunks durable, and writes the metadata last.
async fn finish(
    cfg: &Config,
    archive: &Archive,
    server: &ServerIdentity,
    id: &BackupId,
    start_time: DateTime<Utc>,
    s: Streamed,
    plan: &Plan,
) -> anyhow::Result<BackupMeta> {
    if let Plan::Delta(base) = plan {
        // The server's manifest must give each file left out the size and checksum the parent's
        // gave it: then its bytes are the ones the chain stored.
        let now = crate::verify::contents::manifest_entries(&s.manifest)
            .map_err(|e| anyhow!("the server's backup manifest: {e}"))?;
        for l in &s.left_out {
            let new = now.get(&l.manifest_path);
            let same = new.is_some_and(|n| {
                n.checksum.is_some()
                    && n.size == l.size
                    && base.manifest.get(&l.manifest_path) == Some(n)
            });
            if !same {
                return Err(FullInstead(format!(
                    "the delta backup left out {} as unchanged (same size and modification time \
                     as in the parent), but the server's manifest gives it another checksum",
                    l.manifest_path
                ))
                .into());
            }
        }
        tracing::info!(
            left_out = s.left_out.len(),
            bytes = s.left_out.iter().map(|l| l.size).sum::<u64>(),
            "delta: files unchanged since the parent are stored as references to it"
        );
    }
    let repo = archive.repo();
    // Its checksum (of the stored bytes when encrypted) goes into backup.json.
    let (manifest_header, sealed) = repo.seal(cfg.codec, &s.manifest);
    repo.put_sealed(&archive.layout().backup_manifest(id), sealed)
        .await?;
    let files_sha256 = archive
        .put_file_index(id, cfg.codec, &FileIndex { files: s.files })
        .await?;
    wait_for_wal(
        cfg,
        archive,
        &required_wal(s.timeline, server.seg_size, s.start, s.end),
    )
    .await?;
    // The chunks were written without a sync each: one for all of them before anything names them.
    repo.sync_all().await?;
    let kind = plan.kind();
    let meta = BackupMeta {
        meta_version: match kind {
            BackupKind::Full => META_VERSION,
            _ => META_VERSION_INCREMENTAL,
        },
        id: id.clone(),
        label: label(id),
        system_identifier: server.system_identifier,
        pg_version: server.version.clone(),
        wal_segment_size: server.seg_size,
        timeline: s.timeline,
        start_lsn: s.start,
        end_lsn: s.end,
        start_time,
        end_time: Utc::now(),
        codec: cfg.codec,
        plain_bytes: s.archives.iter().map(|a| a.plain_bytes).sum(),
        stored_bytes: s.archives.iter().map(|a| a.stored_bytes).sum(),
        manifest_sha256: hex::encode(manifest_header.checksum),
        encrypted_to: repo.keys().recipient_fingerprints(),
        archives: s.archives,
        kind,
        parent: plan.parent().map(|p| p.id.clone()),
        files_sha256: Some(files_sha256),
    };
    // What it builds on must still be there (a `prune` may have run meanwhile), and be a parent
    // a restore accepts: otherwise the newest backup would be one nothing can restore.
    if meta.parent.is_some() {
        archive
            .chain(&meta)
            .await
            .context("the backup's parent is no longer restorable; it was not published")?;
    }
    // Written last: from here on the backup exists.
    archive.publish_backup(&meta).await?;
    Ok(meta)
}

pub(crate) fn label(id: &BackupId) -> String {
    format!("pgkeep {id}")
}

/// Waits (bounded by `backup_wal_timeout_secs`) until every WAL segment in `needed` is in
/// storage: without them the backup cannot be made consistent. BASE_BACKUP runs with WAIT false,
/// because the server would wait for its archiver forever; this wait is bounded, says what is
/// missing, and also covers WAL that reaches storage by streaming.
async fn wait_for_wal(
    cfg: &Config,
    archive: &Archive,
    needed: &[crate::pg::WalFileName],
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + cfg.backup_wal_timeout;
    // The archiver usually delivers the last segment within moments: look again soon, then less often.
    let mut pause = Duration::from_millis(50);
    loop {
        let missing = archive.missing_wal(needed).await?;
        if missing.is_empty() {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            bail!(
                "the WAL this backup needs is not in storage after {}s: missing {} (of {} to {}). \
                 Set archive_command = 'pgkeep archive-push %p' (or run pgkeep daemon) so WAL reaches storage",
                cfg.backup_wal_timeout.as_secs(),
                crate::pg::lsn::join_names(&missing),
                needed.first().expect("not empty"),
                needed.last().expect("not empty")
            );
        }
        if pause >= Duration::from_secs(1) {
            tracing::info!(missing = missing.len(), first = %missing[0], "waiting for the backup's WAL to reach storage");
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(2));
    }
}

/// Best-effort removal of an unfinished backup's objects (nothing lists them without metadata, but
/// they take space).
async fn cleanup(archive: &Archive, id: &BackupId) {
    // Twice: an upload that was in flight when the backup failed may land just after the first
    // pass (its task is cancelled, a blocking write under it is not).
    for pass in 0..2 {
        if pass > 0 {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let keys = match archive.repo().list(&archive.layout().backup_dir(id)).await {
            Ok(keys) => keys,
            Err(e) => {
                tracing::warn!(backup = %id, "could not list a failed backup's objects: {e}");
                return;
            }
        };
        for key in keys {
            if let Err(e) = archive.repo().delete(&key).await {
                tracing::warn!(%key, "could not remove a failed backup's object: {e}");
            }
        }
    }
}
