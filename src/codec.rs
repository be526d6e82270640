//! Compression of stored objects: snappy (framed format, the default), zstd, or none.
//!
//! Both directions stream (`encode_stream`, `decode_stream`) so that large objects never need to sit
//! in memory whole; `encode`/`decode` are the in-memory conveniences WAL segments use. Encryption
//! will wrap these streams; the object header already has a field for it (see `storage::object`).

use std::io::{self, Read, Write};

/// How an object's content is compressed. The zstd level matters only when encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    None,
    Snappy,
    Zstd { level: i32 },
}

impl Codec {
    /// The byte recorded in each object's header.
    pub fn id(self) -> u8 {
        match self {
            Codec::None => 0,
            Codec::Snappy => 1,
            Codec::Zstd { .. } => 2,
        }
    }

    /// The codec an object header names; the level is irrelevant for decoding.
    pub fn from_id(id: u8) -> Option<Codec> {
        match id {
            0 => Some(Codec::None),
            1 => Some(Codec::Snappy),
            2 => Some(Codec::Zstd { level: 0 }),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Codec::None => "none",
            Codec::Snappy => "snappy",
            Codec::Zstd { .. } => "zstd",
        }
    }
}

impl std::str::FromStr for Codec {
    type Err = String;
    /// A codec by its [`Codec::name`] (the zstd level is not part of the name).
    fn from_str(s: &str) -> Result<Codec, String> {
        match s {
            "none" => Ok(Codec::None),
            "snappy" => Ok(Codec::Snappy),
            "zstd" => Ok(Codec::Zstd { level: 0 }),
            _ => Err(format!("unknown codec {s:?}")),
        }
    }
}

/// Stored by name (`"snappy"`), as `backup.json` records the codec of its chunks.
impl serde::Serialize for Codec {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl<'de> serde::Deserialize<'de> for Codec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        <std::borrow::Cow<'de, str>>::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// Compresses everything `input` yields into `output`; returns the number of plain bytes read.
pub fn encode_stream(codec: Codec, mut input: impl Read, output: impl Write) -> io::Result<u64> {
    match codec {
        Codec::None => {
            let mut output = output;
            io::copy(&mut input, &mut output)
        }
        Codec::Snappy => {
            let mut enc = snap::write::FrameEncoder::new(output);
            let n = io::copy(&mut input, &mut enc)?;
            enc.into_inner().map_err(|e| e.into_error())?;
            Ok(n)
        }
        Codec::Zstd { level } => {
            let mut enc = zstd::stream::write::Encoder::new(output, level)?;
            let n = io::copy(&mut input, &mut enc)?;
            enc.finish()?;
            Ok(n)
        }
    }
}

/// Decompresses `input` into `output`, refusing to produce more than `limit` bytes (a corrupted or
/// hostile object cannot fill memory or disk). Returns the number of plain bytes written.
pub fn decode_stream(
    codec: Codec,
    input: impl Read,
    mut output: impl Write,
    limit: u64,
) -> io::Result<u64> {
    let reader: Box<dyn Read + '_> = match codec {
        Codec::None => Box::new(input),
        Codec::Snappy => Box::new(snap::read::FrameDecoder::new(input)),
        Codec::Zstd { .. } => Box::new(zstd::stream::read::Decoder::new(input)?),
    };
    let n = io::copy(&mut reader.take(limit.saturating_add(1)), &mut output)?;
    if n > limit {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("decompressed content is longer than the {limit} bytes recorded"),
        ));
    }
    Ok(n)
}

pub fn encode(codec: Codec, plain: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(plain.len() / 2 + 64);
    encode_into(codec, plain, &mut out);
    out
}

/// Appends `plain`, encoded, to `out`. Snappy compresses straight from the slice (through
/// `io::copy` every byte would first be copied into the encoder's buffer).
pub fn encode_into(codec: Codec, plain: &[u8], out: &mut Vec<u8>) {
    use std::io::Write;
    match codec {
        Codec::Snappy => {
            let mut enc = snap::write::FrameEncoder::new(out);
            enc.write_all(plain)
                .and_then(|_| enc.flush())
                .expect("encoding into memory cannot fail");
        }
        _ => {
            encode_stream(codec, plain, out).expect("encoding into memory cannot fail");
        }
    }
}

pub fn decode(codec: Codec, encoded: &[u8], limit: u64) -> io::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(limit.min(1 << 30) as usize);
    decode_stream(codec, encoded, &mut out, limit)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_memory_and_streamed_encodings_are_identical() {
        // Objects written by either path must compare equal byte for byte (archive-push accepts
        // an identical re-push; read-back verification compares stored bytes).
        let plain: Vec<u8> = (0..3_000_000u32).map(|i| (i / 7 % 251) as u8).collect();
        for codec in [Codec::None, Codec::Snappy, Codec::Zstd { level: 3 }] {
            let mut streamed = vec![];
            encode_stream(codec, &plain[..], &mut streamed).unwrap();
            assert_eq!(encode(codec, &plain), streamed, "{}", codec.name());
        }
    }

    const ALL: [Codec; 4] = [
        Codec::None,
        Codec::Snappy,
        Codec::Zstd { level: 1 },
        Codec::Zstd { level: 19 },
    ];

    fn sample() -> Vec<u8> {
        // Compressible and incompressible parts, like a WAL segment with a zeroed tail.
        let mut data: Vec<u8> = (0..300_000u32)
            .flat_map(|i| (i.wrapping_mul(2654435761)).to_le_bytes())
            .collect();
        data.extend(std::iter::repeat_n(0u8, 700_000));
        data
    }

    #[test]
    fn every_codec_round_trips() {
        let plain = sample();
        for codec in ALL {
            let enc = encode(codec, &plain);
            let kind = Codec::from_id(codec.id()).unwrap();
            assert_eq!(
                decode(kind, &enc, plain.len() as u64).unwrap(),
                plain,
                "{}",
                codec.name()
            );
            if codec != Codec::None {
                assert!(enc.len() < plain.len(), "{} should compress", codec.name());
            }
        }
        assert_eq!(
            decode(Codec::Snappy, &encode(Codec::Snappy, b""), 0).unwrap(),
            b""
        );
    }

    #[test]
    fn output_beyond_the_recorded_length_is_refused() {
        let plain = sample();
        for codec in ALL {
            let enc = encode(codec, &plain);
            let err = decode(codec, &enc, plain.len() as u64 - 1).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{}", codec.name());
        }
    }

    #[test]
    fn corrupted_compressed_data_is_an_error_not_garbage() {
        let plain = sample();
        for codec in [Codec::Snappy, Codec::Zstd { level: 3 }] {
            let mut enc = encode(codec, &plain);
            let mid = enc.len() / 2;
            enc[mid] ^= 0x55;
            match decode(codec, &enc, plain.len() as u64) {
                Err(_) => {}
                // zstd without its own checksum may decode to different bytes; the object layer's
                // SHA-256 of the plain content catches that, so at least it must not be the original.
                Ok(out) => assert_ne!(out, plain, "{}", codec.name()),
            }
        }
    }

    #[test]
    fn unknown_codec_ids_are_refused() {
        assert!(Codec::from_id(3).is_none());
        assert!(Codec::from_id(255).is_none());
    }
}
