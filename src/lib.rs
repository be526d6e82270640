//! pgkeep: a PostgreSQL backup sidecar. WAL streaming and archiving to object storage, base
//! backups and restores. `main.rs` only parses arguments; everything else lives here so tests can
//! call it in-process. The import graph runs one way: daemon → jobs/http → wal/backup/restore →
//! storage → codec, pg.
pub mod backup;
pub mod checks;
pub mod cluster;
pub mod codec;
pub mod config;
pub mod daemon;
pub mod drill;
pub mod fsutil;
pub mod http;
pub mod http_client;
pub mod http_limits;
pub mod http_token;
pub mod jobs;
pub mod list;
pub mod logging;
pub mod mark;
pub mod metrics;
pub mod pg;
pub mod progress;
pub mod restore;
pub mod retention;
pub mod storage;
pub mod verify;
pub mod wal;
