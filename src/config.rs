//! Settings: a TOML file (`--config`) whose every key can be overridden by an environment variable
//! `PGKEEP_<KEY>`. Everything is validated on load; an error names the key, where it came from and
//! what is wrong with it, and unknown keys are errors (a typo must not silently fall back to a default).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::codec::Codec;
use crate::pg::conninfo::PgConnInfo;
pub use crate::storage::settings::{CloudScheme, RetrySettings, StorageSettings, StorageUrl};

/// A bad setting: which key, from where, and what is wrong.
#[derive(Debug, thiserror::Error)]
#[error("configuration error: {origin}: {message}")]
pub struct ConfigError {
    pub origin: String,
    pub message: String,
}

/// The type a key's value must have.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Str,
    Int,
    Bool,
}

/// Every key pgkeep knows, with its type and its default (documented in `config/pgkeep.example.toml`).
const KEYS: &[(&str, Kind)] = &[
    ("storage", Kind::Str),
    ("compression", Kind::Str),
    ("compression_level", Kind::Int),
    ("system_identifier", Kind::Str),
    ("pgdata", Kind::Str),
    ("storage_max_retries", Kind::Int),
    ("storage_retry_timeout_secs", Kind::Int),
    ("storage_request_timeout_secs", Kind::Int),
    ("verify_uploads", Kind::Bool),
    ("log_format", Kind::Str),
    ("log_level", Kind::Str),
    ("pg", Kind::Str),
    ("backup_chunk_size_mb", Kind::Int),
    ("parallelism", Kind::Int),
    ("backup_wal_timeout_secs", Kind::Int),
    ("slot_name", Kind::Str),
    ("spool_dir", Kind::Str),
    ("listen", Kind::Str),
    ("status_interval_secs", Kind::Int),
    ("partial_upload_secs", Kind::Int),
    ("shutdown_timeout_secs", Kind::Int),
    ("prefetch_segments", Kind::Int),
    ("backup_count", Kind::Int),
    ("backup_max_age_hours", Kind::Int),
    ("backup_interval_hours", Kind::Int),
];

/// Environment variables with the `PGKEEP_` prefix that are not settings.
const NOT_SETTINGS: &[&str] = &["PGKEEP_CONFIG"];

/// Kubernetes gives every pod variables for each Service in its namespace (`<NAME>_SERVICE_HOST`,
/// `<NAME>_PORT_16000_TCP`, ...): a Service named `pgkeep` must not make pgkeep refuse to start.
fn is_service_link(key: &str) -> bool {
    key == "PORT" || key.starts_with("PORT_") || key.starts_with("SERVICE_")
}

pub const DEFAULT_STORAGE: &str = "file:///var/lib/pgkeep/archive";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Human,
    Json,
}

/// Validated settings.
#[derive(Debug, Clone)]
pub struct Config {
    pub storage: StorageUrl,
    pub codec: Codec,
    /// Set only when the operator pins it; otherwise it is read from the data directory or the WAL.
    pub system_identifier: Option<u64>,
    /// The data directory (`PGKEEP_PGDATA` or `PGDATA`), if known.
    pub pgdata: Option<PathBuf>,
    pub retry: RetrySettings,
    /// Read every uploaded object back and compare checksums before acknowledging it.
    pub verify_uploads: bool,
    pub log_format: LogFormat,
    pub log_level: String,
    /// The config file this came from, if any (passed on to commands pgkeep writes for Postgres).
    pub file: Option<PathBuf>,
    /// How to reach Postgres (`pg` setting, then libpq's variables, then libpq's defaults).
    pub pg: PgConnInfo,
    /// Size of the pieces a base backup's archives are cut into (each compressed and uploaded alone).
    pub backup_chunk_bytes: usize,
    /// How many chunks are compressed and uploaded (or downloaded and decoded) at once.
    pub parallelism: usize,
    /// How long `backup` waits for the WAL its backup needs to reach storage.
    pub backup_wal_timeout: Duration,
    /// The physical replication slot the daemon streams through.
    pub slot_name: String,
    /// Where the daemon keeps the WAL it is receiving.
    pub spool_dir: PathBuf,
    /// The daemon's HTTP address.
    pub listen: std::net::SocketAddr,
    /// How often the daemon reports its positions to Postgres.
    pub status_interval: Duration,
    /// How often the open WAL segment is uploaded as `.partial`.
    pub partial_upload_interval: Duration,
    /// How long the daemon drains WAL after SIGTERM before it gives up.
    pub shutdown_timeout: Duration,
    /// How many segments after a requested one the daemon downloads ahead.
    pub prefetch_segments: usize,
    /// Retention keeps at least this many base backups...
    pub backup_count: usize,
    /// ...and every backup younger than this (0: no age rule).
    pub backup_max_age_hours: u64,
    /// The daemon takes a base backup this often (0: never on its own).
    pub backup_interval_hours: u64,
    /// The `PGKEEP_*` variables this configuration was built from (restore passes them on to the
    /// restore_command it writes).
    pub env_settings: Vec<(String, String)>,
}

