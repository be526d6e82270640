//! What pgkeep reads from a data directory without a connection: the system identifier in
//! `global/pg_control` (its first field, `ControlFileData.system_identifier`).

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

/// The control file's path inside a data directory.
pub fn control_file(pgdata: &Path) -> PathBuf {
    pgdata.join("global").join("pg_control")
}

/// The system identifier of the cluster in `pgdata`, or `None` when `pgdata` holds no cluster.
pub fn system_identifier(pgdata: &Path) -> anyhow::Result<Option<u64>> {
    let path = control_file(pgdata);
    let data = match std::fs::read(&path) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    if data.len() < 16 {
        bail!(
            "{} is only {} bytes: not a Postgres control file",
            path.display(),
            data.len()
        );
    }
    let sysid = u64::from_le_bytes(data[0..8].try_into().unwrap());
    let version = u32::from_le_bytes(data[8..12].try_into().unwrap());
    // pg_control_version is 1300 from Postgres 13 through 16, 1700 in 17, 1800 in 18.
    if !(1300..2000).contains(&version) || sysid == 0 {
        bail!(
            "{} does not look like a control file of a supported Postgres (version field {version})",
            path.display()
        );
    }
    Ok(Some(sysid))
}
