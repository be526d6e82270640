//! Loading settings: defaults, precedence, and errors that name the key and its source.

use super::*;

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn err(file_text: Option<&str>, pairs: &[(&str, &str)]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pgkeep.toml");
    if let Some(t) = file_text {
        std::fs::write(&path, t).unwrap();
    }
    let file = file_text.map(|_| path.as_path());
    Config::load(file, env(pairs)).unwrap_err().to_string()
}

#[test]
fn defaults_are_sane() {
    let c = Config::load(None, env(&[])).unwrap();
    assert_eq!(
        c.storage,
        StorageUrl::File {
            root: "/var/lib/pgkeep/archive".into()
        }
    );
    assert_eq!(c.codec, Codec::Snappy);
    assert_eq!(c.system_identifier, None);
    assert!(c.verify_uploads);
    assert_eq!(c.log_format, LogFormat::Human);
    assert_eq!(c.retry.max_retries, 5);
}

#[test]
fn environment_overrides_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pgkeep.toml");
    std::fs::write(
        &path,
        "storage = \"s3://bucket/a/b/\"\ncompression = \"zstd\"\ncompression_level = 5\nverify_uploads = false\n",
    )
    .unwrap();
    let c = Config::load(Some(&path), env(&[])).unwrap();
    assert_eq!(
        c.storage,
        StorageUrl::Cloud {
            scheme: CloudScheme::S3,
            bucket: "bucket".into(),
            prefix: "a/b".into()
        }
    );
    assert_eq!(c.codec, Codec::Zstd { level: 5 });
    assert!(!c.verify_uploads);
    let c = Config::load(
        Some(&path),
        env(&[
            ("PGKEEP_STORAGE", "file:///srv/wal"),
            ("PGKEEP_COMPRESSION_LEVEL", "9"),
            ("PGKEEP_VERIFY_UPLOADS", "yes"),
            ("PGKEEP_SYSTEM_IDENTIFIER", "7312345678901234567"),
            ("PGDATA", "/pgdata"),
            ("PGKEEP_CONFIG", "/ignored"),
            ("UNRELATED", "x"),
        ]),
    )
    .unwrap();
    assert_eq!(
        c.storage,
        StorageUrl::File {
            root: "/srv/wal".into()
        }
    );
    assert_eq!(c.codec, Codec::Zstd { level: 9 });
    assert!(c.verify_uploads);
    assert_eq!(c.system_identifier, Some(7312345678901234567));
    assert_eq!(c.pgdata, Some("/pgdata".into()));
}

#[test]
fn the_example_config_loads_and_documents_every_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pgkeep.toml");
    let text = include_str!("../../config/pgkeep.example.toml");
    std::fs::write(&path, text).unwrap();
    let c = Config::load(Some(&path), env(&[])).unwrap();
    assert_eq!(c.codec, Codec::Snappy);
    for (key, _) in KEYS {
        assert!(
            text.contains(&format!("\n{key} = ")) || text.contains(&format!("# {key} = ")),
            "{key} undocumented"
        );
    }
}

#[test]
fn kubernetes_service_variables_are_not_settings() {
    let c = Config::load(
        None,
        env(&[
            ("PGKEEP_SERVICE_HOST", "10.0.0.1"),
            ("PGKEEP_SERVICE_PORT", "16000"),
            ("PGKEEP_PORT", "tcp://10.0.0.1:16000"),
            ("PGKEEP_PORT_16000_TCP_PROTO", "tcp"),
        ]),
    );
    assert!(c.is_ok(), "{:?}", c.err());
}

#[test]
fn every_example_config_loads() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let path = e.unwrap().path();
        if path.extension().is_some_and(|x| x == "toml") {
            Config::load(Some(&path), env(&[]))
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            // Every key is explained: a comment on its line or on the line above.
            let text = std::fs::read_to_string(&path).unwrap();
            let mut prev = "";
            for line in text.lines() {
                if !line.starts_with('#') && line.contains('=') {
                    assert!(
                        line.contains('#') || prev.starts_with('#'),
                        "{}: {line:?} has no comment",
                        path.display()
                    );
                }
                prev = line;
            }
            n += 1;
        }
    }
    assert!(n >= 8, "only {n} example configs");
}

#[test]
fn a_relative_pgdata_from_postgres_is_ignored() {
    // Postgres exports PGDATA exactly as `pg_ctl -D primary` was given.
    let c = Config::load(None, env(&[("PGDATA", "primary")])).unwrap();
    assert_eq!(c.pgdata, None);
}

