//! `archive-push` (for `archive_command`): check a WAL file, encode it, upload it, verify it.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, anyhow, bail};

use crate::cluster::local_system_identifier;
use crate::config::Config;
use crate::pg::walheader::{self, SegmentHeader};
use crate::pg::{WalFileKind, WalFileName};
use crate::storage::{Archive, ClusterInfo, PutOutcome, Repo};

/// Largest history or backup-label file accepted: real ones are a few hundred bytes.
const MAX_SMALL_FILE: u64 = 16 << 20;

/// What `archive-push` did.
#[derive(Debug)]
pub struct PushReport {
    pub name: WalFileName,
    pub system_identifier: u64,
    pub outcome: PutOutcome,
}

/// How long `archive-push` waits for the daemon's answer (the daemon itself waits up to 20 s for
/// an upload its stream has begun).
const DAEMON_ANSWER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(25);

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

    // Hashed once: for the daemon's answer, the stored header and the comparison with a copy
    // already stored.
    let sha = crate::storage::object::content_sha256(&data);
    if name.kind == WalFileKind::Segment
        && cfg.archive_via_daemon
        && stored_by_daemon(cfg, &name, system_identifier, &sha).await
    {
        tracing::info!(wal = %name, system_identifier, ms = started.elapsed().as_millis(), "already in storage: the daemon's stream stored it with identical content");
        return Ok(PushReport {
            name,
            system_identifier,
            outcome: PutOutcome::AlreadyPresent,
        });
    }
    let repo = Repo::open(&cfg.storage_settings(), true)?;
    let info = cluster_info(system_identifier, header.as_ref());
    let key = Archive::new(repo.clone(), system_identifier)
        .layout()
        .wal(&name);
    // Written only into this cluster's archive; whether the segment is there already, and its
    // encoding, are found out meanwhile.
    let gate = async { repo.ensure_cluster(&info).await.map(|_| ()) };
    let len = data.len();
    let outcome = repo
        .put_new_known_after(gate, &key, data.into(), sha, cfg.codec)
        .await?;
    let ms = started.elapsed().as_millis();
    match outcome {
        PutOutcome::Stored { stored_len } | PutOutcome::Repaired { stored_len } => tracing::info!(
            wal = %name,
            system_identifier,
            bytes = len,
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

/// Whether the daemon at `listen` proves (with its token) that its stream stored segment `name`
/// of this cluster with content of SHA-256 `sha`. Any other answer, or none, is a no: then the
/// caller stores the segment itself.
async fn stored_by_daemon(
    cfg: &Config,
    name: &WalFileName,
    system_identifier: u64,
    sha: &[u8; 32],
) -> bool {
    let sha = hex::encode(sha);
    let path = format!("/archived/{name}?system_identifier={system_identifier}&sha256={sha}");
    let answer = match crate::http_token::ask(
        cfg.listen,
        &cfg.http_token_file,
        &path,
        DAEMON_ANSWER_TIMEOUT,
        4096,
    )
    .await
    {
        Ok(a) => a,
        Err(e) => {
            tracing::debug!("no word from the daemon ({e}): storing the segment here");
            return false;
        }
    };
    let r = &answer.response;
    match r.status {
        200 => {
            let subject = crate::http_token::archived_subject(&name.to_string(), &sha);
            let proven = answer.proves(&subject);
            if !proven {
                tracing::warn!(listen = %cfg.listen, "what answers on listen did not prove it is this pod's pgkeep daemon (no or a wrong proof of the token in {}): storing the segment here", cfg.http_token_file.display());
            }
            proven
        }
        404 => {
            tracing::debug!(wal = %name, "the daemon's stream has not stored it: storing it here");
            false
        }
        code => {
            let text = String::from_utf8_lossy(&r.body);
            tracing::warn!(wal = %name, code, "the daemon answered: {}; storing the segment here", text.trim());
            false
        }
    }
}

fn cluster_info(system_identifier: u64, header: Option<&SegmentHeader>) -> ClusterInfo {
    ClusterInfo {
        system_identifier,
        wal_segment_size: header.map(|h| h.seg_size),
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
