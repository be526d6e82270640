//! What the daemon's stream stored: the plain SHA-256 of its last completed segments, so that
//! `archive-push` (archive_command) can ask whether a segment is in storage already, with exactly
//! its content, instead of reading, compressing and uploading it a second time.
//!
//! Only this process's own verified uploads are recorded (or an identical copy it found there):
//! a restarted daemon knows nothing of the last one's, and `archive-push` then stores the
//! segment itself, as it would without a daemon.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use crate::pg::{TimelineId, WalFileName, WalSegSize};

/// How many segments are remembered: far more than archive_command falls behind the stream.
const KEEP: usize = 256;
/// The most requests that wait for an upload at once (archive_command runs one at a time); more
/// are answered at once, as unknown.
const MAX_WAITING: usize = 16;

/// The daemon's answer for one segment.
#[derive(Debug, PartialEq, Eq)]
pub enum Stored {
    /// In storage with exactly this content (this daemon uploaded it and verified the upload).
    Same,
    /// In storage with other content: `archive-push` stores it itself (and reports the conflict).
    Differs,
    /// Not stored by this daemon, nor about to be.
    Unknown,
}

#[derive(Debug)]
pub struct StoredSegments {
    recent: Mutex<VecDeque<(WalFileName, [u8; 32])>>,
    changed: tokio::sync::Notify,
    waiting: tokio::sync::Semaphore,
}

impl Default for StoredSegments {
    fn default() -> Self {
        StoredSegments {
            recent: Mutex::default(),
            changed: tokio::sync::Notify::new(),
            waiting: tokio::sync::Semaphore::new(MAX_WAITING),
        }
    }
}

impl StoredSegments {
    /// Records that `name` is durable in storage with plain content of SHA-256 `sha`.
    pub fn record(&self, name: &WalFileName, sha: [u8; 32]) {
        {
            let mut recent = self.recent.lock().expect("not poisoned");
            recent.retain(|(n, _)| n != name);
            if recent.len() == KEEP {
                recent.pop_front();
            }
            recent.push_back((*name, sha));
        }
        self.changed.notify_waiters();
    }

    fn lookup(&self, name: &WalFileName, sha: &[u8; 32]) -> Option<Stored> {
        let recent = self.recent.lock().expect("not poisoned");
        recent.iter().find(|(n, _)| n == name).map(|(_, s)| {
            if s == sha {
                Stored::Same
            } else {
                Stored::Differs
            }
        })
    }

    /// Whether `name` is stored with content `sha`. While `coming()` says the stream will store
    /// that segment soon ([`streamed_into`]), waits at most `wait` for its upload.
    pub async fn wait_for(
        &self,
        name: &WalFileName,
        sha: &[u8; 32],
        wait: Duration,
        coming: impl Fn() -> bool,
    ) -> Stored {
        let deadline = tokio::time::Instant::now() + wait;
        let mut permit = None;
        loop {
            // Registered before the lookup, so a record made in between is not missed.
            let changed = self.changed.notified();
            if let Some(answer) = self.lookup(name, sha) {
                return answer;
            }
            if !coming() {
                // Recorded in between (a record comes before the durable position moves past it)?
                return self.lookup(name, sha).unwrap_or(Stored::Unknown);
            }
            if permit.is_none() {
                match self.waiting.try_acquire() {
                    Ok(p) => permit = Some(p),
                    Err(_) => return Stored::Unknown,
                }
            }
            // Woken by each record; also rechecked now and then, as the stream may end.
            let tick = tokio::time::Instant::now() + Duration::from_millis(250);
            match tokio::time::timeout_at(tick.min(deadline), changed).await {
                Err(_) if tokio::time::Instant::now() >= deadline => return Stored::Unknown,
                _ => {}
            }
        }
    }
}

