//! The typed catalog of one cluster's archive: the format marker, the cluster record
//! (`cluster.json`), base backups (`backup.json`) and which WAL they need. The stored JSON is the
//! format documented in `docs/storage-format.md`; the types here only read and write it.

use std::collections::HashSet;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::archive::Archive;
use super::layout::{self, ArchiveName, BackupId};
use super::pieces;
use super::repo::{Repo, StorageError};
use crate::codec::Codec;
use crate::pg::{Lsn, SegmentNo, TimelineId, WalFileKind, WalFileName, WalSegSize};

/// Version of a full backup's `backup.json`; readers refuse newer ones.
pub const META_VERSION: u32 = 1;
/// Version of an incremental backup's `backup.json`: a pgkeep that reads only version 1 would take
/// it for a full backup and restore a directory Postgres cannot start, so it must refuse it.
pub const META_VERSION_INCREMENTAL: u32 = 2;
/// The longest chain of backups (a full and the incrementals on it) a restore follows: a loop or an
/// absurd chain in forged metadata ends here.
pub const MAX_CHAIN: usize = 100;

/// What a backup holds: every file (`full`); on Postgres 17 and later, the blocks changed since its
/// parent (`incremental`; restored on top of its parent's restore); on 13 to 16, the files changed
/// since its parent, the others referring to where the chain stored them (`delta`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackupKind {
    #[default]
    Full,
    Incremental,
    Delta,
}

impl BackupKind {
    pub fn is_full(&self) -> bool {
        *self == BackupKind::Full
    }
}

impl std::fmt::Display for BackupKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BackupKind::Full => "full",
            BackupKind::Incremental => "incremental",
            BackupKind::Delta => "delta",
        })
    }
}

/// A `u64` stored as a decimal string: JSON readers often lose precision past 2^53.
mod decimal {
    use serde::{Deserialize, Deserializer, Serializer};
    pub fn serialize<S: Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(v)
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        text.parse()
            .map_err(|_| serde::de::Error::custom(format!("{text:?} is not a system identifier")))
    }
}

/// `pgkeep.json` at the root of the storage prefix.
#[derive(Debug, Serialize, Deserialize)]
struct FormatMarker {
    format: String,
    layout_version: u32,
}

/// `clusters/<id>/cluster.json`: which cluster the folder holds.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ClusterInfo {
    #[serde(with = "decimal")]
    pub system_identifier: u64,
    /// Unknown to a writer that saw no segment (archive-push of a history file).
    pub wal_segment_size: Option<WalSegSize>,
    pub pg_major: Option<u32>,
}

impl From<&crate::pg::replication::ServerIdentity> for ClusterInfo {
    fn from(server: &crate::pg::replication::ServerIdentity) -> ClusterInfo {
        ClusterInfo {
            system_identifier: server.system_identifier,
            wal_segment_size: Some(server.seg_size),
            pg_major: Some(server.major()),
        }
    }
}

/// `backup.json`: everything needed to list, choose and restore a backup. Its presence is what
/// makes the backup exist.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BackupMeta {
    pub meta_version: u32,
    pub id: BackupId,
    pub label: String,
    #[serde(with = "decimal")]
    pub system_identifier: u64,
    pub pg_version: String,
    pub wal_segment_size: WalSegSize,
    pub timeline: TimelineId,
    /// Where recovery starts (the backup's checkpoint redo point).
    pub start_lsn: Lsn,
    /// Where the backup becomes consistent: recovery must replay at least up to here.
    pub end_lsn: Lsn,
    pub start_time: DateTime<Utc>,
    pub end_time: DateTime<Utc>,
    /// Codec of the chunks (each chunk's own header also says).
    pub codec: Codec,
    pub archives: Vec<ArchiveMeta>,
    /// The checksum of the backup manifest's object (its header's: of the plain manifest, or of
    /// the stored bytes when encrypted).
    pub manifest_sha256: String,
    pub plain_bytes: u64,
    pub stored_bytes: u64,
    /// The fingerprints of the age recipients its chunks and manifest are encrypted to (empty:
    /// not encrypted). Tells which identities a restore of it needs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub encrypted_to: Vec<String>,
    /// Full (absent in the stored form) or incremental.
    #[serde(default, skip_serializing_if = "BackupKind::is_full")]
    pub kind: BackupKind,
    /// The backup an incremental one was taken against (its changed blocks are relative to it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<BackupId>,
    /// The checksum of the file index (`files.json`: where each file's bytes are), when the
    /// backup has one (every backup pgkeep takes now; a delta backup cannot do without).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files_sha256: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ArchiveMeta {
    pub name: ArchiveName,
    /// The tablespace's location on the backed-up server (None for the data directory).
    pub location: Option<String>,
    pub plain_bytes: u64,
    pub stored_bytes: u64,
    /// In order; chunk `i` is stored under `ClusterLayout::backup_chunk(id, name, i)`.
    pub chunks: Vec<ChunkMeta>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ChunkMeta {
    pub plain_len: u64,
    pub stored_len: u64,
    /// The checksum its object header records (of the plain chunk, or of the stored bytes when
    /// encrypted): a swapped chunk is caught.
    pub sha256: String,
}

