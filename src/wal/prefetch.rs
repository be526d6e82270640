//! WAL served to restore_command by the daemon, with prefetch that keeps ahead of redo.
//!
//! After a segment is asked for (over HTTP) or taken from the hand-off directory
//! ([`super::handoff`]), the segments after it are downloaded, verified once and placed in that
//! directory, where `wal-fetch` takes them with no more work than a local copy; a client that asks
//! over HTTP instead is answered from the same files.
//!
//! How far ahead: a window of segments that starts at 4 and doubles, up to `prefetch_segments`
//! and the byte budget `prefetch_max_mb`, each time redo catches up with it (a request for a
//! segment not yet there), so it sizes itself to the rates of fetching and of replay. It never
//! goes past the end of the archive (a segment not in storage stops it until asked again, or for
//! two seconds) nor past a timeline switch: the newest history file after the timeline being
//! replayed says where that timeline ends on the way to the latest one, and no segment of it past
//! there is fetched (Postgres reads that WAL from the next timeline's files). A miss costs one
//! fetch, never a wait for a batch.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;

use crate::pg::{SegmentNo, TimelineId, WalFileKind, WalFileName, WalSegSize};
use crate::storage::object::{self, Header};
use crate::storage::{Archive, StorageError};
use crate::wal::fetch::{FetchError, Fetched, fetch_to_open, open_checked};
use crate::wal::handoff::{self, Form};

/// The window a replay starts with.
const FIRST_WINDOW: usize = 4;
/// How long "not in the archive" stops the prefetch at a segment (the daemon may be streaming it).
const ABSENT_FOR: Duration = Duration::from_secs(2);
/// How long a timeline's end, as the history files state it, is taken as known.
const TIMELINE_END_FOR: Duration = Duration::from_secs(15);
/// The most later timelines looked for (their history files) from the one being replayed.
const MAX_LATER_TIMELINES: u32 = 64;
/// The longest a request waits for the download of its segment that is under way.
const INFLIGHT_WAIT: Duration = Duration::from_secs(5);
/// How often the daemon looks for files `wal-fetch` took.
pub const WATCH_EVERY: Duration = Duration::from_millis(20);

pub struct Prefetcher {
    dir: PathBuf,
    max_ahead: usize,
    budget: u64,
    state: Mutex<State>,
    /// HTTP requests answered from a prefetched file.
    pub hits: Counter,
    /// Segments downloaded ahead of their request.
    pub prefetched: Counter,
    /// All WAL requests answered over HTTP.
    pub served: Counter,
    /// Prefetched segments `wal-fetch` took from the hand-off directory.
    pub handed_off: Counter,
    /// The prefetch window (segments ahead of redo).
    pub window: Gauge,
    /// One segment decoded and checked at a time, the nearest to redo first of those downloaded:
    /// recovery replays on one core and waits for the next segment, so the other core is not
    /// taken from redo by a burst of decodes, and the segment redo needs next is not placed after
    /// the ones it needs later (seen: the second segment of a replay decoded third of four, a
    /// 150 ms wait for recovery). The downloads themselves (network waits) run side by side.
    decoding: Turns,
}

/// Turns taken one at a time, the lowest waiting key first.
#[derive(Default)]
struct Turns {
    state: Mutex<TurnsState>,
    changed: tokio::sync::Notify,
}

#[derive(Default)]
struct TurnsState {
    busy: bool,
    waiting: std::collections::BTreeSet<(u32, u64)>,
}

/// A turn taken: the next one is given when it is dropped.
struct Turn<'a>(&'a Turns);

/// A place in the queue: left when dropped (a waiter that gave up, or took its turn).
struct Queued<'a>(&'a Turns, (u32, u64));

