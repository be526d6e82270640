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

/// Connection settings. The password is never printed (`Debug` hides it).
#[derive(Clone, PartialEq, Eq)]
pub struct PgConnInfo {
    pub host: PgHost,
    pub port: u16,
    pub user: String,
    pub password: Option<String>,
    pub dbname: String,
    pub connect_timeout: Duration,
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
            "host={host} port={} user={} dbname={}",
            self.port, self.user, self.dbname
        )
    }
}

impl PgConnInfo {
    /// Builds the settings from the `pg` setting (if any) and the environment `get`.
    pub fn resolve(
        conn: Option<&str>,
        get: impl Fn(&str) -> Option<String>,
    ) -> Result<PgConnInfo, String> {
        let parsed = match conn {
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
        let connect_timeout = parsed
            .as_ref()
            .and_then(|p| p.get_connect_timeout().copied())
            .unwrap_or(Duration::from_secs(10));
        Ok(PgConnInfo {
            host,
            port,
            user,
            password,
            dbname,
            connect_timeout,
        })
    }

    /// The same settings for tokio-postgres (ordinary SQL connections).
    pub fn to_tokio_postgres(&self) -> tokio_postgres::Config {
        let mut c = tokio_postgres::Config::new();
        match &self.host {
            PgHost::Tcp(h) => c.host(h),
            PgHost::Unix(d) => c.host_path(d),
        };
        c.port(self.port)
            .user(&self.user)
            .dbname(&self.dbname)
            .application_name("pgkeep")
            .connect_timeout(self.connect_timeout);
        if let Some(p) = &self.password {
            c.password(p);
        }
        c
    }
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
