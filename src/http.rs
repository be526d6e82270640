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

use crate::jobs::Jobs;
use crate::metrics::Metrics;
use crate::pg::WalFileName;
use crate::storage::{Archive, Repo};
use crate::wal::fetch::FetchError;
use crate::wal::streamer::StreamState;

/// What the routes get: the daemon's state and the calls they make, nothing they reach up for.
#[derive(Clone)]
pub struct AppState {
    pub stream: Arc<StreamState>,
    pub jobs: Arc<Jobs>,
    pub repo: Repo,
    /// The cluster served (set once the daemon has identified the server, or from the config).
    pub system_identifier: Arc<std::sync::atomic::AtomicU64>,
    pub cfg: Arc<crate::config::Config>,
    pub prefetch: Arc<crate::wal::prefetch::Prefetcher>,
    pub metrics: Arc<Metrics>,
    /// One permit per `/wal` body in flight (each holds a segment until it is sent).
    pub wal_bodies: Arc<tokio::sync::Semaphore>,
    /// The daemon's token (`http_token_file`): proofs for its answers, and the key to its
    /// `POST` routes. None if it could not be written: then those routes are refused.
    pub token: Option<Arc<crate::http_token::Token>>,
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
    #[error("{0}")]
    Unauthorized(String),
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
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
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
        .get::<axum::extract::ConnectInfo<crate::http_limits::Peer>>()
        .map(|c| c.0.addr);
    let local = peer.is_some_and(|p| p.ip().to_canonical().is_loopback());
    if !local && !OPEN_TO_THE_NETWORK.contains(&request.uri().path()) {
        let who = peer.map_or("an unknown peer".to_string(), |p| p.ip().to_string());
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
        .layer(axum::middleware::from_fn(crate::http_limits::answering))
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
        .route("/archived/{name}", get(archived))
        .route("/wal-switch", axum::routing::post(wal_switch))
        .route("/backups", get(list_backups).post(take_backup))
        .route("/marks", axum::routing::post(take_mark))
        .with_state(state)
}

/// Ready once the cluster is identified: WAL can be served (streaming may still wait for a
/// promotion).
async fn readyz(State(s): State<AppState>) -> Result<&'static str, ApiError> {
    if let Some(p) = s.stream.problem().filter(|p| p.unsupported) {
        return Err(ApiError::Unavailable(p.message));
    }
    if s.system_identifier.load(Ordering::Acquire) == 0 {
        return Err(ApiError::Unavailable(
            "the cluster is not identified yet".into(),
        ));
    }
    Ok("ready\n")
}

/// The `POST` routes act on the database: only a client holding the daemon's token may call them.
fn authorized(s: &AppState, headers: &axum::http::HeaderMap) -> Result<(), ApiError> {
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    match &s.token {
        Some(t) if t.authorizes(given) => Ok(()),
        Some(t) => Err(ApiError::Unauthorized(format!(
            "this route needs the daemon's token: send 'Authorization: Bearer <the content of {}>'",
            t.file.display()
        ))),
        None => Err(ApiError::Unauthorized(format!(
            "the daemon could not write its token to {} (http_token_file), so this route is closed",
            s.cfg.http_token_file.display()
        ))),
    }
}

/// Adds the proof of an answer when the client sent a nonce.
fn with_proof(
    s: &AppState,
    headers: &axum::http::HeaderMap,
    subject: &[u8],
    mut r: Response,
) -> Response {
    let nonce = headers
        .get(crate::http_token::NONCE_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|n| crate::http_token::valid_nonce(n));
    if let (Some(t), Some(n)) = (&s.token, nonce)
        && let Ok(v) = header::HeaderValue::from_str(&t.proof(n, subject))
    {
        r.headers_mut().insert(
            header::HeaderName::from_static(crate::http_token::PROOF_HEADER),
            v,
        );
    }
    r
}

