//! TLS to Postgres and the password methods pgkeep answers (#21, finding 3).
//! - A real Postgres 15+ with `ssl = on` and only `hostssl … cert` lines for TCP: the daemon
//!   streams, `wal-switch`, `backup` and `restore` work with `sslmode=verify-full` and a client
//!   certificate, the walsender shows as encrypted in `pg_stat_ssl`, and the restored rows equal
//!   the original's. A wrong CA, a host name the certificate does not name, and a missing
//!   `sslrootcert` are each refused with a message that says so; `verify-ca` accepts the name.
//! - Fake servers on loopback: one that declines TLS gets nothing but the TLS request when
//!   `sslmode=require`; one that asks for the password in cleartext or as md5 never receives it,
//!   on the SQL and on the replication connection, unless `pg_allow_weak_auth` allows it.

mod common;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA, a server certificate for `localhost` only, and a client certificate for `keeper`.
fn make_certs(dir: &Path) {
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"];
    for ca in ["ca", "other-ca"] {
        let mut args = vec!["req", "-x509", "-nodes", "-days", "2"];
        args.extend(ec);
        let (key, crt, subj) = (
            format!("{ca}.key"),
            format!("{ca}.crt"),
            format!("/CN=pgkeep test {ca}"),
        );
        args.extend([
            "-keyout",
            &key,
            "-out",
            &crt,
            "-subj",
            &subj,
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ]);
        openssl(dir, &args);
    }
    std::fs::write(dir.join("server.ext"), "subjectAltName=DNS:localhost\n").unwrap();
    std::fs::write(dir.join("client.ext"), "keyUsage=digitalSignature\n").unwrap();
    for (who, cn) in [("server", "localhost"), ("client", "keeper")] {
        let (key, csr, crt, ext, subj) = (
            format!("{who}.key"),
            format!("{who}.csr"),
            format!("{who}.crt"),
            format!("{who}.ext"),
            format!("/CN={cn}"),
        );
        let mut args = vec!["req", "-nodes"];
        args.extend(ec);
        args.extend(["-keyout", &key, "-out", &csr, "-subj", &subj]);
        openssl(dir, &args);
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-out",
                &crt,
                "-extfile",
                &ext,
            ],
        );
    }
}

