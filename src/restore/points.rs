//! Whether the WAL after a backup holds a restore point of a name: `--target-name` naming no
//! mark is checked here before anything is written, so that a name nobody made is refused with a
//! clear error instead of a recovery that ends in Postgres' "recovery ended before configured
//! recovery target was reached".
//!
//! A restore point is an XLOG record (`XLOG_RESTORE_POINT`) whose main data is the time and a
//! 64-byte name. The WAL of each segment is read with its page headers taken out (a record that
//! crosses a page boundary is then contiguous) and searched for the record's shape: the main-data
//! marker (`XLR_BLOCK_ID_DATA_SHORT`, length 72), eight bytes of time, the name and its NUL, and,
//! when the record's header is in the same segment, resource manager 0 with info 0x70. Segments
//! are read newest first (the point restored to is most often recent), and the search stops at
//! the first hit: a forged or odd match only means the restore goes ahead, as it did before.

use futures::StreamExt;

use crate::pg::{WalFileKind, WalFileName};
use crate::storage::{Archive, BackupMeta};

/// The WAL page size Postgres is built with (`XLOG_BLCKSZ`); every build pgkeep supports uses it.
const PAGE: usize = 8192;
const XLOG_PAGE_MAGIC_MIN: u16 = 0xD106;
const SHORT_HEADER: usize = 24;
const LONG_HEADER: usize = 40;
const XLP_LONG_HEADER: u16 = 0x0002;
/// `XLR_BLOCK_ID_DATA_SHORT`, then the main data's length: `TimestampTz` + `char[64]`.
const DATA_SHORT: [u8; 2] = [255, 72];
const RECORD_HEADER: usize = 24;
const XLR_BLOCK_ID_ORIGIN: u8 = 253;
const RM_XLOG_ID: u8 = 0;
const XLOG_RESTORE_POINT: u8 = 0x70;

/// What the search found.
#[derive(Debug)]
pub(super) enum Found {
    /// In this WAL file; the position of the name inside the restore point's record (a backup
    /// that ends before it ends before the record).
    In(WalFileName, crate::pg::Lsn),
    /// Not in any of this many WAL files.
    Nowhere { scanned: usize },
}

/// Looks for a restore point named `name` in the WAL from `meta`'s start on (its timeline and
/// later ones).
pub(super) async fn find(
    archive: &Archive,
    meta: &BackupMeta,
    name: &str,
    parallelism: usize,
) -> anyhow::Result<Found> {
    let size = meta.wal_segment_size;
    let first = size.segment_of(meta.start_lsn);
    let mut files: Vec<_> = archive
        .wal_objects()
        .await?
        .into_iter()
        .filter(|(_, n)| matches!(n.kind, WalFileKind::Segment | WalFileKind::Partial))
        .filter(|(_, n)| n.timeline >= meta.timeline)
        .filter_map(|(m, n)| {
            let seg = n.segment_no(size).ok().filter(|s| s.0 >= first.0)?;
            Some((seg, n, m.location))
        })
        .collect();
    files.sort_by_key(|f| std::cmp::Reverse((f.0, f.1.timeline)));
    let scanned = files.len();
    let streamed = archive.layout().streaming_root();
    let mut reads = futures::stream::iter(files.into_iter().map(|(_, n, key)| {
        let streamed = key.prefix_matches(&streamed);
        let seg_start = size.start_of(n.segment_no(size).expect("a segment's name"));
        async move {
            // The daemon's streamed `.partial` is continued by pieces (the open segment's newest
            // WAL, where a restore point made a moment ago is): read as wal-fetch serves it.
            let wal = if streamed {
                crate::wal::fetch::fetch_verified(archive, &n.with_kind(WalFileKind::Segment))
                    .await?
            } else {
                archive.repo().get(&key).await?
            };
            anyhow::Ok((
                n,
                position(&wal, name).map(|at| crate::pg::Lsn(seg_start.0 + at as u64)),
            ))
        }
    }))
    .buffered(parallelism.max(1));
    while let Some(r) = reads.next().await {
        let (n, hit) = r?;
        if let Some(lsn) = hit {
            return Ok(Found::In(n, lsn));
        }
    }
    Ok(Found::Nowhere { scanned })
}

/// Whether a segment's bytes hold a restore point record named `name`.
#[cfg(test)]
fn holds(segment: &[u8], name: &str) -> bool {
    position(segment, name).is_some()
}

