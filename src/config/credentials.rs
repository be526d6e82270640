//! `credentials_dir`: credentials as files, one per variable, as a Kubernetes Secret mounted as a
//! volume holds them. A file named `AWS_SECRET_ACCESS_KEY` gives what the variable of that name
//! would; the file wins over the variable. Files keep credentials out of the environment, which
//! every child process inherits and `/proc/<pid>/environ` shows.

use std::path::Path;

use super::ConfigError;
use crate::storage::settings::{CloudScheme, StorageUrl};

/// The longest credential file read (a service-account key is a few KiB).
const MAX_FILE: u64 = 64 << 10;

/// The variables a credential file may stand for: the Postgres password and the clouds' own.
const PREFIXES: &[&str] = &["AWS_", "GOOGLE_", "AZURE_"];

/// Credentials read from `credentials_dir` (name, value). Never printed: `Debug` names only.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Credentials(Vec<(String, String)>);

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.0.iter().map(|(n, _)| n))
            .finish()
    }
}

impl Credentials {
    /// The value a file gave `name`.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The storage client options for `url`'s cloud: its own variables, by `object_store`'s key
    /// names (`AWS_SECRET_ACCESS_KEY` is `aws_secret_access_key`).
    pub fn storage_options(&self, url: &StorageUrl) -> Vec<(String, String)> {
        let prefix = match url {
            StorageUrl::File { .. } => return vec![],
            StorageUrl::Cloud { scheme, .. } => match scheme {
                CloudScheme::S3 => "AWS_",
                CloudScheme::Gcs => "GOOGLE_",
                CloudScheme::Azure => "AZURE_",
            },
        };
        self.0
            .iter()
            .filter(|(n, _)| n.starts_with(prefix))
            .map(|(n, v)| (n.to_ascii_lowercase(), v.clone()))
            .collect()
    }

    /// Refuses a file for `url`'s cloud that its client does not know (`AWS_PROFILE`, a typo):
    /// named now, not as a failure to open storage later.
    pub fn check_for(&self, url: &StorageUrl) -> Result<(), String> {
        use object_store::aws::AmazonS3ConfigKey;
        use object_store::azure::AzureConfigKey;
        use object_store::gcp::GoogleConfigKey;
        for (key, _) in self.storage_options(url) {
            let known = match url {
                StorageUrl::Cloud {
                    scheme: CloudScheme::S3,
                    ..
                } => key.parse::<AmazonS3ConfigKey>().is_ok(),
                StorageUrl::Cloud {
                    scheme: CloudScheme::Gcs,
                    ..
                } => key.parse::<GoogleConfigKey>().is_ok(),
                StorageUrl::Cloud {
                    scheme: CloudScheme::Azure,
                    ..
                } => key.parse::<AzureConfigKey>().is_ok(),
                StorageUrl::File { .. } => true,
            };
            if !known {
                return Err(format!(
                    "{} is not a setting of the storage client for {url} (a typo, or a variable \
                     only other tools read): remove that file",
                    key.to_ascii_uppercase()
                ));
            }
        }
        Ok(())
    }

