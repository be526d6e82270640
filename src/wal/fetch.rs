//! `wal-fetch` (for `restore_command`): a WAL file from the daemon (which may have prefetched it)
//! or from storage, verified, written atomically; and the exit code that tells Postgres whether
//! the file is missing (end recovery) or the fetch failed (stop).

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, anyhow};

use crate::cluster::{self, local_system_identifier};
use crate::config::Config;
use crate::pg::walheader;
use crate::pg::{WalFileKind, WalFileName};
use crate::storage::{Archive, Repo, StorageError, object};

/// The longest `wal-fetch` waits for the daemon's answer before it reads storage itself: on
/// loopback, a prefetched segment comes at once and one the daemon must download in seconds; a
/// process on `listen` that accepts and never answers must not hold recovery for the storage
/// request timeout (60 s) on every segment.
const DAEMON_ANSWER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The content type of `GET /wal/{name}`: the stored object, header and all.
pub const OBJECT_CONTENT_TYPE: &str = "application/vnd.pgkeep.object";

/// The daemon's answer to a client that shares its hand-off directory (it sent that directory's
/// [`super::handoff::dir_identity`]): the segment is prefetched there, to take.
pub const IN_HANDOFF_STATUS: u16 = 303;

/// Why `wal-fetch` did not deliver a file. Only [`FetchError::NotInArchive`] may tell Postgres "no
/// such file" (exit 1); everything else must stop recovery (exit 126) rather than end it early.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("{0} is not in the archive")]
    NotInArchive(String),
    #[error(transparent)]
    Failed(#[from] anyhow::Error),
}

impl From<StorageError> for FetchError {
    fn from(e: StorageError) -> Self {
        FetchError::Failed(e.into())
    }
}

/// What `wal-fetch` delivered.
#[derive(Debug)]
pub struct FetchReport {
    pub name: WalFileName,
    pub bytes: usize,
    /// Read from storage by this process (no daemon answered, nothing was prefetched), with the
    /// cluster's system identifier: where `wal-fetch`'s own prefetch starts ([`super::helper`]).
    pub from_storage: Option<u64>,
}

/// Downloads one WAL file, verifies it (object checksum; for segments also the page header against
/// the name and the cluster) and writes it to `dest` atomically. Asks the local daemon first (it
/// may have prefetched the file) and falls back to storage when no daemon answers for this cluster.
pub async fn wal_fetch(cfg: &Config, name: &str, dest: &Path) -> Result<FetchReport, FetchError> {
    let started = Instant::now();
    let name: WalFileName = name.parse().map_err(anyhow::Error::from)?;
    let local = match cfg.system_identifier {
        Some(id) => Some(id),
        None => local_system_identifier(cfg)?.map(|(id, _)| id),
    };
    let ((data, served), via) = if cfg.wal_fetch_storage {
        match from_daemon(cfg, &name, local, false, dest).await {
            Daemon::File(data, served) => ((data, served), "daemon"),
            Daemon::Taken(report) => return Ok(report),
            Daemon::Absent | Daemon::NoAnswer => (from_storage(cfg, &name).await?, "storage"),
        }
    } else {
        match only_from_daemon(cfg, &name, local, dest).await? {
            Ok(file) => (file, "daemon"),
            Err(report) => return Ok(report),
        }
    };
    // Complete under its name, not fsynced: Postgres fsyncs a restored file it keeps
    // (see `handoff`'s documentation).
    super::handoff::write_plain(dest, &data)
        .with_context(|| format!("writing {}", dest.display()))
        .map_err(FetchError::Failed)?;
    // The streamed open segment: Postgres asks for it again as recovery ends.
    if served.kind == WalFileKind::Partial && name.kind == WalFileKind::Segment {
        super::handoff::keep_recent(&cfg.prefetch_dir, &name, &data);
    }
    tracing::info!(wal = %name, bytes = data.len(), via, ms = started.elapsed().as_millis(), dest = %dest.display(), "fetched");
    Ok(FetchReport {
        name,
        bytes: data.len(),
        from_storage: local.filter(|_| via == "storage"),
    })
}

