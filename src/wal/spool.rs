//! The streamer's spool: WAL received but not yet in storage, on the pod's disk. The open segment
//! is `<segment>.partial`, full size with zeros past what was received (the shape of Postgres' own
//! `.partial` files); once complete it is fsynced and renamed to its segment name, and removed
//! once storage holds it.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

use crate::pg::{Lsn, SegmentNo, TimelineId, WalFileName, WalSegSize};

/// The segment being received.
pub struct OpenSegment {
    pub name: WalFileName,
    /// Where the segment starts (a multiple of the segment size).
    pub start: Lsn,
    file: std::fs::File,
    path: PathBuf,
    /// Bytes of the segment received: everything in `start .. start + written` is in the file,
    /// and nothing after it. Never more than the segment size.
    written: u64,
    /// `written` at the last `.partial` upload; never more than `written`. Everything before
    /// `start + uploaded_partial` is in storage.
    uploaded_partial: u64,
}

impl OpenSegment {
    /// The position up to which this segment has been received.
    pub fn received_end(&self) -> Lsn {
        Lsn(self.start.0 + self.written)
    }
    /// The position up to which the `.partial` uploads hold this segment.
    pub fn uploaded_end(&self) -> Lsn {
        Lsn(self.start.0 + self.uploaded_partial)
    }
    /// Bytes of the segment received so far.
    pub fn written(&self) -> u64 {
        self.written
    }
    /// Whether anything was received since the last `.partial` upload.
    pub fn has_news(&self) -> bool {
        self.written > self.uploaded_partial
    }
    /// Whether some of this segment is in storage as a `.partial`.
    pub fn was_uploaded(&self) -> bool {
        self.uploaded_partial > 0
    }

    /// The segment as received so far, to read (off the receiving task) and upload as
    /// `.partial`: the bytes before `written` stay as they are while receiving goes on after them.
    pub fn snapshot(&self) -> anyhow::Result<Snapshot> {
        Ok(Snapshot {
            file: self.file.try_clone()?,
            path: self.path.clone(),
            written: self.written,
        })
    }

    /// Records that storage holds the segment's first `written` bytes (from a snapshot).
    pub fn uploaded(&mut self, written: u64) {
        self.uploaded_partial = self.uploaded_partial.max(written.min(self.written));
    }
}

/// The open segment at one moment: another handle to its file, and how many bytes it held.
pub struct Snapshot {
    file: std::fs::File,
    path: PathBuf,
    pub written: u64,
}

impl Snapshot {
    /// The whole segment file (zeros, or later WAL, past `written`). Read through the handle:
    /// the segment may be complete and renamed in the spool by now. Not synced: what is read
    /// comes from the page cache all the same, and WAL counts as durable only once storage holds
    /// it (a restarted session starts from storage's durable position, not from the spool).
    pub fn read(&self) -> anyhow::Result<Vec<u8>> {
        let read = || -> std::io::Result<Vec<u8>> {
            let len = usize::try_from(self.file.metadata()?.len()).expect("a segment's size");
            let mut data = vec![0; len];
            std::os::unix::fs::FileExt::read_exact_at(&self.file, &mut data, 0)?;
            Ok(data)
        };
        read().with_context(|| format!("reading {} in the spool", self.path.display()))
    }

    /// A piece: the bytes from `from` to `written`, with the segment file's first page (for its
    /// header check) and length; reads a few KiB for a few KiB of new WAL, not the whole segment.
    pub fn read_piece(&self, from: u64) -> anyhow::Result<Piece> {
        use std::os::unix::fs::FileExt;
        let read = || -> std::io::Result<Piece> {
            let len = self.file.metadata()?.len();
            let mut head = vec![0; usize::try_from(len.min(FIRST_PAGE)).expect("a page")];
            self.file.read_exact_at(&mut head, 0)?;
            let n = usize::try_from(self.written.saturating_sub(from)).expect("within a segment");
            let mut bytes = vec![0; n];
            self.file.read_exact_at(&mut bytes, from)?;
            Ok(Piece { head, len, bytes })
        };
        read().with_context(|| format!("reading {} in the spool", self.path.display()))
    }
}

