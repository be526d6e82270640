//! Reads the tar stream of one archive as it passes on its way to the chunks, to record where each
//! regular file's bytes are in what is stored (the file index, `files.json`), and, for a delta
//! backup (Postgres 13 to 16), to leave out the files that are unchanged since the parent: their
//! header and bytes are not stored, the index points at the backup that holds them instead.
//!
//! A file is left out when the parent's index has it in the same archive with the same size and
//! modification time, and that time is before the parent started (a change after it would have
//! moved the time past it); the server's manifest then confirms it (same size and checksum as the
//! parent's manifest), or the delta backup is abandoned for a full one.

use std::collections::HashMap;

use bytes::Bytes;

use crate::storage::index::FileEntry;
use crate::storage::layout::{ArchiveName, BackupId};

const BLOCK: usize = 512;
/// Files smaller than this are always stored: a reference would save little and cost a fetch.
pub(super) const MIN_REFERENCED: u64 = 64 << 10;

/// What the parent knows of a file: size, time, and where its bytes are.
#[derive(Debug, Clone)]
pub(super) struct Known {
    pub size: u64,
    pub mtime: u64,
    pub origin: BackupId,
    pub offset: u64,
}

/// A file left out, to be confirmed against the manifest.
#[derive(Debug, Clone)]
pub(super) struct LeftOut {
    pub manifest_path: String,
    pub size: u64,
}

enum State {
    /// Collecting a header block.
    Header(Vec<u8>),
    /// Inside an entry's data and padding: how many bytes remain, and whether they are stored.
    Body { left: u64, keep: bool },
    /// After the end-of-archive blocks, or after an entry this reader does not follow: the rest
    /// passes through as it is and no file of it is indexed or left out.
    Through,
}

impl State {
    /// After an entry's header: its data and padding (`padded` bytes, stored or not), or the next
    /// header when it has none.
    fn after_header(padded: u64, keep: bool) -> State {
        match padded {
            0 => State::Header(Vec::with_capacity(BLOCK)),
            left => State::Body { left, keep },
        }
    }
}

pub(super) struct TarFilter<'a> {
    archive: ArchiveName,
    /// The manifest's path prefix of this archive's files (`pg_tblspc/<oid>/` for a tablespace).
    prefix: String,
    state: State,
    /// Bytes stored so far (the offset in what is stored of the next byte passed on).
    stored: u64,
    /// The parent's files of this archive, by path in the archive (None: a full backup).
    parent: Option<&'a HashMap<String, Known>>,
    /// The parent started before this second: a file older than it and unchanged in size and
    /// time is taken as unchanged.
    parent_start: u64,
    /// A header block seen before an entry's own header (pax, GNU long names): the entry after
    /// it is stored whatever the parent says.
    extended: bool,
    pub(super) entries: Vec<FileEntry>,
    pub(super) left_out: Vec<LeftOut>,
}

