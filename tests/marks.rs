//! `pgkeep mark` (#19): a named point taken in seconds while the daemon streams, recorded in
//! storage only once its WAL is there; `list` shows it, a taken name and a bad one are refused
//! with messages that say so, `POST /marks` needs the daemon's token; and `restore --target-name`
//! brings the database back to it after a "migration" that changed schema and rows.

mod common;

use common::*;

/// `pgkeep restore` into a new folder `name` of the test directory, with `args`.
fn restore_into(
    dir: &TestDir,
    storage: &Storage,
    bin: &std::path::Path,
    name: &str,
    args: &[&str],
) -> (std::path::PathBuf, std::process::Output) {
    let target = dir.mkdir(name);
    let mut full = vec!["restore", "--target-dir", target.to_str().unwrap()];
    full.extend_from_slice(args);
    let out = storage.pgkeep_pg(bin, &full, &[]);
    (target, out)
}

fn marks_on(backend: Backend) {
    let dir = TestDir::new("marks");
    let storage = Storage::new(backend, &dir);
    let bin = dir.install_pgkeep();
    let mut pg = PgCluster::init(dir.path(), "primary", 1, &storage.env);
    pg.start();
    let fast = [("PGKEEP_PARTIAL_UPLOAD_SECS", "1")];
    let daemon = Daemon::start(&dir, &storage, &bin, &pg, &fast);
    pg.psql("create table accounts (id int primary key, balance int)");
    pg.psql("insert into accounts select g, 100 from generate_series(1, 1000) g");
    let out = storage.pgkeep_pg(&bin, &["backup"], &pg.client_env());
    assert!(out.status.success(), "backup: {}", stderr(&out));
    pg.psql("insert into accounts select g, 200 from generate_series(1001, 1500) g");
    let at_mark = pg.table_checksum("accounts");

    let mark = |args: &[&str]| {
        let mut full = vec!["mark"];
        full.extend_from_slice(args);
        let mut env = pg.client_env();
        env.push(("PGKEEP_LISTEN".into(), format!("127.0.0.1:{}", daemon.port)));
        storage.pgkeep_pg(&bin, &full, &env)
    };
    let started = std::time::Instant::now();
    let out = mark(&[
        "pre-upgrade-db-7",
        "--note",
        "helm release db revision 7",
        "--json",
    ]);
    let took = started.elapsed();
    assert!(out.status.success(), "mark: {}", stderr(&out));
    let m: serde_json::Value = serde_json::from_slice(&out.stdout).expect("mark --json");
    assert_eq!(m["name"], "pre-upgrade-db-7");
    assert_eq!(m["note"], "helm release db revision 7");
    eprintln!("mark took {:.2}s", took.as_secs_f64());
    // Its WAL is in storage (the mark saw the segment there): the daemon's durable position
    // reaches the restore point as soon as it has recorded that upload.
    let lsn = parse_lsn(m["lsn"].as_str().unwrap());
    wait_for(
        "the daemon to report the mark durable",
        std::time::Duration::from_secs(10),
        || (daemon.durable() >= lsn).then_some(()),
    );

    // A taken name, a bad name, a note with a line break: refused, saying why.
    for (args, says) in [
        (vec!["pre-upgrade-db-7"], "exists already"),
        (vec!["../x"], "use letters, digits"),
        (vec!["ok-name", "--note", "a\nb"], "no control characters"),
    ] {
        let out = mark(&args);
        assert!(!out.status.success(), "{args:?}");
        assert!(stderr(&out).contains(says), "{args:?}: {}", stderr(&out));
    }

    // The daemon's route: only with its token; a taken name is 409.
    let (code, _) = http("POST", daemon.port, "/marks?name=via-http");
    assert_eq!(code, 401);
    let bearer = daemon.bearer();
    let auth = [("Authorization", bearer.as_str())];
    let (code, body) = http_with("POST", daemon.port, "/marks?name=via-http&note=api", &auth);
    assert_eq!(code, 201, "{}", String::from_utf8_lossy(&body));
    let (code, _) = http_with("POST", daemon.port, "/marks?name=via-http", &auth);
    assert_eq!(code, 409);
    let (code, _) = http_with("POST", daemon.port, "/marks?name=a%2Fb", &auth);
    assert_eq!(code, 400);

    // The "migration": schema and rows change.
    pg.psql("alter table accounts add column note text");
    pg.psql("update accounts set balance = 0, note = 'migrated' where id <= 700");
    pg.psql("delete from accounts where id > 1400");
    daemon.wal_switch(&storage, &bin, &pg);

    let out = storage.pgkeep_pg(&bin, &["list", "--json"], &[]);
    let inv: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let names: Vec<&str> = inv["marks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["pre-upgrade-db-7", "via-http"], "{inv}");
    let out = storage.pgkeep_pg(&bin, &["list"], &[]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("2 mark(s)") && text.contains("helm release db revision 7"),
        "{text}"
    );

    // Back to the mark: every row as it was, the column not there.
    drop(daemon);
    pg.stop("fast");
    let (target, out) = restore_into(
        &dir,
        &storage,
        &bin,
        "rolled-back",
        &["--target-name", "pre-upgrade-db-7"],
    );
    assert!(out.status.success(), "restore: {}", stderr(&out));
    assert!(
        stderr(&out).contains("restoring to a mark"),
        "{}",
        stderr(&out)
    );
    let back = start_restored(&dir, &storage, target);
    assert_eq!(back.table_checksum("accounts"), at_mark);
    assert_eq!(
        back.psql(
            "select count(*) from information_schema.columns \
             where table_name = 'accounts' and column_name = 'note'"
        ),
        "0"
    );
    drop(back);

    // In place: --rollback-to sets the "migrated" data directory aside and restores to the mark;
    // a name no mark holds changes nothing; a second run does not roll back twice.
    let data = pg.data.clone();
    let aside = data.with_file_name("primary.before-rollback-pre-upgrade-db-7");
    let rollback = |mark: &str| {
        storage.pgkeep_pg(
            &bin,
            &[
                "restore",
                "--target-dir",
                data.to_str().unwrap(),
                "--rollback-to",
                mark,
            ],
            &[],
        )
    };
    let out = rollback("no-such-mark");
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("no mark named \"no-such-mark\""),
        "{}",
        stderr(&out)
    );
    assert!(data.join("PG_VERSION").exists() && !aside.exists());
    let out = rollback("pre-upgrade-db-7");
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("set aside"), "{}", stderr(&out));
    assert!(
        aside.join("PG_VERSION").exists(),
        "the old data directory is kept"
    );
    let mut rolled = start_restored(&dir, &storage, data.clone());
    assert_eq!(rolled.table_checksum("accounts"), at_mark);
    rolled.psql("insert into accounts values (5000, 1)");
    rolled.stop("fast");
    let out = rollback("pre-upgrade-db-7");
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("was done already"),
        "{}",
        stderr(&out)
    );
    let again = start_restored(&dir, &storage, data.clone());
    assert_eq!(
        again.psql("select count(*) from accounts where id = 5000"),
        "1"
    );

    // The rolled-back cluster streams and is backed up; a restore of the latest backup into an
    // empty directory recovers to the end, not to the old mark its postgresql.auto.conf named
    // (and chooses among the backups on the new timeline's history).
    let daemon = Daemon::start(&dir, &storage, &bin, &again, &fast);
    let out = storage.pgkeep_pg(&bin, &["backup"], &again.client_env());
    assert!(
        out.status.success(),
        "backup after the rollback: {}",
        stderr(&out)
    );
    again.psql("insert into accounts values (5001, 1)");
    let expected = again.table_checksum("accounts");
    daemon.wal_switch(&storage, &bin, &again);
    drop(daemon);
    drop(again);
    let (fresh, out) = restore_into(&dir, &storage, &bin, "after-rollback", &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let auto = std::fs::read_to_string(fresh.join("postgresql.auto.conf")).unwrap();
    assert!(!auto.contains("recovery_target_lsn"), "{auto}");
    let latest = start_restored(&dir, &storage, fresh);
    assert_eq!(latest.table_checksum("accounts"), expected);
    drop(latest);

    // A name that is no mark, nor any restore point in the WAL: refused before anything is
    // written, saying so.
    let (unmarked, out) = restore_into(
        &dir,
        &storage,
        &bin,
        "unmarked",
        &["--target-name", "no-such-mark"],
    );
    let said = stderr(&out);
    assert!(!out.status.success(), "{said}");
    assert!(
        said.contains("no mark of that name, and no restore point of that name"),
        "{said}"
    );
    assert_eq!(std::fs::read_dir(&unmarked).map_or(0, |d| d.count()), 0);
    // A restore point made with SQL after the newest backup: found in the WAL and restored to.
    let mut latest = PgCluster::adopt(dir.path(), dir.path().join("after-rollback"), &storage.env);
    latest.start();
    let daemon = Daemon::start(&dir, &storage, &bin, &latest, &fast);
    latest.psql("insert into accounts values (6001, 1)");
    let at_point = latest.table_checksum("accounts");
    latest.psql("select pg_create_restore_point('made-with-sql')");
    latest.psql("insert into accounts values (6002, 1)");
    daemon.wal_switch(&storage, &bin, &latest);
    drop(daemon);
    drop(latest);
    let (target, out) = restore_into(
        &dir,
        &storage,
        &bin,
        "to-sql-point",
        &["--target-name", "made-with-sql"],
    );
    let said = stderr(&out);
    assert!(out.status.success(), "{said}");
    assert!(
        said.contains("holds a restore point of that name"),
        "{said}"
    );
    let pitr = start_restored(&dir, &storage, target);
    assert_eq!(pitr.table_checksum("accounts"), at_point);
}

#[test]
fn marks_on_file_storage() {
    marks_on(Backend::File);
}

#[test]
fn marks_on_s3() {
    marks_on(Backend::S3);
}
