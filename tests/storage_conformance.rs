//! One storage contract, run against every backend the tests can start: `file://`, a real S3
//! server (s3s-fs's store, which checks signatures) and Azure Blob (Azurite). A backend is added
//! by adding it to the list at the bottom. Each contract is what pgkeep relies on: verified round trips,
//! refusal to overwrite different content, repair of a damaged copy, not-found versus
//! unreachable, and the catalog (format marker, cluster record, backups) on top.

mod common;

use std::sync::Arc;
use std::time::Duration;

use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use pgkeep::codec::Codec;
use pgkeep::storage::catalog::META_VERSION;
use pgkeep::storage::layout::{ArchiveName, BackupId};
use pgkeep::storage::settings::{CloudScheme, RetrySettings};
use pgkeep::storage::{
    ArchiveMeta, BackupMeta, ClusterInfo, PutOutcome, Repo, StorageError, StorageSettings,
    StorageUrl,
};

/// A running backend and how to reach it.
struct Backend {
    name: &'static str,
    settings: StorageSettings,
    /// The same store without pgkeep's layer, to plant damaged objects.
    raw: Arc<dyn ObjectStore>,
    _dir: common::TestDir,
    _s3: Option<common::S3Server>,
    _azurite: Option<common::AzuriteServer>,
}

fn retry() -> RetrySettings {
    RetrySettings {
        max_retries: 1,
        retry_timeout: Duration::from_secs(2),
        request_timeout: Duration::from_secs(10),
    }
}

fn settings(url: StorageUrl, options: Vec<(String, String)>) -> StorageSettings {
    StorageSettings {
        url,
        retry: retry(),
        verify_uploads: true,
        options,
        encryption: Default::default(),
    }
}

const PREFIX: &str = "prod/db1";

fn file_backend() -> Backend {
    let dir = common::TestDir::new("conformance-file");
    let root = dir.mkdir("archive");
    Backend {
        name: "file",
        settings: settings(StorageUrl::File { root: root.clone() }, vec![]),
        raw: Arc::new(object_store::local::LocalFileSystem::new_with_prefix(&root).unwrap()),
        _dir: dir,
        _s3: None,
        _azurite: None,
    }
}

fn s3_backend() -> Backend {
    let dir = common::TestDir::new("conformance-s3");
    let s3 = common::S3Server::start(dir.path());
    let options: Vec<(String, String)> = s3
        .env()
        .into_iter()
        .map(|(k, v)| (k.to_ascii_lowercase(), v))
        .collect();
    let mut b = object_store::aws::AmazonS3Builder::new().with_bucket_name(&s3.bucket);
    for (k, v) in &options {
        b = b.with_config(k.parse().unwrap(), v);
    }
    let url = StorageUrl::Cloud {
        scheme: CloudScheme::S3,
        bucket: s3.bucket.clone(),
        prefix: PREFIX.into(),
    };
    Backend {
        name: "s3",
        settings: settings(url, options),
        raw: Arc::new(object_store::prefix::PrefixStore::new(
            b.build().unwrap(),
            PREFIX,
        )),
        _dir: dir,
        _s3: Some(s3),
        _azurite: None,
    }
}

fn azure_backend() -> Backend {
    let dir = common::TestDir::new("conformance-azure");
    let az = common::AzuriteServer::start();
    let options = az.options();
    let mut b =
        object_store::azure::MicrosoftAzureBuilder::new().with_container_name(&az.container);
    for (k, v) in &options {
        b = b.with_config(k.parse().unwrap(), v);
    }
    let url = StorageUrl::Cloud {
        scheme: CloudScheme::Azure,
        bucket: az.container.clone(),
        prefix: PREFIX.into(),
    };
    Backend {
        name: "azure",
        settings: settings(url, options),
        raw: Arc::new(object_store::prefix::PrefixStore::new(
            b.build().unwrap(),
            PREFIX,
        )),
        _dir: dir,
        _s3: None,
        _azurite: Some(az),
    }
}

impl Backend {
    fn repo(&self) -> Repo {
        Repo::open(&self.settings, true).unwrap()
    }
}

/// Contents of several shapes: empty, tiny, compressible, incompressible.
fn contents() -> Vec<Vec<u8>> {
    let mut x: u64 = 0x9E3779B97F4A7C15;
    let random: Vec<u8> = (0..(3 << 20))
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    vec![
        vec![],
        b"x".to_vec(),
        (0..(5u32 << 20)).map(|i| (i % 97) as u8).collect(),
        random,
    ]
}

