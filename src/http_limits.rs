//! What any HTTP client can make the daemon hold, bounded: a cap on open connections (one past it
//! is closed at once), an idle timeout on each (no byte read or written for a while: closed, so
//! half-open and slow clients cannot pile up), and a cap on WAL bodies in flight (each holds a
//! segment in memory until it is sent).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Open connections at once.
pub const MAX_CONNECTIONS: usize = 256;
/// The default of `http_idle_timeout_secs`: a connection that moves no byte for this long, with
/// no request of it being answered, is closed (a request being answered, such as `POST
/// /wal-switch`, keeps its connection).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(120);
/// `/wal` bodies in flight at once (each up to a segment, 16 MiB by default).
pub const MAX_WAL_BODIES: usize = 16;
/// The most a client may send from one blank line (the end of a request head) to the next: no
/// request of the API has a body, and a head this large is no client's (hyper alone would hold
/// about 400 KiB per connection).
pub const MAX_REQUEST_HEAD: usize = 16 << 10;

/// Who is connected, and how many of its requests are being answered: while one is, the
/// connection is not idle (an answer may take minutes: a base backup), and the idle timeout waits.
#[derive(Debug, Clone)]
pub struct Peer {
    pub addr: std::net::SocketAddr,
    pub in_flight: Arc<std::sync::atomic::AtomicUsize>,
}

impl Peer {
    pub fn new(addr: std::net::SocketAddr) -> Peer {
        Peer {
            addr,
            in_flight: Arc::default(),
        }
    }
}

/// Middleware: counts the request as being answered until its response is ready (its body then
/// moves bytes, which keep the connection alive by themselves).
pub async fn answering(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use std::sync::atomic::Ordering;
    let peer = request
        .extensions()
        .get::<axum::extract::ConnectInfo<Peer>>()
        .map(|c| c.0.in_flight.clone());
    if let Some(n) = &peer {
        n.fetch_add(1, Ordering::AcqRel);
    }
    struct Done(Option<Arc<std::sync::atomic::AtomicUsize>>);
    impl Drop for Done {
        fn drop(&mut self) {
            if let Some(n) = &self.0 {
                n.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
            }
        }
    }
    let _done = Done(peer);
    next.run(request).await
}

/// A listener that enforces a cap on connections ([`MAX_CONNECTIONS`]) and an idle timeout
/// ([`IDLE_TIMEOUT`] by default).
pub struct BoundedListener {
    inner: TcpListener,
    permits: Arc<Semaphore>,
    idle: Duration,
}

impl BoundedListener {
    pub fn new(inner: TcpListener, max: usize, idle: Duration) -> BoundedListener {
        BoundedListener {
            inner,
            permits: Arc::new(Semaphore::new(max)),
            idle,
        }
    }
}

impl axum::serve::Listener for BoundedListener {
    type Io = BoundedStream;
    type Addr = Peer;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let (stream, addr) = axum::serve::Listener::accept(&mut self.inner).await;
            match self.permits.clone().try_acquire_owned() {
                Ok(permit) => {
                    let peer = Peer::new(addr);
                    return (
                        BoundedStream {
                            inner: stream,
                            _permit: permit,
                            idle: self.idle,
                            deadline: Box::pin(tokio::time::sleep(self.idle)),
                            in_flight: peer.in_flight.clone(),
                            head_bytes: 0,
                            tail: 0,
                        },
                        peer,
                    );
                }
                // Over the cap: closed at once, so the kernel's queue does not fill either.
                Err(_) => {
                    tracing::debug!(peer = %addr, "HTTP connection refused: too many open");
                    drop(stream);
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.inner.local_addr().map(Peer::new)
    }
}

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, BoundedListener>>
    for Peer
{
    fn connect_info(stream: axum::serve::IncomingStream<'_, BoundedListener>) -> Peer {
        stream.remote_addr().clone()
    }
}

/// A connection holding one of the listener's permits; idle for too long, it fails.
pub struct BoundedStream {
    inner: TcpStream,
    _permit: OwnedSemaphorePermit,
    idle: Duration,
    deadline: Pin<Box<tokio::time::Sleep>>,
    /// Requests of this connection being answered (see [`answering`]).
    in_flight: Arc<std::sync::atomic::AtomicUsize>,
    /// Bytes read since the last blank line (`\r\n\r\n`), and the last four bytes read.
    head_bytes: usize,
    tail: u32,
}

impl BoundedStream {
    /// After progress: the idle clock starts again.
    fn progressed(&mut self) {
        let next = tokio::time::Instant::now() + self.idle;
        self.deadline.as_mut().reset(next);
    }

