//! The inference server behind `ferrotune serve` (cargo feature `serve`): axum on tokio.
//!
//! | endpoint | what it answers |
//! |---|---|
//! | `POST /predict` | `{"inputs": "text" \| ["t1", "t2"] \| [["a", "b"]], "raw_scores": false, "truncate": true}` → for each input every label with its score, highest first (one list for a single string input); for a model that reads images, base64 images in `inputs`, `multipart/form-data` file parts or a raw `image/*` body ([`images`]) |
//! | `GET /health` | `{"status": "ok"}` while an inference worker runs, else 503 |
//! | `GET /info` | the model, what it reads, its labels and maximum input length (or image size), and the server's limits |
//! | `GET /metrics` | Prometheus text: requests by status, latency, batch sizes, queue depth |
//! | `GET /openapi.json` | the OpenAPI 3.0 description |
//! | `POST /generate` | a language model (a decoder exported as one, or a pretrained one): Text Generation Inference's request and answer ([`generate`]); such a server has `/generate`, `/health` and `/info` only |
//!
//! Requests are tokenized (images: decoded) as they arrive, on tokio's blocking pool, then
//! queued; inference workers — OS threads, never the async runtime's — take as many queued
//! requests as fit in `max_batch_requests` and `max_batch_tokens` and run them as one batch
//! through [`Predictor::predict_features`], the inference path `ferrotune predict` uses too.
//!
//! Errors are JSON, `{"error": "...", "error_type": "..."}` as in Text Embeddings
//! Inference: 400 (not JSON; for an image model, not base64 or not an image; an image sent
//! to a text model), 422 (wrong shape or types), 413 (body, inputs per request, input
//! length, or an image's bytes or pixels over a limit), 429 with `Retry-After` (too many
//! concurrent requests), 503 (timeout; shutting down), 404, 405; 500 only when inference
//! itself fails.
//! [`Server::serve`] stops on its shutdown future (SIGTERM or SIGINT for `ferrotune serve`):
//! it stops accepting, answers the requests in flight, then returns.

pub mod api;
pub mod batcher;
pub mod generate;
pub mod images;
pub mod metrics;
pub mod openapi;

use std::future::Future;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, MethodRouter};
use axum::{Json, Router};
use serde_json::{json, Value};
use tokenizers::Tokenizer;
use tokio::net::TcpListener;
use tokio::sync::{oneshot, Semaphore};

use crate::data::batch::Features;
use crate::data::image::MAX_PIXELS;
use crate::error::{Error, Result};
use crate::precision::Precision;
use crate::predict::Predictor;
use api::{scores_json, ApiError, Input, PredictRequest};
use batcher::{Job, Limits, Queue};
use images::{BodyKind, ImageLimits, ImageRequest};
use metrics::Metrics;

/// The server's settings (each is a `ferrotune serve` option of the same name).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServeConfig {
    /// Address to listen on.
    pub host: String,
    /// Port to listen on (0: any free port).
    pub port: u16,
    /// Most tokens (before padding) in one batch; a request over it alone runs alone.
    pub max_batch_tokens: usize,
    /// Most requests in one batch (1: no batching).
    pub max_batch_requests: usize,
    /// Most inputs in one request (413 above).
    pub max_inputs_per_request: usize,
    /// Most `POST /predict` requests handled at once (429 with `Retry-After` above).
    pub max_concurrent_requests: usize,
    /// A request not answered within this is a 503.
    pub request_timeout: Duration,
    /// Largest request body (413 above).
    pub max_body_bytes: usize,
    /// Inference threads (each batch is already spread over all cores by the kernels).
    pub workers: usize,
    /// How long a worker with fewer than `max_batch_requests` queued waits for more before
    /// running them (0: run at once with what is queued).
    pub batch_wait: Duration,
    /// Number format ([`Predictor::set_precision`]): `auto` (the default) is int8 for a
    /// quantized model, f32 otherwise.
    pub precision: Precision,
    /// Largest image, in bytes (after base64 decoding), for a model that reads images (413
    /// above). The body limit `max_body_bytes` still bounds the whole request.
    pub max_image_bytes: usize,
    /// Most pixels (width × height) of an image, read from its header before it is
    /// decoded (413 above); at most the decoder's own cap, [`MAX_PIXELS`].
    pub max_image_pixels: u64,
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            host: "127.0.0.1".into(),
            port: 8080,
            // On a CPU a forward pass gains little from more than ~2k tokens (16 inputs of
            // 128): larger batches only add latency (docs/SERVE.md).
            max_batch_tokens: 2048,
            max_batch_requests: 64,
            max_inputs_per_request: 32,
            max_concurrent_requests: 512,
            request_timeout: Duration::from_secs(30),
            max_body_bytes: 2 * 1024 * 1024,
            workers: 1,
            batch_wait: Duration::ZERO,
            precision: Precision::Auto,
            max_image_bytes: 10 << 20,
            max_image_pixels: 16 << 20,
        }
    }
}

