//! HTTP routes of the control API: parse, build a [`Command`], execute,
//! map the result. No logic lives here.

use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::RawQuery;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use super::access::{self, OwnerOnly, Peer, TcpAccess, TlsListener};
use super::{ApiError, BitmapAdd, Command, Control, JobAction, MergeBody, Size, StartJob};
use crate::config::{ControlConfig, ListenAddr};

/// The committed OpenAPI document (`agent/openapi.json`).
pub const OPENAPI: &str = include_str!("../../openapi.json");

/// Largest request body accepted.
const BODY_LIMIT: usize = 64 << 10;

type Ctl = State<Arc<Control>>;

/// The `/v1` routes.
pub fn router(control: Arc<Control>, shutdown: CancellationToken) -> Router {
    Router::new()
        .route("/v1/events", get(move |s: Ctl| events(s, shutdown.clone())))
        .route(
            "/v1/openapi.json",
            get(|| async { ([(axum::http::header::CONTENT_TYPE, "application/json")], OPENAPI) }),
        )
        .route("/v1/status", get(|s: Ctl| run(s, Command::Status)))
        .route("/v1/disks", get(|s: Ctl| run(s, Command::Disks)))
        .route(
            "/v1/disks/{vm}/{disk}",
            get(|s: Ctl, Path((vm, d)): Path<(String, String)>| run(s, Command::Disk(format!("{vm}/{d}")))),
        )
        .route("/v1/disks/{vm}/{disk}/bitmaps", get(list_bitmaps).post(add_bitmap))
        .route("/v1/disks/{vm}/{disk}/chain", get(chain))
        .route(
            "/v1/disks/{vm}/{disk}/backups",
            get(|s: Ctl, Path((vm, d)): Path<(String, String)>| run(s, Command::Backups(format!("{vm}/{d}")))),
        )
        .route("/v1/disks/{vm}/{disk}/fence", post(fence).delete(unfence))
        .route("/v1/disks/{vm}/{disk}/resize", post(resize))
        .route("/v1/disks/{vm}/{disk}/bitmaps/{name}", get(get_bitmap).delete(remove_bitmap))
        // Actions with a body have a route (and an OpenAPI operation) of their own.
        .route("/v1/disks/{vm}/{disk}/bitmaps/{name}/merge", post(merge_bitmap))
        .route("/v1/disks/{vm}/{disk}/bitmaps/{name}/{action}", post(bitmap_action))
        .route("/v1/jobs", get(list_jobs).post(start_job))
        .route("/v1/jobs/{id}", get(get_job))
        .route("/v1/jobs/{id}/speed", post(set_job_speed))
        .route("/v1/jobs/{id}/copy-mode", post(set_job_copy_mode))
        .route("/v1/jobs/{id}/{action}", post(job_action))
        .route("/v1/migrations", get(|s: Ctl| run(s, Command::Migrations)).post(prepare_migration))
        .route("/v1/migrations/outgoing", get(|s: Ctl| run(s, Command::OutgoingList)).post(start_outgoing))
        .route("/v1/migrations/outgoing/{vm}", get(show_outgoing))
        .route(
            "/v1/migrations/outgoing/{vm}/cutover",
            post(|s: Ctl, Path(vm): Path<String>| run(s, Command::OutgoingCutover(vm))),
        )
        .route(
            "/v1/migrations/outgoing/{vm}/abort",
            post(|s: Ctl, Path(vm): Path<String>| run(s, Command::OutgoingAbort(vm))),
        )
        .route("/v1/migrations/{id}/first-io", get(first_io))
        .route(
            "/v1/migrations/{id}/synced",
            post(|s: Ctl, Path(id): Path<String>| run(s, Command::MigrationSynced(id, true)))
                .delete(|s: Ctl, Path(id): Path<String>| run(s, Command::MigrationSynced(id, false))),
        )
        .route("/v1/migrations/{id}", get(|s: Ctl, Path(id): Path<String>| run(s, Command::Migration(id))))
        .route("/v1/migrations/{id}/complete", post(complete_migration))
        .route("/v1/migrations/{id}/abort", post(|s: Ctl, Path(id): Path<String>| run(s, Command::AbortMigration(id))))
        .fallback(|| async { error(ApiError::NoRoute) })
        .method_not_allowed_fallback(|| async { error(ApiError::MethodNotAllowed) })
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(control)
}

