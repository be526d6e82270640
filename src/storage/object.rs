//! The format of every stored object: a 64-byte header, then the encoded content.
//!
//! ```text
//! 0..4    magic "PGKO"
//! 4       object format version (1)
//! 5       codec (0 none, 1 snappy framed, 2 zstd)
//! 6       encryption (0 none, 1 age X25519)
//! 7       encrypted: the number of recipients; otherwise 0
//! 8..16   length of the plain content, u64 little-endian
//! 16..48  SHA-256 checksum: of the plain content (not encrypted), or of the stored bytes after
//!         the header (encrypted: no hash of the plain content is kept in the clear)
//! 48..60  encrypted: the fingerprints (4 bytes each) of up to three recipients; otherwise 0
//! 60..64  first 4 bytes of SHA-256 of bytes 0..60 (detects a damaged header)
//! ```
//!
//! An encrypted object's body (bytes 64 onwards) is an age file whose plaintext is the encoded
//! (compressed) content: `tail -c +65 OBJECT | age -d -i KEYS | zstd -d` (or a snappy framed
//! decoder) gives the original bytes.
//!
//! The checksum is verified after every download before the content is used, so corruption
//! anywhere (header, compressed stream, transport) is caught; for encrypted objects that needs no
//! key ([`check`]), and age's authenticated encryption covers the plaintext.

use sha2::{Digest, Sha256};

use super::crypt::{self, Keys, OpenError};
use crate::codec::{self, Codec};

pub const MAGIC: &[u8; 4] = b"PGKO";
pub const VERSION: u8 = 1;
pub const HEADER_LEN: usize = 64;
/// Recipient fingerprints that fit in a header.
const MAX_FINGERPRINTS: usize = 3;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub codec: Codec,
    pub plain_len: u64,
    /// What the object is checked against: see the module documentation.
    pub checksum: [u8; 32],
    /// Set for an encrypted object.
    pub age: Option<AgeInfo>,
}

/// The recipients of an encrypted object, as its header names them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgeInfo {
    pub recipients: u8,
    pub fingerprints: Vec<[u8; 4]>,
}

/// The SHA-256 of content, as object headers and backup metadata record it.
pub fn content_sha256(plain: &[u8]) -> [u8; 32] {
    Sha256::digest(plain).into()
}

impl Header {
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[0..4].copy_from_slice(MAGIC);
        h[4] = VERSION;
        h[5] = self.codec.id();
        if let Some(age) = &self.age {
            h[6] = 1;
            h[7] = age.recipients;
            for (i, fp) in age.fingerprints.iter().take(MAX_FINGERPRINTS).enumerate() {
                h[48 + 4 * i..52 + 4 * i].copy_from_slice(fp);
            }
        }
        h[8..16].copy_from_slice(&self.plain_len.to_le_bytes());
        h[16..48].copy_from_slice(&self.checksum);
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
        let age = match h[6] {
            0 => None,
            1 => {
                let n = usize::from(h[7]).min(MAX_FINGERPRINTS);
                if n == 0 {
                    return Err("an encrypted object that names no recipient".into());
                }
                Some(AgeInfo {
                    recipients: h[7],
                    fingerprints: (0..n)
                        .map(|i| h[48 + 4 * i..52 + 4 * i].try_into().unwrap())
                        .collect(),
                })
            }
            m => {
                return Err(format!(
                    "encrypted with method {m}, which this pgkeep cannot decrypt"
                ));
            }
        };
        Ok(Header {
            codec,
            plain_len: u64::from_le_bytes(h[8..16].try_into().unwrap()),
            checksum: h[16..48].try_into().unwrap(),
            age,
        })
    }

    /// Whether this header says the object holds exactly `plain` (only a plain object's header
    /// can say; None for an encrypted one).
    pub fn holds(&self, plain_len: u64, plain_sha256: &[u8; 32]) -> Option<bool> {
        match self.age {
            None => Some(self.plain_len == plain_len && &self.checksum == plain_sha256),
            Some(_) => None,
        }
    }
}

/// Builds the stored form of `plain`: encrypted to `keys`' recipients when it has any.
pub fn seal(codec: Codec, plain: &[u8], keys: &Keys) -> (Header, Vec<u8>) {
    seal_known(codec, plain, keys, None)
}