impl ServeConfig {
    /// Checks that every limit is at least 1, and the pixel cap at most the decoder's.
    pub fn validate(&self) -> Result<()> {
        if self.max_image_pixels == 0 || self.max_image_pixels > MAX_PIXELS {
            return Err(Error::Config(format!(
                "serve: `max_image_pixels` must be from 1 to {MAX_PIXELS} (the decoder's \
                 limit), not {}",
                self.max_image_pixels
            )));
        }
        for (name, v) in [
            ("max_batch_tokens", self.max_batch_tokens),
            ("max_batch_requests", self.max_batch_requests),
            ("max_inputs_per_request", self.max_inputs_per_request),
            ("max_concurrent_requests", self.max_concurrent_requests),
            ("max_body_bytes", self.max_body_bytes),
            ("max_image_bytes", self.max_image_bytes),
            ("workers", self.workers),
            (
                "request_timeout_ms",
                self.request_timeout.as_millis() as usize,
            ),
        ] {
            if v == 0 {
                return Err(Error::Config(format!("serve: `{name}` must be at least 1")));
            }
        }
        Ok(())
    }
}

/// What every handler shares.
struct Shared {
    predictor: Arc<Predictor>,
    /// The model's tokenizer without truncation, to tell a client how long its input is;
    /// `None` for a model that reads images.
    untruncated: Option<Tokenizer>,
    /// What one image counts as in `max_batch_tokens`: the 16×16 patches of the model's
    /// input (196 at 224×224, at least 1).
    image_cost: usize,
    cfg: ServeConfig,
    queue: Arc<Queue>,
    metrics: Arc<Metrics>,
    permits: Arc<Semaphore>,
    alive: Arc<AtomicUsize>,
    info: Value,
}

/// A model being served: the inference workers and the HTTP routes over them.
///
/// Dropping it closes the queue; the workers finish what is queued, then stop.
pub struct Server {
    shared: Arc<Shared>,
    workers: Vec<std::thread::JoinHandle<()>>,
}

