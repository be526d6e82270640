//! `pgkeep restore`, the init container: chooses a base backup, downloads, verifies and unpacks it in
//! parallel into an empty data directory, and writes the recovery settings. Safe to run on every pod
//! start: a directory that already holds a cluster is left alone, and an interrupted restore (its
//! marker is written first and removed last) is redone.

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, anyhow, bail};
use chrono::{DateTime, FixedOffset, Utc};
use futures::StreamExt;

use crate::backup::{self, ArchiveMeta, BackupMeta};
use crate::cluster;
use crate::config::{Config, StorageUrl};
use crate::fsutil;
use crate::pg::walheader;
use crate::pg::{Lsn, WalFileName};
use crate::progress::{Progress, human_bytes};
use crate::storage::layout::BackupId;
use crate::storage::{ClusterLayout, Repo, StorageError};

/// Written into the target directory before anything else and removed after everything else.
pub const MARKER: &str = ".pgkeep-restore-in-progress";

/// Which backup to restore.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackupChoice {
    Latest,
    Id(BackupId),
}

/// Where recovery stops.
#[derive(Debug, Clone, PartialEq)]
pub enum RecoveryTarget {
    Time {
        at: DateTime<FixedOffset>,
        text: String,
    },
    Lsn(Lsn),
    Xid(String),
    Name(String),
}

impl RecoveryTarget {
    /// Parses a recovery target time. A time zone is required: without one Postgres would read it in
    /// the server's zone, which pgkeep cannot know when it chooses the backup.
    pub fn parse_time(text: &str) -> anyhow::Result<RecoveryTarget> {
        let t = text.trim();
        let at = DateTime::parse_from_rfc3339(t)
            .or_else(|_| DateTime::parse_from_str(t, "%Y-%m-%d %H:%M:%S%.f%#z"))
            .or_else(|_| DateTime::parse_from_str(t, "%Y-%m-%d %H:%M:%S%.f %#z"))
            .map_err(|_| {
                anyhow!("--target-time {t:?}: expected a time with a time zone, like 2026-11-21 23:45:00+00 or 2026-11-21T23:45:00Z")
            })?;
        Ok(RecoveryTarget::Time {
            at,
            text: t.to_string(),
        })
    }

    pub fn parse_xid(text: &str) -> anyhow::Result<RecoveryTarget> {
        text.trim()
            .parse::<u64>()
            .map(|x| RecoveryTarget::Xid(x.to_string()))
            .map_err(|_| {
                anyhow!("--target-xid {text:?}: expected a transaction id (a whole number)")
            })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetAction {
    Promote,
    Pause,
    Shutdown,
}

#[derive(Debug, Clone)]
pub struct RestoreOptions {
    pub target_dir: PathBuf,
    pub backup: BackupChoice,
    pub target: Option<RecoveryTarget>,
    pub target_action: TargetAction,
    pub standby: bool,
    pub overwrite: bool,
    pub require_backup: bool,
    /// Tablespace locations to move: (old, new).
    pub tablespace_map: Vec<(PathBuf, PathBuf)>,
    /// The pgkeep that restore_command runs (default: this executable).
    pub pgkeep_path: Option<PathBuf>,
}

#[derive(Debug)]
pub enum RestoreOutcome {
    /// The directory already holds a cluster; nothing was done.
    AlreadyACluster,
    /// Storage holds no backup; nothing was done.
    NoBackup,
    Restored(Box<BackupMeta>),
}

/// What the target directory holds before we start.
enum TargetState {
    Empty,
    Interrupted,
    Cluster,
    Other,
}

fn inspect(dir: &Path) -> anyhow::Result<TargetState> {
    if dir.join(MARKER).exists() {
        return Ok(TargetState::Interrupted);
    }
    if dir.join("PG_VERSION").exists() {
        return Ok(TargetState::Cluster);
    }
    let mut entries =
        std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))?;
    // A fresh volume often holds lost+found, which is not ours to judge.
    if entries.any(|e| e.map(|e| e.file_name() != "lost+found").unwrap_or(true)) {
        return Ok(TargetState::Other);
    }
    Ok(TargetState::Empty)
}

