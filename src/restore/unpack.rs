//! Unpacking a backup: its chunks downloaded and verified `parallelism` at a time, unpacked in
//! order, never outside the target; then its manifest and its own WAL.

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use futures::StreamExt;

use crate::fsutil;
use crate::pg::WalFileName;
use crate::pg::walheader;
use crate::progress::Progress;
use crate::storage::layout::ArchiveName;
use crate::storage::{Archive, ArchiveMeta, BackupMeta};
use crate::verify::contents::{Feed, Files, ManifestFile};

use super::files::{
    InsideCheck, MODE_MASK, create_restored, fetch_chunk, pump, relative, restores_own_name,
    set_mode_and_time,
};
use super::{incremental, map_location, references};
use crate::storage::catalog::BackupKind;
use crate::storage::index::FileEntry;
use std::collections::{BTreeMap, HashMap, HashSet};

/// Unpacks a backup and the backups it builds on (`chain`, oldest first, from
/// [`Archive::chain`]): the data directory into `dir`, each tablespace into its (mapped) location.
/// Each backup's files are checked against its own manifest as it is unpacked. Returns how long
/// the data took and the manifest of the result: the backup's own, or for an incremental backup
/// one rewritten to describe the rebuilt files.
pub(super) async fn unpack_chain(
    archive: &Archive,
    chain: &[BackupMeta],
    dir: &Path,
    map: &[(PathBuf, PathBuf)],
    parallelism: usize,
) -> anyhow::Result<(std::time::Duration, Vec<u8>)> {
    let newest = chain.last().context("an empty chain of backups")?;
    // A delta backup is restored from its own archives and the files it refers to; an incremental
    // one on the backups before it.
    let delta = newest.kind == BackupKind::Delta;
    let index = match delta {
        true => archive.file_index(newest).await?,
        false => None,
    };
    let refs: Vec<FileEntry> = index
        .map(|i| i.files.into_iter().filter(|f| f.from.is_some()).collect())
        .unwrap_or_default();
    let layers = if delta {
        std::slice::from_ref(newest)
    } else {
        chain
    };
    let total: u64 = layers.iter().map(|m| m.plain_bytes).sum::<u64>()
        + refs.iter().map(|r| r.size).sum::<u64>();
    let mut progress = Progress::new("restore", Some(total));
    let map = Arc::new(map.to_vec());
    // Where an archive of the newest backup is restored (as mapped): the locations the restore
    // prepared, whatever an older backup of the chain recorded. None: a tablespace dropped since.
    let restored_at = |name: &ArchiveName| -> Option<PathBuf> {
        let a = newest.archives.iter().find(|a| a.name == *name)?;
        Some(match &a.location {
            None => dir.to_path_buf(),
            Some(loc) => map_location(&map, Path::new(loc)),
        })
    };
    // The files of a tablespace dropped since are not restored, nor expected.
    let dropped = |path: &str| {
        path.strip_prefix("pg_tblspc/")
            .and_then(|rest| rest.split('/').next())
            .and_then(|oid| oid.parse::<u32>().ok())
            .is_some_and(|oid| {
                !newest
                    .archives
                    .iter()
                    .any(|a| a.name.tablespace_oid() == Some(oid))
            })
    };
    let mut manifest = (vec![], BTreeMap::new());
    let mut refs = Some(refs);
    // Of a chain: the checksums known without reading the file back.
    let mut known: HashMap<String, incremental::Rebuilt> = HashMap::new();
    for (i, meta) in layers.iter().enumerate() {
        let incremental = i > 0;
        if chain.len() > 1 {
            tracing::info!(backup = %meta.id, kind = %meta.kind, step = i + 1, of = chain.len(), "unpacking a backup of the chain");
        }
        let mut files = Files::new();
        let mut changed: HashSet<String> = HashSet::new();
        for tar in &meta.archives {
            let Some(dest) = restored_at(&tar.name) else {
                continue;
            };
            let job = Unpack {
                archive,
                meta,
                newest,
                tar,
                dest,
                map: map.clone(),
                parallelism,
                incremental,
            };
            let out = job.run(&mut progress).await?;
            files.extend(out.files);
            changed.extend(out.changed);
        }
        if let Some(refs) = refs.take().filter(|r| !r.is_empty()) {
            files.extend(
                references::restore_references(
                    archive,
                    meta,
                    chain,
                    refs,
                    &restored_at,
                    parallelism,
                    &mut progress,
                )
                .await?,
            );
        }
        manifest = checked_manifest(archive, meta, &files, &dropped).await?;
        if incremental {
            remove_deleted(meta, &manifest.1, &restored_at)?;
        }
        if layers.len() > 1 {
            known = known_checksums(known, &manifest.1, &changed);
        }
    }
    let took = progress.finish();
    let (mut manifest, listed) = manifest;
    if layers.len() > 1 {
        manifest = rebuilt_manifest(&manifest, &listed, dir, parallelism, &known).await?;
    }
    Ok((took, manifest))
}