impl Server {
    /// Starts `cfg.workers` inference threads for `predictor`. Each batch is one forward
    /// pass (the predictor's `batch_size` is lifted; `max_batch_tokens` and
    /// `max_batch_requests` bound it instead).
    pub fn new(mut predictor: Predictor, cfg: ServeConfig) -> Result<Server> {
        cfg.validate()?;
        predictor.batch_size = usize::MAX;
        predictor.set_precision(cfg.precision)?;
        let image_size = predictor.encoder.image_eval().map(|p| p.out_size(1, 1));
        let untruncated = match image_size {
            Some(_) => None,
            None => {
                let mut t = predictor.tokenizer()?.clone();
                t.with_truncation(None)
                    .map_err(|e| Error::Msg(format!("tokenizer: {e}")))?;
                Some(t)
            }
        };
        let image_cost = image_size.map_or(1, |(h, w)| (h * w / 256).max(1));
        let mut info = json!({
            "model": predictor.dir.display().to_string(),
            "version": env!("CARGO_PKG_VERSION"),
            "model_type": predictor.family.model_type(),
            "problem_type": predictor.problem_type,
            "labels": predictor.labels,
            "pooling": predictor.info.pooling,
            "input": if image_size.is_some() { "image" } else { "text" },
            "max_input_length": predictor.info.max_seq_length,
            "max_batch_tokens": cfg.max_batch_tokens,
            "max_batch_requests": cfg.max_batch_requests,
            "max_inputs_per_request": cfg.max_inputs_per_request,
            "max_concurrent_requests": cfg.max_concurrent_requests,
            "request_timeout_ms": cfg.request_timeout.as_millis() as u64,
            "max_body_bytes": cfg.max_body_bytes,
            "batch_wait_ms": cfg.batch_wait.as_millis() as u64,
            "workers": cfg.workers,
        });
        if let (Some((h, w)), Value::Object(o)) = (image_size, &mut info) {
            // An image model has no maximum length; it has an input size and image caps.
            o.remove("max_input_length");
            o.insert("image_size".into(), json!([h, w]));
            o.insert("tokens_per_image".into(), json!(image_cost));
            o.insert("max_image_bytes".into(), json!(cfg.max_image_bytes));
            o.insert("max_image_pixels".into(), json!(cfg.max_image_pixels));
        }
        let metrics = Arc::new(Metrics::default());
        let queue = Arc::new(Queue::new(
            Limits {
                max_batch_tokens: cfg.max_batch_tokens,
                max_batch_requests: cfg.max_batch_requests,
                batch_wait: cfg.batch_wait,
            },
            metrics.clone(),
        ));
        let predictor = Arc::new(predictor);
        let alive = Arc::new(AtomicUsize::new(0));
        let mut workers = Vec::new();
        for id in 0..cfg.workers {
            let w = batcher::spawn_worker(
                id,
                queue.clone(),
                predictor.clone(),
                metrics.clone(),
                alive.clone(),
            );
            match w {
                Ok(h) => workers.push(h),
                Err(e) => {
                    queue.close();
                    return Err(Error::Msg(format!("cannot start an inference thread: {e}")));
                }
            }
        }
        let shared = Arc::new(Shared {
            predictor,
            untruncated,
            image_cost,
            permits: Arc::new(Semaphore::new(cfg.max_concurrent_requests)),
            cfg,
            queue,
            metrics,
            alive,
            info,
        });
        Ok(Server { shared, workers })
    }

    /// The HTTP routes (clone it freely; every clone serves the same workers).
    pub fn router(&self) -> Router {
        let s = self.shared.clone();
        Router::new()
            .route("/predict", only(Method::POST, post(predict)))
            .route("/health", only(Method::GET, get(health)))
            .route("/info", only(Method::GET, get(info)))
            .route("/metrics", only(Method::GET, get(metrics_text)))
            .route("/openapi.json", only(Method::GET, get(openapi)))
            .fallback(not_found)
            .layer(DefaultBodyLimit::max(s.cfg.max_body_bytes))
            .layer(axum::middleware::from_fn_with_state(s.clone(), track))
            .with_state(s)
    }

    /// Serves on `listener` until `shutdown` completes; then stops accepting, answers the
    /// requests in flight (queued requests run at once, without `batch_wait`; waiting at
    /// most the request timeout and 5 s more), stops the workers and returns.
    pub async fn serve(
        mut self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<()> {
        let (started_tx, started_rx) = oneshot::channel::<()>();
        let queue = self.shared.queue.clone();
        let signal = async move {
            shutdown.await;
            queue.drain();
            let _ = started_tx.send(());
        };
        let drain_limit = self.shared.cfg.request_timeout + Duration::from_secs(5);
        let served = axum::serve(listener, self.router()).with_graceful_shutdown(signal);
        let drained = async move {
            if started_rx.await.is_ok() {
                tokio::time::sleep(drain_limit).await;
            } else {
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            r = served => r.map_err(|e| Error::Msg(format!("server: {e}")))?,
            _ = drained => {}
        }
        self.shared.queue.close();
        let workers = std::mem::take(&mut self.workers);
        tokio::task::spawn_blocking(move || {
            for w in workers {
                let _ = w.join();
            }
        })
        .await
        .map_err(|e| Error::Msg(format!("stopping the inference threads: {e}")))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shared.queue.close();
    }
}

/// Completes on SIGTERM or SIGINT (Ctrl-C). The handlers are installed when this is called
/// (inside a tokio runtime), so a signal sent afterwards is never lost.
pub fn shutdown_signal() -> std::io::Result<impl Future<Output = ()> + Send + 'static> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        Ok(async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        })
    }
    #[cfg(not(unix))]
    {
        Ok(async move {
            let _ = tokio::signal::ctrl_c().await;
        })
    }
}

