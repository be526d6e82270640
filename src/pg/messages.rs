//! The payloads of the replication protocol's CopyData messages, as I/O-free types with parsers
//! and encoders over bytes: what the WAL stream (`START_REPLICATION`) and a base backup
//! (`BASE_BACKUP`, Postgres 15+ framing) carry. The loops that do I/O only move these types.
//! Every parser refuses truncated or oversized input with an error; none panics.

use bytes::{Buf, Bytes};

use super::Lsn;

/// Longest archive name or tablespace location accepted in a base backup's new-archive message
/// (Postgres' own limit for a path is 1024 bytes).
const MAX_NAME: usize = 4096;

/// A CopyData payload that is not what the protocol allows.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed {what} message: {reason}")]
pub struct MessageError {
    what: &'static str,
    reason: String,
}

fn malformed(what: &'static str, reason: impl Into<String>) -> MessageError {
    MessageError {
        what,
        reason: reason.into(),
    }
}

/// Takes exactly `len` more bytes of a fixed-size message body, or says what is wrong.
fn fixed(what: &'static str, body: &Bytes, len: usize) -> Result<(), MessageError> {
    match body.len() {
        n if n < len => Err(malformed(what, format!("truncated: {n} of {len} bytes"))),
        n if n > len => Err(malformed(
            what,
            format!("{} unexpected trailing bytes", n - len),
        )),
        _ => Ok(()),
    }
}

/// Microseconds since 2000-01-01, Postgres' epoch for replication timestamps.
pub fn pg_now() -> i64 {
    let unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    unix.as_micros() as i64 - 946_684_800_000_000
}

/// What the server sends on a physical replication stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WalMessage {
    XLogData(XLogData),
    Keepalive(PrimaryKeepalive),
}

/// `w`: a piece of WAL starting at `wal_start`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XLogData {
    pub wal_start: Lsn,
    /// The end of WAL on the server when it sent this.
    pub wal_end: Lsn,
    pub send_time: i64,
    pub data: Bytes,
}

impl XLogData {
    /// Where the data ends.
    pub fn data_end(&self) -> Lsn {
        Lsn(self.wal_start.0 + self.data.len() as u64)
    }
}

/// `k`: the server's keepalive; `reply_requested` asks for a status update at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrimaryKeepalive {
    pub wal_end: Lsn,
    pub send_time: i64,
    pub reply_requested: bool,
}

impl WalMessage {
    pub fn parse(mut msg: Bytes) -> Result<WalMessage, MessageError> {
        if msg.is_empty() {
            return Err(malformed("replication", "empty CopyData"));
        }
        match msg.get_u8() {
            b'w' => {
                if msg.len() < 24 {
                    return Err(malformed(
                        "XLogData",
                        format!("truncated: {} of at least 24 header bytes", msg.len()),
                    ));
                }
                let wal_start = Lsn(msg.get_u64());
                let wal_end = Lsn(msg.get_u64());
                let send_time = msg.get_i64();
                if wal_start.0.checked_add(msg.len() as u64).is_none() {
                    return Err(malformed("XLogData", "data runs past the end of the WAL"));
                }
                Ok(WalMessage::XLogData(XLogData {
                    wal_start,
                    wal_end,
                    send_time,
                    data: msg,
                }))
            }
            b'k' => {
                fixed("keepalive", &msg, 17)?;
                let wal_end = Lsn(msg.get_u64());
                let send_time = msg.get_i64();
                let reply_requested = msg.get_u8() != 0;
                Ok(WalMessage::Keepalive(PrimaryKeepalive {
                    wal_end,
                    send_time,
                    reply_requested,
                }))
            }
            other => Err(malformed(
                "replication",
                format!("unknown message type {other:#04x}"),
            )),
        }
    }
}

/// `r`: our standby status update. `flushed` is what Postgres may release from the slot: for
/// pgkeep, what is durable in storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StandbyStatusUpdate {
    pub written: Lsn,
    pub flushed: Lsn,
    pub applied: Lsn,
    pub time: i64,
    pub reply_requested: bool,
}

