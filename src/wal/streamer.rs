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

use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use futures::StreamExt;

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
    /// The WAL segment size of the server streamed (bytes; 0 until it is known).
    pub seg_size: std::sync::atomic::AtomicU32,
    /// The segments this process stored, with their content's digest (for `archive-push`).
    pub stored: crate::wal::stored::StoredSegments,
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
    /// Of them, the pieces (only the bytes new since the one before).
    pub partial_pieces: Counter,
    /// Bytes stored by the open segment's uploads (`.partial`s and pieces, as stored).
    pub partial_bytes_uploaded: Counter,
    pub upload_errors: Counter,
    pub reconnects: Counter,
    /// Completed segments in the spool that storage does not hold yet.
    pub spooled_segments: std::sync::atomic::AtomicU64,
    /// Uploads running (segments and `.partial`s), and the most that ever ran at once.
    pub uploads_in_flight: std::sync::atomic::AtomicU64,
    pub uploads_in_flight_max: std::sync::atomic::AtomicU64,
    /// Times the spool filled up and receiving paused.
    pub backpressure_events: Counter,
    /// When the oldest WAL not yet in storage was received (Unix ms; 0: none waits).
    pub oldest_pending_unix_ms: std::sync::atomic::AtomicU64,
    /// How long received WAL waited until it was in storage, at each advance of the durable
    /// position (the oldest WAL that advance covered).
    pub durable_lag: LagHistogram,
    /// Why the last attempt to stream failed; None while streaming works. `/status`, `/readyz`
    /// and `/metrics` report it, so WAL held in the slot never goes unexplained.
    pub problem: std::sync::Mutex<Option<StreamProblem>>,
}

/// Seconds from receiving WAL until it is in storage.
#[derive(Debug, Clone)]
pub struct LagHistogram(pub prometheus_client::metrics::histogram::Histogram);

impl Default for LagHistogram {
    fn default() -> Self {
        LagHistogram(prometheus_client::metrics::histogram::Histogram::new([
            0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
        ]))
    }
}

impl LagHistogram {
    pub fn observe(&self, secs: f64) {
        self.0.observe(secs);
    }
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

    /// Whether this stream will store segment `name` (on its timeline) soon: it has not stored
    /// all of it, and has received some of it (its upload comes, perhaps once storage is back) or
    /// streams without a problem (Postgres completed it: it is about to arrive).
    pub fn streamed_into(&self, name: &WalFileName) -> bool {
        let size =
            crate::pg::WalSegSize::new(self.seg_size.load(std::sync::atomic::Ordering::Acquire));
        crate::wal::stored::streamed_into(
            name,
            self.streaming_timeline(),
            self.received_lsn(),
            self.durable_lsn(),
            size,
            self.problem().is_none(),
        )
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
    state: &std::sync::Arc<StreamState>,
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
    state.seg_size.store(
        server.seg_size.bytes(),
        std::sync::atomic::Ordering::Release,
    );
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
    // (An old padded partial, its end unknown, none, or a damaged one: nothing to keep. A
    // storage error: not known, so this session must not start; it reconnects.)
    let stored_partial = archive
        .streamed_len(&first, server.seg_size)
        .await?
        .map(|len| (first, len));
    if cfg.partial_max_pieces > 0 {
        archive.repo().upgrade_layout().await?;
    }
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
        let session = Session::new(
            cfg,
            &archive,
            state,
            conn,
            spool,
            tli,
            start,
            stored_partial,
        );
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

/// One START_REPLICATION stream: receives into the spool, uploads beside it, reports.
///
/// Receiving never waits on storage: completed segments queue in the spool and upload several at
/// once (`wal_uploads`) while the walsender's WAL keeps arriving; the open segment's `.partial`
/// uploads once nothing queues before it. The flush position reported is the end of the
/// contiguous prefix in storage. An upload that fails is tried again (with a growing wait) on the
/// same replication connection. Only when the queue reaches `spool_max_mb` does the receiver stop
/// reading (back-pressure: Postgres keeps the WAL in the slot).
struct Session<'a> {
    cfg: &'a Config,
    state: &'a StreamState,
    ctx: std::sync::Arc<UploadCtx>,
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
    /// Synchronous mode: the walsender had nothing more to send at once.
    drained: bool,
    /// Completed segments not yet in storage, in WAL order.
    queue: std::collections::VecDeque<Queued>,
    /// The uploads running (each a task of its own).
    uploads: futures::stream::FuturesUnordered<futures::future::BoxFuture<'static, Finished>>,
    /// The start of the segment whose `.partial` upload runs.
    partial_running: Option<Lsn>,
    /// The start of the segment whose `.partial` this session last tried to store (it may be
    /// stored even when the store said otherwise: the segment's upload removes it).
    partial_tried: Option<Lsn>,
    /// The newest `.partial` stored this session: its segment's start and the end it holds.
    partial_stored: Option<(Lsn, Lsn)>,
    /// The `.partial` this session stored of the open segment, which pieces may continue.
    partial_base: Option<PartialBase>,
    /// After a failed upload no other starts before this.
    retry_at: Option<Instant>,
    retry_wait: Duration,
    /// An upload failed and none succeeded since (the problem `/status` shows).
    failing: bool,
    /// The queue is at `spool_max_mb`: nothing is read from the server.
    paused: bool,
    /// WAL not yet in storage: the end of each piece received, and when it came (pieces that
    /// arrive within a millisecond share an entry). Oldest first.
    arrivals: std::collections::VecDeque<(Lsn, Instant)>,
}

/// A `.partial` this session stored and the pieces stored after it.
#[derive(Debug, Clone, Copy)]
struct PartialBase {
    seg_start: Lsn,
    len: u64,
    /// The pieces after it, by level (0: one round's new bytes; level n+1: `partial_max_pieces`
    /// pieces of level n and everything after them, merged): where the first piece of each level
    /// starts, and how many there are. In the segment, higher levels come first.
    levels: [Level; PIECE_LEVELS],
    /// Bytes uploaded as pieces (merges count again) since the `.partial`.
    piece_bytes: u64,
}

#[derive(Debug, Clone, Copy, Default)]
struct Level {
    start: u64,
    count: u32,
}

/// Levels of merged pieces: with 32 pieces a level, 6 levels hold 32^6 rounds, far more than a
/// segment's worth; a full top level makes a new `.partial` instead.
const PIECE_LEVELS: usize = 6;

impl PartialBase {
    fn new(seg_start: Lsn, len: u64) -> PartialBase {
        PartialBase {
            seg_start,
            len,
            levels: [Level::default(); PIECE_LEVELS],
            piece_bytes: 0,
        }
    }

