//! `samkv serve`: an OpenAI-compatible HTTP API over the engine.
//!
//! - `POST /v1/chat/completions`: OpenAI's schema plus `documents` (ids or inline texts),
//!   `retrieve` ({"top_k": k} from the BM25 index) and `kv` (a [`MethodConfig`] object over
//!   the server's defaults); `usage` adds cached, recomputed and kept token counts.
//! - `POST /v1/completions`: plain prompts, recomputed, no documents.
//! - `POST|GET /v1/documents`, `GET|DELETE /v1/documents/{id}`: the document registry.
//! - `GET /health`, `GET /metrics` (Prometheus text), `GET /v1/models`, `GET /v1/models/{id}`.
//!
//! With `--api-key` every route but `/health` needs `Authorization: Bearer KEY`.
//!
//! HTTP runs on a small tokio runtime; the model runs on its own thread ([`worker`]).

mod documents;
mod fields;
mod guard;
pub mod metrics;
pub mod openai;
pub mod prefetch;
pub mod registry;
mod routes;
pub mod scheduler;
mod task;
pub mod worker;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::engine::Engine;
use crate::methods::MethodConfig;
use crate::retrieval::Retriever;
use crate::store::{is_redis_spec, redis::RedisConn, KvStore};
use crate::{Error, Result};

use metrics::{Metrics, ObservedStore, StoreSample};
use registry::Registry;
use worker::{Gate, Job, WorkerConfig};

#[derive(clap::Args, Clone, Debug)]
pub struct ServeOptions {
    /// BM25 index directory (as filled by `samkv ingest --index`): enables `retrieve` in chat
    /// requests; uploaded documents are added to it.
    #[arg(long)]
    pub index: Option<PathBuf>,
    /// Port to listen on (0: any free port; the chosen address is printed).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Requests admitted at once, running or waiting; more are refused with 429.
    #[arg(long, default_value_t = 64)]
    pub queue: usize,
    /// Requests admitted at once (assembling or decoding); decoding ones advance in one
    /// batched forward per token on the model thread.
    #[arg(long, default_value_t = 8)]
    pub max_batch: usize,
    /// Tokens the model thread processes per round: one per decoding request plus the
    /// prefill of the assembly steps it takes (at least one step per round). Smaller keeps
    /// running streams smoother while documents are prefilled. Default: 512 on CPU, 2048 on
    /// a GPU.
    #[arg(long)]
    pub step_tokens: Option<usize>,
    /// KV bytes admitted requests may reserve together (e.g. 20GiB, 512MiB); each reserves
    /// (context tokens + max_tokens) x the model's KV bytes per token while it runs. Requests
    /// that do not fit wait; one larger than the whole budget is refused. Default: on CUDA
    /// 90% of the device memory free after loading the weights, less 1 GiB for activations;
    /// on CPU half of the available RAM (4 GiB where that cannot be read).
    #[arg(long, value_parser = scheduler::parse_bytes)]
    pub kv_budget: Option<u64>,
    /// Host memory for documents read ahead from the store (disk or Redis) for requests
    /// waiting to be admitted, so the model thread does not wait on I/O (0: no prefetch).
    #[arg(long, default_value = "256MiB", value_parser = scheduler::parse_bytes_or_zero)]
    pub prefetch_bytes: u64,
    /// Most documents in one chat request (given and retrieved together).
    #[arg(long, default_value_t = 16)]
    pub max_documents: usize,
    /// Most tokens in one document.
    #[arg(long, default_value_t = 4096)]
    pub max_document_tokens: usize,
    /// max_tokens of a request that gives none.
    #[arg(long, default_value_t = 256)]
    pub default_max_tokens: usize,
    /// Largest max_tokens a request may ask for.
    #[arg(long, default_value_t = 4096)]
    pub max_tokens_limit: usize,
    /// Most context tokens in one request: system message, documents and question together
    /// (default: the model's context length).
    #[arg(long)]
    pub max_context_tokens: Option<usize>,
    /// Largest request body in bytes; larger ones are refused with 413.
    #[arg(long, default_value_t = 4 << 20)]
    pub max_body_bytes: usize,
    /// Require `Authorization: Bearer KEY` on every route but /health (401 otherwise).
    #[arg(long, env = "SAMKV_API_KEY", hide_env_values = true, value_parser = ApiKey::parse)]
    pub api_key: Option<ApiKey>,
    /// The model id clients send and `/v1/models` lists (default: the known model name,
    /// else the model's file name).
    #[arg(long)]
    pub served_model_name: Option<String>,
    /// Do not tell clients whether a document's KV was already stored (`cached` of an
    /// upload is null, `cached_tokens` 0): otherwise a client can test whether a guessed
    /// text was uploaded by someone else sharing the store.
    #[arg(long)]
    pub private_cache: bool,
    /// Host header values accepted (comma-separated, e.g. `localhost:8080,api.example`);
    /// other hosts get 421. Guards a loopback server against DNS rebinding from web pages.
    /// Default: any host.
    #[arg(long, value_delimiter = ',')]
    pub allowed_hosts: Vec<String>,
    #[command(flatten)]
    pub limits: guard::ConnLimits,
}

