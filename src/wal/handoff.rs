//! The hand-off directory: WAL segments the daemon prefetched, already verified, where
//! `wal-fetch` (restore_command) takes them with no more work than a local copy.
//!
//! The daemon and the Postgres container share the directory (`prefetch_dir`; in the chart an
//! `emptyDir` mounted in both). The daemon downloads a segment, checks it completely (the
//! object's SHA-256, the page header against the name and the cluster) and places it here, under
//! a name that says what it holds:
//!
//! - `<segment>.<crc32c>.wal`: the segment's plain bytes, exactly what Postgres reads, with their
//!   CRC-32C (hardware-accelerated) in the name. `wal-fetch` checks that sum and the
//!   first page's header, then renames the file to `%p` (copies it across file systems).
//! - `<segment>.<crc32c>.<until>.recent`: the same, left by a `wal-fetch` that served the
//!   segment from the daemon's streamed `.partial` (never prefetched: it may still grow), for the
//!   moment Postgres asks for it again. At the end of archive recovery Postgres reads the last
//!   valid record again (`FinishWalRecovery`), which calls `restore_command` a second time for the
//!   segment it just replayed, right after replaying it. Taken only until `until` (milliseconds
//!   since the epoch, [`RECENT_FOR`] after it was served; a stamp further ahead than that counts
//!   as past), once, and the copy stamped latest first, so it answers that second request and not
//!   a later one that storage might answer with more WAL. A copy is always a prefix of what
//!   storage holds: at worst a standby polling within those seconds replays the rest a poll
//!   later.
//! - `<segment>.pgko`: the stored object as it is, when the daemon cannot decode it (encrypted
//!   storage: the sidecar holds no key). `wal-fetch` verifies, decrypts and decodes it as it does
//!   an object read from storage.
//!
//! A `wal-fetch` that looked before a file was placed asks the daemon over HTTP, naming this
//! directory ([`dir_identity`]); when the daemon's directory is the same one and the segment is
//! prefetched there (perhaps placed while the request waited for its download), the daemon
//! answers "take it there" and `wal-fetch` does, checked as here. That answer proves nothing and
//! needs not to: a file that is not there or fails the check is not taken, and the segment is
//! asked for once more to be sent, or read from storage.
//!
//! The check on the way out is against damage (a disk error, a file cut short by a crash), not
//! against forgery: whoever can write this directory (its owner, the pod's user, who must be
//! `wal-fetch`'s own user and the only one allowed to write it) can write `pg_wal` too. A file
//! that fails it is removed and the segment is fetched the ordinary way, never handed to Postgres.
//!
//! What Postgres needs of a restored file (`RestoreArchivedFile` in xlogarchive.c): it reads the
//! file `restore_command` wrote and, to keep it (a standby, or a segment it will serve), moves it
//! into `pg_wal` with `durable_rename`, which fsyncs the file and the folder itself; otherwise the
//! file is read and removed, and a crash before then replays from the last restartpoint, calling
//! `restore_command` again. So `wal-fetch` renames without an fsync.

use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::pg::{WalFileKind, WalFileName, walheader};
use crate::storage::{Keys, object};

/// The largest file taken from the directory (the largest WAL segment Postgres allows, 1 GiB, and
/// its object's header).
const MAX_FILE: u64 = (1 << 30) + 4096;
/// The WAL page size: the first page holds the long header that is checked.
const PAGE: usize = 8192;

/// How long a `.recent` file may be taken after the `.partial` it holds was served: the second
/// request at the end of recovery comes within milliseconds.
pub const RECENT_FOR: std::time::Duration = std::time::Duration::from_secs(3);

/// What a hand-off file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Form {
    /// The segment's plain bytes, with their CRC-32C.
    Plain(u32),
    /// The stored object (encrypted, or otherwise not decoded by the daemon).
    Stored,
    /// Plain bytes with their CRC-32C, served from a streamed `.partial` and taken only until
    /// `until` (ms since the epoch).
    Recent { crc: u32, until: u64 },
}

