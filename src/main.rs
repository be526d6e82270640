//! The `pgkeep` binary: parses arguments, sets up logging, runs one command, maps the result to an
//! exit code. Everything else is in the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use pgkeep::config::{Config, LogFormat};
use pgkeep::wal::archive;
use pgkeep::wal::fetch::{self, FetchError};
use pgkeep::{backup, list, restore};
use std::os::unix::fs::OpenOptionsExt;

/// What `wal-fetch` returns when the file is not in the archive: Postgres ends archive recovery.
const EXIT_NOT_IN_ARCHIVE: u8 = 1;
/// What `wal-fetch` returns for every other failure: above 125, so Postgres stops instead of
/// treating the failure as "no more WAL".
const EXIT_FETCH_FAILED: u8 = 126;

#[derive(Parser)]
#[command(
    name = "pgkeep",
    version,
    about = "PostgreSQL backup sidecar: WAL and base backups to object storage"
)]
struct Cli {
    /// Config file (TOML); every key can also be set as PGKEEP_<KEY>.
    #[arg(long, global = true, env = "PGKEEP_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// Log format (overrides log_format).
    #[arg(long, global = true, value_enum)]
    log_format: Option<LogFormatArg>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormatArg {
    Human,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// The sidecar: stream WAL through a replication slot to storage and serve the HTTP API.
    Daemon,
    /// The preStop hook: pg_switch_wal(), then wait until the daemon has that WAL in storage.
    WalSwitch {
        /// Give up (exit 1) after this many seconds.
        #[arg(long, default_value_t = 60, value_name = "SECS")]
        timeout: u64,
    },
    /// Take one base backup now (over the replication protocol) and wait until it is in storage.
    Backup {
        /// Postgres 17+: only the blocks changed since the newest backup (needs summarize_wal =
        /// on); an error when the server cannot take one.
        #[arg(long, conflicts_with = "full")]
        incremental: bool,
        /// A full backup even when backup_full_interval_hours would make it incremental (the
        /// default without either flag is the schedule's choice).
        #[arg(long)]
        full: bool,
    },
    /// Take a mark: a named restore point (pg_create_restore_point), a WAL switch, and a record
    /// in storage once that WAL is there. Seconds at any database size; restore to it with
    /// `restore --target-name NAME`.
    Mark {
        /// The mark's name: 1 to 63 of A-Z a-z 0-9 . _ - : (unique).
        name: String,
        /// Free text kept with the mark (a release and revision, a ticket).
        #[arg(long, default_value = "")]
        note: String,
        /// Give up (exit 1) if the WAL is not in storage after this many seconds.
        #[arg(long, default_value_t = 60, value_name = "SECS")]
        timeout: u64,
        /// Print the mark as JSON.
        #[arg(long)]
        json: bool,
        /// A mark of that name already in storage is success (a retried hook), not an error.
        #[arg(long)]
        exists_ok: bool,
        /// Fail unless the server runs this Postgres major (the chart's pre-upgrade hook: a
        /// change of major is refused before anything is applied).
        #[arg(long, value_name = "MAJOR")]
        expect_major: Option<u32>,
    },
    /// List the base backups, newest first, and the recoverable window.
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Apply retention: delete backups beyond backup_count/backup_max_age_hours and the WAL no kept
    /// backup needs.
    Prune {
        /// Say what would be deleted, delete nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Restore a base backup into an empty data directory and write the recovery settings
    /// (the init container). Leaves a directory that already holds a cluster alone.
    Restore(RestoreArgs),
    /// Archive one WAL file (for archive_command = 'pgkeep archive-push %p').
    ArchivePush {
        /// The file to archive (%p).
        path: PathBuf,
    },
    /// Fetch one WAL file from the archive (for restore_command = 'pgkeep wal-fetch %f %p').
    /// Exit 0: fetched; 1: not in the archive; 126: any other failure (Postgres stops recovery).
    WalFetch {
        /// The WAL file name (%f).
        name: String,
        /// Where to write it (%p).
        dest: PathBuf,
    },
    /// wal-fetch's own prefetch (started by wal-fetch when no daemon answers; not for use by hand).
    #[command(hide = true)]
    WalPrefetch {
        /// The segment recovery read last.
        after: String,
        #[arg(long)]
        system_identifier: u64,
        #[arg(long)]
        segment_bytes: u32,
        /// When the daemon's token was written, as wal-fetch saw it (ns; 0: none).
        #[arg(long, default_value_t = 0)]
        token_stamp: u128,
    },
    /// Check the stored backups and WAL without restoring: every chunk and manifest present and
    /// intact, WAL continuity from each backup to the newest segment. Exit 0: everything
    /// restorable; 1: problems found (each named); 2: verify could not run.
    Verify {
        /// Only this backup (an id from `pgkeep list`).
        #[arg(long, value_name = "ID")]
        backup: Option<String>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        /// Instead of checking objects: restore the newest backup into DIR (new or empty), start
        /// Postgres on it (pg_bin_dir, or PATH) on loopback with archive recovery to the end of
        /// the stored WAL, wait for promotion, run a query, stop it and remove DIR; each step timed.
        /// Exit 0: the drill passed; 1: it failed; 2: it could not run.
        #[arg(long, value_name = "DIR")]
        restore_drill: Option<PathBuf>,
    },
    /// Print a new age identity (the secret key, for encryption_identity_file) and, on stderr,
    /// its recipient (the public key, for encryption_recipients). `age-keygen` works as well.
    Keygen {
        /// Write the identity to this new file (mode 0600) instead of stdout.
        #[arg(long, short = 'o', value_name = "FILE")]
        output: Option<PathBuf>,
    },
}

#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("target").args(["target_time", "target_lsn", "target_xid", "target_name"])))]
struct RestoreArgs {
    /// The data directory to restore into (default: PGDATA).
    #[arg(long, value_name = "DIR")]
    target_dir: Option<PathBuf>,
    /// The backup to restore: an id from `pgkeep list`, or `latest`.
    #[arg(long, value_name = "ID|latest", default_value = "latest")]
    backup: String,
    /// Recover up to this time (with a time zone); chooses the newest backup that ended before it.
    #[arg(long, value_name = "TIME")]
    target_time: Option<String>,
    /// Recover up to this LSN; chooses the newest backup that ended before it.
    #[arg(long, value_name = "LSN")]
    target_lsn: Option<String>,
    /// Recover up to this transaction id (uses the latest backup unless --backup says otherwise).
    #[arg(long, value_name = "XID")]
    target_xid: Option<String>,
    /// Recover up to this named restore point (uses the latest backup unless --backup says otherwise).
    #[arg(long, value_name = "NAME")]
    target_name: Option<String>,
    /// What the server does at the target.
    #[arg(long, value_enum, default_value = "promote", requires = "target")]
    target_action: TargetActionArg,
    /// Start as a standby (standby.signal) that keeps fetching WAL, instead of recovering and promoting.
    #[arg(long, conflicts_with = "target")]
    standby: bool,
    /// Replace whatever the directory holds (never needed on an empty or interrupted one).
    #[arg(long)]
    overwrite: bool,
    /// Fail (instead of exiting 0) when storage holds no backup.
    #[arg(long)]
    require_backup: bool,
    /// Bring the directory back to this mark: a cluster there is set aside (renamed to
    /// DIR.before-rollback-MARK, never deleted), the newest backup before the mark is restored
    /// and recovery stops at it; done once (recorded in storage), later runs restore as usual.
    #[arg(long, value_name = "MARK", conflicts_with_all = ["target", "standby", "overwrite"])]
    rollback_to: Option<String>,
    /// Moving into a new release: when this release's storage holds no backup of the cluster yet,
    /// first copy the backup to restore, its WAL, the history files and the marks from this other
    /// release's archive (only read), then restore from this release's storage.
    #[arg(long, value_name = "URL", conflicts_with_all = ["rollback_to", "standby"])]
    seed_from: Option<String>,
    /// Restore a tablespace at another place: OLD=NEW (repeatable).
    #[arg(long, value_name = "OLD=NEW")]
    tablespace_map: Vec<String>,
    /// The pgkeep executable restore_command should run (default: this one).
    #[arg(long, value_name = "PATH")]
    pgkeep_path: Option<PathBuf>,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum TargetActionArg {
    Promote,
    Pause,
    Shutdown,
}

fn restore_options(args: RestoreArgs, cfg: &Config) -> anyhow::Result<restore::RestoreOptions> {
    use anyhow::{Context, anyhow};
    use restore::{BackupChoice, RecoveryTarget, TargetAction};
    let target_dir = args
        .target_dir
        .or_else(|| cfg.pgdata.clone())
        .ok_or_else(|| anyhow!("no target directory: give --target-dir or set PGDATA"))?;
    let backup = match args.backup.as_str() {
        "latest" => BackupChoice::Latest,
        id => BackupChoice::Id(id.parse().map_err(|e: String| anyhow!("--backup: {e}"))?),
    };
    let target = if let Some(t) = &args.target_time {
        Some(RecoveryTarget::parse_time(t)?)
    } else if let Some(l) = &args.target_lsn {
        Some(RecoveryTarget::Lsn(l.parse().context("--target-lsn")?))
    } else if let Some(x) = &args.target_xid {
        Some(RecoveryTarget::parse_xid(x)?)
    } else {
        args.target_name.clone().map(RecoveryTarget::Name)
    };
    let tablespace_map = args
        .tablespace_map
        .iter()
        .map(|m| {
            let (old, new) = m
                .split_once('=')
                .filter(|(o, n)| o.starts_with('/') && n.starts_with('/'))
                .ok_or_else(|| {
                    anyhow!("--tablespace-map {m:?}: expected OLD=NEW with two absolute paths")
                })?;
            Ok((PathBuf::from(old), PathBuf::from(new)))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(restore::RestoreOptions {
        target_dir,
        backup,
        target,
        target_action: match args.target_action {
            TargetActionArg::Promote => TargetAction::Promote,
            TargetActionArg::Pause => TargetAction::Pause,
            TargetActionArg::Shutdown => TargetAction::Shutdown,
        },
        standby: args.standby,
        overwrite: args.overwrite,
        require_backup: args.require_backup,
        tablespace_map,
        pgkeep_path: args.pgkeep_path,
        rollback_to: args.rollback_to,
        seed_from: args
            .seed_from
            .as_deref()
            .map(|u| pgkeep::config::StorageUrl::parse(u).map_err(|e| anyhow!("--seed-from: {e}")))
            .transpose()?,
    })
}

async fn prune(cfg: &Config, dry_run: bool) -> anyhow::Result<pgkeep::retention::Plan> {
    let archive = pgkeep::cluster::open_archive(cfg).await?;
    pgkeep::retention::prune(cfg, &archive, dry_run).await
}

async fn inventory(cfg: &Config) -> anyhow::Result<list::Inventory> {
    list::inventory(&pgkeep::cluster::open_archive(cfg).await?).await
}

/// `pgkeep backup`: SIGTERM or Ctrl-C cancels it, and a cancelled backup leaves nothing listed.
async fn take_backup(
    cfg: &Config,
    mode: backup::BackupMode,
) -> anyhow::Result<pgkeep::storage::BackupMeta> {
    use tokio::signal::unix::{SignalKind, signal};
    let repo = pgkeep::storage::Repo::open(&cfg.storage_settings(), true)?;
    let cancel = tokio_util::sync::CancellationToken::new();
    let (mut term, mut int) = (
        signal(SignalKind::terminate())?,
        signal(SignalKind::interrupt())?,
    );
    let on_signal = cancel.clone();
    tokio::spawn(async move {
        for n in 0.. {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            if n > 0 {
                // A second signal: do not wait for the cleanup either.
                std::process::exit(130);
            }
            on_signal.cancel();
        }
    });
    backup::take_backup(cfg, &repo, &cancel, mode).await
}

/// glibc's malloc moves its mmap threshold up to 32 MiB after the first large free, after which our
/// 16 MiB chunk buffers come from (and fragment) the heap, and each thread may get an arena of its
/// own: both made peak memory grow with the size of the database. A fixed 1 MiB threshold and two
/// arenas keep it flat (measured with bench/backup_restore.py).
fn tune_malloc() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; called before any thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

/// The system allocator, with large blocks (chunks, segments, their decoded copies: 1 MiB to 64 MiB,
/// each a fresh mapping under the 1 MiB mmap threshold above) asking the kernel for transparent
/// huge pages (`MADV_HUGEPAGE`; the usual `madvise` mode of
/// `/sys/kernel/mm/transparent_hugepage/enabled` gives them only to regions that ask). Each 4 KB
/// page of a fresh mapping otherwise costs a page fault when first written: measured, a restore of
/// 704 MB holding 512 MB of random bytes spent a third of its time there (1.42 s without the
/// advice, 0.96 s with it, beside `tar -x` + sync at 0.90 s). The advice changes nothing else: the
/// same memory, the same allocator.
struct HugeBlocks;

/// Blocks at least this large are advised (a huge page is 2 MiB).
const HUGE_BLOCK: usize = 4 << 20;

impl HugeBlocks {
    fn advise(ptr: *mut u8, size: usize) {
        #[cfg(target_os = "linux")]
        {
            const HUGE: usize = 2 << 20;
            let start = (ptr as usize).next_multiple_of(HUGE);
            let end = (ptr as usize + size) & !(HUGE - 1);
            if end > start {
                // SAFETY: the range lies inside the block just allocated; madvise only sets advice
                // on its pages (a failure leaves them as they were).
                unsafe {
                    libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE);
                }
            }
        }
    }
}

// SAFETY: every call is passed to the system allocator unchanged; large blocks only get advice.
unsafe impl std::alloc::GlobalAlloc for HugeBlocks {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        // SAFETY: the caller's contract, passed on.
        let p = unsafe { std::alloc::System.alloc(layout) };
        if !p.is_null() && layout.size() >= HUGE_BLOCK {
            Self::advise(p, layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        // SAFETY: the caller's contract, passed on.
        let p = unsafe { std::alloc::System.alloc_zeroed(layout) };
        if !p.is_null() && layout.size() >= HUGE_BLOCK {
            Self::advise(p, layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        // SAFETY: the caller's contract, passed on.
        unsafe { std::alloc::System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller's contract, passed on.
        let p = unsafe { std::alloc::System.realloc(ptr, layout, new_size) };
        if !p.is_null() && new_size >= HUGE_BLOCK {
            Self::advise(p, new_size);
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: HugeBlocks = HugeBlocks;

fn main() -> ExitCode {
    tune_malloc();
    // What pgkeep creates (spool, prefetch cache, file:// objects, restored files) holds database
    // content: for its own user only, whatever umask the container runs with.
    // SAFETY: umask only sets the process's file mode mask.
    unsafe {
        libc::umask(0o077);
    }
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            // A usage error under restore_command must stop recovery, not end it.
            let is_fetch = std::env::args().skip(1).any(|a| a == "wal-fetch");
            return match (e.use_stderr(), is_fetch) {
                (false, _) => ExitCode::SUCCESS,
                (true, true) => ExitCode::from(EXIT_FETCH_FAILED),
                (true, false) => ExitCode::from(2),
            };
        }
    };
    if let Command::Keygen { output } = &cli.command {
        return keygen(output.as_deref());
    }
    let fail_code = match cli.command {
        Command::WalFetch { .. } => EXIT_FETCH_FAILED,
        Command::Verify { .. } => 2,
        _ => 1,
    };
    let mut cfg = match Config::from_process(cli.config.as_deref()) {
        Ok(cfg) => cfg,
        Err(e) => {
            eprintln!("pgkeep: {e}");
            return ExitCode::from(fail_code);
        }
    };
    if let Some(f) = cli.log_format {
        cfg.log_format = match f {
            LogFormatArg::Human => LogFormat::Human,
            LogFormatArg::Json => LogFormat::Json,
        };
    }
    pgkeep::logging::init(cfg.log_format, &cfg.log_level);
    // restore_command's fast path: a segment the daemon prefetched is taken from the hand-off
    // directory before any runtime starts; the ordinary fetch (one request at a time) needs no
    // more than one thread.
    let lean = matches!(
        cli.command,
        Command::WalFetch { .. } | Command::WalPrefetch { .. }
    );
    if let Command::WalFetch { name, dest } = &cli.command
        && pgkeep::wal::fetch::from_handoff(&cfg, name, dest).is_some()
    {
        return ExitCode::SUCCESS;
    }
    let runtime = match if lean {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
    } {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pgkeep: cannot start the async runtime: {e}");
            return ExitCode::from(fail_code);
        }
    };
    let code = runtime.block_on(run(cli.command, cfg));
    // Blocking work still running (an fsync of a cancelled upload) does not hold the exit up.
    runtime.shutdown_timeout(std::time::Duration::from_secs(2));
    code
}

/// A report on stdout: as JSON, or as its text.
fn print_report(json: bool, report: &impl serde::Serialize, text: impl FnOnce() -> String) {
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(report).expect("serialisable")
        );
    } else {
        print!("{}", text());
    }
}

/// `pgkeep verify`: 0 all restorable, 1 problems found, 2 could not check.
async fn verify(cfg: &Config, backup: Option<&str>, json: bool) -> ExitCode {
    let run = async {
        let only = match backup {
            Some(id) => Some(
                id.parse::<pgkeep::storage::layout::BackupId>()
                    .map_err(|e| anyhow::anyhow!("--backup: {e}"))?,
            ),
            None => None,
        };
        let archive = pgkeep::cluster::open_archive(cfg).await?;
        pgkeep::verify::verify(&archive, only.as_ref(), cfg.parallelism).await
    };
    match run.await {
        Ok(report) => {
            print_report(json, &report, || report.render());
            if report.ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => {
            tracing::error!("verify could not run: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// `pgkeep verify --restore-drill DIR`: 0 the drill passed, 1 it failed, 2 it could not run.
async fn restore_drill(cfg: &Config, dir: PathBuf, json: bool) -> ExitCode {
    let settings = pgkeep::drill::DrillSettings {
        dir,
        pg_bin_dir: cfg.pg_bin_dir.clone(),
        timeout: cfg.drill_timeout,
    };
    // Ctrl-C or SIGTERM (a CronJob's pod stopping): the drill stops its Postgres and cleans up.
    let cancel = tokio_util::sync::CancellationToken::new();
    tokio::spawn({
        let cancel = cancel.clone();
        async move {
            let Ok(mut term) =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            else {
                return;
            };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            tracing::warn!("signal received: stopping the drill and cleaning up");
            cancel.cancel();
        }
    });
    match pgkeep::drill::drill(cfg, &settings, &cancel).await {
        Ok(report) => {
            print_report(json, &report, || report.render());
            if report.ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => {
            tracing::error!("the restore drill could not run: {e}");
            ExitCode::from(2)
        }
    }
}

/// `pgkeep keygen`: needs no configuration.
fn keygen(output: Option<&std::path::Path>) -> ExitCode {
    let (file, recipient) = pgkeep::storage::crypt::generate();
    match output {
        None => print!("{file}"),
        Some(path) => {
            let written = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .and_then(|mut f| {
                    std::io::Write::write_all(&mut f, file.as_bytes())?;
                    f.sync_all()
                });
            if let Err(e) = written {
                eprintln!("pgkeep keygen: cannot create {}: {e}", path.display());
                return ExitCode::from(1);
            }
        }
    }
    eprintln!("Public key: {recipient}");
    ExitCode::SUCCESS
}

/// Logs a failed command's error and maps the result to an exit code.
fn done<T>(what: &str, result: anyhow::Result<T>, ok: impl FnOnce(T)) -> ExitCode {
    match result {
        Ok(v) => {
            ok(v);
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!("{what}: {e:#}");
            ExitCode::from(1)
        }
    }
}

async fn run(command: Command, cfg: Config) -> ExitCode {
    match command {
        Command::Daemon => done("daemon", pgkeep::daemon::run(cfg).await, |_| {}),
        Command::WalSwitch { timeout } => {
            let wait = std::time::Duration::from_secs(timeout);
            let result = pgkeep::wal::switch::switch_and_wait(&cfg, wait, || {
                pgkeep::wal::switch::daemon_durable(&cfg)
            })
            .await;
            done("wal-switch", result, |_| {})
        }
        Command::Prune { dry_run } => done("prune failed", prune(&cfg, dry_run).await, |plan| {
            print!("{}", pgkeep::retention::render(&plan, dry_run))
        }),
        Command::Backup { incremental, full } => {
            let mode = match (incremental, full) {
                (true, _) => backup::BackupMode::Incremental,
                (_, true) => backup::BackupMode::Full,
                _ => backup::BackupMode::Scheduled,
            };
            done("backup failed", take_backup(&cfg, mode).await, |meta| {
                println!("{}", meta.id)
            })
        }
        Command::Mark {
            name,
            note,
            timeout,
            json,
            exists_ok,
            expect_major,
        } => {
            let opts = pgkeep::mark::MarkOptions {
                note,
                timeout: std::time::Duration::from_secs(timeout),
                exists_ok,
                expect_major,
            };
            let result = async {
                let repo = pgkeep::storage::Repo::open(&cfg.storage_settings(), true)?;
                pgkeep::mark::take_mark(&cfg, &repo, &name, &opts).await
            }
            .await;
            done("mark failed", result, |m| {
                print_report(json, &m, || {
                    format!("{} {} {}\n", m.name, m.lsn, m.timeline)
                })
            })
        }
        Command::List { json } => {
            let mut damaged = false;
            let code = done("list failed", inventory(&cfg).await, |inv| {
                if json {
                    println!(
                        "{}",
                        serde_json::to_string_pretty(&inv).expect("serialisable")
                    );
                } else {
                    print!("{}", list::render(&inv));
                }
                for d in &inv.damaged {
                    tracing::error!("damaged backup metadata: {d}");
                }
                damaged = !inv.damaged.is_empty();
            });
            // The others are listed; a damaged one is still a failure to see.
            if damaged { ExitCode::from(1) } else { code }
        }
        Command::Verify {
            restore_drill: Some(dir),
            json,
            ..
        } => restore_drill(&cfg, dir, json).await,
        Command::Verify { backup, json, .. } => verify(&cfg, backup.as_deref(), json).await,
        Command::Keygen { .. } => unreachable!("handled before the configuration is read"),
        Command::Restore(args) => {
            let result = match restore_options(args, &cfg) {
                Ok(opts) => restore::restore(&cfg, &opts).await,
                Err(e) => Err(e),
            };
            done("restore failed", result, |_| {})
        }
        Command::ArchivePush { path } => {
            let result = archive::archive_push(&cfg, &path).await;
            done(&format!("archive-push {}", path.display()), result, |_| {})
        }
        Command::WalPrefetch {
            after,
            system_identifier,
            segment_bytes,
            token_stamp,
        } => {
            let result = pgkeep::wal::helper::run(
                &cfg,
                &after,
                system_identifier,
                segment_bytes,
                token_stamp,
            )
            .await;
            done("wal-prefetch", result, |_| {})
        }
        Command::WalFetch { name, dest } => match fetch::wal_fetch(&cfg, &name, &dest).await {
            Ok(report) => {
                // No daemon prefetches: a helper of wal-fetch's own does, from here on.
                if let Some(sysid) = report.from_storage {
                    pgkeep::wal::helper::after_storage_fetch(
                        &cfg,
                        &report.name,
                        sysid,
                        report.bytes,
                    );
                }
                ExitCode::SUCCESS
            }
            Err(FetchError::NotInArchive(n)) => {
                tracing::info!(wal = %n, "not in the archive");
                ExitCode::from(EXIT_NOT_IN_ARCHIVE)
            }
            Err(FetchError::Failed(e)) => {
                tracing::error!("wal-fetch {name}: {e:#}");
                ExitCode::from(EXIT_FETCH_FAILED)
            }
        },
    }
}