/// The checksum of each file as it is after a backup of a chain (`listed`, its manifest) was
/// applied, where a manifest gave it: a whole file's from this manifest; a rebuilt one keeps the
/// earlier one if nothing changed it (`changed`: the files its incremental files changed).
fn known_checksums(
    mut before: HashMap<String, incremental::Rebuilt>,
    listed: &BTreeMap<String, ManifestFile>,
    changed: &HashSet<String>,
) -> HashMap<String, incremental::Rebuilt> {
    let mut now = HashMap::new();
    for (path, f) in listed {
        match incremental::rebuilt_path(path) {
            Some(rebuilt) if !changed.contains(&rebuilt) => {
                if let Some(sum) = before.remove(&rebuilt) {
                    now.insert(rebuilt, sum);
                }
            }
            Some(_) => {}
            None => {
                if let Some(sum) = incremental::Rebuilt::from_manifest(f) {
                    now.insert(path.clone(), sum);
                }
            }
        }
    }
    now
}

/// After an incremental backup is applied: the files it does not hold (`listed`, its manifest)
/// were deleted before it.
fn remove_deleted(
    meta: &BackupMeta,
    listed: &BTreeMap<String, ManifestFile>,
    restored_at: &dyn Fn(&ArchiveName) -> Option<PathBuf>,
) -> anyhow::Result<()> {
    let keep: HashSet<String> = listed
        .keys()
        .map(|p| incremental::rebuilt_path(p).unwrap_or_else(|| p.clone()))
        .collect();
    let mut removed = 0;
    for tar in &meta.archives {
        let Some(root) = restored_at(&tar.name) else {
            continue;
        };
        // The restore's own files at the top of the data directory are left alone.
        let own: &[&str] = match tar.name.tablespace_oid() {
            None => &[super::MARKER, super::target::HELD_PG_VERSION, "lost+found"],
            Some(_) => &[],
        };
        removed += incremental::remove_deleted(&root, &tar.name.manifest_prefix(), &keep, own)?;
    }
    if removed > 0 {
        tracing::info!(backup = %meta.id, files = removed, "removed the files deleted before this backup");
    }
    Ok(())
}

/// The manifest of a directory rebuilt from a chain: the newest backup's (`newest`, its files
/// `listed`), with each rebuilt file's size and checksum (read back, `parallelism` files at a
/// time, unless `known`) and `backup_label` without its incremental lines.
async fn rebuilt_manifest(
    newest: &[u8],
    listed: &BTreeMap<String, ManifestFile>,
    dir: &Path,
    parallelism: usize,
    known: &HashMap<String, incremental::Rebuilt>,
) -> anyhow::Result<Vec<u8>> {
    let label_path = dir.join("backup_label");
    let label =
        std::fs::read_to_string(&label_path).context("reading the restored backup_label")?;
    let mode = std::fs::metadata(&label_path)?.permissions().mode();
    fsutil::write_atomic(&label_path, incremental::strip_label(&label).as_bytes())?;
    std::fs::set_permissions(&label_path, std::fs::Permissions::from_mode(mode))?;
    // A rebuilt file nothing changed since a manifest gave its checksum is not read back.
    let to_read: Vec<String> = listed
        .keys()
        .filter(|p| {
            *p == "backup_label"
                || incremental::rebuilt_path(p).is_some_and(|r| !known.contains_key(&r))
        })
        .cloned()
        .collect();
    let rebuilt = listed
        .keys()
        .filter(|p| incremental::rebuilt_path(p).is_some())
        .count();
    let read_back = to_read.iter().filter(|p| *p != "backup_label").count();
    tracing::info!(
        read_back,
        checksum_reused = rebuilt - read_back,
        "checksumming the rebuilt files for backup_manifest"
    );
    let dir = dir.to_path_buf();
    let sums = futures::stream::iter(to_read.into_iter().map(|p| {
        let file = dir.join(incremental::rebuilt_path(&p).unwrap_or_else(|| p.clone()));
        async move {
            let sum = tokio::task::spawn_blocking(move || incremental::file_crc32c(&file))
                .await
                .context("the checksum task")??;
            anyhow::Ok((p, sum))
        }
    }))
    .buffer_unordered(parallelism.max(1))
    .collect::<Vec<_>>()
    .await
    .into_iter()
    .collect::<anyhow::Result<HashMap<_, _>>>()?;
    incremental::combined_manifest(newest, &|p| {
        let known = incremental::rebuilt_path(p).and_then(|r| known.get(&r));
        Ok(sums.get(p).or(known).cloned())
    })
}

