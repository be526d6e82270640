//! WAL streaming through a physical replication slot. Received WAL goes to the spool, each
//! completed segment is checked, uploaded and verified, and only then is its end reported to
//! Postgres as flushed: the slot never releases WAL that is not in storage. The open segment is
//! uploaded as `<segment>.partial` every `partial_upload_secs`, so a lost pod loses seconds of WAL,
//! not a segment; a verified partial upload is durable too, so the reported flush position
//! advances to its end. While stopping, every received piece is uploaded at once, so the
//! walsender (which waits for the flush report to reach what it sent) can finish Postgres' shutdown.
//! In synchronous mode (`synchronous`) the open segment is uploaded as soon as the walsender has
//! sent what it had (or after `SYNC_BATCH_WAIT` while it keeps sending), so with
//! `synchronous_standby_names` naming pgkeep a COMMIT returns once its WAL is in storage. A session
//! never replaces a stored `.partial` with fewer bytes than it holds (it first receives that much
//! again).

use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use prometheus_client::metrics::counter::Counter;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::config::Config;
use crate::pg::messages::{StandbyStatusUpdate, WalMessage, XLogData, pg_now};
use crate::pg::replication::{Event, PgError, ReplConnection, ServerIdentity};
use crate::pg::walheader;
use crate::pg::{AtomicLsn, Lsn, SegmentNo, TimelineId, WalFileKind, WalFileName};
use crate::storage::{Archive, ClusterInfo, PutOutcome, Repo, StorageError};
use crate::wal::spool::{CompleteSegment, Spool};

/// Shared, lock-free view of the streamer for status and metrics.
#[derive(Debug, Default)]
pub struct StreamState {
    /// The timeline streamed; 0 until the slot reserves WAL for the stream (the backup schedule
    /// waits for that, so a backup's WAL is always streamed).
    pub timeline: std::sync::atomic::AtomicU32,
    /// Highest LSN received from the server.
    pub received: AtomicLsn,
    /// Everything before this LSN is in storage (reported to Postgres as flushed). Only ever
    /// grows, also across reconnects, which restart at a segment boundary below it.
    pub durable: AtomicLsn,
    /// Unix time (s) of the last successful segment upload (0: none yet).
    pub last_upload_unix: std::sync::atomic::AtomicU64,
    pub segments_uploaded: Counter,
    pub bytes_uploaded: Counter,
    pub partial_uploads: Counter,
    pub upload_errors: Counter,
    pub reconnects: Counter,
    /// Why the last attempt to stream failed; None while streaming works. `/status`, `/readyz`
    /// and `/metrics` report it, so WAL held in the slot never goes unexplained.
    pub problem: std::sync::Mutex<Option<StreamProblem>>,
}

/// The server ended the stream by itself: Postgres is shutting down, or its timeline ended (a
/// promotion). Normal events, reconnected from like any other, but not failures.
#[derive(Debug, thiserror::Error)]
#[error("the server ended the WAL stream (Postgres stopped, or timeline {timeline} ended)")]
pub struct StreamEnded {
    pub timeline: TimelineId,
}

/// A failure of the stream, as reported.
#[derive(Debug, Clone)]
pub struct StreamProblem {
    pub message: String,
    /// The server's Postgres major is one pgkeep does not support: nothing will stream until
    /// pgkeep or Postgres changes.
    pub unsupported: bool,
}

impl StreamState {
    pub fn durable_lsn(&self) -> Lsn {
        self.durable.load()
    }
    pub fn received_lsn(&self) -> Lsn {
        self.received.load()
    }
    pub fn problem(&self) -> Option<StreamProblem> {
        self.problem.lock().expect("not poisoned").clone()
    }

    fn set_problem(&self, p: Option<StreamProblem>) {
        *self.problem.lock().expect("not poisoned") = p;
    }

    /// The timeline streamed, once the stream holds a slot.
    pub fn streaming_timeline(&self) -> Option<TimelineId> {
        TimelineId::new(self.timeline.load(std::sync::atomic::Ordering::Acquire))
    }
}

