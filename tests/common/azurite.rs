//! Azurite, the Azure Blob emulator (npm `azurite`, installed by `scripts/install-deps.sh
//! azurite` into `target/azurite`), on a loopback port it picks, in memory; one container.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Azurite's well-known development account and key.
pub const ACCOUNT: &str = "devstoreaccount1";
pub const KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

pub struct AzuriteServer {
    child: Child,
    pub port: u16,
    pub container: String,
}

fn azurite_binary() -> PathBuf {
    if let Ok(p) = std::env::var("PGKEEPTEST_AZURITE") {
        return PathBuf::from(p);
    }
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("target/azurite/node_modules/.bin/azurite-blob");
    assert!(
        p.exists(),
        "azurite is not installed: run scripts/test.sh, which installs it (scripts/install-deps.sh azurite)"
    );
    p
}

impl AzuriteServer {
    pub fn start() -> AzuriteServer {
        let mut child = Command::new(azurite_binary())
            .args(["--blobHost", "127.0.0.1", "--blobPort", "0"])
            .args(["--inMemoryPersistence", "--silent", "--skipApiVersionCheck"])
            .args(["--loose", "--disableTelemetry"])
            .current_dir(std::env::temp_dir())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start azurite-blob");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let started = Instant::now();
        let port = loop {
            let line = match lines.next() {
                Some(Ok(l)) => l,
                _ => panic!("azurite-blob exited before it listened"),
            };
            if let Some(rest) = line.split("successfully listens on ").nth(1) {
                break rest.trim().rsplit(':').next().unwrap().parse().unwrap();
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "azurite did not start"
            );
        };
        // Keep reading so the pipe never fills.
        std::thread::spawn(move || for _ in lines {});
        let server = AzuriteServer {
            child,
            port,
            container: "pgkeep-test".into(),
        };
        server.create_container(&server.container);
        server
    }

    /// object_store's settings for this server (as `AZURE_*` variables or storage options).
    pub fn options(&self) -> Vec<(String, String)> {
        [
            ("azure_storage_account_name", ACCOUNT.to_string()),
            ("azure_storage_account_key", KEY.to_string()),
            (
                "azure_storage_endpoint",
                format!("http://127.0.0.1:{}/{ACCOUNT}", self.port),
            ),
            ("azure_allow_http", "true".into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    /// Creates a container (object_store cannot): a Shared Key signed `PUT ?restype=container`.
    fn create_container(&self, name: &str) {
        use base64::Engine as _;
        use hmac::{Hmac, Mac};
        let b64 = base64::engine::general_purpose::STANDARD;
        let date = chrono::Utc::now().format("%a, %d %b %Y %H:%M:%S GMT");
        let version = "2021-08-06";
        let to_sign = format!(
            "PUT\n\n\n\n\n\n\n\n\n\n\n\nx-ms-date:{date}\nx-ms-version:{version}\n/{ACCOUNT}/{ACCOUNT}/{name}\nrestype:container"
        );
        let mut mac = Hmac::<sha2::Sha256>::new_from_slice(&b64.decode(KEY).unwrap()).unwrap();
        mac.update(to_sign.as_bytes());
        let sig = b64.encode(mac.finalize().into_bytes());
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(
            s,
            "PUT /{ACCOUNT}/{name}?restype=container HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nx-ms-date: {date}\r\n\
             x-ms-version: {version}\r\nAuthorization: SharedKey {ACCOUNT}:{sig}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            self.port
        )
        .unwrap();
        let mut resp = String::new();
        s.read_to_string(&mut resp).unwrap();
        let code = resp.split_whitespace().nth(1).unwrap_or("");
        assert!(
            code == "201" || code == "409",
            "creating container {name}: {resp}"
        );
    }
}

impl Drop for AzuriteServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
