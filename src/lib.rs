//! pgkeep: a PostgreSQL backup sidecar. WAL archiving and fetching to object storage, and (in later
//! stages) streaming, base backups and restores. `main.rs` only parses arguments; everything else
//! lives here so tests can call it in-process.
pub mod codec;
pub mod config;
pub mod fsutil;
pub mod logging;
pub mod pg;
pub mod storage;
pub mod wal;
