//! Base backups over the replication protocol (`BASE_BACKUP`, Postgres 15+ syntax), cut into chunks
//! that are compressed and uploaded in parallel with bounded memory. The metadata object is written
//! last and is what makes a backup exist: an interrupted backup leaves only chunks that nothing lists.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::codec::Codec;
use crate::config::Config;
use crate::pg::messages::BackupMessage;
use crate::pg::replication::{Event, ReplConnection, ResultSet, ServerIdentity};
use crate::pg::{Lsn, TimelineId};
use crate::progress::{Progress, human_bytes};
use crate::storage::catalog::{META_VERSION, required_wal};
use crate::storage::layout::{ArchiveName, BackupId};
use crate::storage::object;
use crate::storage::{
    Archive, ArchiveMeta, BackupMeta, ChunkMeta, ClusterInfo, Repo, StorageError,
};

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
    archive: Archive,
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
            self.archive.repo().clone(),
            self.archive.layout().backup_chunk(&self.id, archive, seq),
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

    /// Appends archive bytes to the current chunk, submitting each chunk that fills up.
    async fn add(
        &mut self,
        archive: &ArchiveName,
        c: &mut Current,
        mut data: Bytes,
    ) -> anyhow::Result<()> {
        while !data.is_empty() {
            let take = (self.chunk_bytes - c.buf.len()).min(data.len());
            c.buf.extend_from_slice(&data.split_to(take));
            if c.buf.len() == self.chunk_bytes {
                let full = std::mem::replace(&mut c.buf, self.buffer());
                self.submit(archive, c.index, c.seq, full).await?;
                c.seq += 1;
            }
        }
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

/// Takes one base backup now and waits until it exists in storage (data, manifest, its WAL,
/// metadata). Cancelling `cancel` stops it: nothing of it is then listed, and the error says so.
pub async fn take_backup(
    cfg: &Config,
    repo: &Repo,
    cancel: &CancellationToken,
) -> anyhow::Result<BackupMeta> {
    let (mut conn, server) = ReplConnection::connect_identified(&cfg.pg).await?;
    if server.version_num < 150000 {
        bail!(
            "pgkeep backup needs Postgres 15 or later (the server is {})",
            server.version_num
        );
    }
    let archive = repo.ensure_cluster(&ClusterInfo::from(&server)).await?;
    let (id, start_time) = free_backup_id(&archive).await?;
    tracing::info!(backup = %id, system_identifier = server.system_identifier, "starting base backup");
    let work = async {
        let streamed = stream_backup(cfg, &mut conn, &archive, &id).await?;
        finish(cfg, &archive, &server, &id, start_time, streamed).await
    };
    let result = tokio::select! {
        r = work => r,
        _ = cancel.cancelled() => Err(anyhow!("backup {id} cancelled by shutdown before it was complete")),
    };
    match result {
        Ok(meta) => {
            tracing::info!(
                backup = %meta.id,
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
struct Streamed {
    archives: Vec<ArchiveMeta>,
    manifest: Vec<u8>,
    start: Lsn,
    end: Lsn,
    timeline: TimelineId,
}

/// Stores the manifest, waits for the backup's WAL, makes the chunks durable, and writes the
/// metadata last.
async fn finish(
    cfg: &Config,
    archive: &Archive,
    server: &ServerIdentity,
    id: &BackupId,
    start_time: DateTime<Utc>,
    s: Streamed,
) -> anyhow::Result<BackupMeta> {
    let repo = archive.repo();
    repo.put_overwrite(
        &archive.layout().backup_manifest(id),
        &s.manifest,
        cfg.codec,
    )
    .await?;
    wait_for_wal(
        cfg,
        archive,
        &required_wal(s.timeline, server.seg_size, s.start, s.end),
    )
    .await?;
    // The chunks were written without a sync each: one for all of them before anything names them.
    repo.sync_all().await?;
    let meta = BackupMeta {
        meta_version: META_VERSION,
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
        manifest_sha256: hex::encode(object::content_sha256(&s.manifest)),
        archives: s.archives,
    };
    // Written last: from here on the backup exists.
    archive.publish_backup(&meta).await?;
    Ok(meta)
}

fn label(id: &BackupId) -> String {
    format!("pgkeep {id}")
}

/// Runs BASE_BACKUP and stores its archives as chunks.
async fn stream_backup(
    cfg: &Config,
    conn: &mut ReplConnection,
    archive: &Archive,
    id: &BackupId,
) -> anyhow::Result<Streamed> {
    conn.send_query(&format!(
        "BASE_BACKUP (LABEL '{}', PROGRESS true, CHECKPOINT 'fast', WAIT false, MANIFEST 'yes', MANIFEST_CHECKSUMS 'CRC32C')",
        label(id).replace('\'', "''")
    ))
    .await?;
    let (start, start_tli, total_bytes) = read_start(conn).await?;
    let mut progress = Progress::new("backup", Some(total_bytes));
    let mut up = Uploader {
        archive: archive.clone(),
        id: id.clone(),
        codec: cfg.codec,
        chunk_bytes: cfg.backup_chunk_bytes,
        permits: Arc::new(Semaphore::new(cfg.parallelism.max(1))),
        tasks: JoinSet::new(),
        done: vec![],
        spare: Arc::default(),
    };
    let (archives, manifest) = receive(conn, &mut up, &mut progress).await?;
    let (end, end_tli) = read_end(conn).await?;
    if start_tli != end_tli {
        bail!("the timeline changed during the backup ({start_tli} to {end_tli}); take another");
    }
    let timeline =
        TimelineId::new(end_tli).ok_or_else(|| anyhow!("BASE_BACKUP reported timeline 0"))?;
    let mut uploaded = up.finish().await?;
    let took = progress.finish();
    uploaded.sort_by_key(|u| (u.archive, u.seq));
    let archives = assemble(archives, uploaded)?;
    let total: u64 = archives.iter().map(|a| a.plain_bytes).sum();
    tracing::info!(
        bytes = total,
        seconds = took.as_secs_f64(),
        mb_per_s = total as f64 / 1048576.0 / took.as_secs_f64().max(0.001),
        "backup data uploaded"
    );
    Ok(Streamed {
        archives,
        manifest,
        start,
        end,
        timeline,
    })
}

/// Before the copy stream: the start position and timeline, then the tablespaces with their
/// sizes (kB); returns the start, its timeline and the expected total bytes.
async fn read_start(conn: &mut ReplConnection) -> anyhow::Result<(Lsn, u32, u64)> {
    let mut sets: Vec<ResultSet> = vec![];
    loop {
        match conn.next_event().await? {
            Event::Rows(s) => sets.push(s),
            Event::CopyStart { .. } => break,
            Event::Done => bail!("BASE_BACKUP ended without sending data"),
        }
    }
    let row = sets
        .first()
        .and_then(|s| s.rows.first())
        .ok_or_else(|| anyhow!("BASE_BACKUP sent no start position"))?;
    let (start, tli) =
        position(row).ok_or_else(|| anyhow!("BASE_BACKUP sent no start position"))?;
    let total_kb: u64 = sets
        .get(1)
        .map(|s| {
            s.rows
                .iter()
                .filter_map(|r| r.get(2).cloned().flatten()?.parse::<u64>().ok())
                .sum()
        })
        .unwrap_or(0);
    Ok((start, tli, total_kb * 1024))
}

/// After the copy stream: the end position and timeline.
async fn read_end(conn: &mut ReplConnection) -> anyhow::Result<(Lsn, u32)> {
    let mut end = None;
    loop {
        match conn.next_event().await? {
            Event::Rows(s) => end = s.rows.first().and_then(|r| position(r)).or(end),
            Event::Done => break,
            Event::CopyStart { .. } => bail!("unexpected second copy stream"),
        }
    }
    end.ok_or_else(|| anyhow!("BASE_BACKUP sent no end position"))
}

/// A row `(lsn, timeline)` as BASE_BACKUP sends its start and end.
fn position(row: &[Option<String>]) -> Option<(Lsn, u32)> {
    let lsn = row.first()?.as_deref()?.parse().ok()?;
    let tli = row
        .get(1)
        .cloned()
        .flatten()
        .unwrap_or_default()
        .parse()
        .unwrap_or(0);
    Some((lsn, tli))
}

/// An archive as received: its name, the tablespace's location and its size.
type Received = (ArchiveName, Option<String>, u64);

/// Reads the copy stream: archives cut into chunks and handed to the uploader, then the manifest.
async fn receive(
    conn: &mut ReplConnection,
    up: &mut Uploader,
    progress: &mut Progress,
) -> anyhow::Result<(Vec<Received>, Vec<u8>)> {
    let mut archives: Vec<Received> = vec![];
    let mut current: Option<Current> = None;
    let mut manifest: Option<Vec<u8>> = None;
    while let Some(msg) = conn.next_copy_data().await? {
        match BackupMessage::parse(msg)? {
            BackupMessage::NewArchive { name, location } => {
                if let Some(c) = current.take() {
                    flush(up, &archives, c).await?;
                }
                if manifest.is_some() {
                    bail!("an archive after the backup manifest");
                }
                let name = ArchiveName::try_from(name).map_err(|e| anyhow!(e))?;
                tracing::debug!(archive = %String::from(name.clone()), %location, "archive starts");
                archives.push((name, (!location.is_empty()).then_some(location), 0));
                current = Some(Current {
                    index: archives.len() - 1,
                    seq: 0,
                    buf: up.buffer(),
                });
            }
            BackupMessage::Data(data) => match (manifest.as_mut(), current.as_mut()) {
                (Some(m), _) => m.extend_from_slice(&data),
                (None, Some(c)) => {
                    archives[c.index].2 += data.len() as u64;
                    up.add(&archives[c.index].0, c, data).await?;
                }
                (None, None) => bail!("backup data before any archive"),
            },
            BackupMessage::Progress(n) => progress.add(n.saturating_sub(progress.done())),
            BackupMessage::ManifestStart => {
                if let Some(c) = current.take() {
                    flush(up, &archives, c).await?;
                }
                manifest = Some(vec![]);
            }
        }
    }
    if let Some(c) = current.take() {
        flush(up, &archives, c).await?;
    }
    let manifest = manifest.ok_or_else(|| anyhow!("the server sent no backup manifest"))?;
    Ok((archives, manifest))
}

/// The archives' metadata from what was received and the chunks uploaded (sorted).
fn assemble(archives: Vec<Received>, uploaded: Vec<Uploaded>) -> anyhow::Result<Vec<ArchiveMeta>> {
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
    Ok(metas)
}

/// Uploads the last, partial chunk of an archive (an empty archive still gets one chunk).
async fn flush(up: &mut Uploader, archives: &[Received], c: Current) -> anyhow::Result<()> {
    if !c.buf.is_empty() || c.seq == 0 {
        up.submit(&archives[c.index].0, c.index, c.seq, c.buf)
            .await?;
    }
    Ok(())
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
    if let Err(e) = archive.delete_backup_folder(id).await {
        tracing::warn!(backup = %id, "could not remove a failed backup's objects: {e}");
    }
}