impl BackupMeta {
    /// The WAL segments recovery needs to make this backup consistent.
    pub fn required_wal(&self) -> Vec<WalFileName> {
        required_wal(
            self.timeline,
            self.wal_segment_size,
            self.start_lsn,
            self.end_lsn,
        )
    }

    /// What the types cannot say: a version this pgkeep reads, exactly one `base.tar`, a parent
    /// exactly for an incremental backup, older than it.
    fn validate(&self) -> Result<(), String> {
        if self.meta_version > META_VERSION_INCREMENTAL {
            return Err(format!(
                "metadata version {} is newer than this pgkeep reads",
                self.meta_version
            ));
        }
        if self.end_lsn < self.start_lsn {
            return Err(format!(
                "ends ({}) before it starts ({})",
                self.end_lsn, self.start_lsn
            ));
        }
        let bases = self
            .archives
            .iter()
            .filter(|a| a.name.tablespace_oid().is_none())
            .count();
        if bases != 1 {
            return Err("a backup holds exactly one base.tar".into());
        }
        if self.kind == BackupKind::Delta && self.files_sha256.is_none() {
            return Err("a delta backup without a file index".into());
        }
        match (self.kind, &self.parent) {
            (BackupKind::Full, None) => {}
            (BackupKind::Incremental | BackupKind::Delta, Some(p)) if *p < self.id => {
                if self.meta_version < META_VERSION_INCREMENTAL {
                    return Err(
                        "an incremental backup under a metadata version that has none".into(),
                    );
                }
            }
            (BackupKind::Incremental | BackupKind::Delta, Some(p)) => {
                return Err(format!(
                    "an incremental backup on {p}, which is not older than it"
                ));
            }
            (BackupKind::Incremental | BackupKind::Delta, None) => {
                return Err("an incremental backup without a parent".into());
            }
            (BackupKind::Full, Some(_)) => return Err("a full backup with a parent".into()),
        }
        Ok(())
    }
}

/// The segments from the one holding `start` to the one holding the last byte before `end`.
pub fn required_wal(tli: TimelineId, size: WalSegSize, start: Lsn, end: Lsn) -> Vec<WalFileName> {
    let first = size.segment_of(start);
    let last = size.segment_of(Lsn(end.0.saturating_sub(1)).max(start));
    (first.0..=last.0)
        .map(|n| WalFileName::segment(tli, SegmentNo(n), size))
        .collect()
}

fn parse_json<'a, T: Deserialize<'a>>(
    key: &object_store::path::Path,
    raw: &'a [u8],
    what: &str,
) -> Result<T, StorageError> {
    serde_json::from_slice(raw).map_err(|e| StorageError::Corrupt {
        key: key.to_string(),
        reason: format!("not {what}: {e}"),
    })
}

impl Repo {
    /// Checks that the storage holds a pgkeep archive of a layout this version reads.
    pub async fn check_format(&self) -> Result<(), StorageError> {
        let key = layout::format_marker();
        let raw = match self.get(&key).await {
            Ok(raw) => raw,
            Err(StorageError::NotFound { .. }) => {
                return Err(StorageError::Setup {
                    url: self.url().to_string(),
                    message: "holds no pgkeep archive (no pgkeep.json at its root): check the storage URL".into(),
                });
            }
            Err(e) => return Err(e),
        };
        let marker: FormatMarker = parse_json(&key, &raw, "a format marker")?;
        if marker.format != layout::FORMAT_NAME || marker.layout_version > layout::LAYOUT_VERSION {
            return Err(StorageError::Setup {
                url: self.url().to_string(),
                message: format!(
                    "holds format {:?} layout version {}, which this pgkeep (layout {}) cannot read",
                    marker.format,
                    marker.layout_version,
                    layout::LAYOUT_VERSION
                ),
            });
        }
        Ok(())
    }