    /// Reads every credential file in `dir` (`origin` says where the setting came from). Names
    /// starting with `.` are skipped (a Secret volume's `..data` links); every other entry must be
    /// a file (or a link to one) named like a variable pgkeep reads.
    pub fn read_dir(dir: &Path, origin: &str) -> Result<Credentials, ConfigError> {
        let bad = |message: String| ConfigError {
            origin: origin.to_string(),
            message,
        };
        let entries = std::fs::read_dir(dir)
            .map_err(|e| bad(format!("cannot read the directory {}: {e}", dir.display())))?;
        let mut out = vec![];
        for entry in entries {
            let entry = entry.map_err(|e| bad(format!("reading {}: {e}", dir.display())))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else {
                return Err(bad(format!(
                    "{}: a file name that is not UTF-8",
                    dir.display()
                )));
            };
            if name.starts_with('.') {
                continue;
            }
            let allowed = name == "PGPASSWORD"
                || PREFIXES.iter().any(|p| {
                    name.strip_prefix(p).is_some_and(|rest| {
                        !rest.is_empty()
                            && rest
                                .bytes()
                                .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
                    })
                });
            if !allowed {
                return Err(bad(format!(
                    "{}: {name:?} is not a credential pgkeep reads (PGPASSWORD, or a variable \
                     starting with AWS_, GOOGLE_ or AZURE_)",
                    dir.display()
                )));
            }
            let path = entry.path();
            let meta =
                std::fs::metadata(&path).map_err(|e| bad(format!("{}: {e}", path.display())))?;
            if !meta.is_file() {
                return Err(bad(format!("{} is not a file", path.display())));
            }
            if meta.len() > MAX_FILE {
                return Err(bad(format!(
                    "{} holds {} bytes, more than a credential ({MAX_FILE} at most)",
                    path.display(),
                    meta.len()
                )));
            }
            let text = std::fs::read(&path)
                .map_err(|e| bad(format!("cannot read {}: {e}", path.display())))?;
            let mut text = String::from_utf8(text)
                .map_err(|_| bad(format!("{} is not UTF-8 text", path.display())))?;
            // One line ending, as `echo` or an editor leaves it, is not part of the value.
            if text.ends_with('\n') {
                text.pop();
                if text.ends_with('\r') {
                    text.pop();
                }
            }
            if text.contains(['\0', '\n', '\r']) {
                return Err(bad(format!(
                    "{} holds a line break or NUL inside its value",
                    path.display()
                )));
            }
            out.push((name.to_string(), text));
        }
        out.sort();
        Ok(Credentials(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_secret_volume_and_refuses_strangers() {
        let d = tempfile::tempdir().unwrap();
        // A Secret volume: ..data links to a timestamped folder, each key a link into ..data.
        let data = d.path().join("..2026_12_02");
        std::fs::create_dir(&data).unwrap();
        std::fs::write(data.join("AWS_SECRET_ACCESS_KEY"), "s3cr3t\n").unwrap();
        std::fs::write(data.join("PGPASSWORD"), "pw with spaces ").unwrap();
        std::os::unix::fs::symlink("..2026_12_02", d.path().join("..data")).unwrap();
        for n in ["AWS_SECRET_ACCESS_KEY", "PGPASSWORD"] {
            std::os::unix::fs::symlink(format!("..data/{n}"), d.path().join(n)).unwrap();
        }
        let c = Credentials::read_dir(d.path(), "credentials_dir").unwrap();
        assert_eq!(c.get("AWS_SECRET_ACCESS_KEY"), Some("s3cr3t"));
        assert_eq!(c.get("PGPASSWORD"), Some("pw with spaces "));
        let dbg = format!("{c:?}");
        assert!(!dbg.contains("s3cr3t") && dbg.contains("AWS_SECRET_ACCESS_KEY"));
        let s3 = StorageUrl::parse("s3://b/p").unwrap();
        assert_eq!(
            c.storage_options(&s3),
            vec![("aws_secret_access_key".to_string(), "s3cr3t".to_string())]
        );
        let gcs = StorageUrl::parse("gs://b/p").unwrap();
        assert!(c.storage_options(&gcs).is_empty());
        c.check_for(&s3).unwrap();
        let odd = Credentials(vec![("AWS_PROFILE".into(), "x".into())]);
        let e = odd.check_for(&s3).unwrap_err();
        assert!(e.contains("AWS_PROFILE is not a setting"), "{e}");
        odd.check_for(&gcs).unwrap();

        std::fs::write(d.path().join("HOME"), "x").unwrap();
        let e = Credentials::read_dir(d.path(), "credentials_dir").unwrap_err();
        assert!(
            e.to_string().contains("\"HOME\" is not a credential"),
            "{e}"
        );
        std::fs::remove_file(d.path().join("HOME")).unwrap();
        std::fs::write(d.path().join("AWS_REGION"), "a\nb").unwrap();
        let e = Credentials::read_dir(d.path(), "credentials_dir").unwrap_err();
        assert!(e.to_string().contains("line break"), "{e}");
        let e = Credentials::read_dir(&d.path().join("nope"), "credentials_dir").unwrap_err();
        assert!(e.to_string().contains("cannot read the directory"), "{e}");
    }
}
