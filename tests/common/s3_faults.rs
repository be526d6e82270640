//! A fault-injecting HTTP proxy between pgkeep and the S3 server (loopback). It answers one request
//! per connection (asking the server to close after it), and for a chosen share of requests, picked
//! by a seeded generator, it injects one fault instead of, or after, passing the request on:
//! a 503 (S3's SlowDown), a 500 or a 429 without forwarding; a 500 after the server has done the
//! request (a PUT that is stored although the client is told it failed); a connection closed
//! without an answer; a stall longer than the client's request timeout; or a body cut short.
//! Apart from those, while [`FaultProxy::set_corrupt_puts`] is on, every PUT's body reaches the
//! server with one byte changed (damage in transit that TCP's checksum missed).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::thread;
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    Unavailable,
    Internal,
    TooMany,
    InternalAfterForward,
    Reset,
    Stall,
    ShortBody,
}

const FAULTS: [Fault; 7] = [
    Fault::Unavailable,
    Fault::Internal,
    Fault::TooMany,
    Fault::InternalAfterForward,
    Fault::Reset,
    Fault::Stall,
    Fault::ShortBody,
];

pub struct FaultProxy {
    pub port: u16,
    /// Share of requests that get a fault, in parts per 1000.
    rate: Arc<AtomicU32>,
    /// While set, every connection is closed at once (storage unreachable).
    down: Arc<AtomicBool>,
    pub requests: Arc<AtomicU64>,
    /// Faults injected, by kind (in the order of [`FAULTS`]).
    pub injected: Arc<[AtomicU64; 7]>,
    corrupt_puts: Arc<AtomicBool>,
    /// PUT bodies sent on with a byte changed.
    pub corrupted: Arc<AtomicU64>,
}

impl FaultProxy {
    /// Forwards to `127.0.0.1:upstream`; `stall` is how long a stalled answer hangs (longer
    /// than the client's request timeout).
    pub fn start(upstream: u16, seed: u64, stall: Duration) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let proxy = FaultProxy {
            port,
            rate: Arc::new(AtomicU32::new(0)),
            down: Arc::new(AtomicBool::new(false)),
            requests: Arc::default(),
            injected: Arc::new(Default::default()),
            corrupt_puts: Arc::default(),
            corrupted: Arc::default(),
        };
        let (rate, down, requests, injected) = (
            proxy.rate.clone(),
            proxy.down.clone(),
            proxy.requests.clone(),
            proxy.injected.clone(),
        );
        let (corrupt_puts, corrupted) = (proxy.corrupt_puts.clone(), proxy.corrupted.clone());
        let rng = Arc::new(AtomicU64::new(seed | 1));
        thread::spawn(move || {
            for client in listener.incoming().flatten() {
                if down.load(Ordering::Relaxed) {
                    drop(client);
                    continue;
                }
                let (rate, requests, injected, rng) = (
                    rate.clone(),
                    requests.clone(),
                    injected.clone(),
                    rng.clone(),
                );
                let corrupt = corrupt_puts
                    .load(Ordering::Relaxed)
                    .then(|| corrupted.clone());
                thread::spawn(move || {
                    let faults = Faults {
                        rate: &rate,
                        requests: &requests,
                        injected: &injected,
                        rng: &rng,
                        corrupted: corrupt.as_deref(),
                    };
                    let _ = serve(client, upstream, stall, &faults);
                });
            }
        });
        proxy
    }

    /// Faults on this share of requests, in parts per 1000.
    pub fn set_rate(&self, per_mille: u32) {
        self.rate.store(per_mille, Ordering::Relaxed);
    }

    /// While on, every PUT body is sent on with its last byte changed.
    pub fn set_corrupt_puts(&self, on: bool) {
        self.corrupt_puts.store(on, Ordering::Relaxed);
    }

    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::Relaxed);
    }

    pub fn injected_total(&self) -> u64 {
        self.injected
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .sum()
    }

    pub fn injected_of(&self, f: Fault) -> u64 {
        let i = FAULTS.iter().position(|x| *x == f).unwrap();
        self.injected[i].load(Ordering::Relaxed)
    }

    /// The environment that sends pgkeep's S3 requests through this proxy.
    pub fn env(&self, s3_env: &[(String, String)]) -> Vec<(String, String)> {
        s3_env
            .iter()
            .map(|(k, v)| match k.as_str() {
                "AWS_ENDPOINT" => (k.clone(), format!("http://127.0.0.1:{}", self.port)),
                _ => (k.clone(), v.clone()),
            })
            .collect()
    }
}

/// xorshift64*: reproducible for a seed, shared by all connections.
fn next(rng: &AtomicU64) -> u64 {
    let mut x = rng.load(Ordering::Relaxed);
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    rng.store(x, Ordering::Relaxed);
    x.wrapping_mul(0x2545_F491_4F6C_DD1D)
}

