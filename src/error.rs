//! Library error type. Messages say what was wrong and, where it helps, what to do.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("model file {path}: {msg}")]
    ModelFile { path: PathBuf, msg: String },

    #[error("unsupported model architecture `{0}` (samkv runs `llama`, `qwen2` and `qwen3`; Mistral checkpoints use `llama`)")]
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

    /// A store or registry that could not be read or written (I/O error, permission,
    /// too many open files): the data may well be intact, so nothing is removed for it.
    #[error("KV store: {0}")]
    Store(String),

    /// An entry whose bytes were read and found wrong (checksum, truncation, renamed): the
    /// only store error after which the entry is removed and recomputed.
    #[error("KV store: corrupt entry: {0}")]
    Corrupt(String),

    /// The store's disk (or quota) is full (ENOSPC, EDQUOT): nothing was written.
    #[error("KV store full: {0}")]
    StoreFull(String),

    /// The store cannot be reached (Redis down): retry later.
    #[error("KV store unavailable: {0}")]
    Unavailable(String),

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

impl Error {
    /// A store error for an I/O failure on `path`: a full disk or quota becomes
    /// [`Error::StoreFull`], anything else [`Error::Store`] (the data may be intact).
    pub fn store_io(what: &str, path: &std::path::Path, e: std::io::Error) -> Error {
        let msg = format!("{what} {}: {e}", path.display());
        if is_disk_full(&e) {
            Error::StoreFull(format!(
                "{msg}; free space on the store's disk or raise its quota"
            ))
        } else {
            Error::Store(msg)
        }
    }

    /// Whether the store failed (unreadable, unwritable, full, unreachable, corrupt), as
    /// opposed to the request or the model.
    pub fn is_store(&self) -> bool {
        matches!(
            self,
            Error::Store(_) | Error::Corrupt(_) | Error::StoreFull(_) | Error::Unavailable(_)
        )
    }

    /// Whether this error found an entry's bytes wrong (as opposed to failing to read them).
    pub fn is_corrupt(&self) -> bool {
        matches!(self, Error::Corrupt(_))
    }
}

/// ENOSPC (28) or EDQUOT (122 on Linux): nothing more can be written there.
pub fn is_disk_full(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::StorageFull
        || e.kind() == std::io::ErrorKind::QuotaExceeded
        || matches!(e.raw_os_error(), Some(28) | Some(122))
}
