//! WAL streaming through a physical replication slot. Received WAL goes to a local spool
//! (`<segment>.partial`), each completed segment is checked, uploaded and verified, and only then is
//! its end reported to Postgres as flushed: the slot never releases WAL that is not in storage. The
//! open segment is uploaded as `<segment>.partial` every `partial_upload_secs`, so a lost pod loses
//! seconds of WAL, not a segment; a verified partial upload is durable too, so the reported flush
//! position advances to its end. While stopping, every received piece is uploaded at once, so the
//! walsender (which waits for the flush report to reach what it sent) can finish Postgres' shutdown.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use bytes::Buf;
use tokio::sync::watch;
use tracing::Instrument;

use crate::codec::Codec;
use crate::config::Config;
use crate::pg::replication::{Event, PgError, ReplConnection};
use crate::pg::walheader;
use crate::pg::{Lsn, SegmentNo, TimelineId, WalFileKind, WalFileName, WalSegSize};
use crate::storage::{ClusterInfo, ClusterLayout, PutOutcome, Repo};

/// Shared, lock-free view of the streamer for status and metrics.
#[derive(Debug, Default)]
pub struct StreamState {
    /// The timeline streamed; 0 until the slot reserves WAL for the stream (the backup schedule
    /// waits for that, so a backup's WAL is always streamed).
    pub timeline: AtomicU64,
    /// Highest LSN received from the server.
    pub received: AtomicU64,
    /// Everything before this LSN is in storage (reported to Postgres as flushed). Only ever
    /// grows, also across reconnects, which restart at a segment boundary below it.
    pub durable: AtomicU64,
    /// Unix time (s) of the last successful segment upload.
    pub last_upload_unix: AtomicU64,
    pub segments_uploaded: AtomicU64,
    pub bytes_uploaded: AtomicU64,
    pub partial_uploads: AtomicU64,
    pub upload_errors: AtomicU64,
    pub reconnects: AtomicU64,
    /// Unix time (s) the last scheduled or requested base backup finished (0: none by this daemon).
    pub last_backup_unix: AtomicU64,
    /// How long that backup took, in milliseconds.
    pub last_backup_ms: AtomicU64,
    pub backup_failures: AtomicU64,
}

impl StreamState {
    pub fn durable_lsn(&self) -> Lsn {
        Lsn(self.durable.load(Ordering::Acquire))
    }
    pub fn received_lsn(&self) -> Lsn {
        Lsn(self.received.load(Ordering::Acquire))
    }
}

/// Microseconds since 2000-01-01, Postgres' epoch for replication timestamps.
fn pg_now() -> i64 {
    let unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    unix.as_micros() as i64 - 946_684_800_000_000
}

/// The open segment in the spool.
struct OpenSegment {
    name: WalFileName,
    start: Lsn,
    file: std::fs::File,
    path: PathBuf,
    /// Bytes of the segment received so far (all before `start + written` are in the file).
    written: u64,
    /// `written` at the last `.partial` upload.
    uploaded_partial: u64,
}