/// `ferrotune serve`: loads the model in `dir`, listens on `cfg.host:cfg.port` and serves
/// until SIGTERM or SIGINT, then drains and returns. Logs one line to standard error when
/// listening, when shutting down and when stopped.
pub fn run(dir: &Path, cfg: ServeConfig) -> Result<()> {
    cfg.validate()?;
    if is_language_model(dir) {
        return run_generation(dir, cfg);
    }
    let mut predictor = Predictor::load(dir)?;
    let precision = predictor.set_precision(cfg.precision)?;
    let rt = http_runtime()?;
    rt.block_on(async move {
        let (host, port) = (cfg.host.clone(), cfg.port);
        let n_labels = predictor.labels.len();
        let server = Server::new(predictor, cfg)?;
        let (listener, addr) = listen(&host, port).await?;
        let signal = shutdown_signal()
            .map_err(|e| Error::Msg(format!("cannot install signal handlers: {e}")))?;
        eprintln!(
            "ferrotune serve: {} ({n_labels} labels, {precision}) listening on http://{addr}",
            dir.display()
        );
        server
            .serve(listener, async move {
                signal.await;
                eprintln!("ferrotune serve: shutting down, answering requests in flight");
            })
            .await?;
        eprintln!("ferrotune serve: stopped");
        Ok(())
    })
}

/// The multi-threaded runtime the HTTP side of `ferrotune serve` runs on.
fn http_runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("ferrotune-http")
        .build()
        .map_err(|e| Error::Msg(format!("cannot start the async runtime: {e}")))
}

/// A listener on `host:port` and the address it got (port 0: any free one).
async fn listen(host: &str, port: u16) -> Result<(TcpListener, std::net::SocketAddr)> {
    let err = |e: std::io::Error| Error::Msg(format!("cannot listen on {host}:{port}: {e}"));
    let listener = TcpListener::bind((host, port)).await.map_err(err)?;
    let addr = listener.local_addr().map_err(err)?;
    Ok((listener, addr))
}

/// Whether `dir` holds a language model (its `config.json` names a `...ForCausalLM` or
/// `...LMHeadModel` architecture): served with `POST /generate`.
pub fn is_language_model(dir: &Path) -> bool {
    crate::families::HfConfig::from_dir(dir).is_ok_and(|c| {
        c.architecture()
            .is_some_and(|a| a.ends_with("ForCausalLM") || a.ends_with("LMHeadModel"))
    })
}

/// [`run`] for a language model: `POST /generate` ([`generate`]).
fn run_generation(dir: &Path, cfg: ServeConfig) -> Result<()> {
    let generator = crate::generate::TextGenerator::load(dir)?;
    let rt = http_runtime()?;
    rt.block_on(async move {
        let (host, port) = (cfg.host.clone(), cfg.port);
        let app = generate::router(generator, &cfg);
        let (listener, addr) = listen(&host, port).await?;
        let signal = shutdown_signal()
            .map_err(|e| Error::Msg(format!("cannot install signal handlers: {e}")))?;
        eprintln!(
            "ferrotune serve: {} (language model, POST /generate) listening on http://{addr}",
            dir.display()
        );
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                signal.await;
                eprintln!("ferrotune serve: shutting down, answering requests in flight");
            })
            .await
            .map_err(|e| Error::Msg(format!("server: {e}")))?;
        eprintln!("ferrotune serve: stopped");
        Ok(())
    })
}

/// `router` for `method` only; any other method is a JSON 405 with `Allow`.
fn only(method: Method, router: MethodRouter<Arc<Shared>>) -> MethodRouter<Arc<Shared>> {
    router.fallback(move || async move {
        let mut res = ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            format!("use {method}"),
        )
        .into_response();
        if let Ok(v) = HeaderValue::from_str(method.as_str()) {
            res.headers_mut().insert(header::ALLOW, v);
        }
        res
    })
}

const PATHS: [&str; 5] = ["/predict", "/health", "/info", "/metrics", "/openapi.json"];