/// How much of a segment's start [`Snapshot::read_piece`] reads for the header check.
const FIRST_PAGE: u64 = 8192;

/// What [`Snapshot::read_piece`] read.
pub struct Piece {
    /// The segment file's first page.
    pub head: Vec<u8>,
    /// The segment file's length.
    pub len: u64,
    /// The piece's bytes.
    pub bytes: Vec<u8>,
}

/// A segment received whole, synced and renamed in the spool. Its bytes stay on disk until its
/// upload reads them ([`CompleteSegment::read`]), so a queue of them costs no memory; the upload
/// removes the file once storage holds the segment.
#[derive(Debug)]
pub struct CompleteSegment {
    pub name: WalFileName,
    pub start: Lsn,
    /// The segment's size.
    pub len: u64,
    /// Whether a `.partial` of it was (or may have been) uploaded and must be removed from
    /// storage.
    pub had_partial: bool,
    path: PathBuf,
}

impl CompleteSegment {
    pub fn end(&self) -> Lsn {
        Lsn(self.start.0 + self.len)
    }

    /// The segment's bytes, from the spool; a file of another length is refused.
    pub fn read(&self) -> anyhow::Result<Vec<u8>> {
        let data = std::fs::read(&self.path)
            .with_context(|| format!("reading {} in the spool", self.path.display()))?;
        if data.len() as u64 != self.len {
            bail!(
                "{} in the spool holds {} bytes, not {}",
                self.path.display(),
                data.len(),
                self.len
            );
        }
        Ok(data)
    }

    /// Drops the segment from the spool (storage holds it).
    pub fn discard(self) -> anyhow::Result<()> {
        std::fs::remove_file(&self.path)
            .with_context(|| format!("removing {}", self.path.display()))
    }
}

/// The spool of one stream (one timeline, one segment size).
pub struct Spool {
    dir: PathBuf,
    timeline: TimelineId,
    size: WalSegSize,
    pub open: Option<OpenSegment>,
}

impl Spool {
    /// The spool in `dir` (created if missing). Anything spooled by an earlier run is removed: the
    /// server sends it again from the restart position.
    pub fn new(dir: &Path, timeline: TimelineId, size: WalSegSize) -> anyhow::Result<Spool> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating the spool {}", dir.display()))?;
        clean(dir)?;
        Ok(Spool {
            dir: dir.to_path_buf(),
            timeline,
            size,
            open: None,
        })
    }

    /// The segment size of this stream.
    pub fn seg_size(&self) -> WalSegSize {
        self.size
    }

    /// Writes WAL received for position `at`. WAL must arrive in order, without gaps; returns the
    /// segments this completed, synced and renamed.
    pub fn write(&mut self, mut at: Lsn, mut data: &[u8]) -> anyhow::Result<Vec<CompleteSegment>> {
        let seg_bytes = u64::from(self.size.bytes());
        let mut done = vec![];
        while !data.is_empty() {
            let seg_no = self.size.segment_of(at);
            let name = WalFileName::segment(self.timeline, seg_no, self.size);
            if self.open.as_ref().map(|o| o.name) != Some(name) {
                if let Some(o) = &self.open {
                    bail!("WAL for {name} arrived before {} was complete", o.name);
                }
                self.open = Some(self.open_segment(seg_no)?);
            }
            let o = self.open.as_mut().expect("just opened");
            let offset = at.0 - o.start.0;
            if offset != o.written {
                bail!("WAL stream gap: expected {} got {at}", o.received_end());
            }
            let n = (seg_bytes - offset).min(data.len() as u64) as usize;
            std::os::unix::fs::FileExt::write_all_at(&o.file, &data[..n], offset).with_context(
                || {
                    format!(
                        "writing received WAL to the spool ({}; spool_dir)",
                        o.path.display()
                    )
                },
            )?;
            o.written += n as u64;
            data = &data[n..];
            at = Lsn(at.0 + n as u64);
            if o.written == seg_bytes {
                done.push(self.complete()?);
            }
        }
        Ok(done)
    }

    fn open_segment(&self, seg: SegmentNo) -> anyhow::Result<OpenSegment> {
        let name = WalFileName::segment(self.timeline, seg, self.size);
        let path = self.dir.join(format!("{name}.partial"));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&path)
            .with_context(|| format!("creating {}", path.display()))?;
        file.set_len(u64::from(self.size.bytes()))
            .with_context(|| format!("sizing {}", path.display()))?;
        Ok(OpenSegment {
            name,
            start: self.size.start_of(seg),
            file,
            path,
            written: 0,
            uploaded_partial: 0,
        })
    }

    /// The open segment, complete: fsync, rename to its segment name.
    fn complete(&mut self) -> anyhow::Result<CompleteSegment> {
        let seg = self.open.take().expect("an open segment");
        let path = seg.path.with_extension("");
        let spooled = |what: &str| format!("{what} {} in the spool", seg.path.display());
        seg.file.sync_all().with_context(|| spooled("syncing"))?;
        std::fs::rename(&seg.path, &path).with_context(|| spooled("renaming"))?;
        Ok(CompleteSegment {
            name: seg.name,
            start: seg.start,
            len: seg.written,
            had_partial: seg.was_uploaded(),
            path,
        })
    }
}