/// Streams until `stop` turns true and the server has nothing more to send, or a fatal error.
/// Reconnects with bounded backoff after connection losses.
pub async fn run(
    cfg: Config,
    state: Arc<StreamState>,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let repo = Repo::open(&cfg, true)?;
    let mut backoff = Duration::from_millis(500);
    loop {
        let started = Instant::now();
        match stream_once(&cfg, &repo, &state, &mut stop).await {
            Ok(()) => return Ok(()),
            Err(e) => {
                if *stop.borrow() {
                    tracing::warn!("streaming ended during shutdown: {e:#}");
                    return Err(e);
                }
                state.reconnects.fetch_add(1, Ordering::Relaxed);
                if started.elapsed() > Duration::from_secs(60) {
                    backoff = Duration::from_millis(500);
                }
                tracing::warn!(
                    "WAL streaming interrupted: {e:#}; reconnecting in {:.1}s",
                    backoff.as_secs_f64()
                );
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stop.changed() => return Ok(()),
                }
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    }
}

/// One replication connection's worth of streaming.
async fn stream_once(
    cfg: &Config,
    repo: &Repo,
    state: &StreamState,
    stop: &mut watch::Receiver<bool>,
) -> anyhow::Result<()> {
    // A server in recovery (just restored, or a standby) is not streamed from: its WAL is the
    // archive's own. Streaming starts once it is a primary, on its new timeline.
    let sql = crate::pg::sql::connect(&cfg.pg).await?;
    let mut said = false;
    while crate::pg::sql::is_in_recovery(&sql).await? {
        if !said {
            tracing::info!("Postgres is in recovery: WAL streaming waits until it is promoted");
            said = true;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = stop.changed() => return Ok(()),
        }
    }
    drop(sql);
    let mut conn = ReplConnection::connect(&cfg.pg).await?;
    let sys = conn.identify_system().await?;
    let size = conn.wal_segment_size().await?;
    let tli =
        TimelineId::new(sys.timeline).ok_or_else(|| anyhow!("the server reports timeline 0"))?;
    let cluster = ClusterLayout::new(sys.system_identifier);
    repo.ensure_cluster(
        &cluster,
        &ClusterInfo {
            system_identifier: sys.system_identifier.to_string(),
            wal_segment_size: Some(size.bytes()),
            pg_major: conn
                .show("server_version_num")
                .await?
                .parse::<u32>()
                .ok()
                .map(|v| v / 10000),
        },
    )
    .await?;
    if tli.get() > 1 {
        store_history(&mut conn, repo, &cluster, tli, cfg.codec).await?;
    }

    let slot = &cfg.slot_name;
    match conn
        .simple_query(&format!(
            "CREATE_REPLICATION_SLOT \"{slot}\" PHYSICAL RESERVE_WAL"
        ))
        .await
    {
        Ok(_) => tracing::info!(slot, "created the replication slot"),
        Err(PgError::Server { code, .. }) if code == "42710" => {}
        Err(e) => return Err(e).context("creating the replication slot"),
    }
    let restart = conn
        .simple_query(&format!("READ_REPLICATION_SLOT \"{slot}\""))
        .await?;
    let restart_lsn: Lsn = restart
        .first()
        .and_then(|s| s.first("restart_lsn"))
        .ok_or_else(|| anyhow!("the slot {slot} has no restart_lsn"))?
        .parse()?;
    // Set once the slot holds WAL for us: the backup schedule waits for it.
    state
        .timeline
        .store(u64::from(tli.get()), Ordering::Release);

    // Start at the first segment, from the slot's restart point on, that storage does not hold yet.
    let spool = cfg.spool_dir.clone();
    std::fs::create_dir_all(&spool)
        .with_context(|| format!("creating the spool {}", spool.display()))?;
    let mut seg = size.segment_of(restart_lsn);
    let present: std::collections::HashSet<String> = repo
        .list(&cluster.wal_dir(tli))
        .await?
        .iter()
        .filter_map(|k| k.filename().map(str::to_string))
        .collect();
    while present.contains(&WalFileName::segment(tli, seg, size).to_string()) {
        seg = SegmentNo(seg.0 + 1);
    }
    let start = size.start_of(seg);
    state.durable.fetch_max(start.0, Ordering::AcqRel);
    state.received.fetch_max(start.0, Ordering::AcqRel);
    // Anything spooled before a restart is superseded: the server sends it again from `start`.
    clean_spool(&spool)?;
    // Every event of this session carries the timeline and slot; segment events add the segment.
    let span = tracing::info_span!("stream", timeline = tli.get(), slot = %slot);
    async {
        tracing::info!(slot, timeline = tli.get(), start = %start, "starting WAL streaming");
        conn.send_query(&format!(
            "START_REPLICATION SLOT \"{slot}\" PHYSICAL {start} TIMELINE {}",
            tli.get()
        ))
        .await?;
        match conn.next_event().await? {
            Event::CopyStart { both: true } => {}
            other => bail!("START_REPLICATION answered {other:?}"),
        }

        let mut open: Option<OpenSegment> = None;
        let mut durable = start;
        let mut received = start;
        let status_every = cfg.status_interval;
        let mut last_status = Instant::now()
            .checked_sub(status_every)
            .unwrap_or_else(Instant::now);
        let mut last_partial = Instant::now();
        let mut stopping = false;
        // The server hung up: while stopping that is the normal end (the walsender leaves once our
        // flush report reaches what it sent), otherwise an error to reconnect from.
        let mut hung_up = false;
        macro_rules! status {
            ($recv:expr, $flush:expr) => {
                match send_status(&mut conn, $recv, $flush, false).await {
                    Ok(()) => {}
                    Err(e) if stopping => {
                        tracing::info!("the server closed the stream: {e}");
                        hung_up = true;
                    }
                    Err(e) => return Err(e.into()),
                }
            };
        }
        loop {
            if last_status.elapsed() >= status_every {
                status!(received, durable);
                last_status = Instant::now();
            }
            if last_partial.elapsed() >= cfg.partial_upload_interval
                || (stopping && received > durable)
            {
                if let Some(o) = open.as_mut() {
                    // A partial in storage is as durable as a segment: the slot may advance to its end.
                    let upto =
                        upload_partial(repo, &cluster, o, sys.system_identifier, cfg.codec, state)
                            .await?;
                    if upto > durable {
                        durable = upto;
                        state.durable.fetch_max(durable.0, Ordering::AcqRel);
                        status!(received, durable);
                        last_status = Instant::now();
                    }
                }
                last_partial = Instant::now();
            }
            if !stopping && *stop.borrow() {
                // Shutdown: keep receiving until the walsender ends the stream after Postgres' shutdown
                // checkpoint (or the deadline in the daemon ends this), then keep what was received.
                stopping = true;
                tracing::info!("stopping: draining WAL until the server ends the stream");
            }
            let tick = status_every
                .saturating_sub(last_status.elapsed())
                .min(
                    cfg.partial_upload_interval
                        .saturating_sub(last_partial.elapsed()),
                )
                .max(Duration::from_millis(10));
            let msg = if hung_up {
                Ok(None)
            } else {
                tokio::select! {
                    m = conn.next_copy_data() => m,
                    _ = tokio::time::sleep(tick) => continue,
                    _ = stop.changed(), if !stopping => continue,
                }
            };
            let Some(mut msg) = (match msg {
                Ok(m) => m,
                Err(e) if stopping => {
                    tracing::info!("the server closed the stream: {e}");
                    None
                }
                Err(e) => return Err(e.into()),
            }) else {
                // The stream ended (end of timeline, or shutdown): keep what we have.
                if let Some(o) = open.as_mut() {
                    let upto =
                        upload_partial(repo, &cluster, o, sys.system_identifier, cfg.codec, state)
                            .await?;
                    state.durable.fetch_max(upto.0, Ordering::AcqRel);
                }
                if stopping {
                    tracing::info!(durable = %state.durable_lsn(), "WAL stream drained");
                    return Ok(());
                }
                bail!(
                    "the server ended the WAL stream (end of timeline {})",
                    tli.get()
                );
            };
            match msg.first() {
                Some(b'w') if msg.len() >= 25 => {
                    msg.advance(1);
                    let data_start = Lsn(msg.get_u64());
                    let _wal_end = msg.get_u64();
                    let _send_time = msg.get_i64();
                    let mut at = data_start;
                    let mut data: &[u8] = &msg;
                    while !data.is_empty() {
                        let seg_no = size.segment_of(at);
                        if open.as_ref().map(|o| o.name)
                            != Some(WalFileName::segment(tli, seg_no, size))
                        {
                            if let Some(o) = &open
                                && o.written != u64::from(size.bytes())
                            {
                                bail!(
                                    "WAL for {} arrived before {} was complete",
                                    seg_no.0,
                                    o.name
                                );
                            }
                            open = Some(open_segment(&spool, tli, seg_no, size)?);
                        }
                        let o = open.as_mut().expect("just opened");
                        let offset = at.0 - o.start.0;
                        if offset != o.written {
                            bail!(
                                "WAL stream gap: expected {} got {at}",
                                Lsn(o.start.0 + o.written)
                            );
                        }
                        let room = u64::from(size.bytes()) - offset;
                        let n = room.min(data.len() as u64) as usize;
                        std::os::unix::fs::FileExt::write_all_at(&o.file, &data[..n], offset)?;
                        o.written += n as u64;
                        data = &data[n..];
                        at = Lsn(at.0 + n as u64);
                        if o.written == u64::from(size.bytes()) {
                            let done = open.take().expect("open");
                            durable = complete_segment(
                                repo,
                                &cluster,
                                done,
                                sys.system_identifier,
                                cfg.codec,
                                state,
                            )
                            .await?;
                            state.durable.fetch_max(durable.0, Ordering::AcqRel);
                            // Report at once: the slot may now release this segment.
                            status!(at, durable);
                            last_status = Instant::now();
                        }
                    }
                    received = at;
                    state.received.fetch_max(received.0, Ordering::AcqRel);
                }
                Some(b'k') if msg.len() >= 18 => {
                    if msg[17] == 1 && !(stopping && received > durable) {
                        status!(received, durable);
                        last_status = Instant::now();
                    }
                }
                _ => bail!("unexpected message in the WAL stream"),
            }
        }
    }
    .instrument(span)
    .await
}

/// Sends a standby status update: written up to `received`, flushed (= durable in storage) up to
/// `durable`.
async fn send_status(
    conn: &mut ReplConnection,
    received: Lsn,
    durable: Lsn,
    reply: bool,
) -> Result<(), PgError> {
    let mut m = Vec::with_capacity(34);
    m.push(b'r');
    m.extend_from_slice(&received.0.to_be_bytes());
    m.extend_from_slice(&durable.0.to_be_bytes());
    m.extend_from_slice(&durable.0.to_be_bytes());
    m.extend_from_slice(&pg_now().to_be_bytes());
    m.push(u8::from(reply));
    conn.send_copy_data(&m).await
}

fn open_segment(
    spool: &Path,
    tli: TimelineId,
    seg: SegmentNo,
    size: WalSegSize,
) -> anyhow::Result<OpenSegment> {
    let name = WalFileName::segment(tli, seg, size);
    let path = spool.join(format!("{name}.partial"));
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&path)
        .with_context(|| format!("creating {}", path.display()))?;
    // Full size, zeros beyond what was received: the shape Postgres' own .partial files have.
    file.set_len(u64::from(size.bytes()))?;
    Ok(OpenSegment {
        name,
        start: size.start_of(seg),
        file,
        path,
        written: 0,
        uploaded_partial: 0,
    })
}