    /// Pending I/O: an error once the connection has been idle too long.
    fn check_idle(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        if self.in_flight.load(std::sync::atomic::Ordering::Acquire) > 0 {
            // An answer is being prepared: not idle. Its end (a write) restarts the clock.
            self.progressed();
            return Poll::Pending;
        }
        match self.deadline.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(io::Error::new(
                io::ErrorKind::TimedOut,
                "idle HTTP connection closed",
            )),
            Poll::Pending => Poll::Pending,
        }
    }
}

use std::future::Future;

impl AsyncRead for BoundedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                self.progressed();
                for &b in &buf.filled()[before..] {
                    self.tail = (self.tail << 8) | u32::from(b);
                    self.head_bytes += 1;
                    if self.tail == u32::from_be_bytes(*b"\r\n\r\n") {
                        self.head_bytes = 0;
                    }
                }
                if self.head_bytes > MAX_REQUEST_HEAD {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "HTTP request head over 16 KiB: connection closed",
                    )));
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => {
                self.progressed();
                Poll::Ready(Err(e))
            }
            Poll::Pending => self.check_idle(cx).map(Err),
        }
    }
}

impl AsyncWrite for BoundedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match Pin::new(&mut self.inner).poll_write(cx, buf) {
            Poll::Ready(r) => {
                self.progressed();
                Poll::Ready(r)
            }
            Poll::Pending => self.check_idle(cx).map(Err),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The permits for `/wal` bodies in flight.
pub fn wal_bodies() -> Arc<Semaphore> {
    Arc::new(Semaphore::new(MAX_WAL_BODIES))
}

/// A response body of `data` that holds `permit` until it has been sent (or dropped), sent in
/// pieces of a shared buffer (no copy).
pub fn body_with_permit(
    data: impl Into<bytes::Bytes>,
    permit: OwnedSemaphorePermit,
) -> axum::body::Body {
    let data: bytes::Bytes = data.into();
    let pieces: Vec<bytes::Bytes> = (0..data.len())
        .step_by(256 << 10)
        .map(|at| data.slice(at..data.len().min(at + (256 << 10))))
        .collect();
    let stream = futures::stream::iter(pieces).map(move |piece| {
        let _held = &permit;
        Ok::<_, std::convert::Infallible>(piece)
    });
    axum::body::Body::from_stream(stream)
}

use futures::StreamExt;

#[cfg(test)]
mod tests {
    use super::*;
    use axum::serve::Listener;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn connections_past_the_cap_and_idle_ones_are_closed() {
        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = tcp.local_addr().unwrap();
        let mut listener = BoundedListener::new(tcp, 2, Duration::from_millis(300));
        let server = tokio::spawn(async move {
            let mut held = vec![];
            loop {
                let (mut io, _) = listener.accept().await;
                held.push(tokio::spawn(async move {
                    let mut buf = [0u8; 16];
                    // Echo until the idle timeout (or the client) ends the connection.
                    loop {
                        match io.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => {
                                if io.write_all(&buf[..n]).await.is_err() {
                                    return;
                                }
                            }
                        }
                    }
                }));
            }
        });
        let mut a = TcpStream::connect(addr).await.unwrap();
        let mut b = TcpStream::connect(addr).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        // The third is over the cap: closed at once.
        let mut c = TcpStream::connect(addr).await.unwrap();
        let mut buf = [0u8; 4];
        let n = tokio::time::timeout(Duration::from_secs(2), c.read(&mut buf))
            .await
            .expect("closed at once")
            .unwrap_or(0);
        assert_eq!(n, 0);
        // A busy connection lives on past the idle time.
        for _ in 0..4 {
            a.write_all(b"ping").await.unwrap();
            a.read_exact(&mut buf).await.unwrap();
            assert_eq!(&buf, b"ping");
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
        // The idle one was closed.
        let n = tokio::time::timeout(Duration::from_secs(2), b.read(&mut buf))
            .await
            .expect("the idle connection is closed")
            .unwrap_or(0);
        assert_eq!(n, 0);
        server.abort();
    }
}

#[cfg(test)]
mod slow_answer_tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A request whose answer takes longer than the idle time still gets it.
    #[tokio::test]
    async fn a_slow_answer_outlives_the_idle_timeout() {
        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = tcp.local_addr().unwrap();
        let listener = BoundedListener::new(tcp, 4, Duration::from_millis(300));
        let app = axum::Router::new()
            .route(
                "/slow",
                axum::routing::post(|| async {
                    tokio::time::sleep(Duration::from_millis(1200)).await;
                    "done"
                }),
            )
            .layer(axum::middleware::from_fn(answering));
        let server = tokio::spawn(async move {
            axum::serve(listener, app.into_make_service_with_connect_info::<Peer>()).await
        });
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(
            b"POST /slow HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        )
        .await
        .unwrap();
        let mut answer = String::new();
        c.read_to_string(&mut answer).await.unwrap();
        assert!(
            answer.starts_with("HTTP/1.1 200") && answer.ends_with("done"),
            "{answer:?}"
        );
        server.abort();
    }
}
