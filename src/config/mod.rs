//! Settings: a TOML file (`--config`) whose every key can be overridden by an environment variable
//! `PGKEEP_<KEY>`. Everything is validated on load; an error names the key, where it came from and
//! what is wrong with it, and unknown keys are errors (a typo must not silently fall back to a default).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::codec::Codec;
use crate::pg::conninfo::PgConnInfo;
pub use crate::storage::settings::{CloudScheme, RetrySettings, StorageSettings, StorageUrl};

mod credentials;
mod values;
pub use credentials::Credentials;
use values::{Raw, Values};

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
    /// A list of strings: a TOML array, or one string of comma-separated items (as in the
    /// environment).
    List,
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
    ("wal_fetch_outage_secs", Kind::Int),
    ("verify_uploads", Kind::Bool),
    ("log_format", Kind::Str),
    ("log_level", Kind::Str),
    ("pg", Kind::Str),
    ("pg_allow_weak_auth", Kind::Bool),
    ("application_name", Kind::Str),
    ("synchronous", Kind::Bool),
    ("backup_chunk_size_mb", Kind::Int),
    ("parallelism", Kind::Int),
    ("backup_wal_timeout_secs", Kind::Int),
    ("slot_name", Kind::Str),
    ("spool_dir", Kind::Str),
    ("listen", Kind::Str),
    ("status_interval_secs", Kind::Int),
    ("partial_upload_secs", Kind::Int),
    ("partial_upload_ms", Kind::Int),
    ("partial_max_pieces", Kind::Int),
    ("wal_uploads", Kind::Int),
    ("spool_max_mb", Kind::Int),
    ("shutdown_timeout_secs", Kind::Int),
    ("prefetch_segments", Kind::Int),
    ("prefetch_max_mb", Kind::Int),
    ("prefetch_dir", Kind::Str),
    ("backup_count", Kind::Int),
    ("backup_max_age_hours", Kind::Int),
    ("backup_interval_hours", Kind::Int),
    ("backup_full_interval_hours", Kind::Int),
    ("backup_max_incrementals", Kind::Int),
    ("encryption_recipients", Kind::List),
    ("encryption_identity_file", Kind::Str),
    ("verify_interval_hours", Kind::Int),
    ("drill_dir", Kind::Str),
    ("drill_interval_hours", Kind::Int),
    ("drill_timeout_secs", Kind::Int),
    ("pg_bin_dir", Kind::Str),
    ("http_idle_timeout_secs", Kind::Int),
    ("http_token_file", Kind::Str),
    ("credentials_dir", Kind::Str),
    ("wal_fetch_storage", Kind::Bool),
    ("archive_via_daemon", Kind::Bool),
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
    /// How long `wal-fetch` keeps retrying an unreachable store before it stops recovery (126).
    pub wal_fetch_outage: Duration,
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
    /// How often, at most, the open WAL segment's new bytes are uploaded (`partial_upload_ms`).
    pub partial_upload_interval: Duration,
    /// How many pieces of one level (each round's new bytes, or merges of such) follow the open
    /// segment's `.partial` before they merge into one piece a level up; 0: always the whole prefix.
    pub partial_max_pieces: u32,
    /// How many WAL uploads (completed segments and the open segment's `.partial`) run at once.
    pub wal_uploads: usize,
    /// How many bytes of completed segments the spool holds for storage before the daemon stops
    /// reading from the walsender (Postgres keeps the WAL in the slot meanwhile).
    pub spool_max_bytes: u64,
    /// Upload the open segment as soon as new WAL has arrived (and the previous upload ended),
    /// so that with `synchronous_standby_names` naming pgkeep a COMMIT returns only once its WAL
    /// is in storage.
    pub synchronous: bool,
    /// How long the daemon drains WAL after SIGTERM before it gives up.
    pub shutdown_timeout: Duration,
    /// How many segments after a requested one the daemon downloads ahead.
    pub prefetch_segments: usize,
    /// The most bytes of prefetched WAL the daemon holds at once.
    pub prefetch_max_bytes: u64,
    /// Where the daemon places prefetched segments and `wal-fetch` takes them (the hand-off
    /// directory, shared by the daemon's and Postgres' containers).
    pub prefetch_dir: PathBuf,
    /// Retention keeps at least this many base backups...
    pub backup_count: usize,
    /// ...and every backup younger than this (0: no age rule).
    pub backup_max_age_hours: u64,
    /// The daemon takes a base backup this often (0: never on its own).
    pub backup_interval_hours: u64,
    /// Postgres 17+: scheduled backups are incremental, with a full one when the newest full one
    /// is this old (0: every scheduled backup is full).
    pub backup_full_interval_hours: u64,
    /// The most incremental backups on one full one; the next backup is then full.
    pub backup_max_incrementals: usize,
    /// The daemon checks the stored backups and WAL (`pgkeep verify`) this often (0: never).
    pub verify_interval_hours: u64,
    /// Where the daemon's restore drills restore to (None: no drills).
    pub drill_dir: Option<PathBuf>,
    /// The daemon runs a restore drill this often when `drill_dir` is set (0: never).
    pub drill_interval_hours: u64,
    /// The longest a drill's copy may take to recover.
    pub drill_timeout: Duration,
    /// The folder of the Postgres server binaries (`postgres`) for drills (None: `PATH`).
    pub pg_bin_dir: Option<PathBuf>,
    /// An HTTP connection that moves no byte for this long, with no request being answered, is
    /// closed.
    pub http_idle_timeout: Duration,
    /// Where the daemon writes its token and its clients read it (`http_token`).
    pub http_token_file: PathBuf,
    /// Credentials read from the files in `credentials_dir` (over the environment's).
    pub credentials: Credentials,
    /// Whether `wal-fetch` may read storage itself; false: only through the daemon (a container
    /// that holds no storage credentials).
    pub wal_fetch_storage: bool,
    /// Whether `archive-push` first asks the daemon whether its stream stored the segment
    /// already (then it uploads nothing).
    pub archive_via_daemon: bool,
    /// Client-side encryption: the recipients new objects are encrypted to, and the identity
    /// file that decrypts them (only `restore` and `wal-fetch` need it).
    pub encryption: crate::storage::EncryptionSettings,
    /// The `PGKEEP_*` variables this configuration was built from (restore passes them on to the
    /// restore_command it writes).
    pub env_settings: Vec<(String, String)>,
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
                Kind::Str | Kind::List => toml::Value::String(value),
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
        let credentials = match raw.get("credentials_dir") {
            None => Credentials::default(),
            Some(r) => match r.value.as_str() {
                Some(d) if d.starts_with('/') => Credentials::read_dir(Path::new(d), &r.origin)?,
                _ => {
                    return Err(ConfigError {
                        origin: r.origin.clone(),
                        message: format!("expected an absolute path, got {}", r.value),
                    });
                }
            },
        };
        let lookup = |k: &str| {
            credentials
                .get(k)
                .map(str::to_string)
                .or_else(|| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone()))
        };
        let origin = raw.get("credentials_dir").map(|r| r.origin.clone());
        let mut cfg = Self::from_raw(raw, file, lookup, env_settings)?;
        if let Some(origin) = origin {
            credentials
                .check_for(&cfg.storage)
                .map_err(|message| ConfigError { origin, message })?;
        }
        cfg.credentials = credentials;
        Ok(cfg)
    }

    fn from_raw(
        raw: BTreeMap<&'static str, Raw>,
        file: Option<&Path>,
        lookup: impl Fn(&str) -> Option<String>,
        env_settings: Vec<(String, String)>,
    ) -> Result<Config, ConfigError> {
        let v = Values { raw };
        let secs = |key, range, default| -> Result<Duration, ConfigError> {
            Ok(Duration::from_secs(v.int(key, range, default)? as u64))
        };
        let (log_format, log_level) = v.logging()?;
        let spool_dir = v
            .absolute_path("spool_dir", Some("/var/lib/pgkeep/spool"))?
            .expect("a default");
        // A path setting whose default lives in the spool.
        let in_spool = |key, default: &str| -> Result<PathBuf, ConfigError> {
            Ok(v.absolute_path(key, None)?
                .unwrap_or_else(|| spool_dir.join(default)))
        };
        Ok(Config {
            storage: v.storage()?,
            codec: v.codec()?,
            system_identifier: v.system_identifier()?,
            pgdata: v.absolute_path("pgdata", None)?,
            retry: RetrySettings {
                max_retries: v.int("storage_max_retries", 0..=100, 5)? as usize,
                retry_timeout: secs("storage_retry_timeout_secs", 1..=3600, 60)?,
                request_timeout: secs("storage_request_timeout_secs", 1..=3600, 60)?,
            },
            wal_fetch_outage: secs("wal_fetch_outage_secs", 1..=3600, 60)?,
            verify_uploads: v.bool("verify_uploads", true)?,
            log_format,
            log_level,
            pg: v.pg(&lookup)?,
            backup_chunk_bytes: (v.int("backup_chunk_size_mb", 1..=1024, 16)? as usize) << 20,
            parallelism: match v.int("parallelism", 0..=256, 0)? {
                0 => std::thread::available_parallelism()
                    .map(|n| n.get())
                    .unwrap_or(2),
                n => n as usize,
            },
            backup_wal_timeout: secs("backup_wal_timeout_secs", 1..=86400, 300)?,
            slot_name: v.slot_name()?,
            spool_dir: spool_dir.clone(),
            listen: v.listen()?,
            status_interval: secs("status_interval_secs", 1..=3600, 10)?,
            partial_upload_interval: v.partial_upload_interval()?,
            partial_max_pieces: v.int("partial_max_pieces", 0..=1000, 32)? as u32,
            wal_uploads: v.int("wal_uploads", 1..=64, 4)? as usize,
            spool_max_bytes: (v.int("spool_max_mb", 1..=16_777_216, 1024)? as u64) << 20,
            synchronous: v.bool("synchronous", false)?,
            shutdown_timeout: secs("shutdown_timeout_secs", 1..=86400, 60)?,
            prefetch_segments: v.int("prefetch_segments", 0..=256, 8)? as usize,
            prefetch_max_bytes: (v.int("prefetch_max_mb", 16..=65536, 256)? as u64) << 20,
            prefetch_dir: in_spool("prefetch_dir", "prefetch")?,
            backup_count: v.int("backup_count", 1..=10000, 3)? as usize,
            backup_max_age_hours: v.int("backup_max_age_hours", 0..=1_000_000, 168)? as u64,
            backup_interval_hours: v.int("backup_interval_hours", 0..=100_000, 24)? as u64,
            backup_full_interval_hours: v.int("backup_full_interval_hours", 0..=1_000_000, 0)?
                as u64,
            backup_max_incrementals: v.int("backup_max_incrementals", 1..=50, 6)? as usize,
            verify_interval_hours: v.int("verify_interval_hours", 0..=100_000, 24)? as u64,
            drill_dir: v.absolute_path("drill_dir", None)?,
            drill_interval_hours: v.int("drill_interval_hours", 0..=100_000, 168)? as u64,
            drill_timeout: secs("drill_timeout_secs", 10..=604_800, 3600)?,
            pg_bin_dir: v.absolute_path("pg_bin_dir", None)?,
            http_idle_timeout: secs(
                "http_idle_timeout_secs",
                1..=3600,
                crate::http_limits::IDLE_TIMEOUT.as_secs() as i64,
            )?,
            http_token_file: in_spool("http_token_file", "http-token")?,
            credentials: Credentials::default(),
            wal_fetch_storage: v.bool("wal_fetch_storage", true)?,
            archive_via_daemon: v.bool("archive_via_daemon", true)?,
            encryption: v.encryption()?,
            env_settings,
            file: file.map(Path::to_path_buf),
        })
    }

    /// What the storage layer needs of these settings.
    pub fn storage_settings(&self) -> StorageSettings {
        self.storage_settings_for(&self.storage)
    }

    /// The settings for another store (a seed's source archive): this one's retry bounds,
    /// encryption and credentials, at `url`.
    pub fn storage_settings_for(&self, url: &StorageUrl) -> StorageSettings {
        StorageSettings {
            url: url.clone(),
            retry: self.retry,
            verify_uploads: self.verify_uploads,
            options: self.credentials.storage_options(url),
            encryption: self.encryption.clone(),
        }
    }

    /// Loads from the process environment.
    pub fn from_process(file: Option<&Path>) -> Result<Config, ConfigError> {
        Config::load(file, std::env::vars())
    }
}

#[cfg(test)]
mod tests;
