//! What a backup's chunks hold against what its manifest says: the chunks of each archive are
//! fetched in order (`parallelism` at a time, so memory stays bounded), checked as every object is,
//! and, when their content can be read (plain, or with the identity), fed to a tar reader that
//! lists the regular files and their sizes; those must be exactly the files of Postgres' backup
//! manifest, with the same sizes.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Component, Path};

use futures::StreamExt;

use super::{Checked, check_fetched};
use crate::storage::{Archive, ArchiveMeta, BackupMeta, StorageError};

/// Regular files by the path the manifest uses, with their sizes.
pub type Files = BTreeMap<String, u64>;

/// One file of a backup manifest: its size and, when the manifest gives one, its checksum
/// (algorithm, hex value).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestFile {
    pub size: u64,
    pub checksum: Option<(String, String)>,
}

/// The files Postgres' backup manifest lists, by path (JSON: `Files: [{Path | Encoded-Path, Size,
/// Checksum-Algorithm, Checksum}]`): the one reading of a manifest's files that the restore, the
/// backup and `verify` share.
pub fn manifest_entries(manifest: &[u8]) -> Result<BTreeMap<String, ManifestFile>, String> {
    let v: serde_json::Value =
        serde_json::from_slice(manifest).map_err(|e| format!("not a backup manifest: {e}"))?;
    let files = v["Files"]
        .as_array()
        .ok_or("not a backup manifest: no Files list")?;
    let mut out = BTreeMap::new();
    for f in files {
        let path = entry_path(f)?;
        let size = f["Size"]
            .as_u64()
            .ok_or_else(|| format!("the manifest entry {path} has no size"))?;
        let checksum = match (f["Checksum-Algorithm"].as_str(), f["Checksum"].as_str()) {
            (Some(a), Some(c)) => Some((a.to_string(), c.to_string())),
            _ => None,
        };
        out.insert(path, ManifestFile { size, checksum });
    }
    Ok(out)
}

/// The path of one `Files` entry of a manifest (`Path`, or the hex of `Encoded-Path`).
pub fn entry_path(f: &serde_json::Value) -> Result<String, String> {
    match (f["Path"].as_str(), f["Encoded-Path"].as_str()) {
        (Some(p), _) => Ok(p.to_string()),
        (None, Some(hexed)) => {
            let raw = hex::decode(hexed).map_err(|_| "a bad Encoded-Path in the manifest")?;
            Ok(String::from_utf8_lossy(&raw).into_owned())
        }
        _ => Err("a manifest entry without a path".into()),
    }
}

/// The files Postgres' backup manifest lists, with their sizes.
pub fn manifest_files(manifest: &[u8]) -> Result<Files, String> {
    Ok(manifest_entries(manifest)?
        .into_iter()
        .map(|(p, f)| (p, f.size))
        .collect())
}

/// The chunks of one archive of a backup, checked in order; with `read`, also the files the tar
/// stream they make holds (None when a chunk could not be read; Err for a stream that is no tar).
pub(super) async fn check_archive(
    archive: &Archive,
    meta: &BackupMeta,
    tar: &ArchiveMeta,
    parallelism: usize,
    read: bool,
) -> Result<
    (
        Vec<(object_store::path::Path, Checked)>,
        Option<Result<Files, String>>,
    ),
    StorageError,
> {
    let layout = archive.layout();
    // Tablespace archives hold paths relative to the tablespace: the manifest names them below
    // pg_tblspc/<oid>/.
    let prefix = tar.name.manifest_prefix();
    let (tx, rx) = tokio::sync::mpsc::channel::<Vec<u8>>(1);
    let walker =
        read.then(|| tokio::task::spawn_blocking(move || list_files(Feed::new(rx), &prefix)));
    let fetches = tar.chunks.iter().enumerate().map(|(seq, c)| {
        let key = layout.backup_chunk(&meta.id, &tar.name, seq);
        async move {
            let checked =
                check_fetched(archive, &key, Some((&c.sha256, Some(c.plain_len))), read).await;
            (key, checked)
        }
    });
    let mut stream = futures::stream::iter(fetches).buffered(parallelism.max(1));
    let mut checked = vec![];
    let mut complete = true;
    while let Some((key, result)) = stream.next().await {
        let (c, content) = result?;
        match content {
            Some(data) if complete && c.problem.is_none() => {
                // A walker that stopped has its error to tell.
                let _ = tx.send(data).await;
            }
            _ => complete = false,
        }
        checked.push((key, c));
    }
    drop(tx);
    let files = match walker {
        Some(w) => {
            let listed = w.await.expect("listing does not panic");
            complete.then_some(listed)
        }
        None => None,
    };
    Ok((checked, files))
}