/// How many of the backup's own WAL segments are downloaded while the data unpacks (held in
/// memory until `pg_wal` exists): a backup of a few seconds needs one or two.
pub(super) const EARLY_WAL: usize = 2;
/// The most bytes of WAL segments held in memory at once by the restore's WAL step.
const WAL_IN_MEMORY: u64 = 128 << 20;

/// How many whole segments of `meta`'s size fit in [`WAL_IN_MEMORY`] (at least one).
fn segments_in_memory(meta: &BackupMeta) -> usize {
    (WAL_IN_MEMORY / u64::from(meta.wal_segment_size.bytes())).max(1) as usize
}

/// Downloads and verifies the first [`EARLY_WAL`] segments of the backup's own WAL, to run beside
/// the unpacking of its data.
pub(super) async fn download_early_wal(
    archive: &Archive,
    meta: &BackupMeta,
) -> anyhow::Result<Vec<(WalFileName, Vec<u8>)>> {
    // None early with segments too large to hold two of (they come after the data).
    let early = if segments_in_memory(meta) >= EARLY_WAL {
        EARLY_WAL
    } else {
        0
    };
    let names: Vec<WalFileName> = meta.required_wal().into_iter().take(early).collect();
    futures::stream::iter(
        names
            .into_iter()
            .map(|name| async move { anyhow::Ok((name, download_segment(archive, &name).await?)) }),
    )
    .buffered(EARLY_WAL)
    .collect::<Vec<_>>()
    .await
    .into_iter()
    .collect()
}

/// The backup's manifest, checked against its metadata; the files restored from it must be
/// exactly those it lists, with their sizes.
async fn checked_manifest(
    archive: &Archive,
    meta: &BackupMeta,
    restored: &Files,
    not_restored: &dyn Fn(&str) -> bool,
) -> anyhow::Result<(Vec<u8>, BTreeMap<String, ManifestFile>)> {
    let key = archive.layout().backup_manifest(&meta.id);
    let (header, manifest) = archive.repo().get_with_header(&key).await?;
    if hex::encode(header.checksum) != meta.manifest_sha256 {
        bail!("{key}: does not match the checksum recorded in the backup's metadata");
    }
    let entries = crate::verify::contents::manifest_entries(&manifest)
        .map_err(|e| anyhow::anyhow!("{key}: {e}"))?;
    let listed: Files = entries
        .iter()
        .filter(|(p, _)| !not_restored(p))
        .map(|(p, f)| (p.clone(), f.size))
        .collect();
    let differences = crate::verify::contents::compare(&listed, restored);
    if let Some(first) = differences.first() {
        bail!(
            "the restored files do not match the backup's manifest (backup {}: {} difference(s); the first: {first}): the backup was altered after it was taken",
            meta.id,
            differences.len()
        );
    }
    Ok((manifest, entries))
}

/// Writes `backup_manifest` (so pg_verifybackup can check the result) and the WAL from the
/// backup's start to its end into `pg_wal` (so the directory is consistent by itself): `early`,
/// downloaded while the data unpacked, then the rest, `parallelism` at a time.
pub(super) async fn write_manifest_and_wal(
    archive: &Archive,
    meta: &BackupMeta,
    dir: &Path,
    manifest: &[u8],
    early: Vec<(WalFileName, Vec<u8>)>,
    parallelism: usize,
) -> anyhow::Result<()> {
    fsutil::write_atomic(&dir.join("backup_manifest"), manifest)?;
    let pg_wal = dir.join("pg_wal");
    std::fs::create_dir_all(&pg_wal)?;
    let required = meta.required_wal();
    for (name, data) in &early {
        write_segment(&pg_wal, name, data)?;
    }
    let rest = required
        .into_iter()
        .filter(|n| !early.iter().any(|(e, _)| e == n));
    let pg_wal = &pg_wal;
    let mut writes = futures::stream::iter(rest.map(|name| async move {
        let data = download_segment(archive, &name).await?;
        write_segment(pg_wal, &name, &data)
    }))
    .buffer_unordered(parallelism.clamp(1, segments_in_memory(meta)));
    while let Some(done) = writes.next().await {
        done?;
    }
    Ok(())
}

