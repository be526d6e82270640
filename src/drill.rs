//! `pgkeep verify --restore-drill DIR`: the check that nothing short of a restore can give. Restores
//! the newest backup into DIR (which must be new or empty), starts Postgres on it (on loopback,
//! with its own socket folder and a `pg_hba.conf` that admits only local connections of this
//! user, no archiving, so the drill never writes to the archive), waits until archive recovery
//! has replayed the stored WAL and the copy is promoted, runs a query, stops it and removes DIR.
//! Every step is timed; whatever happens, Postgres is stopped and DIR removed.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::pg::conninfo::{PgConnInfo, PgHost};
use crate::restore::{BackupChoice, RestoreOptions, RestoreOutcome, TargetAction};

/// What a drill found.
#[derive(Debug, Clone, Serialize)]
pub struct DrillReport {
    pub ok: bool,
    /// The backup restored (when the restore got that far).
    pub backup: Option<String>,
    /// Each step that ran, in order, with its time.
    pub steps: Vec<Step>,
    /// Where the promoted copy's WAL stood after recovery (the WAL replayed, roughly).
    pub recovered_to_lsn: Option<String>,
    /// The query's answer.
    pub query_result: Option<String>,
    pub total_seconds: f64,
    /// Why it failed.
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Step {
    pub name: &'static str,
    pub seconds: f64,
    pub ok: bool,
}

impl DrillReport {
    pub fn render(&self) -> String {
        let mut out = String::new();
        for s in &self.steps {
            out.push_str(&format!(
                "drill step {:<8} {:>9.3} s  {}\n",
                s.name,
                s.seconds,
                if s.ok { "ok" } else { "FAILED" }
            ));
        }
        match (&self.error, self.ok) {
            (None, true) => out.push_str(&format!(
                "restore drill: backup {} restored, recovered to {} and promoted; {} in {:.3} s: OK\n",
                self.backup.as_deref().unwrap_or("?"),
                self.recovered_to_lsn.as_deref().unwrap_or("?"),
                self.query_result.as_deref().unwrap_or("query answered"),
                self.total_seconds
            )),
            (e, _) => out.push_str(&format!(
                "restore drill FAILED after {:.3} s: {}\n",
                self.total_seconds,
                e.as_deref().unwrap_or("unknown")
            )),
        }
        out
    }
}

/// How a drill is run.
#[derive(Debug, Clone)]
pub struct DrillSettings {
    pub dir: PathBuf,
    /// Where `postgres` is (None: found on `PATH`).
    pub pg_bin_dir: Option<PathBuf>,
    /// The longest the copy may take to recover and promote.
    pub timeout: Duration,
}

/// A drill that could not even start (the directory is not free, Postgres cannot be found): the
/// caller's fault, not the backups'.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct CannotDrill(pub String);

/// Runs a drill. Err only for [`CannotDrill`]; anything that goes wrong from the restore on is a
/// failed drill in the report.
pub async fn drill(
    cfg: &Config,
    settings: &DrillSettings,
    cancel: &CancellationToken,
) -> Result<DrillReport, CannotDrill> {
    let dir = settings.dir.clone();
    if !dir.is_absolute() {
        return Err(CannotDrill(format!(
            "--restore-drill {}: give an absolute path",
            dir.display()
        )));
    }
    if std::fs::symlink_metadata(&dir).is_ok_and(|m| !m.is_dir()) {
        return Err(CannotDrill(format!(
            "--restore-drill {}: not a directory (a link is refused: the drill would write \
             through it and remove only the link)",
            dir.display()
        )));
    }
    // A folder that exists (a mount point of its own, say) is kept and emptied afterwards; one
    // the drill makes is removed.
    let existed = dir.is_dir();
    if let Ok(mut entries) = std::fs::read_dir(&dir)
        && entries.next().is_some()
    {
        return Err(CannotDrill(format!(
            "--restore-drill {}: the directory is not empty; a drill restores into a new or empty \
             directory and removes it afterwards",
            dir.display()
        )));
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return Err(CannotDrill(
            "a restore drill starts Postgres, which does not run as root: run it as the database's \
             user (for example runuser -u postgres -- pgkeep verify --restore-drill DIR)"
                .into(),
        ));
    }
    let postgres = find_postgres(settings.pg_bin_dir.as_deref()).map_err(CannotDrill)?;
    let aside = sibling(&dir, "pgkeep-drill");
    let mut run = Run {
        steps: vec![],
        backup: None,
        child: None,
        started: Instant::now(),
    };
    let outcome = tokio::select! {
        r = run.steps(cfg, settings, &postgres, &aside) => r,
        _ = cancel.cancelled() => Err(anyhow::anyhow!("cancelled (a signal, or the daemon stopping)")),
    };
    // Whatever happened: Postgres stopped, DIR and the drill's own files removed.
    let stop_started = Instant::now();
    let stopped = run.stop_postgres().await;
    if run.child_started() {
        run.record("stop", stop_started, stopped.is_ok());
    }
    let rm_started = Instant::now();
    let removed = clean_up(&dir, existed, &aside).await;
    run.record("remove", rm_started, removed.is_ok());
    let (recovered_to, query) = outcome.as_ref().cloned().unwrap_or_default();
    let error = match (&outcome, stopped, removed) {
        (Err(e), _, _) => Some(format!("{e:#}")),
        (Ok(_), Err(e), _) => Some(format!("{e:#}")),
        (Ok(_), Ok(()), Err(e)) => Some(format!("{e:#}")),
        _ => None,
    };
    let report = DrillReport {
        ok: error.is_none(),
        backup: run.backup.take(),
        steps: run.steps,
        recovered_to_lsn: recovered_to,
        query_result: query,
        total_seconds: crate::progress::round3(run.started.elapsed().as_secs_f64()),
        error,
    };
    Ok(report)
}

/// (LSN after recovery, query answer).
type Found = (Option<String>, Option<String>);

struct Run {
    steps: Vec<Step>,
    backup: Option<String>,
    child: Option<tokio::process::Child>,
    started: Instant,
}

impl Run {
    fn record(&mut self, name: &'static str, since: Instant, ok: bool) {
        self.steps.push(Step {
            name,
            seconds: crate::progress::round3(since.elapsed().as_secs_f64()),
            ok,
        });
    }

