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
    let to_mark = RestoreOptions {
        target: Some(RecoveryTarget::Name(mark.to_string())),
        overwrite: false,
        ..plain.clone()
    };
    let aside = set_aside_path(dir, mark);
    // What this rollback has done so far, beside the directory on the same volume (fsynced):
    // "set-aside" once the cluster is renamed, "restored" once the restore to the mark is done.
    let state_file = aside.with_file_name(format!(
        "{}.state",
        aside.file_name().expect("a name").to_string_lossy()
    ));
    let state = std::fs::read_to_string(&state_file).unwrap_or_default();
    let here = if dir.exists() {
        Some(target::inspect(dir)?)
    } else {
        None
    };
    match (state.trim(), here) {
        ("restored", Some(TargetState::Cluster)) => {
            tracing::info!(mark, dir = %dir.display(), "an earlier run restored to this mark; recording it");
            archive
                .record_rollback(&RollbackRecord {
                    mark: mark.into(),
                    time: Utc::now(),
                    backup: "(an earlier run's)".into(),
                    set_aside: aside.exists().then_some(aside),
                })
                .await?;
            return Ok(RestoreOutcome::AlreadyACluster);
        }
        ("set-aside", Some(TargetState::Cluster)) => bail!(
            "{} holds a cluster again after it was set aside for a rollback to {mark:?} (see {}): \
             decide by hand (remove the new cluster to roll back, or the state file to roll back \
             this one too); nothing was changed",
            dir.display(),
            state_file.display()
        ),
        (_, Some(TargetState::Cluster)) => {
            if dir.join("postmaster.pid").exists() {
                bail!(
                    "{} has a postmaster.pid: a server may be running there (or the file is stale, \
                     after a crash: then remove it); stop it before a rollback (nothing was changed)",
                    dir.display()
                );
            }
            if aside.exists() {
                bail!(
                    "{} exists already: refusing to set {} aside over it (nothing was changed)",
                    aside.display(),
                    dir.display()
                );
            }
            // Everything that can refuse the restore is asked first, before the cluster moves:
            // a backup before the mark, its WAL in storage, and no tablespace to restore where
            // the cluster set aside still keeps one.
            let Some((_, meta, _)) = super::choose::find_backup(cfg, &to_mark).await? else {
                bail!("storage holds no base backup to roll back from (nothing was changed)");
            };
            if meta.archives.iter().any(|a| a.location.is_some()) && opts.tablespace_map.is_empty()
            {
                bail!(
                    "backup {} has tablespaces, which the cluster set aside would keep using: a \
                     rollback in place cannot restore them; restore elsewhere with --target-name \
                     and --tablespace-map (nothing was changed)",
                    meta.id
                );
            }
            std::fs::rename(dir, &aside).with_context(|| {
                format!("setting {} aside as {}", dir.display(), aside.display())
            })?;
            crate::fsutil::write_atomic(&state_file, b"set-aside\n")
                .with_context(|| format!("writing {}", state_file.display()))?;
            tracing::warn!(dir = %dir.display(), set_aside = %aside.display(), "the current data directory is set aside (not deleted): remove it once the rollback is good");
        }
        (_, Some(TargetState::Other)) => bail!(
            "{} is not empty and holds no cluster: refusing to roll back into it (nothing was changed)",
            dir.display()
        ),
        (_, Some(TargetState::Empty | TargetState::Interrupted) | None) => {}
    }
    tracing::info!(mark, lsn = %m.lsn, timeline = %m.timeline, note = %m.note, "rolling back to the mark");
    match super::run(cfg, &to_mark).await? {
        RestoreOutcome::Restored(meta) => {
            crate::fsutil::write_atomic(&state_file, b"restored\n")
                .with_context(|| format!("writing {}", state_file.display()))?;
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