#[test]
fn tls_to_a_real_postgres() {
    let dir = TestDir::new("pgtls");
    let storage = Storage::new(Backend::File, &dir);
    let bin = dir.install_pgkeep();
    let certs = dir.mkdir("certs");
    make_certs(&certs);
    let mut pg = PgCluster::init(dir.path(), "primary", 1, &storage.env);
    for f in ["server.crt", "server.key", "ca.crt"] {
        std::fs::copy(certs.join(f), pg.data.join(f)).unwrap();
    }
    std::fs::write(
        pg.data.join("pg_hba.conf"),
        "local all all trust\n\
         local replication all trust\n\
         hostssl all keeper 127.0.0.1/32 cert\n\
         hostssl replication keeper 127.0.0.1/32 cert\n\
         host all postgres 127.0.0.1/32 trust\n\
         host all all 127.0.0.1/32 reject\n\
         host replication all 127.0.0.1/32 reject\n",
    )
    .unwrap();
    pg.set(&[
        ("ssl", "on"),
        ("ssl_cert_file", "'server.crt'"),
        ("ssl_key_file", "'server.key'"),
        ("ssl_ca_file", "'ca.crt'"),
    ]);
    give_to_postgres(&pg.data);
    // The daemon and the commands run as postgres: the client key is its own, mode 0600.
    give_to_postgres(&certs);
    for f in std::fs::read_dir(&certs).unwrap() {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(f.unwrap().path(), std::fs::Permissions::from_mode(0o600))
            .unwrap();
    }
    pg.start();
    // pgkeep's role: TCP only with TLS and its certificate (the harness's own psql is postgres).
    pg.psql("create role keeper login superuser replication");
    let c = |name: &str| certs.join(name).display().to_string();
    let conn = |host: &str, mode: &str, ca: &str| {
        format!(
            "host={host} port={} user=keeper dbname=postgres sslmode={mode} sslrootcert={} sslcert={} sslkey={}",
            pg.port,
            c(ca),
            c("client.crt"),
            c("client.key")
        )
    };
    let verified = conn("localhost", "verify-full", "ca.crt");
    let daemon = Daemon::start(
        &dir,
        &storage,
        &bin,
        &pg,
        &[
            ("PGKEEP_PG", &verified),
            ("PGKEEP_STATUS_INTERVAL_SECS", "1"),
            ("PGKEEP_PARTIAL_UPLOAD_SECS", "1"),
        ],
    );
    // The walsender's connection is encrypted, with the client certificate.
    let ssl = wait_for("the stream to start", Duration::from_secs(30), || {
        let row = pg.psql(
            "select s.ssl || ' ' || coalesce(s.client_dn, '') from pg_stat_ssl s \
             join pg_stat_activity a using (pid) where a.backend_type = 'walsender'",
        );
        (!row.is_empty()).then_some(row)
    });
    assert_eq!(ssl, "true /CN=keeper");

    pg.psql("create table t as select g, md5(g::text) h from generate_series(1, 5000) g");
    let with = |pgconn: &str| {
        vec![
            ("PGKEEP_PG".to_string(), pgconn.to_string()),
            (
                "PGKEEP_LISTEN".to_string(),
                format!("127.0.0.1:{}", daemon.port),
            ),
        ]
    };
    let out = storage.pgkeep_pg(&bin, &["backup"], &with(&verified));
    assert!(out.status.success(), "backup over TLS: {}", stderr(&out));
    pg.psql("insert into t select g, 'after' from generate_series(5001, 6000) g");
    let expected = pg.table_checksum("t");
    let out = storage.pgkeep_pg(&bin, &["wal-switch"], &with(&verified));
    assert!(
        out.status.success(),
        "wal-switch over TLS: {}",
        stderr(&out)
    );

    // verify-ca takes the chain without the name; verify-full refuses 127.0.0.1, which the
    // certificate does not name; a certificate from another CA, and verify-full without a root,
    // are refused; sslmode=disable meets the server's own refusal. Each names its problem.
    let by_ip_ca = conn("127.0.0.1", "verify-ca", "ca.crt");
    let out = storage.pgkeep_pg(&bin, &["wal-switch"], &with(&by_ip_ca));
    assert!(out.status.success(), "verify-ca: {}", stderr(&out));
    for (pgconn, says) in [
        (
            conn("127.0.0.1", "verify-full", "ca.crt"),
            "TLS handshake failed (sslmode=verify-full)",
        ),
        (
            conn("localhost", "verify-full", "other-ca.crt"),
            "TLS handshake failed (sslmode=verify-full)",
        ),
        // verify-ca skips only the name: another CA is still refused, by IP or by name.
        (
            conn("127.0.0.1", "verify-ca", "other-ca.crt"),
            "TLS handshake failed (sslmode=verify-ca)",
        ),
        (
            format!(
                "host=localhost port={} user=keeper sslmode=verify-full",
                pg.port
            ),
            "sslmode=verify-full needs sslrootcert",
        ),
        (
            format!(
                "host=localhost port={} user=keeper sslmode=disable",
                pg.port
            ),
            "no encryption",
        ),
    ] {
        for cmd in ["wal-switch", "backup"] {
            let out = storage.pgkeep_pg(&bin, &[cmd], &with(&pgconn));
            assert!(!out.status.success(), "{cmd} with {pgconn}");
            let err = stderr(&out);
            assert!(err.contains(says), "{cmd} with {pgconn}: {err}");
            assert!(!err.contains("panicked"), "{cmd} with {pgconn}: {err}");
        }
    }
    let err = stderr(&storage.pgkeep_pg(
        &bin,
        &["wal-switch"],
        &with(&conn("localhost", "verify-full", "other-ca.crt")),
    ));
    assert!(err.to_lowercase().contains("issuer"), "{err}");
    let err = stderr(&storage.pgkeep_pg(
        &bin,
        &["wal-switch"],
        &with(&conn("127.0.0.1", "verify-ca", "other-ca.crt")),
    ));
    assert!(err.contains("UnknownIssuer"), "{err}");

    // The restore of what went over TLS holds every row.
    drop(daemon);
    let target = dir.mkdir("restored");
    let out = storage.pgkeep_pg(
        &bin,
        &["restore", "--target-dir", target.to_str().unwrap()],
        &[],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    pg.stop("fast");
    let restored = start_restored(&dir, &storage, target);
    assert_eq!(restored.table_checksum("t"), expected);
}

/// What a fake server received on one connection, after its script ran.
struct Fake {
    port: u16,
    got: std::sync::mpsc::Receiver<Vec<u8>>,
}

/// A one-thread fake Postgres: for each connection (at most `conns`), answers a TLS request with
/// 'N', then sends `auth` (when the client goes on), and reports every byte it received.
fn fake_server(auth: Option<Vec<u8>>, conns: usize) -> Fake {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, got) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for _ in 0..conns {
            let Ok((mut s, _)) = listener.accept() else {
                return;
            };
            s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
            let mut all = vec![];
            let mut buf = [0u8; 4096];
            let mut sent_auth = false;
            while let Ok(n) = s.read(&mut buf) {
                if n == 0 {
                    break;
                }
                all.extend_from_slice(&buf[..n]);
                if all.ends_with(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f]) {
                    let _ = s.write_all(b"N");
                } else if !sent_auth && all.len() > 8 {
                    if let Some(a) = &auth {
                        let _ = s.write_all(a);
                    }
                    sent_auth = true;
                }
            }
            let _ = tx.send(all);
        }
    });
    Fake { port, got }
}

