//! One error type for the library.
//!
//! Every error a user can cause (a bad recipe, a bad data file, a bad checkpoint) is a
//! one-line message that names the file and, where there is one, the line and the field.

use std::fmt;
use std::path::{Path, PathBuf};

/// Where in an input a problem was found: the file, and optionally the line and field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    /// The file (or directory) being read.
    pub path: PathBuf,
    /// 1-based line number, where the input has lines.
    pub line: Option<usize>,
    /// The column, key, tensor or field concerned.
    pub field: Option<String>,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", one_line(&self.path.display().to_string()))?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if let Some(field) = &self.field {
            write!(f, ": field `{}`", one_line(field))?;
        }
        Ok(())
    }
}

/// The library's error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A problem with the contents of an input file (data, recipe, model files).
    #[error("{loc}: {}", one_line(msg))]
    Input {
        /// Where.
        loc: Location,
        /// What is wrong, in one line.
        msg: String,
    },
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// An invalid configuration value (recipe key or `--set` override).
    #[error("config: {}", one_line(.0))]
    Config(String),
    /// An error from the tensor library.
    #[error("tensor error: {}", one_line(&.0.to_string()))]
    Candle(#[from] candle_core::Error),
    /// The run was asked to stop (Ctrl-C, SIGTERM) and wrote a checkpoint.
    #[error("interrupted after step {step}; checkpoint written to {}; continue with --resume latest", checkpoint.display())]
    Interrupted {
        /// The last step done.
        step: usize,
        /// The checkpoint written.
        checkpoint: PathBuf,
    },
    /// Anything else, already phrased for the user.
    #[error("{}", one_line(.0))]
    Msg(String),
}

/// `s` with every control character (newline, tab, NUL, ...) written as its Rust escape,
/// so that an error stays one line whatever the input it quotes (a column name, a key, a
/// value read from a file). Found by fuzzing the readers.
pub fn one_line(s: &str) -> std::borrow::Cow<'_, str> {
    if !s.chars().any(char::is_control) {
        return std::borrow::Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}

/// The library's result type.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// Whether the user's input is at fault (a recipe, data or model file that is wrong,
    /// missing or not where a path says) rather than the machine (a full disk, a denied
    /// permission, a failing device). The CLI exits 2 for the first, 1 for the second.
    pub fn is_bad_input(&self) -> bool {
        use std::io::ErrorKind as K;
        match self {
            Error::Input { .. } | Error::Config(_) => true,
            Error::Io { source, .. } => matches!(
                source.kind(),
                K::NotFound
                    | K::NotADirectory
                    | K::IsADirectory
                    | K::InvalidData
                    | K::InvalidInput
                    | K::InvalidFilename
                    | K::UnexpectedEof
            ),
            _ => false,
        }
    }

    /// An error in file `path` with no line or field.
    pub fn file(path: impl AsRef<Path>, msg: impl Into<String>) -> Self {
        Error::Input {
            loc: Location {
                path: path.as_ref().to_path_buf(),
                line: None,
                field: None,
            },
            msg: msg.into(),
        }
    }

    /// An error at `path:line`, optionally naming a field.
    pub fn at(
        path: impl AsRef<Path>,
        line: Option<usize>,
        field: Option<&str>,
        msg: impl Into<String>,
    ) -> Self {
        Error::Input {
            loc: Location {
                path: path.as_ref().to_path_buf(),
                line,
                field: field.map(str::to_string),
            },
            msg: msg.into(),
        }
    }

    /// An I/O error on `path`.
    pub fn io(path: impl AsRef<Path>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.as_ref().to_path_buf(),
            source,
        }
    }
}
