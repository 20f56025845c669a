//! samkv: a RAG inference engine that computes each document's KV cache once, stores it, and
//! combines stored caches at request time (Reuse, CacheBlend, EPIC, Multi-InfLLM, SamKV).
//!
//! Modules follow the data path: `model` (runtime) -> `tokenizer` -> `kv` (in-memory buffers)
//! and `store` (persistent per-document caches) -> `methods` -> `engine` (assemble, decode)
//! -> `eval` (data, metrics, plots) -> `bench`, `server`; the CLI is the binary's `cli/`.
//! `cuda` (with the `cuda` feature) holds samkv's own kernels; it depends on candle only, and
//! the model, the KV buffers and the loader call it.

pub mod bench;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod engine;
pub mod error;
pub mod eval;
pub mod fetch;
pub mod fuzzing;
pub mod kv;
pub mod methods;
pub mod model;
pub mod retrieval;
pub mod selfcheck;
pub mod server;
pub mod store;
pub mod tokenizer;

pub use error::{Error, Result};
