//! Errors a person can act on: each names the file involved and says what to do.

use std::path::{Path, PathBuf};

pub type Result<T> = std::result::Result<T, Error>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{} is not a valid config file: {msg}. Re-download the model or fix the JSON.", path.display())]
    BadConfig { path: PathBuf, msg: String },
    #[error("{} asks for something magictailor does not support: {what}.", path.display())]
    Unsupported { path: PathBuf, what: String },
    #[error("{}", .0)]
    Model(String),
    #[error("{}", .0)]
    Usage(String),
    #[error("tensor error: {}", brief(.0))]
    Candle(#[from] candle_core::Error),
}

/// A candle error's message without the backtrace candle appends when RUST_BACKTRACE is set.
pub fn brief(e: &candle_core::Error) -> String {
    let text = e.to_string();
    text.split("\n   0:")
        .next()
        .unwrap_or(&text)
        .trim_end()
        .to_string()
}

impl Error {
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        Error::Io {
            path: path.to_path_buf(),
            source,
        }
    }
    pub fn unsupported(path: &Path, what: String) -> Self {
        Error::Unsupported {
            path: path.to_path_buf(),
            what,
        }
    }
    pub fn model(msg: impl Into<String>) -> Self {
        Error::Model(msg.into())
    }
    pub fn usage(msg: impl Into<String>) -> Self {
        Error::Usage(msg.into())
    }
}