async fn list_bitmaps(s: Ctl, Path((vm, disk)): Path<(String, String)>) -> Response {
    run(s, Command::BitmapList(format!("{vm}/{disk}"))).await
}

async fn add_bitmap(s: Ctl, Path((vm, disk)): Path<(String, String)>, body: Result<Bytes, BytesRejection>) -> Response {
    match body_of(body).and_then(|b| parse::<BitmapAdd>(&b)) {
        Ok(add) => created(run(s, Command::BitmapAdd(format!("{vm}/{disk}"), add)).await),
        Err(e) => error(e),
    }
}

async fn get_bitmap(s: Ctl, Path((vm, disk, name)): Path<(String, String, String)>) -> Response {
    run(s, Command::BitmapGet(format!("{vm}/{disk}"), name)).await
}

async fn remove_bitmap(s: Ctl, Path((vm, disk, name)): Path<(String, String, String)>) -> Response {
    run(s, Command::BitmapRemove(format!("{vm}/{disk}"), name)).await
}

async fn merge_bitmap(
    s: Ctl,
    Path((vm, disk, name)): Path<(String, String, String)>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    match body_of(body).and_then(|b| parse::<MergeBody>(&b)) {
        Ok(m) => run(s, Command::BitmapMerge(format!("{vm}/{disk}"), name, m.sources)).await,
        Err(e) => error(e),
    }
}

/// The actions without a body (`merge` has its own route).
async fn bitmap_action(s: Ctl, Path((vm, disk, name, action)): Path<(String, String, String, String)>) -> Response {
    let disk = format!("{vm}/{disk}");
    let command = match action.as_str() {
        "clear" => Command::BitmapClear(disk, name),
        "enable" => Command::BitmapEnable(disk, name, true),
        "disable" => Command::BitmapEnable(disk, name, false),
        _ => return error(ApiError::NoRoute),
    };
    run(s, command).await
}

/// `name=value` pairs of a query string (no percent-decoding: values here are names and flags).
fn query_params(q: &Option<String>) -> Vec<(String, String)> {
    q.as_deref()
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| p.split_once('=').map_or((p.to_owned(), String::new()), |(k, v)| (k.to_owned(), v.to_owned())))
        .collect()
}

async fn list_jobs(s: Ctl, RawQuery(q): RawQuery) -> Response {
    let mut all = false;
    for (k, v) in query_params(&q) {
        match (k.as_str(), v.as_str()) {
            ("all", "true" | "1" | "") => all = true,
            ("all", "false" | "0") => all = false,
            _ => return error(ApiError::BadRequest(format!("Bad query parameter {k}={v} (expected all=true|false)"))),
        }
    }
    run(s, Command::Jobs(all)).await
}

/// The request body, or the error for one that could not be read (too large).
fn body_of(body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|e| match e.status().as_u16() {
        413 => ApiError::TooLarge(BODY_LIMIT),
        _ => ApiError::BadRequest(format!("Cannot read the request body: {e}")),
    })
}

