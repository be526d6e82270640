//! Reading and writing objects: every write is read back and verified before it is acknowledged,
//! every read is verified before its content is used, and local files are fsynced.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::TryStreamExt;
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::azure::{AzureConfigKey, MicrosoftAzureBuilder};
use object_store::gcp::{GoogleCloudStorageBuilder, GoogleConfigKey};
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::prefix::PrefixStore;
use object_store::{
    BackoffConfig, ClientConfigKey, ObjectStore, ObjectStoreExt, PutPayload, RetryConfig,
};

use super::crypt::{Keys, OpenError};
use super::object::{self, Header};
use super::settings::{CloudScheme, StorageSettings, StorageUrl};
use crate::codec::Codec;

/// A storage failure. [`StorageError::is_permanent`] says whether trying again could help; transport
/// errors have already been retried (within the configured bounds) by the time they surface here.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("{key}: not found in storage")]
    NotFound { key: String },
    #[error("{key}: corrupted object in storage: {reason}")]
    Corrupt { key: String, reason: String },
    #[error(
        "{key}: refusing to overwrite: storage already holds different content under this name \
         (stored {stored_len} bytes, sha256 {stored_sha}; new {new_len} bytes, sha256 {new_sha})"
    )]
    Conflict {
        key: String,
        stored_len: u64,
        stored_sha: String,
        new_len: u64,
        new_sha: String,
    },
    /// Intact, but encrypted to keys this process holds no identity for.
    #[error("{key}: {reason}")]
    Locked { key: String, reason: String },
    #[error("{key}: the uploaded object did not read back identically ({reason})")]
    VerifyFailed { key: String, reason: String },
    #[error("{key}: {op} failed: {}", tidy(&cause.to_string()))]
    Backend {
        key: String,
        op: &'static str,
        // Not a `source` (thiserror would make it one, and `{:#}` would print the chain twice):
        // object_store's message already carries its whole chain.
        cause: object_store::Error,
    },
    #[error("storage {url}: {message}")]
    Setup { url: String, message: String },
    /// No credentials configured, and the instance metadata service gave none: maybe for good
    /// (not on a cloud VM), maybe for a moment (the service did not answer), so not permanent.
    #[error("storage {url}: {message}")]
    NoCredentials { url: String, message: String },
}

/// A storage client's message as it is worth reading: credentials in URLs redacted, and the parts
/// its chain of sources repeats said once ("…: No space left on device (os error 28): Generic
/// LocalFileSystem error: …: No space left on device (os error 28)" reads as its first half).
pub fn tidy(text: &str) -> String {
    let redacted = redact_userinfo(text);
    let mut seen: Vec<&str> = vec![];
    for part in redacted.split(": ") {
        let part = part.trim();
        if !part.is_empty() && !seen.contains(&part) {
            seen.push(part);
        }
    }
    seen.join(": ")
}

/// `scheme://user:password@host` in a message becomes `scheme://***@host`: an endpoint setting
/// with credentials in it (`AWS_ENDPOINT`) must not reach a log.
pub fn redact_userinfo(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("://") {
        let (head, tail) = rest.split_at(i + 3);
        out.push_str(head);
        let authority_end = tail
            .find(|c: char| c == '/' || c == '?' || c == '#' || c.is_whitespace() || c == '"')
            .unwrap_or(tail.len());
        match tail[..authority_end].rfind('@') {
            Some(at) => {
                out.push_str("***");
                rest = &tail[at..];
            }
            None => rest = tail,
        }
    }
    out.push_str(rest);
    out
}

impl StorageError {
    /// Whether repeating the same operation cannot succeed.
    pub fn is_permanent(&self) -> bool {
        !matches!(
            self,
            StorageError::Backend { .. }
                | StorageError::VerifyFailed { .. }
                | StorageError::NoCredentials { .. }
        )
    }

    fn backend(key: &Path, op: &'static str, source: object_store::Error) -> StorageError {
        match source {
            object_store::Error::NotFound { .. } => StorageError::NotFound {
                key: key.to_string(),
            },
            cause => StorageError::Backend {
                key: key.to_string(),
                op,
                cause,
            },
        }
    }
}