/// Restores a backup into `opts.target_dir`.
pub async fn restore(cfg: &Config, opts: &RestoreOptions) -> anyhow::Result<RestoreOutcome> {
    let dir = &opts.target_dir;
    if !dir.is_absolute() {
        bail!(
            "the target directory {} must be an absolute path",
            dir.display()
        );
    }
    if !dir.exists() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let state = inspect(dir)?;
    match state {
        TargetState::Cluster if !opts.overwrite => {
            tracing::info!(dir = %dir.display(), "the target directory already holds a cluster (PG_VERSION); leaving it alone");
            return Ok(RestoreOutcome::AlreadyACluster);
        }
        TargetState::Cluster | TargetState::Other
            if opts.overwrite && dir.join("postmaster.pid").exists() =>
        {
            bail!(
                "{} has a postmaster.pid: a server may be running there; stop it (or remove the stale file) before --overwrite",
                dir.display()
            )
        }
        TargetState::Other if !opts.overwrite => bail!(
            "{} is not empty and holds no cluster: refusing to write into it (--overwrite replaces its contents)",
            dir.display()
        ),
        TargetState::Interrupted => {
            tracing::warn!(dir = %dir.display(), "an earlier restore into this directory was interrupted; redoing it")
        }
        _ => {}
    }

    let repo = match (Repo::open(cfg, false), &cfg.storage) {
        (Ok(r), _) => Some(r),
        // A file:// archive that was never written holds no backup.
        (Err(StorageError::Setup { .. }), StorageUrl::File { root }) if !root.exists() => None,
        (Err(e), _) => return Err(e.into()),
    };
    let chosen = match repo {
        Some(repo) => choose_backup(cfg, &repo, opts)
            .await?
            .map(|(m, c)| (repo, m, c)),
        None => None,
    };
    let Some((repo, meta, cluster)) = chosen else {
        if opts.require_backup {
            bail!(
                "storage {} holds no base backup to restore (--require-backup)",
                cfg.storage
            );
        }
        tracing::info!(storage = %cfg.storage, "storage holds no base backup: nothing to restore; Postgres may initialise a new cluster");
        return Ok(RestoreOutcome::NoBackup);
    };
    let missing = backup::missing_wal(&repo, &cluster, &meta.required_wal()).await?;
    if !missing.is_empty() {
        bail!(
            "backup {} cannot be restored: the WAL it needs is not in storage (missing {})",
            meta.id,
            missing
                .iter()
                .map(|n| n.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }

    let started = Instant::now();
    let map = Arc::new(opts.tablespace_map.clone());
    // Every tablespace directory is checked before anything is written: one that holds data we did
    // not write (say, the live cluster's own tablespace) is refused, never cleared.
    let earlier = match state {
        TargetState::Interrupted => read_marker(dir),
        _ => Marker::default(),
    };
    let mut tablespace_dirs = vec![];
    for loc in meta.archives.iter().filter_map(|a| a.location.as_deref()) {
        let dest = map_location(&map, Path::new(loc));
        let ours = opts.overwrite || earlier.tablespace_dirs.contains(&dest);
        if !ours && dest.exists() && std::fs::read_dir(&dest)?.next().is_some() {
            bail!(
                "the tablespace directory {} is not empty: refusing to write into it (restore it elsewhere \
                 with --tablespace-map {}=NEW, or replace it with --overwrite)",
                dest.display(),
                loc
            );
        }
        tablespace_dirs.push(dest);
    }
    // The marker goes first: from here on, an interruption is detected and the restore redone. It
    // names the tablespace directories this restore writes, so a redo may clear them.
    let marker = Marker {
        backup: meta.id.to_string(),
        tablespace_dirs: tablespace_dirs.clone(),
    };
    fsutil::write_atomic(
        &dir.join(MARKER),
        &serde_json::to_vec(&marker).expect("serialisable"),
    )
    .context("writing the restore marker")?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("setting the permissions of {}", dir.display()))?;
    if !matches!(state, TargetState::Empty) {
        clear_dir(dir, &[MARKER, "lost+found"])?;
    }
    for d in &tablespace_dirs {
        if d.exists() {
            clear_dir(d, &[])?;
        } else {
            std::fs::create_dir_all(d)
                .with_context(|| format!("creating the tablespace directory {}", d.display()))?;
        }
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o700))?;
    }
    let total: u64 = meta.archives.iter().map(|a| a.plain_bytes).sum();
    let mut progress = Progress::new("restore", Some(total));
    for archive in &meta.archives {
        let dest = match &archive.location {
            None => dir.clone(),
            Some(loc) => map_location(&map, Path::new(loc)),
        };
        unpack_archive(
            &repo,
            &cluster,
            &meta,
            archive,
            dest,
            map.clone(),
            cfg.parallelism,
            &mut progress,
        )
        .await?;
    }
    let took = progress.finish();

    // The manifest, so pg_verifybackup can check the result.
    let manifest = repo.get(&cluster.backup_manifest(&meta.id)).await?;
    if hex::encode(
        crate::storage::object::Header::for_content(crate::codec::Codec::None, &manifest)
            .plain_sha256,
    ) != meta.manifest_sha256
    {
        bail!(
            "{}: does not match the checksum recorded in the backup's metadata",
            cluster.backup_manifest(&meta.id)
        );
    }
    fsutil::write_atomic(&dir.join("backup_manifest"), &manifest)?;
    // The WAL from the backup's start to its end, so the directory is consistent by itself.
    let pg_wal = dir.join("pg_wal");
    std::fs::create_dir_all(&pg_wal)?;
    for name in meta.required_wal() {
        fetch_segment(
            &repo,
            &cluster,
            &meta,
            &name,
            &pg_wal.join(name.to_string()),
        )
        .await?;
    }
    write_recovery_settings(cfg, opts, &meta, dir)?;
    for d in std::iter::once(dir).chain(tablespace_dirs.iter()) {
        fsutil::syncfs(d).with_context(|| format!("syncfs {}", d.display()))?;
    }
    std::fs::remove_file(dir.join(MARKER)).context("removing the restore marker")?;
    std::fs::File::open(dir)?.sync_all()?;
    tracing::info!(
        backup = %meta.id,
        dir = %dir.display(),
        size = %human_bytes(total),
        seconds = took.as_secs_f64(),
        mb_per_s = total as f64 / 1048576.0 / took.as_secs_f64().max(0.001),
        total_seconds = started.elapsed().as_secs_f64(),
        "restored; start Postgres to recover"
    );
    Ok(RestoreOutcome::Restored(Box::new(meta)))
}