impl Turns {
    async fn take(&self, key: (u32, u64)) -> Turn<'_> {
        let new = self.state.lock().expect("not poisoned").waiting.insert(key);
        // One waiter per key (a segment is downloaded once at a time: `inflight`), or one of two
        // would wait for good.
        debug_assert!(new, "two waiters for turn {key:?}");
        let _queued = Queued(self, key);
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            // Registered before the check, so a turn given after it is not missed.
            notified.as_mut().enable();
            {
                let mut st = self.state.lock().expect("not poisoned");
                if !st.busy && st.waiting.first() == Some(&key) {
                    st.busy = true;
                    st.waiting.remove(&key);
                    return Turn(self);
                }
            }
            notified.await;
        }
    }
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        self.0.state.lock().expect("not poisoned").busy = false;
        self.0.changed.notify_waiters();
    }
}

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        if self
            .0
            .state
            .lock()
            .expect("not poisoned")
            .waiting
            .remove(&self.1)
        {
            self.0.changed.notify_waiters();
        }
    }
}

/// A prefetched segment in the directory.
struct Ready {
    path: PathBuf,
    form: Form,
    bytes: u64,
    header: Header,
    key: object_store::path::Path,
}

#[derive(Default)]
struct State {
    ready: HashMap<WalFileName, Ready>,
    inflight: HashSet<WalFileName>,
    window: usize,
    archive: Option<Archive>,
    /// The newest segment asked for or taken, and the segment size.
    pos: Option<(WalFileName, WalSegSize)>,
    /// A segment found not in storage, and when.
    absent: Option<(WalFileName, Instant)>,
    /// Where each timeline ends (the first of its segments not to fetch; `None`: it does not end
    /// on the way to the latest timeline), and when that was read.
    ends: HashMap<TimelineId, (Option<SegmentNo>, Instant)>,
    /// Timelines whose end is being read.
    reading_end: HashSet<TimelineId>,
}

