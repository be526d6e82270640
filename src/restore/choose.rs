//! Choosing the backup to restore: latest, by id, or the newest that ended before a
//! point-in-time target; and refusing one whose WAL is not in storage.

use anyhow::{anyhow, bail};
use chrono::Utc;

use crate::cluster;
use crate::config::{Config, StorageUrl};
use crate::storage::{Archive, BackupMeta, Repo, StorageError};

use super::{BackupChoice, RecoveryTarget, RestoreOptions};

/// WAL files read at once when looking for a restore point.
const SCAN_PARALLELISM: usize = 4;

/// The archive, the backup to restore and the recovery target to write (a name that is a mark
/// becomes the mark's LSN); None when storage holds no backup (or no archive at all: a `file://`
/// directory never written, or one without a format marker).
pub(super) async fn find_backup(
    cfg: &Config,
    opts: &RestoreOptions,
) -> anyhow::Result<Option<(Archive, BackupMeta, Option<RecoveryTarget>)>> {
    let repo = match (Repo::open(&cfg.storage_settings(), false), &cfg.storage) {
        (Ok(r), _) => r,
        // A file:// archive that was never written holds no backup.
        (Err(StorageError::Setup { .. }), StorageUrl::File { root }) if !root.exists() => {
            return Ok(None);
        }
        (Err(e), _) => return Err(e.into()),
    };
    if !repo.holds_archive().await? {
        return Ok(None);
    }
    let system_identifier = match cfg.system_identifier {
        Some(id) => id,
        None => match repo.clusters().await?.len() {
            0 => return Ok(None),
            _ => cluster::resolve_from_storage(&repo).await?,
        },
    };
    find_in(Archive::new(repo, system_identifier), opts).await
}

/// As [`find_backup`], in one cluster's archive (this release's, or a seed's source).
pub(super) async fn find_in(
    archive: Archive,
    opts: &RestoreOptions,
) -> anyhow::Result<Option<(Archive, BackupMeta, Option<RecoveryTarget>)>> {
    let backups = archive.backups().await?;
    if backups.is_empty() {
        return Ok(None);
    }
    let target = match &opts.target {
        Some(RecoveryTarget::Name(name)) => match archive.mark(name).await? {
            Some(m) => {
                tracing::info!(mark = %m.name, lsn = %m.lsn, timeline = %m.timeline, note = %m.note, "restoring to a mark");
                if backups.iter().all(|b| b.end_lsn > m.lsn) {
                    bail!(
                        "mark {name:?} is at {}, before the oldest backup ended ({}): no backup \
                         can reach it",
                        m.lsn,
                        backups.last().expect("not empty").end_lsn
                    );
                }
                Some(RecoveryTarget::Mark {
                    name: m.name,
                    lsn: m.lsn,
                    timeline: m.timeline,
                })
            }
            None => {
                tracing::info!(
                    "--target-name {name:?}: no mark of that name in storage; looking for a \
                     restore point of that name (pg_create_restore_point) in the WAL"
                );
                opts.target.clone()
            }
        },
        other => other.clone(),
    };
    let opts = &RestoreOptions {
        target: target.clone(),
        ..opts.clone()
    };
    let backups = on_history(&archive, backups, opts).await?;
    let mut chosen = choose(&backups, opts)?.clone();
    if let Some(RecoveryTarget::Name(name)) = &target {
        chosen = with_restore_point(&archive, &backups, chosen, name, opts).await?;
    }
    tracing::info!(backup = %chosen.id, end_lsn = %chosen.end_lsn, end_time = %chosen.end_time, "chosen backup");
    let missing = archive.missing_wal(&chosen.required_wal()).await?;
    if !missing.is_empty() {
        bail!(
            "backup {} cannot be restored: the WAL it needs is not in storage (missing {})",
            chosen.id,
            crate::pg::lsn::join_names(&missing)
        );
    }
    Ok(Some((archive, chosen, target)))
}

/// The backup to restore to the restore point `name` (made by pg_create_restore_point, no mark):
/// `chosen` when the WAL after its end holds it; else, unless a backup was named, the newest that
/// ended before it (the WAL is searched from the oldest backup's start once). An error when the WAL
/// holds no such restore point, or none after a backup's end.
async fn with_restore_point(
    archive: &Archive,
    backups: &[BackupMeta],
    chosen: BackupMeta,
    name: &str,
    opts: &RestoreOptions,
) -> anyhow::Result<BackupMeta> {
    use super::points::{Found, find};
    let mut found = find(archive, &chosen, name, SCAN_PARALLELISM).await?;
    let mut searched_from = &chosen;
    let named = matches!(opts.backup, BackupChoice::Id(_));
    let after_chosen = matches!(found, Found::In(_, lsn) if lsn > chosen.end_lsn);
    if !named
        && !after_chosen
        && let Some(oldest) = backups.last().filter(|o| o.id != chosen.id)
    {
        found = find(archive, oldest, name, SCAN_PARALLELISM).await?;
        searched_from = oldest;
    }
    match found {
        Found::In(file, lsn) => {
            let pick = if named {
                Some(chosen.clone())
            } else {
                backups.iter().find(|b| b.end_lsn < lsn).cloned()
            };
            match pick {
                Some(b) => {
                    tracing::info!(name, wal = %file, lsn = %lsn, "the WAL holds a restore point of that name");
                    Ok(b)
                }
                None => bail!(
                    "--target-name {name:?}: the restore point of that name (in {file}) was made before \
                     the oldest backup ended: no backup can reach it; nothing was written"
                ),
            }
        }
        Found::Nowhere { scanned } => bail!(
            "--target-name {name:?}: no mark of that name, and no restore point of that name \
             in the WAL after backup {} ({scanned} WAL files from {} on): `pgkeep list` \
             shows the marks; nothing was written",
            searched_from.id,
            searched_from.start_lsn
        ),
    }
}