/// Streams until `stop` is cancelled and the server has nothing more to send, or a fatal error.
/// Reconnects with bounded backoff after connection losses. A stop that comes while no stream
/// runs (waiting for a promotion, or between attempts) gets one more attempt: a Postgres that is
/// up as a primary then is streamed until its shutdown ends the stream (the preStop hook waits for
/// exactly that WAL), and one that is gone or in recovery has nothing more to send.
pub async fn run(
    cfg: Config,
    repo: Repo,
    state: std::sync::Arc<StreamState>,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let mut backoff = Duration::from_millis(500);
    loop {
        let started = Instant::now();
        let mut streaming = false;
        match stream_once(&cfg, &repo, &state, &stop, &mut streaming).await {
            Ok(()) => return Ok(()),
            Err(e) => {
                if stop.is_cancelled() {
                    if !streaming {
                        tracing::info!(
                            durable = %state.durable_lsn(),
                            "stopping: no WAL stream to drain ({e:#})"
                        );
                        return Ok(());
                    }
                    tracing::warn!("streaming ended during shutdown: {e:#}");
                    return Err(e);
                }
                state.reconnects.inc();
                let ended = e.downcast_ref::<StreamEnded>().is_some();
                let soon = starting_up(&e);
                let unsupported =
                    matches!(e.downcast_ref::<PgError>(), Some(PgError::Unsupported(_)));
                // A server that ended the stream is no failure to report (it reconnects).
                state.set_problem((!ended).then(|| StreamProblem {
                    message: format!("{e:#}"),
                    unsupported,
                }));
                if unsupported {
                    backoff = Duration::from_secs(30);
                }
                if started.elapsed() > Duration::from_secs(60) {
                    backoff = Duration::from_millis(500);
                }
                // Postgres starting up (replaying a restore's WAL) answers, and soon: retried
                // every second, so that the stream starts within a second of consistency or a
                // promotion, not after a backoff grown during a long replay.
                if soon {
                    backoff = backoff.min(Duration::from_secs(1));
                }
                if ended {
                    tracing::info!("{e}; reconnecting in {:.1}s", backoff.as_secs_f64());
                } else {
                    tracing::warn!(
                        "WAL streaming interrupted: {e:#}; reconnecting in {:.1}s",
                        backoff.as_secs_f64()
                    );
                }
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    // The last attempt (above): stop is cancelled now.
                    _ = stop.cancelled() => continue,
                }
                backoff = (backoff * 2).min(Duration::from_secs(if soon { 1 } else { 30 }));
            }
        }
    }
}

/// Postgres refused the connection because it is starting up or not yet consistent
/// (SQLSTATE 57P03, `cannot_connect_now`).
fn starting_up(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<tokio_postgres::Error>()
            .and_then(tokio_postgres::Error::code)
            .is_some_and(|code| *code == tokio_postgres::error::SqlState::CANNOT_CONNECT_NOW)
            || matches!(c.downcast_ref::<PgError>(), Some(PgError::Server { code, .. }) if code == "57P03")
    })
}

/// Waits while Postgres is in recovery (just restored, or a standby): its WAL is the archive's
/// own. Returns false when `stop` came first and Postgres was still in recovery then.
async fn wait_until_primary(cfg: &Config, stop: &CancellationToken) -> anyhow::Result<bool> {
    let sql = crate::pg::sql::connect(&cfg.pg).await?;
    let mut said = false;
    while crate::pg::sql::is_in_recovery(&sql).await? {
        if stop.is_cancelled() {
            return Ok(false);
        }
        if !said {
            tracing::info!("Postgres is in recovery: WAL streaming waits until it is promoted");
            said = true;
        }
        // A stop asks once more (a promotion in the last second is streamed).
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = stop.cancelled() => {}
        }
    }
    Ok(true)
}

