//! Object storage: where it is (settings), the key layout, the object format, the repository that
//! reads and writes verified objects, and the typed catalog of one cluster's archive.
pub mod archive;
pub mod catalog;
pub mod crypt;
pub mod index;
pub mod layout;
pub mod object;
pub mod pieces;
pub mod repo;
pub mod settings;

pub use archive::Archive;
pub use catalog::{ArchiveMeta, BackupMeta, ChunkMeta, ClusterInfo};
pub use crypt::{EncryptionSettings, Keys};
pub use layout::ClusterLayout;
pub use repo::{PutOutcome, Repo, StorageError};
pub use settings::{StorageSettings, StorageUrl};