/// An API key; its Debug form hides it, so it cannot reach a log through `{:?}`.
#[derive(Clone)]
pub struct ApiKey(String);

impl ApiKey {
    fn parse(s: &str) -> std::result::Result<ApiKey, String> {
        if s.trim().is_empty() {
            return Err("the API key is empty; give a non-empty key or leave it out".into());
        }
        Ok(ApiKey(s.to_string()))
    }

    /// Whether `given` is this key, in time that does not depend on where they differ.
    pub fn matches(&self, given: &str) -> bool {
        use sha2::{Digest, Sha256};
        let (a, b) = (
            Sha256::digest(self.0.as_bytes()),
            Sha256::digest(given.as_bytes()),
        );
        a.iter()
            .zip(b.iter())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
    }
}

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiKey(<hidden>)")
    }
}

/// The ids a server answers to: the served name first (listed by `/v1/models`), then the
/// known model name and file name of the model it runs.
pub fn model_ids(model_arg: &str, served: Option<&str>) -> Vec<String> {
    let file = Path::new(model_arg)
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_else(|| model_arg.to_string());
    let known = crate::fetch::MODELS
        .iter()
        .find(|m| m.name == model_arg || m.file_name == file)
        .map(|m| m.name.to_string());
    let mut ids: Vec<String> = Vec::new();
    for id in [served.map(str::to_string), known, Some(file)]
        .into_iter()
        .flatten()
    {
        if !ids.contains(&id) {
            ids.push(id);
        }
    }
    ids
}

pub use guard::{ConnLimits, DocPath};

pub(crate) struct AppState {
    pub jobs: Mutex<std::sync::mpsc::Sender<Job>>,
    pub gate: Gate,
    pub registry: Arc<Registry>,
    pub retriever: Option<Arc<Retriever>>,
    pub metrics: Arc<Metrics>,
    pub store: Arc<dyn KvStore>,
    pub defaults: MethodConfig,
    pub opts: ServeOptions,
    /// [`model_ids`]: the first is the served name.
    pub models: Vec<String>,
    pub max_context: usize,
    pub clients: Arc<guard::ClientSlots>,
    store_sample: Mutex<Option<(Instant, StoreSample)>>,
}

impl AppState {
    /// A store or registry error as the client sees it (503/507), counted in /metrics.
    pub fn store_error(&self, e: Error) -> openai::ApiError {
        self.metrics
            .store_errors
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tracing::warn!("store: {e}");
        openai::ApiError::from(e)
    }

    /// Store numbers for /metrics, refreshed at most every few seconds (listing a large
    /// store, on disk or in Redis, is not free).
    pub fn store_sample(&self) -> Option<StoreSample> {
        {
            let g = self.store_sample.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((t, s)) = &*g {
                if t.elapsed().as_secs() < 5 {
                    return Some(s.clone());
                }
            }
        }
        let s = self.store.stats().ok().map(|s| StoreSample {
            entries: s.entries,
            bytes: s.bytes,
            memory_bytes: s.memory_bytes,
            memory_budget: s.memory_budget,
            memory_hits: s.memory_hits,
            backend_hits: s.disk_hits,
            misses: s.misses,
        })?;
        *self.store_sample.lock().unwrap_or_else(|p| p.into_inner()) =
            Some((Instant::now(), s.clone()));
        Some(s)
    }
}