    fn child_started(&self) -> bool {
        self.child.is_some()
    }

    async fn steps(
        &mut self,
        cfg: &Config,
        settings: &DrillSettings,
        postgres: &Path,
        aside: &Path,
    ) -> anyhow::Result<Found> {
        let dir = &settings.dir;
        // 1. Restore, tablespaces beside DIR (never at their old paths: those belong to the
        // running cluster).
        let t = Instant::now();
        let restored = self.restore(cfg, dir, aside).await;
        self.record("restore", t, restored.is_ok());
        self.backup = Some(restored?);

        // 2. Start Postgres on it: loopback only, its own socket folder and pg_hba.conf, no
        // archiving (a promoted copy must never write to the archive), modest memory.
        let t = Instant::now();
        let sockets = aside.join("socket");
        std::fs::create_dir_all(&sockets)?;
        let hba = aside.join("pg_hba.conf");
        crate::fsutil::write_atomic(&hba, b"local all all trust\n")?;
        let port = free_port()?;
        let log = aside.join("postgres.log");
        let log_file = std::fs::File::create(&log)?;
        let mut cmd = tokio::process::Command::new(postgres);
        cmd.arg("-D").arg(dir);
        for (k, v) in [
            ("port", port.to_string()),
            ("listen_addresses", "127.0.0.1".into()),
            ("unix_socket_directories", sockets.display().to_string()),
            ("hba_file", hba.display().to_string()),
            ("archive_mode", "off".into()),
            // Nothing of the restored configuration may touch the archive or the world.
            ("archive_cleanup_command", "".into()),
            ("recovery_end_command", "".into()),
            ("hot_standby", "off".into()),
            ("synchronous_standby_names", "".into()),
            ("shared_buffers", "128MB".into()),
            ("ssl", "off".into()),
            ("logging_collector", "off".into()),
            ("cluster_name", "pgkeep-drill".into()),
        ] {
            cmd.arg("-c").arg(format!("{k}={v}"));
        }
        cmd.stdin(std::process::Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .kill_on_drop(true);
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {}", postgres.display()))?;
        self.child = Some(child);
        self.record("start", t, true);

        // 3. Wait for recovery to end and the copy to be promoted.
        let t = Instant::now();
        let info = PgConnInfo {
            host: PgHost::Unix(sockets.clone()),
            port,
            user: cfg.pg.user.clone(),
            password: None,
            dbname: "template1".into(),
            connect_timeout: Duration::from_secs(5),
            // Its own socket, hba trust: no TLS, no password.
            ssl: Default::default(),
            allow_weak_auth: false,
            application_name: "pgkeep-drill".into(),
        };
        let promoted = self.wait_promoted(&info, settings.timeout, &log).await;
        self.record("recover", t, promoted.is_ok());
        let client = promoted?;

        // 4. A query: the databases the copy holds, and where its WAL stands.
        let t = Instant::now();
        let answered = async {
            let row = client
                .query_one(
                    "select (select count(*) from pg_database where datallowconn)::text, \
                     pg_current_wal_lsn()::text",
                    &[],
                )
                .await?;
            anyhow::Ok((row.get::<_, String>(0), row.get::<_, String>(1)))
        }
        .await;
        self.record("query", t, answered.is_ok());
        let (databases, lsn) = answered.context("querying the restored copy")?;
        Ok((
            Some(lsn),
            Some(format!("{databases} database(s) accept connections")),
        ))
    }

    async fn restore(&self, cfg: &Config, dir: &Path, aside: &Path) -> anyhow::Result<String> {
        std::fs::create_dir_all(aside)?;
        let archive = crate::cluster::open_archive(cfg).await?;
        let newest = archive
            .backups()
            .await?
            .into_iter()
            .next()
            .ok_or_else(|| anyhow::anyhow!("storage holds no base backup to drill"))?;
        let tablespace_map = newest
            .archives
            .iter()
            .filter_map(|a| a.location.as_ref())
            .enumerate()
            .map(|(i, loc)| (PathBuf::from(loc), aside.join(format!("tablespace-{i}"))))
            .collect();
        let opts = RestoreOptions {
            target_dir: dir.to_path_buf(),
            backup: BackupChoice::Id(newest.id.clone()),
            target: None,
            target_action: TargetAction::Promote,
            standby: false,
            overwrite: false,
            require_backup: true,
            tablespace_map,
            pgkeep_path: None,
            rollback_to: None,
            seed_from: None,
        };
        match crate::restore::restore(cfg, &opts).await? {
            RestoreOutcome::Restored(meta) => Ok(meta.id.to_string()),
            RestoreOutcome::AlreadyACluster => bail!("{} already holds a cluster", dir.display()),
            RestoreOutcome::NoBackup => bail!("storage holds no base backup to drill"),
        }
    }

    async fn wait_promoted(
        &mut self,
        info: &PgConnInfo,
        timeout: Duration,
        log: &Path,
    ) -> anyhow::Result<tokio_postgres::Client> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                bail!(
                    "Postgres exited during recovery ({status}); the end of its log:\n{}",
                    log_tail(log)
                );
            }
            if let Ok(client) = crate::pg::sql::connect(info).await
                && let Ok(false) = crate::pg::sql::is_in_recovery(&client).await
            {
                return Ok(client);
            }
            if Instant::now() >= deadline {
                bail!(
                    "the copy did not finish recovery within {} s; the end of its log:\n{}",
                    timeout.as_secs(),
                    log_tail(log)
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Fast shutdown (SIGINT), then SIGKILL after 60 s; waits for the postmaster to exit.
    async fn stop_postgres(&mut self) -> anyhow::Result<()> {
        let Some(child) = self.child.as_mut() else {
            return Ok(());
        };
        if child.try_wait()?.is_some() {
            return Ok(());
        }
        if let Some(pid) = child.id() {
            // SAFETY: kill has no memory preconditions; the pid is our own child's.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGINT) };
        }
        match tokio::time::timeout(Duration::from_secs(60), child.wait()).await {
            Ok(status) => {
                status?;
                Ok(())
            }
            Err(_) => {
                child.kill().await?;
                bail!("the copy did not stop within 60 s of a fast shutdown; it was killed")
            }
        }
    }
}

/// `postgres` in `bin_dir`, or on `PATH`.
fn find_postgres(bin_dir: Option<&Path>) -> Result<PathBuf, String> {
    let candidates: Vec<PathBuf> = match bin_dir {
        Some(d) => vec![d.join("postgres")],
        None => std::env::var_os("PATH")
            .map(|p| {
                std::env::split_paths(&p)
                    .map(|d| d.join("postgres"))
                    .collect()
            })
            .unwrap_or_default(),
    };
    candidates
        .into_iter()
        .find(|p| p.is_file())
        .ok_or_else(|| match bin_dir {
            Some(d) => format!(
                "no postgres in {} (the pg_bin_dir setting): a restore drill needs the server \
                 binaries of the backup's major",
                d.display()
            ),
            None => "no postgres on PATH: set pg_bin_dir (PGKEEP_PG_BIN_DIR) to the folder of the \
                     server binaries of the backup's major"
                .into(),
        })
}

/// `<parent>/.<name of dir>.<what>`: beside DIR, apart from it.
fn sibling(dir: &Path, what: &str) -> PathBuf {
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "drill".into());
    dir.with_file_name(format!(".{name}.{what}"))
}

/// Removes what the drill wrote: DIR's contents (DIR too, when the drill made it) and its own
/// folder beside it. A cancelled restore's unpacking thread may still write for a moment (it stops
/// at its next chunk): removed again until nothing comes back, for a few seconds at most.
async fn clean_up(dir: &Path, keep_dir: bool, aside: &Path) -> anyhow::Result<()> {
    let mut last = Ok(());
    for _ in 0..10 {
        last = match keep_dir {
            true => empty_dir(dir).and_then(|()| remove_all(&[aside])),
            false => remove_all(&[dir, aside]),
        };
        tokio::time::sleep(Duration::from_millis(200)).await;
        let left = match keep_dir {
            true => std::fs::read_dir(dir)
                .map(|mut e| e.next().is_some())
                .unwrap_or(false),
            false => dir.exists(),
        };
        if last.is_ok() && !left && !aside.exists() {
            return Ok(());
        }
    }
    last.and_then(|()| anyhow::bail!("{} could not be emptied", dir.display()))
}

fn empty_dir(dir: &Path) -> anyhow::Result<()> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(());
    };
    for e in entries {
        let p = e?.path();
        let is_dir = std::fs::symlink_metadata(&p).is_ok_and(|m| m.is_dir());
        match is_dir {
            true => std::fs::remove_dir_all(&p),
            false => std::fs::remove_file(&p),
        }
        .with_context(|| format!("removing {}", p.display()))?;
    }
    Ok(())
}

fn remove_all(dirs: &[&Path]) -> anyhow::Result<()> {
    for d in dirs {
        match std::fs::remove_dir_all(d) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing {}", d.display())),
        }
    }
    Ok(())
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// The last lines of Postgres' log, for an error message.
fn log_tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(12)..].join("\n")
}