#[test]
fn bad_values_name_the_key_and_the_source() {
    /// (config file text, environment, what the message must mention)
    type Case<'a> = (Option<&'a str>, &'a [(&'a str, &'a str)], &'a [&'a str]);
    let cases: &[Case] = &[
        (
            None,
            &[("PGKEEP_COMPRESSION", "lz4")],
            &["PGKEEP_COMPRESSION", "lz4"],
        ),
        (
            None,
            &[("PGKEEP_COMPRESSION_LEVEL", "abc")],
            &["PGKEEP_COMPRESSION_LEVEL", "whole number"],
        ),
        (
            None,
            &[("PGKEEP_COMPRESSION_LEVEL", "99")],
            &["PGKEEP_COMPRESSION_LEVEL", "out of range"],
        ),
        (
            None,
            &[("PGKEEP_STORAGE", "ftp://x")],
            &["PGKEEP_STORAGE", "unsupported scheme"],
        ),
        (
            None,
            &[("PGKEEP_VERIFY_UPLOADS", "maybe")],
            &["PGKEEP_VERIFY_UPLOADS", "true or false"],
        ),
        (
            None,
            &[("PGKEEP_SYSTEM_IDENTIFIER", "-1")],
            &["PGKEEP_SYSTEM_IDENTIFIER", "system identifier"],
        ),
        (
            None,
            &[("PGKEEP_STORAGE_MAX_RETRIES", "1000")],
            &["PGKEEP_STORAGE_MAX_RETRIES", "out of range"],
        ),
        (
            None,
            &[("PGKEEP_PGDATA", "relative/dir")],
            &["PGKEEP_PGDATA", "absolute"],
        ),
        (
            None,
            &[("PGKEEP_STORGE", "file:///x")],
            &["PGKEEP_STORGE", "unknown setting"],
        ),
        (
            None,
            &[("PGKEEP_LOG_FORMAT", "xml")],
            &["PGKEEP_LOG_FORMAT", "xml"],
        ),
        (
            Some("compresion = \"zstd\""),
            &[],
            &["compresion in", "unknown key"],
        ),
        (
            Some("compression_level = \"high\""),
            &[],
            &["compression_level in", "whole number"],
        ),
        (Some("storage = 5"), &[], &["storage in", "a string"]),
        (Some("storage = "), &[], &["pgkeep.toml", "not valid TOML"]),
    ];
    for (file, env, wants) in cases {
        let msg = err(*file, env);
        for want in *wants {
            assert!(msg.contains(want), "{msg:?} should mention {want:?}");
        }
    }
    let missing = Config::load(Some(Path::new("/nonexistent/pgkeep.toml")), env(&[])).unwrap_err();
    assert!(
        missing.to_string().contains("/nonexistent/pgkeep.toml"),
        "{missing}"
    );
}

#[test]
fn a_secret_key_in_an_encryption_setting_is_refused_without_being_echoed() {
    let secret = "AGE-SECRET-KEY-1QQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQ";
    for var in [
        "PGKEEP_ENCRYPTION_IDENTITY_FILE",
        "PGKEEP_ENCRYPTION_RECIPIENTS",
    ] {
        let err = Config::load(None, env(&[(var, secret)]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("secret key") && err.contains(var), "{err}");
        assert!(!err.contains(&secret[16..]), "{err}");
    }
    let err = Config::load(None, env(&[("PGKEEP_ENCRYPTION_RECIPIENTS", "age1x,nope")]))
        .unwrap_err()
        .to_string();
    assert!(err.contains("entry 1"), "{err}");
}

#[test]
fn credentials_dir_gives_the_password_and_the_storage_keys() {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("PGPASSWORD"), "from-file\n").unwrap();
    std::fs::write(d.path().join("AWS_ACCESS_KEY_ID"), "AKIDFILE").unwrap();
    let dir = d.path().to_str().unwrap();
    let c = Config::load(
        None,
        env(&[
            ("PGKEEP_STORAGE", "s3://bucket/p"),
            ("PGKEEP_CREDENTIALS_DIR", dir),
            ("PGPASSWORD", "from-env"),
        ]),
    )
    .unwrap();
    // The file wins over the variable, and its value is never printed.
    assert_eq!(c.pg.password.as_deref(), Some("from-file"));
    assert_eq!(
        c.storage_settings().options,
        vec![("aws_access_key_id".to_string(), "AKIDFILE".to_string())]
    );
    let shown = format!("{c:?} {:?}", c.storage_settings());
    assert!(
        !shown.contains("AKIDFILE") && !shown.contains("from-file"),
        "{shown}"
    );
    assert!(c.wal_fetch_storage);

    let e = err(None, &[("PGKEEP_CREDENTIALS_DIR", "relative/dir")]);
    assert!(
        e.contains("PGKEEP_CREDENTIALS_DIR") && e.contains("absolute path"),
        "{e}"
    );
    let e = err(None, &[("PGKEEP_CREDENTIALS_DIR", "/nonexistent/creds")]);
    assert!(
        e.contains("cannot read the directory /nonexistent/creds"),
        "{e}"
    );
    let e = err(None, &[("PGKEEP_WAL_FETCH_STORAGE", "maybe")]);
    assert!(e.contains("PGKEEP_WAL_FETCH_STORAGE"), "{e}");
}