/// One of the backup's WAL segments, verified (object checksum, page header against the name
/// and the cluster).
async fn download_segment(archive: &Archive, name: &WalFileName) -> anyhow::Result<Vec<u8>> {
    let data = archive.repo().get(&archive.layout().wal(name)).await?;
    walheader::check_segment(name, &data, Some(archive.system_identifier()))?;
    Ok(data)
}

/// Writes a verified segment into `pg_wal`. No fsync of its own: the restore syncs the whole file
/// system before removing its marker. Created new: nothing the archive planted is followed.
fn write_segment(pg_wal: &Path, name: &WalFileName, data: &[u8]) -> anyhow::Result<()> {
    let dest = pg_wal.join(name.to_string());
    std::io::Write::write_all(&mut crate::fsutil::create_new(&dest)?, data)
        .with_context(|| format!("writing {}", dest.display()))?;
    Ok(())
}

/// One tar archive of a backup to unpack.
struct Unpack<'a> {
    archive: &'a Archive,
    meta: &'a BackupMeta,
    /// The backup the restore is of (`meta` or a later one of its chain): its tablespaces are
    /// the ones restored, where it says.
    newest: &'a BackupMeta,
    tar: &'a ArchiveMeta,
    dest: PathBuf,
    map: Arc<Vec<(PathBuf, PathBuf)>>,
    parallelism: usize,
    /// An incremental backup applied on what the earlier ones of its chain restored.
    incremental: bool,
}

impl Unpack<'_> {
    /// Downloads and verifies the chunks, `parallelism` at a time, and unpacks them in order.
    async fn run(self, progress: &mut Progress) -> anyhow::Result<Extracted> {
        let (tx, rx) = tokio::sync::mpsc::channel::<Vec<u8>>(1);
        // The data directory's archive links the backup's own tablespaces, nothing else.
        let tablespaces: Option<Vec<(u32, PathBuf)>> =
            self.tar.name.tablespace_oid().is_none().then(|| {
                self.newest
                    .archives
                    .iter()
                    .filter_map(|a| {
                        let loc = a.location.as_deref()?;
                        Some((
                            a.name.tablespace_oid()?,
                            map_location(&self.map, Path::new(loc)),
                        ))
                    })
                    .collect()
            });
        let dest = self.dest.clone();
        let mode = Mode {
            incremental: self.incremental,
            // A backup of a chain may link a tablespace dropped before the newest: not restored.
            other_links_skipped: self.meta.id != self.newest.id,
        };
        let extractor = tokio::task::spawn_blocking(move || {
            extract(Feed::new(rx), &dest, tablespaces.as_deref(), mode)
        });
        let fetches = self.tar.chunks.iter().enumerate().map(|(seq, chunk)| {
            let key = self
                .archive
                .layout()
                .backup_chunk(&self.meta.id, &self.tar.name, seq);
            let repo = self.archive.repo().clone();
            async move { fetch_chunk(&repo, &key, chunk).await }
        });
        let stream = futures::stream::iter(fetches).buffered(self.parallelism.max(1));
        // The extractor stopping early has its own error to say why.
        let failure = pump(stream, tx, progress, |data: &Vec<u8>| data.len() as u64).await;
        let extracted = extractor.await.context("the unpacking task")?;
        if let Some(e) = failure {
            return Err(e.context(format!("restoring backup {}", self.meta.id)));
        }
        let out = extracted.with_context(|| {
            format!(
                "unpacking {} of backup {}",
                String::from(self.tar.name.clone()),
                self.meta.id
            )
        })?;
        // By the paths the manifest uses: a tablespace's files below pg_tblspc/<oid>/.
        let prefix = self.tar.name.manifest_prefix();
        Ok(Extracted {
            files: out
                .files
                .into_iter()
                .map(|(p, n)| (format!("{prefix}{p}"), n))
                .collect(),
            changed: out
                .changed
                .into_iter()
                .map(|p| format!("{prefix}{p}"))
                .collect(),
        })
    }
}

