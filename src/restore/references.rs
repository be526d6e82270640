//! Restoring the files a delta backup (Postgres 13 to 16) holds as references: each names a backup
//! of its chain and where in that backup's stream of an archive its bytes are. The chunks they fall
//! in are fetched once each, in order, `parallelism` at a time, verified as every chunk is, and the
//! bytes written into the files. A reference is checked before anything is read: a backup of the
//! chain, an archive the backup has, a range inside it, a path inside the target.

use std::collections::BTreeMap;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use futures::StreamExt;

use crate::progress::Progress;
use crate::storage::index::FileEntry;
use crate::storage::layout::ArchiveName;
use crate::storage::{Archive, BackupMeta};
use crate::verify::contents::Files;

use super::files::{
    InsideCheck, MODE_MASK, create_restored, fetch_chunk, pump, relative, restores_own_name,
    set_mode_and_time,
};

/// Writes every referenced file of `refs` (entries of `meta`'s index with a `from`), its archive's
/// root given by `root_of`. Returns the files written by their manifest paths, with their sizes.
pub(super) async fn restore_references(
    archive: &Archive,
    meta: &BackupMeta,
    chain: &[BackupMeta],
    refs: Vec<FileEntry>,
    root_of: &dyn Fn(&ArchiveName) -> Option<PathBuf>,
    parallelism: usize,
    progress: &mut Progress,
) -> anyhow::Result<Files> {
    let mut files = Files::new();
    // By the backup and archive whose stream holds them.
    let mut groups: BTreeMap<(String, String), Vec<FileEntry>> = BTreeMap::new();
    for r in refs {
        r.check_reference(meta, chain).map_err(|why| {
            anyhow::anyhow!(
                "backup {}'s file index: {why}: the index is damaged or forged",
                meta.id
            )
        })?;
        let from = r.from.clone().expect("a reference");
        files.insert(r.manifest_path(), r.size);
        groups
            .entry((from.to_string(), String::from(r.archive.clone())))
            .or_default()
            .push(r);
    }
    for ((from, name), mut refs) in groups {
        // Checked with each reference above.
        let origin = chain
            .iter()
            .find(|b| b.id.as_str() == from)
            .expect("a backup of the chain");
        let tar = origin
            .archives
            .iter()
            .find(|a| String::from(a.name.clone()) == name)
            .expect("an archive of it");
        let Some(root) = root_of(&tar.name) else {
            continue; // a tablespace the restored backup does not hold
        };
        // Where each chunk starts in the stream.
        let mut starts = Vec::with_capacity(tar.chunks.len() + 1);
        let mut at = 0u64;
        for c in &tar.chunks {
            starts.push(at);
            at += c.plain_len;
        }
        starts.push(at);
        refs.sort_by_key(|r| r.offset);
        // The chunks any of them falls in, once each, in order (linear in chunks and references,
        // whatever a forged index overlaps).
        let mut needed: Vec<usize> = vec![];
        let mut next = 0usize;
        for r in refs.iter().filter(|r| r.size > 0) {
            let first = starts.partition_point(|s| *s <= r.offset) - 1;
            let last = starts.partition_point(|s| *s < r.offset + r.size) - 1;
            needed.extend(first.max(next)..=last);
            next = next.max(last + 1);
        }
        tracing::info!(from = %from, archive = %name, files = refs.len(), chunks = needed.len(), "restoring the files unchanged since an earlier backup of the chain");
        let (tx, mut rx) = tokio::sync::mpsc::channel::<(u64, Vec<u8>)>(1);
        let writer = tokio::task::spawn_blocking(move || write_ranges(&root, &refs, &mut rx));
        let fetches = needed.iter().map(|&i| {
            let key = archive.layout().backup_chunk(&origin.id, &tar.name, i);
            let (chunk, start, repo) = (&tar.chunks[i], starts[i], archive.repo().clone());
            async move { anyhow::Ok((start, fetch_chunk(&repo, &key, chunk).await?)) }
        });
        let stream = futures::stream::iter(fetches).buffered(parallelism.max(1));
        let failure = pump(stream, tx, progress, |(_, data)| data.len() as u64).await;
        let written = writer.await.context("the writing task")?;
        if let Some(e) = failure {
            return Err(e.context(format!(
                "restoring backup {} (its chain's backup {from})",
                meta.id
            )));
        }
        written.with_context(|| {
            format!("restoring the files backup {} shares with {from}", meta.id)
        })?;
    }
    Ok(files)
}

