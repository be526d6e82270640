//! WAL served to restore_command by the daemon, with prefetch: after a segment is asked for, the
//! next `prefetch_segments` are downloaded, verified and kept in a local cache, so recovery does
//! not wait on storage for each one.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::Mutex;

use prometheus_client::metrics::counter::Counter;

use crate::pg::{SegmentNo, WalFileKind, WalFileName, WalSegSize};
use crate::storage::Archive;
use crate::storage::object::Header;
use crate::wal::fetch::{FetchError, Fetched, fetch_stored};

pub struct Prefetcher {
    dir: PathBuf,
    count: usize,
    inflight: Mutex<HashSet<WalFileName>>,
    /// The header and key of each cached segment (checked when it was downloaded), so a hit is
    /// served without checking it again.
    cached: Mutex<HashMap<WalFileName, (Header, object_store::path::Path)>>,
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
        if std::fs::symlink_metadata(&dir)?.file_type().is_symlink() {
            return Err(std::io::Error::other(format!(
                "{} is a symbolic link: the prefetch cache must be a directory of its own",
                dir.display()
            )));
        }
        // Only its own files: cached segments (WAL file names) and their temporary files.
        for e in std::fs::read_dir(&dir)? {
            let e = e?;
            let name = e.file_name().to_string_lossy().into_owned();
            let ours = name.parse::<WalFileName>().is_ok() || name.ends_with(".pgkeep-tmp");
            if ours && e.file_type()?.is_file() {
                std::fs::remove_file(e.path())?;
            }
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

    /// The stored form of `name` (from the cache when prefetched), checked as far as is possible
    /// without a key; then prefetches the segments that follow it. The daemon needs no identity:
    /// `wal-fetch` decrypts and decodes.
    pub async fn get(
        self: &Arc<Self>,
        archive: &Archive,
        name: &WalFileName,
    ) -> Result<Fetched, FetchError> {
        let result = match self.take_cached(archive, name) {
            Some(hit) => {
                self.hits.inc();
                hit
            }
            None => fetch_stored(archive, name).await?,
        };
        self.served.inc();
        if result.served.kind == WalFileKind::Segment
            && self.count > 0
            // A segment's plain length is the segment size (wal-fetch checks its page header).
            && let Some(seg_size) = u32::try_from(result.header.plain_len).ok().and_then(WalSegSize::new)
            && let Ok(seg) = name.segment_no(seg_size)
        {
            for i in 1..=self.count as u64 {
                let next = WalFileName::segment(name.timeline, SegmentNo(seg.0 + i), seg_size);
                self.prefetch(archive.clone(), next);
            }
        }
        Ok(result)
    }

    /// A prefetched segment, taken out of the cache (it was verified before it was written,
    /// atomically).
    fn take_cached(&self, archive: &Archive, name: &WalFileName) -> Option<Fetched> {
        if name.kind != WalFileKind::Segment {
            return None;
        }
        let (header, key) = self.cached.lock().expect("not poisoned").remove(name)?;
        // Fetched for this very cluster's name (a cache filled before the daemon knew its
        // cluster may hold another's).
        if key != archive.layout().wal(name) {
            return None;
        }
        let path = self.dir.join(name.to_string());
        let stored = std::fs::read(&path).ok()?;
        let _ = std::fs::remove_file(&path);
        (Header::parse(&stored).ok()? == header).then(|| Fetched {
            stored: stored.into(),
            header,
            served: *name,
            key,
            pieces: vec![],
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
            match fetch_stored(&archive, &name).await {
                Ok(f) if f.served.kind == WalFileKind::Segment => {
                    match crate::fsutil::write_atomic(&path, &f.stored) {
                        Ok(()) => {
                            me.cached
                                .lock()
                                .expect("not poisoned")
                                .insert(name, (f.header, f.key));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cache_refuses_a_link_and_removes_only_its_own_files() {
        let dir = tempfile::tempdir().unwrap();
        let other = dir.path().join("other");
        std::fs::create_dir(&other).unwrap();
        std::fs::write(other.join("precious"), b"x").unwrap();
        std::fs::write(other.join("000000010000000000000001"), b"x").unwrap();
        let link = dir.path().join("prefetch");
        std::os::unix::fs::symlink(&other, &link).unwrap();
        let err = Prefetcher::new(link, 4).err().unwrap();
        assert!(err.to_string().contains("symbolic link"), "{err}");
        assert_eq!(std::fs::read_dir(&other).unwrap().count(), 2);
        Prefetcher::new(other.clone(), 4).unwrap();
        assert!(other.join("precious").exists());
        assert!(!other.join("000000010000000000000001").exists());
    }
}