/// Milliseconds since the epoch.
fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Whether a `.recent` file stamped `until` may no longer be taken: its time is past, or it is
/// further ahead than any kept copy is stamped (a clock stepped back, or a planted name), which
/// would otherwise keep it for good.
fn recent_expired(until: u64, now: u64) -> bool {
    until <= now || until > now + RECENT_FOR.as_millis() as u64 + 1000
}

/// The CRC-32C (Castagnoli) of `data`, as hand-off names carry it.
pub fn crc32c(data: &[u8]) -> u32 {
    crc_fast::checksum(crc_fast::CrcAlgorithm::Crc32Iscsi, data) as u32
}

/// The file name of `segment` in the form `form`.
pub fn file_name(segment: &WalFileName, form: Form) -> String {
    match form {
        Form::Plain(crc) => format!("{segment}.{crc:08x}.wal"),
        Form::Stored => format!("{segment}.pgko"),
        Form::Recent { crc, until } => format!("{segment}.{crc:08x}.{until}.recent"),
    }
}

/// The segment and form a hand-off file name states; `None` for any other name.
pub fn parse_name(name: &str) -> Option<(WalFileName, Form)> {
    if let Some(stem) = name.strip_suffix(".pgko") {
        let seg: WalFileName = stem.parse().ok()?;
        return (seg.kind == WalFileKind::Segment).then_some((seg, Form::Stored));
    }
    let (rest, until) = match name.strip_suffix(".recent") {
        Some(rest) => {
            let (rest, until) = rest.rsplit_once('.')?;
            if until.is_empty() || !until.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            (rest, Some(until.parse::<u64>().ok()?))
        }
        None => (name.strip_suffix(".wal")?, None),
    };
    let (stem, crc) = rest.rsplit_once('.')?;
    if crc.len() != 8 {
        return None;
    }
    let seg: WalFileName = stem.parse().ok()?;
    let crc = u32::from_str_radix(crc, 16).ok()?;
    let form = match until {
        Some(until) => Form::Recent { crc, until },
        None => Form::Plain(crc),
    };
    (seg.kind == WalFileKind::Segment).then_some((seg, form))
}

/// Leaves a copy of `data`, served for `segment` from a streamed `.partial`, in `dir` for the
/// request that follows at the end of recovery (see the module documentation), when `dir` is
/// usable; removes `.recent` files whose time is past. A failure costs only that second request
/// its speed, so it is logged and nothing more.
pub fn keep_recent(dir: &Path, segment: &WalFileName, data: &[u8]) {
    if segment.kind != WalFileKind::Segment || unusable(dir).is_some() {
        return;
    }
    // Expired copies go, and this segment's older one (it may hold less of it), in one pass.
    remove_recent(dir, Some(segment));
    let form = Form::Recent {
        crc: crc32c(data),
        until: now_ms() + RECENT_FOR.as_millis() as u64,
    };
    if let Err(e) = place(dir, segment, form, data) {
        tracing::debug!(wal = %segment, dir = %dir.display(), "could not keep the served .partial for a second request: {e}");
    }
}

/// Removes the `.recent` files in `dir` that may no longer be taken; returns how many.
pub fn sweep_recent(dir: &Path) -> usize {
    remove_recent(dir, None)
}

/// Removes the `.recent` files in `dir` that may no longer be taken, and every one of `segment`;
/// returns how many.
fn remove_recent(dir: &Path, segment: Option<&WalFileName>) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let now = now_ms();
    entries
        .filter_map(Result::ok)
        .filter(|e| {
            matches!(parse_name(&e.file_name().to_string_lossy()),
                Some((seg, Form::Recent { until, .. }))
                    if recent_expired(until, now) || segment == Some(&seg))
        })
        .filter(|e| std::fs::remove_file(e.path()).is_ok())
        .count()
}

/// Places a verified segment in `dir` under its hand-off name, complete or not at all (no fsync:
/// a file cut short by a crash fails its check and is fetched again). Returns its path.
pub fn place(
    dir: &Path,
    segment: &WalFileName,
    form: Form,
    bytes: &[u8],
) -> std::io::Result<PathBuf> {
    let dest = dir.join(file_name(segment, form));
    crate::fsutil::write_replacing(&dest, bytes, false)?;
    Ok(dest)
}

