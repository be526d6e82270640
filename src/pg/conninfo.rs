//! Where and how to connect to Postgres: the `pg` setting (a libpq connection string or URI), filled
//! in from libpq's own environment variables (`PGHOST`, `PGPORT`, `PGUSER`, `PGPASSWORD`,
//! `PGDATABASE`) and then libpq's defaults.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

/// A TCP host or a Unix socket directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PgHost {
    Tcp(String),
    /// The directory holding `.s.PGSQL.<port>`.
    Unix(PathBuf),
}

/// libpq's `sslmode`. `allow` is taken as `prefer` (TLS when the server offers it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SslMode {
    Disable,
    Allow,
    #[default]
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    /// Whether a server that declines TLS is refused.
    pub fn requires_tls(self) -> bool {
        matches!(
            self,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull
        )
    }
}

impl fmt::Display for SslMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SslMode::Disable => "disable",
            SslMode::Allow => "allow",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        })
    }
}

impl FromStr for SslMode {
    type Err = String;
    fn from_str(s: &str) -> Result<SslMode, String> {
        Ok(match s {
            "disable" => SslMode::Disable,
            "allow" => SslMode::Allow,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            _ => {
                return Err(format!(
                    "sslmode {s:?} is not one of disable, allow, prefer, require, verify-ca, verify-full"
                ));
            }
        })
    }
}

/// Where the CA certificates that a server's certificate must lead to come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootCert {
    File(PathBuf),
    /// `sslrootcert=system`: the system's trust store.
    System,
}

/// TLS settings, as libpq names them (`sslmode`, `sslrootcert`, `sslcert`, `sslkey`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SslSettings {
    pub mode: SslMode,
    pub root_cert: Option<RootCert>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

/// Connection settings. The password is never printed (`Debug` hides it).
#[derive(Clone, PartialEq, Eq)]
pub struct PgConnInfo {
    pub host: PgHost,
    pub port: u16,
    pub user: String,
    pub password: Option<String>,
    pub dbname: String,
    pub connect_timeout: Duration,
    pub ssl: SslSettings,
    /// Answer a server that asks for the password in cleartext or as md5 (`pg_allow_weak_auth`).
    pub allow_weak_auth: bool,
    /// What the connections call themselves (`application_name`): the name
    /// `synchronous_standby_names` lists to make commits wait for storage.
    pub application_name: String,
}

impl fmt::Debug for PgConnInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")
    }
}

impl fmt::Display for PgConnInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let host = match &self.host {
            PgHost::Tcp(h) => h.clone(),
            PgHost::Unix(d) => d.display().to_string(),
        };
        write!(
            f,
            "host={host} port={} user={} dbname={} sslmode={}",
            self.port, self.user, self.dbname, self.ssl.mode
        )
    }
}

