//! WAL coordinates: LSNs, timelines, segment numbers, segment sizes and WAL file names.
//!
//! Every coordinate has its own type so that a timeline can never be passed where a segment number is
//! expected. The segment size is a value read from the server or a WAL page header, never a constant.

use std::fmt;
use std::str::FromStr;

/// Why a WAL coordinate or file name was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} {input:?}: {reason}")]
pub struct ParseError {
    what: &'static str,
    input: String,
    reason: &'static str,
}

impl ParseError {
    fn new(what: &'static str, input: &str, reason: &'static str) -> Self {
        // Cap what we echo back: the input may be an attacker's megabyte-long path.
        let input: String = input.chars().take(80).collect();
        ParseError {
            what,
            input,
            reason,
        }
    }
}

/// A position in the WAL stream, printed the way Postgres prints it (`16/B374D848`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lsn(pub u64);

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

impl FromStr for Lsn {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, ParseError> {
        let bad = |reason| ParseError::new("LSN", s, reason);
        let (hi, lo) = s
            .split_once('/')
            .ok_or_else(|| bad("expected the form X/Y"))?;
        let part = |p: &str| {
            if p.is_empty() || p.len() > 8 || !p.bytes().all(|b| b.is_ascii_hexdigit()) {
                Err(bad("each half must be 1 to 8 hexadecimal digits"))
            } else {
                Ok(u64::from_str_radix(p, 16).expect("checked hex"))
            }
        };
        Ok(Lsn(part(hi)? << 32 | part(lo)?))
    }
}

/// Stored as Postgres prints it (`"16/B374D848"`), the form `backup.json` has always used.
impl serde::Serialize for Lsn {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Lsn {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// An [`Lsn`] shared between tasks. Positions only move forward: [`AtomicLsn::advance`] is a
/// `fetch_max`, so a late or repeated report never moves one back.
#[derive(Debug, Default)]
pub struct AtomicLsn(std::sync::atomic::AtomicU64);

impl AtomicLsn {
    pub fn load(&self) -> Lsn {
        Lsn(self.0.load(std::sync::atomic::Ordering::Acquire))
    }
    /// Moves the position to `lsn` unless it is already further.
    pub fn advance(&self, lsn: Lsn) {
        self.0.fetch_max(lsn.0, std::sync::atomic::Ordering::AcqRel);
    }
}

/// WAL file names as a list for a message: `A, B, C`.
pub fn join_names(names: &[WalFileName]) -> String {
    names
        .iter()
        .map(|n| n.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// A timeline. Timeline 0 does not exist; never assume timeline 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TimelineId(u32);

impl TimelineId {
    pub fn new(id: u32) -> Option<Self> {
        (id != 0).then_some(TimelineId(id))
    }
    pub fn get(self) -> u32 {
        self.0
    }
}

impl fmt::Display for TimelineId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Stored as its number; 0 is refused on reading.
impl serde::Serialize for TimelineId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u32(self.0)
    }
}

impl<'de> serde::Deserialize<'de> for TimelineId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        TimelineId::new(u32::deserialize(d)?)
            .ok_or_else(|| serde::de::Error::custom("timeline 0 does not exist"))
    }
}

/// The WAL segment size of a cluster: a power of two from 1 MiB to 1 GiB (`initdb --wal-segsize`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct WalSegSize(u32);

impl WalSegSize {
    pub const MIN: u32 = 1 << 20;
    pub const MAX: u32 = 1 << 30;

    pub fn new(bytes: u32) -> Option<Self> {
        (bytes.is_power_of_two() && (Self::MIN..=Self::MAX).contains(&bytes))
            .then_some(WalSegSize(bytes))
    }
    pub fn bytes(self) -> u32 {
        self.0
    }
    /// How many segments share one "xlogid" (the middle 8 hex digits of a segment name).
    pub fn segments_per_xlogid(self) -> u64 {
        0x1_0000_0000 / u64::from(self.0)
    }
    pub fn segment_of(self, lsn: Lsn) -> SegmentNo {
        SegmentNo(lsn.0 / u64::from(self.0))
    }
    pub fn start_of(self, seg: SegmentNo) -> Lsn {
        Lsn(seg.0 * u64::from(self.0))
    }
}

/// Stored as its number of bytes; anything but a power of two from 1 MiB to 1 GiB is refused.
impl serde::Serialize for WalSegSize {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u32(self.0)
    }
}

impl<'de> serde::Deserialize<'de> for WalSegSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let bytes = u32::deserialize(d)?;
        WalSegSize::new(bytes)
            .ok_or_else(|| serde::de::Error::custom(format!("{bytes} is not a WAL segment size")))
    }
}

/// A WAL segment's number: its start LSN divided by the segment size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SegmentNo(pub u64);

/// What kind of file a [`WalFileName`] names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WalFileKind {
    /// `000000010000000A000000FF`: a complete segment.
    Segment,
    /// `000000010000000A000000FF.partial`: a segment that was still being written.
    Partial,
    /// `00000002.history`: a timeline history file.
    History,
    /// `000000010000000A000000FF.00000028.backup`: a backup history file; the number is the offset of
    /// the backup's start within the segment.
    Backup { offset: u32 },
}