/// Removes what an earlier daemon left in `dir` (hand-off files and temporary files; nothing
/// else): a killed daemon's files are not trusted, and its bookkeeping is gone. A `.recent` copy
/// still in its time is `wal-fetch`'s, not a daemon's: it stays for the request it is kept for.
pub fn clean(dir: &Path) -> std::io::Result<usize> {
    let mut removed = 0;
    let now = now_ms();
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        // Only names no other program uses: never a bare WAL name (a `prefetch_dir` set to a
        // `pg_wal` by mistake must lose nothing).
        let ours = match parse_name(&name) {
            Some((_, Form::Recent { until, .. })) => recent_expired(until, now),
            Some(_) => true,
            None => name.ends_with(".pgkeep-tmp"),
        };
        if ours && e.file_type()?.is_file() {
            std::fs::remove_file(e.path())?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// The directory's identity as the client and the daemon both see it (device and inode: the same
/// across containers that mount one volume), for the daemon to tell whether a client takes files
/// from its own directory. `None`: no such directory.
pub fn dir_identity(dir: &Path) -> Option<String> {
    let meta = std::fs::symlink_metadata(dir).ok().filter(|m| m.is_dir())?;
    Some(format!("{}.{}", meta.dev(), meta.ino()))
}

/// Why the directory is not used: it must be a directory (not a link) owned by this user that no
/// one else may write.
pub fn unusable(dir: &Path) -> Option<String> {
    let meta = match std::fs::symlink_metadata(dir) {
        Ok(m) => m,
        Err(e) => return Some(format!("{}: {e}", dir.display())),
    };
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    if !meta.is_dir() {
        Some(format!("{} is not a directory", dir.display()))
    } else if dir
        .file_name()
        .is_some_and(|n| n == "pg_wal" || n == "pg_xlog")
        || dir.join("PG_VERSION").exists()
        || dir.parent().is_some_and(|p| p.join("PG_VERSION").exists())
    {
        Some(format!(
            "{} is in a Postgres data directory: prefetch_dir must be a directory of its own",
            dir.display()
        ))
    } else if meta.uid() != me {
        Some(format!(
            "{} belongs to user {}, not to this user ({me})",
            dir.display(),
            meta.uid()
        ))
    } else if meta.mode() & 0o022 != 0 {
        Some(format!(
            "{} may be written by others (mode {:o})",
            dir.display(),
            meta.mode() & 0o777
        ))
    } else {
        None
    }
}

/// What [`take`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Taken {
    /// The segment is at `dest`: this many bytes, in this form.
    Done { bytes: usize, form: Form },
    /// No usable file for it (none, the directory unusable, or a damaged file, now removed).
    Miss,
}

/// Takes `segment` from the hand-off directory to `dest` when the daemon placed it there: checks
/// it (see the module documentation) against the name and the cluster `sysid`, then renames it
/// into place (a plain file of this user on the same file system) or writes it there.
/// `keys` is asked for only to open a file in its stored form.
pub fn take(
    dir: &Path,
    segment: &WalFileName,
    sysid: u64,
    keys: &dyn Fn() -> Result<Keys, String>,
    dest: &Path,
) -> Taken {
    if segment.kind != WalFileKind::Segment {
        return Taken::Miss;
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Taken::Miss;
    };
    let prefix = format!("{segment}.");
    let now = now_ms();
    let (mut found, mut expired) = (None, vec![]);
    for e in entries.filter_map(Result::ok) {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with(&prefix) {
            continue;
        }
        let Some((_, form)) = parse_name(&name).filter(|(seg, _)| seg == segment) else {
            continue;
        };
        // Preferred: a prefetched file, then the kept copy stamped latest.
        let better = match (found.as_ref().map(|(_, f)| *f), form) {
            // Past its time: storage may hold more WAL of the segment by now.
            (_, Form::Recent { until, .. }) if recent_expired(until, now) => {
                expired.push(e.path());
                false
            }
            (None, _) => true,
            (Some(Form::Recent { .. }), Form::Plain(_) | Form::Stored) => true,
            (Some(Form::Recent { until: had, .. }), Form::Recent { until, .. }) => until > had,
            _ => false,
        };
        if better {
            found = Some((e.path(), form));
        }
    }
    if found.is_none() && expired.is_empty() {
        return Taken::Miss;
    }
    if let Some(why) = unusable(dir) {
        tracing::warn!(dir = %dir.display(), "not taking WAL from the hand-off directory: {why}");
        return Taken::Miss;
    }
    for path in expired {
        let _ = std::fs::remove_file(path);
    }
    let Some((path, form)) = found else {
        return Taken::Miss;
    };
    match take_file(&path, segment, form, sysid, keys, dest) {
        Ok(bytes) => Taken::Done { bytes, form },
        Err(Unusable::Damaged(e)) => {
            tracing::warn!(wal = %segment, file = %path.display(), "the prefetched file is not usable ({e}): removed, fetching the segment again");
            let _ = std::fs::remove_file(&path);
            Taken::Miss
        }
        Err(Unusable::Failed(e)) => {
            tracing::warn!(wal = %segment, file = %path.display(), "could not take the prefetched file ({e}): fetching the segment the ordinary way");
            Taken::Miss
        }
    }
}

/// Why a hand-off file was not taken.
enum Unusable {
    /// It failed a check: it is removed.
    Damaged(String),
    /// Something else failed (keys, writing `%p`): it stays.
    Failed(String),
}

fn damaged(e: impl std::fmt::Display) -> Unusable {
    Unusable::Damaged(e.to_string())
}

fn failed(e: impl std::fmt::Display) -> Unusable {
    Unusable::Failed(e.to_string())
}

/// Reads `f` through a small buffer (a 16 MiB one costs more in page faults than the copy),
/// handing each piece to `sink`: its CRC-32C, its length and its first page.
fn sum_through(
    f: &mut std::fs::File,
    mut sink: impl FnMut(&[u8]) -> std::io::Result<()>,
) -> std::io::Result<(u32, usize, Vec<u8>)> {
    let mut sum = crc_fast::Digest::new(crc_fast::CrcAlgorithm::Crc32Iscsi);
    let mut buf = vec![0u8; 1 << 20];
    let mut head = Vec::with_capacity(PAGE);
    let mut len = 0usize;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        if head.len() < PAGE {
            let take = (PAGE - head.len()).min(n);
            head.extend_from_slice(&buf[..take]);
        }
        sum.update(&buf[..n]);
        sink(&buf[..n])?;
        len += n;
    }
    Ok((sum.finalize() as u32, len, head))
}

