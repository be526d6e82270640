//! `archive-push` (for `archive_command`): check a WAL file, encode it, upload it, verify it.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, anyhow, bail};

use crate::cluster::local_system_identifier;
use crate::config::Config;
use crate::pg::walheader::{self, SegmentHeader};
use crate::pg::{WalFileKind, WalFileName};
use crate::storage::{ClusterInfo, PutOutcome, Repo};

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

    let repo = Repo::open(&cfg.storage_settings(), true)?;
    let archive = repo
        .ensure_cluster(&cluster_info(system_identifier, header.as_ref()))
        .await?;
    let outcome = repo
        .put_new(&archive.layout().wal(&name), &data, cfg.codec)
        .await?;
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