/// Whether an S3 client built from `b` gets its credentials from the instance metadata service,
/// none being configured (the last of object_store's sources).
/// Whether this S3 client signs each request's payload: the store then checks the body it receives
/// against the SHA-256 in the signature and refuses one that differs, so an acknowledged PUT holds
/// exactly the bytes sent (and a read-back of the whole object would only repeat that check).
fn signs_payload(b: &AmazonS3Builder) -> bool {
    let on = |k: AmazonS3ConfigKey| {
        b.get_config_value(&k)
            .is_some_and(|v| v.eq_ignore_ascii_case("true"))
    };
    !on(AmazonS3ConfigKey::SkipSignature) && !on(AmazonS3ConfigKey::UnsignedPayload)
}

fn asks_instance_metadata(b: &AmazonS3Builder) -> bool {
    let set = |k: AmazonS3ConfigKey| b.get_config_value(&k).is_some_and(|v| !v.is_empty());
    let unsigned = b
        .get_config_value(&AmazonS3ConfigKey::SkipSignature)
        .is_some_and(|v| v.eq_ignore_ascii_case("true"));
    !(unsigned
        || set(AmazonS3ConfigKey::AccessKeyId)
        || set(AmazonS3ConfigKey::SecretAccessKey)
        || (set(AmazonS3ConfigKey::WebIdentityTokenFile) && set(AmazonS3ConfigKey::RoleArn))
        || set(AmazonS3ConfigKey::ContainerCredentialsRelativeUri)
        || set(AmazonS3ConfigKey::ContainerCredentialsFullUri))
}

fn open_error(key: &Path, e: OpenError) -> StorageError {
    match e {
        OpenError::Damaged(reason) => StorageError::Corrupt {
            key: key.to_string(),
            reason,
        },
        OpenError::Locked(reason) => StorageError::Locked {
            key: key.to_string(),
            reason,
        },
    }
}

/// How stored content compares with new content under the same name.
enum Compared {
    Same,
    /// Encrypted to keys without an identity here, intact and of the same size.
    SameSizeEncrypted,
    Differs {
        len: u64,
        sha: String,
    },
    Damaged(String),
}

/// What happened to a write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutOutcome {
    /// Written and verified. `stored_len` is the object's size in storage.
    Stored { stored_len: u64 },
    /// Storage already held exactly this content; nothing was written.
    AlreadyPresent,
    /// Storage held a corrupted copy of this name; it was replaced by this (verified) content.
    Repaired { stored_len: u64 },
}

/// A handle on the configured object store.
#[derive(Clone)]
pub struct Repo {
    store: Arc<dyn ObjectStore>,
    url: String,
    /// For `file://` storage: the directory, so that writes can be fsynced.
    local_root: Option<PathBuf>,
    /// Folders below `local_root` whose entry in their parent is known to be fsynced.
    durable_dirs: Arc<std::sync::Mutex<std::collections::HashSet<PathBuf>>>,
    verify_uploads: bool,
    /// The store checks each upload's body against a SHA-256 sent with it (signed S3 payloads):
    /// uploads are verified by that instead of a read-back.
    store_checks_payload: bool,
    keys: Arc<Keys>,
    /// S3 with no credentials configured: object_store asks the instance metadata service.
    credentials_from_metadata: bool,
    /// `file://` written by root into an archive another user owns: that user's (uid, gid), to
    /// hand every new file and folder to, so that the owner's daemon can still manage them.
    owner: Option<(u32, u32)>,
}

impl std::fmt::Debug for Repo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Repo").field("url", &self.url).finish()
    }
}