impl StandbyStatusUpdate {
    pub const LEN: usize = 34;

    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut m = [0u8; Self::LEN];
        m[0] = b'r';
        m[1..9].copy_from_slice(&self.written.0.to_be_bytes());
        m[9..17].copy_from_slice(&self.flushed.0.to_be_bytes());
        m[17..25].copy_from_slice(&self.applied.0.to_be_bytes());
        m[25..33].copy_from_slice(&self.time.to_be_bytes());
        m[33] = u8::from(self.reply_requested);
        m
    }

    /// The inverse of [`StandbyStatusUpdate::encode`] (what a walsender reads).
    pub fn parse(mut msg: Bytes) -> Result<StandbyStatusUpdate, MessageError> {
        fixed("standby status update", &msg, Self::LEN)?;
        if msg.get_u8() != b'r' {
            return Err(malformed("standby status update", "not an 'r' message"));
        }
        let (written, flushed, applied, time) = (
            Lsn(msg.get_u64()),
            Lsn(msg.get_u64()),
            Lsn(msg.get_u64()),
            msg.get_i64(),
        );
        // A boolean byte: the inverse of encode refuses anything else (found by a property test).
        let reply_requested = match msg.get_u8() {
            0 => false,
            1 => true,
            other => {
                return Err(malformed(
                    "standby status update",
                    format!("reply flag {other} is neither 0 nor 1"),
                ));
            }
        };
        Ok(StandbyStatusUpdate {
            written,
            flushed,
            applied,
            time,
            reply_requested,
        })
    }
}

/// What a base backup's copy stream carries (Postgres 15+: one CopyOut for everything).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackupMessage {
    /// `n`: a new tar archive starts: its name (`base.tar`, `<oid>.tar`) and the tablespace's
    /// location (empty for the data directory).
    NewArchive { name: String, location: String },
    /// `m`: the backup manifest follows (in `Data` messages).
    ManifestStart,
    /// `d`: archive or manifest bytes.
    Data(Bytes),
    /// `p`: bytes of the data directory sent so far.
    Progress(u64),
}

impl BackupMessage {
    pub fn parse(mut msg: Bytes) -> Result<BackupMessage, MessageError> {
        if msg.is_empty() {
            return Err(malformed("base backup", "empty CopyData"));
        }
        match msg.get_u8() {
            b'n' => {
                let name = cstring(&mut msg, "archive name")?;
                let location = cstring(&mut msg, "tablespace location")?;
                if !msg.is_empty() {
                    return Err(malformed("new-archive", "trailing bytes"));
                }
                Ok(BackupMessage::NewArchive { name, location })
            }
            b'm' => {
                fixed("manifest", &msg, 0)?;
                Ok(BackupMessage::ManifestStart)
            }
            b'd' => Ok(BackupMessage::Data(msg)),
            b'p' => {
                fixed("progress", &msg, 8)?;
                Ok(BackupMessage::Progress(msg.get_u64()))
            }
            other => Err(malformed(
                "base backup",
                format!("unknown message type {other:#04x}"),
            )),
        }
    }
}