/// As [`seal`], with the SHA-256 of `plain` when the caller computed it already (it is not
/// computed a second time).
pub fn seal_known(
    codec: Codec,
    plain: &[u8],
    keys: &Keys,
    plain_sha256: Option<[u8; 32]>,
) -> (Header, Vec<u8>) {
    let bound = match codec {
        Codec::None => plain.len(),
        _ => plain.len() / 2,
    };
    let mut out = Vec::with_capacity(HEADER_LEN + bound + 256);
    out.resize(HEADER_LEN, 0);
    let header = if keys.encrypts() {
        // Compressed from the slice first (the codec's fast path), then encrypted in one write.
        let mut encoded = Vec::with_capacity(bound + 64);
        codec::encode_into(codec, plain, &mut encoded);
        let mut w = keys
            .encrypt_to(&mut out)
            .expect("encrypting into memory cannot fail");
        std::io::Write::write_all(&mut w, &encoded).expect("encrypting into memory cannot fail");
        w.finish().expect("encrypting into memory cannot fail");
        Header {
            codec,
            plain_len: plain.len() as u64,
            checksum: content_sha256(&out[HEADER_LEN..]),
            age: Some(AgeInfo {
                recipients: keys.recipients().len().min(255) as u8,
                fingerprints: keys
                    .recipients()
                    .iter()
                    .take(MAX_FINGERPRINTS)
                    .map(crypt::fingerprint)
                    .collect(),
            }),
        }
    } else {
        codec::encode_into(codec, plain, &mut out);
        Header {
            codec,
            plain_len: plain.len() as u64,
            checksum: plain_sha256.unwrap_or_else(|| content_sha256(plain)),
            age: None,
        }
    };
    out[..HEADER_LEN].copy_from_slice(&header.to_bytes());
    (header, out)
}

/// Checks a stored object without decoding more than needed: an encrypted object against the
/// checksum of its stored bytes (no key needed), a plain one completely.
pub fn check(stored: &[u8]) -> Result<Header, String> {
    let header = Header::parse(stored)?;
    if header.age.is_some() {
        check_stored_sum(&header, stored)?;
    } else {
        open(stored, &Keys::default()).map_err(|e| match e {
            OpenError::Damaged(r) | OpenError::Locked(r) => r,
        })?;
    }
    Ok(header)
}

fn check_stored_sum(header: &Header, stored: &[u8]) -> Result<(), String> {
    if content_sha256(&stored[HEADER_LEN..]) != header.checksum {
        return Err("the stored bytes do not match their recorded SHA-256 checksum".into());
    }
    Ok(())
}

