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