/// A validated WAL file name. Only these four shapes exist; anything else is refused before it can
/// touch a path or an object key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct WalFileName {
    pub kind: WalFileKind,
    pub timeline: TimelineId,
    /// The middle 8 hex digits (unused for history files).
    log: u32,
    /// The last 8 hex digits (unused for history files).
    seg: u32,
}

/// The largest "seg" part any legal segment size allows (1 MiB segments: 4096 per xlogid).
const MAX_SEG_PART: u32 = (0x1_0000_0000u64 / WalSegSize::MIN as u64) as u32;

fn upper_hex8(s: &str) -> Option<u32> {
    (s.len() == 8
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'A'..=b'F').contains(&b)))
    .then(|| u32::from_str_radix(s, 16).expect("checked hex"))
}

impl WalFileName {
    pub fn segment(timeline: TimelineId, seg: SegmentNo, size: WalSegSize) -> Self {
        let per = size.segments_per_xlogid();
        WalFileName {
            kind: WalFileKind::Segment,
            timeline,
            log: u32::try_from(seg.0 / per).expect("segment number beyond the 64-bit LSN space"),
            seg: (seg.0 % per) as u32,
        }
    }

    pub fn history(timeline: TimelineId) -> Self {
        WalFileName {
            kind: WalFileKind::History,
            timeline,
            log: 0,
            seg: 0,
        }
    }

    /// The same segment with another kind (for example the `.partial` of a segment).
    pub fn with_kind(self, kind: WalFileKind) -> Self {
        WalFileName { kind, ..self }
    }

    /// The segment number this name refers to, given the cluster's segment size. Fails for history
    /// files and for names whose last part is too large for that segment size.
    pub fn segment_no(&self, size: WalSegSize) -> Result<SegmentNo, ParseError> {
        if self.kind == WalFileKind::History {
            return Err(ParseError::new(
                "WAL file name",
                &self.to_string(),
                "a history file has no segment",
            ));
        }
        let per = size.segments_per_xlogid();
        if u64::from(self.seg) >= per {
            return Err(ParseError::new(
                "WAL file name",
                &self.to_string(),
                "its last 8 digits are too large for the cluster's WAL segment size",
            ));
        }
        Ok(SegmentNo(u64::from(self.log) * per + u64::from(self.seg)))
    }

    /// The 24-character segment part (`TTTTTTTTLLLLLLLLSSSSSSSS`); for history files the 8-digit timeline.
    pub fn stem(&self) -> String {
        match self.kind {
            WalFileKind::History => format!("{:08X}", self.timeline.0),
            _ => format!("{:08X}{:08X}{:08X}", self.timeline.0, self.log, self.seg),
        }
    }
}

impl fmt::Display for WalFileName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let stem = self.stem();
        match self.kind {
            WalFileKind::Segment => write!(f, "{stem}"),
            WalFileKind::Partial => write!(f, "{stem}.partial"),
            WalFileKind::History => write!(f, "{stem}.history"),
            WalFileKind::Backup { offset } => write!(f, "{stem}.{offset:08X}.backup"),
        }
    }
}

