//! Library error type. Messages say what was wrong and, where it helps, what to do.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("model file {path}: {msg}")]
    ModelFile { path: PathBuf, msg: String },

    #[error("unsupported model architecture `{0}` (samkv runs `llama` and `qwen2`; Mistral checkpoints use `llama`)")]
    UnknownArch(String),

    #[error("prompt has {tokens} tokens but the model's context length is {max}; use fewer or shorter documents")]
    ContextTooLong { tokens: usize, max: usize },

    #[error("invalid input: {0}")]
    InvalidInput(String),

    #[error("internal error (a bug in samkv; please report it with RUST_BACKTRACE=1 output): {0}")]
    Internal(String),

    #[error("tokenizer: {0}")]
    Tokenizer(String),

    #[error("chat template: {0}")]
    Template(String),

    #[error("model fetch: {0}")]
    Fetch(String),

    #[error("KV store: {0}")]
    Store(String),

    #[error("data file {path}, line {line}: {msg}")]
    Data {
        path: PathBuf,
        line: usize,
        msg: String,
    },

    #[error("search index: {0}")]
    Index(String),

    #[error("plot {0}")]
    Plot(String),

    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    #[error(transparent)]
    Io(#[from] std::io::Error),
}

pub type Result<T> = std::result::Result<T, Error>;