    /// Where the next upload of the open segment starts and the level of the piece it makes
    /// (`end`: the end of what storage holds of it): the new bytes as a level-0 piece; when a
    /// level holds `max` pieces, those and everything after them as one piece a level up, so
    /// a reader assembles at most `max` pieces a level and each byte is sent again once a
    /// level; once the pieces sent hold as many bytes as the `.partial`, or the top level is
    /// full, None: the whole prefix again, as a new `.partial`.
    fn next_piece(&self, end: u64, max: u32) -> Option<(u64, usize)> {
        if max == 0 || self.piece_bytes >= self.len {
            return None;
        }
        match self.levels.iter().position(|l| l.count >= max) {
            None => Some((end, 0)),
            Some(l) if l + 1 < PIECE_LEVELS => Some((self.levels[l].start, l + 1)),
            Some(_) => None,
        }
    }

    /// Records a stored piece from `from` to `written` of `level`.
    fn stored(&mut self, from: u64, written: u64, level: usize) {
        for l in &mut self.levels[..level] {
            *l = Level::default();
        }
        let l = &mut self.levels[level];
        if l.count == 0 {
            l.start = from;
        }
        l.count += 1;
        self.piece_bytes += written - from;
    }
}

/// A completed segment waiting for storage.
struct Queued {
    start: Lsn,
    end: Lsn,
    name: WalFileName,
    /// The segment while it waits; None while its upload runs.
    seg: Option<CompleteSegment>,
    done: bool,
}

/// What an upload came to.
enum Finished {
    /// A completed segment: stored (and gone from the spool), or failed.
    Segment {
        start: Lsn,
        outcome: Result<(), Failed>,
    },
    /// The open segment's `.partial` (`from` 0: the segment's first `written` bytes), or the
    /// piece of it that holds the bytes `from .. written`, of `level` (see [`PartialBase`]).
    Partial {
        name: WalFileName,
        seg_start: Lsn,
        from: u64,
        level: usize,
        written: u64,
        outcome: anyhow::Result<()>,
    },
}

/// A segment whose upload failed: back into the queue, unless `retry` is false (the WAL itself is
/// wrong, or the spool cannot be read), which ends the session.
struct Failed {
    seg: CompleteSegment,
    error: anyhow::Error,
    retry: bool,
}

/// What an upload needs, owned: uploads run as tasks of their own, beside the receiving.
struct UploadCtx {
    archive: Archive,
    codec: crate::codec::Codec,
    spool_dir: std::path::PathBuf,
    state: std::sync::Arc<StreamState>,
}

/// What woke the session.
enum Wake {
    Upload(Finished),
    Data(Result<Option<bytes::Bytes>, PgError>),
    Stop,
    Tick { drained: bool },
}

/// In synchronous mode, the longest received WAL waits for more to join its upload while the
/// walsender keeps sending (a steady stream must not starve the commits waiting on it).
const SYNC_BATCH_WAIT: Duration = Duration::from_millis(20);
/// The wait after a failed upload before the next try: first, and at most (it doubles).
const RETRY_FIRST: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(10);
/// How long a session that failed waits for the uploads it started before it ends.
const SETTLE: Duration = Duration::from_secs(60);

impl<'a> Session<'a> {
    #[allow(clippy::too_many_arguments)]
    fn new(
        cfg: &'a Config,
        archive: &'a Archive,
        state: &'a std::sync::Arc<StreamState>,
        conn: ReplConnection,
        spool: Spool,
        timeline: TimelineId,
        start: Lsn,
        stored_partial: Option<(WalFileName, u64)>,
    ) -> Session<'a> {
        let ctx = std::sync::Arc::new(UploadCtx {
            archive: archive.clone(),
            codec: cfg.codec,
            spool_dir: cfg.spool_dir.clone(),
            state: state.clone(),
        });
        Session {
            cfg,
            state,
            ctx,
            conn,
            spool,
            timeline,
            received: start,
            durable: start,
            last_status: Instant::now()
                .checked_sub(cfg.status_interval)
                .unwrap_or_else(Instant::now),
            last_partial: Instant::now(),
            stopping: false,
            hung_up: false,
            stored_partial,
            drained: false,
            queue: Default::default(),
            uploads: Default::default(),
            partial_running: None,
            partial_tried: None,
            partial_stored: None,
            partial_base: None,
            retry_at: None,
            retry_wait: RETRY_FIRST,
            failing: false,
            paused: false,
            arrivals: Default::default(),
        }
    }

