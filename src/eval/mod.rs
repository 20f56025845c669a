//! Evaluation building blocks: QA data loaders, LongBench prompts, answer metrics, plots.

pub mod data;
pub mod metrics;
pub mod plot;
pub mod prompt;

pub use data::{load_examples, Document, Example};
pub use metrics::{best_f1, exact_match, kl_divergence, median, normalize_answer, qa_f1};
pub use plot::{line_plot, markdown_table, scatter_plot, Labelled, Series};
pub use prompt::longbench_prompt;
