//! `search-r3 serve`: a text-embeddings-inference- and OpenAI-compatible embedding server that
//! also searches an index with the model's reasoning.
//!
//! A request's path: `routes` validates and tokenizes it → `queue` (bounded; full → 429) → a
//! model worker thread batches it with other queued requests under a token budget and runs
//! the forward pass or the reasoning → the handler looks the vector up in the index
//! (`/search`) or writes it there (`/index/upsert`, persisted atomically before answering).
//! Shutdown stops accepting, lets in-flight requests finish, drains the queue, joins the
//! workers and flushes the index.
//!
//! Modules, in TEI's router / queue / backend terms:
//! - `routes`: the router's HTTP handlers (validation, tokenization, the index).
//! - `api`: the router's request and response bodies (TEI's, OpenAI's and ours).
//! - `error`: the router's error answers, TEI's `{"error", "error_type"}` and status codes.
//! - `queue`: the queue and dynamic batching in front of the backend's worker threads.
//! - `limits`: [`Limits`], the queue's and the router's limits (flags, options and `/info`).
//! - `metrics`: the Prometheus metrics of the router and the queue.
//! - [`loadgen`]: a closed-loop load generator for the router (`search-r3 bench serve`).
//!
//! The backend is [`Backend`] (the model and, optionally, the index); [`Server`] binds the
//! router and runs it until shutdown.

mod api;
mod error;
mod limits;
pub mod loadgen;
mod metrics;
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
use search_r3_core::embedder::Embedder;
use search_r3_core::load::{load_embedder, EmbedderOptions, ModelIdentity};
use search_r3_core::searcher::Searcher;
use search_r3_index::{HnswParams, IndexKind};
use std::future::IntoFuture;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Instant;
use utoipa::OpenApi;

/// Server settings: where to listen, the API key and the [`Limits`].
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Address to listen on (port 0 picks a free one).
    pub addr: SocketAddr,
    /// When set, every route but `/health` needs `Authorization: Bearer <key>`.
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
    metrics: Arc<Metrics>,
    info: Info,
    /// Set when an index write reached memory but not disk (a failed save); shutdown retries.
    dirty: AtomicBool,
    closing: AtomicBool,
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
    paths(routes::embed, routes::openai_embeddings, routes::search, routes::upsert, routes::delete,
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

fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn auth(State(s): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    if let Some(key) = &s.opts.api_key {
        if req.uri().path() != "/health" {
            let given = req
                .headers()
                .get(axum::http::header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                // The scheme name is case-insensitive (RFC 9110).
                .and_then(|v| v.split_once(' '))
                .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
                .map(|(_, token)| token);
            if !given.is_some_and(|g| ct_eq(g.trim().as_bytes(), key.as_bytes())) {
                return ApiError::unauthorized().into_response();
            }
        }
    }
    next.run(req).await
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
        let index = backend.index;
        let queue = Queue::start(embedder.clone(), &limits, metrics.clone());
        let id = &backend.identity;
        let info = Info {
            model_id: id.spec.clone(),
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
        };
        if let Some(s) = &index {
            metrics.index_documents.set(s.len() as i64);
        }
        let state = Arc::new(AppState {
            embedder,
            index: index.map(RwLock::new),
            queue,
            opts: opts.clone(),
            max_input_length,
            metrics,
            info,
            dirty: AtomicBool::new(false),
            closing: AtomicBool::new(false),
        });
        let router = Router::new()
            .route("/embed", post(routes::embed))
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
            .fallback(routes::not_found)
            .layer(DefaultBodyLimit::max(limits.payload_limit))
            .layer(axum::middleware::from_fn_with_state(state.clone(), auth))
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

    /// Serves until `shutdown` resolves, then finishes in-flight requests, drains the queue,
    /// stops the workers and flushes the index.
    pub async fn run(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let state = self.state.clone();
        let closing = self.state.clone();
        let (signalled, on_signal) = tokio::sync::oneshot::channel::<()>();
        let mut http = tokio::spawn(
            axum::serve(self.listener, self.router)
                .with_graceful_shutdown(async move {
                    shutdown.await;
                    closing.closing.store(true, Ordering::SeqCst);
                    tracing::info!("shutting down: finishing in-flight requests");
                    let _ = signalled.send(());
                })
                .into_future(),
        );
        let grace = state.opts.limits.shutdown_timeout;
        let served = tokio::select! {
            r = &mut http => r.context("the HTTP task failed").and_then(|r| r.context("serving HTTP")),
            _ = async {
                if on_signal.await.is_ok() {
                    tokio::time::sleep(grace).await;
                } else {
                    std::future::pending::<()>().await;
                }
            } => {
                tracing::warn!("in-flight requests still open after {grace:?}: dropping them");
                http.abort();
                Ok(())
            }
        };
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
        served
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
