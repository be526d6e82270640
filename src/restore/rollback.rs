//! `restore --rollback-to MARK`: brings a data directory back to a mark. The current data
//! directory is never destroyed: it is set aside (renamed on the same volume, beside it) until the
//! user removes it. Once the restore to the mark is complete, a record in storage
//! (`<cluster>/rollbacks/<mark>.json`) says so, and a later run with the same option does what a
//! plain restore does (nothing to a cluster; the latest backup into an empty directory): a pod
//! that restarts, or moves to a new volume, is not rolled back twice. An interrupted run is
//! repeated safely: the directory set aside stays where it is, an interrupted restore is redone.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::target::{self, TargetState};
use super::{RecoveryTarget, RestoreOptions, RestoreOutcome};
use crate::config::Config;
use crate::storage::{Archive, StorageError};

/// What storage keeps of a rollback that was done.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RollbackRecord {
    pub mark: String,
    pub time: DateTime<Utc>,
    /// The backup restored.
    pub backup: String,
    /// Where the data directory it replaced was set aside (None: it was empty).
    pub set_aside: Option<PathBuf>,
}

/// The folder name the current data directory is set aside under: `<dir>.before-rollback-<mark>`.
pub fn set_aside_path(dir: &Path, mark: &str) -> PathBuf {
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "data".into());
    dir.with_file_name(format!("{name}.before-rollback-{mark}"))
}

impl Archive {
    async fn rollback_record(&self, mark: &str) -> Result<Option<RollbackRecord>, StorageError> {
        let key = self.layout().rollback(mark);
        match self.repo().get(&key).await {
            Ok(raw) => serde_json::from_slice(&raw)
                .map(Some)
                .map_err(|e| StorageError::Corrupt {
                    key: key.to_string(),
                    reason: format!("not a rollback record: {e}"),
                }),
            Err(StorageError::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn record_rollback(&self, r: &RollbackRecord) -> Result<(), StorageError> {
        let json = serde_json::to_vec_pretty(r).expect("serialisable");
        match self
            .repo()
            .put_new_metadata(&self.layout().rollback(&r.mark), &json)
            .await
        {
            Ok(_) | Err(StorageError::Conflict { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

pub(super) async fn rollback(
    cfg: &Config,
    opts: &RestoreOptions,
    mark: &str,
) -> anyhow::Result<RestoreOutcome> {
    crate::mark::check_name(mark).map_err(|e| anyhow::anyhow!(e))?;
    let dir = &opts.target_dir;
    if !dir.is_absolute() {
        bail!(
            "the target directory {} must be an absolute path",
            dir.display()
        );
    }
    let archive = crate::cluster::open_archive(cfg).await?;
    let Some(m) = archive.mark(mark).await? else {
        bail!(
            "no mark named {mark:?} in storage {} (`pgkeep list` shows the marks): nothing was changed",
            cfg.storage
        );
    };
    let plain = RestoreOptions {
        rollback_to: None,
        ..opts.clone()
    };
    if let Some(done) = archive.rollback_record(mark).await? {
        tracing::info!(mark, done_at = %done.time, set_aside = ?done.set_aside, "the rollback to this mark was done already: restoring as without --rollback-to (a cluster stays as it is)");
        return super::run(cfg, &plain).await;
    }
    let aside = set_aside_path(dir, mark);
    let state = if dir.exists() {
        Some(target::inspect(dir)?)
    } else {
        None
    };
    match state {
        Some(TargetState::Cluster) if aside.exists() => {
            // Set aside and restored by an earlier run that stopped before its record: done.
            tracing::info!(mark, dir = %dir.display(), set_aside = %aside.display(), "an earlier run rolled back to this mark; recording it");
            archive
                .record_rollback(&RollbackRecord {
                    mark: mark.into(),
                    time: Utc::now(),
                    backup: "(an earlier run's)".into(),
                    set_aside: Some(aside),
                })
                .await?;
            return Ok(RestoreOutcome::AlreadyACluster);
        }
        Some(TargetState::Cluster) => {
            if dir.join("postmaster.pid").exists() {
                bail!(
                    "{} has a postmaster.pid: a server may be running there; stop it before a rollback (nothing was changed)",
                    dir.display()
                );
            }
            std::fs::rename(dir, &aside).with_context(|| {
                format!("setting {} aside as {}", dir.display(), aside.display())
            })?;
            if let Some(parent) = aside.parent() {
                crate::fsutil::sync_dir(parent)
                    .with_context(|| format!("syncing {}", parent.display()))?;
            }
            tracing::warn!(dir = %dir.display(), set_aside = %aside.display(), "the current data directory is set aside (not deleted): remove it once the rollback is good");
        }
        Some(TargetState::Other) => bail!(
            "{} is not empty and holds no cluster: refusing to roll back into it (nothing was changed)",
            dir.display()
        ),
        Some(TargetState::Empty | TargetState::Interrupted) | None => {}
    }
    tracing::info!(mark, lsn = %m.lsn, timeline = %m.timeline, note = %m.note, "rolling back to the mark");
    let to_mark = RestoreOptions {
        target: Some(RecoveryTarget::Name(mark.to_string())),
        overwrite: false,
        ..plain
    };
    match super::run(cfg, &to_mark).await? {
        RestoreOutcome::Restored(meta) => {
            archive
                .record_rollback(&RollbackRecord {
                    mark: mark.into(),
                    time: Utc::now(),
                    backup: meta.id.to_string(),
                    set_aside: aside.exists().then_some(aside),
                })
                .await
                .context("recording the rollback in storage")?;
            Ok(RestoreOutcome::Restored(meta))
        }
        RestoreOutcome::NoBackup => bail!("storage holds no base backup to roll back from"),
        RestoreOutcome::AlreadyACluster => Ok(RestoreOutcome::AlreadyACluster),
    }
}
