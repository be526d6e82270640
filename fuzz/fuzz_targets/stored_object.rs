//! Objects read from storage (anyone with the bucket's keys can write one): the header parser,
//! the checksum check and the opener never panic, and what `open` accepts, `check` accepts too.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = pgkeep::storage::object::Header::parse(data);
    let checked = pgkeep::storage::object::check(data).is_ok();
    if pgkeep::storage::object::open(data, &Default::default()).is_ok() {
        assert!(checked, "open took an object check refuses");
    }
});
