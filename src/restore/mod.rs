//! `pgkeep restore`, the init container: chooses a base backup, downloads, verifies and unpacks it in
//! parallel into an empty data directory, and writes the recovery settings. Safe to run on every pod
//! start: a directory that already holds a cluster is left alone, and an interrupted restore (its
//! marker is written first and removed last) is redone.
//!
//! The stages, each in its own file: `target` (the directory and its marker), `choose` (which
//! backup), `unpack` (its data, manifest and WAL), `recovery` (the settings Postgres reads).

mod choose;
mod files;
mod incremental;
mod points;
mod recovery;
mod references;
pub mod rollback;
mod seed;
mod target;
mod unpack;

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, bail};
use chrono::{DateTime, FixedOffset};

use crate::config::Config;
use crate::pg::Lsn;
use crate::progress::human_bytes;
use crate::storage::BackupMeta;
use crate::storage::layout::BackupId;

pub use recovery::restore_command;
pub use target::MARKER;
#[doc(hidden)]
pub use unpack::extract_data_archive;

/// Which backup to restore.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackupChoice {
    Latest,
    Id(BackupId),
}

/// Where recovery stops.
#[derive(Debug, Clone, PartialEq)]
pub enum RecoveryTarget {
    Time {
        at: DateTime<FixedOffset>,
        text: String,
    },
    Lsn(Lsn),
    Xid(String),
    Name(String),
    /// A mark (`pgkeep mark`): recovery stops right after its restore point, by LSN on its
    /// timeline (a restore point's name may repeat in the WAL; the mark's LSN does not).
    Mark {
        name: String,
        lsn: Lsn,
        timeline: crate::pg::TimelineId,
    },
}

impl RecoveryTarget {
    /// Parses a recovery target time. A time zone is required: without one Postgres would read it in
    /// the server's zone, which pgkeep cannot know when it chooses the backup.
    pub fn parse_time(text: &str) -> anyhow::Result<RecoveryTarget> {
        let t = text.trim();
        let at = DateTime::parse_from_rfc3339(t)
            .or_else(|_| DateTime::parse_from_str(t, "%Y-%m-%d %H:%M:%S%.f%#z"))
            .or_else(|_| DateTime::parse_from_str(t, "%Y-%m-%d %H:%M:%S%.f %#z"))
            .map_err(|_| {
                anyhow!("--target-time {t:?}: expected a time with a time zone, like 2026-11-21 23:45:00+00 or 2026-11-21T23:45:00Z")
            })?;
        Ok(RecoveryTarget::Time {
            at,
            text: t.to_string(),
        })
    }

