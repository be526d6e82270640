//! Names from outside (WAL file names, LSNs, backup ids, archive names, storage URLs): each is
//! refused or round-trips to the very same text, and never keeps a `..` part.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(name) = s.parse::<pgkeep::pg::WalFileName>() {
        assert_eq!(name.to_string(), s);
    }
    if let Ok(l) = s.parse::<pgkeep::pg::Lsn>() {
        assert_eq!(l.to_string().parse::<pgkeep::pg::Lsn>().unwrap(), l);
    }
    if let Ok(id) = s.parse::<pgkeep::storage::layout::BackupId>() {
        assert_eq!(id.to_string(), s);
        assert!(!s.contains('/') && !s.contains(".."));
    }
    if pgkeep::storage::layout::ArchiveName::try_from(s.to_string()).is_ok() {
        assert!(!s.contains('/') && s.ends_with(".tar"));
    }
    if let Ok(u) = pgkeep::storage::StorageUrl::parse(s) {
        assert!(!u.to_string().split('/').any(|p| p == ".."), "{u}");
    }
});
