//! The WAL page header that starts every segment, and the checks pgkeep makes with it before a segment
//! is uploaded and after it is downloaded.
//!
//! Layout (`XLogLongPageHeaderData`, little-endian on the platforms Postgres runs on here):
//! magic u16 @0, info u16 @2, timeline u32 @4, page address u64 @8, remaining length u32 @16,
//! system identifier u64 @24, segment size u32 @32, WAL block size u32 @36.

use super::lsn::{Lsn, ParseError, WalFileKind, WalFileName, WalSegSize};

/// `XLP_LONG_HEADER`: set on the first page of every segment.
const XLP_LONG_HEADER: u16 = 0x0002;
/// Size of the long page header.
pub const LONG_HEADER_LEN: usize = 40;

/// `XLOG_PAGE_MAGIC` of each major version whose WAL pgkeep accepts (every major in
/// [`super::SUPPORTED_MAJORS`]). A new major changes the magic, and may change the format: its WAL
/// is refused, by name, until pgkeep has been tested with it.
const KNOWN_MAGICS: [(u16, u32); 6] = [
    (0xD106, 13),
    (0xD10D, 14),
    (0xD110, 15),
    (0xD113, 16),
    (0xD116, 17),
    (0xD118, 18),
];

/// What a segment's first page says about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentHeader {
    pub pg_major: u32,
    pub timeline: u32,
    pub page_addr: Lsn,
    pub system_identifier: u64,
    pub seg_size: WalSegSize,
    pub block_size: u32,
}

/// Why a file is not the WAL segment its name says it is.
#[derive(Debug, thiserror::Error)]
pub enum HeaderError {
    #[error("{name}: {len} bytes is too short to be a WAL segment")]
    TooShort { name: String, len: usize },
    #[error(
        "{name}: not a WAL segment of a Postgres major this pgkeep supports (page magic {magic:#06X}; \
         pgkeep {} reads the WAL of Postgres 13 to 18)",
        env!("CARGO_PKG_VERSION")
    )]
    BadMagic { name: String, magic: u16 },
    #[error("{name}: the first page has no long header, so it is not the start of a segment")]
    NoLongHeader { name: String },
    #[error("{name}: invalid segment size {size} in the page header")]
    BadSegSize { name: String, size: u32 },
    #[error("{name}: invalid WAL block size {size} in the page header")]
    BadBlockSize { name: String, size: u32 },
    #[error("{name}: file is {len} bytes but the page header says segments are {seg_size} bytes")]
    WrongLength {
        name: String,
        len: usize,
        seg_size: u32,
    },
    #[error(
        "{name}: the page header says this segment starts at {actual}, but the name means {expected}"
    )]
    WrongAddress {
        name: String,
        expected: Lsn,
        actual: Lsn,
    },
    #[error(
        "{name}: the page header is on timeline {actual}, later than the name's timeline {expected}"
    )]
    WrongTimeline {
        name: String,
        expected: u32,
        actual: u32,
    },
    #[error(
        "{name}: belongs to the cluster with system identifier {actual}, not {expected}: \
         refusing to mix two clusters' WAL"
    )]
    WrongSystem {
        name: String,
        expected: u64,
        actual: u64,
    },
    #[error(transparent)]
    Name(#[from] ParseError),
}

/// Reads the long page header at the start of a segment.
pub fn parse_long_header(name: &str, data: &[u8]) -> Result<SegmentHeader, HeaderError> {
    if data.len() < LONG_HEADER_LEN {
        return Err(HeaderError::TooShort {
            name: name.into(),
            len: data.len(),
        });
    }
    let u16_at = |o: usize| u16::from_le_bytes(data[o..o + 2].try_into().unwrap());
    let u32_at = |o: usize| u32::from_le_bytes(data[o..o + 4].try_into().unwrap());
    let u64_at = |o: usize| u64::from_le_bytes(data[o..o + 8].try_into().unwrap());
    let magic = u16_at(0);
    let pg_major = KNOWN_MAGICS
        .iter()
        .find(|(m, _)| *m == magic)
        .map(|(_, v)| *v)
        .ok_or(HeaderError::BadMagic {
            name: name.into(),
            magic,
        })?;
    if u16_at(2) & XLP_LONG_HEADER == 0 {
        return Err(HeaderError::NoLongHeader { name: name.into() });
    }
    let seg_size = WalSegSize::new(u32_at(32)).ok_or(HeaderError::BadSegSize {
        name: name.into(),
        size: u32_at(32),
    })?;
    let block_size = u32_at(36);
    if !(block_size.is_power_of_two() && (1024..=65536).contains(&block_size)) {
        return Err(HeaderError::BadBlockSize {
            name: name.into(),
            size: block_size,
        });
    }
    Ok(SegmentHeader {
        pg_major,
        timeline: u32_at(4),
        page_addr: Lsn(u64_at(8)),
        system_identifier: u64_at(24),
        seg_size,
        block_size,
    })
}

/// A served segment or `.partial` as Postgres must see it: a `.partial` the daemon streamed holds
/// only the bytes it had received, so it is padded with zeros to the segment size its page header
/// states (the shape of Postgres' own `.partial` files), then checked as [`check_segment`] does.
pub fn whole_segment(
    name: &WalFileName,
    mut data: Vec<u8>,
    expected_system: Option<u64>,
) -> Result<Vec<u8>, HeaderError> {
    if name.kind == WalFileKind::Partial {
        let header = parse_long_header(&name.to_string(), &data)?;
        let size = header.seg_size.bytes() as usize;
        if data.len() < size {
            data.resize(size, 0);
        }
    }
    check_segment(name, &data, expected_system)?;
    Ok(data)
}

