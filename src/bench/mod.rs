//! Every benchmark, each a command that prints a table (and writes JSON beside it):
//!
//! - `qa` (`samkv bench`): methods on a QA data file, F1 and agreement with Recompute, cost;
//!   `sweep` expands its method specs and budget grids, `report` summarizes and plots a run,
//!   `headline` (`samkv bench-report`) joins several runs into one table.
//! - `reuse` (`samkv bench-reuse`): Reuse against Recompute, store load cost, dtype fidelity.
//! - `speed` (`samkv bench-speed`): CPU prefill and decode against llama.cpp.
//! - `serve` (`samkv bench-serve`): a loopback load generator for `samkv serve`.
//! - `gpu` (`samkv bench-gpu`): shape-only CUDA runs against Hugging Face transformers.

pub mod gpu;
pub mod headline;
pub mod qa;
pub mod report;
pub mod reuse;
pub mod serve;
pub mod speed;
pub mod sweep;
