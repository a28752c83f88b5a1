//! `search-r3 serve`: a text-embeddings-inference- and OpenAI-compatible embedding server that
//! also searches an index with the model's reasoning.
//!
//! A request's path: `routes` validates and tokenizes it → `queue` (bounded; full → 429) → a
//! model worker thread batches it with other queued requests under a token budget and runs
//! the forward pass or the reasoning → the handler looks the vector up in the index
//! (`/search`) or writes it there (`/index/upsert`, persisted atomically before answering).
//! Shutdown stops accepting, closes idle and stalled connections at once, lets in-flight
//! requests finish, drains the queue, joins the workers and flushes the index.
//!
//! Hostile clients are bounded at every stage (docs/security.md lists what was tried): at most
//! `--max-connections` connections, headers within `--header-read-timeout`, a body within
//! `--body-read-timeout` and `--payload-limit`, every text within `--max-input-bytes` before it
//! is tokenized (as text only, on a blocking thread), a request within `--max-batch-tokens`
//! tokens and `--request-timeout`; a model batch whose clients have all gone stops between
//! forward passes.
//!
//! Modules, in TEI's router / queue / backend terms:
//! - `routes`: the router's HTTP handlers (validation, tokenization, the index).
//! - `api`: the router's request and response bodies (TEI's, OpenAI's and ours).
//! - `error`: the router's error answers, TEI's `{"error", "error_type"}` and status codes.
//! - `queue`: the queue and dynamic batching in front of the backend's worker threads.
//! - `limits`: [`Limits`], the queue's and the router's limits (flags, options and `/info`).
//! - `metrics`: the Prometheus metrics of the router and the queue.
//! - `page`: the search page at `GET /`, built into the binary.
//! - [`loadgen`]: a closed-loop load generator for the router (`search-r3 bench serve`).
//!
//! The backend is [`Backend`] (the model and, optionally, the index); [`Server`] binds the
//! router and runs it until shutdown.

mod api;
mod error;
mod limits;
pub mod loadgen;
mod metrics;
mod page;
mod queue;
mod routes;

pub use limits::Limits;

use crate::api::{IndexInfo, Info, ModelType, Pooling};
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::queue::Queue;
use anyhow::Context;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use search_r3_core::embedder::Embedder;
use search_r3_core::load::{load_embedder, EmbedderOptions, ModelIdentity};
use search_r3_core::searcher::Searcher;
use search_r3_index::{HnswParams, IndexKind};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use utoipa::OpenApi;

/// Server settings: where to listen, the API key and the [`Limits`].
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Address to listen on (port 0 picks a free one).
    pub addr: SocketAddr,
    /// When set, every route but `/health` and the page (`GET /`) needs `Authorization: Bearer
    /// <key>` (`serve` reads it from `SEARCH_R3_API_KEY`; a `--api-key` flag is visible in the
    /// process list).
    pub api_key: Option<String>,
    /// Limits and batching (`max_input_length` unset: the index's document limit, or 512).
    pub limits: Limits,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            addr: SocketAddr::from(([127, 0, 0, 1], 3000)),
            api_key: None,
            limits: Limits::default(),
        }
    }
}

/// What the server runs: the embedder, its identity and, optionally, an index.
pub struct Backend {
    /// The embedder when there is no index (an index holds its own).
    embedder: Option<Arc<Embedder>>,
    identity: ModelIdentity,
    index: Option<Searcher>,
}

impl Backend {
    /// Loads `model` (+ adapter). With `index`, opens the index there (its model, adapter and
    /// templates must match) or, when the directory holds none, creates an empty one to fill
    /// through `/index/upsert`.
    pub fn open(
        model: &str,
        opts: &EmbedderOptions,
        index: Option<&Path>,
    ) -> anyhow::Result<Backend> {
        match index {
            // The path every command opens an index by: an interrupted save is recovered
            // first, so an index that survives only in its `.NAME.old-*` copy is opened, not
            // replaced by an empty one.
            Some(dir) => {
                let s = Searcher::open_or_create(
                    dir,
                    model,
                    opts,
                    IndexKind::Hnsw,
                    HnswParams::default(),
                )
                .with_context(|| format!("opening or creating the index in {}", dir.display()))?;
                Ok(Backend {
                    embedder: None,
                    identity: s.identity().clone(),
                    index: Some(s),
                })
            }
            None => {
                let (e, identity) = load_embedder(model, opts)?;
                Ok(Backend {
                    embedder: Some(Arc::new(e)),
                    identity,
                    index: None,
                })
            }
        }
    }

