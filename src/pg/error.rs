//! How talking to Postgres fails: one error type for the connection (`tls`) and the
//! replication protocol (`replication`).

/// A failure talking to Postgres.
#[derive(Debug, thiserror::Error)]
pub enum PgError {
    /// The cause is said in the message, not chained as a source (it would be said twice).
    #[error("cannot connect to Postgres at {target}: {cause}")]
    Connect {
        target: String,
        cause: std::io::Error,
    },
    #[error("Postgres connection failed: {0}")]
    Io(#[from] std::io::Error),
    /// An ErrorResponse, with Postgres' own message and SQLSTATE code.
    #[error("Postgres said: {severity} {code}: {message}{}", detail.as_deref().map(|d| format!(" ({d})")).unwrap_or_default())]
    Server {
        severity: String,
        code: String,
        message: String,
        detail: Option<String>,
    },
    #[error("authentication failed: {0}")]
    Auth(String),
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("{0}")]
    Unsupported(String),
}

impl PgError {
    pub(crate) fn protocol(msg: impl Into<String>) -> PgError {
        PgError::Protocol(msg.into())
    }
}
