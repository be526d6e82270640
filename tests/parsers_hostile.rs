//! Every parser of bytes from outside, fed arbitrary input (proptest): WAL file names, LSNs,
//! object headers and stored objects, WAL page headers, replication messages, backup ids and
//! archive names, storage URLs. None may panic; each either refuses or returns something that
//! re-encodes to what it read. `PGKEEPTEST_PROPTEST_CASES` sets the cases per property (2000 by
//! default; a nightly run can take 100000).

use bytes::Bytes;
use pgkeep::pg::messages::{BackupMessage, StandbyStatusUpdate, WalMessage};
use proptest::prelude::*;

fn cases() -> u32 {
    std::env::var("PGKEEPTEST_PROPTEST_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(2000)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases()))]

    #[test]
    fn wal_file_names_round_trip_or_are_refused(s in "\\PC{0,40}|[0-9A-F]{8,24}(\\.partial|\\.history|\\.[0-9A-F]{8}\\.backup)?") {
        if let Ok(name) = s.parse::<pgkeep::pg::WalFileName>() {
            prop_assert_eq!(name.to_string(), s);
        }
    }

    #[test]
    fn lsns_round_trip_or_are_refused(s in "\\PC{0,20}|[0-9A-F]{1,8}/[0-9A-F]{1,8}") {
        if let Ok(l) = s.parse::<pgkeep::pg::Lsn>() {
            prop_assert_eq!(l.to_string().parse::<pgkeep::pg::Lsn>().unwrap(), l);
        }
    }

    #[test]
    fn stored_objects_never_panic(data in proptest::collection::vec(any::<u8>(), 0..300)) {
        let _ = pgkeep::storage::object::Header::parse(&data);
        let _ = pgkeep::storage::object::open(&data, keys().1);
        let _ = pgkeep::storage::object::check(&data);
    }

    /// A valid header for an encrypted object (its stored checksum right) over hostile bytes: the
    /// age parser refuses them without a panic.
    #[test]
    fn hostile_bytes_behind_an_encrypted_header_are_refused(
        body in proptest::collection::vec(any::<u8>(), 0..400),
        keep in 0usize..400,
    ) {
        let (writer, reader) = keys();
        let (mut header, sealed) =
            pgkeep::storage::object::seal(pgkeep::codec::Codec::Snappy, b"x", writer);
        // Part of a real age file, then noise.
        let real = &sealed[64..];
        let mut stored_body = real[..keep.min(real.len())].to_vec();
        stored_body.extend_from_slice(&body);
        header.checksum = pgkeep::storage::object::content_sha256(&stored_body);
        let mut stored = header.to_bytes().to_vec();
        stored.extend_from_slice(&stored_body);
        if stored_body != real {
            prop_assert!(pgkeep::storage::object::open(&stored, reader).is_err());
        }
    }

    /// A flipped byte never yields other content: an encrypted object (its checksum is over the
    /// stored bytes) is always refused; a plain one is refused unless the flip left the decoded
    /// content as it was (found here: a snappy copy offset changed within a periodic run decodes
    /// to the same bytes, which the checksum of the content then rightly accepts).
    #[test]
    fn damaged_objects_are_refused(seed in any::<u64>(), flip in 0usize..1000) {
        let plain: Vec<u8> = (0..500u64).map(|i| (i.wrapping_mul(seed) >> 3) as u8).collect();
        for (encrypted, (writer, reader)) in
            [(false, (&Default::default(), &Default::default())), (true, keys())]
        {
            let (_, mut stored) =
                pgkeep::storage::object::seal(pgkeep::codec::Codec::Snappy, &plain, writer);
            let at = flip % stored.len();
            stored[at] ^= 0x5A;
            match pgkeep::storage::object::open(&stored, reader) {
                Err(_) => prop_assert!(pgkeep::storage::object::check(&stored).is_err()),
                Ok((_, content)) => {
                    prop_assert!(!encrypted, "a damaged encrypted object opened");
                    prop_assert_eq!(content, plain.clone());
                }
            }
        }
    }

    #[test]
    fn wal_page_headers_never_panic(data in proptest::collection::vec(any::<u8>(), 0..80)) {
        let _ = pgkeep::pg::walheader::parse_long_header("x", &data);
    }

    #[test]
    fn replication_messages_never_panic(data in proptest::collection::vec(any::<u8>(), 0..64)) {
        let b = Bytes::from(data);
        let _ = WalMessage::parse(b.clone());
        let _ = BackupMessage::parse(b.clone());
        if let Ok(u) = StandbyStatusUpdate::parse(b.clone()) {
            prop_assert_eq!(&u.encode()[..], &b[..]);
        }
    }

    #[test]
    fn backup_ids_and_archive_names_are_strict(s in "\\PC{0,30}") {
        if let Ok(id) = s.parse::<pgkeep::storage::layout::BackupId>() {
            prop_assert_eq!(id.to_string(), s.clone());
            prop_assert!(!s.contains('/') && !s.contains(".."));
        }
        if pgkeep::storage::layout::ArchiveName::try_from(s.clone()).is_ok() {
            prop_assert!(!s.contains('/') && s.ends_with(".tar"));
        }
    }

    #[test]
    fn storage_urls_never_panic_and_never_keep_dot_parts(s in "\\PC{0,40}|(s3|gs|az|file)://[a-z./]{0,20}") {
        if let Ok(u) = pgkeep::storage::StorageUrl::parse(&s) {
            let text = u.to_string();
            prop_assert!(!text.split('/').any(|p| p == ".."), "{}", text);
        }
    }
}

/// One writer (recipient only) and one reader (identity only), made once.
fn keys() -> (
    &'static pgkeep::storage::Keys,
    &'static pgkeep::storage::Keys,
) {
    use pgkeep::storage::{EncryptionSettings, Keys};
    static KEYS: std::sync::OnceLock<(Keys, Keys)> = std::sync::OnceLock::new();
    let (w, r) = KEYS.get_or_init(|| {
        let (file, recipient) = pgkeep::storage::crypt::generate();
        let path = std::env::temp_dir().join(format!("pgkeep-proptest-{}.key", std::process::id()));
        std::fs::write(&path, file).unwrap();
        let reader = Keys::from_settings(&EncryptionSettings {
            recipients: vec![],
            identity_file: Some(path.clone()),
        })
        .unwrap();
        let _ = std::fs::remove_file(&path);
        let writer = Keys::from_settings(&EncryptionSettings {
            recipients: vec![recipient],
            identity_file: None,
        })
        .unwrap();
        (writer, reader)
    });
    (w, r)
}
