//! samkv: a RAG inference engine that computes each document's KV cache once, stores it, and
//! combines stored caches at request time (Reuse, CacheBlend, EPIC, Multi-InfLLM, SamKV).
//!
//! Modules follow the data path: `model` (runtime) -> `tokenizer` -> `kv` (cache and store)
//! -> `methods` -> `engine` (assemble, decode) -> `eval`, `server`, CLI in `main.rs`.

pub mod error;
pub mod fetch;
pub mod tokenizer;

pub use error::{Error, Result};