    /// Raises the format marker of storage written by an older layout to this one, before this
    /// pgkeep writes what older readers would misread (the open segment's pieces, layout 2): they
    /// then refuse the storage instead of missing the WAL at its end.
    pub async fn upgrade_layout(&self) -> Result<(), StorageError> {
        let key = layout::format_marker();
        let raw = self.get(&key).await?;
        let marker: FormatMarker = parse_json(&key, &raw, "a format marker")?;
        if marker.format != layout::FORMAT_NAME || marker.layout_version >= layout::LAYOUT_VERSION {
            return Ok(());
        }
        let new = FormatMarker {
            format: layout::FORMAT_NAME.into(),
            layout_version: layout::LAYOUT_VERSION,
        };
        let json = serde_json::to_vec_pretty(&new).expect("serialisable");
        self.put_overwrite_metadata(&key, &json).await?;
        tracing::info!(
            from = marker.layout_version,
            to = layout::LAYOUT_VERSION,
            "raised the storage layout version (the open segment is now stored in pieces; \
             pgkeep releases of layout {} refuse this storage from now on)",
            marker.layout_version
        );
        Ok(())
    }

    /// Whether the storage holds a pgkeep archive at all (`Ok(false)`: nothing was ever written
    /// here); an archive of a layout this version cannot read is an error.
    pub async fn holds_archive(&self) -> Result<bool, StorageError> {
        match self.check_format().await {
            Ok(()) => Ok(true),
            Err(StorageError::Setup { .. }) => {
                if !self.exists(&layout::format_marker()).await? {
                    return Ok(false);
                }
                // Written meanwhile by a racing writer (archive_command's first upload while a
                // backup starts, seen on S3), or of a layout this version cannot read: read again.
                self.check_format().await.map(|()| true)
            }
            Err(e) => Err(e),
        }
    }

    /// The system identifiers of the clusters in storage.
    pub async fn clusters(&self) -> Result<Vec<u64>, StorageError> {
        let mut ids: Vec<u64> = self
            .list_dirs(&layout::clusters())
            .await?
            .iter()
            .filter_map(|d| layout::parse_cluster_dir(d))
            .collect();
        ids.sort();
        Ok(ids)
    }

    /// Makes sure the storage holds the format marker and this cluster's `cluster.json`, writing
    /// them if missing, and returns the cluster's archive. Refuses storage written by a newer,
    /// incompatible layout.
    pub async fn ensure_cluster(&self, info: &ClusterInfo) -> Result<Archive, StorageError> {
        let archive = Archive::new(self.clone(), info.system_identifier);
        let key = archive.layout().info();
        // Storage in use holds both: read at once, one round trip (archive-push does this for
        // every segment). Anything else goes the long way, which writes what is missing.
        let (format, stored) = tokio::join!(self.check_format(), self.get(&key));
        if let (Ok(()), Ok(raw)) = (&format, stored) {
            same_cluster(&key, &raw, info)?;
            return Ok(archive);
        }
        // The marker was read already when it checked out.
        if format.is_err() && !self.holds_archive().await? {
            let marker = FormatMarker {
                format: layout::FORMAT_NAME.into(),
                layout_version: layout::LAYOUT_VERSION,
            };
            let json = serde_json::to_vec_pretty(&marker).expect("serialisable");
            self.put_new_metadata(&layout::format_marker(), &json)
                .await?;
        }
        let json = serde_json::to_vec_pretty(info).expect("serialisable");
        match self.put_new_metadata(&key, &json).await {
            Ok(_) => {}
            // Already described, perhaps less completely (archive-push of a history file knows
            // no segment size) or by a writer racing this one: the stored description of the
            // same cluster stands.
            Err(StorageError::Conflict { .. }) => {
                same_cluster(&key, &self.get(&key).await?, info)?;
            }
            Err(e) => return Err(e),
        }
        Ok(archive)
    }
}