/// Checks that `data` is the whole segment `name` of the cluster `expected_system` (when known):
/// magic, long header, length, start address and timeline. Only segments and `.partial` files have
/// a page header; call this for nothing else.
pub fn check_segment(
    name: &WalFileName,
    data: &[u8],
    expected_system: Option<u64>,
) -> Result<SegmentHeader, HeaderError> {
    check_segment_head(name, data, data.len(), expected_system)
}

/// As [`check_segment`], for a segment of `len` bytes of which only the start (`head`, at least
/// its long page header) is at hand: what a piece of the open segment is checked by, without
/// reading the whole segment for each piece.
pub fn check_segment_head(
    name: &WalFileName,
    head: &[u8],
    len: usize,
    expected_system: Option<u64>,
) -> Result<SegmentHeader, HeaderError> {
    debug_assert!(matches!(
        name.kind,
        WalFileKind::Segment | WalFileKind::Partial
    ));
    let shown = name.to_string();
    let header = parse_long_header(&shown, head)?;
    if len != header.seg_size.bytes() as usize {
        return Err(HeaderError::WrongLength {
            name: shown,
            len,
            seg_size: header.seg_size.bytes(),
        });
    }
    let expected = header.seg_size.start_of(name.segment_no(header.seg_size)?);
    if header.page_addr != expected {
        return Err(HeaderError::WrongAddress {
            name: shown,
            expected,
            actual: header.page_addr,
        });
    }
    // The first segment of a new timeline is a copy of the old timeline's last segment, so its first
    // page may carry an earlier timeline, never a later one (the check Postgres' own reader makes).
    if header.timeline == 0 || header.timeline > name.timeline.get() {
        return Err(HeaderError::WrongTimeline {
            name: shown,
            expected: name.timeline.get(),
            actual: header.timeline,
        });
    }
    if let Some(expected) = expected_system
        && expected != header.system_identifier
    {
        return Err(HeaderError::WrongSystem {
            name: shown,
            expected,
            actual: header.system_identifier,
        });
    }
    Ok(header)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::pg::lsn::{SegmentNo, TimelineId};

    /// A synthetic segment with a valid long header (for unit tests; integration tests use real WAL).
    pub(crate) fn fake_segment(tli: u32, seg: u64, seg_size: u32, sysid: u64) -> Vec<u8> {
        let mut data = vec![0u8; seg_size as usize];
        data[0..2].copy_from_slice(&0xD110u16.to_le_bytes());
        data[2..4].copy_from_slice(&XLP_LONG_HEADER.to_le_bytes());
        data[4..8].copy_from_slice(&tli.to_le_bytes());
        data[8..16].copy_from_slice(&(seg * u64::from(seg_size)).to_le_bytes());
        data[24..32].copy_from_slice(&sysid.to_le_bytes());
        data[32..36].copy_from_slice(&seg_size.to_le_bytes());
        data[36..40].copy_from_slice(&8192u32.to_le_bytes());
        data
    }

    fn name(tli: u32, seg: u64, size: u32) -> WalFileName {
        WalFileName::segment(
            TimelineId::new(tli).unwrap(),
            SegmentNo(seg),
            WalSegSize::new(size).unwrap(),
        )
    }

    #[test]
    fn a_matching_segment_passes() {
        for size in [1u32 << 20, 16 << 20, 64 << 20] {
            let data = fake_segment(3, 0x1234, size, 42);
            let h = check_segment(&name(3, 0x1234, size), &data, Some(42)).unwrap();
            assert_eq!(h.seg_size.bytes(), size);
            assert_eq!(h.system_identifier, 42);
            assert_eq!(h.pg_major, 15);
        }
    }

    #[test]
    fn first_segment_of_a_new_timeline_may_carry_the_old_timeline() {
        let data = fake_segment(1, 7, 1 << 20, 42);
        check_segment(&name(2, 7, 1 << 20), &data, Some(42)).unwrap();
        let data = fake_segment(3, 7, 1 << 20, 42);
        let err = check_segment(&name(2, 7, 1 << 20), &data, Some(42)).unwrap_err();
        assert!(matches!(err, HeaderError::WrongTimeline { .. }), "{err}");
    }

    #[test]
    fn every_mismatch_is_named() {
        let size = 1u32 << 20;
        let good = fake_segment(1, 5, size, 42);
        let n = name(1, 5, size);
        let check = |data: &[u8], n: &WalFileName, sys| {
            check_segment(n, data, sys).unwrap_err().to_string()
        };

        assert!(check(&good, &name(1, 6, size), Some(42)).contains("starts at 0/500000"));
        assert!(check(&good, &n, Some(43)).contains("system identifier 42, not 43"));
        assert!(
            check(&good[..size as usize - 1], &n, None).contains("page header says segments are")
        );
        assert!(check(&good[..10], &n, None).contains("too short"));
        let mut zeros = good.clone();
        zeros[0..2].copy_from_slice(&[0, 0]);
        assert!(check(&zeros, &n, None).contains("page magic"));
        let mut short = good.clone();
        short[2] = 0;
        assert!(check(&short, &n, None).contains("no long header"));
        let mut seg = good.clone();
        seg[32..36].copy_from_slice(&12345u32.to_le_bytes());
        assert!(check(&seg, &n, None).contains("invalid segment size 12345"));
    }
}
