//! The `pgkeep` binary: parses arguments, sets up logging, runs one command, maps the result to an
//! exit code. Everything else is in the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use pgkeep::config::{Config, LogFormat};
use pgkeep::wal::archive::{self, FetchError};

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
}

fn main() -> ExitCode {
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
    let fail_code = match cli.command {
        Command::WalFetch { .. } => EXIT_FETCH_FAILED,
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
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pgkeep: cannot start the async runtime: {e}");
            return ExitCode::from(fail_code);
        }
    };
    runtime.block_on(async {
        match cli.command {
            Command::ArchivePush { path } => match archive::archive_push(&cfg, &path).await {
                Ok(_) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("archive-push {}: {e:#}", path.display());
                    ExitCode::from(1)
                }
            },
            Command::WalFetch { name, dest } => {
                match archive::wal_fetch(&cfg, &name, &dest).await {
                    Ok(_) => ExitCode::SUCCESS,
                    Err(FetchError::NotInArchive(n)) => {
                        tracing::info!(wal = %n, "not in the archive");
                        ExitCode::from(EXIT_NOT_IN_ARCHIVE)
                    }
                    Err(FetchError::Failed(e)) => {
                        tracing::error!("wal-fetch {name}: {e:#}");
                        ExitCode::from(EXIT_FETCH_FAILED)
                    }
                }
            }
        }
    })
}
