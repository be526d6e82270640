//! Reading the raw values of the settings (from the file and the environment) as typed,
//! validated values; every error names the key and where its value came from.

use std::collections::BTreeMap;
use std::path::PathBuf;

use super::{ConfigError, DEFAULT_STORAGE, KEYS, Kind, LogFormat};
use crate::codec::Codec;
use crate::pg::conninfo::PgConnInfo;
use crate::storage::settings::StorageUrl;

/// A raw value and where it came from.
pub(super) struct Raw {
    pub value: toml::Value,
    pub origin: String,
}

pub(super) struct Values {
    pub raw: BTreeMap<&'static str, Raw>,
}

fn bad(origin: &str, message: String) -> ConfigError {
    ConfigError {
        origin: origin.to_string(),
        message,
    }
}

impl Values {
    /// The value of `key` with its origin, checked against the key's type.
    fn get(&self, key: &str) -> Result<Option<(&toml::Value, &str)>, ConfigError> {
        let Some(r) = self.raw.get(key) else {
            return Ok(None);
        };
        let kind = KEYS.iter().find(|(k, _)| *k == key).expect("known key").1;
        let (ok, want) = match kind {
            Kind::Str => (r.value.is_str(), "a string"),
            Kind::Int => (r.value.is_integer(), "a whole number"),
            Kind::Bool => (r.value.is_bool(), "true or false"),
            Kind::List => (
                r.value.is_str()
                    || r.value
                        .as_array()
                        .is_some_and(|a| a.iter().all(toml::Value::is_str)),
                "a list of strings (or one comma-separated string)",
            ),
        };
        if !ok {
            return Err(bad(&r.origin, format!("expected {want}, got {}", r.value)));
        }
        Ok(Some((&r.value, r.origin.as_str())))
    }

    /// A string setting and its origin.
    pub fn string(&self, key: &str) -> Result<Option<(String, String)>, ConfigError> {
        Ok(self
            .get(key)?
            .map(|(v, o)| (v.as_str().expect("checked").to_string(), o.to_string())))
    }

