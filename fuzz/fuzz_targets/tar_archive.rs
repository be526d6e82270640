//! A forged base backup archive: unpacked as a restore unpacks it, into `target/` inside a fresh
//! folder. Whatever it holds, nothing appears beside `target/`, and nothing inside it is a link
//! or anything but a file or a folder (the data directory's archive has no tablespaces).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let root = tempfile::tempdir().unwrap();
    let dest = root.path().join("target");
    std::fs::create_dir(&dest).unwrap();
    let _ = pgkeep::restore::extract_data_archive(data, &dest);
    let beside: Vec<_> = std::fs::read_dir(root.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        beside,
        vec![std::ffi::OsString::from("target")],
        "written outside the target"
    );
    let mut stack = vec![dest];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let e = e.unwrap();
            let t = std::fs::symlink_metadata(e.path()).unwrap().file_type();
            assert!(
                t.is_file() || t.is_dir(),
                "{} is neither file nor folder",
                e.path().display()
            );
            if t.is_dir() {
                stack.push(e.path());
            }
        }
    }
});
