//! `pgkeep mark NAME`: a named point to come back to, in seconds at any database size. Runs
//! `pg_create_restore_point(NAME)`, switches WAL, waits until the segment holding the restore
//! point is in storage, and records the mark (name, time, LSN, timeline, note) there. `list`
//! shows marks; `restore --target-name NAME` recovers to one (and picks a backup that ends before
//! it).

use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::pg::replication::ReplConnection;
use crate::pg::{Lsn, TimelineId, WalFileName, sql};
use crate::storage::catalog::ClusterInfo;
use crate::storage::{Archive, Repo, StorageError};

/// The longest mark name: Postgres keeps restore point names in 64 bytes with the NUL.
pub const MAX_NAME: usize = 63;
/// The longest note.
pub const MAX_NOTE: usize = 1024;

/// A mark as stored in `<cluster>/marks/<name>.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mark {
    pub name: String,
    pub time: DateTime<Utc>,
    /// Where the restore point record ends (what `pg_create_restore_point` returned).
    pub lsn: Lsn,
    pub timeline: TimelineId,
    /// Free text: the release and revision, a ticket.
    pub note: String,
    /// The WAL position of the switch that followed (that much is in storage).
    pub durable_lsn: Lsn,
}

/// A mark name: 1 to 63 characters of `A-Z a-z 0-9 . _ - :`, not starting with `.` or `-`. It
/// becomes an object key and `recovery_target_name`, so nothing else is let through.
pub fn check_name(name: &str) -> Result<(), String> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | ':');
    if name.is_empty() || name.len() > MAX_NAME {
        return Err(format!(
            "a mark name has 1 to {MAX_NAME} characters, {name:?} has {}",
            name.len()
        ));
    }
    if !name.chars().all(ok_char) || name.starts_with(['.', '-']) {
        return Err(format!(
            "mark name {name:?}: use letters, digits and . _ - : (not first . or -)"
        ));
    }
    Ok(())
}

/// A note: at most 1024 bytes, no control characters.
pub fn check_note(note: &str) -> Result<(), String> {
    if note.len() > MAX_NOTE {
        return Err(format!("a note has at most {MAX_NOTE} bytes"));
    }
    if note.chars().any(char::is_control) {
        return Err("a note holds no control characters (line breaks included)".into());
    }
    Ok(())
}

impl Mark {
    fn validate(&self) -> Result<(), String> {
        check_name(&self.name)?;
        check_note(&self.note)?;
        if self.durable_lsn < self.lsn {
            return Err(format!(
                "its durable position {} is before its restore point {}",
                self.durable_lsn, self.lsn
            ));
        }
        Ok(())
    }
}

