//! Timeline history files (from storage or the walsender): refused, or timelines that only grow
//! (as Postgres' own reader demands: a forged file must not make a timeline its own ancestor).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(entries) = pgkeep::verify::parse_history(text) {
        for w in entries.windows(2) {
            assert!(w[0].0.get() < w[1].0.get(), "{entries:?}");
        }
    }
});
