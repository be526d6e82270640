//! Postgres' own formats and coordinates.
pub mod control;
pub mod lsn;
pub mod messages;
pub mod walheader;

/// The Postgres majors pgkeep works with (each tested end to end: see `tests/version_matrix.rs`).
pub const SUPPORTED_MAJORS: std::ops::RangeInclusive<u32> = 13..=18;

pub use lsn::{
    AtomicLsn, Lsn, ParseError, SegmentNo, TimelineId, WalFileKind, WalFileName, WalSegSize,
};
pub mod conninfo;
pub mod error;
pub mod replication;
pub mod sql;
pub mod tls;