/// `POST /wal-switch`: pg_switch_wal(), answered once that WAL is durable in storage (504 after 60 s).
async fn wal_switch(
    State(s): State<AppState>,
    headers: axum::http::HeaderMap,
) -> Result<Response, ApiError> {
    authorized(&s, &headers)?;
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

async fn status(State(s): State<AppState>, headers: axum::http::HeaderMap) -> Response {
    let st = &s.stream;
    let received = st.received_lsn();
    let durable = st.durable_lsn();
    let body = serde_json::json!({
        "system_identifier": s.system_identifier.load(Ordering::Acquire).to_string(),
        "timeline": st.timeline.load(Ordering::Acquire),
        "received_lsn": received.to_string(),
        "durable_lsn": durable.to_string(),
        "lag_bytes": received.0.saturating_sub(durable.0),
        "segments_uploaded": st.segments_uploaded.get(),
        "partial_uploads": st.partial_uploads.get(),
        "partial_pieces": st.partial_pieces.get(),
        "partial_bytes_uploaded": st.partial_bytes_uploaded.get(),
        "upload_errors": st.upload_errors.get(),
        "reconnects": st.reconnects.get(),
        "spooled_segments": st.spooled_segments.load(Ordering::Relaxed),
        "uploads_in_flight": st.uploads_in_flight.load(Ordering::Relaxed),
        "uploads_in_flight_max": st.uploads_in_flight_max.load(Ordering::Relaxed),
        "last_upload_unix": st.last_upload_unix.load(Ordering::Relaxed),
        "stream_error": st.problem().map(|p| p.message),
        "checks": s.jobs.checks.snapshot(),
    })
    .to_string();
    let r = ([(header::CONTENT_TYPE, "application/json")], body.clone()).into_response();
    with_proof(&s, &headers, body.as_bytes(), r)
}

async fn metrics(State(s): State<AppState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.render(),
    )
}

/// The archive of the cluster the daemon serves (its own once identified).
fn archive(s: &AppState) -> Result<Archive, ApiError> {
    match s.system_identifier.load(Ordering::Acquire) {
        0 => Err(ApiError::Unavailable(
            "the cluster is not identified yet".into(),
        )),
        id => Ok(Archive::new(s.repo.clone(), id)),
    }
}

#[derive(serde::Deserialize)]
pub struct MarkQuery {
    name: String,
    #[serde(default)]
    note: String,
}

/// `POST /marks?name=NAME&note=TEXT`: `pgkeep mark` (201 with the mark once its WAL is in
/// storage; 400 for a bad name, 409 for a taken one, 504 when the WAL does not arrive in 60 s).
async fn take_mark(
    State(s): State<AppState>,
    headers: axum::http::HeaderMap,
    axum::extract::Query(q): axum::extract::Query<MarkQuery>,
) -> Result<Response, ApiError> {
    authorized(&s, &headers)?;
    crate::mark::check_name(&q.name).map_err(ApiError::BadRequest)?;
    crate::mark::check_note(&q.note).map_err(ApiError::BadRequest)?;
    let archive = archive(&s)?;
    if archive
        .mark(&q.name)
        .await
        .map_err(|e| ApiError::Storage(e.to_string()))?
        .is_some()
    {
        return Err(ApiError::Conflict(format!(
            "a mark named {:?} exists already",
            q.name
        )));
    }
    // Apart from the request, as a backup: a client that goes away does not stop it half-way.
    let (cfg, repo) = (s.cfg.clone(), s.repo.clone());
    let result = tokio::spawn(async move {
        let opts = crate::mark::MarkOptions {
            note: q.note.clone(),
            timeout: std::time::Duration::from_secs(60),
            ..Default::default()
        };
        crate::mark::take_mark(&cfg, &repo, &q.name, &opts).await
    })
    .await
    .map_err(|e| ApiError::Storage(format!("the mark task failed: {e}")))?;
    match result {
        Ok(m) => Ok((StatusCode::CREATED, axum::Json(m)).into_response()),
        Err(e) if e.downcast_ref::<crate::mark::NotDurable>().is_some() => {
            Ok((StatusCode::GATEWAY_TIMEOUT, format!("{e:#}\n")).into_response())
        }
        Err(e) if e.downcast_ref::<crate::mark::Taken>().is_some() => {
            Err(ApiError::Conflict(format!("{e:#}")))
        }
        Err(e) => Err(ApiError::Storage(format!("{e:#}"))),
    }
}

/// `GET /backups`: what `pgkeep list --json` prints.
async fn list_backups(State(s): State<AppState>) -> Result<Response, ApiError> {
    let archive = archive(&s)?;
    let storage = |e: anyhow::Error| ApiError::Storage(format!("{e:#}"));
    archive
        .repo()
        .check_format()
        .await
        .map_err(|e| storage(e.into()))?;
    let inv = crate::list::inventory(&archive).await.map_err(storage)?;
    Ok(axum::Json(inv).into_response())
}