impl FromStr for WalFileName {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, ParseError> {
        let bad = |reason| ParseError::new("WAL file name", s, reason);
        let shape = "not a WAL segment, .partial, .history or .backup file name";
        let timeline = |t: u32| TimelineId::new(t).ok_or_else(|| bad("timeline 0 does not exist"));
        if let Some(stem) = s.strip_suffix(".history") {
            let t = upper_hex8(stem).ok_or_else(|| bad(shape))?;
            return Ok(WalFileName::history(timeline(t)?));
        }
        let (stem, kind) = if let Some(stem) = s.strip_suffix(".partial") {
            (stem, WalFileKind::Partial)
        } else if let Some(rest) = s.strip_suffix(".backup") {
            let (stem, offset) = rest.split_once('.').ok_or_else(|| bad(shape))?;
            let offset = upper_hex8(offset).ok_or_else(|| bad(shape))?;
            (stem, WalFileKind::Backup { offset })
        } else {
            (s, WalFileKind::Segment)
        };
        if stem.len() != 24 || !stem.is_ascii() {
            return Err(bad(shape));
        }
        let (t, l, g) = (
            upper_hex8(&stem[0..8]),
            upper_hex8(&stem[8..16]),
            upper_hex8(&stem[16..24]),
        );
        let (Some(t), Some(log), Some(seg)) = (t, l, g) else {
            return Err(bad(shape));
        };
        if seg >= MAX_SEG_PART {
            return Err(bad(
                "its last 8 digits are too large for any WAL segment size",
            ));
        }
        Ok(WalFileName {
            kind,
            timeline: timeline(t)?,
            log,
            seg,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsn_round_trips_and_rejects_garbage() {
        for (text, value) in [
            ("0/0", 0u64),
            ("0/1", 1),
            ("16/B374D848", 0x16_B374_D848),
            ("FFFFFFFF/FFFFFFFF", u64::MAX),
        ] {
            let lsn: Lsn = text.parse().unwrap();
            assert_eq!(lsn.0, value, "{text}");
            assert_eq!(lsn.to_string(), text);
        }
        assert_eq!("a/b".parse::<Lsn>().unwrap(), Lsn(0xA_0000_000B));
        for bad in [
            "",
            "/",
            "0/",
            "/0",
            "0",
            "1/2/3",
            "G/0",
            "123456789/0",
            "0/-1",
            " 0/1",
        ] {
            assert!(bad.parse::<Lsn>().is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn segment_sizes_are_powers_of_two_from_1mb_to_1gb() {
        assert!(WalSegSize::new(1 << 20).is_some());
        assert!(WalSegSize::new(16 << 20).is_some());
        assert!(WalSegSize::new(1 << 30).is_some());
        for bad in [0, 1 << 19, (1 << 20) + 1, 3 << 20, 1 << 31] {
            assert!(WalSegSize::new(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn segment_names_for_every_segment_size() {
        // (segment size, LSN, name of the segment holding it), checked against Postgres' XLogFileName.
        let tl = |t| TimelineId::new(t).unwrap();
        let cases = [
            (16u32 << 20, "0/0", 1, "000000010000000000000000"),
            (16 << 20, "0/1000000", 1, "000000010000000000000001"),
            (16 << 20, "0/FF000000", 1, "0000000100000000000000FF"),
            (16 << 20, "1/0", 1, "000000010000000100000000"),
            (16 << 20, "16/B374D848", 3, "0000000300000016000000B3"),
            (1 << 20, "0/FFF00000", 1, "000000010000000000000FFF"),
            (1 << 20, "5/12345678", 2, "000000020000000500000123"),
            (64 << 20, "0/C0000000", 1, "000000010000000000000030"),
            (1 << 30, "0/C0000000", 1, "000000010000000000000003"),
            (1 << 30, "A/40000000", 0xAB, "000000AB0000000A00000001"),
        ];
        for (size, lsn, t, want) in cases {
            let size = WalSegSize::new(size).unwrap();
            let seg = size.segment_of(lsn.parse().unwrap());
            let name = WalFileName::segment(tl(t), seg, size);
            assert_eq!(name.to_string(), want, "{lsn} at {} bytes", size.bytes());
            let parsed: WalFileName = want.parse().unwrap();
            assert_eq!(parsed, name);
            assert_eq!(parsed.segment_no(size).unwrap(), seg);
            assert!(size.start_of(seg) <= lsn.parse().unwrap());
        }
    }

    #[test]
    fn a_segment_part_too_large_for_the_size_is_refused() {
        let name: WalFileName = "000000010000000000000100".parse().unwrap();
        assert!(name.segment_no(WalSegSize::new(16 << 20).unwrap()).is_err());
        assert_eq!(
            name.segment_no(WalSegSize::new(1 << 20).unwrap()).unwrap(),
            SegmentNo(0x100)
        );
        // 0x1000 is too large even for 1 MiB segments.
        assert!("000000010000000000001000".parse::<WalFileName>().is_err());
    }

    #[test]
    fn every_kind_of_wal_file_name_parses_and_prints() {
        let cases = [
            ("000000010000000000000001", WalFileKind::Segment, 1),
            ("0000000200000000000000FE.partial", WalFileKind::Partial, 2),
            ("0000000A.history", WalFileKind::History, 10),
            (
                "000000010000000000000002.00000028.backup",
                WalFileKind::Backup { offset: 0x28 },
                1,
            ),
        ];
        for (text, kind, tli) in cases {
            let name: WalFileName = text.parse().unwrap();
            assert_eq!(name.kind, kind, "{text}");
            assert_eq!(name.timeline.get(), tli, "{text}");
            assert_eq!(name.to_string(), text);
        }
    }

    #[test]
    fn everything_else_is_refused() {
        for bad in [
            "",
            "0",
            "00000001000000000000000",   // 23 digits
            "0000000100000000000000001", // 25 digits
            "000000010000000000000001 ",
            "000000010000000000000001/",
            "0000000100000000000000a1", // lower case: Postgres never writes it
            "00000000000000000000000A", // timeline 0
            "00000000.history",
            "0000001.history",
            "0000000G.history",
            "000000010000000000000001.history",
            "000000010000000000000001.partial.partial",
            "000000010000000000000001.backup",
            "000000010000000000000001.0000028.backup",
            "000000010000000000000001.00000028.backup.partial",
            "../../etc/passwd",
            "..%2F000000010000000000000001",
            "RECOVERYXLOG",
            "000000010000000000000001\0",
            "00000001000000000000000é",
            "archive_status",
        ] {
            assert!(
                bad.parse::<WalFileName>().is_err(),
                "{bad:?} should be refused"
            );
        }
    }
}
