//! The configuration: a config file's text and `PGKEEP_*` variables, as hostile as they come.
//! Never a panic; what loads has a storage URL without `..` parts.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // The first line's `KEY=value` pairs (`;` between them) as variables, the rest as the file.
    let (vars, file) = text.split_once('\n').unwrap_or(("", text));
    let env: Vec<(String, String)> = vars
        .split(';')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (format!("PGKEEP_{}", k.to_ascii_uppercase()), v.to_string()))
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pgkeep.toml");
    std::fs::write(&path, file).unwrap();
    if let Ok(c) = pgkeep::config::Config::load(Some(&path), env) {
        assert!(!c.storage.to_string().split('/').any(|p| p == ".."));
    }
});