/// A NUL-terminated UTF-8 string of at most [`MAX_NAME`] bytes.
fn cstring(b: &mut Bytes, what: &'static str) -> Result<String, MessageError> {
    let end = b
        .iter()
        .take(MAX_NAME + 1)
        .position(|&c| c == 0)
        .ok_or_else(|| {
            if b.len() > MAX_NAME {
                malformed(
                    "new-archive",
                    format!("{what} longer than {MAX_NAME} bytes"),
                )
            } else {
                malformed("new-archive", format!("unterminated {what}"))
            }
        })?;
    // A tablespace may live at a path that is not UTF-8; the archive name is checked later.
    let s = String::from_utf8_lossy(&b[..end]).into_owned();
    b.advance(end + 1);
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn xlogdata(start: u64, data: &[u8]) -> Bytes {
        let mut m = vec![b'w'];
        m.extend_from_slice(&start.to_be_bytes());
        m.extend_from_slice(&start.wrapping_add(data.len() as u64).to_be_bytes());
        m.extend_from_slice(&7i64.to_be_bytes());
        m.extend_from_slice(data);
        m.into()
    }

    fn keepalive(end: u64, reply: u8) -> Bytes {
        let mut m = vec![b'k'];
        m.extend_from_slice(&end.to_be_bytes());
        m.extend_from_slice(&9i64.to_be_bytes());
        m.push(reply);
        m.into()
    }

    #[test]
    fn wal_stream_messages() {
        let WalMessage::XLogData(x) = WalMessage::parse(xlogdata(0x1000, b"abc")).unwrap() else {
            panic!("not XLogData");
        };
        assert_eq!(
            (x.wal_start, x.wal_end, x.send_time),
            (Lsn(0x1000), Lsn(0x1003), 7)
        );
        assert_eq!((&x.data[..], x.data_end()), (&b"abc"[..], Lsn(0x1003)));
        assert_eq!(
            WalMessage::parse(keepalive(0x2000, 1)).unwrap(),
            WalMessage::Keepalive(PrimaryKeepalive {
                wal_end: Lsn(0x2000),
                send_time: 9,
                reply_requested: true
            })
        );
    }

    #[test]
    fn truncated_oversized_and_unknown_wal_messages_are_errors() {
        let full = xlogdata(5, b"");
        for cut in 0..full.len() {
            assert!(
                WalMessage::parse(full.slice(..cut)).is_err(),
                "cut at {cut}"
            );
        }
        let ka = keepalive(1, 0);
        for cut in 0..ka.len() {
            assert!(WalMessage::parse(ka.slice(..cut)).is_err(), "cut at {cut}");
        }
        let mut long = ka.to_vec();
        long.push(0);
        let e = WalMessage::parse(long.into()).unwrap_err();
        assert!(e.to_string().contains("trailing"), "{e}");
        assert!(WalMessage::parse(Bytes::from_static(b"zzz")).is_err());
        // Data that would run past the end of the LSN space.
        assert!(WalMessage::parse(xlogdata(u64::MAX - 1, b"abc")).is_err());
    }

    #[test]
    fn status_updates_round_trip() {
        let u = StandbyStatusUpdate {
            written: Lsn(0x1_0000_0010),
            flushed: Lsn(0x20),
            applied: Lsn(0x20),
            time: -5,
            reply_requested: false,
        };
        let bytes = u.encode();
        assert_eq!(bytes.len(), 34);
        assert_eq!(&bytes[1..9], &0x1_0000_0010u64.to_be_bytes());
        assert_eq!(
            StandbyStatusUpdate::parse(Bytes::copy_from_slice(&bytes)).unwrap(),
            u
        );
        for cut in 0..bytes.len() {
            assert!(StandbyStatusUpdate::parse(Bytes::copy_from_slice(&bytes[..cut])).is_err());
        }
    }

    #[test]
    fn backup_messages() {
        let m = |b: &[u8]| BackupMessage::parse(Bytes::copy_from_slice(b));
        assert_eq!(
            m(b"n16385.tar\0/srv/ts\0").unwrap(),
            BackupMessage::NewArchive {
                name: "16385.tar".into(),
                location: "/srv/ts".into()
            }
        );
        assert_eq!(m(b"m").unwrap(), BackupMessage::ManifestStart);
        assert_eq!(
            m(b"dxyz").unwrap(),
            BackupMessage::Data(Bytes::from_static(b"xyz"))
        );
        let mut p = vec![b'p'];
        p.extend_from_slice(&12345u64.to_be_bytes());
        assert_eq!(m(&p).unwrap(), BackupMessage::Progress(12345));
        for bad in [
            &b""[..],
            b"n",
            b"nbase.tar",
            b"nbase.tar\0",
            b"nbase.tar\0\0extra",
            b"mx",
            b"p\0\0\0",
            b"q",
        ] {
            assert!(m(bad).is_err(), "{bad:?} was accepted");
        }
        assert!(m(&p[..8]).is_err());
        let mut huge = vec![b'n'];
        huge.extend(std::iter::repeat_n(b'a', MAX_NAME + 10));
        huge.push(0);
        huge.push(0);
        let e = m(&huge).unwrap_err();
        assert!(e.to_string().contains("longer than"), "{e}");
    }
}