async fn round_trips(b: &Backend) {
    let repo = b.repo();
    for (i, plain) in contents().into_iter().enumerate() {
        for codec in [Codec::None, Codec::Snappy, Codec::Zstd { level: 3 }] {
            let key = Path::from(format!("rt/{}/{i}", codec.name()));
            let PutOutcome::Stored { stored_len } =
                repo.put_new(&key, &plain, codec).await.unwrap()
            else {
                panic!("{}: {key} was not stored as new", b.name);
            };
            let (header, back) = repo.get_with_header(&key).await.unwrap();
            assert_eq!(back, plain, "{}: {key} read back different", b.name);
            assert_eq!(header.plain_len, plain.len() as u64);
            assert!(repo.exists(&key).await.unwrap());
            let metas = repo
                .list_meta(&Path::from(format!("rt/{}", codec.name())))
                .await
                .unwrap();
            let meta = metas.iter().find(|m| m.location == key).expect("listed");
            assert_eq!(meta.size, stored_len, "{}: {key} stored size", b.name);
        }
    }
    assert_eq!(repo.list(&Path::from("rt/zstd")).await.unwrap().len(), 4);
    let mut dirs = repo.list_dirs(&Path::from("rt")).await.unwrap();
    dirs.sort();
    assert_eq!(dirs, ["none", "snappy", "zstd"], "{}", b.name);
    let key = Path::from("rt/none/1");
    repo.delete(&key).await.unwrap();
    assert!(!repo.exists(&key).await.unwrap());
    assert!(matches!(
        repo.get(&key).await,
        Err(StorageError::NotFound { .. })
    ));
    // Deleting what is not there is not an error.
    repo.delete(&key).await.unwrap();
    repo.sync_all().await.unwrap();
}

async fn refuses_to_overwrite_different_content(b: &Backend) {
    let repo = b.repo();
    let key = Path::from("wal/00000001/000000010000000000000001");
    repo.put_new(&key, b"first", Codec::Snappy).await.unwrap();
    assert_eq!(
        repo.put_new(&key, b"first", Codec::Zstd { level: 1 })
            .await
            .unwrap(),
        PutOutcome::AlreadyPresent,
        "{}",
        b.name
    );
    let err = repo
        .put_new(&key, b"second", Codec::Snappy)
        .await
        .unwrap_err();
    assert!(
        matches!(err, StorageError::Conflict { .. }),
        "{}: {err}",
        b.name
    );
    assert!(err.to_string().contains("refusing to overwrite"), "{err}");
    assert!(err.is_permanent());
    assert_eq!(repo.get(&key).await.unwrap(), b"first", "{}", b.name);
    repo.put_overwrite(&key, b"second", Codec::None)
        .await
        .unwrap();
    assert_eq!(repo.get(&key).await.unwrap(), b"second");
}

async fn damaged_objects_are_refused_by_name_and_repaired(b: &Backend) {
    let repo = b.repo();
    let key = Path::from("damaged/object");
    let plain: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    repo.put_new(&key, &plain, Codec::Snappy).await.unwrap();
    let stored = b.raw.get(&key).await.unwrap().bytes().await.unwrap();
    let mut bad = stored.to_vec();
    let at = bad.len() / 2;
    bad[at] ^= 0x40;
    b.raw.put(&key, PutPayload::from(bad)).await.unwrap();
    let err = repo.get(&key).await.unwrap_err();
    assert!(
        matches!(err, StorageError::Corrupt { .. }),
        "{}: {err}",
        b.name
    );
    assert!(err.to_string().contains("damaged/object"), "{err}");
    // The verified source replaces a damaged copy of the same content.
    assert!(matches!(
        repo.put_new(&key, &plain, Codec::Snappy).await.unwrap(),
        PutOutcome::Repaired { .. }
    ));
    assert_eq!(repo.get(&key).await.unwrap(), plain);
    // Something that is no pgkeep object at all.
    b.raw
        .put(&key, PutPayload::from_static(b"hello"))
        .await
        .unwrap();
    let err = repo.get(&key).await.unwrap_err();
    assert!(err.to_string().contains("corrupted"), "{}: {err}", b.name);
}