/// A raw value and where it came from.
struct Raw {
    value: toml::Value,
    origin: String,
}

impl Config {
    /// Loads `file` (if given) and applies the `PGKEEP_*` (and `PGDATA`) variables from `env`.
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let env: Vec<(String, String)> = env.into_iter().collect();
        let mut raw: BTreeMap<&'static str, Raw> = BTreeMap::new();
        let known = || KEYS.iter().map(|(k, _)| *k).collect::<Vec<_>>().join(", ");

        if let Some(path) = file {
            let origin = |key: &str| format!("{key} in {}", path.display());
            let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
                origin: path.display().to_string(),
                message: format!("cannot read the config file: {e}"),
            })?;
            let table: toml::Table = text.parse().map_err(|e: toml::de::Error| ConfigError {
                origin: path.display().to_string(),
                message: format!("not valid TOML: {}", e.message()),
            })?;
            for (key, value) in table {
                let Some((k, _)) = KEYS.iter().find(|(k, _)| *k == key) else {
                    return Err(ConfigError {
                        origin: origin(&key),
                        message: format!("unknown key (known keys: {})", known()),
                    });
                };
                raw.insert(
                    k,
                    Raw {
                        value,
                        origin: origin(&key),
                    },
                );
            }
        }

        let mut pgdata_env = None;
        let mut env_settings = vec![];
        for (name, value) in env.iter().cloned() {
            if name == "PGDATA" {
                pgdata_env = Some(value);
                continue;
            }
            let Some(key) = name.strip_prefix("PGKEEP_") else {
                continue;
            };
            if NOT_SETTINGS.contains(&name.as_str()) || is_service_link(key) {
                continue;
            }
            let lower = key.to_ascii_lowercase();
            let Some((k, kind)) = KEYS.iter().find(|(k, _)| *k == lower) else {
                return Err(ConfigError {
                    origin: format!("{name} (environment)"),
                    message: format!("unknown setting (known keys, as PGKEEP_<KEY>: {})", known()),
                });
            };
            let origin = format!("{name} (environment)");
            env_settings.push((name.clone(), value.clone()));
            let value = match kind {
                Kind::Str => toml::Value::String(value),
                Kind::Int => value
                    .trim()
                    .parse::<i64>()
                    .map(toml::Value::Integer)
                    .map_err(|_| ConfigError {
                        origin: origin.clone(),
                        message: format!("expected a whole number, got {value:?}"),
                    })?,
                Kind::Bool => match value.trim().to_ascii_lowercase().as_str() {
                    "true" | "1" | "yes" | "on" => toml::Value::Boolean(true),
                    "false" | "0" | "no" | "off" => toml::Value::Boolean(false),
                    _ => {
                        return Err(ConfigError {
                            origin,
                            message: format!("expected true or false, got {value:?}"),
                        });
                    }
                },
            };
            raw.insert(k, Raw { value, origin });
        }
        // Postgres exports PGDATA as given to `pg_ctl -D`, possibly relative to a directory we cannot
        // know; a relative one is ignored (archive_command and restore_command run in PGDATA anyway).
        if !raw.contains_key("pgdata")
            && let Some(p) = pgdata_env.filter(|p| p.starts_with('/'))
        {
            raw.insert(
                "pgdata",
                Raw {
                    value: toml::Value::String(p),
                    origin: "PGDATA (environment)".into(),
                },
            );
        }
        let lookup = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        Self::from_raw(raw, file, lookup, env_settings)
    }

    fn from_raw(
        raw: BTreeMap<&'static str, Raw>,
        file: Option<&Path>,
        lookup: impl Fn(&str) -> Option<String>,
        env_settings: Vec<(String, String)>,
    ) -> Result<Config, ConfigError> {
        let get = |key: &str| -> Result<Option<(&toml::Value, &str)>, ConfigError> {
            let Some(r) = raw.get(key) else {
                return Ok(None);
            };
            let kind = KEYS.iter().find(|(k, _)| *k == key).expect("known key").1;
            let ok = match kind {
                Kind::Str => r.value.is_str(),
                Kind::Int => r.value.is_integer(),
                Kind::Bool => r.value.is_bool(),
            };
            if !ok {
                let want = match kind {
                    Kind::Str => "a string",
                    Kind::Int => "a whole number",
                    Kind::Bool => "true or false",
                };
                return Err(ConfigError {
                    origin: r.origin.clone(),
                    message: format!("expected {want}, got {}", r.value),
                });
            }
            Ok(Some((&r.value, r.origin.as_str())))
        };
        let bad = |origin: &str, message: String| ConfigError {
            origin: origin.to_string(),
            message,
        };
        let string = |key: &str| -> Result<Option<(String, String)>, ConfigError> {
            Ok(get(key)?.map(|(v, o)| (v.as_str().unwrap().to_string(), o.to_string())))
        };
        let int = |key: &str,
                   range: std::ops::RangeInclusive<i64>,
                   default: i64|
         -> Result<i64, ConfigError> {
            match get(key)? {
                None => Ok(default),
                Some((v, o)) => {
                    let n = v.as_integer().unwrap();
                    if range.contains(&n) {
                        Ok(n)
                    } else {
                        Err(bad(
                            o,
                            format!("{n} is out of range ({} to {})", range.start(), range.end()),
                        ))
                    }
                }
            }
        };

        let storage = match string("storage")? {
            None => StorageUrl::parse(DEFAULT_STORAGE).expect("default parses"),
            Some((s, o)) => StorageUrl::parse(&s).map_err(|m| bad(&o, m))?,
        };
        let level = int("compression_level", 1..=22, 3)? as i32;
        let codec = match string("compression")? {
            None => Codec::Snappy,
            Some((s, o)) => match s.as_str() {
                "snappy" => Codec::Snappy,
                "zstd" => Codec::Zstd { level },
                "none" => Codec::None,
                _ => {
                    return Err(bad(
                        &o,
                        format!("unknown compression {s:?}: use snappy, zstd or none"),
                    ));
                }
            },
        };
        let system_identifier = match string("system_identifier")? {
            None => None,
            Some((s, o)) => match s.trim().parse::<u64>() {
                Ok(n) if n != 0 => Some(n),
                _ => {
                    return Err(bad(
                        &o,
                        format!(
                            "{s:?} is not a system identifier (a positive whole number, as pg_controldata prints it)"
                        ),
                    ));
                }
            },
        };
        let pgdata = match string("pgdata")? {
            None => None,
            Some((s, o)) => {
                let p = PathBuf::from(&s);
                if !p.is_absolute() {
                    return Err(bad(&o, format!("{s:?} must be an absolute path")));
                }
                Some(p)
            }
        };
        let retry = RetrySettings {
            max_retries: int("storage_max_retries", 0..=100, 5)? as usize,
            retry_timeout: Duration::from_secs(
                int("storage_retry_timeout_secs", 1..=3600, 60)? as u64
            ),
            request_timeout: Duration::from_secs(
                int("storage_request_timeout_secs", 1..=3600, 60)? as u64,
            ),
        };
        let verify_uploads = get("verify_uploads")?.is_none_or(|(v, _)| v.as_bool().unwrap());
        let log_format = match string("log_format")? {
            None => LogFormat::Human,
            Some((s, o)) => match s.as_str() {
                "human" => LogFormat::Human,
                "json" => LogFormat::Json,
                _ => {
                    return Err(bad(
                        &o,
                        format!("unknown log format {s:?}: use human or json"),
                    ));
                }
            },
        };
        let log_level = match string("log_level")? {
            None => "info".to_string(),
            Some((s, o)) => {
                tracing_subscriber::EnvFilter::try_new(&s)
                    .map_err(|e| bad(&o, format!("{s:?} is not a log level or filter ({e})")))?;
                s
            }
        };
        let pg = match string("pg")? {
            None => PgConnInfo::resolve(None, &lookup)
                .map_err(|m| bad("PGHOST/PGPORT/PGUSER (environment)", m))?,
            Some((s, o)) => PgConnInfo::resolve(Some(&s), &lookup).map_err(|m| bad(&o, m))?,
        };
        let cores = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2);
        let parallelism = match int("parallelism", 0..=256, 0)? {
            0 => cores,
            n => n as usize,
        };
        let slot_name = match string("slot_name")? {
            None => "pgkeep".to_string(),
            Some((s, o)) => {
                if s.is_empty()
                    || s.len() > 63
                    || !s
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
                {
                    return Err(bad(
                        &o,
                        format!(
                            "{s:?}: a slot name is 1 to 63 lower-case letters, digits or underscores"
                        ),
                    ));
                }
                s
            }
        };
        let spool_dir = match string("spool_dir")? {
            None => PathBuf::from("/var/lib/pgkeep/spool"),
            Some((s, _)) if s.starts_with('/') => PathBuf::from(s),
            Some((s, o)) => return Err(bad(&o, format!("{s:?} must be an absolute path"))),
        };
        let listen = match string("listen")? {
            None => "127.0.0.1:16000".parse().expect("valid"),
            Some((s, o)) => s.parse().map_err(|_| {
                bad(
                    &o,
                    format!("{s:?} is not an address and port, like 127.0.0.1:16000"),
                )
            })?,
        };
        Ok(Config {
            slot_name,
            spool_dir,
            listen,
            status_interval: Duration::from_secs(int("status_interval_secs", 1..=3600, 10)? as u64),
            partial_upload_interval: Duration::from_secs(
                int("partial_upload_secs", 1..=3600, 5)? as u64
            ),
            shutdown_timeout: Duration::from_secs(
                int("shutdown_timeout_secs", 1..=86400, 60)? as u64
            ),
            prefetch_segments: int("prefetch_segments", 0..=256, 8)? as usize,
            backup_count: int("backup_count", 1..=10000, 3)? as usize,
            backup_max_age_hours: int("backup_max_age_hours", 0..=1_000_000, 168)? as u64,
            backup_interval_hours: int("backup_interval_hours", 0..=100_000, 24)? as u64,
            pg,
            backup_chunk_bytes: (int("backup_chunk_size_mb", 1..=1024, 16)? as usize) << 20,
            parallelism,
            backup_wal_timeout: Duration::from_secs(
                int("backup_wal_timeout_secs", 1..=86400, 300)? as u64,
            ),
            env_settings,
            storage,
            codec,
            system_identifier,
            pgdata,
            retry,
            verify_uploads,
            log_format,
            log_level,
            file: file.map(Path::to_path_buf),
        })
    }

    /// What the storage layer needs of these settings.
    pub fn storage_settings(&self) -> StorageSettings {
        StorageSettings {
            url: self.storage.clone(),
            retry: self.retry,
            verify_uploads: self.verify_uploads,
            options: vec![],
        }
    }

    /// Loads from the process environment.
    pub fn from_process(file: Option<&Path>) -> Result<Config, ConfigError> {
        Config::load(file, std::env::vars())
    }
}

#[cfg(test)]
mod tests {
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
        let text = include_str!("../config/pgkeep.example.toml");
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
        let missing =
            Config::load(Some(Path::new("/nonexistent/pgkeep.toml")), env(&[])).unwrap_err();
        assert!(
            missing.to_string().contains("/nonexistent/pgkeep.toml"),
            "{missing}"
        );
    }
}