impl PgConnInfo {
    /// Builds the settings from the `pg` setting (if any) and the environment `get`.
    pub fn resolve(
        conn: Option<&str>,
        get: impl Fn(&str) -> Option<String>,
    ) -> Result<PgConnInfo, String> {
        // As libpq: the connection string's channel_binding wins over PGCHANNELBINDING.
        let conn_given_channel_binding = conn.is_some_and(|c| c.contains("channel_binding"));
        let (conn, ssl_options) = match conn {
            Some(s) => {
                let (rest, found) = split_ssl_options(s)?;
                (Some(rest), found)
            }
            None => (None, vec![]),
        };
        let parsed = match conn.as_deref() {
            Some(s) if !s.trim().is_empty() => Some(
                tokio_postgres::Config::from_str(s)
                    // The parser's messages can quote the string, password included: say only what it is.
                    .map_err(|_| {
                        "not a valid libpq connection string or postgresql:// URI".to_string()
                    })?,
            ),
            _ => None,
        };
        let env = |k: &str| get(k).filter(|v| !v.is_empty());
        let host = match parsed.as_ref().and_then(|p| p.get_hosts().first().cloned()) {
            Some(tokio_postgres::config::Host::Tcp(h)) => host_from_str(&h),
            Some(tokio_postgres::config::Host::Unix(p)) => PgHost::Unix(p),
            None => match env("PGHOST") {
                Some(h) => host_from_str(&h),
                None if std::path::Path::new("/var/run/postgresql").is_dir() => {
                    PgHost::Unix("/var/run/postgresql".into())
                }
                None => PgHost::Tcp("localhost".into()),
            },
        };
        let port = match parsed.as_ref().and_then(|p| p.get_ports().first().copied()) {
            Some(p) => p,
            None => match env("PGPORT") {
                Some(p) => p
                    .parse()
                    .map_err(|_| format!("PGPORT {p:?} is not a port number"))?,
                None => 5432,
            },
        };
        let user = parsed
            .as_ref()
            .and_then(|p| p.get_user().map(str::to_string))
            .or_else(|| env("PGUSER"))
            .unwrap_or_else(|| "postgres".into());
        let password = parsed
            .as_ref()
            .and_then(|p| {
                p.get_password()
                    .map(|b| String::from_utf8_lossy(b).into_owned())
            })
            .or_else(|| env("PGPASSWORD"));
        let dbname = parsed
            .as_ref()
            .and_then(|p| p.get_dbname().map(str::to_string))
            .or_else(|| env("PGDATABASE"))
            .unwrap_or_else(|| "postgres".into());
        if parsed.as_ref().is_some_and(|p| {
            p.get_channel_binding() == tokio_postgres::config::ChannelBinding::Require
        }) || (!conn_given_channel_binding
            && env("PGCHANNELBINDING").is_some_and(|v| v == "require"))
        {
            return Err(
                "channel_binding=require is not supported: pgkeep does not do \
                        SCRAM-SHA-256-PLUS (it does check the server's SCRAM proof; use \
                        sslmode=verify-full against a man in the middle)"
                    .into(),
            );
        }
        let connect_timeout = parsed
            .as_ref()
            .and_then(|p| p.get_connect_timeout().copied())
            .unwrap_or(Duration::from_secs(10));
        let ssl_option = |key: &str, var: &str| {
            ssl_options
                .iter()
                .rev()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.clone())
                .or_else(|| env(var))
        };
        let mode = match ssl_option("sslmode", "PGSSLMODE") {
            Some(m) => m.parse()?,
            None => SslMode::default(),
        };
        let file = |key: &str, var: &str| -> Result<Option<PathBuf>, String> {
            match ssl_option(key, var) {
                None => Ok(None),
                Some(p) if p.starts_with('/') => Ok(Some(PathBuf::from(p))),
                Some(p) => Err(format!("{key} {p:?} must be an absolute path")),
            }
        };
        let root_cert = match ssl_option("sslrootcert", "PGSSLROOTCERT") {
            None => None,
            Some(p) if p == "system" => Some(RootCert::System),
            Some(_) => file("sslrootcert", "PGSSLROOTCERT")?.map(RootCert::File),
        };
        let (cert, key) = (file("sslcert", "PGSSLCERT")?, file("sslkey", "PGSSLKEY")?);
        if cert.is_some() != key.is_some() {
            return Err("sslcert and sslkey go together: set both, or neither".into());
        }
        // As libpq 16: any public CA signs certificates for anyone, so the system's CAs prove
        // something only together with the host name.
        if root_cert == Some(RootCert::System) && mode != SslMode::VerifyFull {
            return Err(format!(
                "sslrootcert=system needs sslmode=verify-full (with the system's CAs, a certificate proves nothing without the name), not {mode}"
            ));
        }
        if mode.requires_tls() && mode != SslMode::Require && root_cert.is_none() {
            return Err(format!(
                "sslmode={mode} needs sslrootcert (a file of CA certificates, or `system`)"
            ));
        }
        Ok(PgConnInfo {
            host,
            port,
            user,
            password,
            dbname,
            connect_timeout,
            ssl: SslSettings {
                mode,
                root_cert,
                cert,
                key,
            },
            allow_weak_auth: false,
            application_name: "pgkeep".into(),
        })
    }

    /// The same settings for tokio-postgres (ordinary SQL connections).
    pub fn to_tokio_postgres(&self) -> tokio_postgres::Config {
        let mut c = tokio_postgres::Config::new();
        match &self.host {
            PgHost::Tcp(h) => c.host(h),
            PgHost::Unix(d) => c.host_path(d),
        };
        // TLS is pgkeep's own (see `tls::dial`): tokio-postgres gets the stream ready made.
        c.ssl_mode(tokio_postgres::config::SslMode::Disable);
        c.port(self.port)
            .user(&self.user)
            .dbname(&self.dbname)
            .application_name(&self.application_name)
            .connect_timeout(self.connect_timeout);
        if let Some(p) = &self.password {
            c.password(p);
        }
        c
    }
}

/// `%XX` escapes of a URI part decoded (libpq's rules: no `+` for space).
fn percent_decode(s: &str) -> Result<String, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| {
                    "a % in a postgresql:// URI must start an escape (%XX)".to_string()
                })?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "a URI escape that is not UTF-8".to_string())
}

/// The TLS options libpq takes that pgkeep handles itself (tokio-postgres knows `sslmode` only
/// up to `require`, and none of the files).
const SSL_KEYS: &[&str] = &["sslmode", "sslrootcert", "sslcert", "sslkey"];

