//! Postgres' own formats and coordinates.
pub mod control;
pub mod lsn;
pub mod messages;
pub mod walheader;

pub use lsn::{
    AtomicLsn, Lsn, ParseError, SegmentNo, TimelineId, WalFileKind, WalFileName, WalSegSize,
};
pub mod conninfo;
pub mod replication;
pub mod sql;