async fn not_found_is_not_unreachable(b: &Backend) {
    let repo = b.repo();
    let err = repo.get(&Path::from("no/such/key")).await.unwrap_err();
    assert!(
        matches!(err, StorageError::NotFound { .. }),
        "{}: {err}",
        b.name
    );
    let unreachable = match &b.settings.url {
        StorageUrl::File { root } => {
            let gone = StorageSettings {
                url: StorageUrl::File {
                    root: root.join("never-created"),
                },
                ..b.settings.clone()
            };
            let err = Repo::open(&gone, false).unwrap_err();
            assert!(err.to_string().contains("does not exist"), "{err}");
            // Says where the storage setting comes from.
            assert!(err.to_string().contains("PGKEEP_STORAGE"), "{err}");
            return;
        }
        StorageUrl::Cloud { .. } => {
            // The same store at a port nothing listens on.
            let dead = common::free_port();
            let mut s = b.settings.clone();
            for (k, v) in s.options.iter_mut() {
                if k.ends_with("endpoint") {
                    let port = v
                        .rsplit(':')
                        .next()
                        .unwrap()
                        .split('/')
                        .next()
                        .unwrap()
                        .to_string();
                    *v = v.replace(&format!(":{port}"), &format!(":{dead}"));
                }
            }
            Repo::open(&s, false).unwrap()
        }
    };
    let started = std::time::Instant::now();
    let err = unreachable
        .get(&Path::from("no/such/key"))
        .await
        .unwrap_err();
    assert!(
        matches!(err, StorageError::Backend { .. }),
        "{}: an unreachable store must not read as a missing object: {err}",
        b.name
    );
    assert!(!err.is_permanent(), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "retries are bounded"
    );
}

async fn the_catalog_reads_what_it_writes(b: &Backend) {
    let repo = b.repo();
    assert!(!repo.holds_archive().await.unwrap(), "{}", b.name);
    let err = repo.check_format().await.unwrap_err();
    assert!(err.to_string().contains("holds no pgkeep archive"), "{err}");
    let info = ClusterInfo {
        system_identifier: 7312345678901234567,
        wal_segment_size: pgkeep::pg::WalSegSize::new(16 << 20),
        pg_major: Some(15),
    };
    let archive = repo.ensure_cluster(&info).await.unwrap();
    repo.check_format().await.unwrap();
    assert_eq!(repo.clusters().await.unwrap(), [7312345678901234567]);
    assert!(archive.is_described().await.unwrap());
    assert!(archive.backups().await.unwrap().is_empty());
    let id: BackupId = "20261121T235737Z".parse().unwrap();
    let chunk = archive.layout().backup_chunk(
        &id,
        &ArchiveName::try_from("base.tar".to_string()).unwrap(),
        0,
    );
    repo.put_overwrite(&chunk, b"tar bytes", Codec::Snappy)
        .await
        .unwrap();
    assert!(archive.backup_folder_used(&id).await.unwrap());
    // A folder without backup.json is no backup.
    assert!(archive.backups().await.unwrap().is_empty(), "{}", b.name);
    let meta = BackupMeta {
        meta_version: META_VERSION,
        id: id.clone(),
        label: "test".into(),
        system_identifier: info.system_identifier,
        pg_version: "15.18".into(),
        wal_segment_size: info.wal_segment_size.unwrap(),
        timeline: pgkeep::pg::TimelineId::new(1).unwrap(),
        start_lsn: "0/9000028".parse().unwrap(),
        end_lsn: "0/A000100".parse().unwrap(),
        start_time: id.time(),
        end_time: id.time() + chrono::Duration::seconds(1),
        codec: Codec::Snappy,
        archives: vec![ArchiveMeta {
            name: ArchiveName::try_from("base.tar".to_string()).unwrap(),
            location: None,
            plain_bytes: 9,
            stored_bytes: 9,
            chunks: vec![],
        }],
        manifest_sha256: String::new(),
        plain_bytes: 9,
        stored_bytes: 9,
        encrypted_to: vec![],
        kind: Default::default(),
        parent: None,
        files_sha256: None,
    };
    archive.publish_backup(&meta).await.unwrap();
    assert_eq!(
        archive.backups().await.unwrap(),
        std::slice::from_ref(&meta),
        "{}",
        b.name
    );
    let needed = meta.required_wal();
    assert_eq!(needed.len(), 2);
    assert_eq!(archive.missing_wal(&needed).await.unwrap(), needed);
    repo.put_new(&archive.layout().wal(&needed[0]), b"seg", Codec::None)
        .await
        .unwrap();
    assert_eq!(archive.missing_wal(&needed).await.unwrap(), &needed[1..]);
    archive.delete_backup(&id).await.unwrap();
    assert!(archive.backups().await.unwrap().is_empty());
    assert!(
        !archive.backup_folder_used(&id).await.unwrap(),
        "{}",
        b.name
    );
}

