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

/// A benchmark's result row: serialized whole into its JSON report and shown as one row of a
/// Markdown table by [`table`], so the two never disagree.
pub trait Row: serde::Serialize {
    /// Column headers, one per cell.
    fn columns() -> &'static [&'static str];
    fn cells(&self) -> Vec<String>;
}

impl<R: Row> Row for &R {
    fn columns() -> &'static [&'static str] {
        R::columns()
    }
    fn cells(&self) -> Vec<String> {
        (*self).cells()
    }
}

/// The one renderer: rows as a Markdown table under their columns.
pub fn table<R: Row>(rows: &[R]) -> String {
    let cells: Vec<Vec<String>> = rows.iter().map(Row::cells).collect();
    crate::eval::plot::markdown_table(R::columns(), &cells)
}

/// `x` with `p` decimals, "-" when absent.
pub fn num(x: Option<f64>, p: usize) -> String {
    x.map_or("-".into(), |x| format!("{x:.p$}"))
}
