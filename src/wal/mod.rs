//! WAL archiving: `archive_command` and `restore_command` today; the streamer and spool later.
pub mod archive;
pub mod prefetch;
pub mod streamer;
pub mod switch;