/// Removes leftovers of an earlier run from the spool (only WAL file names are touched).
fn clean(spool: &Path) -> anyhow::Result<()> {
    for e in std::fs::read_dir(spool)? {
        let e = e?;
        let name = e.file_name();
        if name.to_string_lossy().parse::<WalFileName>().is_ok() {
            std::fs::remove_file(e.path())?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_complete_in_order_and_gaps_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let size = WalSegSize::new(1 << 20).unwrap();
        let tli = TimelineId::new(2).unwrap();
        std::fs::write(dir.path().join("000000020000000000000001.partial"), b"old").unwrap();
        std::fs::write(dir.path().join("keep-me"), b"not WAL").unwrap();
        let mut spool = Spool::new(dir.path(), tli, size).unwrap();
        assert!(!dir.path().join("000000020000000000000001.partial").exists());
        assert!(dir.path().join("keep-me").exists());
        let start = size.start_of(SegmentNo(3));
        let first = vec![7u8; (1 << 20) - 10];
        assert!(spool.write(start, &first).unwrap().is_empty());
        let o = spool.open.as_mut().unwrap();
        assert_eq!(o.received_end(), Lsn(start.0 + first.len() as u64));
        let snap = o.snapshot().unwrap();
        let written = snap.written;
        assert_eq!(
            (snap.read().unwrap().len(), written),
            (1 << 20, first.len() as u64)
        );
        o.uploaded(written);
        assert!(!o.has_news());
        // The rest of segment 3 and the start of 4 in one piece.
        let done = spool
            .write(Lsn(start.0 + first.len() as u64), &[9u8; 30])
            .unwrap();
        assert_eq!(done.len(), 1);
        assert_eq!(done[0].name.to_string(), "000000020000000000000003");
        assert_eq!(done[0].end(), size.start_of(SegmentNo(4)));
        assert!(done[0].had_partial);
        assert_eq!(&done[0].read().unwrap()[(1 << 20) - 10..], &[9u8; 10]);
        let o = spool.open.as_ref().unwrap();
        assert_eq!(o.name.to_string(), "000000020000000000000004");
        assert!(!o.was_uploaded());
        for d in done {
            d.discard().unwrap();
        }
        assert!(!dir.path().join("000000020000000000000003").exists());
        // A gap, and WAL of a later segment before this one is complete.
        let at = size.start_of(SegmentNo(4));
        let e = spool.write(Lsn(at.0 + 100), b"x").unwrap_err();
        assert!(e.to_string().contains("gap"), "{e}");
        let e = spool.write(size.start_of(SegmentNo(6)), b"x").unwrap_err();
        assert!(e.to_string().contains("before"), "{e}");
    }
}
