//! Retention: keep at least `backup_count` base backups and every backup younger than
//! `backup_max_age_hours`; delete the others, then the WAL no kept backup needs. Never the newest
//! backup, never WAL from the oldest kept backup's start on, never a timeline history file.

use chrono::{DateTime, Utc};
use object_store::path::Path;
use serde::Serialize;

use crate::backup::{self, BackupMeta};
use crate::config::Config;
use crate::pg::{WalFileKind, WalFileName, WalSegSize};
use crate::storage::layout::BackupId;
use crate::storage::{ClusterLayout, Repo};

/// An unfinished backup folder older than this (and older than the newest complete backup) is the
/// leftover of a killed backup, not one still running.
const ORPHAN_AGE_HOURS: i64 = 24;

#[derive(Debug, Serialize)]
pub struct Plan {
    pub keep: Vec<BackupId>,
    pub delete_backups: Vec<BackupId>,
    /// Folders of backups that never finished.
    pub delete_orphans: Vec<String>,
    /// WAL objects before the oldest kept backup's start.
    pub delete_wal: Vec<String>,
}

/// Decides what to delete; changes nothing.
pub async fn plan(
    cfg: &Config,
    repo: &Repo,
    cluster: &ClusterLayout,
    now: DateTime<Utc>,
) -> anyhow::Result<Plan> {
    let backups = backup::list_backups(repo, cluster).await?; // newest first
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
    let mut delete_wal = vec![];
    if let Some(oldest) = keep.iter().min_by_key(|b| b.start()) {
        let size: WalSegSize = oldest.seg_size();
        let first_needed = size.segment_of(oldest.start());
        let mut keys = repo.list(&cluster.root().join("wal")).await?;
        keys.extend(repo.list(&cluster.root().join("streaming")).await?);
        for key in keys {
            let Some(Ok(name)) = key.filename().map(str::parse::<WalFileName>) else {
                continue;
            };
            if name.kind == WalFileKind::History {
                continue;
            }
            if let Ok(seg) = name.segment_no(size)
                && seg < first_needed
            {
                delete_wal.push(key.to_string());
            }
        }
    }
    let newest = backups.first().map(|b| b.id.clone());
    let mut delete_orphans = vec![];
    for dir in repo.list_dirs(&cluster.backups_dir()).await? {
        let Ok(id) = dir.parse::<BackupId>() else {
            continue;
        };
        if backups.iter().any(|b| b.id == id) {
            continue;
        }
        let started = chrono::NaiveDateTime::parse_from_str(id.as_str(), "%Y%m%dT%H%M%SZ")
            .map(|t| t.and_utc())
            .unwrap_or(now);
        if newest.as_ref().is_some_and(|n| id < *n)
            && now - started > chrono::Duration::hours(ORPHAN_AGE_HOURS)
        {
            delete_orphans.push(dir);
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
/// objects; then the WAL.
pub async fn apply(repo: &Repo, cluster: &ClusterLayout, plan: &Plan) -> anyhow::Result<()> {
    for id in &plan.delete_backups {
        repo.delete(&cluster.backup_meta(id)).await?;
        for key in repo.list(&cluster.backup_dir(id)).await? {
            repo.delete(&key).await?;
        }
        tracing::info!(backup = %id, "deleted by retention");
    }
    for dir in &plan.delete_orphans {
        for key in repo.list(&cluster.backups_dir().join(dir.as_str())).await? {
            repo.delete(&key).await?;
        }
        tracing::info!(folder = %dir, "deleted an unfinished backup's leftovers");
    }
    for key in &plan.delete_wal {
        repo.delete(&Path::from(key.as_str())).await?;
    }
    if !plan.delete_wal.is_empty() {
        tracing::info!(
            files = plan.delete_wal.len(),
            "deleted WAL no kept backup needs"
        );
    }
    Ok(())
}

/// `pgkeep prune`: plans retention for the cluster and (unless `dry_run`) carries it out.
pub async fn prune(cfg: &Config, dry_run: bool) -> anyhow::Result<Plan> {
    let repo = Repo::open(cfg, false)?;
    repo.check_format().await?;
    let cluster = ClusterLayout::new(crate::cluster::resolve_system_identifier(cfg, &repo).await?);
    let plan = plan(cfg, &repo, &cluster, Utc::now()).await?;
    if !dry_run {
        apply(&repo, &cluster, &plan).await?;
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