    async fn run(mut self, stop: &CancellationToken) -> anyhow::Result<()> {
        let result = self.stream(stop).await;
        if result.is_err() {
            self.settle().await;
        }
        self.state.spooled_segments.store(0, Relaxed);
        self.state.uploads_in_flight.store(0, Relaxed);
        self.state.oldest_pending_unix_ms.store(0, Relaxed);
        result
    }

    async fn stream(&mut self, stop: &CancellationToken) -> anyhow::Result<()> {
        loop {
            if self.last_status.elapsed() >= self.cfg.status_interval {
                self.report().await?;
            }
            self.start_uploads()?;
            let was_drained = std::mem::replace(&mut self.drained, false);
            if !self.stopping && stop.is_cancelled() {
                // Shutdown: keep receiving until the walsender ends the stream after Postgres'
                // shutdown checkpoint (or the daemon's deadline ends this), then keep what was
                // received.
                self.stopping = true;
                tracing::info!("stopping: draining WAL until the server ends the stream");
                continue;
            }
            if self.hung_up {
                return self.end_of_stream().await;
            }
            let full = self.check_spool_full();
            // Synchronous: the open segment's upload starts as soon as the walsender has sent
            // what it had (commits that arrived together share one upload).
            let waiting = self.cfg.synchronous && self.partial_possible() && !self.retry_pending();
            let tick = self.next_tick();
            // Waiting (synchronous): the socket is drained once the branches above find nothing
            // after one yield; a zero-length timer would add the timer's millisecond of
            // granularity to every synchronous commit.
            // (Found drained last time and still waiting: nothing could start; no busy loop.)
            let quick = waiting && !was_drained;
            let tick = async move {
                if quick {
                    tokio::task::yield_now().await;
                } else if waiting {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                } else {
                    tokio::time::sleep(tick).await;
                }
            };
            let wake = tokio::select! {
                biased;
                Some(f) = self.uploads.next(), if !self.uploads.is_empty() => Wake::Upload(f),
                m = self.conn.next_copy_data(), if !full => Wake::Data(m),
                _ = stop.cancelled(), if !self.stopping => Wake::Stop,
                _ = tick => Wake::Tick { drained: waiting },
            };
            match wake {
                Wake::Upload(f) => self.finished(f).await?,
                Wake::Stop => {}
                Wake::Tick { drained } => self.drained = drained,
                Wake::Data(m) => {
                    let msg = match m {
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
                        WalMessage::XLogData(x) => self.on_wal(x)?,
                        WalMessage::Keepalive(k) => {
                            if k.reply_requested && !(self.stopping && self.received > self.durable)
                            {
                                self.report().await?;
                            }
                        }
                    }
                }
            }
        }
    }