/// The repository as the sidecar (recipient only) and as a reader (identity only) see it.
fn encrypted_repos(b: &Backend) -> (Repo, Repo, Repo) {
    use pgkeep::storage::EncryptionSettings;
    let (file, recipient) = pgkeep::storage::crypt::generate();
    let id_file = b._dir.path().join("identity.txt");
    std::fs::write(&id_file, file).unwrap();
    let with = |e: EncryptionSettings| {
        Repo::open(
            &StorageSettings {
                encryption: e,
                ..b.settings.clone()
            },
            true,
        )
        .unwrap()
    };
    let writer = with(EncryptionSettings {
        recipients: vec![recipient],
        identity_file: None,
    });
    let reader = with(EncryptionSettings {
        recipients: vec![],
        identity_file: Some(id_file),
    });
    (writer, reader, b.repo())
}

async fn encrypted_objects_need_only_the_recipient_to_write(b: &Backend) {
    let (writer, reader, plain) = encrypted_repos(b);
    for (i, content) in contents().into_iter().enumerate() {
        let key = Path::from(format!("enc/{i}"));
        writer.put_new(&key, &content, Codec::Snappy).await.unwrap();
        assert_eq!(
            reader.get(&key).await.unwrap(),
            content,
            "{}: {key}",
            b.name
        );
        // Structurally checked without a key; its content needs one.
        let (header, _) = writer.get_stored(&key).await.unwrap();
        assert!(header.age.is_some());
        let err = plain.get(&key).await.unwrap_err();
        assert!(
            matches!(err, StorageError::Locked { .. }),
            "{}: {err}",
            b.name
        );
        assert!(
            err.to_string().contains("no identity is configured"),
            "{err}"
        );
    }
    // The sidecar cannot compare content: refused (never a success it cannot check) unless its
    // own record says it stored exactly this; a reader with the identity compares for real.
    let key = Path::from("enc/1");
    let err = writer.put_new(&key, b"x", Codec::Snappy).await.unwrap_err();
    assert!(
        matches!(err, StorageError::Conflict { .. })
            && err.to_string().contains("no identity to compare"),
        "{}: {err}",
        b.name
    );
    assert_eq!(
        writer
            .put_new_known(
                &key,
                b"x",
                pgkeep::storage::object::content_sha256(b"x"),
                Codec::Snappy,
                true
            )
            .await
            .unwrap(),
        PutOutcome::AlreadyPresent
    );
    let err = writer
        .put_new(&key, b"xy", Codec::Snappy)
        .await
        .unwrap_err();
    assert!(
        matches!(err, StorageError::Conflict { .. }),
        "{}: {err}",
        b.name
    );
    assert!(matches!(
        reader.put_new(&key, b"y", Codec::Snappy).await.unwrap_err(),
        StorageError::Conflict { .. }
    ));
    assert_eq!(
        reader.put_new(&key, b"x", Codec::Snappy).await.unwrap(),
        PutOutcome::AlreadyPresent
    );
    // Damaged: a different error from a missing key, for writer and reader alike.
    let stored = b.raw.get(&key).await.unwrap().bytes().await.unwrap();
    let mut bad = stored.to_vec();
    let at = bad.len() - 3;
    bad[at] ^= 0x01;
    b.raw.put(&key, PutPayload::from(bad)).await.unwrap();
    for repo in [&reader, &plain] {
        let err = repo.get(&key).await.unwrap_err();
        assert!(
            matches!(err, StorageError::Corrupt { .. }),
            "{}: {err}",
            b.name
        );
    }
    assert!(writer.get_stored(&key).await.is_err());
    assert!(matches!(
        writer.put_new(&key, b"x", Codec::Snappy).await.unwrap(),
        PutOutcome::Repaired { .. }
    ));
    assert_eq!(reader.get(&key).await.unwrap(), b"x");
    // Objects written before encryption was turned on stay readable.
    let old = Path::from("enc/plain");
    plain.put_new(&old, b"before", Codec::Snappy).await.unwrap();
    assert_eq!(reader.get(&old).await.unwrap(), b"before");
    assert_eq!(writer.get(&old).await.unwrap(), b"before");
}

async fn suite(b: Backend) {
    encrypted_objects_need_only_the_recipient_to_write(&b).await;
    round_trips(&b).await;
    refuses_to_overwrite_different_content(&b).await;
    damaged_objects_are_refused_by_name_and_repaired(&b).await;
    not_found_is_not_unreachable(&b).await;
    the_catalog_reads_what_it_writes(&b).await;
}

macro_rules! backends {
    ($($name:ident => $make:expr),* $(,)?) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            suite($make).await;
        }
    )*};
}

backends! {
    file => file_backend(),
    s3 => s3_backend(),
    azure => azure_backend(),
}
