//! Local file helpers that keep their promises across a crash.

use std::io::Write;
use std::path::{Path, PathBuf};

/// Writes `data` to `dest` so that `dest` is either absent or complete, never partial: a temporary
/// file beside it is written and fsynced, renamed over `dest`, and the folder is fsynced. The
/// temporary file has an unpredictable name and is created new, never through a link: a link
/// planted in the folder (a forged backup's) leads nowhere.
pub fn write_atomic(dest: &Path, data: &[u8]) -> std::io::Result<()> {
    write_replacing(dest, data, true)
}

/// As [`write_atomic`]; with `durable` false nothing is fsynced: `dest` is complete under its name
/// or absent, but a crash may lose it (for files whose reader syncs what it keeps, or checks them).
pub fn write_replacing(dest: &Path, data: &[u8], durable: bool) -> std::io::Result<()> {
    let tmp = temp_beside(dest)?;
    let result = (|| {
        let mut f = create_new(&tmp)?;
        f.write_all(data)?;
        if durable {
            f.sync_all()?;
        }
        drop(f);
        std::fs::rename(&tmp, dest)?;
        if durable {
            sync_dir(parent_of(dest))?;
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// The folder `path` is in (`.` for a bare name).
fn parent_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// An unpredictable temporary name beside `dest` (`.NAME.RANDOM.pgkeep-tmp`), for a file written
/// there and then renamed over `dest`.
pub fn temp_beside(dest: &Path) -> std::io::Result<PathBuf> {
    let name = dest.file_name().ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "destination has no file name",
        )
    })?;
    Ok(parent_of(dest).join(format!(
        ".{}.{:016x}.pgkeep-tmp",
        name.to_string_lossy(),
        random_u64()
    )))
}

/// Fsyncs a directory, so that a rename or a creation in it survives a crash.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Creates `path` for writing, failing if anything (a file or a link) is there already.
pub fn create_new(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW)
        .mode(0o600)
        .open(path)
}

/// A random number from the standard library's per-process hash keys (no extra dependency).
fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    h.finish()
}

/// Flushes the whole file system holding `path` (one call instead of an fsync per file).
pub fn syncfs(path: &Path) -> std::io::Result<()> {
    let f = std::fs::File::open(path)?;
    // SAFETY: syncfs takes any open file descriptor; `f` outlives the call.
    let rc = unsafe { libc::syncfs(std::os::unix::io::AsRawFd::as_raw_fd(&f)) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The (uid, gid) that what this process writes under `dir` must be given to: the folder's
/// owner's, when this process runs as root and the folder belongs to another user (a restore or a
/// `file://` backup run by hand as root into the database user's folder); None otherwise.
pub fn foreign_owner(dir: &Path) -> Option<(u32, u32)> {
    use std::os::unix::fs::MetadataExt;
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return None;
    }
    let meta = std::fs::metadata(dir).ok()?;
    (meta.uid() != 0).then_some((meta.uid(), meta.gid()))
}

/// Gives `root` and everything below it to (uid, gid), never following a link (a link itself is
/// given, not what it points to).
pub fn give_tree(root: &Path, uid: u32, gid: u32) -> std::io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    let mut given = 0;
    let mut todo = vec![root.to_path_buf()];
    while let Some(p) = todo.pop() {
        let meta = std::fs::symlink_metadata(&p)?;
        if meta.uid() != uid || meta.gid() != gid {
            std::os::unix::fs::lchown(&p, Some(uid), Some(gid))?;
            given += 1;
        }
        if meta.is_dir() {
            for e in std::fs::read_dir(&p)? {
                todo.push(e?.path());
            }
        }
    }
    Ok(given)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_atomically_and_leaves_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("RECOVERYXLOG");
        write_atomic(&dest, b"first").unwrap();
        write_atomic(&dest, b"second").unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), b"second");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("RECOVERYXLOG")]);
    }

    #[test]
    fn a_planted_link_is_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let outside = dir.path().join("outside");
        std::fs::write(&outside, b"keep").unwrap();
        let inner = dir.path().join("inner");
        std::fs::create_dir(&inner).unwrap();
        // The temporary names an older pgkeep used, and the destination itself, as links.
        std::os::unix::fs::symlink(&outside, inner.join(".backup_manifest.pgkeep-tmp")).unwrap();
        std::os::unix::fs::symlink(&outside, inner.join("backup_manifest")).unwrap();
        write_atomic(&inner.join("backup_manifest"), b"new").unwrap();
        assert_eq!(std::fs::read(&outside).unwrap(), b"keep");
        assert_eq!(
            std::fs::read(inner.join("backup_manifest")).unwrap(),
            b"new"
        );
        assert!(create_new(&inner.join(".backup_manifest.pgkeep-tmp")).is_err());
    }

    #[test]
    fn a_failed_write_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("missing-dir").join("x");
        assert!(write_atomic(&dest, b"data").is_err());
        assert!(!dest.exists());
    }
}