    fn embedder_slot(&mut self) -> &mut Arc<Embedder> {
        match (&mut self.index, &mut self.embedder) {
            (Some(s), _) => &mut s.embedder,
            (None, Some(e)) => e,
            (None, None) => unreachable!("a backend has an index or its own embedder"),
        }
    }
}

/// Shared by every handler.
pub(crate) struct AppState {
    embedder: Arc<Embedder>,
    index: Option<RwLock<Searcher>>,
    queue: Queue,
    opts: ServeOptions,
    /// `opts.limits.max_input_length`, or the embedder's document limit.
    max_input_length: usize,
    /// `opts.limits.max_input_bytes`, or [`BYTES_PER_TOKEN`] × `max_input_length`.
    max_input_bytes: usize,
    /// SHA-256 of the API key: compared digest to digest, so the time taken says nothing
    /// about the key, not even its length.
    key_digest: Option<[u8; 32]>,
    metrics: Arc<Metrics>,
    info: Info,
    /// Set when an index write reached memory but not disk (a failed save); shutdown retries.
    dirty: AtomicBool,
    /// Becomes true when shutdown begins: connections and body reads waiting on it end.
    closing: watch::Sender<bool>,
}

/// The default `--max-input-bytes` per token of `--max-input-length`: a byte-level BPE token of
/// ordinary text covers 3–6 bytes, so only degenerate text (long runs of one character) reaches
/// it.
pub const BYTES_PER_TOKEN: usize = 32;

fn digest(key: &str) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(key.as_bytes()).into()
}

impl AppState {
    /// Saves the index; on failure remembers to retry at shutdown.
    fn persist(&self, s: &mut Searcher) -> Result<(), ApiError> {
        self.metrics.index_documents.set(s.len() as i64);
        match s.save() {
            Ok(()) => {
                self.dirty.store(false, Ordering::SeqCst);
                Ok(())
            }
            Err(e) => {
                self.dirty.store(true, Ordering::SeqCst);
                Err(ApiError::backend(format!(
                    "the index changed in memory but could not be saved: {e}"
                )))
            }
        }
    }
}