/// Writes the slices of each chunk (its start in the stream, its bytes; in order) into the files of
/// `refs` (sorted by offset) below `root`; every file is created, also an empty one.
fn write_ranges(
    root: &Path,
    refs: &[FileEntry],
    rx: &mut tokio::sync::mpsc::Receiver<(u64, Vec<u8>)>,
) -> anyhow::Result<()> {
    let mut open: Vec<Option<std::fs::File>> = refs.iter().map(|_| None).collect();
    let mut checked = InsideCheck::new(root)?;
    let mut create = |r: &FileEntry| -> anyhow::Result<std::fs::File> {
        create_restored(root, &inside(&r.path)?, r.mode & MODE_MASK, &mut checked)
    };
    for (i, r) in refs.iter().enumerate() {
        if r.size == 0 {
            create(r)?;
            open[i] = None;
        }
    }
    let mut first = 0; // refs before it are complete
    while let Some((start, data)) = rx.blocking_recv() {
        let end = start + data.len() as u64;
        while first < refs.len() && refs[first].offset + refs[first].size <= start {
            first += 1;
        }
        for (i, r) in refs.iter().enumerate().skip(first) {
            if r.offset >= end {
                break;
            }
            let (from, to) = (r.offset.max(start), (r.offset + r.size).min(end));
            if from >= to {
                continue;
            }
            if open[i].is_none() {
                open[i] = Some(create(r)?);
            }
            let f = open[i].as_ref().expect("opened");
            f.write_all_at(
                &data[(from - start) as usize..(to - start) as usize],
                from - r.offset,
            )?;
            if to == r.offset + r.size {
                set_mode_and_time(f, r.mode & MODE_MASK, Some(r.mtime))?;
                open[i] = None;
            }
        }
    }
    Ok(())
}

/// `path` (from the index): a plain relative path, as an archive entry's must be, and never a
/// name the restore writes itself (nor PG_VERSION, which the restore holds back).
fn inside(path: &str) -> anyhow::Result<PathBuf> {
    let rel = relative(Path::new(path))
        .map_err(|e| anyhow::anyhow!("refusing the indexed file {path:?}: {e:#}"))?;
    if restores_own_name(&rel, true) || rel == Path::new("PG_VERSION") {
        bail!("refusing the indexed file {path:?}: a name the restore writes itself");
    }
    Ok(rel)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(path: &str, offset: u64, size: u64) -> FileEntry {
        FileEntry {
            path: path.into(),
            archive: "base.tar".to_string().try_into().unwrap(),
            size,
            mtime: 1_700_000_000,
            mode: 0o600,
            from: Some("20261206T120000Z".parse().unwrap()),
            offset,
        }
    }

    #[test]
    fn ranges_across_chunks_land_in_their_files() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().canonicalize().unwrap();
        let stream: Vec<u8> = (0..1000u32).map(|i| (i % 251) as u8).collect();
        let refs = vec![
            entry("base/5/a", 10, 300),  // spans chunks 0 and 1
            entry("base/5/b", 400, 0),   // empty
            entry("base/5/c", 600, 400), // spans chunks 2 and 3
        ];
        let (tx, mut rx) = tokio::sync::mpsc::channel(8);
        for (i, c) in stream.chunks(256).enumerate() {
            tx.try_send(((i * 256) as u64, c.to_vec())).unwrap();
        }
        drop(tx);
        write_ranges(&root, &refs, &mut rx).unwrap();
        assert_eq!(
            std::fs::read(root.join("base/5/a")).unwrap(),
            stream[10..310]
        );
        assert_eq!(std::fs::read(root.join("base/5/b")).unwrap(), b"");
        assert_eq!(
            std::fs::read(root.join("base/5/c")).unwrap(),
            stream[600..1000]
        );
    }

    #[test]
    fn a_forged_reference_names_nothing_outside_the_target() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("data");
        std::fs::create_dir(&root).unwrap();
        for bad in [
            "../escape",
            "/etc/passwd",
            "",
            "PG_VERSION",
            super::super::MARKER,
            "x/.y.pgkeep-tmp",
        ] {
            let err = inside(bad).unwrap_err();
            assert!(err.to_string().contains("refusing"), "{bad}: {err}");
        }
        assert_eq!(
            root.join(inside("./base/5/1").unwrap()),
            root.join("base/5/1")
        );
        // A link planted in the target does not carry a file outside.
        let outside = dir.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("base")).unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::channel(1);
        tx.try_send((0, vec![1u8; 10])).unwrap();
        drop(tx);
        let err = write_ranges(&root, &[entry("base/x", 0, 10)], &mut rx).unwrap_err();
        assert!(err.to_string().contains("outside"), "{err}");
        assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);
    }
}
