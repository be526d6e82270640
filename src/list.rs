//! `pgkeep list`: the complete base backups, newest first (each with its kind, its parent when it
//! is incremental, and the size it added), and the recoverable window.

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::mark::Mark;
use crate::pg::{Lsn, TimelineId};
use crate::progress::human_bytes;
use crate::storage::{Archive, BackupMeta};

#[derive(Debug, Serialize)]
pub struct Inventory {
    /// As a string, as in the stored metadata (JSON readers lose precision past 2^53).
    pub system_identifier: String,
    pub backups: Vec<BackupMeta>,
    pub recoverable_window: Option<Window>,
    /// Named points to restore to (`pgkeep mark`), oldest first.
    pub marks: Vec<Mark>,
    /// `backup.json` (or mark) files that cannot be read: each names its object and why.
    pub damaged: Vec<String>,
}

/// From the end of the oldest backup (the earliest consistent point) to where the WAL in storage
/// ends ([`Archive::wal_end`]: the daemon's `/status` `durable_lsn` is the same point).
#[derive(Debug, Serialize)]
pub struct Window {
    pub from_time: DateTime<Utc>,
    pub from_lsn: Lsn,
    pub to_lsn: Lsn,
    pub to_timeline: TimelineId,
    /// When that last segment reached storage.
    pub to_archived_at: DateTime<Utc>,
}

/// The backups of the archive and the window they and the WAL after them make recoverable.
pub async fn inventory(archive: &Archive) -> anyhow::Result<Inventory> {
    let (backups, damaged) = archive.backups_and_damaged().await?;
    let mut damaged: Vec<String> = damaged.iter().map(|e| e.to_string()).collect();
    let (marks, bad) = archive.marks().await?;
    damaged.extend(bad.iter().map(|e| e.to_string()));
    let recoverable_window = match backups.last() {
        None => None,
        Some(oldest) => {
            let size = oldest.wal_segment_size;
            archive
                .wal_end(size)
                .await?
                .map(|(to_lsn, to_timeline, at)| Window {
                    from_time: oldest.end_time,
                    from_lsn: oldest.end_lsn,
                    to_lsn,
                    to_timeline,
                    to_archived_at: at,
                })
        }
    };
    Ok(Inventory {
        system_identifier: archive.system_identifier().to_string(),
        backups,
        recoverable_window,
        marks,
        damaged,
    })
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
            "{:<17} {:<11} {:<20} {:>8} {:<14} {:<14} {:>3} {:>10} {:>10}  {:<17} {}\n",
            "ID",
            "KIND",
            "FINISHED (UTC)",
            "SECONDS",
            "START LSN",
            "END LSN",
            "TL",
            "SIZE",
            "STORED",
            "PARENT",
            "ENCRYPTED TO"
        ));
    }
    for b in &inv.backups {
        out.push_str(&format!(
            "{:<17} {:<11} {:<20} {:>8.1} {:<14} {:<14} {:>3} {:>10} {:>10}  {:<17} {}\n",
            b.id.to_string(),
            b.kind.to_string(),
            b.end_time.format("%Y-%m-%d %H:%M:%S").to_string(),
            (b.end_time - b.start_time).num_milliseconds() as f64 / 1000.0,
            b.start_lsn.to_string(),
            b.end_lsn.to_string(),
            b.timeline.get(),
            human_bytes(b.plain_bytes),
            human_bytes(b.stored_bytes),
            b.parent
                .as_ref()
                .map_or_else(|| "-".to_string(), |p| p.to_string()),
            if b.encrypted_to.is_empty() {
                "-".to_string()
            } else {
                b.encrypted_to.join(",")
            },
        ));
    }
    for d in &inv.damaged {
        out.push_str(&format!("DAMAGED {d} (not listed: run pgkeep verify)\n"));
    }
    if !inv.marks.is_empty() {
        out.push_str(&format!(
            "{} mark(s) (restore --target-name NAME):\n{:<32} {:<20} {:<14} {:>3}  {}\n",
            inv.marks.len(),
            "NAME",
            "TAKEN (UTC)",
            "LSN",
            "TL",
            "NOTE"
        ));
        for m in &inv.marks {
            out.push_str(&format!(
                "{:<32} {:<20} {:<14} {:>3}  {}\n",
                m.name,
                m.time.format("%Y-%m-%d %H:%M:%S").to_string(),
                m.lsn.to_string(),
                m.timeline.get(),
                m.note
            ));
        }
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
