//! Errors a person can act on: each names the file involved and says what to do.

use std::path::{Path, PathBuf};

pub type Result<T> = std::result::Result<T, Error>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file-system operation failed; `op` says which, so a full disk on a write is not
    /// reported as a read.
    #[error("cannot {op} {}: {source}", path.display())]
    Io {
        op: IoOp,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{} is not a valid config file: {msg}. Re-download the model or fix the JSON.", path.display())]
    BadConfig { path: PathBuf, msg: String },
    #[error("{} asks for something magictailor does not support: {what}.", path.display())]
    Unsupported { path: PathBuf, what: String },
    /// A file magictailor cannot use: missing, truncated, corrupt or in another format.
    /// `msg` is the whole sentence and names the file.
    #[error("{msg}")]
    BadFile { path: PathBuf, msg: String },
    /// Weights that read fine but do not fit this model (made for another base model, or
    /// components from different models).
    #[error("{msg}")]
    Mismatch { path: PathBuf, msg: String },
    /// The base model is neither a local folder nor fetchable from the hub.
    #[error("{0}")]
    ModelNotFound(String),
    #[error("{0}")]
    Usage(String),
    /// Training met NaN or infinity and stopped before it changed any weight.
    #[error("{0}")]
    Diverged(String),
    /// A failure of the machine rather than the input (out of memory, a device error): a
    /// scheduler may retry the job.
    #[error("{0}")]
    Retryable(String),
    /// A signal stopped the job at a safe point; `msg` says how to continue.
    #[error("{msg}")]
    Interrupted { signal: i32, msg: String },
    /// A run that had saved progress stopped on `source`; `saved` names what survived
    /// and how to continue from it.
    #[error("{source} {saved}")]
    Stopped { source: Box<Error>, saved: String },
    /// A broken invariant: a bug in magictailor, not in the input.
    #[error("internal error (a bug in magictailor; please report it): {0}")]
    Internal(String),
    #[error("tensor error: {}", brief(.0))]
    Candle(candle_core::Error),
}

/// `e` as a candle error, for a backend that must answer in candle's type (a weight
/// reader met a corrupt file); [`Error::from`] takes it out again, unchanged.
pub fn carry(e: Error) -> candle_core::Error {
    candle_core::Error::WrappedContext {
        wrapped: Box::new(e),
        context: String::new(),
    }
}

/// The [`carry`]d error inside `e`, or `e` itself when it carries none.
pub fn carried(e: candle_core::Error) -> std::result::Result<Error, candle_core::Error> {
    use candle_core::Error as C;
    match e {
        C::WithBacktrace { inner, backtrace } => {
            carried(*inner).map_err(|inner| C::WithBacktrace {
                inner: Box::new(inner),
                backtrace,
            })
        }
        C::WrappedContext { wrapped, context } => match wrapped.downcast::<Error>() {
            Ok(ours) => Ok(*ours),
            Err(wrapped) => Err(C::WrappedContext { wrapped, context }),
        },
        e => Err(e),
    }
}

impl From<candle_core::Error> for Error {
    fn from(e: candle_core::Error) -> Self {
        carried(e).unwrap_or_else(Error::Candle)
    }
}

/// The file-system operation an [`Error::Io`] was attempting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoOp {
    Read,
    Write,
    /// Moving a finished temporary file to its final name.
    Rename,
    CreateDir,
    List,
    Lock,
}

impl std::fmt::Display for IoOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            IoOp::Read => "read",
            IoOp::Write => "write",
            IoOp::Rename => "move a finished temporary file into place as",
            IoOp::CreateDir => "create the folder",
            IoOp::List => "list the folder",
            IoOp::Lock => "lock",
        })
    }
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
    pub fn io(op: IoOp, path: &Path, source: std::io::Error) -> Self {
        Error::Io {
            op,
            path: path.to_path_buf(),
            source,
        }
    }
    pub fn read(path: &Path, source: std::io::Error) -> Self {
        Self::io(IoOp::Read, path, source)
    }
    pub fn unsupported(path: &Path, what: String) -> Self {
        Error::Unsupported {
            path: path.to_path_buf(),
            what,
        }
    }
    pub fn bad_file(path: &Path, msg: impl Into<String>) -> Self {
        Error::BadFile {
            path: path.to_path_buf(),
            msg: msg.into(),
        }
    }
    pub fn mismatch(path: &Path, msg: impl Into<String>) -> Self {
        Error::Mismatch {
            path: path.to_path_buf(),
            msg: msg.into(),
        }
    }
    pub fn usage(msg: impl Into<String>) -> Self {
        Error::Usage(msg.into())
    }
    pub fn internal(msg: impl Into<String>) -> Self {
        Error::Internal(msg.into())
    }

    /// Whether the input is at fault (a bad pair, settings that diverge), as opposed to
    /// the machine (memory, device, disk) or a bug: a batch records the first and goes on.
    pub fn is_input_error(&self) -> bool {
        if let Error::Stopped { source, .. } = self {
            return source.is_input_error();
        }
        matches!(
            self,
            Error::Usage(_)
                | Error::BadFile { .. }
                | Error::BadConfig { .. }
                | Error::Unsupported { .. }
                | Error::Mismatch { .. }
                | Error::ModelNotFound(_)
                | Error::Diverged(_)
        )
    }

    /// The conventional exit status: 2 for a command-line mistake, 128 + the signal for
    /// an interrupted job (130 for Ctrl-C, 143 for SIGTERM), 75 (EX_TEMPFAIL) for a
    /// failure worth retrying, 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Stopped { source, .. } => source.exit_code(),
            Error::Usage(_) => 2,
            Error::Retryable(_) => 75,
            Error::Interrupted { signal, .. } => u8::try_from(128 + signal).unwrap_or(1),
            _ => 1,
        }
    }
}