/// The fast path of `wal-fetch`: the segment from the hand-off directory, where the daemon
/// placed it verified ([`super::handoff`]); `None` when it is not there (or not usable), and the
/// ordinary fetch goes on. Needs no runtime, no network and no storage settings.
pub fn from_handoff(cfg: &Config, name: &str, dest: &Path) -> Option<FetchReport> {
    let name: WalFileName = name.parse().ok()?;
    if name.kind != WalFileKind::Segment {
        return None;
    }
    let sysid = match cfg.system_identifier {
        Some(id) => id,
        None => local_system_identifier(cfg).ok()??.0,
    };
    take_handoff(cfg, name, sysid, dest)
}

/// [`from_handoff`] for a segment of cluster `sysid`.
fn take_handoff(cfg: &Config, name: WalFileName, sysid: u64, dest: &Path) -> Option<FetchReport> {
    let started = Instant::now();
    let keys = || crate::storage::Keys::from_settings(&cfg.encryption);
    match super::handoff::take(&cfg.prefetch_dir, &name, sysid, &keys, dest) {
        super::handoff::Taken::Done { bytes, form } => {
            let form = match form {
                super::handoff::Form::Plain(_) => "plain",
                super::handoff::Form::Stored => "stored",
                super::handoff::Form::Recent { .. } => "recent",
            };
            tracing::info!(wal = %name, bytes, via = "handoff", form, us = started.elapsed().as_micros() as u64, dest = %dest.display(), "fetched");
            Some(FetchReport {
                name,
                bytes,
                from_storage: None,
            })
        }
        super::handoff::Taken::Miss => None,
    }
}

/// What the daemon said of a WAL file, as far as it proved it.
enum Daemon {
    /// The file, verified, and the name it was stored under (a segment's `.partial`, or the
    /// name asked for).
    File(Vec<u8>, WalFileName),
    /// Storage holds no such file (proven; a storage-less wal-fetch takes it as the answer).
    Absent,
    /// No proven answer: no daemon, an impostor, a failure, or a file it cannot serve.
    NoAnswer,
    /// It was prefetched in the hand-off directory this process shares with the daemon, and is
    /// taken from there to `dest` (checked as any prefetched file is).
    Taken(FetchReport),
}

/// `wal_fetch_storage = false`: the container holds no storage credentials, so only the daemon's
/// proven answers count. Without one, it asks again for as long as `wal_fetch_outage_secs` (a
/// restarting sidecar), then stops recovery (126); never "not in the archive" on a guess.
/// Returns the file, or (`Err`) that it was taken from the hand-off directory.
async fn only_from_daemon(
    cfg: &Config,
    name: &WalFileName,
    sysid: Option<u64>,
    dest: &Path,
) -> Result<Result<(Vec<u8>, WalFileName), FetchReport>, FetchError> {
    let Some(sysid) = sysid else {
        return Err(anyhow!(
            "wal_fetch_storage = false, but the cluster is unknown (no readable pg_control in \
             PGDATA and no system_identifier setting): the daemon cannot be asked"
        )
        .into());
    };
    let deadline = Instant::now() + cfg.wal_fetch_outage;
    let mut pause = std::time::Duration::from_millis(100);
    loop {
        match from_daemon(cfg, name, Some(sysid), true, dest).await {
            Daemon::File(data, served) => return Ok(Ok((data, served))),
            Daemon::Taken(report) => return Ok(Err(report)),
            Daemon::Absent => return Err(FetchError::NotInArchive(name.to_string())),
            Daemon::NoAnswer if Instant::now() + pause < deadline => {
                tracing::warn!(wal = %name, listen = %cfg.listen, "no proven answer from the daemon, asking again in {:.1}s", pause.as_secs_f64());
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(std::time::Duration::from_secs(5));
            }
            Daemon::NoAnswer => {
                return Err(anyhow!(
                    "no proven answer for {name} from the daemon at {} within {}s, and \
                     wal_fetch_storage = false: this container reads WAL only through the daemon \
                     (is the pgkeep sidecar running? its token is {})",
                    cfg.listen,
                    cfg.wal_fetch_outage.as_secs(),
                    cfg.http_token_file.display()
                )
                .into());
            }
        }
    }
}