/// What one connection may do to its request, and where it counts what it did.
#[derive(Clone, Copy)]
struct Faults<'a> {
    rate: &'a AtomicU32,
    requests: &'a AtomicU64,
    injected: &'a [AtomicU64; 7],
    rng: &'a AtomicU64,
    /// Some: change a byte of a PUT's body, counted here.
    corrupted: Option<&'a AtomicU64>,
}

fn serve(
    mut client: TcpStream,
    upstream: u16,
    stall: Duration,
    faults: &Faults,
) -> std::io::Result<()> {
    let Faults {
        rate,
        requests,
        injected,
        rng,
        corrupted,
    } = *faults;
    client.set_read_timeout(Some(Duration::from_secs(30)))?;
    let Some(mut request) = read_request(&mut client)? else {
        return Ok(());
    };
    if let Some(count) = corrupted {
        let head_end = find(&request, b"\r\n\r\n").map_or(request.len(), |i| i + 4);
        if request.starts_with(b"PUT ") && request.len() > head_end {
            *request.last_mut().expect("a body") ^= 0x01;
            count.fetch_add(1, Ordering::Relaxed);
        }
    }
    requests.fetch_add(1, Ordering::Relaxed);
    let roll = next(rng);
    let fault = ((roll % 1000) < u64::from(rate.load(Ordering::Relaxed)))
        .then(|| FAULTS[((roll >> 20) % FAULTS.len() as u64) as usize]);
    if let Some(f) = fault {
        let i = FAULTS.iter().position(|x| *x == f).unwrap();
        injected[i].fetch_add(1, Ordering::Relaxed);
    }
    let status = |client: &mut TcpStream, code: &str, s3: &str| {
        let body = format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>{s3}</Code><Message>injected by the test proxy</Message></Error>"
        );
        let _ = write!(
            client,
            "HTTP/1.1 {code}\r\nContent-Type: application/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
    };
    let refusal = match fault {
        Some(Fault::Unavailable) => Some(("503 Service Unavailable", "SlowDown")),
        Some(Fault::Internal) => Some(("500 Internal Server Error", "InternalError")),
        Some(Fault::TooMany) => Some(("429 Too Many Requests", "SlowDown")),
        _ => None,
    };
    if let Some((code, s3)) = refusal {
        status(&mut client, code, s3);
        return Ok(());
    }
    match fault {
        Some(Fault::Reset) => return Ok(()),
        Some(Fault::Stall) => {
            thread::sleep(stall);
            return Ok(());
        }
        _ => {}
    }
    let answer = forward(&request, upstream)?;
    match fault {
        Some(Fault::InternalAfterForward) => {
            status(&mut client, "500 Internal Server Error", "InternalError")
        }
        Some(Fault::ShortBody) => {
            let head_end = find(&answer, b"\r\n\r\n").map_or(answer.len(), |i| i + 4);
            let body = answer.len() - head_end;
            // Half the body (at least one byte short); a body-less answer loses its end.
            let keep = head_end + body / 2;
            let keep = if body == 0 {
                answer.len().saturating_sub(2)
            } else {
                keep
            };
            client.write_all(&answer[..keep])?;
        }
        _ => client.write_all(&answer)?,
    }
    Ok(())
}

/// A whole request: its head (with `Connection: close`) and its body (by Content-Length).
fn read_request(client: &mut TcpStream) -> std::io::Result<Option<Vec<u8>>> {
    let mut buf = vec![];
    let mut chunk = [0u8; 16 << 10];
    let head_end = loop {
        if let Some(i) = find(&buf, b"\r\n\r\n") {
            break i + 4;
        }
        let n = client.read(&mut chunk)?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > 1 << 20 {
            return Ok(None);
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let length: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0);
    while buf.len() < head_end + length {
        let n = client.read(&mut chunk)?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    // One request per connection: the server closes after answering.
    let mut out = vec![];
    for line in head.split("\r\n").filter(|l| !l.is_empty()) {
        if line
            .split_once(':')
            .is_some_and(|(k, _)| k.trim().eq_ignore_ascii_case("connection"))
        {
            continue;
        }
        out.extend_from_slice(line.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"Connection: close\r\n\r\n");
    out.extend_from_slice(&buf[head_end..head_end + length]);
    Ok(Some(out))
}

/// Sends the request to the server and returns its whole answer (it closes after it).
fn forward(request: &[u8], upstream: u16) -> std::io::Result<Vec<u8>> {
    let mut server = TcpStream::connect(("127.0.0.1", upstream))?;
    server.set_read_timeout(Some(Duration::from_secs(60)))?;
    server.write_all(request)?;
    let mut answer = vec![];
    server.read_to_end(&mut answer)?;
    Ok(answer)
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}
