//! WAL served to restore_command by the daemon, with prefetch: after a segment is asked for, the
//! next `prefetch_segments` are downloaded, verified and kept in a local cache, so recovery does
//! not wait on storage for each one.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::Mutex;

use prometheus_client::metrics::counter::Counter;

use crate::pg::walheader;
use crate::pg::{SegmentNo, WalFileKind, WalFileName};
use crate::storage::Archive;
use crate::wal::fetch::{FetchError, Fetched, fetch_verified};

pub struct Prefetcher {
    dir: PathBuf,
    count: usize,
    inflight: Mutex<HashSet<WalFileName>>,
    /// The checksum of each cached segment (verified when it was downloaded), so a hit is served
    /// without hashing it again.
    cached: Mutex<HashMap<WalFileName, [u8; 32]>>,
    /// Requests answered from the cache.
    pub hits: Counter,
    /// Segments downloaded ahead of their request.
    pub prefetched: Counter,
    /// All WAL requests answered.
    pub served: Counter,
}

impl Prefetcher {
    /// A cache in `dir` (emptied: what an earlier run left is not trusted) holding up to `count`
    /// segments ahead.
    pub fn new(dir: PathBuf, count: usize) -> std::io::Result<Prefetcher> {
        std::fs::create_dir_all(&dir)?;
        for e in std::fs::read_dir(&dir)? {
            std::fs::remove_file(e?.path())?;
        }
        Ok(Prefetcher {
            dir,
            count,
            inflight: Mutex::new(HashSet::new()),
            cached: Mutex::new(HashMap::new()),
            hits: Counter::default(),
            prefetched: Counter::default(),
            served: Counter::default(),
        })
    }

    /// The verified content of `name` (from the cache when prefetched); then prefetches the
    /// segments that follow it.
    pub async fn get(
        self: &Arc<Self>,
        archive: &Archive,
        name: &WalFileName,
    ) -> Result<Fetched, FetchError> {
        let result = match self.take_cached(name) {
            Some(hit) => {
                self.hits.inc();
                hit
            }
            None => fetch_verified(archive, name).await?,
        };
        self.served.inc();
        if result.served.kind == WalFileKind::Segment
            && self.count > 0
            && let Ok(h) = walheader::parse_long_header(&name.to_string(), &result.data)
            && let Ok(seg) = name.segment_no(h.seg_size)
        {
            for i in 1..=self.count as u64 {
                let next = WalFileName::segment(name.timeline, SegmentNo(seg.0 + i), h.seg_size);
                self.prefetch(archive.clone(), next);
            }
        }
        Ok(result)
    }

    /// A prefetched segment, taken out of the cache (it was verified before it was written,
    /// atomically).
    fn take_cached(&self, name: &WalFileName) -> Option<Fetched> {
        if name.kind != WalFileKind::Segment {
            return None;
        }
        let sha256 = self.cached.lock().expect("not poisoned").remove(name)?;
        let path = self.dir.join(name.to_string());
        let data = std::fs::read(&path).ok()?;
        let _ = std::fs::remove_file(&path);
        Some(Fetched {
            data,
            served: *name,
            sha256,
        })
    }

    fn prefetch(self: &Arc<Self>, archive: Archive, name: WalFileName) {
        if self
            .cached
            .lock()
            .expect("not poisoned")
            .contains_key(&name)
            || !self.inflight.lock().expect("not poisoned").insert(name)
        {
            return;
        }
        let path = self.dir.join(name.to_string());
        let me = self.clone();
        tokio::spawn(async move {
            match fetch_verified(&archive, &name).await {
                Ok(f) if f.served.kind == WalFileKind::Segment => {
                    match crate::fsutil::write_atomic(&path, &f.data) {
                        Ok(()) => {
                            me.cached
                                .lock()
                                .expect("not poisoned")
                                .insert(name, f.sha256);
                            me.prefetched.inc();
                        }
                        Err(e) => tracing::warn!(wal = %name, "prefetch cache write failed: {e}"),
                    }
                }
                Ok(_) | Err(FetchError::NotInArchive(_)) => {}
                Err(e) => {
                    tracing::debug!(wal = %name, "prefetch failed (the request will read storage): {e}")
                }
            }
            me.inflight.lock().expect("not poisoned").remove(&name);
        });
    }
}