async fn start_job(s: Ctl, body: Result<Bytes, BytesRejection>) -> Response {
    match body_of(body).and_then(|b| parse::<StartJob>(&b)) {
        Ok(start) => created(run(s, Command::StartJob(start)).await),
        Err(e) => error(e),
    }
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct SpeedBody {
    speed: Size,
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct CopyModeBody {
    copy_mode: crate::jobs::mirror::CopyMode,
}

async fn set_job_speed(s: Ctl, Path(id): Path<String>, body: Result<Bytes, BytesRejection>) -> Response {
    match body_of(body).and_then(|b| parse::<SpeedBody>(&b)).and_then(|b| b.speed.bytes()) {
        Ok(speed) => run(s, Command::JobAction(id, JobAction::SetSpeed(speed))).await,
        Err(e) => error(e),
    }
}

async fn set_job_copy_mode(s: Ctl, Path(id): Path<String>, body: Result<Bytes, BytesRejection>) -> Response {
    match body_of(body).and_then(|b| parse::<CopyModeBody>(&b)) {
        Ok(b) => run(s, Command::JobAction(id, JobAction::SetCopyMode(b.copy_mode))).await,
        Err(e) => error(e),
    }
}

/// The actions without a body (`speed` and `copy-mode` have their own routes).
async fn job_action(s: Ctl, Path((id, action)): Path<(String, String)>) -> Response {
    let action = match action.as_str() {
        "pause" => JobAction::Pause,
        "resume" => JobAction::Resume,
        "cancel" => JobAction::Cancel,
        "complete" => JobAction::Complete,
        _ => return error(ApiError::NoRoute),
    };
    run(s, Command::JobAction(id, action)).await
}

async fn chain(s: Ctl, Path((vm, disk)): Path<(String, String)>, RawQuery(q): RawQuery) -> Response {
    let mut bitmap = None;
    for (k, v) in query_params(&q) {
        match k.as_str() {
            "bitmap" if !v.is_empty() => bitmap = Some(v),
            _ => return error(ApiError::BadRequest(format!("Bad query parameter {k}={v} (expected bitmap=NAME)"))),
        }
    }
    run(s, Command::Chain(format!("{vm}/{disk}"), bitmap)).await
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct FenceBody {
    target: String,
}

async fn fence(s: Ctl, Path((vm, disk)): Path<(String, String)>, body: Result<Bytes, BytesRejection>) -> Response {
    match body_of(body).and_then(|b| parse::<FenceBody>(&b)) {
        Ok(f) => run(s, Command::Fence(format!("{vm}/{disk}"), f.target)).await,
        Err(e) => error(e),
    }
}

async fn resize(s: Ctl, Path((vm, disk)): Path<(String, String)>, body: Result<Bytes, BytesRejection>) -> Response {
    match body_of(body).and_then(|b| parse::<super::resize::ResizeBody>(&b)) {
        Ok(r) => run(s, Command::Resize(format!("{vm}/{disk}"), r.size)).await,
        Err(e) => error(e),
    }
}

async fn unfence(s: Ctl, Path((vm, disk)): Path<(String, String)>) -> Response {
    run(s, Command::Unfence(format!("{vm}/{disk}"))).await
}

async fn prepare_migration(s: Ctl, body: Result<Bytes, BytesRejection>) -> Response {
    match body_of(body).and_then(|b| parse::<super::Prepare>(&b)) {
        Ok(p) => created(run(s, Command::PrepareMigration(p)).await),
        Err(e) => error(e),
    }
}

async fn start_outgoing(s: Ctl, body: Result<Bytes, BytesRejection>) -> Response {
    match body_of(body).and_then(|b| parse::<super::StartMigration>(&b)) {
        Ok(m) => created(run(s, Command::StartOutgoing(m)).await),
        Err(e) => error(e),
    }
}

/// `?wait=STATE&timeout=SECS`: answers once the state differs from STATE.
async fn show_outgoing(s: Ctl, Path(vm): Path<String>, RawQuery(q): RawQuery) -> Response {
    let (mut wait, mut timeout) = (None, 30);
    for (k, v) in query_params(&q) {
        match k.as_str() {
            "wait" => match serde_json::from_value::<super::OutState>(Value::String(v.clone())) {
                Ok(state) => wait = Some(state),
                Err(_) => return error(ApiError::BadRequest(format!("Unknown state {v:?}"))),
            },
            "timeout" => match v.parse() {
                Ok(t) if t <= 60 => timeout = t,
                _ => return error(ApiError::BadRequest(format!("Bad timeout {v:?} (0 to 60 seconds)"))),
            },
            _ => return error(ApiError::BadRequest(format!("Unknown query parameter {k:?}"))),
        }
    }
    run(s, Command::OutgoingShow(vm, wait, timeout)).await
}

/// `?wait_ms=MS`: answer at the job's end or after that long (long poll);
/// unknown parameters are refused, as on every route here.
async fn get_job(s: Ctl, Path(id): Path<String>, RawQuery(q): RawQuery) -> Response {
    let mut wait_ms = 0;
    for (k, v) in query_params(&q) {
        match (k.as_str(), v.parse()) {
            ("wait_ms", Ok(w)) if w <= 10_000 => wait_ms = w,
            _ => return error(ApiError::BadRequest(format!("Bad query parameter {k}={v} (wait_ms: 0 to 10000)"))),
        }
    }
    run(s, Command::Job(id, wait_ms)).await
}

/// `?wait=SECS` (default 20, at most 60).
async fn first_io(s: Ctl, Path(id): Path<String>, RawQuery(q): RawQuery) -> Response {
    let mut wait = 20;
    for (k, v) in query_params(&q) {
        match (k.as_str(), v.parse()) {
            ("wait", Ok(w)) if w <= 60 => wait = w,
            _ => return error(ApiError::BadRequest(format!("Bad query parameter {k}={v} (wait: 0 to 60 seconds)"))),
        }
    }
    run(s, Command::FirstIo(id, wait)).await
}

/// The body is optional: none means the defaults.
async fn complete_migration(s: Ctl, Path(id): Path<String>, body: Result<Bytes, BytesRejection>) -> Response {
    let complete = body_of(body).and_then(|b| {
        if b.is_empty() {
            Ok(super::Complete::default())
        } else {
            parse::<super::Complete>(&b)
        }
    });
    match complete {
        Ok(c) => run(s, Command::CompleteMigration(id, c)).await,
        Err(e) => error(e),
    }
}

fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::BadRequest(format!("Invalid JSON body: {e}")))
}

/// `GET /v1/events`: server-sent events, one per job or migration state
/// change and per second of a job's progress, until the client leaves or
/// the agent stops (a graceful shutdown must not wait for an open stream).
async fn events(State(control): Ctl, shutdown: CancellationToken) -> Response {
    use axum::response::sse::{Event, KeepAlive, Sse};
    use tokio::sync::broadcast::error::RecvError;
    let rx = control.events().subscribe();
    // The first event says the subscription is in place: a client may act from then on.
    let hello = Event::default().event("subscribed").data(serde_json::json!({ "type": "subscribed" }).to_string());
    let hello = futures_util::stream::once(async move { Ok::<_, std::convert::Infallible>(hello) });
    let stream = futures_util::stream::unfold((rx, shutdown), |(mut rx, shutdown)| async move {
        let event = tokio::select! {
            // Events already published (a job's outcome at shutdown) go out before the end.
            biased;
            got = rx.recv() => match got {
                Ok(v) => Event::default().event(v["type"].as_str().unwrap_or("event")).data(v.to_string()),
                Err(RecvError::Lagged(missed)) => {
                    let body = serde_json::json!({ "type": "lagged", "missed": missed });
                    Event::default().event("lagged").data(body.to_string())
                }
                Err(RecvError::Closed) => return None,
            },
            () = shutdown.cancelled() => return None,
        };
        Some((Ok::<_, std::convert::Infallible>(event), (rx, shutdown)))
    });
    Sse::new(futures_util::StreamExt::chain(hello, stream)).keep_alive(KeepAlive::default()).into_response()
}

/// Carries a command out on a task of its own: a client that disconnects
/// (a killed CLI, a caller's timeout) drops this handler, and must not stop
/// an operation half-way (a prepare between its clone and its record, a
/// migration between its record and its mirrors).
async fn run(State(control): Ctl, command: Command) -> Response {
    let done = tokio::spawn(async move { control.execute(command).await })
        .await
        .unwrap_or_else(|e| Err(ApiError::Internal(format!("the operation panicked: {e}"))));
    match done {
        Ok(Value::Null) => StatusCode::NO_CONTENT.into_response(),
        Ok(value) => Json(value).into_response(),
        Err(e) => error(e),
    }
}

fn created(response: Response) -> Response {
    if response.status() == StatusCode::OK {
        let (mut parts, body) = response.into_parts();
        parts.status = StatusCode::CREATED;
        return Response::from_parts(parts, body);
    }
    response
}

pub(super) fn error(e: ApiError) -> Response {
    let (status, _) = e.status();
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (status, Json(e.body())).into_response()
}

/// Errors starting the control API.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Binding failed.
    #[error("Cannot listen on {addr}")]
    Bind {
        /// Address.
        addr: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A TCP listener without TLS.
    #[error("Control API on TCP ({0}) needs control.tls (cert, key); use a unix: socket otherwise")]
    InsecureTcp(String),
    /// A TCP listener without a way to authenticate clients.
    #[error("Control API on TCP ({0}) needs control.token_file or control.tls.client_ca")]
    NoCredential(String),
    /// The token file is unusable.
    #[error("Control token file {path}: {reason}")]
    Token {
        /// File.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// Certificate, key or CA unusable.
    #[error("Control API TLS: {0}")]
    Tls(#[from] crate::tls::TlsError),
    /// The socket is served by another process.
    #[error("Socket {0} is in use by another process")]
    InUse(String),
}

/// A running control API: its task and bound addresses (`unix:PATH`, `HOST:PORT`).
pub type Served = (tokio::task::JoinHandle<()>, Vec<String>);

/// Binds every control listener and serves until `shutdown`.
pub async fn serve(
    config: &ControlConfig,
    control: Arc<Control>,
    shutdown: CancellationToken,
) -> Result<Served, ServeError> {
    let app = router(control, shutdown.clone());
    let mut tasks = Vec::new();
    let mut bound = Vec::new();
    for addr in &config.listen {
        let bind_err = |source| ServeError::Bind { addr: addr.to_string(), source };
        let stop = shutdown.clone();
        match addr {
            ListenAddr::Tcp(sa) => {
                let access = Arc::new(TcpAccess::load(config, *sa)?);
                let listener = tokio::net::TcpListener::bind(sa).await.map_err(bind_err)?;
                bound.push(listener.local_addr().map_err(bind_err)?.to_string());
                let listener = TlsListener::start(listener, &access, stop.clone()).map_err(bind_err)?;
                let app = app.clone().layer(axum::middleware::from_fn_with_state(access, access::authorize));
                let served = axum::serve(listener, app.into_make_service_with_connect_info::<Peer>())
                    .with_graceful_shutdown(async move { stop.cancelled().await });
                tasks.push(tokio::spawn(async move {
                    if let Err(e) = served.await {
                        tracing::error!(error = %e, "control API failed");
                    }
                }));
            }
            ListenAddr::Unix(path) => {
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir).map_err(bind_err)?;
                }
                if path.exists() {
                    if tokio::net::UnixStream::connect(path).await.is_ok() {
                        return Err(ServeError::InUse(path.display().to_string()));
                    }
                    std::fs::remove_file(path).map_err(bind_err)?;
                }
                let listener = tokio::net::UnixListener::bind(path).map_err(bind_err)?;
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(bind_err)?;
                bound.push(format!("unix:{}", path.display()));
                let (app, path) = (app.clone(), path.clone());
                let served =
                    axum::serve(OwnerOnly(listener), app).with_graceful_shutdown(async move { stop.cancelled().await });
                tasks.push(tokio::spawn(async move {
                    if let Err(e) = served.await {
                        tracing::error!(error = %e, "control API failed");
                    }
                    let _ = std::fs::remove_file(path);
                }));
            }
        }
    }
    let task = tokio::spawn(async move {
        for t in tasks {
            let _ = t.await;
        }
    });
    Ok((task, bound))
}
