//! The only place object keys are built. The layout is documented in `docs/storage-format.md`;
//! change both together and bump [`LAYOUT_VERSION`] when old readers could misread the new layout.
//!
//! ```text
//! pgkeep.json                                  format marker: {"format": "pgkeep", "layout_version": 1}
//! clusters/<system identifier>/cluster.json    which cluster this is (system identifier, segment size)
//! clusters/<system identifier>/wal/<TLI>/<WAL file name>
//! clusters/<system identifier>/streaming/<TLI>/<segment>.partial     the daemon's open segment
//! clusters/<system identifier>/streaming/<TLI>/<segment>.pieces/<start>-<end>   what follows it
//! clusters/<system identifier>/basebackups/<backup id>/backup.json       written last: the backup exists
//! clusters/<system identifier>/basebackups/<backup id>/backup_manifest
//! clusters/<system identifier>/basebackups/<backup id>/data/<archive>/<chunk number, 6 digits>
//! ```
//!
//! Every cluster lives under its own system identifier, so two clusters never mix.

use object_store::path::Path;

use crate::pg::WalFileName;

pub const LAYOUT_VERSION: u32 = 2;
pub const FORMAT_NAME: &str = "pgkeep";

/// The format marker at the root of the storage prefix.
pub fn format_marker() -> Path {
    Path::from("pgkeep.json")
}

/// The folder holding one folder per cluster.
pub fn clusters() -> Path {
    Path::from("clusters")
}

/// Keys of one cluster's objects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClusterLayout {
    pub system_identifier: u64,
}

impl ClusterLayout {
    pub fn new(system_identifier: u64) -> Self {
        ClusterLayout { system_identifier }
    }

    pub fn root(&self) -> Path {
        clusters().join(self.system_identifier.to_string())
    }

    pub fn info(&self) -> Path {
        self.root().join("cluster.json")
    }

    /// The folder of every timeline's archived WAL.
    pub fn wal_root(&self) -> Path {
        self.root().join("wal")
    }

    /// The folder of the daemon's uploads of the segments it is still receiving.
    pub fn streaming_root(&self) -> Path {
        self.root().join("streaming")
    }

    /// The folder of one timeline's WAL.
    pub fn wal_dir(&self, timeline: crate::pg::TimelineId) -> Path {
        self.wal_root().join(format!("{:08X}", timeline.get()))
    }

    /// The daemon's upload of the segment it is still receiving (`<segment>.partial`), kept apart
    /// from the `.partial` files Postgres archives so that the two writers never meet.
    pub fn streaming_partial(&self, segment: &WalFileName) -> Path {
        let partial = segment.with_kind(crate::pg::WalFileKind::Partial);
        self.streaming_root()
            .join(format!("{:08X}", segment.timeline.get()))
            .join(partial.to_string())
    }

    /// The folder of the pieces that continue the open segment's `.partial`: each holds the
    /// segment's bytes `start .. end` (offsets in the segment, 8 hex digits each).
    pub fn streaming_pieces(&self, segment: &WalFileName) -> Path {
        let seg = segment.with_kind(crate::pg::WalFileKind::Segment);
        self.streaming_root()
            .join(format!("{:08X}", segment.timeline.get()))
            .join(format!("{seg}.pieces"))
    }

    /// One piece of the open segment: its bytes `start .. end`.
    pub fn streaming_piece(&self, segment: &WalFileName, start: u64, end: u64) -> Path {
        self.streaming_pieces(segment)
            .join(format!("{start:08X}-{end:08X}"))
    }

    /// The segment, start and end of a piece's key, as [`ClusterLayout::streaming_piece`] builds
    /// it; `None` for any other key (a forged name is no piece).
    pub fn parse_piece(&self, key: &Path) -> Option<(WalFileName, u64, u64)> {
        let parts: Vec<_> = key.parts().collect();
        let [.., tli, folder, range] = parts.as_slice() else {
            return None;
        };
        let segment: WalFileName = folder.as_ref().strip_suffix(".pieces")?.parse().ok()?;
        if segment.kind != crate::pg::WalFileKind::Segment
            || tli.as_ref() != format!("{:08X}", segment.timeline.get())
        {
            return None;
        }
        let (start, end) = range.as_ref().split_once('-')?;
        let hex = |s: &str| {
            (s.len() == 8 && s.bytes().all(|b| b.is_ascii_hexdigit()))
                .then(|| u64::from_str_radix(s, 16).ok())
                .flatten()
        };
        let (start, end) = (hex(start)?, hex(end)?);
        (start < end && *key == self.streaming_piece(&segment, start, end))
            .then_some((segment, start, end))
    }