/// A complete segment: fsync, rename in the spool, check, upload, verify, then drop it from the
/// spool and remove its `.partial` object. Returns the new durable position (the segment's end).
#[tracing::instrument(skip_all, fields(wal = %seg.name, start = %seg.start))]
async fn complete_segment(
    repo: &Repo,
    cluster: &ClusterLayout,
    seg: OpenSegment,
    sysid: u64,
    codec: Codec,
    state: &StreamState,
) -> anyhow::Result<Lsn> {
    seg.file.sync_all()?;
    let done = seg.path.with_extension("");
    std::fs::rename(&seg.path, &done)?;
    let data = std::fs::read(&done)?;
    walheader::check_segment(&seg.name, &data, Some(sysid))?;
    let key = cluster.wal(&seg.name);
    let outcome = match repo.put_new(&key, &data, codec).await {
        Ok(o) => o,
        Err(e) => {
            state.upload_errors.fetch_add(1, Ordering::Relaxed);
            return Err(e.into());
        }
    };
    if let PutOutcome::Stored { stored_len } | PutOutcome::Repaired { stored_len } = outcome {
        state
            .bytes_uploaded
            .fetch_add(stored_len, Ordering::Relaxed);
    }
    state.segments_uploaded.fetch_add(1, Ordering::Relaxed);
    state.last_upload_unix.store(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs(),
        Ordering::Relaxed,
    );
    std::fs::remove_file(&done)?;
    if seg.uploaded_partial > 0 {
        repo.delete(&cluster.streaming_partial(&seg.name)).await?;
    }
    tracing::info!("segment streamed to storage");
    Ok(Lsn(seg.start.0 + data.len() as u64))
}