/// `POST /backups`: takes a base backup now (then applies retention); answers when it exists.
async fn take_backup(
    State(s): State<AppState>,
    headers: axum::http::HeaderMap,
) -> Result<Response, ApiError> {
    authorized(&s, &headers)?;
    // Apart from the request: a client that goes away does not cancel a backup half-way.
    let jobs = s.jobs.clone();
    let result = tokio::spawn(async move { jobs.backup_now().await })
        .await
        .map_err(|e| ApiError::Storage(format!("the backup task failed: {e}")))?;
    match result {
        Ok(id) => Ok((
            StatusCode::CREATED,
            axum::Json(serde_json::json!({ "id": id })),
        )
            .into_response()),
        Err(e) => Err(ApiError::Storage(format!("{e:#}"))),
    }
}

#[derive(serde::Deserialize)]
pub struct ArchivedQuery {
    system_identifier: u64,
    sha256: String,
}

/// How long `/archived` waits for the upload of a segment the stream is about to store.
const ARCHIVED_WAIT: std::time::Duration = std::time::Duration::from_secs(20);

/// `GET /archived/{segment}?system_identifier=ID&sha256=HEX`, for `archive-push`: 200 (with the
/// daemon's proof) when this daemon's stream stored that segment with exactly that content,
/// waiting up to 20 s for an upload the stream is about to make; 404 when it did not; 409 when it stored
/// other content or serves another cluster.
async fn archived(
    State(s): State<AppState>,
    headers: axum::http::HeaderMap,
    Path(name): Path<String>,
    axum::extract::Query(q): axum::extract::Query<ArchivedQuery>,
) -> Result<Response, ApiError> {
    use crate::wal::stored::Stored;
    let name: WalFileName = name
        .parse()
        .map_err(|e: crate::pg::ParseError| ApiError::BadRequest(e.to_string()))?;
    if name.kind != crate::pg::WalFileKind::Segment {
        return Err(ApiError::BadRequest(format!(
            "{name}: only complete segments are streamed"
        )));
    }
    let sha: [u8; 32] = hex::decode(&q.sha256)
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| ApiError::BadRequest("sha256: not 64 hex digits".into()))?;
    match s.system_identifier.load(Ordering::Acquire) {
        0 => {
            return Err(ApiError::Unavailable(
                "the cluster is not identified yet".into(),
            ));
        }
        own if own != q.system_identifier => {
            return Err(ApiError::Conflict(format!(
                "this daemon serves cluster {own}, not {}",
                q.system_identifier
            )));
        }
        _ => {}
    }
    let stream = s.stream.clone();
    let answer = s
        .stream
        .stored
        .wait_for(&name, &sha, ARCHIVED_WAIT, || stream.streamed_into(&name))
        .await;
    match answer {
        Stored::Same => {
            let subject = crate::http_token::archived_subject(&name.to_string(), &q.sha256);
            Ok(with_proof(
                &s,
                &headers,
                &subject,
                "stored\n".into_response(),
            ))
        }
        Stored::Differs => Err(ApiError::Conflict(format!(
            "{name}: this daemon stored other content"
        ))),
        Stored::Unknown => Err(ApiError::NotFound(name.to_string())),
    }
}

#[derive(serde::Deserialize)]
pub struct WalQuery {
    /// The cluster the client expects; another one is refused (409) so the client reads storage.
    system_identifier: Option<u64>,
    /// The identity of the client's hand-off directory: when it is the daemon's, a prefetched
    /// segment is left there for it to take ([`crate::wal::fetch::IN_HANDOFF_STATUS`]).
    handoff: Option<String>,
}

