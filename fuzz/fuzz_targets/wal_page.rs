//! WAL page headers (segments from storage, the walsender or the spool): never a panic; a header
//! taken as a whole segment's matches its name.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = pgkeep::pg::walheader::parse_long_header("x", data);
    let name: pgkeep::pg::WalFileName = "000000010000000000000001".parse().unwrap();
    if let Ok(h) = pgkeep::pg::walheader::check_segment(&name, data, None) {
        assert_eq!(data.len(), h.seg_size.bytes() as usize);
    }
});