impl Repo {
    /// Opens the store named by the configuration. With `create`, a missing `file://` directory is
    /// created (commands that only read never create anything).
    pub fn open(cfg: &StorageSettings, create: bool) -> Result<Repo, StorageError> {
        let url = cfg.url.to_string();
        let setup = |message: String| StorageError::Setup {
            url: url.clone(),
            message,
        };
        let retry = RetryConfig {
            backoff: BackoffConfig {
                init_backoff: Duration::from_millis(100),
                max_backoff: Duration::from_secs(5),
                base: 2.0,
            },
            max_retries: cfg.retry.max_retries,
            retry_timeout: cfg.retry.retry_timeout,
        };
        let timeout = format!("{}s", cfg.retry.request_timeout.as_secs());
        let connect_timeout = format!("{}s", cfg.retry.request_timeout.as_secs().min(10));
        let keys = Arc::new(Keys::from_settings(&cfg.encryption).map_err(&setup)?);
        let mut credentials_from_metadata = false;
        let mut store_checks_payload = false;
        let mut owner = None;
        let (store, local_root): (Arc<dyn ObjectStore>, _) = match &cfg.url {
            StorageUrl::File { root } => {
                if create {
                    std::fs::create_dir_all(root)
                        .map_err(|e| setup(format!("cannot create the storage directory: {e}")))?;
                } else if !root.is_dir() {
                    return Err(setup(
                        "the storage directory does not exist (is this the storage you meant? \
                         it comes from the storage setting: --config FILE, PGKEEP_CONFIG or PGKEEP_STORAGE)"
                            .into(),
                    ));
                }
                owner = crate::fsutil::foreign_owner(root);
                let fs =
                    LocalFileSystem::new_with_prefix(root).map_err(|e| setup(e.to_string()))?;
                (Arc::new(fs), Some(root.clone()))
            }
            StorageUrl::Cloud {
                scheme,
                bucket,
                prefix,
            } => {
                // The same client settings for every cloud; each builder reads its own cloud's
                // standard environment variables first.
                macro_rules! cloud {
                    ($builder:ty, $keys:ty, $name:ident) => {{
                        let mut b = <$builder>::from_env()
                            .$name(bucket)
                            .with_retry(retry)
                            .with_config(<$keys>::Client(ClientConfigKey::Timeout), &timeout)
                            .with_config(
                                <$keys>::Client(ClientConfigKey::ConnectTimeout),
                                &connect_timeout,
                            );
                        for (key, value) in &cfg.options {
                            let key: $keys = key
                                .parse()
                                .map_err(|e| setup(format!("storage option {key}: {e}")))?;
                            b = b.with_config(key, value);
                        }
                        b
                    }};
                }
                let built = |e: object_store::Error| setup(e.to_string());
                let store: Arc<dyn ObjectStore> = match scheme {
                    CloudScheme::S3 => {
                        let b = cloud!(AmazonS3Builder, AmazonS3ConfigKey, with_bucket_name);
                        if asks_instance_metadata(&b) {
                            credentials_from_metadata = true;
                        }
                        store_checks_payload = signs_payload(&b);
                        Arc::new(b.build().map_err(built)?)
                    }
                    CloudScheme::Gcs => Arc::new(
                        cloud!(GoogleCloudStorageBuilder, GoogleConfigKey, with_bucket_name)
                            .build()
                            .map_err(built)?,
                    ),
                    CloudScheme::Azure => Arc::new(
                        cloud!(MicrosoftAzureBuilder, AzureConfigKey, with_container_name)
                            .build()
                            .map_err(built)?,
                    ),
                };
                let store = if prefix.is_empty() {
                    store
                } else {
                    Arc::new(PrefixStore::new(store, Path::from(prefix.as_str())))
                };
                (store, None)
            }
        };
        Ok(Repo {
            store,
            url,
            local_root,
            durable_dirs: Default::default(),
            verify_uploads: cfg.verify_uploads,
            store_checks_payload,
            keys,
            credentials_from_metadata,
            owner,
        })
    }

    /// A failed storage call as a [`StorageError`]: a missing object is `NotFound`; when no S3
    /// credentials are configured and the instance metadata service gave none, a setup error that
    /// says so (and is not retried) instead of the metadata service's raw answer.
    fn backend(&self, key: &Path, op: &'static str, source: object_store::Error) -> StorageError {
        let text = source.to_string();
        if self.credentials_from_metadata
            && !matches!(source, object_store::Error::NotFound { .. })
            && (text.contains("/latest/api/token") || text.contains("/latest/meta-data/"))
        {
            let cause = redact_userinfo(text.lines().next().unwrap_or_default());
            return StorageError::NoCredentials {
                url: self.url.clone(),
                message: format!(
                    "no credentials for this bucket: none are configured (AWS_ACCESS_KEY_ID with \
                     AWS_SECRET_ACCESS_KEY, AWS_WEB_IDENTITY_TOKEN_FILE with AWS_ROLE_ARN, or \
                     AWS_CONTAINER_CREDENTIALS_RELATIVE_URI / AWS_CONTAINER_CREDENTIALS_FULL_URI), \
                     and the instance metadata service did not give any ({cause})"
                ),
            };
        }
        StorageError::backend(key, op, source)
    }