/// Whether a stream on `timeline` that has received WAL up to `received`, and stored everything
/// before `durable`, will store segment `name` (of `size`) soon: it has not stored all of it, and
/// has received some of it, or (`healthy`: streaming works) is about to, as Postgres completed it.
/// A segment wholly before `durable` was stored (and recorded) already, or by someone else before
/// this stream began; one a broken stream has not reached may never come.
pub fn streamed_into(
    name: &WalFileName,
    timeline: Option<TimelineId>,
    received: crate::pg::Lsn,
    durable: crate::pg::Lsn,
    size: Option<WalSegSize>,
    healthy: bool,
) -> bool {
    let (Some(tli), Some(size)) = (timeline, size) else {
        return false;
    };
    let Ok(seg) = name.segment_no(size) else {
        return false;
    };
    let end = size.start_of(crate::pg::SegmentNo(seg.0 + 1));
    name.timeline == tli && durable < end && (size.start_of(seg) < received || healthy)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pg::{Lsn, SegmentNo};

    fn seg(n: u64) -> WalFileName {
        let size = WalSegSize::new(16 << 20).unwrap();
        WalFileName::segment(TimelineId::new(1).unwrap(), SegmentNo(n), size)
    }

    #[tokio::test]
    async fn answers_from_the_record_and_waits_only_for_a_coming_segment() {
        let s = std::sync::Arc::new(StoredSegments::default());
        s.record(&seg(3), [1; 32]);
        let wait = Duration::from_secs(5);
        assert_eq!(
            s.wait_for(&seg(3), &[1; 32], wait, || false).await,
            Stored::Same
        );
        assert_eq!(
            s.wait_for(&seg(3), &[2; 32], wait, || false).await,
            Stored::Differs
        );
        // Not coming: no wait at all.
        let t = std::time::Instant::now();
        assert_eq!(
            s.wait_for(&seg(4), &[1; 32], wait, || false).await,
            Stored::Unknown
        );
        assert!(t.elapsed() < Duration::from_secs(1));
        // Coming: answered when the upload is recorded.
        let s2 = s.clone();
        let later = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            s2.record(&seg(4), [4; 32]);
        });
        assert_eq!(
            s.wait_for(&seg(4), &[4; 32], wait, || true).await,
            Stored::Same
        );
        later.await.unwrap();
        // Coming but never recorded: unknown after the wait.
        let short = Duration::from_millis(300);
        assert_eq!(
            s.wait_for(&seg(5), &[5; 32], short, || true).await,
            Stored::Unknown
        );
        // The oldest records go first.
        for n in 10..10 + KEEP as u64 {
            s.record(&seg(n), [0; 32]);
        }
        assert_eq!(
            s.wait_for(&seg(3), &[1; 32], wait, || false).await,
            Stored::Unknown
        );
    }

    #[test]
    fn a_segment_is_coming_once_the_stream_is_inside_it() {
        let size = WalSegSize::new(16 << 20);
        let tli = TimelineId::new(1);
        let (start_of_3, start_of_4) = (Lsn(3 << 24), Lsn(4 << 24));
        let durable = Lsn(2 << 24);
        let coming = |n, t, r, d, s| streamed_into(&seg(n), t, r, d, s, false);
        assert!(!coming(3, tli, start_of_3, durable, size));
        assert!(coming(3, tli, Lsn(start_of_3.0 + 1), durable, size));
        assert!(coming(2, tli, start_of_3, durable, size));
        // Not reached yet: coming only while streaming works.
        assert!(streamed_into(&seg(3), tli, start_of_3, durable, size, true));
        assert!(streamed_into(&seg(9), tli, start_of_3, durable, size, true));
        // Wholly durable already (stored before this stream, or recorded): nothing comes.
        assert!(!coming(1, tli, start_of_3, durable, size));
        assert!(!streamed_into(
            &seg(1),
            tli,
            start_of_3,
            durable,
            size,
            true
        ));
        assert!(!coming(3, tli, Lsn(5 << 24), start_of_4, size));
        assert!(coming(3, tli, Lsn(5 << 24), Lsn(start_of_4.0 - 1), size));
        let other = TimelineId::new(2);
        assert!(!streamed_into(
            &seg(3),
            other,
            start_of_4,
            durable,
            size,
            true
        ));
        assert!(!streamed_into(
            &seg(3),
            tli,
            start_of_4,
            durable,
            None,
            true
        ));
    }
}
