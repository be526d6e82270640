//! The daemon's HTTP API (loopback by default): health, status, Prometheus metrics, and WAL files
//! for restore_command. Names are validated before they reach storage; one error type maps to
//! status codes.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use crate::pg::WalFileName;
use crate::storage::{ClusterLayout, Repo};
use crate::wal::streamer::StreamState;

#[derive(Clone)]
pub struct AppState {
    pub stream: Arc<StreamState>,
    pub repo: Repo,
    /// The cluster served (set once the streamer has identified the server, or from the config).
    pub system_identifier: Arc<std::sync::atomic::AtomicU64>,
    pub cfg: Arc<crate::config::Config>,
    pub prefetch: Arc<crate::wal::prefetch::Prefetcher>,
}

/// Every failure of a request, with its status code.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0} is not in the archive")]
    NotFound(String),
    #[error("not ready: {0}")]
    Unavailable(String),
    #[error("storage: {0}")]
    Storage(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Forbidden(String),
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let code = match &self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Storage(_) => StatusCode::BAD_GATEWAY,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
        };
        (code, format!("{self}\n")).into_response()
    }
}

/// What any peer may ask: health and readiness, and the numbers (`/status`, `/metrics`) a
/// monitoring system scrapes when `listen` is a pod address.
const OPEN_TO_THE_NETWORK: &[&str] = &["/healthz", "/readyz", "/status", "/metrics"];

/// WAL (the database's content), backups and WAL switches are served to the daemon's own host or
/// pod only (loopback peers: `wal-fetch`, `kubectl port-forward`), whatever `listen` says: a
/// listen address opened for metrics scraping must not hand the database to the network.
async fn loopback_only(request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let peer = request
        .extensions()
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .copied();
    let local = peer.is_some_and(|p| p.0.ip().to_canonical().is_loopback());
    if !local && !OPEN_TO_THE_NETWORK.contains(&request.uri().path()) {
        let who = peer.map_or("an unknown peer".to_string(), |p| p.0.ip().to_string());
        return ApiError::Forbidden(format!(
            "{} is served to loopback clients only, not to {who}",
            request.uri().path()
        ))
        .into_response();
    }
    next.run(request).await
}

pub fn router(state: AppState) -> Router {
    with_loopback_guard(routes(state))
}

fn with_loopback_guard(r: Router) -> Router {
    r.layer(axum::middleware::from_fn(loopback_only))
}

fn routes(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/status", get(status))
        .route("/metrics", get(metrics))
        .route("/wal/{name}", get(wal))
        .route("/wal-switch", axum::routing::post(wal_switch))
        .route("/backups", get(list_backups).post(take_backup))
        .with_state(state)
}

/// Ready once the cluster is identified: WAL can be served (streaming may still wait for a
/// promotion).
async fn readyz(State(s): State<AppState>) -> Result<&'static str, ApiError> {
    if s.system_identifier.load(Ordering::Acquire) == 0 {
        return Err(ApiError::Unavailable(
            "the cluster is not identified yet".into(),
        ));
    }
    Ok("ready\n")
}

/// `POST /wal-switch`: pg_switch_wal(), answered once that WAL is durable in storage (504 after 60 s).
async fn wal_switch(State(s): State<AppState>) -> Result<Response, ApiError> {
    let stream = s.stream.clone();
    let result =
        crate::wal::switch::switch_and_wait(&s.cfg, std::time::Duration::from_secs(60), || {
            let d = stream.durable_lsn();
            async move { Ok(d) }
        })
        .await;
    match result {
        Ok(target) => Ok(axum::Json(serde_json::json!({
            "switched_to": target.map(|t| t.to_string()),
            "durable_lsn": s.stream.durable_lsn().to_string(),
        }))
        .into_response()),
        Err(e) => Ok((StatusCode::GATEWAY_TIMEOUT, format!("{e:#}\n")).into_response()),
    }
}

async fn status(State(s): State<AppState>) -> impl IntoResponse {
    let st = &s.stream;
    let received = st.received_lsn();
    let durable = st.durable_lsn();
    axum::Json(serde_json::json!({
        "system_identifier": s.system_identifier.load(Ordering::Acquire).to_string(),
        "timeline": st.timeline.load(Ordering::Acquire),
        "received_lsn": received.to_string(),
        "durable_lsn": durable.to_string(),
        "lag_bytes": received.0.saturating_sub(durable.0),
        "segments_uploaded": st.segments_uploaded.load(Ordering::Relaxed),
        "partial_uploads": st.partial_uploads.load(Ordering::Relaxed),
        "upload_errors": st.upload_errors.load(Ordering::Relaxed),
        "reconnects": st.reconnects.load(Ordering::Relaxed),
        "last_upload_unix": st.last_upload_unix.load(Ordering::Relaxed),
    }))
}