impl Prefetcher {
    /// A prefetcher placing files in `dir` (created, owner only; what an earlier run left there is
    /// removed: it is not trusted; a directory in a Postgres data directory is refused) up to `max_ahead` segments and `budget` bytes ahead.
    pub fn new(dir: PathBuf, max_ahead: usize, budget: u64) -> std::io::Result<Prefetcher> {
        use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)?;
        let meta = std::fs::symlink_metadata(&dir)?;
        if meta.file_type().is_symlink() {
            return Err(std::io::Error::other(format!(
                "{} is a symbolic link: the prefetch directory must be a directory of its own",
                dir.display()
            )));
        }
        // SAFETY: geteuid has no preconditions and cannot fail.
        if meta.uid() == unsafe { libc::geteuid() } && meta.mode() & 0o022 != 0 {
            // Ours, made under a permissive umask: only ours to write.
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
        }
        if let Some(why) = handoff::unusable(&dir) {
            return Err(std::io::Error::other(format!(
                "the prefetch directory cannot be used: {why}"
            )));
        }
        let removed = handoff::clean(&dir)?;
        if removed > 0 {
            tracing::info!(dir = %dir.display(), removed, "removed the prefetched files an earlier run left");
        }
        Ok(Prefetcher::with(dir, max_ahead, budget))
    }

    /// A prefetcher that prefetches nothing and never touches `dir` (which could not be used):
    /// requests are answered from storage.
    pub fn off(dir: PathBuf) -> Prefetcher {
        Prefetcher::with(dir, 0, 0)
    }

    fn with(dir: PathBuf, max_ahead: usize, budget: u64) -> Prefetcher {
        Prefetcher {
            dir,
            max_ahead,
            budget,
            state: Mutex::new(State {
                window: FIRST_WINDOW.min(max_ahead),
                ..State::default()
            }),
            decoding: Turns::default(),
            hits: Counter::default(),
            prefetched: Counter::default(),
            served: Counter::default(),
            handed_off: Counter::default(),
            window: Gauge::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("not poisoned")
    }

    /// The stored form of `name` (from a prefetched file when there is one), checked as far as is
    /// possible without a key; then prefetches the segments that follow it. The daemon needs no
    /// identity: `wal-fetch` decrypts and decodes. `size`: the cluster's segment size when known
    /// (from the stream), for a prefetch that starts beside a download of `name` itself.
    /// `shared`: the client takes files from this very hand-off directory ([`Self::shares_dir`]);
    /// a segment prefetched there (perhaps placed while the request waited for its download) is
    /// then left for it to take (`Ok(None)`), not sent.
    pub async fn get(
        self: &Arc<Self>,
        archive: &Archive,
        name: &WalFileName,
        size: Option<WalSegSize>,
        shared: bool,
    ) -> Result<Option<Fetched>, FetchError> {
        // Being downloaded already: one fetch, not two (and redo caught up with the prefetch).
        let waited = Instant::now();
        let was_inflight = self.lock().inflight.contains(name);
        if was_inflight {
            self.caught_up(name);
        }
        while self.lock().inflight.contains(name) && waited.elapsed() < INFLIGHT_WAIT {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        if shared && self.placed(archive, name) {
            self.hits.inc();
            self.served.inc();
            return Ok(None);
        }
        let taken = {
            let (me, archive, name) = (self.clone(), archive.clone(), *name);
            // Reading, summing and sealing 16 MiB: off the async threads.
            tokio::task::spawn_blocking(move || me.take_ready(&archive, &name))
                .await
                .ok()
                .flatten()
        };
        let result = match taken {
            Some(hit) => {
                self.hits.inc();
                hit
            }
            None => {
                if !was_inflight {
                    self.caught_up(name);
                }
                // Recovery asks for the next segment as soon as it has this one (its decoder
                // reads ahead, and a backup's first segment is mostly empty), so what follows is
                // fetched beside this download, not after it: for the first request, the one
                // after the position on its timeline, or one behind it there (recovery started
                // again). Any other (a probe of another timeline, a request further ahead)
                // moves the position only once it is found.
                let early = match self.lock().pos {
                    None => size,
                    Some((pos, size)) => {
                        let at = |n: &WalFileName| n.segment_no(size).ok().map(|s| s.0);
                        (name.timeline == pos.timeline
                            && at(name).zip(at(&pos)).is_some_and(|(n, p)| n <= p + 1))
                        .then_some(size)
                    }
                };
                if let Some(size) = early.filter(|_| name.kind == WalFileKind::Segment) {
                    self.advance(archive, *name, size, true);
                }
                // Its header checked, its content not: `wal-fetch` decodes and checks it
                // completely (object SHA-256, page header), so a miss is decoded once, not twice.
                fetch_to_open(archive, name).await?
            }
        };
        self.served.inc();
        if result.served.kind == WalFileKind::Segment
            // A segment's plain length is the segment size (wal-fetch checks its page header).
            && let Some(size) = u32::try_from(result.header.plain_len).ok().and_then(WalSegSize::new)
        {
            self.advance(archive, *name, size, true);
        }
        Ok(Some(result))
    }

    /// Whether `name` of this archive is prefetched in the directory, where a client that shares
    /// it takes it.
    fn placed(&self, archive: &Archive, name: &WalFileName) -> bool {
        let st = self.lock();
        st.ready.get(name).is_some_and(|r| {
            r.key == archive.layout().wal(name) && std::fs::symlink_metadata(&r.path).is_ok()
        })
    }

    /// Whether `identity` ([`handoff::dir_identity`], sent by a client) names this prefetcher's
    /// hand-off directory: the client sees the files placed here.
    pub fn shares_dir(&self, identity: &str) -> bool {
        self.max_ahead > 0 && handoff::dir_identity(&self.dir).as_deref() == Some(identity)
    }

    /// Recovery read segment `name` without the prefetch (a `wal-fetch` that missed, as a request
    /// that finds nothing does): it is there now, and the window widens when the prefetch was
    /// just behind it.
    pub fn missed(self: &Arc<Self>, archive: &Archive, name: WalFileName, size: WalSegSize) {
        self.caught_up(&name);
        self.advance(archive, name, size, true);
    }

    /// Once the downloads under way have ended (at most 10 s), removes the prefetched files no
    /// one took; returns how many. For a prefetch that ends: nothing may fill it again.
    pub async fn discard(&self) -> usize {
        let waiting = Instant::now();
        while !self.lock().inflight.is_empty() && waiting.elapsed() < Duration::from_secs(10) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let mut st = self.lock();
        let n = st.ready.len();
        for (_, r) in st.ready.drain() {
            let _ = std::fs::remove_file(&r.path);
        }
        n
    }

    /// A request for `name` found it not prefetched: when it is the next one, redo caught up with
    /// the prefetch, and the window doubles.
    fn caught_up(&self, name: &WalFileName) {
        let mut st = self.lock();
        let Some((pos, size)) = st.pos else {
            return;
        };
        let next = pos.segment_no(size).ok().map(|s| s.0 + 1);
        if name.timeline == pos.timeline && name.segment_no(size).ok().map(|s| s.0) == next {
            st.window = (st.window * 2).min(self.cap(size));
            self.window.set(st.window as i64);
            tracing::debug!(
                window = st.window,
                "redo caught up with the prefetch: fetching further ahead"
            );
        }
    }

    /// The most segments ahead: the setting, and the byte budget.
    fn cap(&self, size: WalSegSize) -> usize {
        let by_bytes = (self.budget / u64::from(size.bytes())).max(1) as usize;
        self.max_ahead.min(by_bytes)
    }

    /// A prefetched segment as an HTTP client takes it (the stored object; a decoded file sealed
    /// again, uncompressed, with its SHA-256), taken out of the directory (it was verified before
    /// it was placed; a decoded file's CRC-32C is checked again).
    fn take_ready(&self, archive: &Archive, name: &WalFileName) -> Option<Fetched> {
        if name.kind != WalFileKind::Segment {
            return None;
        }
        let ready = self.lock().ready.remove(name)?;
        let data = std::fs::read(&ready.path).ok();
        let _ = std::fs::remove_file(&ready.path);
        // Fetched for this very cluster's name (a directory filled before the daemon knew its
        // cluster may hold another's).
        if ready.key != archive.layout().wal(name) {
            return None;
        }
        let (header, stored) = match ready.form {
            Form::Plain(crc) | Form::Recent { crc, .. } => {
                let plain = data.filter(|d| handoff::crc32c(d) == crc)?;
                object::seal(
                    crate::codec::Codec::None,
                    &plain,
                    &crate::storage::Keys::default(),
                )
            }
            Form::Stored => {
                let stored = data?;
                (Header::parse(&stored).ok()?, stored)
            }
        };
        (matches!(ready.form, Form::Plain(_)) || header == ready.header).then(|| Fetched {
            stored: stored.into(),
            header,
            served: *name,
            key: ready.key,
            pieces: vec![],
        })
    }

    /// Redo is at `name`: prefetch from there. A segment `asked` for is where redo is, even
    /// behind the last one (recovery restarted from a restartpoint after a crash, or another
    /// restore began); one taken from the directory only moves the position on.
    fn advance(
        self: &Arc<Self>,
        archive: &Archive,
        name: WalFileName,
        size: WalSegSize,
        asked: bool,
    ) {
        {
            let mut st = self.lock();
            st.archive = Some(archive.clone());
            let newer = match st.pos {
                None => true,
                Some((pos, _)) => order(&name, size) > order(&pos, size),
            };
            if newer || asked {
                if !newer {
                    tracing::debug!(wal = %name, "recovery asks for an earlier segment: prefetching from there");
                }
                st.pos = Some((name, size));
            }
            // Files behind redo will not be asked for again.
            let behind: Vec<WalFileName> = st
                .ready
                .keys()
                .filter(|r| order(r, size) <= order(&name, size))
                .copied()
                .collect();
            for r in behind {
                if let Some(gone) = st.ready.remove(&r) {
                    let _ = std::fs::remove_file(gone.path);
                }
            }
        }
        self.fill();
    }

    /// Starts the downloads the window, the budget, the archive's end and the timeline's end allow.
    fn fill(self: &Arc<Self>) {
        if self.max_ahead == 0 {
            return;
        }
        let mut st = self.lock();
        let (Some((pos, size)), Some(archive)) = (st.pos, st.archive.clone()) else {
            return;
        };
        let Ok(at) = pos.segment_no(size) else {
            return;
        };
        let end = match st.ends.get(&pos.timeline) {
            Some((end, read)) if read.elapsed() < TIMELINE_END_FOR => *end,
            known => {
                let known = known.map(|(end, _)| *end);
                if st.reading_end.insert(pos.timeline) {
                    self.read_timeline_end(archive.clone(), pos.timeline, size);
                }
                // Until it has been read, nothing is fetched on a timeline not yet known.
                match known {
                    Some(end) => end,
                    None => return,
                }
            }
        };
        let window = st.window.min(self.cap(size));
        let mut held: u64 = st.ready.values().map(|r| r.bytes).sum::<u64>()
            + st.inflight.len() as u64 * u64::from(size.bytes());
        for i in 1..=window as u64 {
            let seg = SegmentNo(at.0 + i);
            if end.is_some_and(|e| seg.0 >= e.0) {
                break;
            }
            let next = WalFileName::segment(pos.timeline, seg, size);
            if st
                .absent
                .is_some_and(|(a, when)| a == next && when.elapsed() < ABSENT_FOR)
            {
                break;
            }
            if st.ready.contains_key(&next) || st.inflight.contains(&next) {
                continue;
            }
            // At least one segment, whatever the budget (a segment larger than it).
            if held > 0 && held + u64::from(size.bytes()) > self.budget {
                break;
            }
            held += u64::from(size.bytes());
            st.inflight.insert(next);
            self.download(archive.clone(), next);
        }
    }

    /// Reads where `tli` ends on the way to the newest timeline, then fills.
    fn read_timeline_end(self: &Arc<Self>, archive: Archive, tli: TimelineId, size: WalSegSize) {
        let me = self.clone();
        tokio::spawn(async move {
            let end = timeline_end(&archive, tli, size).await;
            {
                let mut st = me.lock();
                st.reading_end.remove(&tli);
                match end {
                    Ok(end) => {
                        if let Some(e) = end {
                            tracing::info!(timeline = %tli, "prefetch stops at segment {:X} of timeline {tli}: a later timeline branches off there", e.0);
                        }
                        st.ends.insert(tli, (end, Instant::now()));
                    }
                    Err(e) => {
                        tracing::debug!(timeline = %tli, "cannot read the timeline histories (prefetch waits for the next request): {e}");
                        return;
                    }
                }
            }
            me.fill();
        });
    }

    fn download(self: &Arc<Self>, archive: Archive, name: WalFileName) {
        let me = self.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let mut turn_at = None;
            // Checked once, where it is placed (decoded, or its stored form checked).
            let placed = match fetch_to_open(&archive, &name).await {
                Ok(f) if f.served.kind == WalFileKind::Segment => {
                    let downloaded = started.elapsed();
                    let pos = me.lock().pos;
                    // Redo passed it while it downloaded: not decoded ahead of what it needs.
                    if passed(pos, &name) {
                        me.lock().inflight.remove(&name);
                        return;
                    }
                    let key = pos.map_or((u32::MAX, u64::MAX), |(_, size)| order(&name, size));
                    let _turn = me.decoding.take(key).await;
                    turn_at = Some((downloaded, started.elapsed()));
                    let dir = me.dir.clone();
                    let repo = archive.repo().clone();
                    let sysid = archive.system_identifier();
                    tokio::task::spawn_blocking(move || place(&dir, &repo, f, sysid))
                        .await
                        .map_err(|e| e.to_string())
                        .and_then(|r| r)
                        .map(Some)
                }
                // Only a `.partial`: the end of the archive for now.
                Ok(_) | Err(FetchError::NotInArchive(_)) => Ok(None),
                Err(e) => Err(e.to_string()),
            };
            let mut st = me.lock();
            st.inflight.remove(&name);
            match placed {
                Ok(Some(ready)) => {
                    me.prefetched.inc();
                    let (downloaded, turn) = turn_at.unwrap_or_default();
                    tracing::debug!(wal = %name, file = %ready.path.display(), bytes = ready.bytes,
                        download_ms = downloaded.as_millis() as u64, turn_ms = turn.as_millis() as u64,
                        placed_ms = started.elapsed().as_millis() as u64, "prefetched");
                    if passed(st.pos, &name) {
                        // Redo passed it while it downloaded.
                        let _ = std::fs::remove_file(&ready.path);
                    } else {
                        st.ready.insert(name, ready);
                    }
                }
                Ok(None) => st.absent = Some((name, Instant::now())),
                Err(e) => {
                    tracing::debug!(wal = %name, "prefetch failed (the request will read storage): {e}")
                }
            }
        });
    }

    /// Watches the directory for segments `wal-fetch` took, moving redo's position on and filling
    /// the window behind them, until `stop`.
    pub async fn watch(self: Arc<Self>, stop: tokio_util::sync::CancellationToken) {
        if self.max_ahead == 0 {
            // Nothing is ever placed.
            return;
        }
        let mut tick = tokio::time::interval(WATCH_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut ticks = 0u32;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            // `wal-fetch`'s copies of served `.partial`s, once past their time (every 2 s).
            ticks = ticks.wrapping_add(1);
            if ticks % 100 == 0 {
                handoff::sweep_recent(&self.dir);
            }
            let taken: Vec<(WalFileName, Archive, WalSegSize)> = {
                let mut st = self.lock();
                let (Some(archive), Some((_, size))) = (st.archive.clone(), st.pos) else {
                    continue;
                };
                let gone: Vec<WalFileName> = st
                    .ready
                    .iter()
                    .filter(|(_, r)| std::fs::symlink_metadata(&r.path).is_err())
                    .map(|(n, _)| *n)
                    .collect();
                for n in &gone {
                    st.ready.remove(n);
                }
                gone.into_iter()
                    .map(|n| (n, archive.clone(), size))
                    .collect()
            };
            for (name, archive, size) in taken {
                self.handed_off.inc();
                self.advance(&archive, name, size, false);
            }
        }
    }
}