/// Whether the stored cluster description `raw` (under `key`) is of the cluster `info` describes
/// (perhaps less completely, or more: the first writer's description stands).
fn same_cluster(
    key: &object_store::path::Path,
    raw: &[u8],
    info: &ClusterInfo,
) -> Result<(), StorageError> {
    let stored: ClusterInfo = parse_json(key, raw, "a cluster description")?;
    if stored.system_identifier != info.system_identifier {
        return Err(StorageError::Corrupt {
            key: key.to_string(),
            reason: format!(
                "describes cluster {}, not {}",
                stored.system_identifier, info.system_identifier
            ),
        });
    }
    Ok(())
}

impl Archive {
    /// Whether storage holds this cluster's `cluster.json`.
    pub async fn is_described(&self) -> Result<bool, StorageError> {
        self.repo().exists(&self.layout().info()).await
    }

    /// Reads and validates `backup.json` of `id`; `Ok(None)` when the backup does not exist (never
    /// finished).
    pub async fn backup(&self, id: &BackupId) -> Result<Option<BackupMeta>, StorageError> {
        let key = self.layout().backup_meta(id);
        let raw = match self.repo().get(&key).await {
            Ok(raw) => raw,
            Err(StorageError::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(e),
        };
        let meta: BackupMeta = parse_json(&key, &raw, "backup metadata")?;
        let corrupt = |reason: String| StorageError::Corrupt {
            key: key.to_string(),
            reason,
        };
        meta.validate().map_err(corrupt)?;
        if meta.id != *id || meta.system_identifier != self.system_identifier() {
            return Err(corrupt(format!(
                "describes backup {} of cluster {}, not this one",
                meta.id, meta.system_identifier
            )));
        }
        Ok(Some(meta))
    }

    /// The backups a restore of `meta` unpacks, oldest first: the full one its chain of parents
    /// starts from, each incremental on it, and `meta` last. Every parent must be in storage, of
    /// the same major and the same timeline or an earlier one, and end before its child starts;
    /// otherwise `meta` cannot be restored, and the error says which link is missing or wrong.
    pub async fn chain(&self, meta: &BackupMeta) -> anyhow::Result<Vec<BackupMeta>> {
        let mut chain = vec![meta.clone()];
        while let Some(parent) = chain.last().expect("not empty").parent.clone() {
            let child = chain.last().expect("not empty");
            if chain.len() >= MAX_CHAIN {
                anyhow::bail!(
                    "backup {} is at the end of a chain of more than {MAX_CHAIN} backups: refused as damaged",
                    meta.id
                );
            }
            let Some(p) = self.backup(&parent).await? else {
                anyhow::bail!(
                    "backup {} is incremental on backup {parent}, which is not in storage (deleted, or never \
                     completed): {} cannot be restored; restore an older full backup or take a new one",
                    child.id,
                    meta.id
                );
            };
            if p.pg_version.split('.').next() != child.pg_version.split('.').next()
                || p.wal_segment_size != child.wal_segment_size
                || p.timeline > child.timeline
                || p.end_lsn > child.start_lsn
            {
                anyhow::bail!(
                    "backup {} names {parent} as its parent, but that backup (Postgres {}, timeline {}, ends at {}) \
                     cannot be the parent of one of Postgres {} starting at {} on timeline {}: the metadata is damaged",
                    child.id,
                    p.pg_version,
                    p.timeline,
                    p.end_lsn,
                    child.pg_version,
                    child.start_lsn,
                    child.timeline
                );
            }
            chain.push(p);
        }
        chain.reverse();
        Ok(chain)
    }

    /// The ids of every backup folder, complete or not.
    pub async fn backup_folders(&self) -> Result<Vec<BackupId>, StorageError> {
        let dirs = self.repo().list_dirs(&self.layout().backups_dir()).await?;
        Ok(dirs.iter().filter_map(|d| d.parse().ok()).collect())
    }

    /// Every complete backup of the cluster, newest first. Folders without metadata (backups in
    /// progress or interrupted) are skipped; a damaged `backup.json` is an error.
    pub async fn backups(&self) -> Result<Vec<BackupMeta>, StorageError> {
        let (out, damaged) = self.backups_and_damaged().await?;
        match damaged.into_iter().next() {
            Some(e) => Err(e),
            None => Ok(out),
        }
    }

    /// As [`Archive::backups`], with the damaged `backup.json` files apart (as `Corrupt` errors
    /// naming them) instead of failing at the first: what `list` and `verify` report.
    pub async fn backups_and_damaged(
        &self,
    ) -> Result<(Vec<BackupMeta>, Vec<StorageError>), StorageError> {
        let (mut out, mut damaged) = (vec![], vec![]);
        for id in self.backup_folders().await? {
            match self.backup(&id).await {
                Ok(Some(meta)) => out.push(meta),
                Ok(None) => {}
                Err(e @ StorageError::Corrupt { .. }) => damaged.push(e),
                Err(e) => return Err(e),
            }
        }
        out.sort_by(|a, b| b.id.cmp(&a.id));
        Ok((out, damaged))
    }

    /// Writes `backup.json`: from then on the backup exists.
    pub async fn publish_backup(&self, meta: &BackupMeta) -> Result<(), StorageError> {
        let json = serde_json::to_vec_pretty(meta).expect("serialisable");
        self.repo()
            .put_new_metadata(&self.layout().backup_meta(&meta.id), &json)
            .await?;
        Ok(())
    }

    /// Deletes a backup: its metadata first (it stops existing), then its other objects.
    pub async fn delete_backup(&self, id: &BackupId) -> Result<(), StorageError> {
        self.repo().delete(&self.layout().backup_meta(id)).await?;
        self.delete_backup_folder(id).await
    }

    /// Deletes every object of a backup folder (what an unfinished backup left).
    pub async fn delete_backup_folder(&self, id: &BackupId) -> Result<(), StorageError> {
        for key in self.repo().list(&self.layout().backup_dir(id)).await? {
            self.repo().delete(&key).await?;
        }
        Ok(())
    }

    /// Whether the backup id's folder already holds objects (a backup running, or leftovers).
    pub async fn backup_folder_used(&self, id: &BackupId) -> Result<bool, StorageError> {
        Ok(!self
            .repo()
            .list(&self.layout().backup_dir(id))
            .await?
            .is_empty())
    }

    /// The names of the WAL files stored for timeline `tli`.
    pub async fn wal_names(&self, tli: TimelineId) -> Result<HashSet<String>, StorageError> {
        Ok(self
            .repo()
            .list(&self.layout().wal_dir(tli))
            .await?
            .iter()
            .filter_map(|k| k.filename().map(str::to_string))
            .collect())
    }

    /// Which of `names` (segments of one timeline) are not in storage.
    pub async fn missing_wal(
        &self,
        names: &[WalFileName],
    ) -> Result<Vec<WalFileName>, StorageError> {
        let Some(first) = names.first() else {
            return Ok(vec![]);
        };
        let present = self.wal_names(first.timeline).await?;
        Ok(names
            .iter()
            .filter(|n| !present.contains(&n.to_string()))
            .copied()
            .collect())
    }

    /// Every WAL object (archived files and the daemon's streamed partials) with its name.
    pub async fn wal_objects(
        &self,
    ) -> Result<Vec<(object_store::ObjectMeta, WalFileName)>, StorageError> {
        let mut named = self.archived_wal().await?;
        let streamed = self
            .repo()
            .list_meta(&self.layout().streaming_root())
            .await?;
        named.extend(with_wal_names(streamed));
        Ok(named)
    }

    /// Every archived WAL object (of every timeline) with its name.
    async fn archived_wal(
        &self,
    ) -> Result<Vec<(object_store::ObjectMeta, WalFileName)>, StorageError> {
        let metas = self.repo().list_meta(&self.layout().wal_root()).await?;
        Ok(with_wal_names(metas))
    }

    /// The pieces stored after the daemon's `.partial` of `segment` (any kind of its name), in
    /// key order; keys that are no piece's are left out.
    pub async fn streamed_pieces(
        &self,
        segment: &WalFileName,
    ) -> Result<Vec<pieces::PieceRef>, StorageError> {
        let dir = self.layout().streaming_pieces(segment);
        Ok(self
            .pieces_below(&dir)
            .await?
            .into_iter()
            .map(|(_, p)| p)
            .collect())
    }

    /// The pieces below `dir`, each with its segment; keys that are no piece's are left out.
    async fn pieces_below(
        &self,
        dir: &object_store::path::Path,
    ) -> Result<Vec<(WalFileName, pieces::PieceRef)>, StorageError> {
        Ok(self
            .repo()
            .list(dir)
            .await?
            .into_iter()
            .filter_map(|key| {
                let (seg, start, end) = self.layout().parse_piece(&key)?;
                Some((seg, pieces::PieceRef { start, end, key }))
            })
            .collect())
    }

    /// As [`Archive::streamed_pieces`], without any piece that would reach the segment's end (the
    /// daemon stores a whole segment as a segment; such a piece is forged).
    pub async fn streamed_pieces_within(
        &self,
        segment: &WalFileName,
        size: WalSegSize,
    ) -> Result<Vec<pieces::PieceRef>, StorageError> {
        let mut found = self.streamed_pieces(segment).await?;
        found.retain(|p| p.end < u64::from(size.bytes()));
        Ok(found)
    }

    /// Every piece in the streaming folder, with its segment.
    pub async fn all_streamed_pieces(
        &self,
    ) -> Result<Vec<(WalFileName, pieces::PieceRef)>, StorageError> {
        self.pieces_below(&self.layout().streaming_root()).await
    }

    /// How many bytes of `segment` the daemon's streamed upload holds (its `.partial` and the
    /// pieces after it); `None` when there is no readable `.partial` of it that is shorter than a
    /// segment (none, damaged, or an old padded one whose end is unknown).
    pub async fn streamed_len(
        &self,
        segment: &WalFileName,
        size: WalSegSize,
    ) -> Result<Option<u64>, StorageError> {
        match self
            .repo()
            .header(&self.layout().streaming_partial(segment))
            .await
        {
            Ok(h) if h.plain_len < u64::from(size.bytes()) => {
                let pieces = self.streamed_pieces_within(segment, size).await?;
                Ok(Some(pieces::chain_end(h.plain_len, &pieces)))
            }
            Ok(_) | Err(StorageError::NotFound { .. } | StorageError::Corrupt { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Where the WAL in storage ends, the one definition `list` and the daemon's `/status`
    /// (`durable_lsn`) share: the end of the newest complete segment (highest timeline, then
    /// highest segment), or, when the daemon's streamed `.partial` of a later segment is stored,
    /// the end of the bytes that partial holds; with the timeline and when that object reached
    /// storage. Gaps before it are `verify`'s to find.
    pub async fn wal_end(
        &self,
        size: WalSegSize,
    ) -> Result<Option<(Lsn, TimelineId, DateTime<Utc>)>, StorageError> {
        let mut end = self.newest_segment(size).await?.and_then(|(name, at)| {
            let seg = name.segment_no(size).ok()?;
            Some((name.timeline, size.start_of(SegmentNo(seg.0 + 1)), at))
        });
        let streamed = self
            .repo()
            .list_meta(&self.layout().streaming_root())
            .await?;
        for (meta, name) in with_wal_names(streamed) {
            let Ok(seg) = name.segment_no(size) else {
                continue;
            };
            if name.kind != WalFileKind::Partial
                || end.is_some_and(|(t, e, _)| (t, e) > (name.timeline, size.start_of(seg)))
            {
                continue;
            }
            let header = match self.repo().header(&meta.location).await {
                Ok(h) => h,
                // Replaced by its whole segment meanwhile, or damaged (verify names it).
                Err(StorageError::NotFound { .. } | StorageError::Corrupt { .. }) => continue,
                Err(e) => return Err(e),
            };
            // A daemon before this layout stored the open segment padded to its full size: where
            // its WAL ends is not known from the object, so nothing of it is claimed.
            if header.plain_len >= u64::from(size.bytes()) {
                continue;
            }
            let pieces = self.streamed_pieces_within(&name, size).await?;
            let reach = Lsn(size.start_of(seg).0 + pieces::chain_end(header.plain_len, &pieces));
            end = Some((name.timeline, reach, meta.last_modified));
        }
        Ok(end.map(|(t, e, at)| (e, t, at)))
    }

    /// The newest complete archived segment (highest timeline, then highest segment) and when it
    /// reached storage.
    pub async fn newest_segment(
        &self,
        size: WalSegSize,
    ) -> Result<Option<(WalFileName, DateTime<Utc>)>, StorageError> {
        let newest = self
            .archived_wal()
            .await?
            .into_iter()
            .filter(|(_, name)| name.kind == WalFileKind::Segment)
            .filter_map(|(m, name)| Some(((name.timeline, name.segment_no(size).ok()?), name, m)))
            .max_by_key(|(order, _, _)| *order);
        Ok(newest.map(|(_, name, m)| (name, m.last_modified)))
    }
}

/// Keeps the objects whose last key part is a WAL file name, with that name.
fn with_wal_names(
    metas: Vec<object_store::ObjectMeta>,
) -> Vec<(object_store::ObjectMeta, WalFileName)> {
    metas
        .into_iter()
        .filter_map(|m| {
            let name = m.location.filename()?.parse().ok()?;
            Some((m, name))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::settings::{RetrySettings, StorageSettings, StorageUrl};

    pub(crate) fn local_repo(dir: &std::path::Path) -> Repo {
        let settings = StorageSettings {
            url: StorageUrl::File {
                root: dir.to_path_buf(),
            },
            retry: RetrySettings {
                max_retries: 0,
                retry_timeout: std::time::Duration::from_secs(1),
                request_timeout: std::time::Duration::from_secs(5),
            },
            verify_uploads: true,
            options: vec![],
            encryption: Default::default(),
        };
        Repo::open(&settings, true).unwrap()
    }

    #[tokio::test]
    async fn the_stored_description_of_the_same_cluster_stands() {
        let dir = tempfile::tempdir().unwrap();
        let repo = local_repo(dir.path());
        let info = |sysid: u64, size: Option<u32>| ClusterInfo {
            system_identifier: sysid,
            wal_segment_size: size.and_then(WalSegSize::new),
            pg_major: size.map(|_| 15),
        };
        let archive = repo.ensure_cluster(&info(42, None)).await.unwrap();
        // A writer that knows more (the streamer) after one that knew less (a history file).
        repo.ensure_cluster(&info(42, Some(16 << 20)))
            .await
            .unwrap();
        let raw = repo.get(&archive.layout().info()).await.unwrap();
        let stored: ClusterInfo = serde_json::from_slice(&raw).unwrap();
        assert_eq!(stored, info(42, None));
        // The stored form: the identifier as a decimal string.
        assert!(String::from_utf8_lossy(&raw).contains("\"system_identifier\": \"42\""));
        // Another cluster's description under this cluster's key is damage, not a race.
        let bad = serde_json::to_vec(&info(43, None)).unwrap();
        repo.put_overwrite_metadata(&archive.layout().info(), &bad)
            .await
            .unwrap();
        let err = repo.ensure_cluster(&info(42, None)).await.unwrap_err();
        assert!(
            err.to_string().contains("describes cluster 43, not 42"),
            "{err}"
        );
    }

    #[test]
    fn backup_json_keeps_its_stored_form() {
        // backup.json as pgkeep has always written it: LSNs as X/Y, the identifier as a string.
        let stored = r#"{"meta_version":1,"id":"20261121T235737Z","label":"pgkeep 20261121T235737Z",
            "system_identifier":"7710772972684844037","pg_version":"15.18","wal_segment_size":16777216,
            "timeline":1,"start_lsn":"0/9000028","end_lsn":"0/9000100",
            "start_time":"2026-11-21T23:57:37Z","end_time":"2026-11-21T23:57:38Z","codec":"snappy",
            "archives":[{"name":"base.tar","location":null,"plain_bytes":10,"stored_bytes":12,
            "chunks":[{"plain_len":10,"stored_len":12,"sha256":"ab"}]}],
            "manifest_sha256":"cd","plain_bytes":10,"stored_bytes":12}"#;
        let meta: BackupMeta = serde_json::from_str(stored).unwrap();
        meta.validate().unwrap();
        assert_eq!(meta.start_lsn, Lsn(0x9000028));
        assert_eq!(meta.system_identifier, 7710772972684844037);
        assert_eq!(
            meta.required_wal()
                .iter()
                .map(|n| n.to_string())
                .collect::<Vec<_>>(),
            ["000000010000000000000009"]
        );
        let back: serde_json::Value = serde_json::to_value(&meta).unwrap();
        let orig: serde_json::Value = serde_json::from_str(stored).unwrap();
        assert_eq!(back, orig);
        for (field, bad) in [
            ("\"timeline\":1", "\"timeline\":0"),
            ("\"0/9000028\"", "\"9000028\""),
            ("16777216", "1000"),
            ("\"7710772972684844037\"", "7710772972684844037"),
            ("\"snappy\"", "\"lz4\""),
        ] {
            let text = stored.replace(field, bad);
            assert!(
                serde_json::from_str::<BackupMeta>(&text).is_err(),
                "{bad} was accepted"
            );
        }
    }
}
