//! Why a route is not programmed. Every message starts with the field path, so the status
//! tells the author exactly what to fix.

/// Values quoted in messages are cut to this many characters: a status message must stay
/// readable even when the offending value is a 4 KiB header value.
const SHOWN: usize = 64;

/// `value` for a message: quoted, cut to a readable length.
pub(crate) fn shown(value: &str) -> String {
    match value.char_indices().nth(SHOWN) {
        Some((cut, _)) => format!("{:?}...", &value[..cut]),
        None => format!("{value:?}"),
    }
}

/// Why a route was rejected as a whole.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// The object has no namespace or name.
    #[error("metadata.{0}: the route has none; it cannot be placed or reported on")]
    MissingMetadata(&'static str),
    /// The spec does not have the kind's shape (a list where an object belongs).
    #[error("spec: cannot be read: {0}")]
    Unreadable(String),
    #[error("{path}: at most {max} allowed, found {found}")]
    TooMany {
        path: String,
        max: usize,
        found: usize,
    },
    /// A value outside the field's grammar or range. `value` is already quoted ([`shown`]).
    #[error("{path}: {value} {why}")]
    Invalid {
        path: String,
        value: String,
        why: String,
    },
    /// A field or combination the Gateway API defines but this implementation does not
    /// implement, or a required field that is missing.
    #[error("{path}: {why}")]
    Unsupported { path: String, why: String },
    /// Another object takes precedence (see [`crate::l7::istio`]).
    #[error("{path}: {why}")]
    Conflicted { path: String, why: String },
    /// Filters that cannot be combined (the Gateway API's `IncompatibleFilters`).
    #[error("{path}: {why}")]
    IncompatibleFilters { path: String, why: String },
}

impl RouteError {
    /// A spec that does not deserialise. Parser messages may quote whole values: cut to a
    /// status-sized message.
    pub(crate) fn unreadable(message: impl std::fmt::Display) -> Self {
        const MAX: usize = 256;
        let message = message.to_string();
        Self::Unreadable(match message.char_indices().nth(MAX) {
            Some((cut, _)) => format!("{}...", &message[..cut]),
            None => message,
        })
    }

    pub(crate) fn invalid(path: impl Into<String>, value: &str, why: impl Into<String>) -> Self {
        Self::Invalid {
            path: path.into(),
            value: shown(value),
            why: why.into(),
        }
    }

    pub(crate) fn unsupported(path: impl Into<String>, why: impl Into<String>) -> Self {
        Self::Unsupported {
            path: path.into(),
            why: why.into(),
        }
    }

    pub(crate) fn too_many(path: impl Into<String>, max: usize, found: usize) -> Self {
        Self::TooMany {
            path: path.into(),
            max,
            found,
        }
    }

    /// The reason of the `Accepted: False` condition for this rejection.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::IncompatibleFilters { .. } => "IncompatibleFilters",
            Self::Conflicted { .. } => "Conflicted",
            _ => "UnsupportedValue",
        }
    }
}
