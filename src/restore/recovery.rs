//! The recovery settings a restore leaves for Postgres: `restore_command` (this pgkeep with the
//! same settings, never a secret), the recovery target, and the signal file.

use std::path::Path;

use anyhow::{Context, bail};
use chrono::Utc;

use crate::config::Config;
use crate::fsutil;
use crate::storage::BackupMeta;

use super::{RecoveryTarget, RestoreOptions, TargetAction};

/// Quotes a word for the shell `restore_command` runs in.
fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_./:=@,+-%".contains(&b))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// A value in postgresql.conf quotes: `'` doubled and `\` escaped, as Postgres' configuration
/// parser reads them back. A control character (a newline would start a setting of its own) is
/// refused: no legitimate value holds one.
fn guc_quote(what: &str, s: &str) -> anyhow::Result<String> {
    if let Some(c) = s.chars().find(|c| c.is_control()) {
        bail!("{what} {s:?} holds the control character {c:?}, which a setting may not hold");
    }
    Ok(format!("'{}'", s.replace('\\', "\\\\").replace('\'', "''")))
}

/// The restore_command that fetches through pgkeep with the same configuration this restore used.
/// The Postgres connection (`PGKEEP_PG`, which may hold a password) is left out: wal-fetch does not
/// connect to Postgres, and postgresql.auto.conf and Postgres' log must not hold a secret. Each
/// word is quoted for the shell, and `%` doubled so that Postgres replaces only `%f` and `%p`.
pub fn restore_command(cfg: &Config, pgkeep: &Path) -> String {
    let mut words: Vec<String> = cfg
        .env_settings
        .iter()
        .filter(|(k, _)| k != "PGKEEP_PGDATA" && k != "PGKEEP_PG")
        .map(|(k, v)| format!("{k}={}", shell_quote(v)))
        .collect();
    words.push(shell_quote(&pgkeep.to_string_lossy()));
    if let Some(f) = &cfg.file {
        words.push("--config".into());
        words.push(shell_quote(&f.to_string_lossy()));
    }
    let words: Vec<String> = words.iter().map(|w| w.replace('%', "%%")).collect();
    format!("{} wal-fetch %f %p", words.join(" "))
}

pub(super) fn write_recovery_settings(
    cfg: &Config,
    opts: &RestoreOptions,
    meta: &BackupMeta,
    dir: &Path,
) -> anyhow::Result<()> {
    let pgkeep = match &opts.pgkeep_path {
        Some(p) => p.clone(),
        None => std::env::current_exe().context("finding the pgkeep executable")?,
    };
    // A mark is on its own timeline: 'latest' could follow a later timeline that branched off
    // before it, where the same LSN holds other data.
    let timeline = match &opts.target {
        Some(RecoveryTarget::Mark { timeline, .. }) => format!("'{}'", timeline.get()),
        _ => "'latest'".to_string(),
    };
    let mut conf = format!(
        "\n# Added by pgkeep restore of backup {} at {}\nrestore_command = {}\nrecovery_target_timeline = {timeline}\n",
        meta.id,
        Utc::now().to_rfc3339(),
        guc_quote("restore_command", &restore_command(cfg, &pgkeep))?
    );
    if let Some(t) = &opts.target {
        let (key, value) = match t {
            RecoveryTarget::Time { text, .. } => ("recovery_target_time", text.clone()),
            RecoveryTarget::Lsn(l) => ("recovery_target_lsn", l.to_string()),
            RecoveryTarget::Xid(x) => ("recovery_target_xid", x.clone()),
            RecoveryTarget::Name(n) => ("recovery_target_name", n.clone()),
            // Everything before the LSN where the restore point record ends, nothing after:
            // recovery stops before the first record that starts there.
            RecoveryTarget::Mark { name, lsn, .. } => {
                conf.push_str(&format!(
                    "# the mark {}\nrecovery_target_inclusive = off\n",
                    guc_quote("mark", name)?
                ));
                ("recovery_target_lsn", lsn.to_string())
            }
        };
        let action = match opts.target_action {
            TargetAction::Promote => "promote",
            TargetAction::Pause => "pause",
            TargetAction::Shutdown => "shutdown",
        };
        conf.push_str(&format!(
            "{key} = {}\nrecovery_target_action = '{action}'\n",
            guc_quote(key, &value)?
        ));
    }
    let auto = dir.join("postgresql.auto.conf");
    // The backup's own ALTER SYSTEM settings stay: only a missing file starts empty.
    let text = match std::fs::read_to_string(&auto) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e).with_context(|| format!("reading {}", auto.display())),
    };
    let mut text = drop_recovery_settings(&text);
    text.push_str(&conf);
    fsutil::write_atomic(&auto, text.as_bytes())?;
    let signal = if opts.standby {
        "standby.signal"
    } else {
        "recovery.signal"
    };
    fsutil::write_atomic(&dir.join(signal), b"")?;
    Ok(())
}

