//! The daemon's open segment in storage: a base object (`<segment>.partial`, the segment's first
//! bytes) and the pieces that continue it (`<segment>.pieces/<start>-<end>`, each the segment's
//! bytes `start .. end`). Each round of streaming stores only the bytes that are new since the last
//! durable point as one small piece; now and then (see `partial_max_pieces`) the whole prefix is
//! stored again as a new base, and once the whole segment is stored, base and pieces go.
//!
//! A reader starts from the base's length and takes, again and again, the piece that starts at or
//! before the end reached so far and reaches furthest past it. Pieces that the base already
//! covers (left by a fold or a crash) are skipped; WAL at one position of one timeline never
//! changes, so where two pieces overlap their bytes agree, and a reader that finds otherwise stops
//! with an error rather than guess.

use object_store::path::Path;

/// A piece as listed: the segment offsets it holds and its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PieceRef {
    pub start: u64,
    pub end: u64,
    pub key: Path,
}

/// The pieces that continue a base of `base_len` bytes, in the order they apply; the end they
/// reach is that of the last one (or `base_len`).
pub fn chain(base_len: u64, pieces: &[PieceRef]) -> Vec<PieceRef> {
    let mut reach = base_len;
    let mut out = vec![];
    while let Some(next) = pieces
        .iter()
        .filter(|p| p.start <= reach && p.end > reach)
        .max_by_key(|p| p.end)
    {
        reach = next.end;
        out.push(next.clone());
    }
    out
}

/// Where a base of `base_len` bytes and its pieces reach.
pub fn chain_end(base_len: u64, pieces: &[PieceRef]) -> u64 {
    chain(base_len, pieces).last().map_or(base_len, |p| p.end)
}

/// Appends a piece (the segment's bytes from `start` on) to the bytes assembled so far: the part
/// they already hold must be equal, and the piece must not leave a gap.
pub fn append(assembled: &mut Vec<u8>, start: u64, bytes: &[u8]) -> Result<(), String> {
    let have = assembled.len() as u64;
    let end = start + bytes.len() as u64;
    if start > have {
        return Err(format!(
            "a piece starts at offset {start:#X}, after the {have:#X} bytes before it"
        ));
    }
    let overlap = usize::try_from(have.min(end) - start).expect("within a segment");
    let from = usize::try_from(start).expect("within a segment");
    if assembled[from..from + overlap] != bytes[..overlap] {
        return Err(format!(
            "the piece at offset {start:#X} disagrees with the bytes before it"
        ));
    }
    assembled.extend_from_slice(&bytes[overlap..]);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(start: u64, end: u64) -> PieceRef {
        PieceRef {
            start,
            end,
            key: Path::from(format!("{start}-{end}")),
        }
    }

    #[test]
    fn the_chain_takes_the_furthest_piece_and_skips_what_the_base_holds() {
        // Stale pieces from before a fold (end <= base), a zombie piece from an earlier session
        // that overlaps, and a gap after which nothing counts.
        let pieces = [
            p(10, 20),
            p(20, 30),
            p(30, 45),
            p(30, 40),
            p(40, 50),
            p(60, 70),
        ];
        let got: Vec<(u64, u64)> = chain(30, &pieces)
            .iter()
            .map(|p| (p.start, p.end))
            .collect();
        assert_eq!(got, vec![(30, 45), (40, 50)]);
        assert_eq!(chain_end(30, &pieces), 50);
        assert_eq!(chain_end(55, &pieces), 55);
        assert_eq!(chain_end(0, &[]), 0);
    }

    #[test]
    fn appending_checks_overlap_and_gaps() {
        let mut a = b"abcdef".to_vec();
        append(&mut a, 4, b"efgh").unwrap();
        assert_eq!(a, b"abcdefgh");
        append(&mut a, 8, b"ij").unwrap();
        assert_eq!(a, b"abcdefghij");
        // Wholly covered: nothing added.
        append(&mut a, 2, b"cd").unwrap();
        assert_eq!(a, b"abcdefghij");
        let e = append(&mut a, 9, b"Xk").unwrap_err();
        assert!(e.contains("disagrees"), "{e}");
        let e = append(&mut a, 12, b"m").unwrap_err();
        assert!(e.contains("after the"), "{e}");
        assert_eq!(a, b"abcdefghij");
    }
}