/// One base backup archive (the data directory's, no tablespaces) unpacked into `dest` exactly
/// as a restore unpacks it: for the fuzz targets (`fuzz/`), which feed it hostile tars and check
/// that nothing appears outside `dest`.
#[doc(hidden)]
pub fn extract_data_archive(reader: impl Read, dest: &Path) -> anyhow::Result<()> {
    extract(reader, dest, Some(&[]), Mode::default()).map(drop)
}

/// Unpacks one tar stream into `dest`. A backup in storage may be forged (anyone with the
/// bucket's keys can write one), so only what a base backup holds is restored: regular files and
/// directories, inside `dest`, with their modes masked (no setuid, setgid, sticky or world bits);
/// and, in the data directory's archive, the links `pg_tblspc/<oid>` of the backup's own
/// tablespaces, pointing where `tablespaces` says (the metadata's locations, as mapped), never
/// where the archive says. Any other link, a hard link, a device or a FIFO is refused. With
/// `mode.incremental`, an `INCREMENTAL.<name>` file is applied to the file `<name>` already
/// restored.
fn extract(
    reader: impl Read,
    dest: &Path,
    tablespaces: Option<&[(u32, PathBuf)]>,
    mode: Mode,
) -> anyhow::Result<Extracted> {
    let incremental = mode.incremental;
    let mut out = Extracted::default();
    let files = &mut out.files;
    use tar::EntryType;
    let mut ar = tar::Archive::new(reader);
    let mut buf = vec![0u8; WRITE_PIECE];
    let mut inside = InsideCheck::new(dest)?;
    for entry in ar.entries()? {
        let mut e = entry?;
        let raw = e.path()?.into_owned();
        let kind = e.header().entry_type();
        // Metadata of the tar format itself (the reader has applied it): no path of its own.
        if matches!(kind, EntryType::XGlobalHeader | EntryType::XHeader) {
            continue;
        }
        let path = relative(&raw)?;
        // The names the restore itself writes at the top: an archive that brings its own is
        // forged (its marker could claim other directories as the restore's to clear).
        if restores_own_name(&path, tablespaces.is_some()) {
            bail!(
                "refusing the archive entry {}: a name the restore writes itself",
                path.display()
            );
        }
        match kind {
            EntryType::Regular | EntryType::Continuous => {
                files.insert(path.to_string_lossy().into_owned(), e.size());
                // The data directory's PG_VERSION is held back until the restore is complete.
                let path = match tablespaces.is_some() && path == Path::new("PG_VERSION") {
                    true => PathBuf::from(super::target::HELD_PG_VERSION),
                    false => path,
                };
                let rebuilds = path
                    .to_str()
                    .filter(|_| incremental)
                    .and_then(incremental::rebuilt_path);
                // The file an incremental entry rebuilds is held to the same names.
                if let Some(r) = &rebuilds
                    && restores_own_name(Path::new(r), tablespaces.is_some())
                {
                    bail!(
                        "refusing the archive entry {}: it would rebuild a name the restore writes itself",
                        path.display()
                    );
                }
                match rebuilds {
                    Some(rebuilt) => {
                        let changed =
                            apply_incremental(&mut e, dest, Path::new(&rebuilt), &mut inside)
                                .with_context(|| format!("applying {}", path.display()))?;
                        if changed {
                            out.changed.push(rebuilt);
                        }
                    }
                    None => write_file(&mut e, dest, &path, &mut buf, &mut inside)
                        .with_context(|| format!("unpacking {}", path.display()))?,
                }
            }
            EntryType::Directory => {
                let dir = dest.join(&path);
                std::fs::create_dir_all(&dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
                inside.check(&dir)?;
                let mode = e.header().mode().unwrap_or(0o700) & MODE_MASK | 0o700;
                std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(mode))?;
            }
            EntryType::Symlink if tablespaces.is_some() && path.starts_with("pg_tblspc") => {
                let known = tablespace_oid(&path).is_some_and(|oid| {
                    tablespaces
                        .unwrap_or_default()
                        .iter()
                        .any(|(o, _)| *o == oid)
                });
                if known || !mode.other_links_skipped {
                    tablespace_link(dest, &path, tablespaces.unwrap_or_default())?;
                }
            }
            // Postgres backs up other links in the data directory as links (say, `log` pointing
            // at a volume): never recreated, since they may point anywhere; said instead.
            EntryType::Symlink if tablespaces.is_some() => {
                let to = e
                    .link_name()
                    .ok()
                    .flatten()
                    .map(|l| l.display().to_string());
                tracing::warn!(
                    entry = %path.display(),
                    link = to.as_deref().unwrap_or("?"),
                    "the backup holds a symbolic link, which a restore does not recreate: create it by hand if it is needed"
                );
            }
            other => bail!(
                "refusing the archive entry {}: a {} (a restore writes only files and directories, \
                 and the backup's own tablespace links; anything else could lead outside the target directory)",
                path.display(),
                entry_kind(other)
            ),
        }
    }
    Ok(out)
}