    /// How long the session may sleep: until the next status report, the next `.partial` upload
    /// (if one could start) or the next try of a failed upload.
    fn next_tick(&self) -> Duration {
        let mut tick = self
            .cfg
            .status_interval
            .saturating_sub(self.last_status.elapsed());
        if self.hung_up {
            // Nothing more is reported.
            tick = Duration::from_secs(3600);
        }
        if self.partial_possible() && !self.retry_pending() {
            tick = tick.min(
                self.cfg
                    .partial_upload_interval
                    .saturating_sub(self.last_partial.elapsed()),
            );
        }
        if let Some(at) = self.retry_at {
            tick = tick.min(at.saturating_duration_since(Instant::now()));
        }
        tick.max(Duration::from_millis(10))
    }

    /// Whether a failed upload's wait has not ended yet (nothing new starts meanwhile).
    fn retry_pending(&self) -> bool {
        self.retry_at.is_some_and(|at| Instant::now() < at)
    }

    /// Whether the queue holds as much as the spool may: then nothing is read from the server
    /// until storage takes some (Postgres keeps the WAL in the slot meanwhile).
    fn check_spool_full(&mut self) -> bool {
        let seg_bytes = u64::from(self.spool.seg_size().bytes());
        let limit = (self.cfg.spool_max_bytes / seg_bytes).max(1);
        let full = self.queue.len() as u64 >= limit;
        if full && !self.paused {
            self.state.backpressure_events.inc();
            tracing::warn!(
                segments = self.queue.len(),
                spool_max_mb = self.cfg.spool_max_bytes >> 20,
                durable = %self.durable,
                "the spool is full of WAL that storage has not taken yet: receiving pauses \
                 (Postgres keeps the WAL in the slot) until uploads catch up"
            );
        } else if !full && self.paused {
            tracing::info!(durable = %self.durable, "uploads caught up: receiving WAL again");
        }
        self.paused = full;
        full
    }

    /// Starts what may upload now: completed segments in WAL order, as many as `wal_uploads`
    /// allows, then the open segment's `.partial` when it is due.
    fn start_uploads(&mut self) -> anyhow::Result<()> {
        if self.retry_pending() {
            return Ok(());
        }
        self.retry_at = None;
        let mut running = self.uploads.len();
        for q in self.queue.iter_mut() {
            if running >= self.cfg.wal_uploads {
                break;
            }
            // A segment whose `.partial` upload runs waits for it: the segment's upload removes
            // that object, which must not come back after it.
            if q.done || self.partial_running == Some(q.start) {
                continue;
            }
            let Some(seg) = q.seg.take() else { continue };
            self.uploads
                .push(spawned(upload_segment(self.ctx.clone(), seg)));
            running += 1;
        }
        if running < self.cfg.wal_uploads && self.partial_due() {
            self.start_partial()?;
        }
        let running = self.uploads.len() as u64;
        self.state.uploads_in_flight.store(running, Relaxed);
        self.state.uploads_in_flight_max.fetch_max(running, Relaxed);
        Ok(())
    }

    /// Whether the open segment holds WAL that a `.partial` upload could store now.
    fn partial_possible(&self) -> bool {
        self.partial_running.is_none()
            && self.queue.is_empty()
            && !self.held_back()
            && self.spool.open.as_ref().is_some_and(|o| o.has_news())
    }

    /// Whether the open segment's `.partial` uploads now: its interval passed, or the stream
    /// stops or ended, or (synchronous) received WAL waits.
    fn partial_due(&self) -> bool {
        if !self.partial_possible() {
            return false;
        }
        let sync_due = self.cfg.synchronous
            && (self.drained
                || self
                    .arrivals
                    .front()
                    .is_some_and(|(_, at)| at.elapsed() >= SYNC_BATCH_WAIT));
        self.last_partial.elapsed() >= self.cfg.partial_upload_interval
            || self.stopping
            || self.hung_up
            || sync_due
    }

