//! Reaching Postgres: a TCP or Unix-socket connection, TLS on it as `sslmode` asks (rustls), and a
//! guard that refuses to answer a cleartext or md5 password request unless `pg_allow_weak_auth`
//! allows it. Both the replication connection and tokio-postgres' SQL connections open their
//! stream here, so both honour the same settings.
//!
//! As libpq: TLS is never used on a Unix socket; `prefer` (the default) and `allow` try TLS and fall
//! back to a cleartext connection when the server declines; `require` encrypts without checking
//! the certificate (unless `sslrootcert` is given, then as `verify-ca`); `verify-ca` checks the
//! chain against `sslrootcert`; `verify-full` checks the host name too.

use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

use super::conninfo::{PgConnInfo, PgHost, RootCert, SslMode};
use super::error::PgError;

/// A connection to Postgres, encrypted or not.
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

pub type PgStream = Pin<Box<dyn Io>>;

/// The SSLRequest packet: length 8, code 1234.5679.
const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];

/// Connects as `info` says, within its connect timeout. Returns the stream and whether it is TLS.
pub async fn dial(info: &PgConnInfo) -> Result<(PgStream, bool), PgError> {
    let target = info.to_string();
    let failed = |cause: std::io::Error| PgError::Connect {
        target: target.clone(),
        cause,
    };
    // Certificates are read first: a bad file is named before anything goes over the network.
    let tls = match (&info.host, info.ssl.mode) {
        (PgHost::Unix(_), _) | (_, SslMode::Disable) => None,
        (PgHost::Tcp(host), _) => Some((client_config(info)?, host.clone())),
    };
    let opened = async {
        match &info.host {
            PgHost::Tcp(h) => {
                let mut s = tokio::net::TcpStream::connect((h.as_str(), info.port)).await?;
                s.set_nodelay(true)?;
                let Some((config, host)) = tls else {
                    return Ok(Ok((Box::pin(s) as PgStream, false)));
                };
                s.write_all(&SSL_REQUEST).await?;
                // Exactly one byte: anything the server sent after its 'S' goes to the TLS layer,
                // which refuses it (bytes injected before the handshake are never read as ours).
                let answer = s.read_u8().await?;
                match answer {
                    b'S' => {
                        let name = match server_name(&host) {
                            Some(n) => n,
                            // Checked against some other name, verify-full would prove nothing.
                            None if info.ssl.mode == SslMode::VerifyFull => {
                                return Ok(Err(PgError::Tls(format!(
                                    "sslmode=verify-full: the host {host:?} is not a name or address a certificate can be checked against"
                                ))));
                            }
                            None => ServerName::try_from("localhost").expect("a valid name"),
                        };
                        let tls = tokio_rustls::TlsConnector::from(config)
                            .connect(name, s)
                            .await
                            .map_err(|e| {
                                let hint = if e.to_string().contains("UnknownIssuer") {
                                    " (the server's certificate does not lead to a CA in sslrootcert)"
                                } else {
                                    ""
                                };
                                std::io::Error::new(
                                    e.kind(),
                                    format!(
                                        "TLS handshake failed (sslmode={}): {e}{hint}",
                                        info.ssl.mode
                                    ),
                                )
                            })?;
                        Ok(Ok((Box::pin(tls) as PgStream, true)))
                    }
                    b'N' if !info.ssl.mode.requires_tls() => {
                        Ok(Ok((Box::pin(s) as PgStream, false)))
                    }
                    b'N' => Ok(Err(PgError::Tls(format!(
                        "the server at {target} does not accept TLS connections, and sslmode={} requires TLS: \
                         turn ssl on in Postgres, or lower sslmode (nothing was sent in the clear)",
                        info.ssl.mode
                    )))),
                    other => Ok(Err(PgError::protocol(format!(
                        "the server answered the TLS request with byte {other:#04x}, not 'S' or 'N'"
                    )))),
                }
            }
            PgHost::Unix(dir) => {
                let s =
                    tokio::net::UnixStream::connect(dir.join(format!(".s.PGSQL.{}", info.port)))
                        .await?;
                Ok(Ok((Box::pin(s) as PgStream, false)))
            }
        }
    };
    match tokio::time::timeout(info.connect_timeout, opened).await {
        Ok(Ok(result)) => result,
        Ok(Err(source)) => Err(failed(source)),
        Err(_) => Err(failed(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "timed out",
        ))),
    }
}

