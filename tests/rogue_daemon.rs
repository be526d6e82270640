//! Another process on the daemon's `listen` address (every container of a pod shares loopback,
//! and the port is free while the daemon restarts): `wal-fetch` takes nothing from it without the
//! daemon's proof of its token, so a forged segment that passes every other check (the right
//! name, the cluster's page headers, a valid object checksum) is not delivered and storage's copy
//! is; the same object with a proof made from the token is taken, so the proof is what decides.
//! `wal-switch` does not take such a process's word that WAL is durable (#21, finding 5), and
//! `archive-push` not its word that a segment is stored already (#17).

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::time::Duration;

use common::*;
use pgkeep::http_token::Token;

/// A primary archiving to file:// storage, with one segment archived.
struct Archived {
    dir: TestDir,
    storage: Storage,
    bin: std::path::PathBuf,
    pg: PgCluster,
    /// The segment's name, and Postgres' own bytes of it.
    seg: String,
    original: Vec<u8>,
}

fn one_archived_segment(name: &str) -> Archived {
    let dir = TestDir::new(name);
    let storage = Storage::new(Backend::File, &dir);
    let bin = dir.install_pgkeep();
    let mut pg = archiving_cluster(&dir, &storage, &bin, "primary", 1);
    pg.start();
    pg.psql("create table t as select generate_series(1, 20000) g");
    let seg = pg.switch_and_wait_archived();
    let original = std::fs::read(pg.data.join("pg_wal").join(&seg)).unwrap();
    Archived {
        dir,
        storage,
        bin,
        pg,
        seg,
        original,
    }
}

/// An HTTP server on loopback that answers `/wal/…` with `object` (served as `served`) and
/// `/status` with a durable position far ahead, each with the proof `prove` makes (or none).
fn impostor(object: Vec<u8>, served: String, prove: Option<Token>) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in listener.incoming().take(64) {
            let Ok(mut conn) = conn else { return };
            conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut head = vec![];
            let mut reader = BufReader::new(conn.try_clone().unwrap());
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                head.push(line);
            }
            let path = head
                .first()
                .and_then(|l| l.split_whitespace().nth(1))
                .unwrap_or("")
                .to_string();
            let nonce = head
                .iter()
                .find_map(|l| l.strip_prefix("x-pgkeep-nonce: "))
                .map(|n| n.trim().to_string())
                .unwrap_or_default();
            let (ctype, body, subject) = if path.starts_with("/wal/") {
                let subject = pgkeep::http_token::wal_subject(&served, &object);
                ("application/vnd.pgkeep.object", object.clone(), subject)
            } else if let Some(rest) = path.strip_prefix("/archived/") {
                // "Stored, with exactly that content", for whatever segment and digest are asked.
                let (name, query) = rest.split_once('?').unwrap_or((rest, ""));
                let sha = query
                    .split('&')
                    .find_map(|p| p.strip_prefix("sha256="))
                    .unwrap_or("");
                let subject = pgkeep::http_token::archived_subject(name, sha);
                ("text/plain", b"stored\n".to_vec(), subject)
            } else {
                let body = br#"{"durable_lsn":"FFFFFFFF/0","received_lsn":"FFFFFFFF/0"}"#.to_vec();
                ("application/json", body.clone(), body)
            };
            let proof = match &prove {
                Some(t) => t.proof(&nonce, &subject),
                None => "ab".repeat(32),
            };
            let _ = write!(
                conn,
                "HTTP/1.1 200 OK\r\ncontent-type: {ctype}\r\nx-pgkeep-served: {served}\r\n\
                 x-pgkeep-proof: {proof}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                body.len()
            );
            let _ = conn.write_all(&body);
        }
    });
    port
}