/// One replication connection's worth of streaming.
async fn stream_once(
    cfg: &Config,
    repo: &Repo,
    state: &StreamState,
    stop: &CancellationToken,
    streaming: &mut bool,
) -> anyhow::Result<()> {
    if !wait_until_primary(cfg, stop).await? {
        return Ok(());
    }
    let (mut conn, server) = ReplConnection::connect_identified(&cfg.pg).await?;
    let archive = repo.ensure_cluster(&ClusterInfo::from(&server)).await?;
    let tli = server.timeline;
    if tli.get() > 1 {
        store_history(&mut conn, &archive, tli, cfg).await?;
    }
    let restart_lsn = ensure_slot(&mut conn, cfg, &server).await?;
    // Set once the slot holds WAL for us: the backup schedule waits for it.
    state
        .timeline
        .store(tli.get(), std::sync::atomic::Ordering::Release);
    let start = first_missing_segment(&archive, &server, restart_lsn).await?;
    state.durable.advance(start);
    state.received.advance(start);
    let spool = Spool::new(&cfg.spool_dir, tli, server.seg_size)?;
    // What an earlier session (or process) stored of the segment this one starts in: it is
    // received again from its start, and no upload may replace that partial with fewer bytes.
    let first = WalFileName::segment(tli, server.seg_size.segment_of(start), server.seg_size);
    let stored_partial = match archive
        .repo()
        .header(&archive.layout().streaming_partial(&first))
        .await
    {
        Ok(h) if h.plain_len < u64::from(server.seg_size.bytes()) => Some((first, h.plain_len)),
        // An old padded partial (its end unknown), none, or a damaged one: nothing to keep.
        Ok(_) | Err(StorageError::NotFound { .. } | StorageError::Corrupt { .. }) => None,
        // Not known: this session must not start (it reconnects).
        Err(e) => return Err(e.into()),
    };
    let slot = &cfg.slot_name;
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
        state.set_problem(None);
        *streaming = true;
        let session = Session {
            cfg,
            archive: &archive,
            state,
            conn,
            spool,
            timeline: tli,
            received: start,
            durable: start,
            last_status: Instant::now()
                .checked_sub(cfg.status_interval)
                .unwrap_or_else(Instant::now),
            last_partial: Instant::now(),
            stopping: false,
            hung_up: false,
            stored_partial,
            pending_since: None,
            drained: false,
        };
        session.run(stop).await
    }
    .instrument(span)
    .await
}

/// Creates the physical slot if missing; returns its restart point.
async fn ensure_slot(
    conn: &mut ReplConnection,
    cfg: &Config,
    server: &ServerIdentity,
) -> anyhow::Result<Lsn> {
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
    let restart = if server.major() >= 15 {
        let sets = conn
            .simple_query(&format!("READ_REPLICATION_SLOT \"{slot}\""))
            .await?;
        sets.first()
            .and_then(|s| s.first("restart_lsn"))
            .map(str::to_string)
    } else {
        // Before 15 a walsender reads no slot: ask SQL.
        let sql = crate::pg::sql::connect(&cfg.pg).await?;
        sql.query_opt(
            "select restart_lsn::text from pg_replication_slots where slot_name = $1",
            &[slot],
        )
        .await?
        .and_then(|row| row.get::<_, Option<String>>(0))
    };
    Ok(restart
        .ok_or_else(|| anyhow!("the slot {slot} has no restart_lsn"))?
        .parse()?)
}

/// The start of the first segment, from the slot's restart point on, that storage does not hold.
async fn first_missing_segment(
    archive: &Archive,
    server: &ServerIdentity,
    restart_lsn: Lsn,
) -> anyhow::Result<Lsn> {
    let size = server.seg_size;
    let present = archive.wal_names(server.timeline).await?;
    let mut seg = size.segment_of(restart_lsn);
    while present.contains(&WalFileName::segment(server.timeline, seg, size).to_string()) {
        seg = SegmentNo(seg.0 + 1);
    }
    Ok(size.start_of(seg))
}

