//! WAL: `archive_command` (archive), `restore_command` (fetch, served by the daemon with
//! prefetch), the streamer and its spool, and the preStop hook (switch).
pub mod archive;
pub mod fetch;
pub mod handoff;
pub mod helper;
pub mod prefetch;
pub mod spool;
pub mod stored;
pub mod streamer;
pub mod switch;
