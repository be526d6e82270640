//! A backup's file index (`files.json`): where each regular file of its archives has its bytes in
//! storage. In a full backup every file is in the backup's own archive streams; in a delta backup
//! (Postgres 13 to 16) a file unchanged since the parent is a reference to the backup that stored
//! it (always one of its chain). Its checksum is recorded in `backup.json` (`files_sha256`).

use serde::{Deserialize, Serialize};

use super::archive::Archive;
use super::catalog::BackupMeta;
use super::layout::{ArchiveName, BackupId};
use super::repo::StorageError;

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct FileIndex {
    pub files: Vec<FileEntry>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FileEntry {
    /// The path in its archive (as the tar stream names it).
    pub path: String,
    /// The archive it belongs to (where a restore puts it: the data directory or a tablespace).
    pub archive: ArchiveName,
    pub size: u64,
    pub mtime: u64,
    pub mode: u32,
    /// The backup whose stream of `archive` holds its bytes; absent: this backup's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<BackupId>,
    /// Where its bytes start in that stream (as stored).
    pub offset: u64,
}

impl FileEntry {
    /// Its path as the backup manifest names it.
    pub fn manifest_path(&self) -> String {
        format!("{}{}", self.archive.manifest_prefix(), self.path)
    }

    /// Whether a reference of `meta`'s index can be read from `chain` (oldest first, `meta` last):
    /// it names an earlier backup of the chain, an archive that backup has, and a range inside
    /// that archive's stream. The reason when not.
    pub fn check_reference(&self, meta: &BackupMeta, chain: &[BackupMeta]) -> Result<(), String> {
        let Some(from) = &self.from else {
            return Ok(());
        };
        let origin = chain
            .iter()
            .find(|b| b.id == *from && b.id != meta.id)
            .ok_or_else(|| {
                format!(
                    "{} refers to backup {from}, which is not one it builds on",
                    self.path
                )
            })?;
        let tar = origin
            .archives
            .iter()
            .find(|a| a.name == self.archive)
            .ok_or_else(|| {
                format!(
                    "{} refers to {} of backup {from}, which has no such archive",
                    self.path,
                    String::from(self.archive.clone())
                )
            })?;
        match self.offset.checked_add(self.size) {
            Some(end) if end <= tar.plain_bytes => Ok(()),
            _ => Err(format!(
                "{} refers to bytes {}..+{} of {} of backup {from}, past its end ({})",
                self.path,
                self.offset,
                self.size,
                String::from(self.archive.clone()),
                tar.plain_bytes
            )),
        }
    }
}

impl Archive {
    /// Stores a backup's file index; returns the checksum its metadata records.
    pub async fn put_file_index(
        &self,
        id: &BackupId,
        codec: crate::codec::Codec,
        index: &FileIndex,
    ) -> Result<String, StorageError> {
        let json = serde_json::to_vec(index).expect("serialisable");
        let (header, sealed) = self.repo().seal(codec, &json);
        self.repo()
            .put_sealed(&self.layout().backup_files(id), sealed)
            .await?;
        Ok(hex::encode(header.checksum))
    }

    /// A backup's file index, checked against the checksum its metadata records; None for a
    /// backup that has none (taken before pgkeep kept one).
    pub async fn file_index(&self, meta: &BackupMeta) -> Result<Option<FileIndex>, StorageError> {
        let Some(sum) = &meta.files_sha256 else {
            return Ok(None);
        };
        let key = self.layout().backup_files(&meta.id);
        let (header, raw) = self.repo().get_with_header(&key).await?;
        let corrupt = |reason: String| StorageError::Corrupt {
            key: key.to_string(),
            reason,
        };
        if hex::encode(header.checksum) != *sum {
            return Err(corrupt(
                "does not match the checksum recorded in the backup's metadata".into(),
            ));
        }
        serde_json::from_slice(&raw)
            .map(Some)
            .map_err(|e| corrupt(format!("not a file index: {e}")))
    }
}
