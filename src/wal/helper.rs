//! `wal-fetch`'s own prefetch, for a recovery with no daemon to prefetch (#17, item 2).
//!
//! When `wal-fetch` had to read a segment from storage itself (no daemon answered), it starts a
//! short-lived helper process (`pgkeep wal-prefetch`, in a process group of its own, so that
//! Postgres' signals to restore_command do not reach it) unless one runs already. The helper is
//! the daemon's prefetcher without the daemon: it downloads and verifies the segments after that
//! one, ahead of redo, into the hand-off directory (`prefetch_dir`), where the next `wal-fetch`
//! takes them as it takes the daemon's ([`super::handoff`]). It follows recovery by the files
//! that are taken; a `wal-fetch` that misses tells it where recovery is (a small file in the
//! directory), which also widens the window as a miss does in the daemon. It ends after
//! [`IDLE`] without a take or a miss, or once a daemon has started (its token file is not the
//! one `wal-fetch` saw),
//! and removes the files it placed that nobody took. It logs to `.pgkeep-prefetch.log` there.
//! It runs only where the directory's parent exists (it is never made up).
//!
//! One helper at a time: it holds an exclusive lock on a file in the directory for its life.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, anyhow};

use crate::config::Config;
use crate::pg::{WalFileKind, WalFileName, WalSegSize};
use crate::storage::{Archive, Repo};
use crate::wal::prefetch::{Prefetcher, WATCH_EVERY};

/// The lock a helper holds for its life.
const LOCK: &str = ".pgkeep-prefetch.lock";
/// The helper's log.
pub const LOG: &str = ".pgkeep-prefetch.log";
/// Where a `wal-fetch` that missed names the segment it fetched itself.
const ASKED: &str = ".pgkeep-asked";
/// How long a helper waits for the next take or miss before it ends.
pub const IDLE: Duration = Duration::from_secs(10);

/// After `wal-fetch` read segment `name` (of `seg_bytes`) of cluster `sysid` from storage
/// itself: starts a helper prefetching after it, or tells the running one where recovery is.
/// Best effort: any problem only means no prefetch (said at debug level).
pub fn after_storage_fetch(cfg: &Config, name: &WalFileName, sysid: u64, seg_bytes: usize) {
    if cfg.prefetch_segments == 0 || name.kind != WalFileKind::Segment {
        return;
    }
    let dir = &cfg.prefetch_dir;
    let ready = make_dir(dir).and_then(|_| match super::handoff::unusable(dir) {
        Some(why) => Err(anyhow!(why)),
        None => Ok(()),
    });
    if let Err(e) = ready {
        tracing::debug!(dir = %dir.display(), "no prefetch of wal-fetch's own: {e:#}");
        return;
    }
    match try_lock(dir) {
        // None runs (the lock is free again at once: the helper takes it).
        Ok(Some(lock)) => {
            drop(lock);
            if let Err(e) = spawn(cfg, name, sysid, seg_bytes) {
                tracing::debug!("cannot start wal-fetch's prefetch: {e:#}");
            }
        }
        Ok(None) => {
            let told = crate::fsutil::write_replacing(
                &dir.join(ASKED),
                name.to_string().as_bytes(),
                false,
            );
            if let Err(e) = told {
                tracing::debug!("cannot tell the prefetch where recovery is: {e}");
            }
        }
        Err(e) => tracing::debug!(dir = %dir.display(), "no prefetch of wal-fetch's own: {e:#}"),
    }
}

/// Creates `dir` (owner only) when missing, but not its parent: a helper runs only where its
/// directory is meant to be (the chart's shared volume, a spool that exists), never in folders
/// it would make up (the default spool of a `wal-fetch` run by hand).
fn make_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e).with_context(|| format!("creating {}", dir.display())),
    }
}

/// The helper's log: `.pgkeep-prefetch.log` in its directory, started afresh by each helper.
fn log_file(dir: &Path) -> anyhow::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join(LOG);
    std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))
}

/// The helper lock of `dir`, if no one holds it.
fn try_lock(dir: &Path) -> anyhow::Result<Option<File>> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join(LOCK);
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    // SAFETY: flock on a descriptor this function owns; no memory is involved.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(Some(f));
    }
    match std::io::Error::last_os_error() {
        e if e.raw_os_error() == Some(libc::EWOULDBLOCK) => Ok(None),
        e => Err(anyhow!("locking {}: {e}", path.display())),
    }
}