/// Takes the `ssl*` options out of a connection string (key=value form or a URI's query), so
/// that tokio-postgres parses the rest. Other `ssl*` options are refused by name.
fn split_ssl_options(s: &str) -> Result<(String, Vec<(String, String)>), String> {
    let mut found = vec![];
    let mut take = |k: &str, v: String| -> Result<bool, String> {
        if SSL_KEYS.contains(&k) {
            found.push((k.to_string(), v));
            Ok(true)
        } else if k.starts_with("ssl") {
            Err(format!(
                "the connection option {k} is not supported (pgkeep knows sslmode, sslrootcert, sslcert and sslkey)"
            ))
        } else {
            Ok(false)
        }
    };
    let trimmed = s.trim_start();
    if trimmed.starts_with("postgres://") || trimmed.starts_with("postgresql://") {
        // As libpq: user info runs to the first '@' before any '/' (a password may hold '?'),
        // the query starts at the first '?' after it. Pairs other than ssl* are kept as written
        // ('+' is not a space, escapes stay as they are).
        let after_scheme = s.find("://").expect("a scheme") + 3;
        let tail = &s[after_scheme..];
        let auth_end = match tail.find(['@', '/']) {
            Some(i) if tail.as_bytes()[i] == b'@' => after_scheme + i + 1,
            _ => after_scheme,
        };
        let Some(q) = s[auth_end..].find('?').map(|i| auth_end + i) else {
            return Ok((s.to_string(), found));
        };
        let (base, query) = (&s[..q], &s[q + 1..]);
        let mut kept = vec![];
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            if !take(&percent_decode(k)?, percent_decode(v)?)? {
                kept.push(pair);
            }
        }
        let rest = if kept.is_empty() {
            base.to_string()
        } else {
            format!("{base}?{}", kept.join("&"))
        };
        return Ok((rest, found));
    }
    // key = value pairs; a value is bare (backslash escapes) or single-quoted.
    let b = s.as_bytes();
    let mut rest = String::new();
    let mut i = 0;
    let unparsable = || "not a valid libpq connection string or postgresql:// URI".to_string();
    while i < b.len() {
        while i < b.len() && b[i].is_ascii_whitespace() {
            i += 1;
        }
        if i == b.len() {
            break;
        }
        let start = i;
        while i < b.len() && b[i] != b'=' && !b[i].is_ascii_whitespace() {
            i += 1;
        }
        let key = &s[start..i];
        while i < b.len() && b[i].is_ascii_whitespace() {
            i += 1;
        }
        if i == b.len() || b[i] != b'=' || key.is_empty() {
            return Err(unparsable());
        }
        i += 1;
        while i < b.len() && b[i].is_ascii_whitespace() {
            i += 1;
        }
        let mut value = Vec::new();
        if i < b.len() && b[i] == b'\'' {
            i += 1;
            loop {
                match b.get(i) {
                    None => return Err(unparsable()),
                    Some(b'\'') => {
                        i += 1;
                        break;
                    }
                    Some(b'\\') if i + 1 < b.len() => {
                        value.push(b[i + 1]);
                        i += 2;
                    }
                    Some(&c) => {
                        value.push(c);
                        i += 1;
                    }
                }
            }
        } else {
            while i < b.len() && !b[i].is_ascii_whitespace() {
                if b[i] == b'\\' && i + 1 < b.len() {
                    i += 1;
                }
                value.push(b[i]);
                i += 1;
            }
        }
        let value = String::from_utf8(value).map_err(|_| unparsable())?;
        if !take(key, value)? {
            rest.push_str(&s[start..i]);
            rest.push(' ');
        }
    }
    Ok((rest, found))
}