fn take_file(
    path: &Path,
    segment: &WalFileName,
    form: Form,
    sysid: u64,
    keys: &dyn Fn() -> Result<Keys, String>,
    dest: &Path,
) -> Result<usize, Unusable> {
    // Never through a link; never blocking on a FIFO planted under a hand-off name.
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(failed)?;
    let meta = f.metadata().map_err(failed)?;
    if !meta.is_file() || meta.len() > MAX_FILE {
        return Err(damaged(format!(
            "not a plain file of at most {MAX_FILE} bytes"
        )));
    }
    match form {
        Form::Plain(crc) | Form::Recent { crc, .. } => {
            let (sum, len, head) = sum_through(&mut f, |_| Ok(())).map_err(failed)?;
            drop(f);
            if sum != crc {
                return Err(damaged(format!(
                    "its CRC-32C is {sum:08x}, its name says {crc:08x} (damaged)"
                )));
            }
            walheader::check_segment_head(segment, &head, len, Some(sysid)).map_err(damaged)?;
            // SAFETY: geteuid has no preconditions and cannot fail.
            let mine = meta.uid() == unsafe { libc::geteuid() };
            // Ours on the same file system: the file itself becomes `%p`.
            if mine && std::fs::rename(path, dest).is_ok() {
                return Ok(len);
            }
            // Another user's, or another file system (in a pod, the hand-off volume is not
            // PGDATA's): copied through the buffer, the copy's sum checked again.
            let len = copy_checked(path, crc, dest)?;
            let _ = std::fs::remove_file(path);
            Ok(len)
        }
        Form::Stored => {
            let mut data = Vec::with_capacity(meta.len() as usize);
            f.read_to_end(&mut data).map_err(failed)?;
            drop(f);
            let keys = keys().map_err(failed)?;
            let (_, plain) = object::open(&data, &keys).map_err(|e| damaged(format!("{e:?}")))?;
            let plain = walheader::whole_segment(segment, plain, Some(sysid)).map_err(damaged)?;
            write_plain(dest, &plain)
                .map_err(|e| failed(format!("writing {}: {e}", dest.display())))?;
            let _ = std::fs::remove_file(path);
            Ok(plain.len())
        }
    }
}