    /// Uploads the open segment as `<segment>.partial`, beside the receiving: a partial in
    /// storage is as durable as a segment, so the slot may advance to its end once it is stored.
    fn start_partial(&mut self) -> anyhow::Result<()> {
        self.last_partial = Instant::now();
        let seg = self.spool.open.as_ref().expect("a partial is due");
        let snap = seg.snapshot()?;
        let written = snap.written;
        let name = seg.name;
        let seg_start = seg.start;
        // Only the new bytes, as a piece after the `.partial` this session stored (or, when a
        // level is full, a merge of its pieces), until the pieces hold as much as the `.partial`:
        // then the whole prefix again, as a new one.
        let (from, level) = self
            .partial_base
            .filter(|b| b.seg_start == seg_start)
            .and_then(|b| {
                b.next_piece(
                    seg.uploaded_end().0 - seg_start.0,
                    self.cfg.partial_max_pieces,
                )
            })
            .unwrap_or((0, 0));
        let ctx = self.ctx.clone();
        self.partial_running = Some(seg_start);
        self.partial_tried = Some(seg_start);
        self.uploads.push(spawned(async move {
            let outcome = store_partial(&ctx, name, snap, from, level > 0).await;
            Finished::Partial {
                name: name.with_kind(WalFileKind::Partial),
                seg_start,
                from,
                level,
                written,
                outcome,
            }
        }));
        Ok(())
    }

    /// Takes an upload's outcome: moves the durable position, or queues the upload again.
    async fn finished(&mut self, f: Finished) -> anyhow::Result<()> {
        match f {
            Finished::Segment { start, outcome } => {
                let q = self
                    .queue
                    .iter_mut()
                    .find(|q| q.start == start)
                    .expect("an upload's segment is queued");
                match outcome {
                    Ok(()) => {
                        q.done = true;
                        self.upload_ok();
                    }
                    Err(failed) if !failed.retry => return Err(failed.error),
                    Err(failed) => {
                        let what = format!("uploading {}", q.name);
                        q.seg = Some(failed.seg);
                        self.upload_failed(&what, &failed.error);
                    }
                }
            }
            Finished::Partial {
                name,
                seg_start,
                from,
                level,
                written,
                outcome,
            } => {
                self.partial_running = None;
                match outcome {
                    Ok(()) => {
                        self.partial_base = match self.partial_base {
                            Some(mut b) if from > 0 && b.seg_start == seg_start => {
                                b.stored(from, written, level);
                                self.state.partial_pieces.inc();
                                Some(b)
                            }
                            _ => Some(PartialBase::new(seg_start, written)),
                        };
                        if let Some(open) =
                            self.spool.open.as_mut().filter(|o| o.start == seg_start)
                        {
                            open.uploaded(written);
                        }
                        let end = Lsn(seg_start.0 + written);
                        if self
                            .partial_stored
                            .is_none_or(|(s, e)| s != seg_start || e < end)
                        {
                            self.partial_stored = Some((seg_start, end));
                        }
                        self.state.partial_uploads.inc();
                        tracing::debug!(wal = %name, bytes = written, "partial segment uploaded");
                        self.upload_ok();
                    }
                    Err(e) => self.upload_failed(&format!("uploading {name}"), &e),
                }
            }
        }
        self.state
            .uploads_in_flight
            .store(self.uploads.len() as u64, Relaxed);
        self.advance().await
    }

    fn upload_ok(&mut self) {
        self.retry_wait = RETRY_FIRST;
        if self.failing {
            self.failing = false;
            self.state.set_problem(None);
            tracing::info!("uploads succeed again");
        }
    }

    fn upload_failed(&mut self, what: &str, e: &anyhow::Error) {
        self.state.upload_errors.inc();
        let wait = self.retry_wait;
        self.retry_at = Some(Instant::now() + wait);
        self.retry_wait = (wait * 2).min(RETRY_MAX);
        self.failing = true;
        tracing::warn!(
            durable = %self.durable,
            queued = self.queue.len(),
            "{what} failed, trying again in {:.1}s (WAL is still received into the spool): {e:#}",
            wait.as_secs_f64()
        );
        self.state.set_problem(Some(StreamProblem {
            message: format!("{what} failed: {e:#}"),
            unsupported: false,
        }));
    }

    /// Moves the durable position to the end of what storage holds without a gap: the stored
    /// segments at the head of the queue, then a stored `.partial` that follows them.
    async fn advance(&mut self) -> anyhow::Result<()> {
        let mut upto = self.durable;
        while self.queue.front().is_some_and(|q| q.done) {
            let q = self.queue.pop_front().expect("a front");
            upto = upto.max(q.end);
        }
        if let Some((start, end)) = self.partial_stored {
            // Nothing before its segment waits (everything before `upto` is stored).
            let first = self.queue.front().is_none_or(|q| q.start == start);
            if first && start <= upto {
                upto = upto.max(end);
            }
        }
        self.state
            .spooled_segments
            .store(self.queue.len() as u64, Relaxed);
        self.made_durable(upto).await
    }

