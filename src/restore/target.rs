//! The target directory: what it holds before a restore, the marker that makes an interrupted
//! restore detectable (written first, removed last), clearing what a restore replaces, and the
//! final sync.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

use crate::fsutil;
use crate::storage::BackupMeta;

use super::{RestoreOptions, map_location};

/// Written into the target directory before anything else and removed after everything else.
pub const MARKER: &str = ".pgkeep-restore-in-progress";

/// The backup's `PG_VERSION` is unpacked under this name and renamed only once the restore is
/// complete: whatever takes a `PG_VERSION` for a cluster (the postgres image's entrypoint) never
/// sees a half-restored one.
pub(super) const HELD_PG_VERSION: &str = ".pgkeep-PG_VERSION";

/// What the target directory holds before we start.
pub(super) enum TargetState {
    Empty,
    Interrupted,
    Cluster,
    Other,
}

pub(super) fn inspect(dir: &Path) -> anyhow::Result<TargetState> {
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

/// Creates the target directory if needed and says what it holds; `None` when it already holds a
/// cluster that the restore leaves alone. Refuses what a restore must not write into.
pub(super) fn check_target(opts: &RestoreOptions) -> anyhow::Result<Option<TargetState>> {
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
            return Ok(None);
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
    Ok(Some(state))
}

/// Checks every tablespace directory before anything is written (one that holds data we did not
/// write, say the live cluster's own tablespace, is refused, never cleared), writes the marker,
/// and clears what the restore replaces. Returns the tablespace directories it writes.
pub(super) fn prepare(
    opts: &RestoreOptions,
    state: &TargetState,
    meta: &BackupMeta,
) -> anyhow::Result<Vec<PathBuf>> {
    let dir = &opts.target_dir;
    let earlier = match state {
        TargetState::Interrupted => read_marker(dir),
        _ => Marker::default(),
    };
    let mut tablespace_dirs = vec![];
    for loc in meta.archives.iter().filter_map(|a| a.location.as_deref()) {
        let dest = map_location(&opts.tablespace_map, Path::new(loc));
        check_tablespace_dir(dir, loc, &dest)?;
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
    Ok(tablespace_dirs)
}

/// A tablespace directory the restore may write: absolute, without `.` or `..` parts, and apart
/// from the data directory (a forged backup's metadata may name any path).
fn check_tablespace_dir(dir: &Path, loc: &str, dest: &Path) -> anyhow::Result<()> {
    use std::path::Component;
    let plain = dest.is_absolute()
        && dest
            .components()
            .all(|c| matches!(c, Component::RootDir | Component::Normal(_)));
    if !plain || dest.parent().is_none() {
        bail!(
            "the backup names the tablespace location {loc:?}, which is not a plain absolute path: \
             refusing it (restore it elsewhere with --tablespace-map {loc}=NEW)"
        );
    }
    if dest.starts_with(dir) || dir.starts_with(dest) {
        bail!(
            "the tablespace directory {} overlaps the target directory {}: refusing it",
            dest.display(),
            dir.display()
        );
    }
    Ok(())
}

/// Makes everything written durable, then removes the marker: a restore that reports success
/// survives a power loss.
pub(super) fn finish(dir: &Path, tablespace_dirs: &[PathBuf]) -> anyhow::Result<()> {
    // Run as root into the database user's folder: everything restored is that user's, or
    // Postgres could not open it ("Permission denied").
    if let Some((uid, gid)) = fsutil::foreign_owner(dir) {
        for d in std::iter::once(dir).chain(tablespace_dirs.iter().map(PathBuf::as_path)) {
            let given = fsutil::give_tree(d, uid, gid)
                .with_context(|| format!("giving {} to its owner (uid {uid})", d.display()))?;
            tracing::info!(dir = %d.display(), uid, files = given, "restored as root: handed to the directory's owner");
        }
    }
    std::fs::rename(dir.join(HELD_PG_VERSION), dir.join("PG_VERSION"))
        .context("the backup holds no PG_VERSION: it is not a Postgres data directory")?;
    for d in std::iter::once(dir).chain(tablespace_dirs.iter().map(PathBuf::as_path)) {
        fsutil::syncfs(d).with_context(|| format!("syncfs {}", d.display()))?;
    }
    std::fs::remove_file(dir.join(MARKER)).context("removing the restore marker")?;
    std::fs::File::open(dir)?.sync_all()?;
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tablespace_locations_from_the_metadata_are_checked() {
        let dir = Path::new("/pgdata");
        for ok in ["/srv/ts1", "/pgdata-ts/a"] {
            check_tablespace_dir(dir, ok, Path::new(ok)).unwrap();
        }
        for bad in [
            "pg_tblspc/16385",
            "/srv/../root/.ssh",
            "/",
            "/pgdata/ts",
            "/pgdata",
        ] {
            let err = check_tablespace_dir(dir, bad, Path::new(bad)).unwrap_err();
            let msg = err.to_string();
            assert!(msg.contains("refusing"), "{bad}: {msg}");
        }
    }
}