/// Asks the daemon at `listen` for a WAL file. Without `every_kind`, only segments: a history or
/// backup-label file steers recovery and carries no page header to check against the cluster, so
/// while storage can be read those few bytes come from it.
async fn from_daemon(
    cfg: &Config,
    name: &WalFileName,
    sysid: Option<u64>,
    every_kind: bool,
    dest: &Path,
) -> Daemon {
    // A segment it prefetched in the hand-off directory this process shares with it (perhaps
    // placed while this request waited for its download) is left there to take: a rename, not
    // 16 MiB sealed, sent and checked again.
    let shared = super::handoff::dir_identity(&cfg.prefetch_dir);
    let Some(sysid) = sysid else {
        return Daemon::NoAnswer;
    };
    if let Some(answer) = ask_daemon(cfg, name, sysid, every_kind, shared.as_deref()).await {
        return answer;
    }
    if let Some(report) = take_handoff(cfg, *name, sysid, dest) {
        return Daemon::Taken(report);
    }
    // Gone or damaged meanwhile: asked again, to be sent it this time.
    tracing::debug!(wal = %name, "the daemon's prefetched file could not be taken: asking for it to be sent");
    ask_daemon(cfg, name, sysid, every_kind, None)
        .await
        .unwrap_or(Daemon::NoAnswer)
}

/// [`from_daemon`]'s request, offering the hand-off directory whose identity is `shared`;
/// `None`: the daemon says the segment is prefetched there (its word only, until it is taken).
async fn ask_daemon(
    cfg: &Config,
    name: &WalFileName,
    sysid: u64,
    every_kind: bool,
    shared: Option<&str>,
) -> Option<Daemon> {
    let segment = matches!(name.kind, WalFileKind::Segment | WalFileKind::Partial);
    if !segment && !every_kind {
        return Some(Daemon::NoAnswer);
    }
    let mut path = format!("/wal/{name}?system_identifier={sysid}");
    if let Some(id) = shared.filter(|_| name.kind == WalFileKind::Segment) {
        path.push_str(&format!("&handoff={id}"));
    }
    // With storage to fall back to, a daemon slow to answer is left for it; without, the daemon's
    // own download of the file may take as long as a storage request does.
    let timeout = if every_kind {
        cfg.retry.request_timeout
    } else {
        cfg.retry.request_timeout.min(DAEMON_ANSWER_TIMEOUT)
    };
    let mut answer =
        match crate::http_token::ask(cfg.listen, &cfg.http_token_file, &path, timeout, 1 << 30)
            .await
        {
            Ok(a) => a,
            // A problem only where the daemon is the one source (a plain restore has none).
            Err(e @ crate::http_token::AskError::Token { .. }) if every_kind => {
                tracing::warn!("{e}: not asking the daemon");
                return Some(Daemon::NoAnswer);
            }
            Err(e) => {
                tracing::debug!("{e}");
                return Some(Daemon::NoAnswer);
            }
        };
    let r = &mut answer.response;
    Some(match r.status {
        200 => {
            // The daemon hands over the stored object as it is (it may hold no key to decrypt
            // it): verified, decrypted and decoded here.
            let served: Option<WalFileName> =
                r.header("x-pgkeep-served").and_then(|n| n.parse().ok());
            let served = served.filter(|s| {
                if segment {
                    s.timeline == name.timeline && s.stem() == name.stem()
                } else {
                    s == name
                }
            });
            let (Some(served), Some(OBJECT_CONTENT_TYPE)) = (served, r.header("content-type"))
            else {
                tracing::warn!(wal = %name, "the daemon's answer is not a stored WAL object");
                return Some(Daemon::NoAnswer);
            };
            let pieces = r.header(PIECES_HEADER).unwrap_or_default().to_string();
            let subject =
                crate::http_token::wal_subject(&served_subject(&served, &pieces), &r.body);
            if !proven(cfg, &answer, &subject) {
                return Some(Daemon::NoAnswer);
            }
            let body = bytes::Bytes::from(std::mem::take(&mut answer.response.body));
            let Some((base, pieces)) = split_pieces(&pieces, &body) else {
                tracing::warn!(wal = %name, "the daemon's answer does not hold the pieces it lists");
                return Some(Daemon::NoAnswer);
            };
            let keys = match crate::storage::Keys::from_settings(&cfg.storage_settings().encryption)
            {
                Ok(k) => k,
                Err(e) => {
                    tracing::debug!("{e}");
                    return Some(Daemon::NoAnswer);
                }
            };
            let opened = object::open(&base, &keys)
                .map_err(|e| format!("{e:?}"))
                .and_then(|(_, mut data)| {
                    for p in &pieces {
                        let (_, bytes) = object::open(&p.stored, &keys)
                            .map_err(|e| format!("{}: {e:?}", p.key))?;
                        crate::storage::pieces::append(&mut data, p.start, &bytes)?;
                    }
                    if segment {
                        walheader::whole_segment(&served, data, Some(sysid))
                            .map_err(|e| e.to_string())
                    } else {
                        Ok(data)
                    }
                });
            match opened {
                Ok(data) => Daemon::File(data, served),
                Err(e) => {
                    tracing::warn!(wal = %name, "the daemon's copy did not verify ({e})");
                    Daemon::NoAnswer
                }
            }
        }
        // While storage can be read, not taken on the daemon's word: storage confirms "not in
        // the archive", the answer that ends recovery.
        404 => {
            let subject = crate::http_token::absent_subject(&name.to_string());
            if proven(cfg, &answer, &subject) {
                Daemon::Absent
            } else {
                Daemon::NoAnswer
            }
        }
        IN_HANDOFF_STATUS if shared.is_some() => return None,
        code => {
            tracing::debug!(wal = %name, code, "the daemon cannot serve it");
            Daemon::NoAnswer
        }
    })
}

