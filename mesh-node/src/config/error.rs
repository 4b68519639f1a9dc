//! The one error type of every configuration file (agent, waypoint, controller): a file that
//! cannot be read, does not deserialize, or holds a value that is refused. A refusal names the
//! file, the field and, where the file spells the field out, its line.

use std::path::{Path, PathBuf};

use super::Lines;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source} (check the path and its permissions)")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The file does not deserialize: YAML syntax, an unknown or missing field, a wrong type.
    #[error("{} is not a valid configuration: {}{reason}", file_name(path), place(field, *line))]
    Parse {
        /// Empty until [`ConfigError::in_file`] names it (text parsed on its own).
        path: PathBuf,
        /// Field path (`datapath.excluded_ports[2]`); empty for YAML syntax errors.
        field: String,
        line: Option<u64>,
        reason: String,
    },
    /// A value deserialized but is refused (range, reference, address).
    #[error("invalid config{}: {}{reason}", in_file(path), place(field, *line))]
    Invalid {
        /// Empty until [`ConfigError::in_file`] names it.
        path: PathBuf,
        field: String,
        /// Where the field, or the nearest enclosing one, is written; none for defaults.
        line: Option<u64>,
        reason: String,
    },
}

fn file_name(path: &Path) -> String {
    if path.as_os_str().is_empty() {
        "the configuration".into()
    } else {
        format!("config file {}", path.display())
    }
}

fn in_file(path: &Path) -> String {
    if path.as_os_str().is_empty() {
        String::new()
    } else {
        format!(" file {}", path.display())
    }
}

fn place(field: &str, line: Option<u64>) -> String {
    match (field.is_empty(), line) {
        (false, Some(line)) => format!("{field} (line {line}): "),
        (false, None) => format!("{field}: "),
        (true, Some(line)) => format!("line {line}: "),
        (true, None) => String::new(),
    }
}

/// A refusal of `field`, located later by [`ConfigError::located`].
pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        path: PathBuf::new(),
        field: field.into(),
        line: None,
        reason: reason.into(),
    }
}

impl ConfigError {
    /// A refusal at `line` of the text before it is parsed (an environment reference).
    pub(crate) fn at_line(line: u64, reason: String) -> Self {
        Self::Invalid {
            path: PathBuf::new(),
            field: "config".into(),
            line: Some(line),
            reason,
        }
    }

    /// The field this refusal names, if any.
    pub fn field(&self) -> Option<&str> {
        match self {
            Self::Parse { field, .. } | Self::Invalid { field, .. } => Some(field),
            Self::Read { .. } => None,
        }
    }

    /// The line of the file this refusal points at, if any.
    pub fn line(&self) -> Option<u64> {
        match self {
            Self::Parse { line, .. } | Self::Invalid { line, .. } => *line,
            Self::Read { .. } => None,
        }
    }

    /// Adds the line of the refused field, found in the `text` it was read from.
    pub(crate) fn located(self, text: &str) -> Self {
        match self {
            Self::Invalid {
                path,
                field,
                line: None,
                reason,
            } => Self::Invalid {
                line: Lines::of(text).line(&field),
                path,
                field,
                reason,
            },
            other => other,
        }
    }

    /// Names the file a refusal came from.
    pub(crate) fn in_file(mut self, file: &Path) -> Self {
        match &mut self {
            Self::Parse { path, .. } | Self::Invalid { path, .. } => *path = file.into(),
            Self::Read { .. } => {}
        }
        self
    }
}
