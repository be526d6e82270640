//! WAL served to restore_command by the daemon, with prefetch: after a segment is asked for, the
//! next `prefetch_segments` are downloaded, verified and kept in a local cache, so recovery does
//! not wait on storage for each one.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::pg::walheader;
use crate::pg::{SegmentNo, WalFileKind, WalFileName};
use crate::storage::{ClusterLayout, Repo};
use crate::wal::archive::{FetchError, fetch_verified};

pub struct Prefetcher {
    dir: PathBuf,
    count: usize,
    inflight: Mutex<HashSet<WalFileName>>,
    /// Requests answered from the cache.
    pub hits: AtomicU64,
    /// Segments downloaded ahead of their request.
    pub prefetched: AtomicU64,
    /// All WAL requests answered.
    pub served: AtomicU64,
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
            hits: AtomicU64::new(0),
            prefetched: AtomicU64::new(0),
            served: AtomicU64::new(0),
        })
    }

    /// The verified content of `name` (from the cache when prefetched) and the name it was stored
    /// under; then prefetches the segments that follow it.
    pub async fn get(
        self: &Arc<Self>,
        repo: &Repo,
        cluster: &ClusterLayout,
        name: &WalFileName,
    ) -> Result<(Vec<u8>, WalFileName), FetchError> {
        let cached = self.dir.join(name.to_string());
        let result = match (name.kind, std::fs::read(&cached)) {
            // Cached files were verified before they were written (atomically).
            (WalFileKind::Segment, Ok(data)) => {
                let _ = std::fs::remove_file(&cached);
                self.hits.fetch_add(1, Ordering::Relaxed);
                (data, *name)
            }
            _ => fetch_verified(repo, cluster, name).await?,
        };
        self.served.fetch_add(1, Ordering::Relaxed);
        if result.1.kind == WalFileKind::Segment
            && self.count > 0
            && let Ok(h) = walheader::parse_long_header(&name.to_string(), &result.0)
            && let Ok(seg) = name.segment_no(h.seg_size)
        {
            for i in 1..=self.count as u64 {
                let next = WalFileName::segment(name.timeline, SegmentNo(seg.0 + i), h.seg_size);
                self.prefetch(repo.clone(), *cluster, next);
            }
        }
        Ok(result)
    }

    fn prefetch(self: &Arc<Self>, repo: Repo, cluster: ClusterLayout, name: WalFileName) {
        let path = self.dir.join(name.to_string());
        if path.exists() || !self.inflight.lock().expect("not poisoned").insert(name) {
            return;
        }
        let me = self.clone();
        tokio::spawn(async move {
            match fetch_verified(&repo, &cluster, &name).await {
                Ok((data, served)) if served.kind == WalFileKind::Segment => {
                    match crate::fsutil::write_atomic(&path, &data) {
                        Ok(()) => {
                            me.prefetched.fetch_add(1, Ordering::Relaxed);
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