impl Archive {
    /// The mark named `name`, if storage holds one.
    pub async fn mark(&self, name: &str) -> Result<Option<Mark>, StorageError> {
        let key = self.layout().mark(name);
        let raw = match self.repo().get(&key).await {
            Ok(raw) => raw,
            Err(StorageError::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(e),
        };
        let corrupt = |reason: String| StorageError::Corrupt {
            key: key.to_string(),
            reason,
        };
        let m: Mark =
            serde_json::from_slice(&raw).map_err(|e| corrupt(format!("not a mark: {e}")))?;
        m.validate().map_err(corrupt)?;
        if m.name != name {
            return Err(corrupt(format!("names mark {:?}, not {name:?}", m.name)));
        }
        Ok(Some(m))
    }

    /// Every mark, oldest first, and the damaged ones apart (as errors naming their object).
    pub async fn marks(&self) -> Result<(Vec<Mark>, Vec<StorageError>), StorageError> {
        let (mut out, mut damaged) = (vec![], vec![]);
        for key in self.repo().list(&self.layout().marks_dir()).await? {
            let Some(name) = key
                .filename()
                .and_then(|f| f.strip_suffix(".json"))
                .filter(|n| check_name(n).is_ok())
            else {
                continue;
            };
            match self.mark(name).await {
                Ok(Some(m)) => out.push(m),
                Ok(None) => {}
                Err(e @ StorageError::Corrupt { .. }) => damaged.push(e),
                Err(e) => return Err(e),
            }
        }
        out.sort_by(|a, b| a.lsn.cmp(&b.lsn).then(a.time.cmp(&b.time)));
        Ok((out, damaged))
    }
}

/// Takes a mark: the restore point, a WAL switch, the wait until the restore point's segment is
/// in storage (the daemon's upload, or archive_command's), then the record. Refuses a name a mark
/// already has, before anything is written.
/// The restore point's WAL did not reach storage in time (no mark was recorded).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct NotDurable(String);

/// A mark of that name exists.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Taken(String);

/// How a mark is taken.
#[derive(Debug, Clone, Default)]
pub struct MarkOptions {
    pub note: String,
    /// The longest wait for the restore point's WAL to reach storage.
    pub timeout: Duration,
    /// A mark of that name already stored is the answer (a retried hook Job), not an error.
    pub exists_ok: bool,
    /// Refuse unless the server runs this Postgres major (a chart upgrade that changes it).
    pub expect_major: Option<u32>,
}

pub async fn take_mark(
    cfg: &Config,
    repo: &Repo,
    name: &str,
    opts: &MarkOptions,
) -> anyhow::Result<Mark> {
    let (note, timeout) = (opts.note.as_str(), opts.timeout);
    check_name(name).map_err(|e| anyhow!(e))?;
    check_note(note).map_err(|e| anyhow!(e))?;
    let (_repl, server) = ReplConnection::connect_identified(&cfg.pg).await?;
    drop(_repl);
    if let Some(want) = opts.expect_major
        && want != server.major()
    {
        bail!(
            "the running cluster is Postgres {} ({}), and Postgres {want} is asked for: a data \
             directory cannot change major by a restart, and physical backups cannot cross \
             majors. Keep postgres.major at {}, or move the data with a dump and restore or \
             pg_upgrade (docs/kubernetes.md, \"Changing the Postgres major\")",
            server.major(),
            server.version,
            server.major()
        );
    }
    let client = sql::connect(&cfg.pg).await?;
    if sql::is_in_recovery(&client).await? {
        bail!("Postgres is in recovery: a mark is taken on the primary");
    }
    let archive = repo.ensure_cluster(&ClusterInfo::from(&server)).await?;
    if let Some(m) = archive.mark(name).await? {
        if opts.exists_ok {
            tracing::info!(mark = name, lsn = %m.lsn, "the mark exists already");
            return Ok(m);
        }
        return Err(Taken(format!(
            "a mark named {name:?} exists already (at {} on timeline {}, {}): mark names are unique",
            m.lsn,
            m.timeline,
            m.time.format("%Y-%m-%d %H:%M:%S UTC")
        ))
        .into());
    }
    let lsn: Lsn = client
        .query_one("select pg_create_restore_point($1)::text", &[&name])
        .await
        .context("pg_create_restore_point() (the role needs EXECUTE on it)")?
        .get::<_, String>(0)
        .parse()?;
    let switched = sql::switch_wal(&client).await?;
    let timeline = server.timeline;
    // The segment that holds the restore point's record (it ends at `lsn`).
    let seg = WalFileName::segment(
        timeline,
        server.seg_size.segment_of(Lsn(lsn.0 - 1)),
        server.seg_size,
    );
    tracing::info!(mark = name, lsn = %lsn, segment = %seg, "restore point created; waiting until its WAL is in storage");
    let started = Instant::now();
    let key = archive.layout().wal(&seg);
    loop {
        match repo.exists(&key).await {
            Ok(true) => break,
            Ok(false) => {}
            Err(e) => tracing::warn!("checking storage for {seg}: {e}"),
        }
        if started.elapsed() >= timeout {
            return Err(NotDurable(format!(
                "the WAL of mark {name:?} ({seg}) did not reach storage within {}s: is the daemon \
                 (or archive_command) running? The restore point exists in Postgres; no mark was \
                 recorded (a mark records its LSN, so a retry with the same name is safe)",
                timeout.as_secs()
            ))
            .into());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mark = Mark {
        name: name.to_string(),
        time: Utc::now(),
        lsn,
        timeline,
        note: note.to_string(),
        durable_lsn: switched.max(lsn),
    };
    let json = serde_json::to_vec_pretty(&mark).expect("serialisable");
    match repo
        .put_new_metadata(&archive.layout().mark(name), &json)
        .await
    {
        Ok(_) => {}
        Err(StorageError::Conflict { .. }) => {
            return Err(Taken(format!(
                "a mark named {name:?} was recorded by another writer meanwhile"
            ))
            .into());
        }
        Err(e) => return Err(anyhow::Error::from(e).context(format!("recording mark {name:?}"))),
    }
    tracing::info!(mark = name, lsn = %lsn, seconds = crate::progress::round3(started.elapsed().as_secs_f64()), "mark recorded");
    Ok(mark)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_notes() {
        for ok in ["pre-upgrade-db-7", "r1", "2026-12-02T10:00:00", "a.b_c"] {
            check_name(ok).unwrap();
        }
        for bad in [
            "",
            ".hidden",
            "-x",
            "a/b",
            "a b",
            "é",
            "x'y",
            &"a".repeat(64),
            "a\nb",
        ] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
        check_note("release db revision 7").unwrap();
        assert!(check_note("a\nrestore_command = evil").is_err());
        assert!(check_note(&"n".repeat(MAX_NOTE + 1)).is_err());
    }
}