/// Feeds decoded chunks, in order, to a blocking tar reader (here, and in the restore).
pub(crate) struct Feed {
    rx: tokio::sync::mpsc::Receiver<Vec<u8>>,
    cur: Vec<u8>,
    pos: usize,
}

impl Feed {
    pub(crate) fn new(rx: tokio::sync::mpsc::Receiver<Vec<u8>>) -> Feed {
        Feed {
            rx,
            cur: vec![],
            pos: 0,
        }
    }
}

impl Read for Feed {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.pos == self.cur.len() {
            match self.rx.blocking_recv() {
                Some(next) => {
                    self.cur = next;
                    self.pos = 0;
                }
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.cur.len() - self.pos);
        buf[..n].copy_from_slice(&self.cur[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// The regular files of a tar stream (paths under `prefix`), with their sizes; the stream is read
/// to its end.
fn list_files(reader: impl Read, prefix: &str) -> Result<Files, String> {
    let mut ar = tar::Archive::new(reader);
    let mut out = Files::new();
    let entries = ar.entries().map_err(|e| format!("not a tar stream: {e}"))?;
    for entry in entries {
        let e = entry.map_err(|e| format!("a damaged tar stream: {e}"))?;
        if !matches!(
            e.header().entry_type(),
            tar::EntryType::Regular | tar::EntryType::Continuous
        ) {
            continue;
        }
        let raw = e
            .path()
            .map_err(|e| format!("a tar entry with a bad path: {e}"))?;
        let mut path = String::new();
        for c in Path::new(&*raw).components() {
            match c {
                Component::Normal(p) => {
                    if !path.is_empty() {
                        path.push('/');
                    }
                    path.push_str(&p.to_string_lossy());
                }
                Component::CurDir => {}
                _ => return Err(format!("a tar entry outside the target: {}", raw.display())),
            }
        }
        out.insert(format!("{prefix}{path}"), e.size());
    }
    Ok(out)
}

/// How the files a backup's chunks hold differ from its manifest's (empty: they agree). WAL that
/// a backup carries in `pg_wal/` is not listed in manifests.
pub fn compare(manifest: &Files, held: &Files) -> Vec<String> {
    let mut out = vec![];
    for (path, size) in manifest {
        match held.get(path) {
            None => out.push(format!("{path} is in the manifest but not in the backup")),
            Some(s) if s != size => out.push(format!(
                "{path} is {s} bytes in the backup but {size} in the manifest"
            )),
            Some(_) => {}
        }
    }
    for path in held.keys() {
        if !manifest.contains_key(path) && !path.starts_with("pg_wal/") {
            out.push(format!("{path} is in the backup but not in the manifest"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifests_and_tar_listings_compare_by_path_and_size() {
        let manifest = br#"{"PostgreSQL-Backup-Manifest-Version": 1, "Files": [
            {"Path": "PG_VERSION", "Size": 3},
            {"Encoded-Path": "62617365", "Size": 5},
            {"Path": "global/pg_control", "Size": 8192}]}"#;
        let m = manifest_files(manifest).unwrap();
        assert_eq!(m.get("base"), Some(&5));
        let mut held = m.clone();
        held.insert("pg_wal/000000010000000000000001".into(), 16);
        assert!(compare(&m, &held).is_empty());
        held.insert("global/pg_control".into(), 100);
        held.remove("PG_VERSION");
        held.insert("extra".into(), 1);
        let found = compare(&m, &held);
        assert_eq!(found.len(), 3, "{found:?}");
        assert!(
            found
                .iter()
                .any(|f| f.contains("PG_VERSION is in the manifest"))
        );
        assert!(
            found
                .iter()
                .any(|f| f.contains("100 bytes in the backup but 8192"))
        );
        assert!(
            found
                .iter()
                .any(|f| f.contains("extra is in the backup but not"))
        );
        assert!(manifest_files(b"{}").is_err());
        assert!(manifest_files(b"not json").is_err());
    }

    #[test]
    fn tar_streams_list_their_regular_files() {
        let mut b = tar::Builder::new(vec![]);
        let mut h = tar::Header::new_gnu();
        h.set_size(4);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, "./base/1/1234", &b"abcd"[..])
            .unwrap();
        let mut d = tar::Header::new_gnu();
        d.set_size(0);
        d.set_entry_type(tar::EntryType::Directory);
        b.append_data(&mut d, "base/1", &b""[..]).unwrap();
        let data = b.into_inner().unwrap();
        let files = list_files(&data[..], "pg_tblspc/16385/").unwrap();
        assert_eq!(
            files.into_iter().collect::<Vec<_>>(),
            vec![("pg_tblspc/16385/base/1/1234".to_string(), 4)]
        );
        assert!(list_files(&b"garbage that is no tar header"[..], "").is_err());
    }
}