async fn metrics(State(s): State<AppState>) -> impl IntoResponse {
    let st = &s.stream;
    let pf = &s.prefetch;
    let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed) as f64;
    let received = st.received_lsn().0;
    let durable = st.durable_lsn().0;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    // -1 for "never", else the seconds since the recorded Unix time.
    let since = |a: &std::sync::atomic::AtomicU64| match a.load(Ordering::Relaxed) {
        0 => -1.0,
        t => now.saturating_sub(t) as f64,
    };
    let metrics: [(&str, &str, &str, f64); 16] = [
        (
            "pgkeep_timeline",
            "gauge",
            "Timeline being streamed.",
            load(&st.timeline),
        ),
        (
            "pgkeep_received_lsn_bytes",
            "gauge",
            "Highest WAL position received.",
            received as f64,
        ),
        (
            "pgkeep_durable_lsn_bytes",
            "gauge",
            "WAL position up to which everything is in storage.",
            durable as f64,
        ),
        (
            "pgkeep_replication_lag_bytes",
            "gauge",
            "Received but not yet in storage.",
            received.saturating_sub(durable) as f64,
        ),
        (
            "pgkeep_seconds_since_last_wal_upload",
            "gauge",
            "Seconds since the last completed segment reached storage (-1: none yet).",
            since(&st.last_upload_unix),
        ),
        (
            "pgkeep_wal_segments_uploaded_total",
            "counter",
            "Segments streamed to storage.",
            load(&st.segments_uploaded),
        ),
        (
            "pgkeep_wal_partial_uploads_total",
            "counter",
            "Uploads of the open segment as .partial.",
            load(&st.partial_uploads),
        ),
        (
            "pgkeep_upload_errors_total",
            "counter",
            "Failed uploads (each is retried by reconnecting).",
            load(&st.upload_errors),
        ),
        (
            "pgkeep_bytes_uploaded_total",
            "counter",
            "Bytes stored for streamed segments.",
            load(&st.bytes_uploaded),
        ),
        (
            "pgkeep_stream_reconnects_total",
            "counter",
            "Reconnections of the WAL stream.",
            load(&st.reconnects),
        ),
        (
            "pgkeep_seconds_since_last_backup",
            "gauge",
            "Seconds since this daemon's last successful base backup (-1: none yet).",
            since(&st.last_backup_unix),
        ),
        (
            "pgkeep_last_backup_duration_seconds",
            "gauge",
            "How long the last base backup took.",
            load(&st.last_backup_ms) / 1000.0,
        ),
        (
            "pgkeep_backup_failures_total",
            "counter",
            "Failed base backups.",
            load(&st.backup_failures),
        ),
        (
            "pgkeep_wal_served_total",
            "counter",
            "WAL files served to restore_command.",
            load(&pf.served),
        ),
        (
            "pgkeep_wal_prefetched_total",
            "counter",
            "Segments downloaded ahead of their request.",
            load(&pf.prefetched),
        ),
        (
            "pgkeep_wal_prefetch_hits_total",
            "counter",
            "WAL requests answered from the prefetch cache.",
            load(&pf.hits),
        ),
    ];
    let mut out = String::new();
    for (name, kind, help, value) in metrics {
        out.push_str(&format!(
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"
        ));
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out)
}

/// `GET /backups`: what `pgkeep list --json` prints.
async fn list_backups(State(s): State<AppState>) -> Result<Response, ApiError> {
    let inv = crate::list::inventory(&s.cfg)
        .await
        .map_err(|e| ApiError::Storage(format!("{e:#}")))?;
    Ok(axum::Json(inv).into_response())
}

/// `POST /backups`: takes a base backup now (then applies retention); answers when it exists.
async fn take_backup(State(s): State<AppState>) -> Result<Response, ApiError> {
    match crate::daemon::take_and_prune(&s.cfg, &s.stream).await {
        Ok(id) => Ok((
            StatusCode::CREATED,
            axum::Json(serde_json::json!({ "id": id })),
        )
            .into_response()),
        Err(e) => {
            s.stream.backup_failures.fetch_add(1, Ordering::Relaxed);
            Err(ApiError::Storage(format!("{e:#}")))
        }
    }
}

