//! Every supported Postgres major (13 to 18), end to end on `file://` storage: archive-push under
//! load beside the daemon's stream, a base backup, the cluster destroyed, restores to latest (its
//! WAL served by the daemon) and to a named restore point with rows equal, and the daemon
//! following the restored cluster's promotion onto timeline 2. Server binaries: Debian's 15, the
//! others from `scripts/install-deps.sh majors`; client tools are Postgres 15's for all.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;

const TABLES: [&str; 3] = ["pgbench_accounts", "pgbench_history", "markers"];

fn markers(c: &PgCluster) -> String {
    c.psql("select coalesce(string_agg(name, ',' order by id), '') from markers")
}

fn restore(
    dir: &TestDir,
    storage: &Storage,
    bin: &Path,
    name: &str,
    args: &[&str],
    listen: u16,
) -> PgCluster {
    let target = dir.mkdir(name);
    let mut full = vec!["restore", "--target-dir", target.to_str().unwrap()];
    full.extend_from_slice(args);
    let env = [("PGKEEP_LISTEN".to_string(), format!("127.0.0.1:{listen}"))];
    let out = storage.pgkeep_pg(bin, &full, &env);
    assert!(out.status.success(), "restore {args:?}: {}", stderr(&out));
    verify_restored(&target);
    start_restored(dir, storage, target)
}