/// Runs the server until Ctrl-C. `store_spec` is the store the engine was opened on (a
/// directory or a redis:// URL): the document registry lives beside the KV there.
pub fn serve(
    mut engine: Engine,
    model_name: &str,
    store_spec: &str,
    defaults: MethodConfig,
    opts: ServeOptions,
) -> Result<()> {
    defaults.build().map_err(|e| {
        Error::InvalidInput(format!("the default method (--method and its knobs): {e}"))
    })?;
    if opts.queue == 0 || opts.max_documents == 0 || opts.max_document_tokens == 0 {
        return Err(Error::InvalidInput(
            "--queue, --max-documents and --max-document-tokens must be at least 1".into(),
        ));
    }
    if opts.max_context_tokens == Some(0) || opts.max_body_bytes == 0 {
        return Err(Error::InvalidInput(
            "--max-context-tokens and --max-body-bytes must be at least 1".into(),
        ));
    }
    if opts.default_max_tokens == 0 || opts.default_max_tokens > opts.max_tokens_limit {
        return Err(Error::InvalidInput(
            "--default-max-tokens must be between 1 and --max-tokens-limit".into(),
        ));
    }
    let metrics = Arc::new(Metrics::default());
    let prefetcher = if opts.prefetch_bytes > 0 {
        let buf = prefetch::PrefetchBuffer::new(opts.prefetch_bytes as usize, metrics.clone());
        let p = prefetch::Prefetcher::spawn(engine.store.clone(), buf.clone())?;
        engine.store = Arc::new(prefetch::PrefetchStore {
            inner: engine.store.clone(),
            buf,
        });
        Some(p)
    } else {
        None
    };
    engine.store = Arc::new(ObservedStore {
        inner: engine.store.clone(),
        metrics: metrics.clone(),
    });
    opts.limits.check()?;
    let registry = if is_redis_spec(store_spec) {
        Registry::in_redis(Arc::new(RedisConn::open(store_spec)?))
    } else {
        Registry::in_dir(Path::new(store_spec))?
    };
    let retriever = match &opts.index {
        Some(d) => Some(Arc::new(Retriever::open(d)?)),
        None => None,
    };
    let store = engine.store.clone();
    let max_context = engine.model.cfg.max_context;
    let (kv_budget, step_tokens) = budgets(&engine, &opts)?;
    let kv_bytes_per_token = kv_bytes_per_token(&engine.model);
    tracing::info!(
        "KV budget {} ({} tokens at {kv_bytes_per_token} bytes per token), {step_tokens} tokens per step",
        scheduler::human_bytes(kv_budget),
        kv_budget / kv_bytes_per_token.max(1)
    );
    let (jobs, worker) = worker::spawn(
        engine,
        WorkerConfig {
            max_batch: opts.max_batch,
            max_document_tokens: opts.max_document_tokens,
            max_context_tokens: opts.max_context_tokens.unwrap_or(max_context),
            step_tokens,
            kv_budget,
            kv_bytes_per_token,
        },
        metrics.clone(),
        prefetcher,
    )?;
    let state = Arc::new(AppState {
        jobs: Mutex::new(jobs),
        gate: Gate::new(opts.queue, metrics.clone()),
        registry: Arc::new(registry),
        retriever,
        metrics,
        store,
        defaults,
        opts: opts.clone(),
        models: model_ids(model_name, opts.served_model_name.as_deref()),
        max_context,
        clients: Arc::default(),
        store_sample: Mutex::new(None),
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind((opts.host.as_str(), opts.port))
            .await
            .map_err(|e| {
                Error::InvalidInput(format!(
                    "cannot listen on {}:{} ({e}); pick another --port or --host",
                    opts.host, opts.port
                ))
            })?;
        let addr = listener.local_addr()?;
        // Tests and scripts read this line to find the port.
        println!("samkv serve: listening on http://{addr}");
        use std::io::Write;
        let _ = std::io::stdout().flush();
        tracing::info!(
            "listening on http://{addr}, model `{}`{}",
            state.models[0],
            if state.opts.api_key.is_some() {
                ", API key required"
            } else {
                ""
            }
        );
        let limits = state.opts.limits.clone();
        guard::serve_conns(listener, routes::router(state), limits, async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
        Ok::<(), Error>(())
    })?;
    drop(rt);
    // The runtime is gone, so every job sender is dropped and the worker ends.
    let _ = worker.join();
    Ok(())
}

/// KV bytes one token takes in a request's cache: layers x KV heads x head_dim x (K and V) x
/// the model's compute dtype.
pub fn kv_bytes_per_token(m: &crate::model::Model) -> u64 {
    let c = &m.cfg;
    (c.n_layers * c.n_kv_heads * c.head_dim * 2 * m.dtype().size_in_bytes()) as u64
}

/// The KV budget and tokens per step: the flags, else defaults from the device.
fn budgets(engine: &Engine, opts: &ServeOptions) -> Result<(u64, usize)> {
    let dev = engine.model.device();
    let step = opts
        .step_tokens
        .unwrap_or(if dev.is_cpu() { 512 } else { 2048 });
    if step == 0 || opts.max_batch == 0 {
        return Err(Error::InvalidInput(
            "--step-tokens and --max-batch must be at least 1".into(),
        ));
    }
    let budget = match opts.kv_budget {
        Some(b) => b,
        None => match crate::bench::gpu::mem_info(dev) {
            // The weights are loaded by now, so free memory is what the caches can use.
            Some((free, _)) => ((free as f64 * 0.9) as u64).saturating_sub(1 << 30),
            None => available_ram().map_or(4 << 30, |b| b / 2),
        },
    };
    if budget < kv_bytes_per_token(&engine.model) {
        return Err(Error::InvalidInput(format!(
            "the KV budget ({}) holds not even one token; give a larger --kv-budget",
            scheduler::human_bytes(budget)
        )));
    }
    Ok((budget, step))
}

/// MemAvailable from /proc/meminfo (Linux), bytes.
fn available_ram() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = s.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_ids_name_the_known_model_first() {
        assert_eq!(
            model_ids("models/SmolLM2-135M-Instruct.Q4_1.gguf", None),
            ["smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"]
        );
        assert_eq!(model_ids("smollm2", None)[0], "smollm2");
        assert_eq!(
            model_ids("x/other.gguf", Some("mine")),
            ["mine", "other.gguf"]
        );
    }

    #[test]
    fn api_keys_match_exactly_and_never_print() {
        let k = ApiKey::parse("sk-abc").expect("key");
        assert!(k.matches("sk-abc"));
        assert!(!k.matches("sk-abd") && !k.matches("sk-ab") && !k.matches(""));
        assert!(!format!("{k:?}").contains("abc"));
        assert!(ApiKey::parse("  ").is_err());
    }
}
