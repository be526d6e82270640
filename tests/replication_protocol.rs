//! The replication protocol client against a real Postgres: trust, SCRAM-SHA-256 and (only when
//! allowed) md5
//! authentication over TCP and a Unix socket, Postgres' own errors surfaced with their code, and a
//! CopyBoth stream (START_REPLICATION) that delivers WAL.

mod common;

use std::time::Duration;

use common::*;
use pgkeep::pg::conninfo::{PgConnInfo, PgHost};
use pgkeep::pg::messages::WalMessage;
use pgkeep::pg::replication::{Event, PgError, ReplConnection};

fn info(port: u16, user: &str, password: Option<&str>) -> PgConnInfo {
    PgConnInfo {
        host: PgHost::Tcp("127.0.0.1".into()),
        port,
        user: user.into(),
        password: password.map(str::to_string),
        dbname: "postgres".into(),
        connect_timeout: Duration::from_secs(10),
        ssl: Default::default(),
        allow_weak_auth: false,
        application_name: "pgkeep".into(),
    }
}

#[tokio::test]
async fn authentication_errors_and_streams() {
    let dir = TestDir::new("replproto");
    let mut pg = PgCluster::init(dir.path(), "pg", 16, &[]);
    std::fs::write(
        pg.data.join("pg_hba.conf"),
        "local all all trust\n\
         local replication all trust\n\
         host replication scram_user 127.0.0.1/32 scram-sha-256\n\
         host replication md5_user 127.0.0.1/32 md5\n\
         host all all 127.0.0.1/32 trust\n\
         host replication all 127.0.0.1/32 trust\n",
    )
    .unwrap();
    pg.start();
    pg.psql("set password_encryption = 'scram-sha-256'; create role scram_user login replication password 'sCr4m pass'");
    pg.psql("set password_encryption = 'md5'; create role md5_user login replication password 'md5-pass'");
    let sysid = pg.psql("select system_identifier from pg_control_system()");

    // md5 is refused unless allowed: the message says why and which setting allows it.
    let err = ReplConnection::connect(&info(pg.port, "md5_user", Some("md5-pass")))
        .await
        .err()
        .unwrap();
    assert!(
        err.to_string()
            .contains("as an md5 hash, which pgkeep refuses to send")
            && err.to_string().contains("pg_allow_weak_auth"),
        "{err}"
    );
    // trust, SCRAM and (allowed) md5 all reach IDENTIFY_SYSTEM of this cluster.
    for (user, password) in [
        ("postgres", None),
        ("scram_user", Some("sCr4m pass")),
        ("md5_user", Some("md5-pass")),
    ] {
        let mut i = info(pg.port, user, password);
        i.allow_weak_auth = user == "md5_user";
        let mut c = ReplConnection::connect(&i)
            .await
            .unwrap_or_else(|e| panic!("{user}: {e}"));
        let sys = c.identify_system().await.unwrap();
        assert_eq!(sys.system_identifier.to_string(), sysid, "{user}");
        assert_eq!(sys.timeline, 1);
        assert_eq!(c.show("wal_segment_size").await.unwrap(), "16MB");
    }

    // A wrong password: Postgres' own message and code.
    let err = ReplConnection::connect(&info(pg.port, "scram_user", Some("wrong")))
        .await
        .err()
        .unwrap();
    match &err {
        PgError::Server { code, message, .. } => {
            assert_eq!(code, "28P01", "{err}");
            assert!(message.contains("password authentication failed"), "{err}");
        }
        other => panic!("unexpected error {other}"),
    }
    // No password where one is needed: says which variable to set.
    let err = ReplConnection::connect(&info(pg.port, "scram_user", None))
        .await
        .err()
        .unwrap();
    assert!(err.to_string().contains("PGPASSWORD"), "{err}");
    // Nobody listening.
    let err = ReplConnection::connect(&info(free_port(), "postgres", None))
        .await
        .err()
        .unwrap();
    assert!(err.to_string().contains("cannot connect"), "{err}");

    // A Unix socket works too, and a bad command surfaces the server's syntax error; the
    // connection stays usable after it.
    let mut unix = info(pg.port, "postgres", None);
    unix.host = PgHost::Unix(dir.path().join("pg.sock"));
    let mut c = ReplConnection::connect(&unix).await.unwrap();
    let err = c
        .simple_query("BASE_BACKUP (NO_SUCH_OPTION true)")
        .await
        .unwrap_err();
    match &err {
        PgError::Server { code, .. } => assert!(code == "42601" || code == "22023", "{err}"),
        other => panic!("unexpected error {other}"),
    }
    let sys = c.identify_system().await.unwrap();

    // CopyBoth: START_REPLICATION streams WAL ('w' messages) from the start of the current segment.
    let seg_start = sys.xlogpos.0 & !((16u64 << 20) - 1);
    pg.psql("create table t as select generate_series(1, 1000) g");
    c.send_query(&format!(
        "START_REPLICATION PHYSICAL {} TIMELINE 1",
        pgkeep::pg::Lsn(seg_start)
    ))
    .await
    .unwrap();
    match c.next_event().await.unwrap() {
        Event::CopyStart { both: true } => {}
        other => panic!("expected CopyBoth, got {other:?}"),
    }
    let mut wal_bytes = 0usize;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while wal_bytes < 8192 {
        let msg = tokio::time::timeout_at(deadline, c.next_copy_data())
            .await
            .expect("WAL arrives")
            .unwrap()
            .unwrap();
        if let WalMessage::XLogData(x) = WalMessage::parse(msg).unwrap() {
            if wal_bytes == 0 {
                assert_eq!(
                    x.wal_start.0, seg_start,
                    "the stream starts where it was asked to"
                );
                // The segment's first page, as streamed, is a long header of this cluster.
                let header = pgkeep::pg::walheader::parse_long_header("streamed", &x.data).unwrap();
                assert_eq!(header.system_identifier.to_string(), sysid);
                assert_eq!(header.page_addr.0, seg_start);
            }
            wal_bytes += x.data.len();
        }
    }
    // Close before stopping: a walsender waits (wal_sender_timeout) for a client that does not answer.
    drop(c);
    pg.stop("fast");
}
