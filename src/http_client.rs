//! A minimal HTTP/1.1 client for talking to the local daemon (loopback only): enough for
//! `wal-fetch` and `wal-switch`, without pulling a TLS-capable client into their start-up.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A response: status code, headers (lower-case names), body.
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// The address to dial for a daemon that listens on `addr`: a wildcard listen address (`0.0.0.0`,
/// `::`, as in a pod whose metrics are scraped) is reached through loopback.
pub fn dial_address(addr: SocketAddr) -> SocketAddr {
    use std::net::{Ipv4Addr, Ipv6Addr};
    match addr.ip() {
        std::net::IpAddr::V4(ip) if ip.is_unspecified() => {
            (Ipv4Addr::LOCALHOST, addr.port()).into()
        }
        std::net::IpAddr::V6(ip) if ip.is_unspecified() => {
            (Ipv6Addr::LOCALHOST, addr.port()).into()
        }
        _ => addr,
    }
}

/// Sends `method path` to `addr` and reads the whole response (bounded by `limit` bytes), all
/// within `timeout`.
pub async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    timeout: Duration,
    limit: usize,
    headers: &[(&str, &str)],
) -> anyhow::Result<Response> {
    let addr = dial_address(addr);
    let extra: String = headers
        .iter()
        .map(|(n, v)| format!("{n}: {v}\r\n"))
        .collect();
    tokio::time::timeout(timeout, async {
        let mut s = tokio::net::TcpStream::connect(addr).await.with_context(|| format!("connecting to {addr}"))?;
        s.write_all(format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{extra}Content-Length: 0\r\n\r\n").as_bytes())
            .await?;
        let mut raw = Vec::new();
        (&mut s).take(limit as u64 + 64 * 1024).read_to_end(&mut raw).await?;
        let split = raw
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .ok_or_else(|| anyhow!("not an HTTP response"))?;
        let head = std::str::from_utf8(&raw[..split]).context("response head")?;
        let mut lines = head.split("\r\n");
        let status = lines
            .next()
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| anyhow!("no status line"))?;
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        let body = raw[split + 4..].to_vec();
        // A HEAD answer names the length of the body it does not send.
        if let Some(len) = headers.iter().find(|(n, _)| n == "content-length").and_then(|(_, v)| v.parse::<usize>().ok())
            && method != "HEAD"
            && len != body.len()
        {
            bail!("truncated response: {} of {len} bytes", body.len());
        }
        if headers.iter().any(|(n, v)| n == "transfer-encoding" && v.contains("chunked")) {
            bail!("chunked responses are not expected from the daemon");
        }
        Ok(Response { status, headers, body })
    })
    .await
    .map_err(|_| anyhow!("no answer from {addr} within {timeout:?}"))?
}

#[cfg(test)]
mod dial_tests {
    use super::dial_address;

    #[test]
    fn wildcard_listen_addresses_are_dialled_on_loopback() {
        assert_eq!(
            dial_address("0.0.0.0:16000".parse().unwrap()).to_string(),
            "127.0.0.1:16000"
        );
        assert_eq!(
            dial_address("[::]:7".parse().unwrap()).to_string(),
            "[::1]:7"
        );
        assert_eq!(
            dial_address("10.1.2.3:9".parse().unwrap()).to_string(),
            "10.1.2.3:9"
        );
    }
}