#[derive(serde::Deserialize)]
pub struct WalQuery {
    /// The cluster the client expects; another one is refused (409) so the client reads storage.
    system_identifier: Option<u64>,
}

/// `GET|HEAD /wal/{name}`: the verified bytes of a WAL file (axum answers HEAD from the GET route
/// without a body), with `x-pgkeep-sha256` of the content and `x-pgkeep-served`, the name it was
/// stored under (a segment's `.partial` when only that exists).
async fn wal(
    State(s): State<AppState>,
    Path(name): Path<String>,
    axum::extract::Query(q): axum::extract::Query<WalQuery>,
) -> Result<Response, ApiError> {
    let name: WalFileName = name
        .parse()
        .map_err(|e: crate::pg::ParseError| ApiError::BadRequest(e.to_string()))?;
    // The cluster: the daemon's own once it has identified Postgres; before that (Postgres
    // replaying WAL after a restore accepts no connection until it is consistent) the one the
    // client names, from its pg_control: its WAL is what it asks for, checked against it.
    let sysid = match (
        s.system_identifier.load(Ordering::Acquire),
        q.system_identifier,
    ) {
        (0, None) => {
            return Err(ApiError::Unavailable(
                "the cluster is not identified yet".into(),
            ));
        }
        (0, Some(want)) => want,
        (own, Some(want)) if want != own => {
            return Err(ApiError::Conflict(format!(
                "this daemon serves cluster {own}, not {want}"
            )));
        }
        (own, _) => own,
    };
    let cluster = ClusterLayout::new(sysid);
    match s.prefetch.get(&s.repo, &cluster, &name).await {
        Ok((data, served)) => {
            let sha = hex::encode(
                crate::storage::object::Header::for_content(crate::codec::Codec::None, &data)
                    .plain_sha256,
            );
            Ok((
                [
                    (header::CONTENT_TYPE, "application/octet-stream".to_string()),
                    (header::HeaderName::from_static("x-pgkeep-sha256"), sha),
                    (
                        header::HeaderName::from_static("x-pgkeep-served"),
                        served.to_string(),
                    ),
                ],
                data,
            )
                .into_response())
        }
        Err(crate::wal::archive::FetchError::NotInArchive(_)) => {
            Err(ApiError::NotFound(name.to_string()))
        }
        Err(e) => Err(ApiError::Storage(format!("{e:#}"))),
    }
}

#[cfg(test)]
mod guard_tests {
    use super::*;
    use axum::extract::ConnectInfo;
    use tower::ServiceExt;

    async fn status_of(path: &str, peer: Option<&str>) -> StatusCode {
        let app = with_loopback_guard(
            Router::new()
                .route("/metrics", get(|| async { "m" }))
                .route("/wal/{name}", get(|| async { "wal" }))
                .route("/backups", axum::routing::post(|| async { "b" })),
        );
        let method = if path == "/backups" { "POST" } else { "GET" };
        let mut req = axum::extract::Request::builder()
            .method(method)
            .uri(path)
            .body(axum::body::Body::empty())
            .unwrap();
        if let Some(p) = peer {
            req.extensions_mut()
                .insert(ConnectInfo(p.parse::<std::net::SocketAddr>().unwrap()));
        }
        app.oneshot(req).await.unwrap().status()
    }

    #[tokio::test]
    async fn wal_and_backups_are_for_loopback_peers_only() {
        let wal = "/wal/000000010000000000000001";
        for peer in ["127.0.0.1:5000", "[::1]:5000", "[::ffff:127.0.0.1]:5000"] {
            assert_eq!(status_of(wal, Some(peer)).await, StatusCode::OK, "{peer}");
            assert_eq!(
                status_of("/backups", Some(peer)).await,
                StatusCode::OK,
                "{peer}"
            );
        }
        for peer in [Some("10.1.2.3:5000"), Some("[fd00::1]:5000"), None] {
            assert_eq!(
                status_of(wal, peer).await,
                StatusCode::FORBIDDEN,
                "{peer:?}"
            );
            assert_eq!(
                status_of("/backups", peer).await,
                StatusCode::FORBIDDEN,
                "{peer:?}"
            );
            assert_eq!(
                status_of("/metrics", peer).await,
                StatusCode::OK,
                "{peer:?}"
            );
        }
    }
}
