//! Retention: keep at least `backup_count` base backups and every backup younger than
//! `backup_max_age_hours`; delete the others, then the WAL no kept backup needs. Never the newest
//! backup, never a backup a kept incremental backup builds on (its parent, and theirs), never WAL
//! from the oldest kept backup's start on, never a timeline history file.

use chrono::{DateTime, Utc};
use object_store::path::Path;
use serde::Serialize;

use crate::config::Config;
use crate::pg::WalFileKind;
use crate::storage::layout::BackupId;
use crate::storage::{Archive, BackupMeta};

/// An unfinished backup folder older than this (and older than the newest complete backup) is the
/// leftover of a killed backup, not one still running.
const ORPHAN_AGE_HOURS: i64 = 24;

#[derive(Debug, Serialize)]
pub struct Plan {
    pub keep: Vec<BackupId>,
    pub delete_backups: Vec<BackupId>,
    /// Folders of backups that never finished.
    pub delete_orphans: Vec<BackupId>,
    /// WAL objects before the oldest kept backup's start.
    pub delete_wal: Vec<String>,
}

/// Decides what to delete; changes nothing.
pub async fn plan(cfg: &Config, archive: &Archive, now: DateTime<Utc>) -> anyhow::Result<Plan> {
    let backups = archive.backups().await?; // newest first
    let max_age = chrono::Duration::hours(cfg.backup_max_age_hours as i64);
    let (mut keep, mut delete): (Vec<&BackupMeta>, Vec<&BackupMeta>) = (vec![], vec![]);
    for (i, b) in backups.iter().enumerate() {
        let young = cfg.backup_max_age_hours > 0 && now - b.end_time < max_age;
        // The newest is kept whatever the settings say.
        if i < cfg.backup_count.max(1) || young {
            keep.push(b);
        } else {
            delete.push(b);
        }
    }
    // A kept incremental backup is restored on its parent, and that on its own: they stay.
    let mut i = 0;
    while i < keep.len() {
        if let Some(parent) = &keep[i].parent
            && let Some(at) = delete.iter().position(|b| b.id == *parent)
        {
            keep.push(delete.remove(at));
        }
        i += 1;
    }
    keep.sort_by(|a, b| b.id.cmp(&a.id));
    let mut delete_wal = vec![];
    if let Some(oldest) = keep.iter().min_by_key(|b| b.start_lsn) {
        let size = oldest.wal_segment_size;
        let first_needed = size.segment_of(oldest.start_lsn);
        for (meta, name) in archive.wal_objects().await? {
            if name.kind == WalFileKind::History {
                continue;
            }
            if let Ok(seg) = name.segment_no(size)
                && seg < first_needed
            {
                delete_wal.push(meta.location.to_string());
            }
        }
        // The pieces after a streamed `.partial` go with it.
        for (seg, piece) in archive.all_streamed_pieces().await? {
            if let Ok(s) = seg.segment_no(size)
                && s < first_needed
            {
                delete_wal.push(piece.key.to_string());
            }
        }
    }
    let newest = backups.first().map(|b| b.id.clone());
    let mut delete_orphans = vec![];
    for id in archive.backup_folders().await? {
        if backups.iter().any(|b| b.id == id) {
            continue;
        }
        if newest.as_ref().is_some_and(|n| id < *n)
            && now - id.time() > chrono::Duration::hours(ORPHAN_AGE_HOURS)
        {
            delete_orphans.push(id);
        }
    }
    Ok(Plan {
        keep: keep.iter().map(|b| b.id.clone()).collect(),
        delete_backups: delete.iter().map(|b| b.id.clone()).collect(),
        delete_orphans,
        delete_wal,
    })
}

/// Carries out a plan: each deleted backup's metadata goes first (it stops existing), then its
/// objects; then the WAL. An object that cannot be deleted (say, one another user owns on
/// `file://`) is named and the rest is still done; the result is then an error listing them. A
/// backup whose metadata cannot be deleted keeps all its objects, so it never looks half-deleted.
pub async fn apply(archive: &Archive, plan: &Plan) -> anyhow::Result<()> {
    let repo = archive.repo();
    let mut failed: Vec<String> = vec![];
    let delete = |key: object_store::path::Path| async move {
        repo.delete(&key).await.map_err(|e| format!("{e}"))
    };
    for id in &plan.delete_backups {
        if let Err(e) = delete(archive.layout().backup_meta(id)).await {
            failed.push(e);
            continue;
        }
        for key in repo.list(&archive.layout().backup_dir(id)).await? {
            if let Err(e) = delete(key).await {
                failed.push(e);
            }
        }
        tracing::info!(backup = %id, "deleted by retention");
    }
    for id in &plan.delete_orphans {
        for key in repo.list(&archive.layout().backup_dir(id)).await? {
            if let Err(e) = delete(key).await {
                failed.push(e);
            }
        }
        tracing::info!(folder = %id, "deleted an unfinished backup's leftovers");
    }
    let mut wal_deleted = 0;
    for key in &plan.delete_wal {
        match delete(Path::from(key.as_str())).await {
            Ok(()) => wal_deleted += 1,
            Err(e) => failed.push(e),
        }
    }
    if wal_deleted > 0 {
        tracing::info!(files = wal_deleted, "deleted WAL no kept backup needs");
    }
    if !failed.is_empty() {
        for f in &failed {
            tracing::error!("retention: {f}");
        }
        anyhow::bail!(
            "retention could not delete {} object(s), and did the rest; the first: {} \
             (on file:// storage, run pgkeep as the user that owns the archive)",
            failed.len(),
            failed[0]
        );
    }
    Ok(())
}

/// `pgkeep prune`: plans retention for the cluster and (unless `dry_run`) carries it out.
pub async fn prune(cfg: &Config, archive: &Archive, dry_run: bool) -> anyhow::Result<Plan> {
    let plan = plan(cfg, archive, Utc::now()).await?;
    if !dry_run {
        apply(archive, &plan).await?;
    }
    Ok(plan)
}

/// The human-readable plan.
pub fn render(plan: &Plan, dry_run: bool) -> String {
    let verb = if dry_run { "would delete" } else { "deleted" };
    let ids = |v: &[BackupId]| {
        v.iter()
            .map(|i| i.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!(
        "keep {} backup(s): {}\n{verb} {} backup(s): {}\n{verb} {} unfinished backup folder(s)\n{verb} {} WAL file(s) older than the oldest kept backup\n",
        plan.keep.len(),
        ids(&plan.keep),
        plan.delete_backups.len(),
        ids(&plan.delete_backups),
        plan.delete_orphans.len(),
        plan.delete_wal.len()
    )
}