/// Counts every answer by path and status, and times `POST /predict`.
async fn track(State(s): State<Arc<Shared>>, req: Request, next: Next) -> Response {
    let path = PATHS
        .iter()
        .find(|p| **p == req.uri().path())
        .copied()
        .unwrap_or("other");
    let start = Instant::now();
    let res = next.run(req).await;
    s.metrics.request(path, res.status().as_u16());
    if path == "/predict" {
        s.metrics
            .request_duration
            .observe(start.elapsed().as_secs_f64());
    }
    res
}

async fn not_found(req: Request) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        format!(
            "no such endpoint `{}`; see GET /openapi.json",
            req.uri().path()
        ),
    )
}

async fn health(State(s): State<Arc<Shared>>) -> Response {
    if s.alive.load(Ordering::SeqCst) > 0 {
        Json(json!({"status": "ok"})).into_response()
    } else {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unhealthy",
            "no inference worker is running",
        )
        .into_response()
    }
}

async fn info(State(s): State<Arc<Shared>>) -> Json<Value> {
    Json(s.info.clone())
}

async fn metrics_text(State(s): State<Arc<Shared>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        s.metrics.render(),
    )
        .into_response()
}

async fn openapi() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        openapi::OPENAPI_JSON,
    )
        .into_response()
}

/// Decrements the in-flight gauge when a request ends, however it ends.
struct InFlight(Arc<Metrics>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn predict(State(s): State<Arc<Shared>>, req: Request) -> Response {
    let Ok(_permit) = s.permits.clone().try_acquire_owned() else {
        return ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "overloaded",
            format!(
                "too many concurrent requests (the limit is {})",
                s.cfg.max_concurrent_requests
            ),
        )
        .retry_after(1)
        .into_response();
    };
    s.metrics.in_flight.fetch_add(1, Ordering::Relaxed);
    let _in_flight = InFlight(s.metrics.clone());
    match tokio::time::timeout(s.cfg.request_timeout, answer(&s, req)).await {
        Ok(Ok(v)) => Json(v).into_response(),
        Ok(Err(e)) => e.into_response(),
        Err(_) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "timeout",
            format!(
                "no answer within the request timeout of {} ms",
                s.cfg.request_timeout.as_millis()
            ),
        )
        .retry_after(1)
        .into_response(),
    }
}

fn backend(msg: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "backend", msg)
}

async fn answer(s: &Arc<Shared>, req: Request) -> std::result::Result<Value, ApiError> {
    let (feats, single, raw) = if s.untruncated.is_some() {
        s.read_texts(req).await?
    } else {
        s.read_images(req).await?
    };
    let tokens = if s.untruncated.is_some() {
        feats.iter().map(|f| f.ids.len()).sum()
    } else {
        feats.len() * s.image_cost
    };
    let (tx, rx) = oneshot::channel();
    s.queue.push(Job { feats, tokens, tx }).map_err(|_| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unhealthy",
            "the server is shutting down",
        )
        .retry_after(1)
    })?;
    let rows = rx
        .await
        .map_err(|_| backend("the inference worker stopped"))?
        .map_err(backend)?;
    let p = &s.predictor;
    let mut lists = rows.iter().map(|logits| {
        let scores = if raw {
            logits.clone()
        } else {
            p.activate(logits)
        };
        scores_json(&p.labels, &scores)
    });
    Ok(if single {
        lists.next().unwrap_or(Value::Null)
    } else {
        Value::Array(lists.collect())
    })
}

/// A request's inputs, encoded; one input sent on its own; raw scores asked for.
type Inputs = (Vec<Features>, bool, bool);