fn entry_kind(t: tar::EntryType) -> &'static str {
    match t {
        tar::EntryType::Symlink => "symbolic link",
        tar::EntryType::Link => "hard link",
        tar::EntryType::Char | tar::EntryType::Block => "device file",
        tar::EntryType::Fifo => "FIFO",
        _ => "kind of entry a base backup never holds",
    }
}

/// What unpacking an archive wrote.
#[derive(Debug, Default)]
struct Extracted {
    /// The regular files of the archive, with their sizes.
    files: Files,
    /// The files an incremental archive changed (by path in the archive): their checksums are
    /// no longer those of an earlier manifest.
    changed: Vec<String>,
}

/// How an archive is unpacked.
#[derive(Debug, Clone, Copy, Default)]
struct Mode {
    /// An incremental backup on what the earlier backups of its chain restored.
    incremental: bool,
    /// A backup of a chain before the newest: a link to a tablespace the newest does not hold
    /// (dropped since) is skipped instead of refused.
    other_links_skipped: bool,
}

/// The OID in a `pg_tblspc/<oid>` entry's path.
fn tablespace_oid(path: &Path) -> Option<u32> {
    // Postgres names the entry `pg_tblspc/<oid>/`; a trailing slash would make symlink() fail.
    path.strip_prefix("pg_tblspc")
        .ok()
        .and_then(|p| p.to_str())
        .filter(|o| !o.is_empty() && o.len() <= 10 && o.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|o| o.parse::<u32>().ok())
}

/// `pg_tblspc/<oid>` of a tablespace the backup's metadata names, linked to its location.
fn tablespace_link(dest: &Path, path: &Path, tablespaces: &[(u32, PathBuf)]) -> anyhow::Result<()> {
    let oid = tablespace_oid(path);
    let target = oid.and_then(|oid| tablespaces.iter().find(|(o, _)| *o == oid));
    let Some((oid, target)) = target else {
        bail!(
            "refusing the tablespace link {}: the backup's metadata names no such tablespace",
            path.display()
        );
    };
    let link = dest.join("pg_tblspc").join(oid.to_string());
    std::fs::create_dir_all(link.parent().expect("has a parent"))?;
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(target, &link)
        .with_context(|| format!("creating the tablespace link {}", link.display()))
}

/// Files are written in pieces this large, and each piece's writeback is started at once.
const WRITE_PIECE: usize = 4 << 20;

/// Writes a regular file of the archive under `dest`: in large pieces (the tar crate's own unpack
/// writes 8 KB at a time), each handed to the disk as soon as it is written
/// (`sync_file_range(SYNC_FILE_RANGE_WRITE)`, which does not wait), so the disk works while the
/// rest unpacks and the final syncfs has little left to do. Only plain relative paths are taken,
/// in directories inside `dest`, and the file itself is never a symlink followed.
fn write_file(
    e: &mut tar::Entry<impl Read>,
    dest: &Path,
    path: &Path,
    buf: &mut [u8],
    inside: &mut InsideCheck,
) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::io::AsRawFd;
    let mode = e.header().mode().unwrap_or(0o600) & MODE_MASK;
    let mut f = create_restored(dest, path, mode, inside)?;
    let (mut written, mut started) = (0i64, 0i64);
    loop {
        let n = e.read(buf)?;
        if n == 0 {
            break;
        }
        f.write_all(&buf[..n])?;
        written += n as i64;
        if written - started >= WRITE_PIECE as i64 {
            start_writeback(f.as_raw_fd(), started, written - started);
            started = written;
        }
    }
    if written > started {
        start_writeback(f.as_raw_fd(), started, written - started);
    }
    set_mode_and_time(&f, mode, e.header().mtime().ok())
}