    /// The encryption keys objects are sealed and opened with.
    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// The stored form of `plain` (database content: encrypted when recipients are configured).
    pub fn seal(&self, codec: Codec, plain: &[u8]) -> (Header, Vec<u8>) {
        object::seal(codec, plain, &self.keys)
    }

    /// Checks, decrypts and decodes the stored object `key`.
    pub fn open_object(
        &self,
        key: &Path,
        stored: &[u8],
    ) -> Result<(Header, Vec<u8>), StorageError> {
        object::open(stored, &self.keys).map_err(|e| open_error(key, e))
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// Stores `plain` under `key`, encoded with `codec`, unless storage already holds exactly this
    /// content there. Different content under the same key is refused ([`StorageError::Conflict`]);
    /// a stored copy that fails verification is replaced. Returns only once the object is durable
    /// and (with `verify_uploads`) read back identically.
    pub async fn put_new(
        &self,
        key: &Path,
        plain: &[u8],
        codec: Codec,
    ) -> Result<PutOutcome, StorageError> {
        self.put_new_with(key, plain, None, codec, &self.keys.clone(), false)
            .await
    }

    /// As [`Repo::put_new`], with the SHA-256 of `plain` its caller computed already, for a
    /// writer that knows (from a record of its own) whether it stored exactly `plain` under `key`
    /// before: an intact encrypted copy it cannot decrypt to compare is then taken as present
    /// instead of refused.
    pub async fn put_new_known(
        &self,
        key: &Path,
        plain: &[u8],
        plain_sha256: [u8; 32],
        codec: Codec,
        stored_before: bool,
    ) -> Result<PutOutcome, StorageError> {
        let keys = self.keys.clone();
        self.put_new_with(key, plain, Some(plain_sha256), codec, &keys, stored_before)
            .await
    }

    /// As [`Repo::put_new`], for metadata that stays readable without any key (never encrypted).
    pub async fn put_new_metadata(
        &self,
        key: &Path,
        plain: &[u8],
    ) -> Result<PutOutcome, StorageError> {
        self.put_new_with(key, plain, None, Codec::None, &Keys::default(), false)
            .await
    }

    async fn put_new_with(
        &self,
        key: &Path,
        plain: &[u8],
        plain_sha256: Option<[u8; 32]>,
        codec: Codec,
        keys: &Keys,
        stored_before: bool,
    ) -> Result<PutOutcome, StorageError> {
        let new_sha = plain_sha256.unwrap_or_else(|| object::content_sha256(plain));
        let existing = self.fetch_raw(key).await;
        let new_len = plain.len() as u64;
        let Some(repairing) = self.judge(key, existing, new_len, &new_sha, stored_before)? else {
            return Ok(PutOutcome::AlreadyPresent);
        };
        let (_, stored) = object::seal_known(codec, plain, keys, Some(new_sha));
        self.put_judged(key, stored, repairing).await
    }

    /// As [`Repo::put_new_known`] (by a writer with no record of its own), writing only once
    /// `gate` has succeeded: the read of what `key` holds and the encoding of `plain` run beside
    /// it. For `archive-push`, whose gate is the check that storage is this cluster's archive:
    /// two round trips to the store in all, where one after the other they were four. The
    /// encoding is then wasted when the gate fails or the content is there already (a retry
    /// after a crash): rare, and cheaper than a round trip to wait for.
    pub async fn put_new_known_after(
        &self,
        gate: impl std::future::Future<Output = Result<(), StorageError>>,
        key: &Path,
        plain: bytes::Bytes,
        plain_sha256: [u8; 32],
        codec: Codec,
    ) -> Result<PutOutcome, StorageError> {
        let sealing = {
            let (plain, keys) = (plain.clone(), self.keys.clone());
            tokio::task::spawn_blocking(move || {
                object::seal_known(codec, &plain, &keys, Some(plain_sha256)).1
            })
        };
        let (gate, existing) = tokio::join!(gate, self.fetch_raw(key));
        gate?;
        let new_len = plain.len() as u64;
        let Some(repairing) = self.judge(key, existing, new_len, &plain_sha256, false)? else {
            return Ok(PutOutcome::AlreadyPresent);
        };
        let stored = sealing.await.expect("encoding does not panic");
        self.put_judged(key, stored, repairing).await
    }

    /// What to do with new content of `new_len` bytes with SHA-256 `new_sha` for `key`, given
    /// what storage holds there (`existing`): `None`, nothing (it is there); `Some(repairing)`,
    /// write it (replacing a damaged copy when `repairing`). Other content there is a conflict.
    fn judge(
        &self,
        key: &Path,
        existing: Result<bytes::Bytes, StorageError>,
        new_len: u64,
        new_sha: &[u8; 32],
        stored_before: bool,
    ) -> Result<Option<bool>, StorageError> {
        let conflict = |stored_len: u64, stored_sha: String| StorageError::Conflict {
            key: key.to_string(),
            stored_len,
            stored_sha,
            new_len,
            new_sha: hex::encode(new_sha),
        };
        match existing {
            Ok(existing) => match self.compare(&existing, new_len, new_sha) {
                Compared::Same => Ok(None),
                Compared::SameSizeEncrypted if stored_before => {
                    tracing::info!(%key, "already stored by this writer (its own record says so)");
                    Ok(None)
                }
                // Never a success that cannot be checked: the stored copy may hold other WAL.
                Compared::SameSizeEncrypted => Err(conflict(
                    new_len,
                    "unknown: it is encrypted, and this writer holds no identity to compare \
                     it (give it encryption_identity_file, or remove the object if it is \
                     not this cluster's)"
                        .into(),
                )),
                Compared::Differs { len, sha } => Err(conflict(len, sha)),
                Compared::Damaged(reason) => {
                    tracing::warn!(%key, %reason, "the stored copy is damaged; replacing it with the verified source");
                    Ok(Some(true))
                }
            },
            Err(StorageError::NotFound { .. }) => Ok(Some(false)),
            Err(e) => Err(e),
        }
    }

    /// Writes what [`Repo::judge`] said to write.
    async fn put_judged(
        &self,
        key: &Path,
        stored: Vec<u8>,
        repairing: bool,
    ) -> Result<PutOutcome, StorageError> {
        let stored_len = self.put_sealed(key, stored).await?;
        Ok(if repairing {
            PutOutcome::Repaired { stored_len }
        } else {
            PutOutcome::Stored { stored_len }
        })
    }

    /// How a stored object relates to new content of `new_len` bytes with SHA-256 `new_sha`.
    fn compare(&self, existing: &[u8], new_len: u64, new_sha: &[u8; 32]) -> Compared {
        let header = match Header::parse(existing) {
            Ok(h) => h,
            Err(reason) => return Compared::Damaged(reason),
        };
        let other = |len: u64, sha: Option<[u8; 32]>| Compared::Differs {
            len,
            sha: sha
                .map(hex::encode)
                .unwrap_or_else(|| "unknown (encrypted)".into()),
        };
        match object::open(existing, &self.keys) {
            Ok((h, plain))
                if h.plain_len == new_len && object::content_sha256(&plain) == *new_sha =>
            {
                Compared::Same
            }
            Ok((h, plain)) => other(h.plain_len, Some(object::content_sha256(&plain))),
            // Only replace a damaged copy when its header still says it held this very content
            // (as far as a header can say): a readable header for other content is a conflict.
            Err(OpenError::Damaged(reason)) => match header.holds(new_len, new_sha) {
                Some(false) => other(header.plain_len, Some(header.checksum)),
                _ if header.plain_len != new_len => other(header.plain_len, None),
                _ => Compared::Damaged(reason),
            },
            Err(OpenError::Locked(_)) if header.plain_len == new_len => Compared::SameSizeEncrypted,
            Err(OpenError::Locked(_)) => other(header.plain_len, None),
        }
    }

    /// Stores `plain` under `key`, replacing whatever is there; verified and durable on return.
    /// Returns the stored size.
    pub async fn put_overwrite(
        &self,
        key: &Path,
        plain: &[u8],
        codec: Codec,
    ) -> Result<u64, StorageError> {
        let (_, stored) = self.seal(codec, plain);
        self.put_sealed(key, stored).await
    }

    /// As [`Repo::put_overwrite`], for metadata that stays readable without any key.
    pub async fn put_overwrite_metadata(
        &self,
        key: &Path,
        plain: &[u8],
    ) -> Result<u64, StorageError> {
        let (_, stored) = object::seal(Codec::None, plain, &Keys::default());
        self.put_sealed(key, stored).await
    }

    /// Stores an object already built by [`object::seal`], replacing whatever is there; verified
    /// and durable on return. Returns the stored size.
    pub async fn put_sealed(&self, key: &Path, stored: Vec<u8>) -> Result<u64, StorageError> {
        self.put_sealed_opt(key, stored, true).await
    }

    /// As [`Repo::put_sealed`], but for `file://` storage the object is not fsynced yet: for the many
    /// pieces of one larger unit (a base backup's chunks) that is acknowledged later, after one
    /// [`Repo::sync_all`] instead of two fsyncs per piece.
    pub async fn put_sealed_deferred(
        &self,
        key: &Path,
        stored: Vec<u8>,
    ) -> Result<u64, StorageError> {
        self.put_sealed_opt(key, stored, false).await
    }

    /// Copies `key` from `source` as it is stored there (an encrypted object stays sealed to its
    /// recipients), checked there as far as its header allows; verified here, and durable unless
    /// `deferred` (then after [`Repo::sync_all`]). A copy already here, byte for byte, is left
    /// alone (false); other bytes under the key are refused. Returns whether it wrote, and the size.
    pub async fn copy_from(
        &self,
        source: &Repo,
        key: &Path,
        deferred: bool,
    ) -> Result<(bool, u64), StorageError> {
        let (_, stored) = source.get_stored(key).await?;
        match self.fetch_raw(key).await {
            Ok(existing) if existing == stored => return Ok((false, stored.len() as u64)),
            Ok(existing) => {
                return Err(StorageError::Conflict {
                    key: key.to_string(),
                    stored_len: existing.len() as u64,
                    stored_sha: hex::encode(object::content_sha256(&existing)),
                    new_len: stored.len() as u64,
                    new_sha: hex::encode(object::content_sha256(&stored)),
                });
            }
            Err(StorageError::NotFound { .. }) => {}
            Err(e) => return Err(e),
        }
        let len = self.put_sealed_opt(key, stored.to_vec(), !deferred).await?;
        Ok((true, len))
    }

    /// Makes everything written so far durable (`file://`: one syncfs of the storage's file system;
    /// cloud stores acknowledge durably on each write).
    pub async fn sync_all(&self) -> Result<(), StorageError> {
        let Some(root) = self.local_root.clone() else {
            return Ok(());
        };
        let url = self.url.clone();
        tokio::task::spawn_blocking(move || {
            crate::fsutil::syncfs(&root).map_err(|e| StorageError::Setup {
                url,
                message: format!("syncfs of {} failed: {e}", root.display()),
            })
        })
        .await
        .expect("syncfs does not panic")
    }

    async fn put_sealed_opt(
        &self,
        key: &Path,
        stored: Vec<u8>,
        sync_now: bool,
    ) -> Result<u64, StorageError> {
        let stored_len = stored.len() as u64;
        // Kept (a cheap shared reference) to compare the read-back copy byte for byte.
        let stored = bytes::Bytes::from(stored);
        self.store
            .put(key, PutPayload::from(stored.clone()))
            .await
            .map_err(|e| self.backend(key, "upload", e))?;
        self.hand_over(key).await?;
        if sync_now {
            self.sync_local(key).await?;
        }
        // Verified by the store itself (it refused a body that did not match the signed SHA-256),
        // or else by reading the object back.
        if self.verify_uploads && !self.store_checks_payload {
            let back = self.fetch_raw(key).await.map_err(|e| match e {
                StorageError::NotFound { key } => StorageError::VerifyFailed {
                    key,
                    reason: "the object is missing right after its upload".into(),
                },
                e => e,
            })?;
            if back != stored {
                return Err(StorageError::VerifyFailed {
                    key: key.to_string(),
                    reason: format!(
                        "read back {} bytes that differ from the {stored_len} sent",
                        back.len()
                    ),
                });
            }
        }
        Ok(stored_len)
    }

    /// The verified plain content of `key`.
    pub async fn get(&self, key: &Path) -> Result<Vec<u8>, StorageError> {
        Ok(self.get_with_header(key).await?.1)
    }

    /// The verified plain content of `key` with its header (whose checksum it was verified against).
    pub async fn get_with_header(&self, key: &Path) -> Result<(Header, Vec<u8>), StorageError> {
        let stored = self.fetch_raw(key).await?;
        let keys = self.keys.clone();
        // Decrypting, decoding and hashing are CPU work: keep them off the async threads.
        tokio::task::spawn_blocking(move || object::open(&stored, &keys))
            .await
            .expect("decoding does not panic")
            .map_err(|e| open_error(key, e))
    }

    /// The stored bytes of `key` as they are (still encoded, perhaps encrypted), checked as far as
    /// is possible without a key (see [`object::check`]).
    pub async fn get_stored(&self, key: &Path) -> Result<(Header, bytes::Bytes), StorageError> {
        let stored = self.fetch_raw(key).await?;
        let copy = stored.clone();
        let header = tokio::task::spawn_blocking(move || object::check(&copy))
            .await
            .expect("checking does not panic")
            .map_err(|reason| StorageError::Corrupt {
                key: key.to_string(),
                reason,
            })?;
        Ok((header, stored))
    }

    /// The stored bytes of `key` with its header read, the content not checked yet: for a caller
    /// that opens the object next (which checks it), so that it is decoded and hashed once.
    pub async fn get_stored_unchecked(
        &self,
        key: &Path,
    ) -> Result<(Header, bytes::Bytes), StorageError> {
        let stored = self.fetch_raw(key).await?;
        let header = Header::parse(&stored).map_err(|reason| StorageError::Corrupt {
            key: key.to_string(),
            reason,
        })?;
        Ok((header, stored))
    }

    /// The header of the object `key` alone (one ranged read), checked.
    pub async fn header(&self, key: &Path) -> Result<Header, StorageError> {
        let got = self
            .store
            .get_range(key, 0..object::HEADER_LEN as u64)
            .await
            .map_err(|e| self.backend(key, "download", e))?;
        Header::parse(&got).map_err(|reason| StorageError::Corrupt {
            key: key.to_string(),
            reason,
        })
    }

    pub async fn exists(&self, key: &Path) -> Result<bool, StorageError> {
        match self.store.head(key).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(self.backend(key, "look-up", e)),
        }
    }