    /// A whole number in `range`, or `default`.
    pub fn int(
        &self,
        key: &str,
        range: std::ops::RangeInclusive<i64>,
        default: i64,
    ) -> Result<i64, ConfigError> {
        match self.get(key)? {
            None => Ok(default),
            Some((v, o)) => {
                let n = v.as_integer().expect("checked");
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
    }

    /// How often the open segment is uploaded at most: `partial_upload_ms`, or the older
    /// `partial_upload_secs`; not both.
    pub fn partial_upload_interval(&self) -> Result<std::time::Duration, ConfigError> {
        let ms = self.get("partial_upload_ms")?.map(|(_, o)| o.to_string());
        if let (Some(o), Some(_)) = (ms, self.get("partial_upload_secs")?) {
            return Err(bad(
                &o,
                "partial_upload_ms and partial_upload_secs are both set: keep one \
                 (partial_upload_secs is the older name, in whole seconds)"
                    .into(),
            ));
        }
        let ms = match self.get("partial_upload_secs")? {
            Some(_) => self.int("partial_upload_secs", 1..=3600, 5)? * 1000,
            None => self.int("partial_upload_ms", 10..=3_600_000, 200)?,
        };
        Ok(std::time::Duration::from_millis(ms as u64))
    }

    pub fn bool(&self, key: &str, default: bool) -> Result<bool, ConfigError> {
        Ok(self
            .get(key)?
            .map_or(default, |(v, _)| v.as_bool().expect("checked")))
    }

    /// An absolute path, or `default`.
    /// A list setting's items (trimmed, empty ones dropped) and its origin.
    pub fn list(&self, key: &str) -> Result<Option<(Vec<String>, String)>, ConfigError> {
        Ok(self.get(key)?.map(|(v, o)| {
            let items: Vec<String> = match v {
                toml::Value::Array(a) => a
                    .iter()
                    .map(|s| s.as_str().expect("checked").to_string())
                    .collect(),
                v => v
                    .as_str()
                    .expect("checked")
                    .split(',')
                    .map(str::to_string)
                    .collect(),
            };
            let items = items
                .into_iter()
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect();
            (items, o.to_string())
        }))
    }

    /// `encryption_recipients` (each checked to be an age recipient) and
    /// `encryption_identity_file` (an absolute path; read when a key is needed).
    pub fn encryption(&self) -> Result<crate::storage::EncryptionSettings, ConfigError> {
        let recipients = match self.list("encryption_recipients")? {
            None => vec![],
            Some((items, o)) => {
                for (i, r) in items.iter().enumerate() {
                    crate::storage::crypt::parse_recipient(r)
                        .map_err(|m| bad(&o, format!("entry {}: {m}", i + 1)))?;
                }
                items
            }
        };
        // A secret key given where its file's path belongs must not be echoed in the error.
        if let Some((v, o)) = self.string("encryption_identity_file")?
            && v.trim().to_ascii_uppercase().starts_with("AGE-SECRET-KEY-")
        {
            return Err(bad(
                &o,
                "this is a secret key, not the path of a file holding one: write the key to a \
                 file (mode 0600) and give its path"
                    .into(),
            ));
        }
        Ok(crate::storage::EncryptionSettings {
            recipients,
            identity_file: self.absolute_path("encryption_identity_file", None)?,
        })
    }

    pub fn absolute_path(
        &self,
        key: &str,
        default: Option<&str>,
    ) -> Result<Option<PathBuf>, ConfigError> {
        match self.string(key)? {
            None => Ok(default.map(PathBuf::from)),
            Some((s, _)) if s.starts_with('/') => Ok(Some(PathBuf::from(s))),
            Some((s, o)) => Err(bad(&o, format!("{s:?} must be an absolute path"))),
        }
    }

    pub fn storage(&self) -> Result<StorageUrl, ConfigError> {
        match self.string("storage")? {
            None => Ok(StorageUrl::parse(DEFAULT_STORAGE).expect("default parses")),
            Some((s, o)) => StorageUrl::parse(&s).map_err(|m| bad(&o, m)),
        }
    }

    pub fn codec(&self) -> Result<Codec, ConfigError> {
        let level = self.int("compression_level", 1..=22, 3)? as i32;
        match self.string("compression")? {
            None => Ok(Codec::Snappy),
            Some((s, o)) => match s.as_str() {
                "snappy" => Ok(Codec::Snappy),
                "zstd" => Ok(Codec::Zstd { level }),
                "none" => Ok(Codec::None),
                _ => Err(bad(
                    &o,
                    format!("unknown compression {s:?}: use snappy, zstd or none"),
                )),
            },
        }
    }

    pub fn system_identifier(&self) -> Result<Option<u64>, ConfigError> {
        match self.string("system_identifier")? {
            None => Ok(None),
            Some((s, o)) => match s.trim().parse::<u64>() {
                Ok(n) if n != 0 => Ok(Some(n)),
                _ => Err(bad(
                    &o,
                    format!(
                        "{s:?} is not a system identifier (a positive whole number, as pg_controldata prints it)"
                    ),
                )),
            },
        }
    }

    pub fn logging(&self) -> Result<(LogFormat, String), ConfigError> {
        let format = match self.string("log_format")? {
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
        let level = match self.string("log_level")? {
            None => "info".to_string(),
            Some((s, o)) => {
                tracing_subscriber::EnvFilter::try_new(&s)
                    .map_err(|e| bad(&o, format!("{s:?} is not a log level or filter ({e})")))?;
                s
            }
        };
        Ok((format, level))
    }

    /// How to reach Postgres: the `pg` setting, then libpq's variables, then libpq's defaults.
    pub fn pg(&self, lookup: &impl Fn(&str) -> Option<String>) -> Result<PgConnInfo, ConfigError> {
        let mut info = match self.string("pg")? {
            None => PgConnInfo::resolve(None, lookup)
                .map_err(|m| bad("PGHOST/PGPORT/PGUSER/PGSSL* (environment)", m))?,
            Some((s, o)) => PgConnInfo::resolve(Some(&s), lookup).map_err(|m| bad(&o, m))?,
        };
        info.allow_weak_auth = self.bool("pg_allow_weak_auth", false)?;
        if let Some((name, o)) = self.string("application_name")? {
            // What synchronous_standby_names lists: a plain name (Postgres truncates at 63 bytes
            // and would then not match the setting).
            let valid = !name.is_empty()
                && name.len() <= 63
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.');
            if !valid {
                return Err(bad(
                    &o,
                    format!(
                        "{name:?} is not an application name pgkeep uses: 1 to 63 of a-z, A-Z, 0-9, _, - and ."
                    ),
                ));
            }
            info.application_name = name;
        }
        Ok(info)
    }

    pub fn slot_name(&self) -> Result<String, ConfigError> {
        match self.string("slot_name")? {
            None => Ok("pgkeep".to_string()),
            Some((s, o)) => {
                let valid = !s.is_empty()
                    && s.len() <= 63
                    && s.bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
                if !valid {
                    return Err(bad(
                        &o,
                        format!(
                            "{s:?}: a slot name is 1 to 63 lower-case letters, digits or underscores"
                        ),
                    ));
                }
                Ok(s)
            }
        }
    }

    pub fn listen(&self) -> Result<std::net::SocketAddr, ConfigError> {
        match self.string("listen")? {
            None => Ok("127.0.0.1:16000".parse().expect("valid")),
            Some((s, o)) => s.parse().map_err(|_| {
                bad(
                    &o,
                    format!("{s:?} is not an address and port, like 127.0.0.1:16000"),
                )
            }),
        }
    }
}