/// Applies an incremental file of the archive to the file `path` (below `dest`) that the earlier
/// backups of the chain restored, never outside `dest` and never through a link.
fn apply_incremental(
    e: &mut tar::Entry<impl Read>,
    dest: &Path,
    path: &Path,
    inside: &mut InsideCheck,
) -> anyhow::Result<bool> {
    let target = dest.join(path);
    if let Some(parent) = target.parent() {
        inside.check(parent)?;
    }
    let f = incremental::open_existing(&target)?;
    let size = e.size();
    let (_, changed) = incremental::apply(e, size, &f)?;
    let mode = e.header().mode().unwrap_or(0o600) & MODE_MASK;
    set_mode_and_time(&f, mode, e.header().mtime().ok())?;
    Ok(changed)
}

/// Asks the kernel to start writing a file range to disk, without waiting. Advisory: durability
/// comes from the syncfs before the restore reports success, so a failure here changes nothing.
fn start_writeback(fd: std::os::unix::io::RawFd, offset: i64, len: i64) {
    // SAFETY: sync_file_range only reads its integer arguments; `fd` is open for the call.
    unsafe {
        libc::sync_file_range(fd, offset, len, libc::SYNC_FILE_RANGE_WRITE);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tar archive of one regular file, with the name written raw (tar's builder refuses `..`).
    fn one_file_tar(name: &str, data: &[u8], mode: u32, mtime: u64) -> Vec<u8> {
        let mut h = tar::Header::new_gnu();
        h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
        h.set_size(data.len() as u64);
        h.set_mode(mode);
        h.set_mtime(mtime);
        h.set_entry_type(tar::EntryType::Regular);
        h.set_cksum();
        let mut out = h.as_bytes().to_vec();
        out.extend_from_slice(data);
        out.resize(out.len().div_ceil(512) * 512 + 1024, 0);
        out
    }

    #[test]
    fn files_are_unpacked_with_their_mode_and_time_and_never_outside() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let dest = tmp.path().join("data");
        std::fs::create_dir(&dest).unwrap();
        let big: Vec<u8> = (0..(WRITE_PIECE * 2 + 12345))
            .map(|i| (i % 253) as u8)
            .collect();
        let tar = one_file_tar("base/1/1259", &big, 0o600, 1_700_000_000);
        extract(&tar[..], &dest, Some(&[]), Mode::default()).unwrap();
        let f = dest.join("base/1/1259");
        assert_eq!(std::fs::read(&f).unwrap(), big);
        let m = std::fs::metadata(&f).unwrap();
        assert_eq!(m.permissions().mode() & 0o7777, 0o600);
        assert_eq!(
            m.modified().unwrap(),
            std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000)
        );
        for evil in ["../escaped", "/tmp/absolute-escape", "base/../../escaped2"] {
            let err = extract(
                &one_file_tar(evil, b"x", 0o600, 0)[..],
                &dest,
                Some(&[]),
                Mode::default(),
            )
            .unwrap_err();
            assert!(
                format!("{err:#}").contains("outside the target directory"),
                "{evil}: {err:#}"
            );
        }
        // A link planted by the archive does not carry a later file outside.
        let outside = tmp.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        let mut link = tar::Header::new_gnu();
        link.set_entry_type(tar::EntryType::Symlink);
        link.set_path("base/sneaky").unwrap();
        link.set_link_name(&outside).unwrap();
        link.set_size(0);
        link.set_cksum();
        let mut archive = link.as_bytes().to_vec();
        archive.extend(one_file_tar("base/sneaky/evil", b"x", 0o600, 0));
        // The link is not recreated, so the file lands inside, in a directory of that name.
        extract(&archive[..], &dest, Some(&[]), Mode::default()).unwrap();
        assert!(!outside.join("evil").exists());
        assert!(
            std::fs::symlink_metadata(dest.join("base/sneaky"))
                .unwrap()
                .is_dir()
        );
        assert!(!tmp.path().join("escaped").exists());
        assert!(!tmp.path().join("escaped2").exists());
        assert!(!Path::new("/tmp/absolute-escape").exists());
    }

    /// An archive of one entry of `kind` (a link to `link`, or a file of `mode`).
    fn entry_tar(name: &str, kind: tar::EntryType, link: Option<&str>, mode: u32) -> Vec<u8> {
        let mut h = tar::Header::new_gnu();
        h.set_path(name).unwrap();
        h.set_entry_type(kind);
        if let Some(l) = link {
            h.set_link_name(l).unwrap();
        }
        h.set_mode(mode);
        h.set_size(0);
        h.set_cksum();
        let mut out = h.as_bytes().to_vec();
        out.resize(out.len() + 1024, 0);
        out
    }

    #[test]
    fn a_forged_archive_restores_nothing_but_files_directories_and_its_tablespace_links() {
        use std::os::unix::fs::PermissionsExt;
        use tar::EntryType;
        let tmp = tempfile::tempdir().unwrap();
        let dest = tmp.path().join("data");
        std::fs::create_dir(&dest).unwrap();
        let outside = tmp.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        let o = outside.to_str().unwrap();
        // Links in the data directory are never recreated (Postgres backs up a `log` link, say).
        for (name, link) in [("pg_wal", o), ("global/pg_control", "/etc/passwd")] {
            let tar = entry_tar(name, EntryType::Symlink, Some(link), 0o777);
            extract(&tar[..], &dest, Some(&[]), Mode::default()).unwrap();
            assert!(
                std::fs::symlink_metadata(dest.join(name)).is_err(),
                "{name}"
            );
        }
        for (name, kind, link) in [
            // The names restore itself writes, planted as links out of the target.
            (".backup_manifest.pgkeep-tmp", EntryType::Symlink, Some(o)),
            (".pgkeep-restore-in-progress", EntryType::Regular, None),
            (".pgkeep-PG_VERSION", EntryType::Regular, None),
            ("base/1/2", EntryType::Link, Some("/etc/passwd")),
            ("dev", EntryType::Char, None),
            ("fifo", EntryType::Fifo, None),
            // A tablespace link the backup's metadata does not name.
            ("pg_tblspc/99999", EntryType::Symlink, Some(o)),
        ] {
            let err = extract(
                &entry_tar(name, kind, link, 0o777)[..],
                &dest,
                Some(&[]),
                Mode::default(),
            )
            .unwrap_err();
            assert!(format!("{err:#}").contains("refusing"), "{name}: {err:#}");
        }
        assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);
        assert!(std::fs::symlink_metadata(dest.join("pg_wal")).is_err());
        // Setuid, setgid, sticky and world bits are not restored.
        extract(
            &one_file_tar("suid", b"x", 0o7777, 0)[..],
            &dest,
            Some(&[]),
            Mode::default(),
        )
        .unwrap();
        let mode = std::fs::metadata(dest.join("suid"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o7777, 0o770);
        let dir = entry_tar("base/7", EntryType::Directory, None, 0o7777);
        extract(&dir[..], &dest, Some(&[]), Mode::default()).unwrap();
        let mode = std::fs::metadata(dest.join("base/7"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o7777, 0o770);
        // A tablespace the metadata names is linked where the metadata (as mapped) says, whatever
        // the archive's link says.
        let ts = tmp.path().join("ts");
        let link = entry_tar("pg_tblspc/16385", EntryType::Symlink, Some("/etc"), 0o777);
        extract(
            &link[..],
            &dest,
            Some(&[(16385, ts.clone())]),
            Mode::default(),
        )
        .unwrap();
        assert_eq!(
            std::fs::read_link(dest.join("pg_tblspc/16385")).unwrap(),
            ts
        );
        // A tablespace's own archive holds no links at all: refused.
        std::fs::create_dir(&ts).unwrap();
        let err = extract(&link[..], &ts, None, Mode::default()).unwrap_err();
        assert!(format!("{err:#}").contains("refusing"), "{err:#}");
    }

    #[test]
    fn an_incremental_entry_never_rebuilds_the_restores_own_files() {
        let tmp = tempfile::tempdir().unwrap();
        let dest = tmp.path().join("data");
        std::fs::create_dir(&dest).unwrap();
        std::fs::write(dest.join(super::super::MARKER), b"[]").unwrap();
        let mode = Mode {
            incremental: true,
            other_links_skipped: false,
        };
        for name in [
            "INCREMENTAL..pgkeep-restore-in-progress",
            "INCREMENTAL..pgkeep-PG_VERSION",
            "base/INCREMENTAL.x.pgkeep-tmp",
        ] {
            let err = extract(
                &one_file_tar(name, &[0; 12], 0o600, 0)[..],
                &dest,
                Some(&[]),
                mode,
            )
            .unwrap_err();
            assert!(format!("{err:#}").contains("refusing"), "{name}: {err:#}");
        }
        assert_eq!(
            std::fs::read(dest.join(super::super::MARKER)).unwrap(),
            b"[]"
        );
    }
}
