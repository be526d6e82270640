//! `archive-push` (for `archive_command`) and `wal-fetch` (for `restore_command`).

use std::path::{Path, PathBuf};

use std::time::Instant;

use anyhow::{Context, anyhow, bail};

use crate::cluster::{self, local_system_identifier};
use crate::config::Config;
use crate::fsutil;
use crate::pg::walheader::{self, SegmentHeader};
use crate::pg::{WalFileKind, WalFileName};
use crate::storage::{ClusterInfo, ClusterLayout, PutOutcome, Repo, StorageError};

/// Largest history or backup-label file accepted: real ones are a few hundred bytes.
const MAX_SMALL_FILE: u64 = 16 << 20;

/// What `archive-push` did.
#[derive(Debug)]
pub struct PushReport {
    pub name: WalFileName,
    pub system_identifier: u64,
    pub outcome: PutOutcome,
}

/// Archives one WAL file: checks it, encodes it, uploads it and verifies the upload.
pub async fn archive_push(cfg: &Config, path: &Path) -> anyhow::Result<PushReport> {
    let started = Instant::now();
    let file_name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| anyhow!("{}: no file name", path.display()))?;
    let name: WalFileName = file_name.parse()?;
    let len = std::fs::metadata(path)
        .with_context(|| format!("cannot read {}", path.display()))?
        .len();
    let is_segment = matches!(name.kind, WalFileKind::Segment | WalFileKind::Partial);
    if !is_segment && len > MAX_SMALL_FILE {
        bail!(
            "{}: {len} bytes is too large for a {} file",
            path.display(),
            kind_word(&name)
        );
    }
    let data = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;

    let local = match cfg.system_identifier {
        Some(id) => Some((id, PathBuf::from("the system_identifier setting"))),
        None => local_system_identifier(cfg)?,
    };
    let (system_identifier, header) = if is_segment {
        let header = walheader::check_segment(&name, &data, local.as_ref().map(|(id, _)| *id))?;
        (header.system_identifier, Some(header))
    } else {
        let (id, _) = local.ok_or_else(|| {
            anyhow!(
                "{name}: cannot tell which cluster this {} file belongs to: run in the data directory \
                 (as archive_command does), set PGDATA, or set system_identifier",
                kind_word(&name)
            )
        })?;
        (id, None)
    };

    let repo = Repo::open(cfg, true)?;
    let cluster = ClusterLayout::new(system_identifier);
    repo.ensure_cluster(&cluster, &cluster_info(system_identifier, header.as_ref()))
        .await?;
    let outcome = repo.put_new(&cluster.wal(&name), &data, cfg.codec).await?;
    let ms = started.elapsed().as_millis();
    match outcome {
        PutOutcome::Stored { stored_len } | PutOutcome::Repaired { stored_len } => tracing::info!(
            wal = %name,
            system_identifier,
            bytes = data.len(),
            stored = stored_len,
            codec = cfg.codec.name(),
            ms,
            repaired = matches!(outcome, PutOutcome::Repaired { .. }),
            "archived"
        ),
        PutOutcome::AlreadyPresent => {
            tracing::info!(wal = %name, system_identifier, ms, "already archived with identical content")
        }
    }
    Ok(PushReport {
        name,
        system_identifier,
        outcome,
    })
}

fn cluster_info(system_identifier: u64, header: Option<&SegmentHeader>) -> ClusterInfo {
    ClusterInfo {
        system_identifier: system_identifier.to_string(),
        wal_segment_size: header.map(|h| h.seg_size.bytes()),
        pg_major: header.map(|h| h.pg_major),
    }
}

fn kind_word(name: &WalFileName) -> &'static str {
    match name.kind {
        WalFileKind::Segment => "WAL segment",
        WalFileKind::Partial => "partial WAL segment",
        WalFileKind::History => "timeline history",
        WalFileKind::Backup { .. } => "backup history",
    }
}

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
    let (data, via) = match from_daemon(cfg, &name, local).await {
        Some(Ok(data)) => (data, "daemon"),
        Some(Err(e)) => return Err(e),
        None => (from_storage(cfg, &name).await?, "storage"),
    };
    fsutil::write_atomic(dest, &data)
        .with_context(|| format!("writing {}", dest.display()))
        .map_err(FetchError::Failed)?;
    tracing::info!(wal = %name, bytes = data.len(), via, ms = started.elapsed().as_millis(), dest = %dest.display(), "fetched");
    Ok(FetchReport {
        name,
        bytes: data.len(),
    })
}