/// Uploads the open segment as `<segment>.partial` if it grew since the last upload. Returns the
/// position everything before which is now in storage.
async fn upload_partial(
    repo: &Repo,
    cluster: &ClusterLayout,
    seg: &mut OpenSegment,
    sysid: u64,
    codec: Codec,
    state: &StreamState,
) -> anyhow::Result<Lsn> {
    if seg.written == seg.uploaded_partial || seg.written == 0 {
        return Ok(Lsn(seg.start.0 + seg.uploaded_partial));
    }
    seg.file.sync_data()?;
    let data = std::fs::read(&seg.path)?;
    let name = seg.name.with_kind(WalFileKind::Partial);
    walheader::check_segment(&name, &data, Some(sysid))?;
    if let Err(e) = repo
        .put_overwrite(&cluster.streaming_partial(&seg.name), &data, codec)
        .await
    {
        state.upload_errors.fetch_add(1, Ordering::Relaxed);
        return Err(e.into());
    }
    seg.uploaded_partial = seg.written;
    state.partial_uploads.fetch_add(1, Ordering::Relaxed);
    tracing::debug!(wal = %name, bytes = seg.written, "partial segment uploaded");
    Ok(Lsn(seg.start.0 + seg.written))
}

/// Stores the history file of timeline `tli` (TIMELINE_HISTORY) if storage lacks it.
async fn store_history(
    conn: &mut ReplConnection,
    repo: &Repo,
    cluster: &ClusterLayout,
    tli: TimelineId,
    codec: Codec,
) -> anyhow::Result<()> {
    let name = WalFileName::history(tli);
    if repo.exists(&cluster.wal(&name)).await? {
        return Ok(());
    }
    let sets = conn
        .simple_query(&format!("TIMELINE_HISTORY {}", tli.get()))
        .await?;
    let content = sets
        .first()
        .and_then(|s| s.first("content"))
        .ok_or_else(|| anyhow!("TIMELINE_HISTORY {} returned no content", tli.get()))?;
    repo.put_new(&cluster.wal(&name), content.as_bytes(), codec)
        .await?;
    tracing::info!(wal = %name, "timeline history stored");
    Ok(())
}

/// Removes leftovers of an earlier run from the spool (only WAL file names are touched).
fn clean_spool(spool: &Path) -> anyhow::Result<()> {
    for e in std::fs::read_dir(spool)? {
        let e = e?;
        let name = e.file_name();
        let name = name.to_string_lossy();
        if name.parse::<WalFileName>().is_ok() {
            std::fs::remove_file(e.path())?;
        }
    }
    Ok(())
}
