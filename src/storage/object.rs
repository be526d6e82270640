//! The format of every stored object: a 64-byte header, then the encoded content.
//!
//! ```text
//! 0..4    magic "PGKO"
//! 4       object format version (1)
//! 5       codec (0 none, 1 snappy framed, 2 zstd)
//! 6       encryption (0 none; reserved for age)
//! 7       reserved, 0
//! 8..16   length of the plain content, u64 little-endian
//! 16..48  SHA-256 of the plain content
//! 48..60  reserved, 0
//! 60..64  first 4 bytes of SHA-256 of bytes 0..60 (detects a damaged header)
//! ```
//!
//! The plain checksum is verified after every download before the content is used, so corruption
//! anywhere (header, compressed stream, transport) is caught.

use sha2::{Digest, Sha256};

use crate::codec::{self, Codec};

pub const MAGIC: &[u8; 4] = b"PGKO";
pub const VERSION: u8 = 1;
pub const HEADER_LEN: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub codec: Codec,
    pub plain_len: u64,
    pub plain_sha256: [u8; 32],
}

/// The SHA-256 of content, as object headers and backup metadata record it.
pub fn content_sha256(plain: &[u8]) -> [u8; 32] {
    Sha256::digest(plain).into()
}

impl Header {
    pub fn for_content(codec: Codec, plain: &[u8]) -> Header {
        Header {
            codec,
            plain_len: plain.len() as u64,
            plain_sha256: content_sha256(plain),
        }
    }

    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[0..4].copy_from_slice(MAGIC);
        h[4] = VERSION;
        h[5] = self.codec.id();
        h[6] = 0;
        h[8..16].copy_from_slice(&self.plain_len.to_le_bytes());
        h[16..48].copy_from_slice(&self.plain_sha256);
        let check = Sha256::digest(&h[0..60]);
        h[60..64].copy_from_slice(&check[0..4]);
        h
    }

    pub fn parse(bytes: &[u8]) -> Result<Header, String> {
        if bytes.len() < HEADER_LEN {
            return Err(format!(
                "only {} bytes, shorter than the object header",
                bytes.len()
            ));
        }
        let h = &bytes[..HEADER_LEN];
        if &h[0..4] != MAGIC {
            return Err("not a pgkeep object (bad magic)".into());
        }
        if Sha256::digest(&h[0..60])[0..4] != h[60..64] {
            return Err("the object header is damaged (header checksum mismatch)".into());
        }
        if h[4] != VERSION {
            return Err(format!(
                "object format version {} is newer than this pgkeep understands",
                h[4]
            ));
        }
        let codec = Codec::from_id(h[5]).ok_or_else(|| format!("unknown codec id {}", h[5]))?;
        if h[6] != 0 {
            return Err(format!(
                "encrypted with method {}, which this pgkeep cannot decrypt",
                h[6]
            ));
        }
        Ok(Header {
            codec,
            plain_len: u64::from_le_bytes(h[8..16].try_into().unwrap()),
            plain_sha256: h[16..48].try_into().unwrap(),
        })
    }
}

/// Builds the stored form of `plain`.
pub fn seal(codec: Codec, plain: &[u8]) -> (Header, Vec<u8>) {
    let header = Header::for_content(codec, plain);
    let bound = match codec {
        Codec::None => plain.len(),
        _ => plain.len() / 2,
    };
    let mut out = Vec::with_capacity(HEADER_LEN + bound + 64);
    out.extend_from_slice(&header.to_bytes());
    codec::encode_into(codec, plain, &mut out);
    (header, out)
}

/// Checks and decodes a stored object; the result is exactly the content that was sealed.
pub fn open(stored: &[u8]) -> Result<(Header, Vec<u8>), String> {
    let header = Header::parse(stored)?;
    let plain = codec::decode(header.codec, &stored[HEADER_LEN..], header.plain_len)
        .map_err(|e| format!("cannot decode the {} content: {e}", header.codec.name()))?;
    if plain.len() as u64 != header.plain_len {
        return Err(format!(
            "decoded {} bytes, but the header records {} (truncated object)",
            plain.len(),
            header.plain_len
        ));
    }
    if content_sha256(&plain) != header.plain_sha256 {
        return Err("the content does not match its recorded SHA-256 checksum".into());
    }
    Ok((header, plain))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_objects_open_to_the_same_content() {
        let plain: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        for codec in [Codec::None, Codec::Snappy, Codec::Zstd { level: 3 }] {
            let (h, stored) = seal(codec, &plain);
            let (h2, back) = open(&stored).unwrap();
            assert_eq!(
                h2,
                Header {
                    codec: Codec::from_id(codec.id()).unwrap(),
                    ..h
                }
            );
            assert_eq!(back, plain);
        }
    }

    #[test]
    fn any_single_flipped_byte_is_detected() {
        let plain: Vec<u8> = (0..20_000u32).map(|i| (i * 7 % 256) as u8).collect();
        for codec in [Codec::None, Codec::Snappy, Codec::Zstd { level: 3 }] {
            let (_, stored) = seal(codec, &plain);
            // Every header byte and a spread of content bytes.
            let positions: Vec<usize> = (0..HEADER_LEN)
                .chain((HEADER_LEN..stored.len()).step_by(stored.len() / 50 + 1))
                .collect();
            for pos in positions {
                let mut bad = stored.clone();
                bad[pos] ^= 0x01;
                assert!(
                    open(&bad).is_err(),
                    "{}: flip at {pos} went unnoticed",
                    codec.name()
                );
            }
            assert!(
                open(&stored[..stored.len() - 1]).is_err(),
                "truncation went unnoticed"
            );
            assert!(open(&stored[..10]).is_err());
        }
    }
}