/// One START_REPLICATION stream: receives into the spool, uploads, reports.
struct Session<'a> {
    cfg: &'a Config,
    archive: &'a Archive,
    state: &'a StreamState,
    conn: ReplConnection,
    spool: Spool,
    timeline: TimelineId,
    /// Everything before this was received (and is in the spool or in storage).
    received: Lsn,
    /// Everything before this is in storage; never more than `received`.
    durable: Lsn,
    last_status: Instant,
    last_partial: Instant,
    /// SIGTERM came: upload everything at once and stop when the server ends the stream.
    stopping: bool,
    /// The server hung up: while stopping that is the normal end (the walsender leaves once our
    /// flush report reaches what it sent), otherwise an error to reconnect from.
    hung_up: bool,
    /// The stored `.partial` of the segment this session started in and its length: no upload
    /// replaces it with fewer bytes (a pod lost right then would lose WAL already acknowledged).
    stored_partial: Option<(WalFileName, u64)>,
    /// Synchronous mode: since when received WAL waits for an upload.
    pending_since: Option<Instant>,
    /// Synchronous mode: the walsender had nothing more to send at once.
    drained: bool,
}

/// In synchronous mode, the longest received WAL waits for more to join its upload while the
/// walsender keeps sending (a steady stream must not starve the commits waiting on it).
const SYNC_BATCH_WAIT: Duration = Duration::from_millis(20);