/// Whether redo, at `pos`, is at or past segment `name`: it will not be asked for again.
fn passed(pos: Option<(WalFileName, WalSegSize)>, name: &WalFileName) -> bool {
    pos.is_some_and(|(p, size)| order(name, size) <= order(&p, size))
}

/// Where a segment stands in replay order: its timeline, then its number.
fn order(name: &WalFileName, size: WalSegSize) -> (u32, u64) {
    (
        name.timeline.get(),
        name.segment_no(size).map_or(0, |s| s.0),
    )
}

/// Verifies a downloaded segment once and places it in the hand-off directory: decoded with its
/// CRC-32C when it can be (the object is not encrypted), else as stored.
fn place(
    dir: &std::path::Path,
    repo: &crate::storage::Repo,
    f: Fetched,
    sysid: u64,
) -> Result<Ready, String> {
    let name = f.served;
    if f.header.age.is_none() {
        let data = open_checked(repo, &f, sysid).map_err(|e| e.to_string())?;
        let form = Form::Plain(handoff::crc32c(&data));
        let path = handoff::place(dir, &name, form, &data).map_err(|e| e.to_string())?;
        return Ok(Ready {
            path,
            form,
            bytes: data.len() as u64,
            header: f.header,
            key: f.key,
        });
    }
    object::check(&f.stored)?;
    let path = handoff::place(dir, &name, Form::Stored, &f.stored).map_err(|e| e.to_string())?;
    Ok(Ready {
        path,
        form: Form::Stored,
        bytes: f.stored.len() as u64,
        header: f.header,
        key: f.key,
    })
}

