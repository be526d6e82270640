//! Which cluster a command works on: the `system_identifier` setting, else the data directory's
//! control file, else (for commands that only read) the only cluster in storage.

use std::path::PathBuf;

use anyhow::{Context, bail};

use crate::config::Config;
use crate::pg::control;
use crate::storage::{Archive, Repo};

/// The system identifier of the data directory's cluster: the configured data directory, or the
/// current directory, where Postgres runs `archive_command` and `restore_command`.
pub fn local_system_identifier(cfg: &Config) -> anyhow::Result<Option<(u64, PathBuf)>> {
    let dir = match &cfg.pgdata {
        Some(p) => p.clone(),
        None => std::env::current_dir().context("reading the current directory")?,
    };
    Ok(control::system_identifier(&dir)?.map(|id| (id, dir)))
}

/// The cluster to read: the setting, else the data directory's control file, else the only
/// cluster in storage (several are an error that lists them).
pub async fn resolve_system_identifier(cfg: &Config, repo: &Repo) -> anyhow::Result<u64> {
    if let Some(id) = cfg.system_identifier {
        return Ok(id);
    }
    if let Some((id, _)) = local_system_identifier(cfg)? {
        return Ok(id);
    }
    resolve_from_storage(repo).await
}

/// Opens the configured storage for reading (it must hold a pgkeep archive) and the archive of
/// the cluster this command works on.
pub async fn open_archive(cfg: &Config) -> anyhow::Result<Archive> {
    open_archive_with(cfg, &cfg.storage_settings()).await
}

/// As [`open_archive`], with other storage settings (other retry bounds).
pub async fn open_archive_with(
    cfg: &Config,
    settings: &crate::storage::StorageSettings,
) -> anyhow::Result<Archive> {
    let repo = Repo::open(settings, false)?;
    repo.check_format().await?;
    let system_identifier = resolve_system_identifier(cfg, &repo).await?;
    Ok(Archive::new(repo, system_identifier))
}

/// The only cluster in storage.
pub async fn resolve_from_storage(repo: &Repo) -> anyhow::Result<u64> {
    match repo.clusters().await?.as_slice() {
        [only] => Ok(*only),
        [] => bail!("storage {} holds no cluster's archive", repo.url()),
        many => bail!(
            "storage {} holds the archives of {} clusters ({}): set system_identifier to choose one",
            repo.url(),
            many.len(),
            many.iter()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}