/// Finds the backup to restore; None when storage holds none.
async fn choose_backup(
    cfg: &Config,
    repo: &Repo,
    opts: &RestoreOptions,
) -> anyhow::Result<Option<(BackupMeta, ClusterLayout)>> {
    match repo.check_format().await {
        Ok(()) => {}
        Err(StorageError::Setup { .. })
            if !repo
                .exists(&crate::storage::layout::format_marker())
                .await? =>
        {
            return Ok(None);
        }
        Err(e) => return Err(e.into()),
    }
    let system_identifier = match cfg.system_identifier {
        Some(id) => id,
        None => match repo.clusters().await?.len() {
            0 => return Ok(None),
            _ => cluster::resolve_from_storage(repo).await?,
        },
    };
    let cluster = ClusterLayout::new(system_identifier);
    let backups = backup::list_backups(repo, &cluster).await?;
    if backups.is_empty() {
        return Ok(None);
    }
    let chosen = match (&opts.backup, &opts.target) {
        (BackupChoice::Id(id), _) => backups.iter().find(|b| b.id == *id).ok_or_else(|| {
            anyhow!(
                "there is no backup {id}; the backups are: {}",
                backups
                    .iter()
                    .map(|b| b.id.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })?,
        (BackupChoice::Latest, None) => &backups[0],
        (BackupChoice::Latest, Some(RecoveryTarget::Time { at, text })) => backups
            .iter()
            .find(|b| b.end_time <= at.with_timezone(&Utc))
            .ok_or_else(|| {
                anyhow!(
                    "no backup ended before {text}; the oldest ended at {}",
                    backups.last().unwrap().end_time
                )
            })?,
        (BackupChoice::Latest, Some(RecoveryTarget::Lsn(l))) => {
            backups.iter().find(|b| b.end() <= *l).ok_or_else(|| {
                anyhow!(
                    "no backup ended before LSN {l}; the oldest ended at {}",
                    backups.last().unwrap().end_lsn
                )
            })?
        }
        (BackupChoice::Latest, Some(t)) => {
            tracing::info!(
                "the backups' metadata cannot tell which of them precede {t:?}: using the latest; \
                 if recovery cannot reach the target, choose an older one with --backup"
            );
            &backups[0]
        }
    };
    tracing::info!(backup = %chosen.id, end_lsn = %chosen.end_lsn, end_time = %chosen.end_time, "chosen backup");
    Ok(Some((chosen.clone(), cluster)))
}

fn map_location(map: &[(PathBuf, PathBuf)], loc: &Path) -> PathBuf {
    map.iter()
        .find(|(old, _)| old == loc)
        .map(|(_, new)| new.clone())
        .unwrap_or_else(|| loc.to_path_buf())
}

/// What the marker file records.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct Marker {
    backup: String,
    tablespace_dirs: Vec<PathBuf>,
}

/// The marker of an interrupted restore (an unreadable one names no tablespace directory).
fn read_marker(dir: &Path) -> Marker {
    std::fs::read(dir.join(MARKER))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

/// Removes everything in `dir` except the names in `keep`.
fn clear_dir(dir: &Path, keep: &[&str]) -> anyhow::Result<()> {
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        if keep.iter().any(|k| e.file_name() == *k) {
            continue;
        }
        let p = e.path();
        let ft = e.file_type()?;
        if ft.is_dir() {
            std::fs::remove_dir_all(&p)
        } else {
            std::fs::remove_file(&p)
        }
        .with_context(|| format!("removing {}", p.display()))?;
    }
    Ok(())
}

/// Feeds decoded chunks, in order, to the blocking tar reader.
struct ChunkReader {
    rx: tokio::sync::mpsc::Receiver<Vec<u8>>,
    cur: Vec<u8>,
    pos: usize,
}

impl Read for ChunkReader {
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

/// Downloads and verifies `archive`'s chunks, `parallelism` at a time, and unpacks them in order.
#[allow(clippy::too_many_arguments)]
async fn unpack_archive(
    repo: &Repo,
    cluster: &ClusterLayout,
    meta: &BackupMeta,
    archive: &ArchiveMeta,
    dest: PathBuf,
    map: Arc<Vec<(PathBuf, PathBuf)>>,
    parallelism: usize,
    progress: &mut Progress,
) -> anyhow::Result<()> {
    let (tx, rx) = tokio::sync::mpsc::channel::<Vec<u8>>(1);
    let is_base = archive.name.tablespace_oid().is_none();
    let extractor = tokio::task::spawn_blocking(move || {
        extract(
            ChunkReader {
                rx,
                cur: vec![],
                pos: 0,
            },
            &dest,
            is_base,
            &map,
        )
    });
    let fetches = archive.chunks.iter().enumerate().map(|(seq, chunk)| {
        let key = cluster.backup_chunk(&meta.id, &archive.name, seq);
        let repo = repo.clone();
        async move {
            // The object's own header checksum was verified against the content; it must also be the
            // checksum the metadata recorded for this chunk (a chunk swapped for another is caught).
            let (header, data) = repo.get_with_header(&key).await?;
            if header.plain_len != chunk.plain_len
                || hex::encode(header.plain_sha256) != chunk.sha256
            {
                bail!("{key}: does not match the checksum recorded in the backup's metadata");
            }
            Ok::<_, anyhow::Error>(data)
        }
    });
    let mut stream = futures::stream::iter(fetches).buffered(parallelism.max(1));
    let mut failure = None;
    while let Some(r) = stream.next().await {
        match r {
            Ok(data) => {
                let n = data.len() as u64;
                if tx.send(data).await.is_err() {
                    break; // the extractor stopped: its error says why
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
    let extracted = extractor.await.context("the unpacking task")?;
    if let Some(e) = failure {
        return Err(e.context(format!("restoring backup {}", meta.id)));
    }
    extracted.with_context(|| {
        format!(
            "unpacking {} of backup {}",
            String::from(archive.name.clone()),
            meta.id
        )
    })
}

/// Unpacks one tar stream into `dest`. In the data directory's archive, tablespace links
/// (`pg_tblspc/<oid>`) are recreated pointing at their (mapped) locations.
fn extract(
    reader: impl Read,
    dest: &Path,
    is_base: bool,
    map: &[(PathBuf, PathBuf)],
) -> anyhow::Result<()> {
    let mut ar = tar::Archive::new(reader);
    ar.set_preserve_permissions(true);
    ar.set_preserve_mtime(true);
    ar.set_unpack_xattrs(false);
    ar.set_overwrite(true);
    let mut buf = vec![0u8; WRITE_PIECE];
    let mut inside = InsideCheck::new(dest)?;
    for entry in ar.entries()? {
        let mut e = entry?;
        let path = e.path()?.into_owned();
        if is_base && e.header().entry_type().is_symlink() && path.starts_with("pg_tblspc") {
            let oid = path
                .strip_prefix("pg_tblspc")
                .ok()
                .and_then(|p| p.to_str())
                .unwrap_or("");
            if oid.is_empty() || !oid.bytes().all(|b| b.is_ascii_digit()) {
                bail!(
                    "unexpected tablespace link {} in the backup",
                    path.display()
                );
            }
            let target = e
                .link_name()?
                .ok_or_else(|| anyhow!("tablespace link {} has no target", path.display()))?
                .into_owned();
            // Postgres names the entry `pg_tblspc/<oid>/`; a trailing slash would make symlink() fail.
            let link = dest.join("pg_tblspc").join(oid);
            std::fs::create_dir_all(link.parent().expect("has a parent"))?;
            let _ = std::fs::remove_file(&link);
            std::os::unix::fs::symlink(map_location(map, &target), &link)
                .with_context(|| format!("creating the tablespace link {}", link.display()))?;
            continue;
        }
        if e.header().entry_type().is_file() {
            write_file(&mut e, dest, &path, &mut buf, &mut inside)
                .with_context(|| format!("unpacking {}", path.display()))?;
            continue;
        }
        if !e
            .unpack_in(dest)
            .with_context(|| format!("unpacking {}", path.display()))?
        {
            bail!(
                "refusing the archive entry {} outside the target directory",
                path.display()
            );
        }
    }
    Ok(())
}

/// Files are written in pieces this large, and each piece's writeback is started at once.
const WRITE_PIECE: usize = 4 << 20;

/// Whether a directory lies inside the target once symlinks are resolved (a link an archive
/// planted must not carry a later file outside, as the tar crate's own unpack also checks). Files
/// come grouped by directory, so the last directory checked is remembered.
struct InsideCheck {
    root: PathBuf,
    last_ok: Option<PathBuf>,
}

impl InsideCheck {
    fn new(dest: &Path) -> anyhow::Result<InsideCheck> {
        let root = dest
            .canonicalize()
            .with_context(|| format!("resolving {}", dest.display()))?;
        Ok(InsideCheck {
            root,
            last_ok: None,
        })
    }

    fn check(&mut self, dir: &Path) -> anyhow::Result<()> {
        if self.last_ok.as_deref() == Some(dir) {
            return Ok(());
        }
        if !dir.canonicalize()?.starts_with(&self.root) {
            bail!("{} leads outside the target directory", dir.display());
        }
        self.last_ok = Some(dir.to_path_buf());
        Ok(())
    }
}

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
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    use std::os::unix::io::AsRawFd;
    if path.as_os_str().is_empty()
        || !path
            .components()
            .all(|c| matches!(c, std::path::Component::Normal(_)))
    {
        bail!(
            "refusing the archive entry {} outside the target directory",
            path.display()
        );
    }
    let target = dest.join(path);
    if let Some(parent) = target.parent() {
        std::fs::create_dir_all(parent)?;
        inside.check(parent)?;
    }
    let mode = e.header().mode().unwrap_or(0o600) & 0o7777;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&target)?;
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
    // The mode as recorded (creation applied the umask), and the recorded modification time.
    f.set_permissions(std::fs::Permissions::from_mode(mode))?;
    if let Ok(mtime) = e.header().mtime() {
        f.set_modified(std::time::UNIX_EPOCH + std::time::Duration::from_secs(mtime))?;
    }
    Ok(())
}

/// Asks the kernel to start writing a file range to disk, without waiting. Advisory: durability
/// comes from the syncfs before the restore reports success, so a failure here changes nothing.
fn start_writeback(fd: std::os::unix::io::RawFd, offset: i64, len: i64) {
    // SAFETY: sync_file_range only reads its integer arguments; `fd` is open for the call.
    unsafe {
        libc::sync_file_range(fd, offset, len, libc::SYNC_FILE_RANGE_WRITE);
    }
}

/// Downloads one of the backup's WAL segments into pg_wal, verified.
async fn fetch_segment(
    repo: &Repo,
    cluster: &ClusterLayout,
    meta: &BackupMeta,
    name: &WalFileName,
    dest: &Path,
) -> anyhow::Result<()> {
    let data = repo.get(&cluster.wal(name)).await?;
    let sysid: u64 = meta.system_identifier.parse()?;
    walheader::check_segment(name, &data, Some(sysid))?;
    // No fsync of its own: the restore syncs the whole file system before removing its marker.
    std::fs::write(dest, &data).with_context(|| format!("writing {}", dest.display()))?;
    Ok(())
}

/// Quotes a word for the shell `restore_command` runs in.
fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_./:=@,+-%".contains(&b))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// A value in postgresql.conf quotes.
fn guc_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// The restore_command that fetches through pgkeep with the same configuration this restore used.
/// The Postgres connection (`PGKEEP_PG`, which may hold a password) is left out: wal-fetch does not
/// connect to Postgres, and postgresql.auto.conf and Postgres' log must not hold a secret.
pub fn restore_command(cfg: &Config, pgkeep: &Path) -> String {
    let mut words: Vec<String> = cfg
        .env_settings
        .iter()
        .filter(|(k, _)| k != "PGKEEP_PGDATA" && k != "PGKEEP_PG")
        .map(|(k, v)| format!("{k}={}", shell_quote(v)))
        .collect();
    words.push(shell_quote(&pgkeep.to_string_lossy()));
    if let Some(f) = &cfg.file {
        words.push("--config".into());
        words.push(shell_quote(&f.to_string_lossy()));
    }
    words.push("wal-fetch %f %p".into());
    words.join(" ")
}

fn write_recovery_settings(
    cfg: &Config,
    opts: &RestoreOptions,
    meta: &BackupMeta,
    dir: &Path,
) -> anyhow::Result<()> {
    let pgkeep = match &opts.pgkeep_path {
        Some(p) => p.clone(),
        None => std::env::current_exe().context("finding the pgkeep executable")?,
    };
    let mut conf = format!(
        "\n# Added by pgkeep restore of backup {} at {}\nrestore_command = {}\nrecovery_target_timeline = 'latest'\n",
        meta.id,
        Utc::now().to_rfc3339(),
        guc_quote(&restore_command(cfg, &pgkeep))
    );
    if let Some(t) = &opts.target {
        let (key, value) = match t {
            RecoveryTarget::Time { text, .. } => ("recovery_target_time", text.clone()),
            RecoveryTarget::Lsn(l) => ("recovery_target_lsn", l.to_string()),
            RecoveryTarget::Xid(x) => ("recovery_target_xid", x.clone()),
            RecoveryTarget::Name(n) => ("recovery_target_name", n.clone()),
        };
        let action = match opts.target_action {
            TargetAction::Promote => "promote",
            TargetAction::Pause => "pause",
            TargetAction::Shutdown => "shutdown",
        };
        conf.push_str(&format!(
            "{key} = {}\nrecovery_target_action = '{action}'\n",
            guc_quote(&value)
        ));
    }
    let auto = dir.join("postgresql.auto.conf");
    // The backup's own ALTER SYSTEM settings stay: only a missing file starts empty.
    let mut text = match std::fs::read_to_string(&auto) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e).with_context(|| format!("reading {}", auto.display())),
    };
    text.push_str(&conf);
    fsutil::write_atomic(&auto, text.as_bytes())?;
    let signal = if opts.standby {
        "standby.signal"
    } else {
        "recovery.signal"
    };
    fsutil::write_atomic(&dir.join(signal), b"")?;
    Ok(())
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
        extract(&tar[..], &dest, true, &[]).unwrap();
        let f = dest.join("base/1/1259");
        assert_eq!(std::fs::read(&f).unwrap(), big);
        let m = std::fs::metadata(&f).unwrap();
        assert_eq!(m.permissions().mode() & 0o7777, 0o600);
        assert_eq!(
            m.modified().unwrap(),
            std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000)
        );
        for evil in ["../escaped", "/tmp/absolute-escape", "base/../../escaped2"] {
            let err =
                extract(&one_file_tar(evil, b"x", 0o600, 0)[..], &dest, true, &[]).unwrap_err();
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
        let err = extract(&archive[..], &dest, true, &[]).unwrap_err();
        assert!(
            format!("{err:#}").contains("outside the target directory"),
            "{err:#}"
        );
        assert!(!outside.join("evil").exists());
        assert!(!tmp.path().join("escaped").exists());
        assert!(!tmp.path().join("escaped2").exists());
        assert!(!Path::new("/tmp/absolute-escape").exists());
    }

    #[test]
    fn recovery_target_times_need_a_zone() {
        for ok in [
            "2026-11-21 23:45:00+00",
            "2026-11-21 23:45:00.123456+00",
            "2026-11-21T23:45:00Z",
            "2026-11-21 23:45:00+05:30",
        ] {
            assert!(RecoveryTarget::parse_time(ok).is_ok(), "{ok}");
        }
        for bad in ["2026-11-21 23:45:00", "yesterday", ""] {
            assert!(RecoveryTarget::parse_time(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn restore_command_carries_the_settings_but_no_secret() {
        let env = [
            ("PGKEEP_STORAGE", "s3://bucket/with space"),
            ("PGKEEP_PG", "host=db password=hunter2"),
            ("PGKEEP_PGDATA", "/pgdata"),
            ("PGKEEP_LISTEN", "127.0.0.1:16001"),
        ];
        let cfg = Config::load(
            None,
            env.iter().map(|(k, v)| (k.to_string(), v.to_string())),
        )
        .unwrap();
        let cmd = restore_command(&cfg, Path::new("/usr/local/bin/pgkeep"));
        assert_eq!(
            cmd,
            "PGKEEP_STORAGE='s3://bucket/with space' PGKEEP_LISTEN=127.0.0.1:16001 /usr/local/bin/pgkeep wal-fetch %f %p"
        );
        assert!(!cmd.contains("hunter2"));
    }

    #[test]
    fn shell_and_guc_quoting() {
        assert_eq!(shell_quote("/usr/bin/pgkeep"), "/usr/bin/pgkeep");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), "'it'\\''s'");
        assert_eq!(guc_quote("it's"), "'it''s'");
    }
}