/// Copies a hand-off file to `dest` as [`write_plain`] writes, summing what it copies: `dest` is
/// put in place only when that sum is `crc`.
fn copy_checked(path: &Path, crc: u32, dest: &Path) -> Result<usize, Unusable> {
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(failed)?;
    let tmp = crate::fsutil::temp_beside(dest).map_err(failed)?;
    let result = (|| {
        let mut out = crate::fsutil::create_new(&tmp).map_err(failed)?;
        let (sum, len, _) = sum_through(&mut f, |piece| out.write_all(piece)).map_err(failed)?;
        drop(out);
        if sum != crc {
            return Err(damaged("it changed while it was copied"));
        }
        std::fs::rename(&tmp, dest)
            .map_err(|e| failed(format!("writing {}: {e}", dest.display())))?;
        Ok(len)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Writes `%p` as Postgres needs it: complete under its name (a temporary file renamed), with no
/// fsync (see the module documentation).
pub fn write_plain(dest: &Path, data: &[u8]) -> std::io::Result<()> {
    crate::fsutil::write_replacing(dest, data, false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_others_are_not_ours() {
        let seg: WalFileName = "000000010000000000000003".parse().unwrap();
        for form in [
            Form::Plain(0xdeadbeef),
            Form::Plain(0),
            Form::Stored,
            Form::Recent {
                crc: 7,
                until: 1_800_000_000_000,
            },
        ] {
            assert_eq!(parse_name(&file_name(&seg, form)), Some((seg, form)));
        }
        for other in [
            "000000010000000000000003",
            "000000010000000000000003.wal",
            "000000010000000000000003.deadbee.wal",
            "000000010000000000000003.xxxxxxxx.wal",
            "000000010000000000000003.partial.pgko",
            "000000010000000000000003.deadbeef.recent",
            "000000010000000000000003.deadbeef..recent",
            "000000010000000000000003.deadbeef.-1.recent",
            "000000010000000000000003.deadbeef.12x.recent",
            "00000002.history.pgko",
            "../000000010000000000000003.pgko",
            "precious",
        ] {
            assert_eq!(parse_name(other), None, "{other}");
        }
    }

    #[test]
    fn a_kept_partial_is_taken_until_its_time_and_never_after() {
        let dir = tempfile::tempdir().unwrap();
        let hand = dir.path().join("handoff");
        std::fs::create_dir(&hand).unwrap();
        std::fs::set_permissions(&hand, std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .unwrap();
        let sysid = 7_000_000_000_000_000_001;
        let size = 1 << 20;
        let seg = WalFileName::segment(
            crate::pg::lsn::TimelineId::new(1).unwrap(),
            crate::pg::lsn::SegmentNo(3),
            crate::pg::WalSegSize::new(size).unwrap(),
        );
        let data = crate::pg::walheader::tests::fake_segment(1, 3, size, sysid);
        let no_keys = || -> Result<Keys, String> { Err("no keys needed".into()) };
        let dest = dir.path().join("RECOVERYXLOG");

        // Served from a `.partial`: kept, and the request that follows takes it, byte-equal.
        keep_recent(&hand, &seg, &data);
        let kept: Vec<_> = std::fs::read_dir(&hand).unwrap().flatten().collect();
        assert_eq!(kept.len(), 1);
        assert!(kept[0].file_name().to_string_lossy().ends_with(".recent"));
        let taken = take(&hand, &seg, sysid, &no_keys, &dest);
        assert!(
            matches!(taken, Taken::Done { form: Form::Recent { .. }, bytes } if bytes == data.len()),
            "{taken:?}"
        );
        assert!(std::fs::read(&dest).unwrap() == data);
        assert_eq!(std::fs::read_dir(&hand).unwrap().count(), 0);

        // Past its time: not taken (storage may hold more of the segment by then), and removed.
        let past = Form::Recent {
            crc: crc32c(&data),
            until: now_ms() - 1,
        };
        let old = place(&hand, &seg, past, &data).unwrap();
        std::fs::remove_file(&dest).unwrap();
        assert_eq!(take(&hand, &seg, sysid, &no_keys, &dest), Taken::Miss);
        assert!(!dest.exists() && !old.exists());
        // A stamp further ahead than any kept copy's (a clock stepped back, a planted name)
        // counts as past too.
        let ahead = Form::Recent {
            crc: crc32c(&data),
            until: u64::MAX,
        };
        let planted = place(&hand, &seg, ahead, &data).unwrap();
        assert_eq!(take(&hand, &seg, sysid, &no_keys, &dest), Taken::Miss);
        assert!(!dest.exists() && !planted.exists());
        // The sweep removes only what may no longer be taken; a daemon's start keeps a copy in
        // its time.
        place(&hand, &seg, past, &data).unwrap();
        place(&hand, &seg, ahead, &data).unwrap();
        keep_recent(&hand, &seg, &data);
        assert_eq!(std::fs::read_dir(&hand).unwrap().count(), 1);
        assert_eq!(sweep_recent(&hand), 0);
        assert_eq!(clean(&hand).unwrap(), 0);
        assert_eq!(std::fs::read_dir(&hand).unwrap().count(), 1);
        // One copy of a segment, the latest: an older, shorter one is replaced.
        let mut longer = data.clone();
        longer[PAGE + 100] = 1;
        keep_recent(&hand, &seg, &longer);
        assert_eq!(std::fs::read_dir(&hand).unwrap().count(), 1);
        assert!(matches!(
            take(&hand, &seg, sysid, &no_keys, &dest),
            Taken::Done { .. }
        ));
        assert!(std::fs::read(&dest).unwrap() == longer);
        // Of two copies (a second serve before the first was taken), the one stamped latest.
        let older = Form::Recent {
            crc: crc32c(&data),
            until: now_ms() + 1000,
        };
        let newer = Form::Recent {
            crc: crc32c(&longer),
            until: now_ms() + 2000,
        };
        place(&hand, &seg, newer, &longer).unwrap();
        place(&hand, &seg, older, &data).unwrap();
        std::fs::remove_file(&dest).unwrap();
        assert!(matches!(
            take(&hand, &seg, sysid, &no_keys, &dest),
            Taken::Done { .. }
        ));
        assert!(std::fs::read(&dest).unwrap() == longer);
        std::fs::remove_dir_all(&hand).unwrap();
        std::fs::create_dir(&hand).unwrap();
        std::fs::set_permissions(&hand, std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .unwrap();
        // Another segment's kept file is not this one's.
        let other = WalFileName::segment(
            crate::pg::lsn::TimelineId::new(1).unwrap(),
            crate::pg::lsn::SegmentNo(4),
            crate::pg::WalSegSize::new(size).unwrap(),
        );
        assert_eq!(take(&hand, &other, sysid, &no_keys, &dest), Taken::Miss);
    }

    #[test]
    fn crc32c_is_castagnoli() {
        // The check value of CRC-32C.
        assert_eq!(crc32c(b"123456789"), 0xe3069283);
    }
}