#[test]
fn an_impostor_on_listen_is_not_believed() {
    let Archived {
        dir,
        storage,
        bin,
        mut pg,
        seg,
        original,
    } = one_archived_segment("impostor");
    // The token a daemon wrote at its last start.
    let token = Token::create(&storage.config.with_file_name("http").join("token")).unwrap();

    // A forgery that passes every check but the proof: the segment with a byte changed inside a
    // record (its page headers untouched), stored as pgkeep stores a plain segment.
    let mut forged = original.clone();
    forged[0x3000 + 100] ^= 0xff;
    let (_, object) =
        pgkeep::storage::object::seal(pgkeep::codec::Codec::Snappy, &forged, &Default::default());
    let dest = dir.path().join("RECOVERYXLOG");
    let fetch = |port: u16| {
        let _ = std::fs::remove_file(&dest);
        let listen = format!("127.0.0.1:{port}");
        let out = storage.pgkeep_in(
            &bin,
            &["wal-fetch", &seg, dest.to_str().unwrap()],
            Some(&pg.data),
            &[("PGKEEP_LISTEN", &listen)],
        );
        assert!(out.status.success(), "{}", stderr(&out));
        (std::fs::read(&dest).unwrap(), stderr(&out))
    };

    // Without the token's proof: storage's copy, and a warning that says why.
    let (got, log) = fetch(impostor(object.clone(), seg.clone(), None));
    assert!(got == original, "the impostor's segment was delivered");
    assert!(
        log.contains("did not prove it is this pod's pgkeep daemon"),
        "{log}"
    );
    assert!(
        log.contains("via=\"storage\"") || log.contains("via=storage"),
        "{log}"
    );

    // With a proof made from the token (what only the daemon can make), the same object is taken:
    // the proof, not some other check, is what kept the forgery out above.
    let (got, log) = fetch(impostor(object, seg.clone(), Some(token.clone())));
    assert!(got == forged, "{log}");
    assert!(
        log.contains("via=\"daemon\"") || log.contains("via=daemon"),
        "{log}"
    );

    // archive-push does not take an impostor's "stored" for a segment storage lacks: it stores
    // it itself; with a proof made from the token, it would have taken that word.
    let key = stored_keys(&storage)
        .into_iter()
        .find(|k| k.ends_with(&format!("/{seg}")))
        .unwrap();
    let object_file = storage.object_file(&key);
    let push = |port: u16| {
        std::fs::remove_file(&object_file).unwrap();
        let listen = format!("127.0.0.1:{port}");
        let wal = pg.data.join("pg_wal").join(&seg);
        let out = storage.pgkeep_in(
            &bin,
            &["archive-push", wal.to_str().unwrap()],
            Some(&pg.data),
            &[("PGKEEP_LISTEN", &listen)],
        );
        assert!(out.status.success(), "{}", stderr(&out));
        (object_file.exists(), stderr(&out))
    };
    let (stored, log) = push(impostor(vec![], seg.clone(), None));
    assert!(stored, "the impostor's word was taken: {log}");
    assert!(
        log.contains("did not prove it is this pod's pgkeep daemon"),
        "{log}"
    );
    let (stored, log) = push(impostor(vec![], seg.clone(), Some(token.clone())));
    assert!(
        !stored && log.contains("the daemon's stream stored it"),
        "{log}"
    );

    // wal-switch does not believe an impostor's "durable": it fails, saying so.
    let port = impostor(vec![], seg.clone(), None);
    let mut env: Vec<(String, String)> = pg.client_env();
    env.push(("PGKEEP_LISTEN".into(), format!("127.0.0.1:{port}")));
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let out = storage.pgkeep_in(&bin, &["wal-switch", "--timeout", "2"], None, &env);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("did not prove it is the pgkeep daemon") && err.contains("within 2s"),
        "{err}"
    );
    pg.stop("fast");
}

/// A server on loopback that answers every request with 404 and the given proof header (or none).
fn answers_404(proof: Option<String>) -> u16 {
    answers("404 Not Found", proof)
}