    /// The stream ended (end of timeline, or shutdown): keep what we have. The server is gone:
    /// nothing more is reported to it.
    async fn end_of_stream(&mut self) -> anyhow::Result<()> {
        self.hung_up = true;
        loop {
            self.start_uploads()?;
            if let Some(f) = self.uploads.next().await {
                self.finished(f).await?;
                continue;
            }
            if self.queue.is_empty() && !self.partial_possible() {
                break;
            }
            // A failed upload waits for its next try.
            tokio::time::sleep(self.next_tick()).await;
        }
        if self.stopping {
            tracing::info!(durable = %self.state.durable_lsn(), "WAL stream drained");
            return Ok(());
        }
        Err(StreamEnded {
            timeline: self.timeline,
        }
        .into())
    }

    /// After a failure: the uploads already running finish (or are given up after `SETTLE`);
    /// nothing new starts. What they stored counts (the durable position only grows); the rest is
    /// received again by the next session, which starts at the durable position.
    async fn settle(&mut self) {
        self.hung_up = true;
        self.retry_at = Some(Instant::now() + SETTLE);
        let deadline = tokio::time::Instant::now() + SETTLE;
        while !self.uploads.is_empty() {
            match tokio::time::timeout_at(deadline, self.uploads.next()).await {
                Ok(Some(f)) => {
                    if let Err(e) = self.finished(f).await {
                        tracing::debug!("after the stream failed: {e:#}");
                    }
                }
                Ok(None) | Err(_) => break,
            }
        }
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
        if upto <= self.durable {
            return Ok(());
        }
        self.durable = upto;
        self.state.durable.advance(upto);
        // How long the oldest WAL this made durable waited since it was received.
        let mut oldest = None;
        while let Some(&(end, at)) = self.arrivals.front() {
            if end > upto {
                break;
            }
            oldest.get_or_insert(at);
            self.arrivals.pop_front();
        }
        if let Some(at) = oldest {
            self.state.durable_lag.observe(at.elapsed().as_secs_f64());
        }
        self.note_oldest_pending();
        self.report().await
    }

    fn note_oldest_pending(&self) {
        let ms = self.arrivals.front().map_or(0, |(_, at)| {
            let age = at.elapsed().as_millis() as u64;
            crate::progress::unix_now_ms().saturating_sub(age).max(1)
        });
        self.state.oldest_pending_unix_ms.store(ms, Relaxed);
    }