impl Session<'_> {
    async fn run(mut self, stop: &CancellationToken) -> anyhow::Result<()> {
        loop {
            if self.last_status.elapsed() >= self.cfg.status_interval {
                self.report().await?;
            }
            let pending = self.received > self.durable && !self.held_back();
            // Synchronous: as soon as the walsender has sent what it had (commits that arrived
            // together share one upload), or after a short wait while it keeps sending.
            let sync_due = self.cfg.synchronous
                && pending
                && (self.drained
                    || self
                        .pending_since
                        .is_some_and(|t| t.elapsed() >= SYNC_BATCH_WAIT));
            if self.last_partial.elapsed() >= self.cfg.partial_upload_interval
                || (self.stopping && pending)
                || sync_due
            {
                self.upload_partial().await?;
            }
            self.drained = false;
            if !self.stopping && stop.is_cancelled() {
                // Shutdown: keep receiving until the walsender ends the stream after Postgres'
                // shutdown checkpoint (or the daemon's deadline ends this), then keep what was
                // received.
                self.stopping = true;
                tracing::info!("stopping: draining WAL until the server ends the stream");
            }
            let waiting = self.cfg.synchronous && self.received > self.durable && !self.held_back();
            let tick = if waiting {
                // Only what the socket holds already: then the upload.
                Duration::ZERO
            } else {
                self.cfg
                    .status_interval
                    .saturating_sub(self.last_status.elapsed())
                    .min(
                        self.cfg
                            .partial_upload_interval
                            .saturating_sub(self.last_partial.elapsed()),
                    )
                    .max(Duration::from_millis(10))
            };
            let msg = if self.hung_up {
                Ok(None)
            } else {
                tokio::select! {
                    biased;
                    m = self.conn.next_copy_data() => m,
                    _ = stop.cancelled(), if !self.stopping => continue,
                    _ = tokio::time::sleep(tick) => {
                        self.drained = waiting;
                        continue;
                    }
                }
            };
            let msg = match msg {
                Ok(m) => m,
                Err(e) if self.stopping => {
                    tracing::info!("the server closed the stream: {e}");
                    None
                }
                Err(e) => return Err(e.into()),
            };
            let Some(msg) = msg else {
                return self.end_of_stream().await;
            };
            if msg.is_empty() {
                // 13's walsender has been seen to send empty CopyData frames mid-stream.
                continue;
            }
            match WalMessage::parse(msg)? {
                WalMessage::XLogData(x) => self.on_wal(x).await?,
                WalMessage::Keepalive(k) => {
                    if k.reply_requested && !(self.stopping && self.received > self.durable) {
                        self.report().await?;
                    }
                }
            }
        }
    }

    /// The stream ended (end of timeline, or shutdown): keep what we have. The server is gone:
    /// nothing more is reported to it.
    async fn end_of_stream(mut self) -> anyhow::Result<()> {
        self.hung_up = true;
        self.upload_partial().await?;
        if self.stopping {
            tracing::info!(durable = %self.state.durable_lsn(), "WAL stream drained");
            return Ok(());
        }
        Err(StreamEnded {
            timeline: self.timeline,
        }
        .into())
    }

    /// Sends a standby status update: written up to `received`, flushed (= durable in storage) up
    /// to `durable`. While stopping, a failure is the server leaving.
    async fn report(&mut self) -> anyhow::Result<()> {
        if self.hung_up {
            return Ok(());
        }
        let update = StandbyStatusUpdate {
            written: self.received,
            flushed: self.durable,
            applied: self.durable,
            time: pg_now(),
            reply_requested: false,
        };
        self.last_status = Instant::now();
        match self.conn.send_copy_data(&update.encode()).await {
            Ok(()) => Ok(()),
            Err(e) if self.stopping => {
                tracing::info!("the server closed the stream: {e}");
                self.hung_up = true;
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Moves the durable position (and tells Postgres at once: the slot may release WAL).
    async fn made_durable(&mut self, upto: Lsn) -> anyhow::Result<()> {
        if upto > self.durable {
            self.durable = upto;
            self.state.durable.advance(upto);
            if self.durable >= self.received {
                // Nothing waits any more (a completed segment counts too): the next WAL starts
                // a batch of its own.
                self.pending_since = None;
            }
            self.report().await?;
        }
        Ok(())
    }

    async fn on_wal(&mut self, x: XLogData) -> anyhow::Result<()> {
        let end = x.data_end();
        for mut seg in self.spool.write(x.wal_start, &x.data)? {
            // An earlier session's partial of it goes once the whole segment is stored.
            seg.had_partial |= self
                .stored_partial
                .as_ref()
                .is_some_and(|(first, _)| *first == seg.name);
            let upto =
                complete_segment(self.archive, &self.spool, seg, self.cfg, self.state).await?;
            // Reported as written too: a flush position never runs ahead of the write position.
            self.received = self.received.max(upto);
            self.made_durable(upto).await?;
        }
        self.received = end;
        self.state.received.advance(end);
        if self.received > self.durable {
            self.pending_since.get_or_insert_with(Instant::now);
        }
        Ok(())
    }

    /// Whether the open segment's upload waits until this session has received as much of it as
    /// an earlier one stored.
    fn held_back(&self) -> bool {
        match (&self.stored_partial, &self.spool.open) {
            (Some((first, stored)), Some(seg)) => *first == seg.name && seg.written() < *stored,
            _ => false,
        }
    }

    /// Uploads the open segment as `<segment>.partial` if it grew since the last upload: a partial
    /// in storage is as durable as a segment, so the slot may advance to its end.
    async fn upload_partial(&mut self) -> anyhow::Result<()> {
        self.last_partial = Instant::now();
        if self.held_back() {
            // Storage holds more of this segment than received so far: it stays as it is until
            // this session has caught up with it.
            return Ok(());
        }
        let Some(seg) = self.spool.open.as_mut() else {
            return Ok(());
        };
        if !seg.has_news() {
            return Ok(());
        }
        let (data, written) = seg.snapshot()?;
        let name = seg.name.with_kind(WalFileKind::Partial);
        walheader::check_segment(&name, &data, Some(self.archive.system_identifier()))?;
        let key = self.archive.layout().streaming_partial(&seg.name);
        // Only the bytes received: the object's plain length is then where the WAL in storage
        // ends, which `list` and `/status` both report (readers pad it back to a whole segment).
        let received = &data[..usize::try_from(written).expect("within a segment")];
        if let Err(e) = self
            .archive
            .repo()
            .put_overwrite(&key, received, self.cfg.codec)
            .await
        {
            self.state.upload_errors.inc();
            return Err(e.into());
        }
        seg.uploaded(written);
        let upto = seg.uploaded_end();
        self.state.partial_uploads.inc();
        tracing::debug!(wal = %name, bytes = written, "partial segment uploaded");
        self.made_durable(upto).await
    }
}

/// Records the plain digest of an uploaded segment beside the spool and keeps only the newest
/// records. Best effort: without a record a segment received again is refused loudly, never lost.
fn remember_upload(record: &std::path::Path, digest: &str) {
    const KEEP: usize = 64;
    let dir = record.parent().expect("a record has a folder");
    let written = std::fs::create_dir_all(dir)
        .and_then(|_| crate::fsutil::write_atomic(record, digest.as_bytes()));
    if let Err(e) = written {
        tracing::warn!(record = %record.display(), "cannot record the upload: {e}");
        return;
    }
    if let Ok(entries) = std::fs::read_dir(dir) {
        let mut names: Vec<String> = entries
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.parse::<WalFileName>().is_ok())
            .collect();
        names.sort();
        let excess = names.len().saturating_sub(KEEP);
        for n in &names[..excess] {
            let _ = std::fs::remove_file(dir.join(n));
        }
    }
}

/// A complete segment: check, upload, verify, then drop it from the spool and remove its
/// `.partial` object. Returns the new durable position (the segment's end).
#[tracing::instrument(skip_all, fields(wal = %seg.name, start = %seg.start))]
async fn complete_segment(
    archive: &Archive,
    spool: &Spool,
    seg: CompleteSegment,
    cfg: &Config,
    state: &StreamState,
) -> anyhow::Result<Lsn> {
    walheader::check_segment(&seg.name, &seg.data, Some(archive.system_identifier()))?;
    let key = archive.layout().wal(&seg.name);
    // Encrypted stored segments cannot be read back here (no identity): a record of what this
    // daemon stored lets it recognise its own upload when it receives a segment again.
    let record = cfg.spool_dir.join("uploaded").join(seg.name.to_string());
    let digest = archive
        .repo()
        .keys()
        .encrypts()
        .then(|| hex::encode(crate::storage::object::content_sha256(&seg.data)));
    let stored_before = digest
        .as_ref()
        .is_some_and(|d| std::fs::read_to_string(&record).is_ok_and(|r| r.trim() == d.as_str()));
    let outcome = match archive
        .repo()
        .put_new_stored_before(&key, &seg.data, cfg.codec, stored_before)
        .await
    {
        Ok(o) => o,
        Err(e) => {
            state.upload_errors.inc();
            return Err(e.into());
        }
    };
    match outcome {
        PutOutcome::Stored { stored_len } | PutOutcome::Repaired { stored_len } => {
            state.bytes_uploaded.inc_by(stored_len);
        }
        PutOutcome::AlreadyPresent => {
            tracing::info!(wal = %seg.name, "already in storage (archive_command was first)");
        }
    }
    if let Some(d) = digest {
        remember_upload(&record, &d);
    }
    state.segments_uploaded.inc();
    state.last_upload_unix.store(
        crate::progress::unix_now(),
        std::sync::atomic::Ordering::Relaxed,
    );
    let (end, name, had_partial) = (seg.end(), seg.name, seg.had_partial);
    spool.discard(seg)?;
    if had_partial {
        archive
            .repo()
            .delete(&archive.layout().streaming_partial(&name))
            .await?;
    }
    tracing::info!("segment streamed to storage");
    Ok(end)
}

/// Stores the history file of timeline `tli` (TIMELINE_HISTORY) if storage lacks it.
async fn store_history(
    conn: &mut ReplConnection,
    archive: &Archive,
    tli: TimelineId,
    cfg: &Config,
) -> anyhow::Result<()> {
    let name = WalFileName::history(tli);
    let key = archive.layout().wal(&name);
    if archive.repo().exists(&key).await? {
        return Ok(());
    }
    let sets = conn
        .simple_query(&format!("TIMELINE_HISTORY {}", tli.get()))
        .await?;
    let content = sets
        .first()
        .and_then(|s| s.first("content"))
        .ok_or_else(|| anyhow!("TIMELINE_HISTORY {} returned no content", tli.get()))?;
    archive
        .repo()
        .put_new(&key, content.as_bytes(), cfg.codec)
        .await?;
    tracing::info!(wal = %name, "timeline history stored");
    Ok(())
}