/// `GET|HEAD /wal/{name}`: a WAL file's stored object as it is (header, encoded and perhaps
/// encrypted content; checked as far as is possible without a key), for `wal-fetch` to verify,
/// decrypt and decode (axum answers HEAD from the GET route without a body), with
/// `x-pgkeep-served`, the name it was stored under (a segment's `.partial` when only that exists).
async fn wal(
    State(s): State<AppState>,
    headers: axum::http::HeaderMap,
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
    let Ok(permit) = s.wal_bodies.clone().try_acquire_owned() else {
        return Err(ApiError::Unavailable(format!(
            "{} WAL files are being sent already: try again",
            crate::http_limits::MAX_WAL_BODIES
        )));
    };
    match s
        .prefetch
        .get(
            &Archive::new(s.repo.clone(), sysid),
            &name,
            crate::pg::WalSegSize::new(
                s.stream.seg_size.load(std::sync::atomic::Ordering::Acquire),
            ),
            q.handoff
                .as_deref()
                .is_some_and(|id| s.prefetch.shares_dir(id)),
        )
        .await
    {
        // Nothing to prove: the client checks the file it takes as it checks any prefetched one.
        Ok(None) => Ok(
            axum::http::StatusCode::from_u16(crate::wal::fetch::IN_HANDOFF_STATUS)
                .expect("a valid status")
                .into_response(),
        ),
        Ok(Some(f)) => {
            // The streamed `.partial` comes with the pieces that continue it, their objects
            // after its own in the body, their starts and sizes in `x-pgkeep-pieces`.
            let pieces = f.pieces_header();
            let served = crate::wal::fetch::served_subject(&f.served, &pieces);
            let body = if f.pieces.is_empty() {
                f.stored.clone()
            } else {
                let mut all = Vec::with_capacity(
                    f.stored.len() + f.pieces.iter().map(|p| p.stored.len()).sum::<usize>(),
                );
                all.extend_from_slice(&f.stored);
                for p in &f.pieces {
                    all.extend_from_slice(&p.stored);
                }
                bytes::Bytes::from(all)
            };
            let subject = crate::http_token::wal_subject(&served, &body);
            let mut r = (
                [
                    (
                        header::CONTENT_TYPE,
                        crate::wal::fetch::OBJECT_CONTENT_TYPE.to_string(),
                    ),
                    (
                        header::HeaderName::from_static("x-pgkeep-served"),
                        f.served.to_string(),
                    ),
                    (header::CONTENT_LENGTH, body.len().to_string()),
                ],
                crate::http_limits::body_with_permit(body, permit),
            )
                .into_response();
            if !pieces.is_empty() {
                r.headers_mut().insert(
                    header::HeaderName::from_static(crate::wal::fetch::PIECES_HEADER),
                    header::HeaderValue::from_str(&pieces).expect("digits, colons and commas"),
                );
            }
            Ok(with_proof(&s, &headers, &subject, r))
        }
        // Proven too: a wal-fetch that may not read storage itself (wal_fetch_storage = false)
        // takes it as "not in the archive".
        Err(FetchError::NotInArchive(_)) => {
            // "Not in the archive" only of an archive that exists: a wrong prefix or another
            // cluster's storage is a misconfiguration, never the end of recovery.
            let archive = Archive::new(s.repo.clone(), sysid);
            match archive.is_described().await {
                Ok(true) => {}
                Ok(false) => {
                    return Err(ApiError::Unavailable(format!(
                        "storage {} holds no archive for cluster {sysid}",
                        s.repo.url()
                    )));
                }
                Err(e) => return Err(ApiError::Storage(e.to_string())),
            }
            let subject = crate::http_token::absent_subject(&name.to_string());
            let r = ApiError::NotFound(name.to_string()).into_response();
            Ok(with_proof(&s, &headers, &subject, r))
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
                .insert(ConnectInfo(crate::http_limits::Peer::new(
                    p.parse::<std::net::SocketAddr>().unwrap(),
                )));
        }
        app.oneshot(req).await.unwrap().status()
    }

    #[tokio::test]
    async fn wal_bodies_past_the_cap_are_refused_at_once() {
        let app = Router::new()
            .route("/wal/{name}", get(wal))
            .with_state(test_state(0));
        let req = axum::extract::Request::builder()
            .uri("/wal/000000010000000000000001?system_identifier=42")
            .body(axum::body::Body::empty())
            .unwrap();
        let resp = app.oneshot(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    }

    /// The daemon's state over an empty file:// store, with `bodies` WAL-body permits.
    fn test_state(bodies: usize) -> AppState {
        let dir = tempfile::tempdir().unwrap().keep();
        let cfg = crate::config::Config::load(
            None,
            [(
                "PGKEEP_STORAGE".to_string(),
                format!("file://{}", dir.display()),
            )],
        )
        .unwrap();
        let repo = Repo::open(&cfg.storage_settings(), true).unwrap();
        let cfg = Arc::new(cfg);
        let stream = Arc::new(StreamState::default());
        let token = tokio_util::sync::CancellationToken::new();
        let jobs = Arc::new(Jobs::new(
            cfg.clone(),
            repo.clone(),
            stream.clone(),
            token.clone(),
            token,
        ));
        let prefetch = Arc::new(
            crate::wal::prefetch::Prefetcher::new(dir.join("prefetch"), 0, 1 << 30).unwrap(),
        );
        AppState {
            metrics: Arc::new(Metrics::new(stream.clone(), jobs.clone(), &prefetch)),
            stream,
            jobs,
            repo,
            system_identifier: Arc::new(std::sync::atomic::AtomicU64::new(0)),
            cfg,
            prefetch,
            wal_bodies: Arc::new(tokio::sync::Semaphore::new(bodies)),
            token: None,
        }
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