    /// Received WAL: into the spool; the segments it completes join the upload queue.
    fn on_wal(&mut self, x: XLogData) -> anyhow::Result<()> {
        let end = x.data_end();
        for mut seg in self.spool.write(x.wal_start, &x.data)? {
            // An earlier session's partial of it, or one this session tried, goes once the whole
            // segment is stored.
            seg.had_partial |= self.partial_tried == Some(seg.start)
                || self
                    .stored_partial
                    .as_ref()
                    .is_some_and(|(first, _)| *first == seg.name);
            self.queue.push_back(Queued {
                start: seg.start,
                end: seg.end(),
                name: seg.name,
                seg: Some(seg),
                done: false,
            });
        }
        self.state
            .spooled_segments
            .store(self.queue.len() as u64, Relaxed);
        if end > self.received {
            self.received = end;
            self.state.received.advance(end);
            let now = Instant::now();
            match self.arrivals.back_mut() {
                Some((last, at)) if now.duration_since(*at) < Duration::from_millis(1) => {
                    *last = end;
                }
                _ => self.arrivals.push_back((end, now)),
            }
            if self.arrivals.len() == 1 {
                self.note_oldest_pending();
            }
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
}

/// Deletes the streamed `.partial` of a segment now stored whole, then the pieces after it: a
/// reader that finds its `.partial` unchanged after listing the pieces has missed none (see
/// `wal::fetch`). A crash in between leaves pieces that no reader takes (there is no `.partial`
/// for them to continue); retention deletes them with the segment.
async fn delete_streamed(archive: &Archive, name: &WalFileName) -> Result<(), StorageError> {
    archive
        .repo()
        .delete(&archive.layout().streaming_partial(name))
        .await?;
    for p in archive.streamed_pieces(name).await? {
        archive.repo().delete(&p.key).await?;
    }
    Ok(())
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

/// Runs an upload as a task of its own (in the session's span, so its events carry the
/// timeline and slot); its outcome, or its panic, goes on in the session.
fn spawned(
    upload: impl std::future::Future<Output = Finished> + Send + 'static,
) -> futures::future::BoxFuture<'static, Finished> {
    let task = tokio::spawn(upload.in_current_span());
    Box::pin(async move {
        match task.await {
            Ok(f) => f,
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    })
}

/// The open segment's `.partial`: its first `written` bytes, synced and read from the spool
/// (off the async threads), checked, stored. Only the bytes received are stored: the object's
/// plain length is then where the WAL in storage ends, which `list` and `/status` both report
/// (readers pad it back to a whole segment).
///
/// With `from` > 0, only the bytes `from .. written` are stored, as a piece after the `.partial`
/// (layout 2, `storage::pieces`). A new `.partial` (`from` 0) replaces the pieces stored after the
/// old one: once it is stored, those it holds go (best effort: readers skip them anyway).
async fn store_partial(
    ctx: &UploadCtx,
    name: WalFileName,
    snap: crate::wal::spool::Snapshot,
    from: u64,
    merge: bool,
) -> anyhow::Result<()> {
    let system = ctx.archive.system_identifier();
    let written = snap.written;
    let data = tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<u8>> {
        let partial = name.with_kind(WalFileKind::Partial);
        if from > 0 {
            let piece = snap.read_piece(from)?;
            let len = usize::try_from(piece.len).expect("a segment's size");
            walheader::check_segment_head(&partial, &piece.head, len, Some(system))?;
            return Ok(piece.bytes);
        }
        let mut data = snap.read()?;
        walheader::check_segment(&partial, &data, Some(system))?;
        data.truncate(usize::try_from(snap.written).expect("within a segment"));
        Ok(data)
    })
    .await??;
    let (archive, layout) = (&ctx.archive, ctx.archive.layout());
    let key = if from > 0 {
        layout.streaming_piece(&name, from, written)
    } else {
        layout.streaming_partial(&name)
    };
    let stored = archive.repo().put_overwrite(&key, &data, ctx.codec).await?;
    ctx.state.partial_bytes_uploaded.inc_by(stored);
    if from > 0 && !merge {
        return Ok(());
    }
    // A new `.partial` or a merged piece: the pieces it holds go (a reader racing this takes
    // the longer one, or looks again when one it listed is gone).
    match archive.streamed_pieces(&name).await {
        Ok(pieces) => {
            let covered = |p: &&crate::storage::pieces::PieceRef| {
                p.start >= from && p.end <= written && (p.start, p.end) != (from, written)
            };
            for p in pieces.iter().filter(covered) {
                if let Err(e) = archive.repo().delete(&p.key).await {
                    tracing::debug!("leaving a piece the new .partial holds: {e}");
                }
            }
        }
        Err(e) => tracing::debug!("not listing the pieces the new .partial holds: {e}"),
    }
    Ok(())
}

/// A complete segment's upload: read from the spool, check, upload, verify, then drop it from the
/// spool and remove its `.partial` object.
async fn upload_segment(ctx: std::sync::Arc<UploadCtx>, seg: CompleteSegment) -> Finished {
    let start = seg.start;
    let span = tracing::info_span!("upload", wal = %seg.name, start = %seg.start);
    let outcome = store_segment(&ctx, seg).instrument(span).await;
    Finished::Segment { start, outcome }
}

/// Reads a completed segment from the spool and checks it (off the async threads); with the
/// SHA-256 of its content.
fn read_segment(seg: &CompleteSegment, system: u64) -> anyhow::Result<(Vec<u8>, [u8; 32])> {
    let data = seg.read()?;
    walheader::check_segment(&seg.name, &data, Some(system))?;
    let sha = crate::storage::object::content_sha256(&data);
    Ok((data, sha))
}

async fn store_segment(ctx: &UploadCtx, seg: CompleteSegment) -> Result<(), Failed> {
    let (archive, state) = (&ctx.archive, &ctx.state);
    let (system, encrypts) = (
        archive.system_identifier(),
        archive.repo().keys().encrypts(),
    );
    let (seg, read) = tokio::task::spawn_blocking(move || {
        let read = read_segment(&seg, system);
        (seg, read)
    })
    .await
    .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
    let (data, sha) = match read {
        Ok(d) => d,
        Err(error) => {
            return Err(Failed {
                seg,
                error,
                retry: false,
            });
        }
    };
    let key = archive.layout().wal(&seg.name);
    // Encrypted stored segments cannot be read back here (no identity): a record of what this
    // daemon stored lets it recognise its own upload when it receives a segment again.
    let record = ctx.spool_dir.join("uploaded").join(seg.name.to_string());
    let digest = encrypts.then(|| hex::encode(sha));
    let stored_before = digest
        .as_ref()
        .is_some_and(|d| std::fs::read_to_string(&record).is_ok_and(|r| r.trim() == d.as_str()));
    let outcome = match archive
        .repo()
        .put_new_known(&key, &data, sha, ctx.codec, stored_before)
        .await
    {
        Ok(o) => o,
        Err(e) => {
            return Err(Failed {
                seg,
                error: e.into(),
                retry: true,
            });
        }
    };
    drop(data);
    match outcome {
        PutOutcome::Stored { stored_len } | PutOutcome::Repaired { stored_len } => {
            state.bytes_uploaded.inc_by(stored_len);
        }
        PutOutcome::AlreadyPresent => {
            tracing::info!("already in storage (archive_command was first)");
        }
    }
    if let Some(d) = digest {
        remember_upload(&record, &d);
    }
    state.stored.record(&seg.name, sha);
    if seg.had_partial
        && let Err(e) = delete_streamed(archive, &seg.name).await
    {
        return Err(Failed {
            seg,
            error: e.into(),
            retry: true,
        });
    }
    state.segments_uploaded.inc();
    state
        .last_upload_unix
        .store(crate::progress::unix_now(), Relaxed);
    if let Err(error) = seg.discard() {
        // The segment is stored: a leftover file in the spool is removed by the next session.
        tracing::warn!("{error:#}");
    }
    tracing::info!("segment streamed to storage");
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Rounds of `each` new bytes after a `.partial` of `base` bytes, with `max` pieces a level:
    /// (uploads that were pieces, bytes sent, most pieces storage held at once).
    fn rounds(base: u64, each: u64, n: u32, max: u32) -> (u32, u64, usize) {
        let mut b = PartialBase::new(Lsn(0), base);
        let (mut end, mut pieces, mut sent) = (base, 0, 0);
        let mut held: Vec<(u64, u64)> = vec![];
        let mut most = 0;
        for _ in 0..n {
            let written = end + each;
            match b.next_piece(end, max) {
                Some((from, level)) => {
                    assert!(
                        from <= end && from >= base,
                        "a piece starts inside what is held"
                    );
                    b.stored(from, written, level);
                    held.retain(|&(s, e)| !(s >= from && e <= written));
                    held.push((from, written));
                    pieces += 1;
                    sent += written - from;
                }
                None => {
                    b = PartialBase::new(Lsn(0), written);
                    held.clear();
                    sent += written;
                }
            }
            // The held pieces chain from the base to the end, without gaps.
            let mut reach = b.len;
            let mut sorted = held.clone();
            sorted.sort();
            for (s, e) in sorted {
                assert!(s <= reach, "a gap before {s}");
                reach = reach.max(e);
            }
            assert_eq!(reach, written);
            most = most.max(held.len());
            end = written;
        }
        (pieces, sent, most)
    }

    #[test]
    fn pieces_merge_by_level_so_many_small_rounds_stay_few_objects_and_cheap() {
        // 100,000 rounds of 100 bytes after an 8 MiB .partial: 10 MB of new WAL.
        let (pieces, sent, most) = rounds(8 << 20, 100, 100_000, 32);
        assert!(
            pieces >= 99_990,
            "only a few new .partials: {pieces} pieces"
        );
        assert!(most <= 32 * 4, "{most} pieces held at once");
        // Each byte is sent again about once a level (4 here) and the prefix a few times, not
        // once a round (that would be about 10^12 bytes): under 10 times the new WAL.
        assert!(sent < 10 * 100 * 100_000, "{sent} bytes sent");
    }

    #[test]
    fn pieces_that_hold_as_much_as_the_partial_make_a_new_one() {
        let (pieces, sent, most) = rounds(1000, 100, 100, 32);
        assert!(pieces < 100, "some rounds stored a new .partial");
        assert!(most <= 32 * 2);
        assert!(sent < 100 * 100 * 6, "{sent}");
        // partial_max_pieces 0: the whole prefix every round.
        let (pieces, _, most) = rounds(1000, 100, 10, 0);
        assert_eq!((pieces, most), (0, 0));
    }
}
