//! KV caches in memory. The persistent per-document store is in `crate::store`.

mod cache;

pub use cache::{KvCache, LayerKv};
