//! Bad input and failures of `archive-push` and `wal-fetch`, on both storage backends, with real WAL
//! from a real cluster: each is refused with a message that names the problem, with the exit code
//! Postgres needs, and changes nothing.

mod common;

use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use common::*;

fn code(out: &Output) -> i32 {
    out.status.code().expect("exited normally")
}

#[track_caller]
fn assert_failed(out: &Output, want_code: i32, needles: &[&str]) {
    let err = stderr(out);
    assert_eq!(code(out), want_code, "exit code; stderr:\n{err}");
    for n in needles {
        assert!(err.contains(n), "stderr should mention {n:?}:\n{err}");
    }
}

fn errors(backend: Backend) {
    let dir = TestDir::new("errors");
    let storage = Storage::new(backend, &dir);
    let bin = dir.install_pgkeep();
    let mut pg = PgCluster::init(dir.path(), "pg", 1, &[]);
    pg.set(&[("wal_keep_size", "'1GB'")]);
    pg.start();
    pg.psql("create table t as select g from generate_series(1, 1000) g");
    let seg = pg.psql("select pg_walfile_name(pg_switch_wal())");
    pg.psql("insert into t select generate_series(1, 1000)");
    let next = pg.psql("select pg_walfile_name(pg_switch_wal())");
    assert_ne!(seg, next);
    pg.stop("fast");
    let data = pg.data.clone();
    let seg_path = data.join("pg_wal").join(&seg);
    let original = std::fs::read(&seg_path).unwrap();
    let scratch = dir.mkdir("scratch");
    let sysid = pg_sysid(&data);
    let key = format!("clusters/{sysid}/wal/00000001/{seg}");
    let push = |path: &Path, cwd: &Path, extra: &[(&str, &str)]| {
        storage.pgkeep_in(
            &bin,
            &["archive-push", path.to_str().unwrap()],
            Some(cwd),
            extra,
        )
    };
    let fetch = |name: &str, dest: &Path, extra: &[(&str, &str)]| {
        storage.pgkeep_in(
            &bin,
            &["wal-fetch", name, dest.to_str().unwrap()],
            Some(&data),
            extra,
        )
    };

    // Before anything is archived, a fetch is a configuration problem, not "no such file":
    // answering 1 would end a recovery early, silently.
    let dest = scratch.join("RECOVERYXLOG");
    assert_failed(&fetch(&seg, &dest, &[]), 126, &["no pgkeep archive"]);

    // Storage that is not this cluster's archive (of a newer layout; describing another
    // cluster): the push fails, naming why, and writes no WAL there, though its check and the
    // read of the segment's key run side by side.
    if backend == Backend::File {
        let plant = |key: &str, json: &str| {
            let path = storage.object_file(key);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            let (_, sealed) = pgkeep::storage::object::seal(
                pgkeep::codec::Codec::None,
                json.as_bytes(),
                &Default::default(),
            );
            std::fs::write(path, sealed).unwrap();
        };
        let info = format!("clusters/{sysid}/cluster.json");
        for (planted, json, says) in [
            (
                "pgkeep.json",
                r#"{"format":"pgkeep","layout_version":999}"#.to_string(),
                "layout version 999",
            ),
            (
                info.as_str(),
                format!(r#"{{"system_identifier":"{}"}}"#, sysid + 1),
                "describes cluster",
            ),
        ] {
            if planted != "pgkeep.json" {
                let marker = format!(
                    r#"{{"format":"pgkeep","layout_version":{}}}"#,
                    pgkeep::storage::layout::LAYOUT_VERSION
                );
                plant("pgkeep.json", &marker);
            }
            plant(planted, &json);
            let out = push(Path::new(&format!("pg_wal/{seg}")), &data, &[]);
            assert_failed(&out, 1, &[says]);
            assert!(
                !storage.object_file(&key).exists(),
                "WAL written: {}",
                stderr(&out)
            );
            std::fs::remove_file(storage.object_file("pgkeep.json")).unwrap();
            let _ = std::fs::remove_file(storage.object_file(&info));
        }
    }

    // A good push, and the same push again (Postgres retries after a crash): both succeed.
    let out = push(Path::new(&format!("pg_wal/{seg}")), &data, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let stored = std::fs::read(storage.object_file(&key))
        .expect("the object is where docs/storage-format.md says");
    let out = push(Path::new(&format!("pg_wal/{seg}")), &data, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("already archived with identical content"),
        "{}",
        stderr(&out)
    );

    // Not a WAL file name.
    let junk = scratch.join("notawal");
    std::fs::write(&junk, &original).unwrap();
    assert_failed(
        &push(&junk, &data, &[]),
        1,
        &["notawal", "not a WAL segment"],
    );

    // A segment whose header does not match its name.
    let renamed = scratch.join(&next);
    std::fs::copy(&seg_path, &renamed).unwrap();
    assert_failed(
        &push(&renamed, &data, &[]),
        1,
        &[&next, "the page header says this segment starts at"],
    );

    // A file that is not WAL at all under a valid name.
    let zeros = scratch.join("000000010000000000000055");
    std::fs::write(&zeros, vec![0u8; 1 << 20]).unwrap();
    assert_failed(
        &push(&zeros, &data, &[]),
        1,
        &["000000010000000000000055", "page magic"],
    );

    // A real segment of a major pgkeep does not know (19's beta page magic).
    let mut future = original.clone();
    future[0..2].copy_from_slice(&0xD121u16.to_le_bytes());
    let future_path = scratch.join("000000010000000000000056");
    std::fs::write(&future_path, &future).unwrap();
    assert_failed(
        &push(&future_path, &data, &[]),
        1,
        &["page magic 0xD121", "Postgres 13 to 18"],
    );

    // Another cluster's WAL (system identifier mismatch).
    assert_failed(
        &push(&seg_path, &data, &[("PGKEEP_SYSTEM_IDENTIFIER", "12345")]),
        1,
        &[&seg, "not 12345"],
    );

    // Different content under an existing name is refused, and the stored object is untouched.
    let mut changed = original.clone();
    changed[original.len() / 2] ^= 0xFF;
    let changed_path = scratch.join(&seg);
    std::fs::write(&changed_path, &changed).unwrap();
    assert_failed(
        &push(&changed_path, &data, &[]),
        1,
        &[&seg, "different content"],
    );
    assert_eq!(
        std::fs::read(storage.object_file(&key)).unwrap(),
        stored,
        "the refused push changed storage"
    );

    // A history file needs to know its cluster: from the data directory, not from anywhere else.
    let history = scratch.join("00000002.history");
    std::fs::write(&history, "1\t0/3000000\tno recovery target specified\n").unwrap();
    assert_failed(
        &push(&history, &scratch, &[]),
        1,
        &["00000002.history", "which cluster"],
    );
    let out = push(&history, &data, &[]);
    assert!(out.status.success(), "{}", stderr(&out));

    // A fetch of a good segment gives back Postgres' bytes.
    let out = fetch(&seg, &dest, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        std::fs::read(&dest).unwrap() == original,
        "fetched bytes differ"
    );
    std::fs::remove_file(&dest).unwrap();

    // A missing segment: exit 1 and nothing written.
    assert_failed(&fetch("0000000100000000000000F0", &dest, &[]), 1, &[]);
    assert!(!dest.exists());

    // Invalid names never reach storage or the file system.
    for bad in [
        "../../../etc/passwd",
        "000000010000000000000001/../x",
        "RECOVERYXLOG",
        "",
    ] {
        assert_failed(&fetch(bad, &dest, &[]), 126, &["not a WAL"]);
        assert!(!dest.exists());
    }

    // A corrupted object is detected, named, and nothing is written: a damaged header, and an object
    // cut short. (A flipped bit inside the compressed data is caught by the content checksum; the
    // unit tests of storage::object flip every byte.)
    let mut damaged = stored.clone();
    damaged[20] ^= 0x01;
    let truncated = stored[..stored.len() - 1000].to_vec();
    for (what, bytes) in [("damaged header", damaged), ("truncated", truncated)] {
        std::fs::write(storage.object_file(&key), &bytes).unwrap();
        let out = fetch(&seg, &dest, &[]);
        assert_failed(&out, 126, &[&key, "corrupted object"]);
        assert!(
            !dest.exists(),
            "{what}: a corrupted object was written to DEST"
        );
    }

    // Re-pushing the good segment repairs the damaged copy.
    let out = push(&seg_path, &data, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(fetch(&seg, &dest, &[]).status.success());
    assert!(std::fs::read(&dest).unwrap() == original);
    std::fs::remove_file(&dest).unwrap();

    // An unknown cluster is a failure, not "not in the archive".
    assert_failed(
        &fetch(&seg, &dest, &[("PGKEEP_SYSTEM_IDENTIFIER", "12345")]),
        126,
        &["no archive for the cluster with system identifier 12345"],
    );

    // Bad configuration names the key; wal-fetch fails with 126, archive-push with 1.
    assert_failed(
        &fetch(&seg, &dest, &[("PGKEEP_COMPRESSION", "lz4")]),
        126,
        &["PGKEEP_COMPRESSION", "lz4"],
    );
    assert_failed(
        &push(&seg_path, &data, &[("PGKEEP_STORAGE", "ftp://x/y")]),
        1,
        &["PGKEEP_STORAGE"],
    );
    assert_failed(
        &push(&seg_path, &data, &[("PGKEEP_STORAGE_MAX_RETRIES", "-3")]),
        1,
        &["PGKEEP_STORAGE_MAX_RETRIES"],
    );
    // A usage error of wal-fetch must not look like "not in the archive" either.
    let out = storage.pgkeep_in(&bin, &["wal-fetch", &seg], Some(&data), &[]);
    assert_eq!(code(&out), 126, "{}", stderr(&out));

    // The wrong prefix (an empty place in the same storage): 126, never 1.
    let elsewhere = match backend {
        Backend::File => format!("{}-elsewhere", storage.url),
        Backend::S3 => format!("{}/elsewhere", storage.url),
    };
    if backend == Backend::File {
        std::fs::create_dir_all(elsewhere.trim_start_matches("file://")).unwrap();
    }
    assert_failed(
        &fetch(&seg, &dest, &[("PGKEEP_STORAGE", &elsewhere)]),
        126,
        &["no pgkeep archive"],
    );
    assert!(!dest.exists());
}

/// The system identifier in a data directory's pg_control, as pg_controldata prints it.
fn pg_sysid(data: &Path) -> u64 {
    let out = run_ok(std::process::Command::new(pg_bin("pg_controldata")).arg(data));
    out.lines()
        .find_map(|l| l.strip_prefix("Database system identifier:"))
        .expect("pg_controldata prints the system identifier")
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn file_storage_bad_input_and_failures() {
    errors(Backend::File);
}

#[test]
fn s3_storage_bad_input_and_failures() {
    errors(Backend::S3);
}

/// Unreachable storage: wal-fetch retries within its bounds, then exits 126 (never 1) in bounded time;
/// archive-push fails too.
#[test]
fn unreachable_storage_fails_loudly_in_bounded_time() {
    let dir = TestDir::new("unreachable");
    let bin = dir.install_pgkeep();
    let config = dir.path().join("pgkeep.toml");
    // wal-fetch rides out an outage for wal_fetch_outage_secs (60 by default), then fails.
    std::fs::write(&config, "storage = \"s3://nowhere/prefix\"\nstorage_max_retries = 3\nstorage_retry_timeout_secs = 5\nwal_fetch_outage_secs = 5\n")
        .unwrap();
    let closed = free_port();
    let env = [
        ("AWS_ACCESS_KEY_ID", "x"),
        ("AWS_SECRET_ACCESS_KEY", "y"),
        ("AWS_REGION", "us-east-1"),
        ("AWS_ALLOW_HTTP", "true"),
    ];
    let endpoint = format!("http://127.0.0.1:{closed}");
    let run = |args: &[&str]| {
        let started = Instant::now();
        let out = std::process::Command::new(&bin)
            .arg("--config")
            .arg(&config)
            .args(args)
            .env_clear()
            .envs(env)
            .env("AWS_ENDPOINT", &endpoint)
            .current_dir(dir.path())
            .output()
            .unwrap();
        (out, started.elapsed())
    };
    let dest = dir.path().join("out");
    let (out, took) = run(&[
        "wal-fetch",
        "000000010000000000000001",
        dest.to_str().unwrap(),
    ]);
    assert_failed(&out, 126, &["pgkeep.json"]);
    assert!(took < Duration::from_secs(30), "took {took:?}");
    eprintln!("{took:?}: {}", stderr(&out));
    assert!(stderr(&out).contains("retries"), "{}", stderr(&out));
    assert!(!dest.exists());

    // A file:// archive that is not there is just as loud.
    let out = std::process::Command::new(&bin)
        .args([
            "wal-fetch",
            "000000010000000000000001",
            dest.to_str().unwrap(),
        ])
        .env_clear()
        .env(
            "PGKEEP_STORAGE",
            format!("file://{}/missing", dir.path().display()),
        )
        .output()
        .unwrap();
    assert_failed(&out, 126, &["does not exist"]);
}

/// S3 with no credentials at all: the one error names the bucket, the variables that would have
/// given credentials and the instance metadata service that did not (a loopback stand-in that
/// answers 403, as one outside EC2 does), instead of the metadata service's raw answer four times.
#[test]
fn missing_s3_credentials_are_named_once() {
    let dir = TestDir::new("nocreds");
    let bin = dir.install_pgkeep();
    let imds = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let imds_url = format!("http://{}", imds.local_addr().unwrap());
    std::thread::spawn(move || {
        for stream in imds.incoming().take(64) {
            let Ok(mut s) = stream else { continue };
            let mut buf = [0u8; 4096];
            let _ = std::io::Read::read(&mut s, &mut buf);
            let _ = std::io::Write::write_all(
                &mut s,
                b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            );
        }
    });
    let endpoint = format!("http://127.0.0.1:{}", free_port());
    let started = Instant::now();
    let out = std::process::Command::new(&bin)
        .args(["list"])
        .env_clear()
        .env("PGKEEP_STORAGE", "s3://pgkeep-nocreds/prod")
        .env("PGKEEP_SYSTEM_IDENTIFIER", "7312345678901234567")
        .env("AWS_REGION", "us-east-1")
        .env("AWS_ALLOW_HTTP", "true")
        .env("AWS_ENDPOINT", &endpoint)
        .env("AWS_METADATA_ENDPOINT", &imds_url)
        .current_dir(dir.path())
        .output()
        .unwrap();
    let err = stderr(&out);
    assert!(!out.status.success(), "{err}");
    for needle in [
        "s3://pgkeep-nocreds/prod",
        "no credentials for this bucket",
        "AWS_ACCESS_KEY_ID",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "instance metadata service did not give any",
        "403",
    ] {
        assert!(err.contains(needle), "missing {needle:?} in: {err}");
    }
    assert_eq!(
        err.matches("no credentials").count(),
        1,
        "said more than once: {err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "took {:?}",
        started.elapsed()
    );
}