/// Checks, decrypts (with `keys`' identities) and decodes a stored object; the result is exactly
/// the content that was sealed.
pub fn open(stored: &[u8], keys: &Keys) -> Result<(Header, Vec<u8>), OpenError> {
    let header = Header::parse(stored).map_err(OpenError::Damaged)?;
    let body = &stored[HEADER_LEN..];
    let cannot_decode = |e: std::io::Error| {
        OpenError::Damaged(format!(
            "cannot decode the {} content: {e}",
            header.codec.name()
        ))
    };
    let plain = match &header.age {
        Some(age) => {
            check_stored_sum(&header, stored).map_err(OpenError::Damaged)?;
            let reader = keys.decrypt(body, &age.fingerprints, age.recipients)?;
            // The length is the header's word (anyone can write one): a bounded first guess.
            let guess = header.plain_len.min(body.len() as u64 * 32).min(1 << 30);
            let mut plain = Vec::with_capacity(guess as usize);
            codec::decode_stream(header.codec, reader, &mut plain, header.plain_len)
                .map_err(cannot_decode)?;
            plain
        }
        None => codec::decode(header.codec, body, header.plain_len).map_err(cannot_decode)?,
    };
    if plain.len() as u64 != header.plain_len {
        return Err(OpenError::Damaged(format!(
            "decoded {} bytes, but the header records {} (truncated object)",
            plain.len(),
            header.plain_len
        )));
    }
    if header.age.is_none() && content_sha256(&plain) != header.checksum {
        return Err(OpenError::Damaged(
            "the content does not match its recorded SHA-256 checksum".into(),
        ));
    }
    Ok((header, plain))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::crypt::EncryptionSettings;

    const CODECS: [Codec; 3] = [Codec::None, Codec::Snappy, Codec::Zstd { level: 3 }];

    fn keys_pair(dir: &std::path::Path, name: &str) -> (Keys, Keys) {
        let (file, recipient) = crypt::generate();
        let path = dir.join(name);
        std::fs::write(&path, file).unwrap();
        let writer = Keys::from_settings(&EncryptionSettings {
            recipients: vec![recipient],
            identity_file: None,
        })
        .unwrap();
        let reader = Keys::from_settings(&EncryptionSettings {
            recipients: vec![],
            identity_file: Some(path),
        })
        .unwrap();
        (writer, reader)
    }

    #[test]
    fn sealed_objects_open_to_the_same_content() {
        let dir = tempfile::tempdir().unwrap();
        let (writer, reader) = keys_pair(dir.path(), "a");
        let plain: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        for codec in CODECS {
            for (w, r) in [
                (Keys::default(), Keys::default()),
                (writer.clone(), reader.clone()),
            ] {
                let (h, stored) = seal(codec, &plain, &w);
                let (h2, back) = open(&stored, &r).unwrap();
                assert_eq!(h2.codec.id(), h.codec.id());
                assert_eq!(
                    (h2.plain_len, h2.checksum, h2.age),
                    (h.plain_len, h.checksum, h.age)
                );
                assert_eq!(back, plain);
                assert_eq!(check(&stored).unwrap().checksum, h.checksum);
            }
        }
    }

    #[test]
    fn encrypted_objects_keep_no_plain_hash_and_need_the_right_key() {
        let dir = tempfile::tempdir().unwrap();
        let (writer, reader) = keys_pair(dir.path(), "a");
        let (_, other) = keys_pair(dir.path(), "b");
        let plain = b"row: the secret marker ".repeat(1000);
        let (h, stored) = seal(Codec::Snappy, &plain, &writer);
        let plain_sha = content_sha256(&plain);
        assert!(!stored.windows(32).any(|w| w == plain_sha));
        assert!(!stored.windows(13).any(|w| w == b"secret marker"));
        assert_eq!(h.holds(plain.len() as u64, &plain_sha), None);
        let fp = crypt::fingerprint_hex(&crypt::fingerprint(&writer.recipients()[0]));
        match open(&stored, &Keys::default()) {
            Err(OpenError::Locked(m)) => {
                assert!(
                    m.contains("no identity is configured") && m.contains(&fp),
                    "{m}"
                )
            }
            r => panic!("{r:?}"),
        }
        match open(&stored, &other) {
            Err(OpenError::Locked(m)) => assert!(
                m.contains("none of which matches") && m.contains(&fp),
                "{m}"
            ),
            r => panic!("{r:?}"),
        }
        let mut bad = stored.clone();
        bad[HEADER_LEN + 100] ^= 1;
        assert!(matches!(open(&bad, &reader), Err(OpenError::Damaged(_))));
        assert!(matches!(
            open(&bad, &Keys::default()),
            Err(OpenError::Damaged(_))
        ));
        assert!(check(&bad).is_err());
    }

    #[test]
    fn any_single_flipped_byte_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let (writer, reader) = keys_pair(dir.path(), "a");
        let plain: Vec<u8> = (0..20_000u32).map(|i| (i * 7 % 256) as u8).collect();
        for codec in CODECS {
            for (w, r) in [
                (Keys::default(), Keys::default()),
                (writer.clone(), reader.clone()),
            ] {
                let (_, stored) = seal(codec, &plain, &w);
                // Every header byte and a spread of content bytes.
                let positions: Vec<usize> = (0..HEADER_LEN)
                    .chain((HEADER_LEN..stored.len()).step_by(stored.len() / 50 + 1))
                    .collect();
                for pos in positions {
                    let mut bad = stored.clone();
                    bad[pos] ^= 0x01;
                    assert!(
                        open(&bad, &r).is_err() && check(&bad).is_err(),
                        "{}: flip at {pos} went unnoticed",
                        codec.name()
                    );
                }
                assert!(
                    open(&stored[..stored.len() - 1], &r).is_err(),
                    "truncation went unnoticed"
                );
                assert!(open(&stored[..10], &r).is_err());
            }
        }
    }
}
