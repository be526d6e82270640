//! The daemon's HTTP API under load while it streams (loopback, bounded in count and time): 100
//! slow readers of `/wal/…` that never read their answer, 40 clients polling `/status` and
//! `/metrics`, a client that sends half a request and stops, and one with a 256 KiB header, all
//! during pgbench. Streaming keeps up, the daemon's memory stays under the chart's limit (at most
//! 16 WAL bodies are held at once; most of the rest are told 503), slow clients are cut after the idle
//! timeout, and afterwards `/wal` serves again.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::*;

/// The daemon's peak resident memory (VmHWM), in bytes.
fn peak_rss(daemon: &Daemon) -> u64 {
    let pid = daemon.pid();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .unwrap()
        .trim()
        .trim_end_matches(" kB")
        .trim()
        .parse()
        .unwrap();
    kb * 1024
}

#[test]
fn the_http_api_under_load_while_streaming() {
    let dir = TestDir::new("http-load");
    let storage = Storage::new(Backend::File, &dir);
    let bin = dir.install_pgkeep();
    // Default 16 MiB segments: each /wal body is a whole one.
    let mut pg = PgCluster::init(dir.path(), "primary", 16, &storage.env);
    pg.start();
    let daemon = Daemon::start(
        &dir,
        &storage,
        &bin,
        &pg,
        &[
            ("PGKEEP_HTTP_IDLE_TIMEOUT_SECS", "3"),
            ("PGKEEP_PARTIAL_UPLOAD_SECS", "1"),
            ("PGKEEP_PREFETCH_SEGMENTS", "0"),
        ],
    );
    run_ok(&mut pg.pgbench(&["-i", "-s", "4", "-q"]));
    // The segment served is one of random bytes: stored whole (it does not compress), its body
    // cannot sit in the socket's buffers, so a slow reader holds its permit.
    pg.psql("create table noise (b bytea)");
    pg.psql(
        "insert into noise select decode(string_agg(md5(random()::text || i::text), ''), 'hex') \
         from generate_series(1, 2400) g, generate_series(1, 1000) i group by g",
    );
    let seg = pg.psql("select pg_walfile_name(pg_current_wal_lsn() - 20000000)");
    pg.psql("select pg_switch_wal()");
    let lsn = parse_lsn(&pg.psql("select pg_current_wal_lsn()"));
    wait_for(
        "the first segments in storage",
        Duration::from_secs(60),
        || (daemon.durable() >= lsn).then_some(()),
    );
    let stored = stored_keys(&storage)
        .into_iter()
        .find(|k| k.ends_with(&format!("/wal/00000001/{seg}")))
        .expect("the segment of random bytes is stored");
    let stored_len = std::fs::metadata(storage.object_file(&stored))
        .unwrap()
        .len();
    assert!(
        stored_len > 15 << 20,
        "{seg} is stored in {stored_len} bytes"
    );
    let port = daemon.port;
    let before = peak_rss(&daemon);

    // 100 readers that ask for a segment and never read the answer.
    let (served, refused) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let mut slow = vec![];
    for _ in 0..100 {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        write!(s, "GET /wal/{seg} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        slow.push(s);
    }
    // pgbench meanwhile, and 40 clients polling /status and /metrics.
    let mut load = pg.pgbench(&["-c", "2", "-T", "6", "-n"]).spawn().unwrap();
    let started = Instant::now();
    let pollers: Vec<_> = (0..40)
        .map(|i| {
            let (ok, failed) = (served.clone(), refused.clone());
            std::thread::spawn(move || {
                let path = if i % 2 == 0 { "/status" } else { "/metrics" };
                while started.elapsed() < Duration::from_secs(6) {
                    match std::panic::catch_unwind(|| http("GET", port, path).0) {
                        Ok(200) => ok.fetch_add(1, Ordering::Relaxed),
                        _ => failed.fetch_add(1, Ordering::Relaxed),
                    };
                    std::thread::sleep(Duration::from_millis(50));
                }
            })
        })
        .collect();
    // Half a request, then nothing: cut after the idle timeout.
    let mut half = TcpStream::connect(("127.0.0.1", port)).unwrap();
    half.write_all(b"GET /status HTTP/1.1\r\nHo").unwrap();
    half.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let cut_started = Instant::now();
    let mut buf = [0u8; 64];
    let n = half.read(&mut buf).unwrap_or(0);
    let cut_after = cut_started.elapsed();
    assert_eq!(n, 0, "the half request got an answer");
    assert!(
        cut_after >= Duration::from_secs(2) && cut_after < Duration::from_secs(15),
        "the half request was cut after {cut_after:?} (idle timeout 3 s)"
    );
    // A 256 KiB header: refused, the daemon unharmed.
    let mut big = TcpStream::connect(("127.0.0.1", port)).unwrap();
    big.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let header = format!(
        "GET /status HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(256 << 10)
    );
    let _ = big.write_all(header.as_bytes());
    let mut answer = vec![];
    let _ = big.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        !answer.starts_with("HTTP/1.1 200"),
        "a 256 KiB header was answered: {}",
        answer.lines().next().unwrap_or_default()
    );

    for p in pollers {
        p.join().unwrap();
    }
    assert!(load.wait().unwrap().success());
    let (ok, failed) = (
        served.load(Ordering::Relaxed),
        refused.load(Ordering::Relaxed),
    );
    assert!(
        ok >= 200,
        "only {ok} status/metrics answers ({failed} failed)"
    );
    assert_eq!(
        failed, 0,
        "{failed} status/metrics requests failed under load"
    );

    // Streaming kept going: everything pgbench wrote reaches storage.
    pg.psql("select pg_switch_wal()");
    let end = parse_lsn(&pg.psql("select pg_current_wal_lsn()"));
    wait_for("the stream to keep up", Duration::from_secs(60), || {
        (daemon.durable() >= end).then_some(())
    });
    let peak = peak_rss(&daemon);
    eprintln!(
        "peak RSS {} MiB before the load, {} MiB after; {ok} status/metrics answers",
        before >> 20,
        peak >> 20
    );
    assert!(peak < 512 << 20, "peak RSS {} MiB", peak >> 20);

    // The slow readers: at most 16 bodies were held at once and most were told 503; all are cut after
    // the idle timeout, and /wal serves again.
    let (mut bodies, mut busy) = (0, 0);
    for mut s in slow {
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut first = [0u8; 12];
        if s.read_exact(&mut first).is_err() {
            continue;
        }
        match &first[9..12] {
            b"200" => bodies += 1,
            b"503" => busy += 1,
            other => panic!("unexpected answer {}", String::from_utf8_lossy(other)),
        }
    }
    // A body whose bytes all fit in the socket's buffers frees its permit once written, so a few
    // more than 16 may be answered in all (18 seen); most are told 503.
    assert_eq!(bodies + busy, 100, "{bodies} bodies, {busy} told 503");
    assert!(
        bodies >= 1 && busy >= 50,
        "{bodies} bodies, {busy} told 503"
    );
    let (code, body) = http("GET", port, &format!("/wal/{seg}"));
    assert_eq!(code, 200);
    assert!(body.len() > 1000);
    drop(daemon);
    pg.stop("fast");
}