fn matrix(major: u32) {
    let dir = TestDir::new(&format!("pg{major}"));
    let storage = Storage::new(Backend::File, &dir);
    let bin = dir.install_pgkeep();
    let fast = [
        ("PGKEEP_STATUS_INTERVAL_SECS", "1"),
        ("PGKEEP_PARTIAL_UPLOAD_SECS", "1"),
    ];
    let mut primary = PgCluster::init_major(dir.path(), "primary", 1, &storage.env, major);
    primary.set(&[
        ("archive_mode", "on"),
        ("archive_command", &archive_command(&bin, &storage)),
    ]);
    primary.start();
    assert_eq!(
        primary.psql("select current_setting('server_version_num')::int / 10000"),
        major.to_string()
    );
    // archive_command and the daemon's stream write the same storage.
    let daemon = Daemon::start(&dir, &storage, &bin, &primary, &fast);
    run_ok(&mut primary.pgbench(&["-i", "-s", "2", "-q"]));
    primary.psql("create table markers (id serial primary key, name text not null)");
    let mut load = primary
        .pgbench(&["-c", "2", "-T", "4", "-n"])
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let out = storage.pgkeep_pg(&bin, &["backup"], &primary.client_env());
    assert!(out.status.success(), "backup on {major}: {}", stderr(&out));
    assert!(load.wait().unwrap().success(), "pgbench failed");
    primary.psql("insert into markers (name) values ('m1')");
    primary.psql("select pg_create_restore_point('rp')");
    primary.psql("insert into markers (name) values ('m2')");
    let expected: Vec<String> = TABLES.iter().map(|t| primary.table_checksum(t)).collect();
    daemon.wal_switch(&storage, &bin, &primary);
    primary.switch_and_wait_archived();
    assert_eq!(
        primary.psql("select failed_count from pg_stat_archiver"),
        "0",
        "{}",
        primary.log()
    );
    primary.stop("fast");
    // Postgres stopping ends the stream: normal, so not a warning (the reconnects that follow,
    // which find no server, are).
    wait_for(
        "the daemon to see the stream end",
        Duration::from_secs(30),
        || {
            daemon
                .log()
                .contains("the server ended the WAL stream")
                .then_some(())
        },
    );
    let log = daemon.log();
    assert!(
        !log.lines()
            .any(|l| l.contains("WARN") && l.contains("ended the WAL stream")),
        "{log}"
    );
    std::fs::remove_dir_all(&primary.data).unwrap();

    // Latest, with restore_command served by the daemon.
    let latest = restore(&dir, &storage, &bin, "latest", &[], daemon.port);
    let got: Vec<String> = TABLES.iter().map(|t| latest.table_checksum(t)).collect();
    assert_eq!(got, expected, "{major}: {}", latest.log());
    assert_eq!(markers(&latest), "m1,m2");
    let metrics = String::from_utf8(http("GET", daemon.port, "/metrics").1).unwrap();
    let served: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("pgkeep_wal_served_total "))
        .and_then(|v| v.parse().ok())
        .unwrap();
    assert!(served >= 1.0, "the daemon served no WAL: {metrics}");
    // A named restore point.
    let mut pitr = restore(
        &dir,
        &storage,
        &bin,
        "pitr",
        &["--target-name", "rp"],
        free_port(),
    );
    assert_eq!(markers(&pitr), "m1", "{}", pitr.log());
    pitr.stop("fast");
    daemon.signal("TERM");
    drop(daemon);

    // The restored cluster was promoted onto timeline 2: a daemon beside it streams that.
    latest.psql("create table on_timeline_2 as select generate_series(1, 500) g");
    let daemon = Daemon::start(&dir, &storage, &bin, &latest, &fast);
    daemon.wal_switch(&storage, &bin, &latest);
    let keys = stored_keys(&storage);
    assert!(
        keys.iter()
            .any(|k| k.ends_with("/wal/00000002/00000002.history")),
        "{keys:?}"
    );
    assert!(
        keys.iter()
            .any(|k| k.contains("/wal/00000002/00000002000000")),
        "{keys:?}"
    );
    let out = storage.pgkeep_pg(&bin, &["list"], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("1 base backup(s)"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// WAL with a page magic no supported major uses (0xD121, 19's beta): `archive-push` refuses it
/// by name, and the daemon, streamed it through a proxy that rewrites the magic, says why it holds
/// WAL in the slot (log, /status, a metric) instead of waiting silently.
#[test]
fn an_unknown_wal_page_magic_is_refused_and_reported() {
    let dir = TestDir::new("magic");
    let storage = Storage::new(Backend::File, &dir);
    let bin = dir.install_pgkeep();
    let mut pg = PgCluster::init(dir.path(), "primary", 1, &storage.env);
    pg.start();
    pg.psql("create table t as select generate_series(1, 1000) g");
    let seg = pg.psql("select pg_walfile_name(pg_current_wal_lsn())");
    pg.psql("select pg_switch_wal()");
    let mut data = std::fs::read(pg.data.join("pg_wal").join(&seg)).unwrap();
    data[0..2].copy_from_slice(&0xD121u16.to_le_bytes());
    let crafted = dir.path().join(&seg);
    std::fs::write(&crafted, &data).unwrap();
    let out = storage.pgkeep_in(
        &bin,
        &["archive-push", crafted.to_str().unwrap()],
        None,
        &[],
    );
    assert!(!out.status.success());
    for want in [seg.as_str(), "page magic 0xD121", "Postgres 13 to 18"] {
        assert!(stderr(&out).contains(want), "{want}: {}", stderr(&out));
    }
    assert!(
        stored_keys(&storage).iter().all(|k| !k.contains(&seg)),
        "the crafted segment was stored"
    );

    let proxy = MagicProxy::start(pg.port, 0xD121);
    let port = proxy.port.to_string();
    let daemon = Daemon::start(
        &dir,
        &storage,
        &bin,
        &pg,
        // The proxy reads the server's side message by message: no TLS request's one-byte answer.
        &[
            ("PGPORT", &port),
            ("PGSSLMODE", "disable"),
            ("PGKEEP_PARTIAL_UPLOAD_SECS", "1"),
        ],
    );
    let status = wait_for(
        "the daemon to report the stream's failure",
        Duration::from_secs(30),
        || {
            let s: serde_json::Value = serde_json::from_str(&daemon.status()).ok()?;
            let e = s["stream_error"].as_str()?.to_string();
            e.contains("0xD121").then_some((e, s))
        },
    );
    assert!(status.0.contains("page magic 0xD121"), "{status:?}");
    let metrics = String::from_utf8(http("GET", daemon.port, "/metrics").1).unwrap();
    assert!(
        metrics.lines().any(|l| l == "pgkeep_stream_failing 1"),
        "{metrics}"
    );
    assert!(
        daemon.log().contains("page magic 0xD121"),
        "{}",
        daemon.log()
    );
    assert!(
        stored_keys(&storage).iter().all(|k| !k.contains("/wal/")),
        "WAL with an unknown magic was stored"
    );
}

macro_rules! majors {
    ($($name:ident => $major:expr),* $(,)?) => {$(
        #[test]
        fn $name() {
            matrix($major);
        }
    )*};
}

majors! {
    postgres_13 => 13,
    postgres_14 => 14,
    postgres_15 => 15,
    postgres_16 => 16,
    postgres_17 => 17,
    postgres_18 => 18,
}