/// Whether an answer carries the daemon's proof for `subject`; says so when it does not.
fn proven(cfg: &Config, answer: &crate::http_token::Answer, subject: &[u8]) -> bool {
    let ok = answer.proves(subject);
    if !ok {
        tracing::warn!(listen = %cfg.listen, "what answers on listen did not prove it is this pod's pgkeep daemon (no or a wrong proof of the token in {})", cfg.http_token_file.display());
    }
    ok
}

/// Reads a WAL file straight from storage, riding out transient failures for as long as
/// `wal_fetch_outage_secs`: object_store retries a request that fails, but not an answer whose body
/// breaks off (seen through a faulty proxy: a listing's body cut short ended recovery with 126).
/// A checksum mismatch is read again twice (a body cut short in transit reads as damage) before
/// the object is taken as damaged.
async fn from_storage(
    cfg: &Config,
    name: &WalFileName,
) -> Result<(Vec<u8>, WalFileName), FetchError> {
    let deadline = Instant::now() + cfg.wal_fetch_outage;
    let mut pause = std::time::Duration::from_millis(100);
    let mut damaged = 0;
    loop {
        let e = match from_storage_once(cfg, name).await {
            Err(FetchError::Failed(e)) => e,
            done => return done,
        };
        let again = match e.downcast_ref::<StorageError>() {
            Some(
                StorageError::Backend { .. }
                | StorageError::VerifyFailed { .. }
                | StorageError::NoCredentials { .. },
            ) => true,
            Some(StorageError::Corrupt { .. }) => {
                damaged += 1;
                damaged <= 2
            }
            _ => false,
        };
        if !again || Instant::now() + pause >= deadline {
            return Err(FetchError::Failed(e));
        }
        tracing::warn!(wal = %name, "reading storage failed, trying again in {:.1}s: {e:#}", pause.as_secs_f64());
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(std::time::Duration::from_secs(5));
    }
}

async fn from_storage_once(
    cfg: &Config,
    name: &WalFileName,
) -> Result<(Vec<u8>, WalFileName), FetchError> {
    // A missing marker or cluster means misconfiguration (wrong URL, wrong cluster), never "this WAL
    // file does not exist": answering 1 there would end recovery early and silently.
    // Retried for as long as `wal_fetch_outage_secs` (bounded in time, not in attempts): ending
    // recovery with a FATAL on a short outage would restart the pod's whole recovery.
    let mut settings = cfg.storage_settings();
    settings.retry.max_retries = 10_000;
    settings.retry.retry_timeout = cfg.wal_fetch_outage;
    let archive = cluster::open_archive_with(cfg, &settings).await?;
    if !archive.is_described().await? {
        return Err(anyhow!(
            "storage {} holds no archive for the cluster with system identifier {}",
            archive.repo().url(),
            archive.system_identifier()
        )
        .into());
    }
    fetch_served(&archive, name).await
}