/// The OpenAPI description of every route.
#[derive(OpenApi)]
#[openapi(
    info(title = "search-r3", description = "Search-R3 embeddings (TEI- and OpenAI-compatible) and search with the model's reasoning."),
    paths(routes::embed, routes::embed_all, routes::similarity, routes::decode, routes::compat,
          routes::openai_embeddings, routes::search, routes::upsert, routes::delete,
          routes::tokenize, routes::info, routes::health, routes::metrics),
    components(schemas(error::ErrorBody)),
    modifiers(&BearerAuth)
)]
struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, api: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let c = api.components.get_or_insert_with(Default::default);
        c.add_security_scheme(
            "api_key",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// The OpenAPI document served at `/openapi.json`.
pub(crate) fn openapi_doc() -> utoipa::openapi::OpenApi {
    let mut doc = ApiDoc::openapi();
    doc.info.version = env!("CARGO_PKG_VERSION").to_string();
    doc
}

/// Constant-time equality of two digests.
fn ct_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn auth(State(s): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    if let Some(key) = &s.key_digest {
        // The page holds no data and must load before it can ask for the key; `POST /` is an
        // API route and needs it.
        let page = req.uri().path() == "/"
            && matches!(
                *req.method(),
                axum::http::Method::GET | axum::http::Method::HEAD
            );
        if req.uri().path() != "/health" && !page {
            let given = req
                .headers()
                .get(axum::http::header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                // The scheme name is case-insensitive (RFC 9110).
                .and_then(|v| v.split_once(' '))
                .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
                .map(|(_, token)| token);
            if !given.is_some_and(|g| ct_eq(&digest(g.trim()), key)) {
                return ApiError::unauthorized().into_response();
            }
        }
    }
    next.run(req).await
}

/// Ends a request that runs past `--request-timeout` with 503; dropping its handler drops its
/// queued job, or cancels the model batch it runs in once no other client waits on it.
async fn deadline(State(s): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let secs = s.opts.limits.request_timeout;
    match tokio::time::timeout(Duration::from_secs(secs), next.run(req)).await {
        Ok(resp) => resp,
        Err(_) => ApiError::timeout(
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            format!("the request took longer than {secs} s (--request-timeout)"),
        )
        .closing()
        .into_response(),
    }
}

async fn observe(State(s): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |p| p.as_str())
        .to_string();
    let t0 = Instant::now();
    let resp = next.run(req).await;
    s.metrics
        .latency
        .with_label_values(&[&route])
        .observe(t0.elapsed().as_secs_f64());
    s.metrics
        .requests
        .with_label_values(&[&route, resp.status().as_str()])
        .inc();
    resp
}

/// A bound server, ready to [`Server::run`].
pub struct Server {
    listener: tokio::net::TcpListener,
    state: Arc<AppState>,
    router: Router,
}

impl Server {
    /// Starts the model workers and binds `opts.addr`.
    pub async fn bind(mut backend: Backend, opts: ServeOptions) -> anyhow::Result<Server> {
        let metrics = Arc::new(Metrics::new());
        let limits = opts.limits;
        let slot = backend.embedder_slot();
        if let Some(e) = Arc::get_mut(slot) {
            e.batch_tokens = limits.max_forward_tokens.max(1);
        }
        let embedder = slot.clone();
        let max_input_length = limits.max_input_length.unwrap_or(embedder.max_doc_tokens);
        let max_input_bytes = limits
            .max_input_bytes
            .unwrap_or(BYTES_PER_TOKEN * max_input_length);
        let index = backend.index;
        let queue = Queue::start(embedder.clone(), &limits, metrics.clone());
        let id = &backend.identity;
        let info = Info {
            model_id: id.spec.clone(),
            served_model_name: id.spec.clone(),
            model_sha: id.sha256.clone(),
            adapter_sha: id.adapter.clone(),
            model_dtype: format!("{:?}", embedder.model.model.dtype()).to_lowercase(),
            model_type: ModelType {
                embedding: Pooling {
                    pooling: "embed_token".into(),
                },
            },
            dimensions: embedder.dim(),
            limits: Limits {
                max_input_length: Some(max_input_length),
                max_input_bytes: Some(max_input_bytes),
                workers: limits.workers.max(1),
                ..limits
            },
            max_reasoning_tokens: embedder
                .reason_mode
                .max_tokens
                .unwrap_or(embedder.templates.reason.max_reasoning_tokens),
            reasoning_mode: embedder.reason_mode.name(),
            query_adapter_sha: id.query_adapter.clone(),
            index: index.as_ref().map(|s| IndexInfo {
                path: s.dir().display().to_string(),
                kind: format!("{:?}", s.meta.kind).to_lowercase(),
                documents: s.len(),
            }),
            version: env!("CARGO_PKG_VERSION").to_string(),
            tokenization_workers: std::thread::available_parallelism().map_or(1, |n| n.get()),
        };
        if let Some(s) = &index {
            metrics.index_documents.set(s.len() as i64);
        }
        let state = Arc::new(AppState {
            embedder,
            index: index.map(RwLock::new),
            queue,
            key_digest: opts.api_key.as_deref().map(digest),
            opts: opts.clone(),
            max_input_length,
            max_input_bytes,
            metrics,
            info,
            dirty: AtomicBool::new(false),
            closing: watch::channel(false).0,
        });
        let router = Router::new()
            .route("/embed", post(routes::embed))
            // TEI's compatibility route (Hugging Face's inference clients post here).
            .route("/", post(routes::compat))
            .route("/embed_all", post(routes::embed_all))
            .route("/similarity", post(routes::similarity))
            .route("/decode", post(routes::decode))
            .route("/v1/embeddings", post(routes::openai_embeddings))
            .route("/embeddings", post(routes::openai_embeddings))
            .route("/search", post(routes::search))
            .route("/index/upsert", post(routes::upsert))
            .route("/index/delete", post(routes::delete))
            .route("/tokenize", post(routes::tokenize))
            .route("/info", get(routes::info))
            .route("/health", get(routes::health))
            .route("/metrics", get(routes::metrics))
            .route("/openapi.json", get(routes::openapi))
            .route("/", get(page::page))
            .fallback(routes::not_found)
            .method_not_allowed_fallback(routes::method_not_allowed)
            .layer(DefaultBodyLimit::max(limits.payload_limit))
            .layer(axum::middleware::from_fn_with_state(state.clone(), auth))
            .layer(axum::middleware::from_fn_with_state(
                state.clone(),
                deadline,
            ))
            // Outermost, so refused requests (401, 413, 429) are counted too.
            .layer(axum::middleware::from_fn_with_state(state.clone(), observe))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind(opts.addr)
            .await
            .with_context(|| format!("binding {}", opts.addr))?;
        Ok(Server {
            listener,
            state,
            router,
        })
    }

    /// The bound address (the real port when 0 was asked for).
    pub fn addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("bound socket")
    }

    /// Serves until `shutdown` resolves; then closes idle and stalled connections, lets
    /// in-flight requests finish (dropping them after `--shutdown-timeout`), drains the queue,
    /// stops the workers and flushes the index.
    pub async fn run(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let state = self.state.clone();
        let limits = state.opts.limits;
        let permits = Arc::new(Semaphore::new(limits.max_connections.max(1)));
        let mut conns = JoinSet::new();
        let mut permit: Option<OwnedSemaphorePermit> = None;
        tokio::pin!(shutdown);
        // A permit is taken before a connection is accepted, so past the limit new
        // connections wait in the listen backlog instead of being read.
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
                p = permits.clone().acquire_owned(), if permit.is_none() => {
                    permit = Some(p.expect("the semaphore is never closed"));
                }
                r = self.listener.accept(), if permit.is_some() => match r {
                    Ok((stream, _)) => {
                        let permit = permit.take().expect("checked above");
                        let (router, rx) = (self.router.clone(), state.closing.subscribe());
                        conns.spawn(connection(stream, router, limits, rx, permit));
                    }
                    // Out of file descriptors and the like: back off instead of spinning.
                    Err(e) => {
                        tracing::warn!("accepting a connection failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
            }
        }
        drop(self.listener);
        state.closing.send_replace(true);
        tracing::info!("shutting down: finishing in-flight requests");
        let grace = limits.shutdown_timeout;
        let drained =
            tokio::time::timeout(grace, async { while conns.join_next().await.is_some() {} }).await;
        if drained.is_err() {
            tracing::warn!("in-flight requests still open after {grace:?}: dropping them");
            conns.abort_all();
        }
        // Whatever happened to HTTP, the queued jobs are finished and the index flushed.
        state.queue.shutdown().await;
        if let Some(lock) = &state.index {
            let mut s = lock
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            // Every write was saved before it was answered; only a failed save is left over.
            if state.dirty.load(Ordering::SeqCst) {
                s.save().context("flushing the index at shutdown")?;
            }
        }
        tracing::info!("stopped");
        Ok(())
    }
}

/// Counts a connection's requests in flight while the guard lives.
struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    fn enter(n: &Arc<AtomicUsize>) -> InFlight {
        n.fetch_add(1, Ordering::SeqCst);
        InFlight(n.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Serves one HTTP/1 connection: its headers must arrive within `--header-read-timeout` (hyper
/// closes it otherwise). At shutdown a connection with no request in flight — idle, or
/// stalled before its request reached a handler — is closed at once; one with a request
/// finishes it and then closes.
async fn connection(
    stream: tokio::net::TcpStream,
    router: Router,
    limits: Limits,
    mut closing: watch::Receiver<bool>,
    _permit: OwnedSemaphorePermit,
) {
    // Small JSON answers: send them without waiting for Nagle.
    let _ = stream.set_nodelay(true);
    let busy = Arc::new(AtomicUsize::new(0));
    let service = {
        let busy = busy.clone();
        hyper::service::service_fn(move |req: axum::http::Request<Incoming>| {
            use tower_service::Service;
            let guard = InFlight::enter(&busy);
            let mut router = router.clone();
            async move {
                let _guard = guard;
                router.call(req).await
            }
        })
    };
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(limits.header_read_timeout));
    let conn = http.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!("connection ended: {e}");
            }
            return;
        }
        _ = closing.wait_for(|c| *c) => {}
    }
    if busy.load(Ordering::SeqCst) == 0 {
        return;
    }
    conn.as_mut().graceful_shutdown();
    if let Err(e) = conn.await {
        tracing::debug!("connection ended: {e}");
    }
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_compared_as_fixed_length_digests() {
        let key = digest("s3cret-key");
        assert!(ct_eq(&digest("s3cret-key"), &key));
        // Shorter, longer and same-length keys all reach the same 32-byte comparison.
        for other in ["", "s3cret-ke", "s3cret-keyy", "S3CRET-KEY"] {
            assert!(!ct_eq(&digest(other), &key), "{other:?}");
        }
    }
}