/// The first segment of `tli` not on the way to the newest timeline: where the newest history
/// file that names `tli` says a later timeline branched off it (`None`: no later timeline
/// branches off it). History files are looked for as Postgres looks for the newest timeline:
/// `tli + 1`, `tli + 2`, … up to the first one missing.
async fn timeline_end(
    archive: &Archive,
    tli: TimelineId,
    size: WalSegSize,
) -> Result<Option<SegmentNo>, StorageError> {
    let mut newest = None;
    for later in (tli.get() + 1)..=(tli.get().saturating_add(MAX_LATER_TIMELINES)) {
        let Some(later) = TimelineId::new(later) else {
            break;
        };
        let key = archive.layout().wal(&WalFileName::history(later));
        match archive.repo().get(&key).await {
            Ok(text) => newest = Some(text),
            Err(StorageError::NotFound { .. }) => break,
            Err(e) => return Err(e),
        }
    }
    let Some(text) = newest else {
        return Ok(None);
    };
    let Ok(lines) = crate::verify::parse_history(&String::from_utf8_lossy(&text)) else {
        // A history file that does not parse: no end is known, so nothing of `tli` is held
        // back (what Postgres will ask for is still served on request).
        return Ok(None);
    };
    Ok(lines
        .iter()
        .find(|(t, _)| *t == tli)
        .map(|(_, switch)| size.segment_of(*switch)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn decodes_take_turns_nearest_first_whatever_order_they_queue_in() {
        let turns = Arc::new(Turns::default());
        let first = turns.take((1, 9)).await;
        let done = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        // Queued far to near, as downloads may finish; one gives up while it waits.
        for seg in [4u64, 3, 7, 2] {
            let (turns, done) = (turns.clone(), done.clone());
            tasks.push(tokio::spawn(async move {
                let _turn = turns.take((1, seg)).await;
                done.lock().unwrap().push(seg);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }));
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let quitter = {
            let turns = turns.clone();
            tokio::spawn(async move {
                let _turn = turns.take((1, 1)).await;
                unreachable!("aborted before its turn");
            })
        };
        tokio::time::sleep(Duration::from_millis(5)).await;
        quitter.abort();
        let _ = quitter.await;
        assert!(
            done.lock().unwrap().is_empty(),
            "none before the turn is given back"
        );
        drop(first);
        for t in tasks {
            tokio::time::timeout(Duration::from_secs(5), t)
                .await
                .expect("every waiter gets its turn")
                .unwrap();
        }
        assert_eq!(*done.lock().unwrap(), vec![2, 3, 4, 7]);
    }

    #[test]
    fn the_directory_refuses_a_link_and_removes_only_its_own_files() {
        let dir = tempfile::tempdir().unwrap();
        let other = dir.path().join("other");
        std::fs::create_dir(&other).unwrap();
        std::fs::write(other.join("precious"), b"x").unwrap();
        std::fs::write(other.join("000000010000000000000001"), b"x").unwrap();
        std::fs::write(other.join("000000010000000000000002.0badf00d.wal"), b"x").unwrap();
        std::fs::write(other.join("000000010000000000000003.pgko"), b"x").unwrap();
        std::fs::write(other.join(".000000010000000000000004.7.pgkeep-tmp"), b"x").unwrap();
        let link = dir.path().join("prefetch");
        std::os::unix::fs::symlink(&other, &link).unwrap();
        let err = Prefetcher::new(link, 4, 1 << 30).err().unwrap();
        assert!(err.to_string().contains("symbolic link"), "{err}");
        assert_eq!(std::fs::read_dir(&other).unwrap().count(), 5);
        Prefetcher::new(other.clone(), 4, 1 << 30).unwrap();
        let mut left: Vec<_> = std::fs::read_dir(&other)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        // A bare WAL name is no name of ours: a prefetch_dir set to a pg_wal loses nothing.
        assert_eq!(left, vec!["000000010000000000000001", "precious"]);
    }

    #[test]
    fn an_open_directory_of_ours_is_closed_and_a_data_directory_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let open = dir.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        Prefetcher::new(open.clone(), 4, 1 << 30).unwrap();
        let mode = std::fs::metadata(&open).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        let data = dir.path().join("pgdata");
        std::fs::create_dir_all(data.join("pg_wal")).unwrap();
        std::fs::write(data.join("PG_VERSION"), "15\n").unwrap();
        std::fs::write(data.join("pg_wal/000000010000000000000001"), b"wal").unwrap();
        let err = Prefetcher::new(data.join("pg_wal"), 4, 1 << 30)
            .err()
            .unwrap();
        assert!(err.to_string().contains("Postgres data directory"), "{err}");
        assert!(data.join("pg_wal/000000010000000000000001").exists());
    }
}
