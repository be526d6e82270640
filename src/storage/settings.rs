//! Where the object store is and how to talk to it: the storage URL (`storage` setting) and the
//! retry bounds. The configuration builds these; the storage layer needs nothing else of it.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

/// What [`super::Repo::open`] needs.
#[derive(Clone, PartialEq, Eq)]
pub struct StorageSettings {
    pub url: StorageUrl,
    pub retry: RetrySettings,
    /// Read every uploaded object back and compare it before acknowledging it.
    pub verify_uploads: bool,
    /// Cloud client settings by `object_store`'s key names (`aws_endpoint`,
    /// `azure_storage_account_key`, ...), applied over what the cloud's standard environment
    /// variables say. Empty from the configuration; tests and embedders name a store here
    /// without touching the process environment.
    pub options: Vec<(String, String)>,
    /// Client-side encryption of database content.
    pub encryption: super::crypt::EncryptionSettings,
}

/// Option values may be credentials: only their names are shown.
impl fmt::Debug for StorageSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StorageSettings")
            .field("url", &self.url)
            .field("retry", &self.retry)
            .field("verify_uploads", &self.verify_uploads)
            .field(
                "options",
                &self.options.iter().map(|(k, _)| k).collect::<Vec<_>>(),
            )
            .field("encryption", &self.encryption)
            .finish()
    }
}

/// Where the object store is, parsed from `storage`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StorageUrl {
    /// `file:///path`: a directory on this machine.
    File { root: PathBuf },
    /// `s3://bucket/prefix`, `gs://bucket/prefix`, `az://container/prefix`.
    Cloud {
        scheme: CloudScheme,
        bucket: String,
        /// Without leading or trailing slashes; may be empty.
        prefix: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloudScheme {
    S3,
    Gcs,
    Azure,
}

impl fmt::Display for StorageUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StorageUrl::File { root } => write!(f, "file://{}", root.display()),
            StorageUrl::Cloud {
                scheme,
                bucket,
                prefix,
            } => {
                let s = match scheme {
                    CloudScheme::S3 => "s3",
                    CloudScheme::Gcs => "gs",
                    CloudScheme::Azure => "az",
                };
                write!(f, "{s}://{bucket}/{prefix}")
            }
        }
    }
}

impl StorageUrl {
    pub fn parse(text: &str) -> Result<StorageUrl, String> {
        // Checked on the raw text: URL parsing would silently resolve them.
        if text.split(['/', '?', '#']).any(|p| p == "." || p == "..") {
            return Err(format!(
                "{text:?}: the path may not contain '.' or '..' parts"
            ));
        }
        let url = url::Url::parse(text).map_err(|e| format!("{text:?} is not a URL ({e})"))?;
        if !url.username().is_empty() || url.password().is_some() {
            return Err("credentials do not belong in the storage URL: use the cloud's standard \
                        environment variables (AWS_ACCESS_KEY_ID, GOOGLE_SERVICE_ACCOUNT, AZURE_STORAGE_ACCOUNT_KEY, ...)"
                .into());
        }
        if url.query().is_some() || url.fragment().is_some() {
            return Err(format!(
                "{text:?}: a storage URL takes no query or fragment"
            ));
        }
        let scheme = match url.scheme() {
            "file" => {
                if !text.starts_with("file://") {
                    return Err(format!(
                        "{text:?}: write a local path as file:///absolute/path"
                    ));
                }
                if url
                    .host_str()
                    .is_some_and(|h| !h.is_empty() && h != "localhost")
                {
                    return Err(format!(
                        "{text:?}: a file:// URL names a local path, like file:///var/lib/pgkeep"
                    ));
                }
                let root = url
                    .to_file_path()
                    .map_err(|_| format!("{text:?} is not an absolute local path"))?;
                return Ok(StorageUrl::File { root });
            }
            "s3" => CloudScheme::S3,
            "gs" => CloudScheme::Gcs,
            "az" => CloudScheme::Azure,
            other => {
                return Err(format!(
                    "unsupported scheme {other:?} in {text:?}: use file:///path, s3://bucket/prefix, \
                     gs://bucket/prefix or az://container/prefix"
                ));
            }
        };
        let bucket = url.host_str().unwrap_or("").to_string();
        if bucket.is_empty() {
            return Err(format!("{text:?} names no bucket or container"));
        }
        let prefix = url.path().trim_matches('/').to_string();
        if prefix.contains("//") {
            return Err(format!("{text:?}: the prefix may not contain empty parts"));
        }
        Ok(StorageUrl::Cloud {
            scheme,
            bucket,
            prefix,
        })
    }
}

/// Retries of storage requests. This is the one layer that retries them (inside `object_store`'s
/// client for cloud stores); bounded both in attempts and in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetrySettings {
    pub max_retries: usize,
    /// No retry starts after this much time since the first attempt.
    pub retry_timeout: Duration,
    /// Each request's own timeout.
    pub request_timeout: Duration,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn storage_urls() {
        for (text, ok) in [
            ("file:///var/lib/x", true),
            ("s3://b", true),
            ("gs://b/p/q", true),
            ("az://container/p", true),
            ("file://host/x", false),
            ("file:relative", false),
            ("file:///a/../b", false),
            ("s3:///prefix", false),
            ("s3://b/a/../c", false),
            ("s3://key:secret@bucket/p", false),
            ("s3://b/p?x=1", false),
            ("http://example/x", false),
            ("/var/lib/x", false),
            ("", false),
        ] {
            assert_eq!(StorageUrl::parse(text).is_ok(), ok, "{text:?}");
        }
        let secret = StorageUrl::parse("s3://AKIA:hunter2@bucket/p").unwrap_err();
        assert!(!secret.contains("hunter2"), "a secret was echoed: {secret}");
    }
}