/// A server on loopback that answers every request with `status` and the given proof header (or
/// none), and no body.
fn answers(status: &'static str, proof: Option<String>) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in listener.incoming().take(64) {
            let Ok(mut conn) = conn else { continue };
            let mut reader = BufReader::new(conn.try_clone().unwrap());
            let mut line = String::new();
            while reader.read_line(&mut line).unwrap_or(0) > 0 && line != "\r\n" {
                line.clear();
            }
            let header = proof
                .as_ref()
                .map(|p| format!("x-pgkeep-proof: {p}\r\n"))
                .unwrap_or_default();
            let _ = write!(
                conn,
                "HTTP/1.1 {status}\r\n{header}content-length: 0\r\nconnection: close\r\n\r\n"
            );
        }
    });
    port
}

/// The daemon's "prefetched in the hand-off directory you share: take it there" (#17) is a word
/// anyone on `listen` can say: `wal-fetch` then takes only what the directory holds and passes
/// the checks (a damaged file planted there as the answer is sent is removed, never delivered),
/// asks once more, and otherwise reads storage. Recovery gets the stored segment either way.
#[test]
fn take_it_from_the_directory_is_only_a_hint() {
    let Archived {
        dir,
        storage,
        bin,
        mut pg,
        seg,
        original,
    } = one_archived_segment("hint");
    let shared = dir.path().join("handoff");
    std::fs::create_dir(&shared).unwrap();
    std::fs::set_permissions(&shared, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    // The token a daemon wrote at its last start.
    Token::create(&storage.config.with_file_name("http").join("token")).unwrap();
    // Answers 303 to everything; a request that offers the directory first finds a damaged file
    // planted there under a prefetched file's name (after wal-fetch's own first look).
    let mut forged = original.clone();
    forged[0x3000 + 100] ^= 0xff;
    let planted = shared.join(format!("{seg}.{:08x}.wal", 0x0bad_f00du32));
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let offered = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    {
        let (planted, offered) = (planted.clone(), offered.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming().take(16) {
                let Ok(mut conn) = conn else { continue };
                let mut reader = BufReader::new(conn.try_clone().unwrap());
                let mut line = String::new();
                let _ = reader.read_line(&mut line);
                if line.contains("&handoff=") {
                    offered.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    std::fs::write(&planted, &forged).unwrap();
                }
                while reader.read_line(&mut line).unwrap_or(0) > 0 && !line.ends_with("\r\n\r\n") {}
                let _ = write!(
                    conn,
                    "HTTP/1.1 303 See Other\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                );
            }
        });
    }
    let dest = dir.path().join("RECOVERYXLOG");
    let listen = format!("127.0.0.1:{port}");
    let out = storage.pgkeep_in(
        &bin,
        &["wal-fetch", &seg, dest.to_str().unwrap()],
        Some(&pg.data),
        &[
            ("PGKEEP_LISTEN", &listen),
            ("PGKEEP_PREFETCH_DIR", shared.to_str().unwrap()),
            // No prefetch of wal-fetch's own into the directory.
            ("PGKEEP_PREFETCH_SEGMENTS", "0"),
            ("PGKEEP_LOG_LEVEL", "debug"),
        ],
    );
    let log = stderr(&out);
    assert!(out.status.success(), "{log}");
    assert_eq!(
        offered.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "{log}"
    );
    assert!(
        std::fs::read(&dest).unwrap() == original,
        "a planted file reached %p: {log}"
    );
    assert!(
        log.contains("not usable") && log.contains("could not be taken"),
        "{log}"
    );
    assert!(
        log.contains("via=\"storage\"") || log.contains("via=storage"),
        "{log}"
    );
    assert!(!planted.exists(), "the damaged file was kept");
    pg.stop("fast");
}

/// `wal_fetch_storage = false` (the chart's Postgres container without storage keys): wal-fetch
/// reads nothing but the daemon, believes its proven answers, "not in the archive" included, and
/// stops recovery (126) when no proven answer comes, never ends it (1) on a guess.
#[test]
fn a_storage_less_wal_fetch_believes_only_the_daemons_proofs() {
    let Archived {
        dir,
        storage,
        bin,
        mut pg,
        seg,
        original,
    } = one_archived_segment("storageless");
    let daemon = Daemon::start(&dir, &storage, &bin, &pg, &[]);
    let dest = dir.path().join("RECOVERYXLOG");
    // Storage the container cannot read: any fallback to it would fail loudly.
    let fetch = |name: &str, port: u16| {
        let _ = std::fs::remove_file(&dest);
        let listen = format!("127.0.0.1:{port}");
        let out = storage.pgkeep_in(
            &bin,
            &["wal-fetch", name, dest.to_str().unwrap()],
            Some(&pg.data),
            &[
                ("PGKEEP_LISTEN", &listen),
                ("PGKEEP_WAL_FETCH_STORAGE", "false"),
                ("PGKEEP_STORAGE", "file:///nonexistent/pgkeep-archive"),
                ("PGKEEP_WAL_FETCH_OUTAGE_SECS", "2"),
            ],
        );
        (out.status.code(), stderr(&out))
    };
    let (code, log) = fetch(&seg, daemon.port);
    assert_eq!(code, Some(0), "{log}");
    assert!(std::fs::read(&dest).unwrap() == original, "{log}");
    assert!(
        log.contains("via=daemon") || log.contains("via=\"daemon\""),
        "{log}"
    );
    // Not in the archive, by the daemon's proven word: exit 1 (recovery ends there).
    for missing in ["0000000100000000000000F0", "00000007.history"] {
        let (code, log) = fetch(missing, daemon.port);
        assert_eq!(code, Some(1), "{missing}: {log}");
        assert!(!dest.exists());
    }
    // An impostor's unproven 404, or no daemon at all: 126 after the outage window, saying why.
    let port = impostor(vec![], seg.clone(), None);
    let (code, log) = fetch("0000000100000000000000F0", port);
    assert_eq!(code, Some(126), "{log}");
    assert!(
        log.contains("no proven answer") && log.contains("wal_fetch_storage = false"),
        "{log}"
    );
    // A 404 with no proof, with a proof replayed from another nonce, with the proof of a WAL
    // answer instead of "absent": none ends recovery.
    let token = Token::read(&daemon.token).unwrap();
    let missing = "0000000100000000000000F0";
    let replayed = token.proof(
        &"00".repeat(16),
        &pgkeep::http_token::absent_subject(missing),
    );
    let other_kind = token.proof(
        &"00".repeat(16),
        &pgkeep::http_token::wal_subject(missing, &[]),
    );
    for proof in [None, Some(replayed), Some(other_kind)] {
        let (code, log) = fetch(missing, answers_404(proof.clone()));
        assert_eq!(code, Some(126), "{proof:?}: {log}");
    }
    // A damaged object in storage: the daemon hands over what is stored (it checks only the
    // header; wal-fetch decodes and checks the content), and wal-fetch never delivers it.
    let key = stored_keys(&storage)
        .into_iter()
        .find(|k| k.ends_with(&format!("/wal/00000001/{seg}")))
        .expect("the segment is stored");
    let file = storage.object_file(&key);
    let saved = std::fs::read(&file).unwrap();
    let mut damaged = saved.clone();
    let middle = damaged.len() / 2;
    damaged[middle] ^= 0x40;
    std::fs::write(&file, &damaged).unwrap();
    let (code, log) = fetch(&seg, daemon.port);
    assert_eq!(code, Some(126), "{log}");
    assert!(log.contains("did not verify"), "{log}");
    assert!(!dest.exists(), "a damaged segment reached %p");
    std::fs::write(&file, &saved).unwrap();
    drop(daemon);
    let (code, log) = fetch(&seg, free_port());
    assert_eq!(code, Some(126), "{log}");
    assert!(!dest.exists());
    pg.stop("fast");
}
