//! `restore --seed-from URL`: a new release's first restore, from another release's archive. The
//! backup restore would choose there, the WAL from its start on (every timeline from its own on),
//! every history file and the marks are copied as they are stored (encrypted objects stay sealed)
//! into this release's storage, verified and durable there, the backup's record last; the restore
//! then runs from this release's storage as any other. The source is only ever read. Seeding is
//! skipped once this release's storage holds a backup of the cluster: a repeated or interrupted
//! run copies what is missing (identical copies are left alone), and a later restore uses this
//! release's own archive.

use std::time::Instant;

use anyhow::{Context, anyhow, bail};
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path;

use crate::cluster;
use crate::config::{Config, StorageUrl};
use crate::pg::{WalFileKind, WalFileName};
use crate::progress::human_bytes;
use crate::storage::{Archive, BackupMeta, ClusterInfo, Repo};

use super::RestoreOptions;

/// What a seed copied (nothing when this release's storage held a backup of the cluster).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Seeded {
    pub objects: usize,
    pub bytes: u64,
}

pub(super) async fn seed(
    cfg: &Config,
    opts: &RestoreOptions,
    from: &StorageUrl,
) -> anyhow::Result<Seeded> {
    if *from == cfg.storage {
        bail!("--seed-from {from} is this release's own storage: name the other release's archive");
    }
    let source = Repo::open(&cfg.storage_settings_for(from), false)
        .with_context(|| format!("opening the seed's source archive {from}"))?;
    if !source.holds_archive().await? {
        bail!("--seed-from {from}: no pgkeep archive there (it holds no format marker)");
    }
    let system_identifier = match cfg.system_identifier {
        Some(id) => id,
        None => cluster::resolve_from_storage(&source)
            .await
            .with_context(|| format!("--seed-from {from}"))?,
    };
    let own = Repo::open(&cfg.storage_settings(), true)?;
    if own.holds_archive().await?
        && !Archive::new(own.clone(), system_identifier)
            .backups()
            .await?
            .is_empty()
    {
        tracing::info!(
            cluster = system_identifier,
            storage = %cfg.storage,
            "this release's storage holds a backup of the cluster already: restoring from it, not seeding from {from}"
        );
        return Ok(Seeded::default());
    }
    let (src, meta, _) = super::choose::find_in(Archive::new(source, system_identifier), opts)
        .await
        .with_context(|| format!("--seed-from {from}"))?
        .ok_or_else(|| {
            anyhow!("--seed-from {from}: it holds no base backup of cluster {system_identifier}")
        })?;
    let info_key = src.layout().info();
    let info: ClusterInfo = serde_json::from_slice(&src.repo().get(&info_key).await?)
        .with_context(|| format!("{info_key}: not a cluster description"))?;
    if info.system_identifier != system_identifier {
        bail!(
            "{info_key} describes cluster {}, not {system_identifier}",
            info.system_identifier
        );
    }
    tracing::info!(from = %from, backup = %meta.id, timeline = %meta.timeline, start_lsn = %meta.start_lsn, "seeding this release's storage from another archive");
    let started = Instant::now();
    // An incremental backup comes with every backup it builds on.
    let chain = src.chain(&meta).await?;
    let keys = to_copy(&src, &meta, &chain).await?;
    tracing::info!(objects = keys.len(), "copying");
    let archive = own.ensure_cluster(&info).await?;
    let records: Vec<Path> = chain
        .iter()
        .map(|m| src.layout().backup_meta(&m.id))
        .collect();
    // The records last, oldest first: a backup exists only once all it builds on does.
    let (mut record, rest): (Vec<Path>, Vec<Path>) =
        keys.into_iter().partition(|k| records.contains(k));
    record.sort_by_key(|k| records.iter().position(|r| r == k));
    let mut seeded = Seeded::default();
    let mut progress = crate::progress::Progress::new("seeding", None);
    let mut copies = futures::stream::iter(rest.iter().map(|key| {
        let (own, src) = (archive.repo(), src.repo());
        async move { own.copy_from(src, key, true).await }
    }))
    .buffer_unordered(cfg.parallelism.max(1));
    while let Some((_, len)) = copies.try_next().await? {
        seeded.objects += 1;
        seeded.bytes += len;
        progress.add(len);
    }
    progress.finish();
    drop(copies);
    // Everything the record names is durable before the record makes the backup exist.
    archive.repo().sync_all().await?;
    for key in &record {
        let (_, len) = archive.repo().copy_from(src.repo(), key, false).await?;
        seeded.objects += 1;
        seeded.bytes += len;
    }
    tracing::info!(
        objects = seeded.objects,
        size = %human_bytes(seeded.bytes),
        seconds = crate::progress::round3(started.elapsed().as_secs_f64()),
        from = %from,
        "seeded this release's storage; the source archive was only read"
    );
    Ok(seeded)
}

/// The source's keys a restore of `meta` and recovery from it need: the objects of its backup and
/// of those it builds on (`chain`), the WAL
/// from its start on (its timeline and later ones; Postgres' own and the daemon's `.partial`
/// uploads), every history file, and the marks. Other backups and rollback records stay behind.
async fn to_copy(
    src: &Archive,
    meta: &BackupMeta,
    chain: &[BackupMeta],
) -> anyhow::Result<Vec<Path>> {
    let layout = src.layout();
    let size = meta.wal_segment_size;
    let first = size.segment_of(meta.start_lsn);
    let wanted = |name: &str| -> bool {
        let Ok(n) = name.parse::<WalFileName>() else {
            return false;
        };
        match n.kind {
            WalFileKind::History => true,
            _ => n.timeline >= meta.timeline && n.segment_no(size).is_ok_and(|s| s.0 >= first.0),
        }
    };
    let mut keys = vec![];
    for key in src.repo().list(&layout.wal_root()).await? {
        if key.filename().is_some_and(wanted) {
            keys.push(key);
        }
    }
    for key in src.repo().list(&layout.streaming_root()).await? {
        // A piece after a streamed `.partial` goes where its segment goes.
        let piece_of = layout.parse_piece(&key).map(|(seg, _, _)| seg.to_string());
        if piece_of.as_deref().or(key.filename()).is_some_and(wanted) {
            keys.push(key);
        }
    }
    keys.extend(src.repo().list(&layout.marks_dir()).await?);
    for m in chain {
        keys.extend(src.repo().list(&layout.backup_dir(&m.id)).await?);
    }
    Ok(keys)
}