/// The settings an earlier restore wrote (the backup's cluster may itself have been restored,
/// to a point in time or a mark): kept, they would steer this recovery to that old target.
const RECOVERY_KEYS: &[&str] = &[
    "restore_command",
    "recovery_target",
    "recovery_target_time",
    "recovery_target_lsn",
    "recovery_target_xid",
    "recovery_target_name",
    "recovery_target_inclusive",
    "recovery_target_timeline",
    "recovery_target_action",
];

/// `postgresql.auto.conf` without recovery settings and pgkeep's comments on them; every other
/// line (ALTER SYSTEM's) as it was.
fn drop_recovery_settings(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        let t = line.trim_start();
        let key = t
            .split(['=', ' ', '\t'])
            .next()
            .unwrap_or("")
            .to_ascii_lowercase();
        let pgkeep_comment =
            t.starts_with("# Added by pgkeep restore") || t.starts_with("# the mark ");
        if RECOVERY_KEYS.contains(&key.as_str()) || pgkeep_comment {
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_earlier_restores_settings_go_and_alter_system_stays() {
        let earlier = "# Do not edit this file manually!\nwork_mem = '64MB'\n\n# Added by pgkeep restore of backup X at T\nrestore_command = 'pgkeep wal-fetch %f %p'\nrecovery_target_timeline = '1'\n# the mark 'm'\nrecovery_target_inclusive = off\nrecovery_target_lsn = '0/5000000'\nrecovery_target_action = 'promote'\nRecovery_Target_Time='x'\n";
        let kept = drop_recovery_settings(earlier);
        assert_eq!(
            kept,
            "# Do not edit this file manually!\nwork_mem = '64MB'\n\n"
        );
    }

    #[test]
    fn restore_command_carries_the_settings_but_no_secret() {
        let env = [
            ("PGKEEP_STORAGE", "s3://bucket/with space"),
            ("PGKEEP_PG", "host=db password=hunter2"),
            ("PGKEEP_PGDATA", "/pgdata"),
            ("PGKEEP_LISTEN", "127.0.0.1:16001"),
        ];
        let cfg = Config::load(
            None,
            env.iter().map(|(k, v)| (k.to_string(), v.to_string())),
        )
        .unwrap();
        let cmd = restore_command(&cfg, Path::new("/usr/local/bin/pgkeep"));
        assert_eq!(
            cmd,
            "PGKEEP_STORAGE='s3://bucket/with space' PGKEEP_LISTEN=127.0.0.1:16001 /usr/local/bin/pgkeep wal-fetch %f %p"
        );
        assert!(!cmd.contains("hunter2"));
    }

    #[test]
    fn shell_and_guc_quoting() {
        assert_eq!(shell_quote("/usr/bin/pgkeep"), "/usr/bin/pgkeep");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), "'it'\\''s'");
        assert_eq!(guc_quote("x", "it's").unwrap(), "'it''s'");
        assert_eq!(guc_quote("x", r"C:\tmp").unwrap(), r"'C:\\tmp'");
        // The injection of a second setting through a target name.
        let evil = "rp1\\'\nrestore_command = /path/to/evil.sh #";
        let err = guc_quote("recovery_target_name", evil)
            .unwrap_err()
            .to_string();
        assert!(err.contains("control character"), "{err}");
    }

    #[test]
    fn percent_signs_reach_the_shell_as_themselves() {
        let cfg = Config::load(
            None,
            [("PGKEEP_STORAGE".to_string(), "file:///srv/100%".to_string())],
        )
        .unwrap();
        let cmd = restore_command(&cfg, Path::new("/opt/50%/pgkeep"));
        assert_eq!(
            cmd,
            "PGKEEP_STORAGE=file:///srv/100%% /opt/50%%/pgkeep wal-fetch %f %p"
        );
    }
}
