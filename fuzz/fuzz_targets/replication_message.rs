//! Replication protocol messages from a peer on a port: never a panic; a standby status update
//! that parses encodes back to the same bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;
use pgkeep::pg::messages::{BackupMessage, StandbyStatusUpdate, WalMessage};

fuzz_target!(|data: &[u8]| {
    let b = bytes::Bytes::copy_from_slice(data);
    let _ = WalMessage::parse(b.clone());
    let _ = BackupMessage::parse(b.clone());
    if let Ok(u) = StandbyStatusUpdate::parse(b.clone()) {
        assert_eq!(&u.encode()[..], &b[..]);
    }
});