/// A WAL file as stored (still encoded, perhaps encrypted), checked as far as is possible
/// without a key.
#[derive(Debug, Clone)]
pub struct Fetched {
    pub stored: bytes::Bytes,
    pub header: object::Header,
    /// The name it was stored under: the segment's `.partial` when only that exists.
    pub served: WalFileName,
    /// Its key in storage (for messages).
    pub key: object_store::path::Path,
    /// The daemon's streamed `.partial`: the pieces that continue it, each stored as it is.
    pub pieces: Vec<StoredPiece>,
}

/// A piece of the daemon's open segment as stored: the offset in the segment where its bytes
/// start, and the object.
#[derive(Debug, Clone)]
pub struct StoredPiece {
    pub start: u64,
    pub stored: bytes::Bytes,
    pub key: object_store::path::Path,
}

/// The most pieces one answer assembles: a daemon folds them into a new `.partial` long before.
pub const MAX_PIECES: usize = 4096;

impl Fetched {
    /// The pieces' starts and stored sizes, `start:len,...` (the `x-pgkeep-pieces` header of
    /// `/wal`, which also binds them into the answer's proof).
    pub fn pieces_header(&self) -> String {
        self.pieces
            .iter()
            .map(|p| format!("{}:{}", p.start, p.stored.len()))
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// The header of `/wal` that lists the pieces after a streamed `.partial`.
pub const PIECES_HEADER: &str = "x-pgkeep-pieces";

/// What a `/wal` answer's proof names as served: the file's name, and its pieces when it has any.
pub fn served_subject(served: &WalFileName, pieces: &str) -> String {
    if pieces.is_empty() {
        served.to_string()
    } else {
        format!("{served} pieces {pieces}")
    }
}

/// Parses an `x-pgkeep-pieces` header against the body it describes: the stored base object,
/// then each piece's; `None` when it does not describe that body.
pub fn split_pieces(header: &str, body: &bytes::Bytes) -> Option<(bytes::Bytes, Vec<StoredPiece>)> {
    let mut lens = vec![];
    for item in header.split(',').filter(|i| !i.is_empty()) {
        let (start, len) = item.split_once(':')?;
        lens.push((start.parse::<u64>().ok()?, len.parse::<usize>().ok()?));
        if lens.len() > MAX_PIECES {
            return None;
        }
    }
    let pieces_len = lens
        .iter()
        .try_fold(0usize, |a, (_, l)| a.checked_add(*l))?;
    let base_len = body.len().checked_sub(pieces_len)?;
    let mut at = base_len;
    let pieces = lens
        .into_iter()
        .map(|(start, len)| {
            let p = StoredPiece {
                start,
                stored: body.slice(at..at + len),
                key: object_store::path::Path::from(format!("piece at {start:#X}")),
            };
            at += len;
            p
        })
        .collect();
    Some((body.slice(..base_len), pieces))
}

/// The verified plain content of a WAL file (of its `.partial` when only that is stored).
pub async fn fetch_verified(archive: &Archive, name: &WalFileName) -> Result<Vec<u8>, FetchError> {
    Ok(fetch_served(archive, name).await?.0)
}

/// As [`fetch_verified`], with the name the file was stored under (a segment's `.partial`).
async fn fetch_served(
    archive: &Archive,
    name: &WalFileName,
) -> Result<(Vec<u8>, WalFileName), FetchError> {
    let f = fetch_to_open(archive, name).await?;
    let repo = archive.repo().clone();
    let sysid = archive.system_identifier();
    let served = f.served;
    let data = tokio::task::spawn_blocking(move || open_checked(&repo, &f, sysid))
        .await
        .expect("decoding does not panic")?;
    Ok((data, served))
}

/// Decrypts and decodes a fetched WAL file, and checks a segment's page header against its name
/// and the cluster.
pub fn open_checked(repo: &Repo, f: &Fetched, sysid: u64) -> Result<Vec<u8>, FetchError> {
    let (_, mut data) = repo.open_object(&f.key, &f.stored)?;
    for p in &f.pieces {
        let (_, bytes) = repo.open_object(&p.key, &p.stored)?;
        crate::storage::pieces::append(&mut data, p.start, &bytes)
            .map_err(|e| anyhow!("{}: {e}", p.key))?;
    }
    if matches!(f.served.kind, WalFileKind::Segment | WalFileKind::Partial) {
        return Ok(
            walheader::whole_segment(&f.served, data, Some(sysid)).map_err(anyhow::Error::from)?
        );
    }
    Ok(data)
}

/// The stored form of a WAL file and the name it was stored under: a segment that exists only
/// as the `.partial` the daemon streamed (the last WAL before a crash or shutdown) is served from
/// that, and Postgres replays it up to its valid end, then ends recovery there. Its header is
/// checked, its content not yet: the caller opens it next with [`open_checked`] (or hands it to
/// `wal-fetch`, which does), so each segment is decoded and hashed once, not twice.
pub async fn fetch_to_open(archive: &Archive, name: &WalFileName) -> Result<Fetched, FetchError> {
    // A piece that goes while it is read was merged into a longer piece or a new `.partial`, or
    // its whole segment was stored: the next look finds that. Three looks in a row that race the daemon are not
    // chance.
    for _ in 0..3 {
        if let Some(f) = fetch_stored_once(archive, name).await? {
            return Ok(f);
        }
    }
    Err(anyhow!("{name}: the streamed partial segment kept changing while it was read").into())
}

/// One look for [`fetch_to_open`]; `None` when the streamed pieces changed under it.
async fn fetch_stored_once(
    archive: &Archive,
    name: &WalFileName,
) -> Result<Option<Fetched>, FetchError> {
    let (repo, layout) = (archive.repo(), archive.layout());
    let mut candidates = vec![(layout.wal(name), *name)];
    if name.kind == WalFileKind::Segment {
        // Postgres' own .partial (archived at the end of a timeline), else the daemon's upload
        // of the segment it was receiving.
        let partial = name.with_kind(WalFileKind::Partial);
        candidates.push((layout.wal(&partial), partial));
        candidates.push((layout.streaming_partial(name), partial));
    }
    let streamed = candidates.len() - 1;
    for (i, (key, served)) in candidates.into_iter().enumerate() {
        let (header, stored) = match repo.get_stored_unchecked(&key).await {
            Ok(found) => found,
            Err(StorageError::NotFound { .. }) => continue,
            Err(e) => return Err(e.into()),
        };
        if i > 0 {
            tracing::info!(wal = %name, "only the partial segment is in the archive: serving it");
        }
        let pieces = if i == streamed && i > 0 {
            let Some(pieces) = streamed_pieces(archive, name, header.plain_len).await? else {
                return Ok(None);
            };
            // The daemon stores a longer object holding a piece (a new `.partial`, the whole
            // segment, or a merged piece) before it deletes the piece. A merged piece is listed
            // beside the ones it holds, or instead of them, so a listing misses no byte because
            // of one (a piece gone by the time it is read makes this look start over); a
            // `.partial` unchanged after the listing means no fold or completion happened.
            match repo.header(&key).await {
                Ok(now) if now == header => pieces,
                Ok(_) | Err(StorageError::NotFound { .. }) => return Ok(None),
                Err(e) => return Err(e.into()),
            }
        } else {
            vec![]
        };
        return Ok(Some(Fetched {
            stored,
            header,
            served,
            key,
            pieces,
        }));
    }
    Err(FetchError::NotInArchive(name.to_string()))
}

/// The stored pieces that continue a streamed `.partial` of `base_len` bytes; `None` when one of
/// them is gone by the time it is read.
async fn streamed_pieces(
    archive: &Archive,
    name: &WalFileName,
    base_len: u64,
) -> Result<Option<Vec<StoredPiece>>, FetchError> {
    let listed = archive.streamed_pieces(name).await?;
    let chain = crate::storage::pieces::chain(base_len, &listed);
    if chain.len() > MAX_PIECES {
        return Err(anyhow!(
            "{} pieces continue the streamed {name}.partial, more than the {MAX_PIECES} a reader takes",
            chain.len()
        )
        .into());
    }
    let mut out = Vec::with_capacity(chain.len());
    for p in chain {
        match archive.repo().get_stored(&p.key).await {
            Ok((_, stored)) => out.push(StoredPiece {
                start: p.start,
                stored,
                key: p.key,
            }),
            Err(StorageError::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(e.into()),
        }
    }
    Ok(Some(out))
}