/// Where in a segment's bytes the name of a restore point record named `name` is (the newest
/// such record's when several are).
fn position(segment: &[u8], name: &str) -> Option<usize> {
    let (records, pages) = without_page_headers(segment);
    // The offset in the segment of an offset in `records`.
    let original = |at: usize| match pages.partition_point(|(stripped, _)| *stripped <= at) {
        0 => at,
        i => pages[i - 1].1 + (at - pages[i - 1].0),
    };
    let mut found = None;
    let mut needle = name.as_bytes().to_vec();
    needle.push(0);
    let mut from = 0;
    while let Some(at) = find_bytes(&records[from..], &needle).map(|i| i + from) {
        from = at + 1;
        // The marker and the time before the name.
        let Some(marker) = at.checked_sub(8 + DATA_SHORT.len()) else {
            continue;
        };
        if records[marker..marker + 2] != DATA_SHORT {
            continue;
        }
        // The record header right before the marker (or before a replication origin's block,
        // `XLR_BLOCK_ID_ORIGIN` and two bytes), when this segment holds it.
        let is_header = |h: usize| {
            records[h + 17] == RM_XLOG_ID && records[h + 16] & 0xF0 == XLOG_RESTORE_POINT
        };
        let direct = marker.checked_sub(RECORD_HEADER);
        let after_origin = marker
            .checked_sub(RECORD_HEADER + 3)
            .filter(|h| records[h + RECORD_HEADER] == XLR_BLOCK_ID_ORIGIN);
        match (direct, after_origin) {
            (None, _) => found = Some(original(at)),
            (Some(h), _) if is_header(h) => found = Some(original(at)),
            (_, Some(h)) if is_header(h) => found = Some(original(at)),
            _ => continue,
        }
    }
    found
}

/// The segment's bytes with each page's header taken out, and where each page's content starts
/// (in those bytes, in the segment); the bytes as they are when the pages do not look like WAL
/// pages (then the search is only less exact).
fn without_page_headers(segment: &[u8]) -> (Vec<u8>, Vec<(usize, usize)>) {
    let mut out = Vec::with_capacity(segment.len());
    let mut pages = vec![];
    for (i, page) in segment.chunks(PAGE).enumerate() {
        if page.len() < LONG_HEADER {
            break;
        }
        let magic = u16::from_le_bytes([page[0], page[1]]);
        let info = u16::from_le_bytes([page[2], page[3]]);
        if magic < XLOG_PAGE_MAGIC_MIN {
            // Not a WAL page (zeros after the end of a partial segment, or not WAL at all).
            if page.iter().all(|b| *b == 0) {
                break;
            }
            return (segment.to_vec(), vec![]);
        }
        let skip = if info & XLP_LONG_HEADER != 0 {
            LONG_HEADER
        } else {
            SHORT_HEADER
        };
        pages.push((out.len(), i * PAGE + skip));
        out.extend_from_slice(&page[skip..]);
    }
    (out, pages)
}

fn find_bytes(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A page with a short header and `body` after it.
    fn page(long: bool, body: &[u8]) -> Vec<u8> {
        let mut p = vec![0u8; PAGE];
        p[0..2].copy_from_slice(&0xD110u16.to_le_bytes());
        let info: u16 = if long { XLP_LONG_HEADER } else { 0 };
        p[2..4].copy_from_slice(&info.to_le_bytes());
        let skip = if long { LONG_HEADER } else { SHORT_HEADER };
        p[skip..skip + body.len()].copy_from_slice(body);
        p
    }

    fn record(name: &str) -> Vec<u8> {
        let mut r = vec![0u8; RECORD_HEADER];
        r[16] = XLOG_RESTORE_POINT;
        r[17] = RM_XLOG_ID;
        r.extend_from_slice(&DATA_SHORT);
        r.extend_from_slice(&[7; 8]);
        let mut n = name.as_bytes().to_vec();
        n.resize(64, 0);
        r.extend_from_slice(&n);
        r
    }

    #[test]
    fn finds_a_restore_point_also_across_a_page_boundary() {
        let rec = record("before_m3");
        let mut seg = page(true, &rec);
        assert!(holds(&seg, "before_m3"));
        assert!(
            !holds(&seg, "before_m"),
            "a prefix of the name is another name"
        );
        assert!(!holds(&seg, "other"));
        // The record split by a page header: the first 30 bytes at the end of page 1.
        let mut first = vec![0u8; PAGE - LONG_HEADER - 30];
        first.extend_from_slice(&rec[..30]);
        seg = page(true, &first);
        seg.extend(page(false, &rec[30..]));
        assert!(holds(&seg, "before_m3"));
        // Its position: the name, in the second page after its short header.
        let name_in_record = RECORD_HEADER + DATA_SHORT.len() + 8;
        assert_eq!(
            position(&seg, "before_m3"),
            Some(PAGE + SHORT_HEADER + name_in_record - 30)
        );
    }

    #[test]
    fn the_name_as_row_data_is_no_restore_point() {
        let mut body = vec![1u8; 100];
        body.extend_from_slice(b"before_m3\0");
        assert!(!holds(&page(true, &body), "before_m3"));
        // Another resource manager's record with the same shape.
        let mut rec = record("before_m3");
        rec[17] = 10;
        assert!(!holds(&page(true, &rec), "before_m3"));
    }
}
