//! The restore's file-writing primitives, shared by the unpacking of archives (`unpack`) and
//! the writing of a delta's referenced files (`references`): a stored chunk fetched and checked,
//! the ordered fetch-to-writer pump, the path checks (plain relative paths, never the restore's
//! own names, never through a link out of the target), and file creation with its mode and time.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use futures::StreamExt;

use crate::progress::Progress;

/// A chunk of a backup, checked: the object's own header checksum was verified against the
/// content; it must also be the checksum the metadata recorded for this chunk (a swapped chunk is
/// caught).
pub(super) async fn fetch_chunk(
    repo: &crate::storage::Repo,
    key: &object_store::path::Path,
    chunk: &crate::storage::ChunkMeta,
) -> anyhow::Result<Vec<u8>> {
    let (header, data) = repo.get_with_header(key).await?;
    if header.plain_len != chunk.plain_len || hex::encode(header.checksum) != chunk.sha256 {
        bail!("{key}: does not match the checksum recorded in the backup's metadata");
    }
    Ok(data)
}

/// Sends what `fetches` yields, in order, to `tx` (each counted on `progress` by `len`) until it
/// ends, the receiver stops, or a fetch fails; returns that failure. `tx` is dropped on return, so
/// the receiver sees the end.
pub(super) async fn pump<T>(
    fetches: impl futures::Stream<Item = anyhow::Result<T>>,
    tx: tokio::sync::mpsc::Sender<T>,
    progress: &mut Progress,
    len: impl Fn(&T) -> u64,
) -> Option<anyhow::Error> {
    futures::pin_mut!(fetches);
    while let Some(r) = fetches.next().await {
        match r {
            Ok(item) => {
                let n = len(&item);
                if tx.send(item).await.is_err() {
                    return None;
                }
                progress.add(n);
            }
            Err(e) => return Some(e),
        }
    }
    None
}

/// Whether `path` (relative, in an archive or file index) is a name the restore writes itself: its
/// marker and the held-back PG_VERSION at the top of the data directory (`data_dir`), a temporary
/// file anywhere.
pub(super) fn restores_own_name(path: &Path, data_dir: bool) -> bool {
    data_dir
        && path
            .to_str()
            .is_some_and(|p| p == super::MARKER || p == super::target::HELD_PG_VERSION)
        || path
            .file_name()
            .is_some_and(|n| n.to_string_lossy().ends_with(".pgkeep-tmp"))
}

/// Mode bits a restored file or directory may keep: the owner's and the group's.
pub(super) const MODE_MASK: u32 = 0o770;

/// A path of the archive as a plain relative path: `.` parts dropped (Postgres writes
/// `./pg_wal/...`), `..` or a root refused, not empty.
pub(super) fn relative(path: &Path) -> anyhow::Result<PathBuf> {
    use std::path::Component;
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Normal(p) => out.push(p),
            Component::CurDir => {}
            _ => bail!(
                "refusing the archive entry {} outside the target directory",
                path.display()
            ),
        }
    }
    if out.as_os_str().is_empty() {
        bail!("refusing the archive entry {:?}: an empty path", path);
    }
    Ok(out)
}

/// Whether a directory lies inside the target once symlinks are resolved (a link an archive
/// planted must not carry a later file outside, as the tar crate's own unpack also checks). Files
/// come grouped by directory, so the last directory checked is remembered.
pub(super) struct InsideCheck {
    root: PathBuf,
    last_ok: Option<PathBuf>,
}

impl InsideCheck {
    pub(super) fn new(dest: &Path) -> anyhow::Result<InsideCheck> {
        let root = dest
            .canonicalize()
            .with_context(|| format!("resolving {}", dest.display()))?;
        Ok(InsideCheck {
            root,
            last_ok: None,
        })
    }

    pub(super) fn check(&mut self, dir: &Path) -> anyhow::Result<()> {
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

/// Creates (or truncates) the file `path` below `dest` to restore into: its directories made, and
/// inside `dest`; the file itself never a symlink followed.
pub(super) fn create_restored(
    dest: &Path,
    path: &Path,
    mode: u32,
    inside: &mut InsideCheck,
) -> anyhow::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let target = dest.join(path);
    if let Some(parent) = target.parent() {
        std::fs::create_dir_all(parent)?;
        inside.check(parent)?;
    }
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&target)
        .with_context(|| format!("creating {}", target.display()))
}

/// The mode as recorded (creation applied the umask) and the recorded modification time, on a
/// restored file.
pub(super) fn set_mode_and_time(
    f: &std::fs::File,
    mode: u32,
    mtime: Option<u64>,
) -> anyhow::Result<()> {
    f.set_permissions(std::fs::Permissions::from_mode(mode))?;
    if let Some(t) =
        mtime.and_then(|m| std::time::UNIX_EPOCH.checked_add(std::time::Duration::from_secs(m)))
    {
        f.set_modified(t)?;
    }
    Ok(())
}
