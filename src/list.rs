//! `pgkeep list`: the complete base backups, newest first, and the recoverable window.

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::backup::{self, BackupMeta};
use crate::cluster;
use crate::config::Config;
use crate::pg::{TimelineId, WalFileKind, WalFileName, WalSegSize};
use crate::progress::human_bytes;
use crate::storage::{ClusterLayout, Repo};

#[derive(Debug, Serialize)]
pub struct Inventory {
    pub system_identifier: String,
    pub backups: Vec<BackupMeta>,
    pub recoverable_window: Option<Window>,
}

/// From the end of the oldest backup (the earliest consistent point) to the end of the newest
/// archived WAL segment.
#[derive(Debug, Serialize)]
pub struct Window {
    pub from_time: DateTime<Utc>,
    pub from_lsn: String,
    pub to_lsn: String,
    pub to_timeline: u32,
    /// When that last segment reached storage.
    pub to_archived_at: DateTime<Utc>,
}

pub async fn inventory(cfg: &Config) -> anyhow::Result<Inventory> {
    let repo = Repo::open(cfg, false)?;
    repo.check_format().await?;
    let system_identifier = cluster::resolve_system_identifier(cfg, &repo).await?;
    let cluster = ClusterLayout::new(system_identifier);
    let backups = backup::list_backups(&repo, &cluster).await?;
    let recoverable_window = match backups.last() {
        None => None,
        Some(oldest) => newest_wal(&repo, &cluster, oldest.seg_size())
            .await?
            .map(|(name, at)| {
                let size = oldest.seg_size();
                let seg = name.segment_no(size).expect("checked");
                Window {
                    from_time: oldest.end_time,
                    from_lsn: oldest.end_lsn.clone(),
                    to_lsn: size.start_of(crate::pg::SegmentNo(seg.0 + 1)).to_string(),
                    to_timeline: name.timeline.get(),
                    to_archived_at: at,
                }
            }),
    };
    Ok(Inventory {
        system_identifier: system_identifier.to_string(),
        backups,
        recoverable_window,
    })
}

/// The newest complete segment in storage (highest timeline, then highest segment) and its upload time.
async fn newest_wal(
    repo: &Repo,
    cluster: &ClusterLayout,
    size: WalSegSize,
) -> anyhow::Result<Option<(WalFileName, DateTime<Utc>)>> {
    let mut best: Option<(TimelineId, u64, WalFileName, DateTime<Utc>)> = None;
    for m in repo.list_meta(&cluster.root().join("wal")).await? {
        let Some(Ok(name)) = m.location.filename().map(str::parse::<WalFileName>) else {
            continue;
        };
        if name.kind != WalFileKind::Segment {
            continue;
        }
        let Ok(seg) = name.segment_no(size) else {
            continue;
        };
        if best
            .as_ref()
            .is_none_or(|(t, s, _, _)| (name.timeline, seg.0) > (*t, *s))
        {
            best = Some((name.timeline, seg.0, name, m.last_modified));
        }
    }
    Ok(best.map(|(_, _, n, at)| (n, at)))
}

/// The human-readable listing.
pub fn render(inv: &Inventory) -> String {
    let mut out = format!(
        "cluster {}: {} base backup(s)\n",
        inv.system_identifier,
        inv.backups.len()
    );
    if !inv.backups.is_empty() {
        out.push_str(&format!(
            "{:<17} {:<20} {:>8} {:<14} {:<14} {:>3} {:>10} {:>10}\n",
            "ID", "FINISHED (UTC)", "SECONDS", "START LSN", "END LSN", "TL", "SIZE", "STORED"
        ));
    }
    for b in &inv.backups {
        out.push_str(&format!(
            "{:<17} {:<20} {:>8.1} {:<14} {:<14} {:>3} {:>10} {:>10}\n",
            b.id.to_string(),
            b.end_time.format("%Y-%m-%d %H:%M:%S").to_string(),
            (b.end_time - b.start_time).num_milliseconds() as f64 / 1000.0,
            b.start_lsn,
            b.end_lsn,
            b.timeline,
            human_bytes(b.plain_bytes),
            human_bytes(b.stored_bytes),
        ));
    }
    match &inv.recoverable_window {
        Some(w) => out.push_str(&format!(
            "recoverable: from {} (LSN {}) to LSN {} on timeline {} (WAL archived at {})\n",
            w.from_time.format("%Y-%m-%d %H:%M:%S UTC"),
            w.from_lsn,
            w.to_lsn,
            w.to_timeline,
            w.to_archived_at.format("%Y-%m-%d %H:%M:%S UTC")
        )),
        None if inv.backups.is_empty() => out.push_str("recoverable: nothing (no base backup)\n"),
        None => out.push_str(
            "recoverable: to the end of the newest backup only (no WAL archived after it)\n",
        ),
    }
    out
}
