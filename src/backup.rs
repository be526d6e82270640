//! Base backups over the replication protocol (`BASE_BACKUP`, Postgres 15+ syntax), cut into chunks
//! that are compressed and uploaded in parallel with bounded memory. The metadata object is written
//! last and is what makes a backup exist: an interrupted backup leaves only chunks that nothing lists.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use bytes::{Buf, Bytes};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::codec::Codec;
use crate::config::Config;
use crate::pg::replication::{Event, ReplConnection, ResultSet};
use crate::pg::{Lsn, TimelineId, WalFileName, WalSegSize};
use crate::progress::{Progress, human_bytes};
use crate::storage::layout::{ArchiveName, BackupId};
use crate::storage::object;
use crate::storage::{ClusterInfo, ClusterLayout, Repo, StorageError};

/// Version of `backup.json`; readers refuse newer ones.
pub const META_VERSION: u32 = 1;

/// `backup.json`: everything needed to list, choose and restore a backup.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BackupMeta {
    pub meta_version: u32,
    pub id: BackupId,
    pub label: String,
    /// Decimal, as a string (JSON readers lose precision past 2^53).
    pub system_identifier: String,
    pub pg_version: String,
    pub wal_segment_size: u32,
    pub timeline: u32,
    pub start_lsn: String,
    pub end_lsn: String,
    pub start_time: DateTime<Utc>,
    pub end_time: DateTime<Utc>,
    /// Codec of the chunks.
    pub codec: String,
    pub archives: Vec<ArchiveMeta>,
    /// SHA-256 of the backup manifest.
    pub manifest_sha256: String,
    pub plain_bytes: u64,
    pub stored_bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ArchiveMeta {
    pub name: ArchiveName,
    /// The tablespace's location on the backed-up server (None for the data directory).
    pub location: Option<String>,
    pub plain_bytes: u64,
    pub stored_bytes: u64,
    /// In order; chunk `i` is stored under `layout::backup_chunk(id, name, i)`.
    pub chunks: Vec<ChunkMeta>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ChunkMeta {
    pub plain_len: u64,
    pub stored_len: u64,
    pub sha256: String,
}

impl BackupMeta {
    pub fn start(&self) -> Lsn {
        self.start_lsn.parse().expect("validated on load")
    }
    pub fn end(&self) -> Lsn {
        self.end_lsn.parse().expect("validated on load")
    }
    pub fn seg_size(&self) -> WalSegSize {
        WalSegSize::new(self.wal_segment_size).expect("validated on load")
    }
    pub fn timeline_id(&self) -> TimelineId {
        TimelineId::new(self.timeline).expect("validated on load")
    }

    /// The WAL segments recovery needs to make this backup consistent: from the one holding its start
    /// to the one holding the last byte before its end.
    pub fn required_wal(&self) -> Vec<WalFileName> {
        required_wal(
            self.timeline_id(),
            self.seg_size(),
            self.start(),
            self.end(),
        )
    }

    fn validate(&self) -> Result<(), String> {
        if self.meta_version > META_VERSION {
            return Err(format!(
                "metadata version {} is newer than this pgkeep reads",
                self.meta_version
            ));
        }
        self.start_lsn.parse::<Lsn>().map_err(|e| e.to_string())?;
        self.end_lsn.parse::<Lsn>().map_err(|e| e.to_string())?;
        WalSegSize::new(self.wal_segment_size).ok_or("bad wal_segment_size")?;
        TimelineId::new(self.timeline).ok_or("timeline 0")?;
        // The server sends each tablespace's archive, then base.tar.
        if self
            .archives
            .iter()
            .filter(|a| a.name.tablespace_oid().is_none())
            .count()
            != 1
        {
            return Err("a backup holds exactly one base.tar".into());
        }
        Ok(())
    }
}

/// Reads and validates `backup.json` of `id`; `Ok(None)` when the backup does not exist (never
/// finished).
pub async fn load_meta(
    repo: &Repo,
    cluster: &ClusterLayout,
    id: &BackupId,
) -> Result<Option<BackupMeta>, anyhow::Error> {
    let key = cluster.backup_meta(id);
    let raw = match repo.get(&key).await {
        Ok(raw) => raw,
        Err(StorageError::NotFound { .. }) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let meta: BackupMeta =
        serde_json::from_slice(&raw).map_err(|e| anyhow!("{key}: not backup metadata: {e}"))?;
    meta.validate().map_err(|e| anyhow!("{key}: {e}"))?;
    if meta.id != *id || meta.system_identifier != cluster.system_identifier.to_string() {
        bail!(
            "{key}: describes backup {} of cluster {}, not this one",
            meta.id,
            meta.system_identifier
        );
    }
    Ok(Some(meta))
}

/// Every complete backup of the cluster, newest first. Folders without metadata (backups in progress
/// or interrupted) are skipped.
pub async fn list_backups(repo: &Repo, cluster: &ClusterLayout) -> anyhow::Result<Vec<BackupMeta>> {
    let mut out = vec![];
    for dir in repo.list_dirs(&cluster.backups_dir()).await? {
        let Ok(id) = dir.parse::<BackupId>() else {
            continue;
        };
        if let Some(meta) = load_meta(repo, cluster, &id).await? {
            out.push(meta);
        }
    }
    out.sort_by(|a, b| b.id.cmp(&a.id));
    Ok(out)
}

/// An uploaded chunk's place and description.
struct Uploaded {
    archive: usize,
    seq: usize,
    meta: ChunkMeta,
}

/// State of the archive being received.
struct Current {
    index: usize,
    seq: usize,
    buf: Vec<u8>,
}

/// Cuts the archives into chunks and uploads them with at most `parallelism` in flight.
struct Uploader {
    repo: Repo,
    cluster: ClusterLayout,
    id: BackupId,
    codec: Codec,
    chunk_bytes: usize,
    permits: Arc<Semaphore>,
    tasks: JoinSet<Result<Uploaded, StorageError>>,
    done: Vec<Uploaded>,
    /// Chunk buffers back from sealing, reused: a fresh 16 MB buffer costs a page fault per 4 KB
    /// (measured: about a tenth of a backup's CPU). At most `parallelism + 2` exist at once anyway.
    spare: Arc<std::sync::Mutex<Vec<Vec<u8>>>>,
}

impl Uploader {
    /// An empty chunk buffer: a spare one when there is one.
    fn buffer(&self) -> Vec<u8> {
        match self.spare.lock().expect("not poisoned").pop() {
            Some(mut b) => {
                b.clear();
                b
            }
            None => Vec::with_capacity(self.chunk_bytes),
        }
    }

    async fn submit(
        &mut self,
        archive: &ArchiveName,
        index: usize,
        seq: usize,
        data: Vec<u8>,
    ) -> anyhow::Result<()> {
        // Waiting for a permit stops us reading the replication stream: back-pressure to the server
        // keeps memory bounded by (parallelism + 1) chunks whatever the database size.
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .expect("semaphore open");
        self.reap()?;
        let (repo, key, codec, spare) = (
            self.repo.clone(),
            self.cluster.backup_chunk(&self.id, archive, seq),
            self.codec,
            self.spare.clone(),
        );
        self.tasks.spawn(async move {
            let _permit = permit;
            let plain_len = data.len() as u64;
            let (sha, sealed) = tokio::task::spawn_blocking(move || {
                let (header, sealed) = object::seal(codec, &data);
                spare.lock().expect("not poisoned").push(data);
                (hex::encode(header.plain_sha256), sealed)
            })
            .await
            .expect("sealing does not panic");
            let stored_len = repo.put_sealed_deferred(&key, sealed).await?;
            Ok(Uploaded {
                archive: index,
                seq,
                meta: ChunkMeta {
                    plain_len,
                    stored_len,
                    sha256: sha,
                },
            })
        });
        Ok(())
    }

    /// Collects finished uploads, surfacing the first failure at once.
    fn reap(&mut self) -> anyhow::Result<()> {
        while let Some(r) = self.tasks.try_join_next() {
            self.done.push(r.context("upload task")??);
        }
        Ok(())
    }

    async fn finish(mut self) -> anyhow::Result<Vec<Uploaded>> {
        while let Some(r) = self.tasks.join_next().await {
            self.done.push(r.context("upload task")??);
        }
        Ok(self.done)
    }
}

/// Takes one base backup now and waits until it exists in storage (data, manifest, its WAL, metadata).
pub async fn take_backup(cfg: &Config) -> anyhow::Result<BackupMeta> {
    let mut conn = ReplConnection::connect(&cfg.pg).await?;
    let sys = conn.identify_system().await?;
    let seg_size = conn.wal_segment_size().await?;
    let version_num: u32 = conn.show("server_version_num").await?.parse().unwrap_or(0);
    if version_num < 150000 {
        bail!("pgkeep backup needs Postgres 15 or later (the server is {version_num})");
    }
    let pg_version = conn
        .params
        .get("server_version")
        .cloned()
        .unwrap_or_default();
    let cluster = ClusterLayout::new(sys.system_identifier);
    let repo = Repo::open(cfg, true)?;
    repo.ensure_cluster(
        &cluster,
        &ClusterInfo {
            system_identifier: sys.system_identifier.to_string(),
            wal_segment_size: Some(seg_size.bytes()),
            pg_major: Some(version_num / 10000),
        },
    )
    .await?;

    // Ids are start times to the second. One already taken (a backup running, or the leftovers of one
    // that was killed) is skipped by waiting for the next second.
    let mut start_time = Utc::now();
    let mut id = BackupId::from_time(start_time);
    for _ in 0..5 {
        if repo.list(&cluster.backup_dir(&id)).await?.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(
            1000 - u64::from(start_time.timestamp_subsec_millis()).min(999),
        ))
        .await;
        start_time = Utc::now();
        id = BackupId::from_time(start_time);
    }
    if !repo.list(&cluster.backup_dir(&id)).await?.is_empty() {
        bail!(
            "no free backup id: objects exist under {}",
            cluster.backup_dir(&id)
        );
    }
    let label = format!("pgkeep {id}");
    tracing::info!(backup = %id, system_identifier = sys.system_identifier, "starting base backup");
    let result = stream_backup(cfg, &mut conn, &repo, &cluster, &id, &label).await;
    let (archives, manifest, start, end, tli) = match result {
        Ok(r) => r,
        Err(e) => {
            cleanup(&repo, &cluster, &id).await;
            return Err(e);
        }
    };
    let manifest_sha =
        hex::encode(object::Header::for_content(Codec::None, &manifest).plain_sha256);
    let finish = async {
        repo.put_overwrite(&cluster.backup_manifest(&id), &manifest, cfg.codec)
            .await?;
        wait_for_wal(cfg, &repo, &cluster, tli, seg_size, start, end).await?;
        let meta = BackupMeta {
            meta_version: META_VERSION,
            id: id.clone(),
            label,
            system_identifier: sys.system_identifier.to_string(),
            pg_version,
            wal_segment_size: seg_size.bytes(),
            timeline: tli.get(),
            start_lsn: start.to_string(),
            end_lsn: end.to_string(),
            start_time,
            end_time: Utc::now(),
            codec: cfg.codec.name().to_string(),
            plain_bytes: archives.iter().map(|a| a.plain_bytes).sum(),
            stored_bytes: archives.iter().map(|a| a.stored_bytes).sum(),
            archives,
            manifest_sha256: manifest_sha,
        };
        // Written last: from here on the backup exists.
        let json = serde_json::to_vec_pretty(&meta).expect("serialisable");
        repo.put_new(&cluster.backup_meta(&id), &json, Codec::None)
            .await?;
        Ok::<_, anyhow::Error>(meta)
    };
    match finish.await {
        Ok(meta) => {
            tracing::info!(
                backup = %meta.id,
                start_lsn = %meta.start_lsn,
                end_lsn = %meta.end_lsn,
                timeline = meta.timeline,
                size = %human_bytes(meta.plain_bytes),
                stored = %human_bytes(meta.stored_bytes),
                seconds = (meta.end_time - meta.start_time).num_milliseconds() as f64 / 1000.0,
                "base backup complete"
            );
            Ok(meta)
        }
        Err(e) => {
            cleanup(&repo, &cluster, &id).await;
            Err(e)
        }
    }
}

type Streamed = (Vec<ArchiveMeta>, Vec<u8>, Lsn, Lsn, TimelineId);

async fn stream_backup(
    cfg: &Config,
    conn: &mut ReplConnection,
    repo: &Repo,
    cluster: &ClusterLayout,
    id: &BackupId,
    label: &str,
) -> anyhow::Result<Streamed> {
    conn.send_query(&format!(
        "BASE_BACKUP (LABEL '{}', PROGRESS true, CHECKPOINT 'fast', WAIT false, MANIFEST 'yes', MANIFEST_CHECKSUMS 'CRC32C')",
        label.replace('\'', "''")
    ))
    .await?;
    // Before the copy stream: the start position, then the tablespaces with their sizes (kB).
    let mut sets: Vec<ResultSet> = vec![];
    loop {
        match conn.next_event().await? {
            Event::Rows(s) => sets.push(s),
            Event::CopyStart { .. } => break,
            Event::Done => bail!("BASE_BACKUP ended without sending data"),
        }
    }
    let start_set = sets
        .first()
        .ok_or_else(|| anyhow!("BASE_BACKUP sent no start position"))?;
    let start: Lsn = start_set
        .rows
        .first()
        .and_then(|r| r.first().cloned().flatten())
        .ok_or_else(|| anyhow!("BASE_BACKUP sent no start position"))?
        .parse()?;
    let start_tli: u32 = start_set.rows[0]
        .get(1)
        .cloned()
        .flatten()
        .unwrap_or_default()
        .parse()
        .unwrap_or(0);
    let total_kb: u64 = sets
        .get(1)
        .map(|s| {
            s.rows
                .iter()
                .filter_map(|r| r.get(2).cloned().flatten()?.parse::<u64>().ok())
                .sum()
        })
        .unwrap_or(0);
    let mut progress = Progress::new("backup", Some(total_kb * 1024));

    let mut up = Uploader {
        repo: repo.clone(),
        cluster: *cluster,
        id: id.clone(),
        codec: cfg.codec,
        chunk_bytes: cfg.backup_chunk_bytes,
        permits: Arc::new(Semaphore::new(cfg.parallelism.max(1))),
        tasks: JoinSet::new(),
        done: vec![],
        spare: Arc::default(),
    };
    let mut archives: Vec<(ArchiveName, Option<String>, u64)> = vec![];
    let mut current: Option<Current> = None;
    let mut manifest: Option<Vec<u8>> = None;
    while let Some(mut msg) = conn.next_copy_data().await? {
        if msg.is_empty() {
            bail!("empty CopyData message in the backup stream");
        }
        let kind = msg.get_u8();
        match kind {
            b'n' => {
                if let Some(c) = current.take() {
                    flush(&mut up, &archives, c).await?;
                }
                let name = cstring(&mut msg)?;
                let location = cstring(&mut msg)?;
                let name = ArchiveName::try_from(name).map_err(|e| anyhow!(e))?;
                tracing::debug!(archive = %String::from(name.clone()), %location, "archive starts");
                archives.push((name, (!location.is_empty()).then_some(location), 0));
                current = Some(Current {
                    index: archives.len() - 1,
                    seq: 0,
                    buf: up.buffer(),
                });
            }
            b'd' => {
                if let Some(m) = manifest.as_mut() {
                    m.extend_from_slice(&msg);
                    continue;
                }
                let c = current
                    .as_mut()
                    .ok_or_else(|| anyhow!("backup data before any archive"))?;
                archives[c.index].2 += msg.len() as u64;
                let mut data: Bytes = msg;
                while !data.is_empty() {
                    let room = up.chunk_bytes - c.buf.len();
                    let take = room.min(data.len());
                    c.buf.extend_from_slice(&data.split_to(take));
                    if c.buf.len() == up.chunk_bytes {
                        let full = std::mem::replace(&mut c.buf, up.buffer());
                        up.submit(&archives[c.index].0, c.index, c.seq, full)
                            .await?;
                        c.seq += 1;
                    }
                }
            }
            b'p' => {
                if msg.len() >= 8 {
                    let n = msg.get_u64();
                    progress.add(n.saturating_sub(progress.done()));
                }
            }
            b'm' => {
                if let Some(c) = current.take() {
                    flush(&mut up, &archives, c).await?;
                }
                manifest = Some(vec![]);
            }
            other => bail!("unknown message type {other:#04x} in the backup stream"),
        }
    }
    if let Some(c) = current.take() {
        flush(&mut up, &archives, c).await?;
    }
    // After the copy stream: the end position.
    let mut end: Option<(Lsn, u32)> = None;
    loop {
        match conn.next_event().await? {
            Event::Rows(s) => {
                if let Some(row) = s.rows.first() {
                    let lsn = row.first().cloned().flatten().unwrap_or_default();
                    let tli = row.get(1).cloned().flatten().unwrap_or_default();
                    end = Some((lsn.parse()?, tli.parse().unwrap_or(0)));
                }
            }
            Event::Done => break,
            Event::CopyStart { .. } => bail!("unexpected second copy stream"),
        }
    }
    let (end, end_tli) = end.ok_or_else(|| anyhow!("BASE_BACKUP sent no end position"))?;
    if start_tli != end_tli {
        bail!("the timeline changed during the backup ({start_tli} to {end_tli}); take another");
    }
    let tli = TimelineId::new(end_tli).ok_or_else(|| anyhow!("BASE_BACKUP reported timeline 0"))?;
    let manifest = manifest.ok_or_else(|| anyhow!("the server sent no backup manifest"))?;
    let mut uploaded = up.finish().await?;
    let took = progress.finish();
    uploaded.sort_by_key(|u| (u.archive, u.seq));
    let mut metas: Vec<ArchiveMeta> = archives
        .into_iter()
        .map(|(name, location, plain)| ArchiveMeta {
            name,
            location,
            plain_bytes: plain,
            stored_bytes: 0,
            chunks: vec![],
        })
        .collect();
    for u in uploaded {
        let a = &mut metas[u.archive];
        if a.chunks.len() != u.seq {
            bail!(
                "chunk {} of archive {} is missing",
                a.chunks.len(),
                String::from(a.name.clone())
            );
        }
        a.stored_bytes += u.meta.stored_len;
        a.chunks.push(u.meta);
    }
    let total: u64 = metas.iter().map(|a| a.plain_bytes).sum();
    tracing::info!(
        bytes = total,
        seconds = took.as_secs_f64(),
        mb_per_s = total as f64 / 1048576.0 / took.as_secs_f64().max(0.001),
        "backup data uploaded"
    );
    Ok((metas, manifest, start, end, tli))
}

/// Uploads the last, partial chunk of an archive (an empty archive still gets one chunk).
async fn flush(
    up: &mut Uploader,
    archives: &[(ArchiveName, Option<String>, u64)],
    c: Current,
) -> anyhow::Result<()> {
    if !c.buf.is_empty() || c.seq == 0 {
        up.submit(&archives[c.index].0, c.index, c.seq, c.buf)
            .await?;
    }
    Ok(())
}

fn cstring(b: &mut Bytes) -> anyhow::Result<String> {
    let end = b
        .iter()
        .position(|&c| c == 0)
        .ok_or_else(|| anyhow!("unterminated string in the backup stream"))?;
    let s = String::from_utf8_lossy(&b[..end]).into_owned();
    b.advance(end + 1);
    Ok(s)
}

/// Waits (bounded by `backup_wal_timeout_secs`) until every WAL segment from `start` to `end` is in
/// storage: without them the backup cannot be made consistent. BASE_BACKUP runs with WAIT false,
/// because the server would wait for its archiver forever; this wait is bounded, says what is
/// missing, and also covers WAL that reaches storage by streaming.
async fn wait_for_wal(
    cfg: &Config,
    repo: &Repo,
    cluster: &ClusterLayout,
    tli: TimelineId,
    size: WalSegSize,
    start: Lsn,
    end: Lsn,
) -> anyhow::Result<()> {
    let needed = required_wal(tli, size, start, end);
    let deadline = tokio::time::Instant::now() + cfg.backup_wal_timeout;
    // The archiver usually delivers the last segment within moments: look again soon, then less often.
    let mut pause = Duration::from_millis(50);
    loop {
        let missing = missing_wal(repo, cluster, &needed).await?;
        if missing.is_empty() {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            bail!(
                "the WAL this backup needs is not in storage after {}s: missing {} (of {} to {}). \
                 Set archive_command = 'pgkeep archive-push %p' (or run pgkeep daemon) so WAL reaches storage",
                cfg.backup_wal_timeout.as_secs(),
                missing
                    .iter()
                    .map(|n| n.to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
                needed.first().unwrap(),
                needed.last().unwrap()
            );
        }
        if pause >= Duration::from_secs(1) {
            tracing::info!(missing = missing.len(), first = %missing[0], "waiting for the backup's WAL to reach storage");
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(2));
    }
}

/// The segments from the one holding `start` to the one holding the last byte before `end`.
pub fn required_wal(tli: TimelineId, size: WalSegSize, start: Lsn, end: Lsn) -> Vec<WalFileName> {
    let first = size.segment_of(start);
    let last = size.segment_of(Lsn(end.0.saturating_sub(1)).max(start));
    (first.0..=last.0)
        .map(|n| WalFileName::segment(tli, crate::pg::SegmentNo(n), size))
        .collect()
}

/// Which of `names` (segments of one timeline) are not in storage.
pub async fn missing_wal(
    repo: &Repo,
    cluster: &ClusterLayout,
    names: &[WalFileName],
) -> anyhow::Result<Vec<WalFileName>> {
    let Some(first) = names.first() else {
        return Ok(vec![]);
    };
    let present: HashSet<String> = repo
        .list(&cluster.wal_dir(first.timeline))
        .await?
        .iter()
        .filter_map(|k| k.filename().map(str::to_string))
        .collect();
    Ok(names
        .iter()
        .filter(|n| !present.contains(&n.to_string()))
        .copied()
        .collect())
}

/// Best-effort removal of an unfinished backup's objects (nothing lists them without metadata, but
/// they take space).
async fn cleanup(repo: &Repo, cluster: &ClusterLayout, id: &BackupId) {
    match repo.list(&cluster.backup_dir(id)).await {
        Ok(keys) => {
            for k in keys {
                if let Err(e) = repo.delete(&k).await {
                    tracing::warn!(key = %k, "could not remove a failed backup's object: {e}");
                }
            }
        }
        Err(e) => tracing::warn!(backup = %id, "could not list a failed backup's objects: {e}"),
    }
}