/// Only the backups on the history recovery will follow: the mark's timeline, else the newest
/// timeline in storage (what `recovery_target_timeline = 'latest'` reaches). A backup of another
/// timeline is on it only if that timeline is in the history file and the backup ended before
/// the switch: a timeline left behind by a rollback or a PITR carries backups (even newer ones)
/// of another history, from which recovery cannot reach the target. When the history cannot be
/// read (or nothing would be left) the list stays as it is.
async fn on_history(
    archive: &Archive,
    backups: Vec<BackupMeta>,
    opts: &RestoreOptions,
) -> anyhow::Result<Vec<BackupMeta>> {
    if matches!(opts.backup, BackupChoice::Id(_)) {
        return Ok(backups);
    }
    let target = match &opts.target {
        Some(RecoveryTarget::Mark { timeline, .. }) => *timeline,
        _ => match archive.wal_end(backups[0].wal_segment_size).await? {
            Some((_, tli, _)) => tli,
            None => return Ok(backups),
        },
    };
    let history = if target.get() > 1 {
        let key = archive
            .layout()
            .wal(&crate::pg::WalFileName::history(target));
        match archive.repo().get(&key).await {
            Ok(text) => match crate::verify::parse_history(&String::from_utf8_lossy(&text)) {
                Ok(h) => h,
                Err(e) => {
                    tracing::warn!("{key}: {e}; choosing among all backups");
                    return Ok(backups);
                }
            },
            Err(e) => {
                tracing::debug!("{key}: {e}; choosing among all backups");
                return Ok(backups);
            }
        }
    } else {
        vec![]
    };
    let on = |b: &BackupMeta| {
        b.timeline == target
            || history
                .iter()
                .any(|(tli, switch)| *tli == b.timeline && b.end_lsn <= *switch)
    };
    let (kept, other): (Vec<_>, Vec<_>) = backups.into_iter().partition(|b| on(b));
    if kept.is_empty() {
        tracing::warn!(timeline = %target, "no backup lies on the history of timeline {target}; choosing among all");
        let mut all = other;
        all.sort_by(|a, b| b.id.cmp(&a.id));
        return Ok(all);
    }
    for b in &other {
        tracing::info!(backup = %b.id, timeline = %b.timeline, "not on the history of timeline {target}: not chosen");
    }
    Ok(kept)
}

/// The backup `opts` asks for among `backups` (newest first, not empty).
fn choose<'a>(backups: &'a [BackupMeta], opts: &RestoreOptions) -> anyhow::Result<&'a BackupMeta> {
    let oldest = backups.last().expect("not empty");
    Ok(match (&opts.backup, &opts.target) {
        (BackupChoice::Id(id), _) => backups.iter().find(|b| b.id == *id).ok_or_else(|| {
            anyhow!(
                "there is no backup {id}; the backups are: {}",
                backups
                    .iter()
                    .map(|b| b.id.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })?,
        (BackupChoice::Latest, None) => &backups[0],
        (BackupChoice::Latest, Some(RecoveryTarget::Time { at, text })) => backups
            .iter()
            .find(|b| b.end_time <= at.with_timezone(&Utc))
            .ok_or_else(|| {
                anyhow!(
                    "no backup ended before {text}; the oldest ended at {}",
                    oldest.end_time
                )
            })?,
        // A mark's backups were already kept to its timeline's history (`on_history`).
        (
            BackupChoice::Latest,
            Some(RecoveryTarget::Lsn(l) | RecoveryTarget::Mark { lsn: l, .. }),
        ) => backups.iter().find(|b| b.end_lsn <= *l).ok_or_else(|| {
            anyhow!(
                "no backup ended before LSN {l}; the oldest ended at {}",
                oldest.end_lsn
            )
        })?,
        // A restore point's backup is chosen by where the WAL holds it (`with_restore_point`).
        (BackupChoice::Latest, Some(RecoveryTarget::Name(_))) => &backups[0],
        (BackupChoice::Latest, Some(t)) => {
            tracing::info!(
                "the backups' metadata cannot tell which of them precede {t:?}: using the latest; \
                 if recovery cannot reach the target, choose an older one with --backup"
            );
            &backups[0]
        }
    })
}