fn spawn(cfg: &Config, name: &WalFileName, sysid: u64, seg_bytes: usize) -> anyhow::Result<()> {
    use std::os::unix::process::CommandExt;
    let exe = std::env::current_exe().context("finding this program")?;
    let mut cmd = std::process::Command::new(exe);
    if let Some(file) = &cfg.file {
        cmd.arg("--config").arg(file);
    }
    cmd.args([
        "wal-prefetch",
        &name.to_string(),
        "--system-identifier",
        &sysid.to_string(),
        "--segment-bytes",
        &seg_bytes.to_string(),
        // The daemon's token as wal-fetch found it (no daemon answered): a new one is a daemon
        // that started since, however soon the helper gets going.
        "--token-stamp",
        &token_stamp(&cfg.http_token_file).to_string(),
    ])
    .stdin(std::process::Stdio::null())
    .stdout(std::process::Stdio::null())
    // Its few lines go to a file of its own: wal-fetch's stderr may be a pipe its caller reads
    // to the end, which a helper holding it would keep open for as long as it runs.
    .stderr(log_file(&cfg.prefetch_dir)?)
    .process_group(0);
    cmd.spawn().context("starting pgkeep wal-prefetch")?;
    Ok(())
}

/// `pgkeep wal-prefetch SEGMENT`: the helper (see the module documentation).
pub async fn run(
    cfg: &Config,
    after: &str,
    sysid: u64,
    seg_bytes: u32,
    token_seen: u128,
) -> anyhow::Result<()> {
    let name: WalFileName = after.parse()?;
    let size = WalSegSize::new(seg_bytes)
        .ok_or_else(|| anyhow!("{seg_bytes} bytes is not a WAL segment size"))?;
    name.segment_no(size)?;
    let dir = cfg.prefetch_dir.clone();
    make_dir(&dir)?;
    let Some(_lock) = try_lock(&dir)? else {
        tracing::debug!("another wal-fetch prefetch runs");
        return Ok(());
    };
    let started = Instant::now();
    let p = Arc::new(Prefetcher::new(
        dir.clone(),
        cfg.prefetch_segments,
        cfg.prefetch_max_bytes,
    )?);
    let archive = Archive::new(Repo::open(&cfg.storage_settings(), false)?, sysid);
    tracing::info!(after = %name, dir = %dir.display(), "wal-fetch's prefetch starts (no daemon answered)");
    p.missed(&archive, name, size);
    let stop = tokio_util::sync::CancellationToken::new();
    let watcher = tokio::spawn(p.clone().watch(stop.clone()));
    let (mut taken, mut last) = (p.handed_off.get(), Instant::now());
    let why = loop {
        tokio::time::sleep(WATCH_EVERY).await;
        if let Some(asked) = take_asked(&dir) {
            p.missed(&archive, asked, size);
            last = Instant::now();
        }
        if p.handed_off.get() != taken {
            (taken, last) = (p.handed_off.get(), Instant::now());
        }
        if last.elapsed() >= IDLE {
            break "recovery asked for nothing more";
        }
        if token_stamp(&cfg.http_token_file) != token_seen {
            break "a daemon started";
        }
    };
    stop.cancel();
    let _ = watcher.await;
    let removed = p.discard().await + crate::wal::handoff::sweep_recent(&dir);
    tracing::info!(
        handed_off = p.handed_off.get(),
        removed,
        seconds = crate::progress::round3(started.elapsed().as_secs_f64()),
        "wal-fetch's prefetch ends: {why}"
    );
    Ok(())
}

/// The segment a `wal-fetch` that missed named, once (the file is removed).
fn take_asked(dir: &Path) -> Option<WalFileName> {
    let path: PathBuf = dir.join(ASKED);
    let text = std::fs::read_to_string(&path).ok()?;
    let _ = std::fs::remove_file(&path);
    text.trim()
        .parse()
        .ok()
        .filter(|n: &WalFileName| n.kind == WalFileKind::Segment)
}

/// When the daemon's token was last written (ns since the epoch; 0: there is none). A daemon
/// writes a new one each time it starts.
fn token_stamp(token: &Path) -> u128 {
    std::fs::metadata(token)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos())
}
