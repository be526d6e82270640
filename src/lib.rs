//! pgkeep: a PostgreSQL backup sidecar. WAL archiving and fetching to object storage, and (in later
//! stages) streaming, base backups and restores. `main.rs` only parses arguments; everything else
//! lives here so tests can call it in-process.
pub mod backup;
pub mod cluster;
pub mod codec;
pub mod config;
pub mod daemon;
pub mod fsutil;
pub mod http;
pub mod http_client;
pub mod list;
pub mod logging;
pub mod pg;
pub mod progress;
pub mod restore;
pub mod retention;
pub mod storage;
pub mod wal;