fn host_from_str(h: &str) -> PgHost {
    if h.starts_with('/') {
        PgHost::Unix(h.into())
    } else {
        PgHost::Tcp(h.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| {
            pairs
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn connection_string_wins_over_environment() {
        let c = PgConnInfo::resolve(
            Some("host=db.local port=6543 user=backup password=s3cret dbname=app"),
            env(&[
                ("PGHOST", "/tmp"),
                ("PGPORT", "1"),
                ("PGUSER", "x"),
                ("PGPASSWORD", "y"),
            ]),
        )
        .unwrap();
        assert_eq!(c.host, PgHost::Tcp("db.local".into()));
        assert_eq!(
            (c.port, c.user.as_str(), c.password.as_deref()),
            (6543, "backup", Some("s3cret"))
        );
        assert!(
            !format!("{c:?} {c}").contains("s3cret"),
            "the password was printed"
        );
    }

    #[test]
    fn tls_options_in_every_form() {
        // key=value, quoted and escaped values kept for tokio-postgres, ssl* taken out.
        let c = PgConnInfo::resolve(
            Some("host=db port=5 sslmode=verify-full sslrootcert='/etc/ca dir/ca.crt' password='it\\'s' user=u"),
            env(&[("PGSSLMODE", "disable")]),
        )
        .unwrap();
        assert_eq!(c.ssl.mode, SslMode::VerifyFull);
        assert_eq!(
            c.ssl.root_cert,
            Some(RootCert::File("/etc/ca dir/ca.crt".into()))
        );
        assert_eq!(
            (c.password.as_deref(), c.user.as_str()),
            (Some("it's"), "u")
        );
        // A URI's query.
        let c = PgConnInfo::resolve(
            Some("postgresql://u@db:5/app?sslmode=require&connect_timeout=3&sslcert=%2Fc.pem&sslkey=/k.pem"),
            env(&[]),
        )
        .unwrap();
        assert_eq!(c.ssl.mode, SslMode::Require);
        assert_eq!(c.ssl.cert.as_deref(), Some(std::path::Path::new("/c.pem")));
        assert_eq!(c.connect_timeout, Duration::from_secs(3));
        assert_eq!(c.dbname, "app");
        // A password holding '?' (user info runs to the '@'), a '+' in a kept value.
        let c = PgConnInfo::resolve(
            Some("postgresql://u:p%3Fw+d@db:5/app?application_name=a+b&sslmode=disable"),
            env(&[]),
        )
        .unwrap();
        assert_eq!(c.password.as_deref(), Some("p?w+d"));
        assert_eq!(c.ssl.mode, SslMode::Disable);
        let (rest, _) =
            split_ssl_options("postgresql://u:p?w@db/app?application_name=a+b&sslmode=disable")
                .unwrap();
        assert_eq!(rest, "postgresql://u:p?w@db/app?application_name=a+b");
        // channel_binding=require cannot be honoured: refused, not dropped.
        for given in [
            (Some("host=db channel_binding=require"), vec![]),
            (None, vec![("PGCHANNELBINDING", "require")]),
        ] {
            let err = PgConnInfo::resolve(given.0, env(&given.1)).unwrap_err();
            assert!(
                err.contains("channel_binding=require is not supported"),
                "{err}"
            );
        }
        // The environment, and the default.
        let c = PgConnInfo::resolve(
            None,
            env(&[("PGSSLMODE", "verify-full"), ("PGSSLROOTCERT", "system")]),
        )
        .unwrap();
        assert_eq!(
            (c.ssl.mode, c.ssl.root_cert),
            (SslMode::VerifyFull, Some(RootCert::System))
        );
        let err = PgConnInfo::resolve(
            None,
            env(&[("PGSSLMODE", "verify-ca"), ("PGSSLROOTCERT", "system")]),
        )
        .unwrap_err();
        assert!(err.contains("needs sslmode=verify-full"), "{err}");
        assert_eq!(
            PgConnInfo::resolve(Some("host=x"), env(&[]))
                .unwrap()
                .ssl
                .mode,
            SslMode::Prefer
        );
        assert!(
            PgConnInfo::resolve(Some("host=x"), env(&[]))
                .unwrap()
                .to_string()
                .contains("sslmode=prefer")
        );
        // Bad settings are named.
        for (conn, says) in [
            ("host=x sslmode=verify", "is not one of"),
            ("host=x sslmode=verify-full", "needs sslrootcert"),
            ("host=x sslcert=/c.pem", "go together"),
            (
                "host=x sslrootcert=ca.crt sslmode=verify-ca",
                "absolute path",
            ),
            ("host=x sslcrl=/crl.pem", "sslcrl is not supported"),
            ("host=x password='open", "not a valid libpq"),
        ] {
            let err = PgConnInfo::resolve(Some(conn), env(&[])).unwrap_err();
            assert!(err.contains(says), "{conn}: {err}");
        }
    }

    #[test]
    fn environment_and_defaults() {
        let c = PgConnInfo::resolve(
            None,
            env(&[
                ("PGHOST", "/run/pg"),
                ("PGPORT", "5433"),
                ("PGPASSWORD", "p"),
            ]),
        )
        .unwrap();
        assert_eq!(c.host, PgHost::Unix("/run/pg".into()));
        assert_eq!(
            (c.port, c.user.as_str(), c.password.as_deref()),
            (5433, "postgres", Some("p"))
        );
        let c = PgConnInfo::resolve(Some("postgresql://u:pw@127.0.0.1:7000/db"), env(&[])).unwrap();
        assert_eq!(
            (c.host.clone(), c.port, c.dbname.as_str()),
            (PgHost::Tcp("127.0.0.1".into()), 7000, "db")
        );
        assert!(PgConnInfo::resolve(None, env(&[("PGPORT", "abc")])).is_err());
        let err = PgConnInfo::resolve(Some("host=x password=hunter2 bogus"), env(&[])).unwrap_err();
        assert!(!err.contains("hunter2"), "{err}");
    }
}