    /// Deletes `key`; deleting a missing object is not an error.
    pub async fn delete(&self, key: &Path) -> Result<(), StorageError> {
        match self.store.delete(key).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.backend(key, "delete", e)),
        }
    }

    /// Every object below `dir` with its size and modification time, sorted by key.
    pub async fn list_meta(
        &self,
        dir: &Path,
    ) -> Result<Vec<object_store::ObjectMeta>, StorageError> {
        let mut metas: Vec<object_store::ObjectMeta> = self
            .store
            .list(Some(dir))
            .try_collect()
            .await
            .map_err(|e| self.backend(dir, "listing", e))?;
        metas.sort_by(|a, b| a.location.cmp(&b.location));
        Ok(metas)
    }

    /// The names of the folders directly below `dir`.
    pub async fn list_dirs(&self, dir: &Path) -> Result<Vec<String>, StorageError> {
        let listing = self
            .store
            .list_with_delimiter(Some(dir))
            .await
            .map_err(|e| self.backend(dir, "listing", e))?;
        Ok(listing
            .common_prefixes
            .iter()
            .filter_map(|p| p.filename().map(str::to_string))
            .collect())
    }

    /// Every object key below `dir`, sorted.
    pub async fn list(&self, dir: &Path) -> Result<Vec<Path>, StorageError> {
        let mut keys: Vec<Path> = self
            .store
            .list(Some(dir))
            .map_ok(|m| m.location)
            .try_collect()
            .await
            .map_err(|e| self.backend(dir, "listing", e))?;
        keys.sort();
        Ok(keys)
    }

    async fn fetch_raw(&self, key: &Path) -> Result<bytes::Bytes, StorageError> {
        let got = self
            .store
            .get(key)
            .await
            .map_err(|e| self.backend(key, "download", e))?;
        got.bytes()
            .await
            .map_err(|e| self.backend(key, "download", e))
    }

    /// For `file://` storage written by root into an archive another user owns: gives the new
    /// object, and each folder above it that is not yet the owner's, to that owner (never
    /// following a link). Without it, a backup run by hand as root leaves objects that the
    /// owner's daemon cannot read or delete.
    async fn hand_over(&self, key: &Path) -> Result<(), StorageError> {
        let (Some(root), Some((uid, gid))) = (self.local_root.clone(), self.owner) else {
            return Ok(());
        };
        let mut path = root.clone();
        for part in key.parts() {
            path.push(part.as_ref());
        }
        let url = self.url.clone();
        tokio::task::spawn_blocking(move || {
            use std::os::unix::fs::MetadataExt;
            let mut at = path.as_path();
            while at != root {
                let meta = std::fs::symlink_metadata(at);
                if meta.is_ok_and(|m| m.uid() == uid && m.gid() == gid) {
                    break;
                }
                // The object is stored either way: a root without CAP_CHOWN (or NFS's
                // root_squash) gets a warning, not a failed upload.
                if let Err(e) = std::os::unix::fs::lchown(at, Some(uid), Some(gid)) {
                    tracing::warn!(
                        storage = %url,
                        "cannot give {} to the archive's owner (uid {uid}): {e}; run pgkeep as that user",
                        at.display()
                    );
                    break;
                }
                at = at.parent().expect("below the root");
            }
            Ok(())
        })
        .await
        .expect("chown does not panic")
    }

    /// For `file://` storage: fsync the object and its folder, and each new folder's own entry up
    /// to the root (once per process), so an acknowledged object survives a power loss.
    async fn sync_local(&self, key: &Path) -> Result<(), StorageError> {
        let Some(root) = self.local_root.clone() else {
            return Ok(());
        };
        let mut path = root.clone();
        for part in key.parts() {
            path.push(part.as_ref());
        }
        let durable = self.durable_dirs.clone();
        let url = self.url.clone();
        tokio::task::spawn_blocking(move || {
            let sync = |p: &std::path::Path| {
                std::fs::File::open(p)
                    .and_then(|f| f.sync_all())
                    .map_err(|e| StorageError::Setup {
                        url: url.clone(),
                        message: format!("fsync of {} failed: {e}", p.display()),
                    })
            };
            sync(&path)?;
            let mut dir = path.parent().expect("an object has a folder").to_path_buf();
            sync(&dir)?;
            // `dir`'s own entry lives in its parent: sync that unless already known durable.
            while dir != root && !durable.lock().expect("not poisoned").contains(&dir) {
                let parent = dir.parent().expect("below the root").to_path_buf();
                sync(&parent)?;
                durable.lock().expect("not poisoned").insert(dir);
                dir = parent;
            }
            Ok(())
        })
        .await
        .expect("fsync does not panic")
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn repeated_causes_are_said_once() {
        let t = super::tidy(
            "Generic LocalFileSystem error: Unable to copy data to file: No space left on device (os error 28): \
             Generic LocalFileSystem error: Unable to copy data to file: No space left on device (os error 28): \
             No space left on device (os error 28)",
        );
        assert_eq!(
            t,
            "Generic LocalFileSystem error: Unable to copy data to file: No space left on device (os error 28)"
        );
        assert_eq!(
            super::tidy("http://u:p@h/x: refused"),
            "http://***@h/x: refused"
        );
    }

    #[test]
    fn credentials_in_urls_are_redacted() {
        let r = super::redact_userinfo;
        assert_eq!(
            r("error sending request for url (http://AKIA:hunter2@127.0.0.1:9000/b/k): refused"),
            "error sending request for url (http://***@127.0.0.1:9000/b/k): refused"
        );
        assert_eq!(r("https://host/a@b"), "https://host/a@b");
        assert_eq!(r("no url here"), "no url here");
        assert_eq!(r("a://x@y b://u:p@z/"), "a://***@y b://***@z/");
    }
}