    /// A WAL file's key: segments, `.partial`, `.history` and `.backup` files all live in their
    /// timeline's folder under their own (validated) name.
    pub fn wal(&self, name: &WalFileName) -> Path {
        self.wal_dir(name.timeline).join(name.to_string())
    }
}

impl ClusterLayout {
    /// The folder of the marks (`pgkeep mark`): `<name>.json` each.
    pub fn marks_dir(&self) -> Path {
        self.root().join("marks")
    }

    /// A mark's record; `name` is checked by `mark::check_name` before it gets here.
    pub fn mark(&self, name: &str) -> Path {
        self.marks_dir().join(format!("{name}.json"))
    }

    /// The record of a rollback to a mark that was done (`restore --rollback-to`).
    pub fn rollback(&self, mark: &str) -> Path {
        self.root().join("rollbacks").join(format!("{mark}.json"))
    }

    pub fn backups_dir(&self) -> Path {
        self.root().join("basebackups")
    }

    pub fn backup_dir(&self, id: &BackupId) -> Path {
        self.backups_dir().join(id.as_str())
    }

    /// The metadata object whose presence makes a backup exist.
    pub fn backup_meta(&self, id: &BackupId) -> Path {
        self.backup_dir(id).join("backup.json")
    }

    pub fn backup_manifest(&self, id: &BackupId) -> Path {
        self.backup_dir(id).join("backup_manifest")
    }

    /// Where each of a backup's files has its bytes (`storage::index`).
    pub fn backup_files(&self, id: &BackupId) -> Path {
        self.backup_dir(id).join("files.json")
    }

    /// Chunk `seq` of the tar archive `archive` (`base.tar`, or `<tablespace oid>.tar`).
    pub fn backup_chunk(&self, id: &BackupId, archive: &ArchiveName, seq: usize) -> Path {
        self.backup_dir(id)
            .join("data")
            .join(archive.stem())
            .join(format!("{seq:06}"))
    }
}

/// A backup's id: the UTC time it started, `YYYYMMDDTHHMMSSZ`, so ids sort by age.
#[derive(
    Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(try_from = "String", into = "String")]
pub struct BackupId(String);

impl BackupId {
    pub fn from_time(t: chrono::DateTime<chrono::Utc>) -> BackupId {
        BackupId(t.format("%Y%m%dT%H%M%SZ").to_string())
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
    /// The time the backup started (to the second), which the id records.
    pub fn time(&self) -> chrono::DateTime<chrono::Utc> {
        chrono::NaiveDateTime::parse_from_str(&self.0, "%Y%m%dT%H%M%SZ")
            .expect("validated")
            .and_utc()
    }
}

impl std::str::FromStr for BackupId {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        chrono::NaiveDateTime::parse_from_str(s, "%Y%m%dT%H%M%SZ")
            .ok()
            .filter(|_| s.len() == 16)
            .map(|_| BackupId(s.to_string()))
            .ok_or_else(|| {
                format!(
                    "{:?} is not a backup id (like 20261121T234512Z)",
                    s.chars().take(40).collect::<String>()
                )
            })
    }
}

impl TryFrom<String> for BackupId {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<BackupId> for String {
    fn from(id: BackupId) -> String {
        id.0
    }
}

impl std::fmt::Display for BackupId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The name of one of a base backup's tar archives, as the server sends it: `base.tar` for the data
/// directory, `<oid>.tar` for a tablespace. Anything else is refused before it becomes a key.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ArchiveName(String);

impl ArchiveName {
    pub fn stem(&self) -> &str {
        self.0.strip_suffix(".tar").expect("validated")
    }
    /// The tablespace's OID, or None for the data directory's archive.
    pub fn tablespace_oid(&self) -> Option<u32> {
        self.stem().parse().ok()
    }

    /// What the backup manifest puts before the paths of this archive's files: `pg_tblspc/<oid>/`
    /// for a tablespace, nothing for the data directory.
    pub fn manifest_prefix(&self) -> String {
        self.tablespace_oid()
            .map(|oid| format!("pg_tblspc/{oid}/"))
            .unwrap_or_default()
    }
}

impl TryFrom<String> for ArchiveName {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        let ok = match s.strip_suffix(".tar") {
            Some("base") => true,
            Some(oid) => {
                !oid.is_empty() && oid.len() <= 10 && oid.bytes().all(|b| b.is_ascii_digit())
            }
            None => false,
        };
        if ok {
            Ok(ArchiveName(s))
        } else {
            Err(format!("unexpected archive name {s:?} in a base backup"))
        }
    }
}