fn server_name(host: &str) -> Option<ServerName<'static>> {
    ServerName::try_from(host.to_string()).ok()
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// The rustls client configuration for `info`'s sslmode and files.
fn client_config(info: &PgConnInfo) -> Result<Arc<rustls::ClientConfig>, PgError> {
    let ssl = &info.ssl;
    let provider = provider();
    let verifier: Arc<dyn ServerCertVerifier> = match (&ssl.root_cert, ssl.mode) {
        (None, SslMode::VerifyCa | SslMode::VerifyFull) => {
            return Err(PgError::Tls(format!(
                "sslmode={} needs sslrootcert: a file of CA certificates, or `system` for the system's",
                ssl.mode
            )));
        }
        (None, _) => Arc::new(Unverified(provider.clone())),
        (Some(root), mode) => {
            let roots = Arc::new(root_store(root)?);
            let full = rustls::client::WebPkiServerVerifier::builder_with_provider(
                roots,
                provider.clone(),
            )
            .build()
            .map_err(|e| PgError::Tls(format!("sslrootcert: {e}")))?;
            if mode == SslMode::VerifyFull {
                full
            } else {
                Arc::new(ChainOnly(full))
            }
        }
    };
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| PgError::Tls(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let config = match (&ssl.cert, &ssl.key) {
        (Some(cert), Some(key)) => {
            let chain = read_certs(cert, "sslcert")?;
            check_key_mode(key)?;
            let key = PrivateKeyDer::from_pem_file(key).map_err(|e| {
                PgError::Tls(format!(
                    "sslkey {}: not a PEM private key: {e}",
                    key.display()
                ))
            })?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| PgError::Tls(format!("sslcert/sslkey: {e}")))?
        }
        _ => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

fn read_certs(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>, PgError> {
    let bad = |m: String| PgError::Tls(format!("{what} {}: {m}", path.display()));
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| bad(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(e.to_string()))?;
    if certs.is_empty() {
        return Err(bad("holds no PEM certificate".into()));
    }
    Ok(certs)
}

fn root_store(root: &RootCert) -> Result<rustls::RootCertStore, PgError> {
    let mut store = rustls::RootCertStore::empty();
    let certs = match root {
        RootCert::File(path) => read_certs(path, "sslrootcert")?,
        RootCert::System => {
            let found = rustls_native_certs::load_native_certs();
            if found.certs.is_empty() {
                return Err(PgError::Tls(format!(
                    "sslrootcert=system: no system CA certificates found ({} error(s))",
                    found.errors.len()
                )));
            }
            found.certs
        }
    };
    for c in certs {
        store
            .add(c)
            .map_err(|e| PgError::Tls(format!("sslrootcert: {e}")))?;
    }
    Ok(store)
}

/// As libpq: the key may be readable by its owner only (or also by the group when root owns it).
fn check_key_mode(key: &Path) -> Result<(), PgError> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(key)
        .map_err(|e| PgError::Tls(format!("sslkey {}: {e}", key.display())))?;
    let allowed = if meta.uid() == 0 { 0o640 } else { 0o600 };
    if meta.mode() & 0o777 & !allowed != 0 {
        return Err(PgError::Tls(format!(
            "sslkey {}: the private key has mode {:o}, which others can read: make it {allowed:o} or less",
            key.display(),
            meta.mode() & 0o777
        )));
    }
    Ok(())
}

/// `require` without a root certificate: encrypted, the server's signature over the handshake
/// checked, its certificate not (as libpq).
#[derive(Debug)]
struct Unverified(Arc<CryptoProvider>);

impl ServerCertVerifier for Unverified {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `verify-ca`: the chain must lead to a root in `sslrootcert`; the name is not checked.
#[derive(Debug)]
struct ChainOnly(Arc<rustls::client::WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// The message for a password request pgkeep refuses to answer.
pub fn weak_auth_refused(method: &str, user: &str) -> String {
    format!(
        "the server asks for user {user:?}'s password {method}, which pgkeep refuses to send: \
         a server or anyone between could learn or replay it. Use scram-sha-256 in pg_hba.conf \
         (and password_encryption), or set pg_allow_weak_auth = true (PGKEEP_PG_ALLOW_WEAK_AUTH)"
    )
}

/// Watches what the server sends until authentication ends, and fails the read of a cleartext
/// (code 3) or md5 (code 5) password request unless allowed, before the client can answer it.
/// For tokio-postgres, which answers every request it understands.
pub struct AuthGuard<S> {
    inner: S,
    user: String,
    /// The head of the message being read (tag, length, and the auth code of an 'R').
    head: Vec<u8>,
    /// Bytes of the current message's body left to pass over.
    skip: usize,
    done: bool,
}

impl<S> AuthGuard<S> {
    pub fn new(inner: S, allow_weak: bool, user: &str) -> AuthGuard<S> {
        AuthGuard {
            inner,
            user: user.to_string(),
            head: Vec::with_capacity(9),
            skip: 0,
            done: allow_weak,
        }
    }

    /// Looks at bytes the server sent; an error for a refused request.
    fn scan(&mut self, mut bytes: &[u8]) -> std::io::Result<()> {
        while !self.done && !bytes.is_empty() {
            if self.skip > 0 {
                let n = self.skip.min(bytes.len());
                self.skip -= n;
                bytes = &bytes[n..];
                continue;
            }
            self.head.push(bytes[0]);
            bytes = &bytes[1..];
            let need = if self.head[0] == b'R' { 9 } else { 5 };
            if self.head.len() < need {
                continue;
            }
            let len = u32::from_be_bytes(self.head[1..5].try_into().expect("4 bytes")) as usize;
            if self.head[0] != b'R' {
                // Anything else (a notice, NegotiateProtocolVersion, an error) is passed over:
                // only AuthenticationOk ends the watch.
                self.skip = len.saturating_sub(4);
                self.head.clear();
                continue;
            }
            let code = u32::from_be_bytes(self.head[5..9].try_into().expect("4 bytes"));
            let method = match code {
                0 => {
                    self.done = true;
                    break;
                }
                3 => Some("in cleartext"),
                5 => Some("as an md5 hash"),
                _ => None,
            };
            if let Some(method) = method {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::PermissionDenied,
                    weak_auth_refused(method, &self.user),
                ));
            }
            self.skip = len.saturating_sub(8);
            self.head.clear();
        }
        Ok(())
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for AuthGuard<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let new = buf.filled()[before..].to_vec();
                if let Err(e) = this.scan(&new) {
                    buf.set_filled(before);
                    return Poll::Ready(Err(e));
                }
                Poll::Ready(Ok(()))
            }
            other => other,
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for AuthGuard<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth_request(code: u32) -> Vec<u8> {
        let mut m = vec![b'R', 0, 0, 0, 8];
        m.extend_from_slice(&code.to_be_bytes());
        if code == 5 {
            m[4] = 12;
            m.extend_from_slice(b"salt");
        }
        m
    }

    #[test]
    fn the_guard_refuses_weak_requests_however_the_bytes_arrive() {
        for code in [3u32, 5] {
            let msg = auth_request(code);
            for split in 1..msg.len() {
                let mut g = AuthGuard::new((), false, "u");
                let first = g.scan(&msg[..split]);
                let err = first.and_then(|_| g.scan(&msg[split..])).unwrap_err();
                assert!(err.to_string().contains("refuses to send"), "{err}");
            }
            // Allowed by the setting.
            assert!(AuthGuard::new((), true, "u").scan(&msg).is_ok());
        }
        // SCRAM (10, 11, 12) then OK: passed, and after OK nothing is looked at.
        let mut g = AuthGuard::new((), false, "u");
        let mut sasl = vec![b'R', 0, 0, 0, 23];
        sasl.extend_from_slice(&10u32.to_be_bytes());
        sasl.extend_from_slice(b"SCRAM-SHA-256\0\0");
        g.scan(&sasl).unwrap();
        g.scan(&auth_request(0)).unwrap();
        g.scan(&auth_request(3)).unwrap();
        // Other messages before it are passed over, and the watch goes on.
        let mut g = AuthGuard::new((), false, "u");
        g.scan(b"v\0\0\0\x08abcd").unwrap();
        assert!(g.scan(&auth_request(3)).is_err());
    }
}