impl<'a> TarFilter<'a> {
    pub(super) fn new(
        archive: ArchiveName,
        parent: Option<&'a HashMap<String, Known>>,
        parent_start: u64,
    ) -> TarFilter<'a> {
        let prefix = archive.manifest_prefix();
        TarFilter {
            archive,
            prefix,
            state: State::Header(Vec::with_capacity(BLOCK)),
            stored: 0,
            parent,
            parent_start,
            extended: false,
            entries: vec![],
            left_out: vec![],
        }
    }

    /// Feeds the next bytes of the archive; returns the parts of them to store, in order.
    pub(super) fn feed(&mut self, mut data: Bytes) -> Vec<Bytes> {
        let mut out = vec![];
        while !data.is_empty() {
            match &mut self.state {
                State::Through => {
                    self.stored += data.len() as u64;
                    out.push(std::mem::take(&mut data));
                }
                State::Body { left, keep } => {
                    let n = (*left).min(data.len() as u64) as usize;
                    let part = data.split_to(n);
                    *left -= n as u64;
                    if *keep {
                        self.stored += n as u64;
                        out.push(part);
                    }
                    if *left == 0 {
                        self.state = State::Header(Vec::with_capacity(BLOCK));
                    }
                }
                State::Header(buf) => {
                    let n = (BLOCK - buf.len()).min(data.len());
                    buf.extend_from_slice(&data.split_to(n));
                    if buf.len() == BLOCK {
                        let block = std::mem::take(buf);
                        self.header(block, &mut out);
                    }
                }
            }
        }
        out
    }

    /// A complete header block: decides whether its entry is stored, and indexes a regular file.
    fn header(&mut self, block: Vec<u8>, out: &mut Vec<Bytes>) {
        let at = self.stored;
        let passed = |me: &mut TarFilter<'_>, out: &mut Vec<Bytes>, block: Vec<u8>| {
            me.stored += BLOCK as u64;
            out.push(Bytes::from(block));
        };
        if block.iter().all(|b| *b == 0) {
            // The end of the archive (two zero blocks, then perhaps padding).
            passed(self, out, block);
            self.state = State::Through;
            return;
        }
        let h = tar::Header::from_byte_slice(&block);
        let (Ok(size), Ok(path)) = (h.entry_size(), h.path()) else {
            // Not a header this reader understands: the rest is stored as it comes.
            passed(self, out, block);
            self.state = State::Through;
            return;
        };
        let path = path.to_string_lossy().trim_start_matches("./").to_string();
        let kind = h.entry_type();
        let padded = size.div_ceil(BLOCK as u64) * BLOCK as u64;
        let regular = matches!(kind, tar::EntryType::Regular | tar::EntryType::Continuous);
        if !regular {
            // Directories, links, and extension headers (which apply to the next entry).
            self.extended = !matches!(
                kind,
                tar::EntryType::Directory | tar::EntryType::Symlink | tar::EntryType::Link
            );
            passed(self, out, block);
            self.state = State::after_header(padded, true);
            return;
        }
        let mtime = h.mtime().unwrap_or(0);
        let mode = h.mode().unwrap_or(0o600);
        let unchanged = (!self.extended && size >= MIN_REFERENCED)
            .then(|| self.parent.and_then(|p| p.get(&path)))
            .flatten()
            .filter(|k| k.size == size && k.mtime == mtime && mtime < self.parent_start)
            .cloned();
        self.extended = false;
        let entry = |from: Option<BackupId>, offset: u64| FileEntry {
            path: path.clone(),
            archive: self.archive.clone(),
            size,
            mtime,
            mode,
            from,
            offset,
        };
        match unchanged {
            Some(k) => {
                self.entries.push(entry(Some(k.origin), k.offset));
                self.left_out.push(LeftOut {
                    manifest_path: format!("{}{path}", self.prefix),
                    size,
                });
                self.state = State::after_header(padded, false);
            }
            None => {
                self.entries.push(entry(None, at + BLOCK as u64));
                passed(self, out, block);
                self.state = State::after_header(padded, true);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tar_of(files: &[(&str, usize, u64)]) -> Vec<u8> {
        let mut b = tar::Builder::new(vec![]);
        let mut d = tar::Header::new_ustar();
        d.set_entry_type(tar::EntryType::Directory);
        d.set_path("base/5").unwrap();
        d.set_size(0);
        d.set_mode(0o700);
        d.set_cksum();
        b.append(&d, &[][..]).unwrap();
        for (name, len, mtime) in files {
            let mut h = tar::Header::new_ustar();
            h.set_path(name).unwrap();
            h.set_size(*len as u64);
            h.set_mtime(*mtime);
            h.set_mode(0o600);
            h.set_cksum();
            let data: Vec<u8> = (0..*len)
                .map(|i| (i % 251) as u8 ^ name.len() as u8)
                .collect();
            b.append(&h, &data[..]).unwrap();
        }
        b.into_inner().unwrap()
    }

    /// Feeds `tar` in pieces of `step` bytes.
    fn run(f: &mut TarFilter, tar: &[u8], step: usize) -> Vec<u8> {
        let mut stored = vec![];
        for piece in tar.chunks(step) {
            for part in f.feed(Bytes::copy_from_slice(piece)) {
                stored.extend_from_slice(&part);
            }
        }
        stored
    }

    #[test]
    fn a_full_backup_indexes_every_file_where_it_is_stored() {
        let tar = tar_of(&[("base/5/1", 100_000, 10), ("base/5/2", 3, 10)]);
        for step in [1, 7, 512, 100_000] {
            let mut f = TarFilter::new("base.tar".to_string().try_into().unwrap(), None, 0);
            let stored = run(&mut f, &tar, step);
            assert_eq!(stored, tar);
            assert_eq!(f.entries.len(), 2);
            for e in &f.entries {
                let mut a = tar::Archive::new(&tar[..]);
                let want = a
                    .entries()
                    .unwrap()
                    .map(|e| e.unwrap())
                    .find(|x| x.path().unwrap().to_str() == Some(&e.path))
                    .unwrap();
                assert_eq!(e.offset, want.raw_file_position(), "{step}");
                assert_eq!(e.size, want.size());
            }
        }
    }

    #[test]
    fn a_delta_leaves_out_unchanged_files_and_keeps_a_readable_tar() {
        let tar = tar_of(&[
            ("base/5/1", 100_000, 10),  // unchanged: left out
            ("base/5/2", 100_000, 11),  // time differs: stored
            ("base/5/3", 100_001, 10),  // size differs: stored
            ("base/5/4", 100_000, 500), // not older than the parent's start: stored
            ("base/5/5", 3, 10),        // too small to reference: stored
        ]);
        let parent: BackupId = "20261206T120000Z".parse().unwrap();
        let known = |size, mtime| Known {
            size,
            mtime,
            origin: parent.clone(),
            offset: 4242,
        };
        let mut map = HashMap::new();
        map.insert("base/5/1".to_string(), known(100_000, 10));
        map.insert("base/5/2".to_string(), known(100_000, 10));
        map.insert("base/5/3".to_string(), known(100_000, 10));
        map.insert("base/5/4".to_string(), known(100_000, 500));
        map.insert("base/5/5".to_string(), known(3, 10));
        let mut f = TarFilter::new("base.tar".to_string().try_into().unwrap(), Some(&map), 400);
        let stored = run(&mut f, &tar, 333);
        let names: Vec<String> = tar::Archive::new(&stored[..])
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            ["base/5", "base/5/2", "base/5/3", "base/5/4", "base/5/5"]
        );
        assert_eq!(f.left_out.len(), 1);
        assert_eq!(f.left_out[0].manifest_path, "base/5/1");
        let one = f.entries.iter().find(|e| e.path == "base/5/1").unwrap();
        assert_eq!((one.from.as_ref(), one.offset), (Some(&parent), 4242));
        // The stored files' offsets are in the stored stream.
        for e in f.entries.iter().filter(|e| e.from.is_none()) {
            let mut a = tar::Archive::new(&stored[..]);
            let want = a
                .entries()
                .unwrap()
                .map(|e| e.unwrap())
                .find(|x| x.path().unwrap().to_str() == Some(&e.path))
                .unwrap();
            assert_eq!(e.offset, want.raw_file_position());
        }
    }
}
