//! Restoring the files a delta backup (Postgres 13 to 16) holds as references: each names a backup
//! of its chain and where in that backup's stream of an archive its bytes are. The chunks they fall
//! in are fetched once each, in order, `parallelism` at a time, verified as every chunk is, and the
//! bytes written into the files. A reference is checked before anything is read: a backup of the
//! chain, an archive the backup has, a range inside it, a path inside the target.

use std::collections::BTreeMap;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use futures::StreamExt;

use crate::progress::Progress;
use crate::storage::index::FileEntry;
use crate::storage::layout::ArchiveName;
use crate::storage::{Archive, BackupMeta};
use crate::verify::contents::Files;

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
        let prefix = r
            .archive
            .tablespace_oid()
            .map(|oid| format!("pg_tblspc/{oid}/"))
            .unwrap_or_default();
        files.insert(format!("{prefix}{}", r.path), r.size);
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
        let writer = {
            let refs = refs.clone();
            let root = root.clone();
            tokio::task::spawn_blocking(move || write_ranges(&root, &refs, &mut rx))
        };
        let fetches = needed.iter().map(|&i| {
            let key = archive.layout().backup_chunk(&origin.id, &tar.name, i);
            let chunk = &tar.chunks[i];
            let start = starts[i];
            let repo = archive.repo().clone();
            async move {
                let (header, data) = repo.get_with_header(&key).await?;
                if header.plain_len != chunk.plain_len
                    || hex::encode(header.checksum) != chunk.sha256
                {
                    bail!("{key}: does not match the checksum recorded in the backup's metadata");
                }
                anyhow::Ok((start, data))
            }
        });
        let mut stream = futures::stream::iter(fetches).buffered(parallelism.max(1));
        let mut failure = None;
        while let Some(r) = stream.next().await {
            match r {
                Ok((start, data)) => {
                    let n = data.len() as u64;
                    if tx.send((start, data)).await.is_err() {
                        break;
                    }
                    progress.add(n);
                }
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        drop(tx);
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
    let create = |r: &FileEntry| -> anyhow::Result<std::fs::File> {
        let path = inside(root, &r.path)?;
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
            let real = parent.canonicalize()?;
            if !real.starts_with(root.canonicalize()?) {
                bail!("{} leads outside the target directory", parent.display());
            }
        }
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(r.mode & 0o770 | 0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .with_context(|| format!("creating {}", path.display()))
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
                finish(f, r)?;
                open[i] = None;
            }
        }
    }
    Ok(())
}

/// The mode and time the backup recorded.
fn finish(f: &std::fs::File, r: &FileEntry) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    f.set_permissions(std::fs::Permissions::from_mode(r.mode & 0o770))?;
    if let Some(t) = std::time::UNIX_EPOCH.checked_add(std::time::Duration::from_secs(r.mtime)) {
        f.set_modified(t)?;
    }
    Ok(())
}

/// `path` (from the index) below `root`: plain relative parts only.
fn inside(root: &Path, path: &str) -> anyhow::Result<PathBuf> {
    use std::path::Component;
    let mut out = root.to_path_buf();
    let mut parts = 0;
    for c in Path::new(path).components() {
        match c {
            Component::Normal(p) => {
                out.push(p);
                parts += 1;
            }
            Component::CurDir => {}
            _ => bail!("refusing the indexed file {path:?}: outside the target directory"),
        }
    }
    if parts == 0 {
        bail!("refusing the indexed file {path:?}: an empty path");
    }
    let name = out.file_name().map(|n| n.to_string_lossy().into_owned());
    if root_level(root, &out)
        && name.as_deref().is_some_and(|n| {
            n == super::MARKER || n == super::target::HELD_PG_VERSION || n == "PG_VERSION"
        })
        || name.is_some_and(|n| n.ends_with(".pgkeep-tmp"))
    {
        bail!("refusing the indexed file {path:?}: a name the restore writes itself");
    }
    Ok(out)
}

fn root_level(root: &Path, p: &Path) -> bool {
    p.parent() == Some(root)
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
            let err = inside(&root, bad).unwrap_err();
            assert!(err.to_string().contains("refusing"), "{bad}: {err}");
        }
        assert_eq!(inside(&root, "./base/5/1").unwrap(), root.join("base/5/1"));
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
