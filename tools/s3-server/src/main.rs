//! The S3-compatible server pgkeep's tests and benches start on loopback: the file-system store
//! of `s3s-fs` (each bucket a folder of the root; request signatures checked), served with
//! `TCP_NODELAY` on every connection.
//!
//! Why not the `s3s-fs` binary itself: it writes a response's head and body in two writes
//! without `TCP_NODELAY`, so Nagle's algorithm holds a small body (a 162-byte JSON object) until
//! the client's delayed ACK, about 40 ms later, on about half of all small GETs (seen with
//! strace in `bench/archive.py`). Real object stores do not answer that way; the tests and the
//! benches should measure pgkeep, not that stall.
//!
//! Usage (the options of `s3s-fs` the tests use; not its `--domain`):
//! `pgkeep-s3-test-server --host H --port P --access-key A --secret-key S ROOT`.

use std::path::PathBuf;

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder;
use s3s::auth::SimpleAuth;
use s3s::service::S3ServiceBuilder;

struct Options {
    host: String,
    port: u16,
    keys: Option<(String, String)>,
    root: PathBuf,
}

fn usage(why: &str) -> ! {
    eprintln!(
        "pgkeep-s3-test-server: {why}\nusage: pgkeep-s3-test-server [--host H] [--port P] \
         [--access-key A --secret-key S] ROOT"
    );
    std::process::exit(2)
}

fn options() -> Options {
    let mut args = std::env::args().skip(1);
    let (mut host, mut port) = ("localhost".to_string(), 8014u16);
    let (mut access, mut secret, mut root) = (None, None, None);
    while let Some(a) = args.next() {
        let mut value = |name: &str| {
            args.next()
                .unwrap_or_else(|| usage(&format!("{name} needs a value")))
        };
        match a.as_str() {
            "--version" | "-V" => {
                println!("pgkeep-s3-test-server {}", env!("CARGO_PKG_VERSION"));
                std::process::exit(0)
            }
            "--host" => host = value("--host"),
            "--port" => {
                port = value("--port")
                    .parse()
                    .unwrap_or_else(|_| usage("--port needs a port number"))
            }
            "--access-key" => access = Some(value("--access-key")),
            "--secret-key" => secret = Some(value("--secret-key")),
            other if other.starts_with('-') => usage(&format!("unknown option {other}")),
            other if root.is_none() => root = Some(PathBuf::from(other)),
            other => usage(&format!("one root only, not also {other}")),
        }
    }
    let keys = match (access, secret) {
        (Some(a), Some(s)) => Some((a, s)),
        (None, None) => None,
        _ => usage("--access-key and --secret-key go together"),
    };
    Options {
        host,
        port,
        keys,
        root: root.unwrap_or_else(|| usage("no root directory given")),
    }
}

#[tokio::main]
async fn main() {
    let opt = options();
    let fs = s3s_fs::FileSystem::new(&opt.root).unwrap_or_else(|e| {
        eprintln!("pgkeep-s3-test-server: {}: {e:?}", opt.root.display());
        std::process::exit(1)
    });
    let mut service = S3ServiceBuilder::new(fs);
    if let Some((access, secret)) = opt.keys {
        service.set_auth(SimpleAuth::from_single(access, secret));
    }
    let service = service.build();
    let listener = tokio::net::TcpListener::bind((opt.host.as_str(), opt.port))
        .await
        .unwrap_or_else(|e| {
            eprintln!("pgkeep-s3-test-server: cannot listen on {}:{}: {e}", opt.host, opt.port);
            std::process::exit(1)
        });
    let http = Builder::new(TokioExecutor::new());
    loop {
        let socket = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((socket, _)) => socket,
                // Out of descriptors, say: not a busy loop.
                Err(_) => {
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = tokio::signal::ctrl_c() => return,
        };
        // The point of this server: a response's last small write goes out at once.
        let _ = socket.set_nodelay(true);
        let conn = http
            .serve_connection(TokioIo::new(socket), service.clone())
            .into_owned();
        tokio::spawn(async move {
            let _ = conn.await;
        });
    }
}