fn auth_request(code: u32) -> Vec<u8> {
    let mut m = vec![b'R', 0, 0, 0, 8];
    m.extend_from_slice(&code.to_be_bytes());
    if code == 5 {
        m[4] = 12;
        m.extend_from_slice(b"salt");
    }
    m
}

#[test]
fn hostile_servers_learn_nothing() {
    let dir = TestDir::new("fakepg");
    let storage = Storage::new(Backend::File, &dir);
    let bin = dir.install_pgkeep();
    let run = |cmd: &str, port: u16, extra: &[(&str, &str)]| {
        let pgconn = format!("host=127.0.0.1 port={port} user=postgres connect_timeout=5");
        let mut env: Vec<(&str, &str)> = vec![
            ("PGKEEP_PG", &pgconn),
            ("PGPASSWORD", "hunter2-secret"),
            ("PGKEEP_LISTEN", "127.0.0.1:1"),
        ];
        env.extend_from_slice(extra);
        let args: &[&str] = if cmd == "wal-switch" {
            &["wal-switch", "--timeout", "2"]
        } else {
            &[cmd]
        };
        let out = storage.pgkeep_in(&bin, args, None, &env);
        (out.status.success(), stderr(&out))
    };

    // sslmode=require and a server that declines TLS: refused, and nothing but the 8-byte TLS
    // request went out (no user name, no startup packet).
    for cmd in ["wal-switch", "backup"] {
        let fake = fake_server(None, 4);
        let (ok, err) = run(cmd, fake.port, &[("PGSSLMODE", "require")]);
        assert!(!ok, "{cmd}");
        assert!(
            err.contains("does not accept TLS connections"),
            "{cmd}: {err}"
        );
        let got = fake.got.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(got, [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f], "{cmd}");
    }

    // A server that asks for the password in cleartext or as md5 never receives it (the default
    // sslmode=prefer falls back to cleartext when it declines TLS, as libpq does).
    for (code, method) in [(3, "in cleartext"), (5, "as an md5 hash")] {
        for cmd in ["wal-switch", "backup"] {
            let fake = fake_server(Some(auth_request(code)), 4);
            let (ok, err) = run(cmd, fake.port, &[]);
            assert!(!ok, "{cmd}");
            assert!(
                err.contains(&format!("password {method}, which pgkeep refuses to send")),
                "{cmd}: {err}"
            );
            assert!(err.contains("pg_allow_weak_auth"), "{cmd}: {err}");
            assert!(!err.contains("hunter2"), "{cmd}: {err}");
            let got = fake.got.recv_timeout(Duration::from_secs(10)).unwrap();
            assert!(
                got.windows(7).all(|w| w != b"hunter2") && got.windows(3).all(|w| w != b"md5"),
                "{cmd}: the fake server received {got:?}"
            );
        }
    }
    // Allowed by the setting, the cleartext password is sent (which is why it is off).
    let fake = fake_server(Some(auth_request(3)), 4);
    let (ok, _) = run(
        "wal-switch",
        fake.port,
        &[("PGKEEP_PG_ALLOW_WEAK_AUTH", "true")],
    );
    assert!(!ok);
    let got = fake.got.recv_timeout(Duration::from_secs(10)).unwrap();
    assert!(
        got.windows(14).any(|w| w == b"hunter2-secret"),
        "with pg_allow_weak_auth the password goes out: {got:?}"
    );
}
