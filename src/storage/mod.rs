//! Object storage: the key layout, the object format and the repository that reads and writes.
pub mod layout;
pub mod object;
pub mod repo;

pub use layout::ClusterLayout;
pub use repo::{ClusterInfo, PutOutcome, Repo, StorageError};