impl Shared {
    /// The whole body (413 over `max_body_bytes`).
    async fn body(&self, req: Request) -> std::result::Result<Bytes, ApiError> {
        Bytes::from_request(req, &()).await.map_err(|r| {
            if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::too_large(format!(
                    "the body is over the limit of {} bytes",
                    self.cfg.max_body_bytes
                ))
            } else {
                ApiError::bad_request(format!("cannot read the body: {}", r.body_text()))
            }
        })
    }

    fn check_count(&self, n: usize) -> std::result::Result<(), ApiError> {
        if n > self.cfg.max_inputs_per_request {
            return Err(ApiError::too_large(format!(
                "{n} inputs is over the limit of {} per request",
                self.cfg.max_inputs_per_request
            )));
        }
        Ok(())
    }

    /// A text model's request: JSON, tokenized on the blocking pool. An image (a form or
    /// an `image/*` body) is a 400 before the body is read.
    async fn read_texts(self: &Arc<Self>, req: Request) -> std::result::Result<Inputs, ApiError> {
        if images::body_kind(req.headers()) != BodyKind::Json {
            return Err(ApiError::bad_request(
                "this model reads text, not images: send JSON, {\"inputs\": \"some text\"}",
            ));
        }
        let body = self.body(req).await?;
        let r = PredictRequest::parse(&body)?;
        self.check_count(r.inputs.len())?;
        let (single, raw, truncate) = (r.single, r.raw_scores, r.truncate);
        let shared = self.clone();
        let feats = tokio::task::spawn_blocking(move || shared.tokenize(&r.inputs, truncate))
            .await
            .map_err(|e| backend(format!("tokenization stopped: {e}")))??;
        Ok((feats, single, raw))
    }

    /// An image model's request: base64 images in JSON, a form's file parts or an
    /// `image/*` body, decoded on the blocking pool.
    async fn read_images(&self, req: Request) -> std::result::Result<Inputs, ApiError> {
        let limits = ImageLimits {
            max_bytes: self.cfg.max_image_bytes,
            max_pixels: self.cfg.max_image_pixels,
        };
        let r = match images::body_kind(req.headers()) {
            BodyKind::Json => ImageRequest::from_json(&self.body(req).await?)?,
            BodyKind::Image => ImageRequest::from_raw(self.body(req).await?),
            BodyKind::Multipart => {
                ImageRequest::from_multipart(
                    req,
                    limits,
                    self.cfg.max_inputs_per_request,
                    self.cfg.max_body_bytes,
                )
                .await?
            }
        };
        self.check_count(r.images.len())?;
        let (single, raw) = (r.single, r.raw_scores);
        let feats = tokio::task::spawn_blocking(move || images::decode(&r.images, limits))
            .await
            .map_err(|e| backend(format!("image decoding stopped: {e}")))??;
        Ok((feats, single, raw))
    }

    /// Tokenizes as `ferrotune predict` does (truncating to the model's maximum); with
    /// `truncate` false an input that had to be cut is a 413 naming it and its length.
    fn tokenize(
        &self,
        inputs: &[Input],
        truncate: bool,
    ) -> std::result::Result<Vec<Features>, ApiError> {
        let encode = |tok: &Tokenizer, i: usize, inp: &Input| {
            let text = [(inp.text.as_str(), inp.text_pair.as_deref())];
            let r = if tok.get_truncation().is_some() {
                // Long texts are clipped first, as in `predict` (memory bound by tokens).
                crate::data::batch::encode_clipped(tok, &text).map(|mut v| v.remove(0))
            } else {
                match &inp.text_pair {
                    Some(pair) => tok.encode((inp.text.as_str(), pair.as_str()), true),
                    None => tok.encode(inp.text.as_str(), true),
                }
            };
            r.map_err(|e| {
                ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "tokenizer",
                    format!("inputs[{i}] cannot be tokenized: {e}"),
                )
            })
        };
        let max = self.predictor.info.max_seq_length;
        let mut out = Vec::with_capacity(inputs.len());
        // The server refuses at start a model without a tokenizer.
        let tok = self
            .predictor
            .tokenizer()
            .map_err(|e| ApiError::unprocessable(e.to_string()))?;
        for (i, inp) in inputs.iter().enumerate() {
            let enc = encode(tok, i, inp)?;
            if !truncate && !enc.get_overflowing().is_empty() {
                let full = match &self.untruncated {
                    Some(t) => encode(t, i, inp)?.len(),
                    None => enc.len(),
                };
                return Err(ApiError::too_large(format!(
                    "inputs[{i}] is {full} tokens long, over the model's maximum of {max}; \
                     send \"truncate\": true to cut it"
                )));
            }
            out.push(Features {
                ids: enc.get_ids().to_vec(),
                type_ids: enc.get_type_ids().to_vec(),
                image: None,
            });
        }
        Ok(out)
    }
}