    pub fn parse_xid(text: &str) -> anyhow::Result<RecoveryTarget> {
        text.trim()
            .parse::<u64>()
            .map(|x| RecoveryTarget::Xid(x.to_string()))
            .map_err(|_| {
                anyhow!("--target-xid {text:?}: expected a transaction id (a whole number)")
            })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetAction {
    Promote,
    Pause,
    Shutdown,
}

#[derive(Debug, Clone)]
pub struct RestoreOptions {
    pub target_dir: PathBuf,
    pub backup: BackupChoice,
    pub target: Option<RecoveryTarget>,
    pub target_action: TargetAction,
    pub standby: bool,
    pub overwrite: bool,
    pub require_backup: bool,
    /// Tablespace locations to move: (old, new).
    pub tablespace_map: Vec<(PathBuf, PathBuf)>,
    /// The pgkeep that restore_command runs (default: this executable).
    pub pgkeep_path: Option<PathBuf>,
    /// `--rollback-to MARK`: set a cluster aside and restore to the mark, once.
    pub rollback_to: Option<String>,
    /// `--seed-from URL`: another release's archive to copy the backup and its WAL from, read
    /// only, when this release's storage holds no backup of the cluster yet.
    pub seed_from: Option<crate::config::StorageUrl>,
}

#[derive(Debug)]
pub enum RestoreOutcome {
    /// The directory already holds a cluster; nothing was done.
    AlreadyACluster,
    /// Storage holds no backup; nothing was done.
    NoBackup,
    Restored(Box<BackupMeta>),
}

/// Restores a backup into `opts.target_dir`: the script of the init container.
pub async fn restore(cfg: &Config, opts: &RestoreOptions) -> anyhow::Result<RestoreOutcome> {
    let created = !opts.target_dir.exists();
    let result = match &opts.rollback_to {
        Some(mark) => rollback::rollback(cfg, opts, mark).await,
        None => run(cfg, opts).await,
    };
    if result.is_err() && created {
        // A directory this restore made and never wrote into (say, the backup asked for does not
        // exist) is not left behind; one holding the marker stays, marked as interrupted.
        let _ = std::fs::remove_dir(&opts.target_dir);
    }
    result
}

async fn run(cfg: &Config, opts: &RestoreOptions) -> anyhow::Result<RestoreOutcome> {
    let dir = &opts.target_dir;
    let Some(state) = target::check_target(opts)? else {
        return Ok(RestoreOutcome::AlreadyACluster);
    };
    if let Some(from) = &opts.seed_from {
        seed::seed(cfg, opts, from).await?;
    }
    let Some((archive, meta, target)) = choose::find_backup(cfg, opts).await? else {
        if opts.require_backup {
            bail!(
                "storage {} holds no base backup to restore (--require-backup)",
                cfg.storage
            );
        }
        tracing::info!(storage = %cfg.storage, "storage holds no base backup: nothing to restore; Postgres may initialise a new cluster");
        return Ok(RestoreOutcome::NoBackup);
    };
    let started = Instant::now();
    // An incremental backup is restored on the backups it builds on: all must be there first.
    let chain = archive.chain(&meta).await?;
    let tablespace_dirs = target::prepare(opts, &state, &meta)?;
    // The backup's own WAL downloads while its data unpacks.
    let (unpacked, early) = tokio::join!(
        unpack::unpack_chain(&archive, &chain, dir, &opts.tablespace_map, cfg.parallelism),
        unpack::download_early_wal(&archive, &meta)
    );
    let (took, manifest) = unpacked?;
    unpack::write_manifest_and_wal(&archive, &meta, dir, &manifest, early?, cfg.parallelism)
        .await?;
    let settled = RestoreOptions {
        target,
        ..opts.clone()
    };
    recovery::write_recovery_settings(cfg, &settled, &meta, dir)?;
    target::finish(dir, &tablespace_dirs)?;
    let bytes: u64 = chain.iter().map(|m| m.plain_bytes).sum();
    tracing::info!(
        backup = %meta.id,
        chain = chain.len(),
        dir = %dir.display(),
        size = %human_bytes(bytes),
        seconds = crate::progress::round3(took.as_secs_f64()),
        mb_per_s = crate::progress::mb_per_s(bytes, took),
        total_seconds = crate::progress::round3(started.elapsed().as_secs_f64()),
        "restored; start Postgres to recover"
    );
    Ok(RestoreOutcome::Restored(Box::new(meta)))
}

/// Where a tablespace that lived at `loc` is restored.
fn map_location(map: &[(PathBuf, PathBuf)], loc: &Path) -> PathBuf {
    map.iter()
        .find(|(old, _)| old == loc)
        .map(|(_, new)| new.clone())
        .unwrap_or_else(|| loc.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recovery_target_times_need_a_zone() {
        for ok in [
            "2026-11-21 23:45:00+00",
            "2026-11-21 23:45:00.123456+00",
            "2026-11-21T23:45:00Z",
            "2026-11-21 23:45:00+05:30",
        ] {
            assert!(RecoveryTarget::parse_time(ok).is_ok(), "{ok}");
        }
        for bad in ["2026-11-21 23:45:00", "yesterday", ""] {
            assert!(RecoveryTarget::parse_time(bad).is_err(), "{bad}");
        }
    }
}