impl From<ArchiveName> for String {
    fn from(a: ArchiveName) -> String {
        a.0
    }
}

/// The system identifier of a cluster folder's name, if it is one.
pub fn parse_cluster_dir(name: &str) -> Option<u64> {
    (!name.is_empty() && name.bytes().all(|b| b.is_ascii_digit()) && !name.starts_with('0'))
        .then(|| name.parse().ok())
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_follow_the_documented_layout() {
        let c = ClusterLayout::new(7312345678901234567);
        assert_eq!(
            c.info().as_ref(),
            "clusters/7312345678901234567/cluster.json"
        );
        let seg: WalFileName = "00000002000000000000000A".parse().unwrap();
        assert_eq!(
            c.wal(&seg).as_ref(),
            "clusters/7312345678901234567/wal/00000002/00000002000000000000000A"
        );
        let hist: WalFileName = "00000002.history".parse().unwrap();
        assert_eq!(
            c.wal(&hist).as_ref(),
            "clusters/7312345678901234567/wal/00000002/00000002.history"
        );
        assert_eq!(format_marker().as_ref(), "pgkeep.json");
        assert_eq!(
            c.streaming_partial(&seg).as_ref(),
            "clusters/7312345678901234567/streaming/00000002/00000002000000000000000A.partial"
        );
    }

    #[test]
    fn piece_keys_round_trip_and_forged_ones_are_refused() {
        let c = ClusterLayout::new(7312345678901234567);
        let seg: WalFileName = "00000002000000000000000A".parse().unwrap();
        let key = c.streaming_piece(&seg, 0x2000, 0x2F10);
        assert_eq!(
            key.as_ref(),
            "clusters/7312345678901234567/streaming/00000002/00000002000000000000000A.pieces/00002000-00002F10"
        );
        assert_eq!(c.parse_piece(&key), Some((seg, 0x2000, 0x2F10)));
        for forged in [
            "clusters/7312345678901234567/streaming/00000002/00000002000000000000000A.pieces/00002F10-00002000",
            "clusters/7312345678901234567/streaming/00000002/00000002000000000000000A.pieces/2000-2F10",
            "clusters/7312345678901234567/streaming/00000003/00000002000000000000000A.pieces/00002000-00002F10",
            "clusters/1/streaming/00000002/00000002000000000000000A.pieces/00002000-00002F10",
            "clusters/7312345678901234567/streaming/00000002/00000002.history.pieces/00002000-00002F10",
            "clusters/7312345678901234567/streaming/00000002/00000002000000000000000A.partial",
        ] {
            assert_eq!(c.parse_piece(&Path::from(forged)), None, "{forged}");
        }
    }

    #[test]
    fn backup_keys() {
        let c = ClusterLayout::new(42);
        let id: BackupId = "20261121T234512Z".parse().unwrap();
        let base = ArchiveName::try_from("base.tar".to_string()).unwrap();
        let ts = ArchiveName::try_from("16385.tar".to_string()).unwrap();
        assert_eq!(
            c.backup_meta(&id).as_ref(),
            "clusters/42/basebackups/20261121T234512Z/backup.json"
        );
        assert_eq!(
            c.backup_chunk(&id, &base, 3).as_ref(),
            "clusters/42/basebackups/20261121T234512Z/data/base/000003"
        );
        assert_eq!(
            c.backup_chunk(&id, &ts, 0).as_ref(),
            "clusters/42/basebackups/20261121T234512Z/data/16385/000000"
        );
        assert_eq!(ts.tablespace_oid(), Some(16385));
        assert_eq!(base.tablespace_oid(), None);
        for bad in [
            "../x.tar",
            "base",
            "pg_wal.tar",
            ".tar",
            "12a.tar",
            "base.tar/x",
        ] {
            assert!(ArchiveName::try_from(bad.to_string()).is_err(), "{bad}");
        }
        for bad in [
            "",
            "2026",
            "20261321T000000Z",
            "20261121T234512Z/..",
            "x0261121T234512Z",
        ] {
            assert!(bad.parse::<BackupId>().is_err(), "{bad}");
        }
    }

    #[test]
    fn cluster_folder_names() {
        assert_eq!(
            parse_cluster_dir("7312345678901234567"),
            Some(7312345678901234567)
        );
        for bad in ["", "0", "012", "abc", "99999999999999999999", "1/2"] {
            assert_eq!(parse_cluster_dir(bad), None, "{bad}");
        }
    }
}