/// Asks the daemon at `listen`. None: no daemon answered for this cluster (use storage);
/// Some(Err(NotInArchive)): the daemon looked in storage and the file is not there.
async fn from_daemon(
    cfg: &Config,
    name: &WalFileName,
    sysid: Option<u64>,
) -> Option<Result<Vec<u8>, FetchError>> {
    let sysid = sysid?;
    let path = format!("/wal/{name}?system_identifier={sysid}");
    let r = match crate::http_client::request(
        cfg.listen,
        "GET",
        &path,
        cfg.retry.request_timeout,
        1 << 30,
    )
    .await
    {
        Ok(r) => r,
        Err(e) => {
            tracing::debug!("no daemon at {}: {e:#}", cfg.listen);
            return None;
        }
    };
    match r.status {
        200 => {
            // Verified again here: the daemon's copy crossed a socket and a cache.
            let want = r.header("x-pgkeep-sha256").unwrap_or_default().to_string();
            let got = hex::encode(
                crate::storage::object::Header::for_content(crate::codec::Codec::None, &r.body)
                    .plain_sha256,
            );
            let served: Option<WalFileName> =
                r.header("x-pgkeep-served").and_then(|n| n.parse().ok());
            let served = served.filter(|s| s.timeline == name.timeline && s.stem() == name.stem());
            if want != got || served.is_none() {
                tracing::warn!(wal = %name, "the daemon's answer did not verify; reading storage directly");
                return None;
            }
            let served = served.expect("checked");
            if matches!(served.kind, WalFileKind::Segment | WalFileKind::Partial)
                && let Err(e) = walheader::check_segment(&served, &r.body, Some(sysid))
            {
                tracing::warn!(wal = %name, "the daemon's copy is not this segment ({e}); reading storage directly");
                return None;
            }
            Some(Ok(r.body))
        }
        404 => Some(Err(FetchError::NotInArchive(name.to_string()))),
        code => {
            tracing::debug!(wal = %name, code, "the daemon cannot serve it; reading storage directly");
            None
        }
    }
}

/// Reads a WAL file straight from storage.
async fn from_storage(cfg: &Config, name: &WalFileName) -> Result<Vec<u8>, FetchError> {
    let repo = Repo::open(cfg, false)?;
    // A missing marker or cluster means misconfiguration (wrong URL, wrong cluster), never "this WAL
    // file does not exist": answering 1 there would end recovery early and silently.
    repo.check_format().await?;
    let system_identifier = cluster::resolve_system_identifier(cfg, &repo).await?;
    let cluster = ClusterLayout::new(system_identifier);
    if !repo.exists(&cluster.info()).await? {
        return Err(anyhow!(
            "storage {} holds no archive for the cluster with system identifier {system_identifier}",
            repo.url()
        )
        .into());
    }
    Ok(fetch_verified(&repo, &cluster, name).await?.0)
}

/// The verified content of a WAL file and the name it was stored under: a segment that exists only
/// as the `.partial` the daemon streamed (the last WAL before a crash or shutdown) is served from
/// that, and Postgres replays it up to its valid end, then ends recovery there.
pub async fn fetch_verified(
    repo: &Repo,
    cluster: &ClusterLayout,
    name: &WalFileName,
) -> Result<(Vec<u8>, WalFileName), FetchError> {
    let (data, served) = match repo.get(&cluster.wal(name)).await {
        Ok(d) => (d, *name),
        Err(StorageError::NotFound { .. }) if name.kind == WalFileKind::Segment => {
            let partial = name.with_kind(WalFileKind::Partial);
            // Postgres' own .partial (archived at the end of a timeline), else the daemon's upload
            // of the segment it was receiving.
            let mut found = None;
            for key in [cluster.wal(&partial), cluster.streaming_partial(name)] {
                match repo.get(&key).await {
                    Ok(d) => {
                        found = Some(d);
                        break;
                    }
                    Err(StorageError::NotFound { .. }) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            match found {
                Some(d) => {
                    tracing::info!(wal = %name, "only the partial segment is in the archive: serving it");
                    (d, partial)
                }
                None => return Err(FetchError::NotInArchive(name.to_string())),
            }
        }
        Err(StorageError::NotFound { .. }) => {
            return Err(FetchError::NotInArchive(name.to_string()));
        }
        Err(e) => return Err(e.into()),
    };
    if matches!(served.kind, WalFileKind::Segment | WalFileKind::Partial) {
        walheader::check_segment(&served, &data, Some(cluster.system_identifier))
            .map_err(anyhow::Error::from)?;
    }
    Ok((data, served))
}
