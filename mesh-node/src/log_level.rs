//! The process's log filter, changeable at run time (the admin surface's `/logging`), so an
//! operator can turn on debug logs of one proxy without restarting it and cutting its
//! connections.
//!
//! The binary installs the filter once at start-up ([`init`]); the admin surface reads and
//! replaces it ([`current`], [`set`]). A process that installed none (tests, tools) reports
//! [`LogLevelError::NotInstalled`].

use std::sync::OnceLock;

use tracing_subscriber::{EnvFilter, Registry, reload};

/// The longest filter accepted: a filter names a handful of targets and levels.
pub const MAX_FILTER_LEN: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum LogLevelError {
    #[error("this process has no reloadable log filter")]
    NotInstalled,
    #[error("a log filter is at most {MAX_FILTER_LEN} bytes")]
    TooLong,
    #[error("not a log filter (expected e.g. `debug` or `info,mesh_node::proxy=debug`): {0}")]
    Invalid(String),
    #[error("cannot replace the log filter: {0}")]
    Reload(String),
}

struct Installed {
    handle: reload::Handle<EnvFilter, Registry>,
    /// The filter's text as last set (an `EnvFilter` does not print back what it parsed).
    text: parking_lot::Mutex<String>,
}

static FILTER: OnceLock<Installed> = OnceLock::new();

/// A reloadable filter layer starting at `initial`, to be the registry's first layer; its
/// handle is kept for [`set`]. Only the first call in a process installs one.
pub fn init(initial: &str) -> reload::Layer<EnvFilter, Registry> {
    let filter = EnvFilter::try_new(initial).unwrap_or_else(|_| EnvFilter::new("info"));
    let (layer, handle) = reload::Layer::new(filter);
    let _ = FILTER.set(Installed {
        handle,
        text: parking_lot::Mutex::new(initial.to_owned()),
    });
    layer
}

/// The filter in force, as last set.
pub fn current() -> Result<String, LogLevelError> {
    let installed = FILTER.get().ok_or(LogLevelError::NotInstalled)?;
    Ok(installed.text.lock().clone())
}

/// Replaces the filter with `filter` (the `RUST_LOG` syntax); the old one stays on error.
pub fn set(filter: &str) -> Result<(), LogLevelError> {
    let installed = FILTER.get().ok_or(LogLevelError::NotInstalled)?;
    let parsed = parse(filter)?;
    installed
        .handle
        .reload(parsed)
        .map_err(|e| LogLevelError::Reload(e.to_string()))?;
    filter.clone_into(&mut installed.text.lock());
    Ok(())
}

fn parse(filter: &str) -> Result<EnvFilter, LogLevelError> {
    if filter.len() > MAX_FILTER_LEN {
        return Err(LogLevelError::TooLong);
    }
    EnvFilter::builder()
        .parse(filter)
        .map_err(|e| LogLevelError::Invalid(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_parse_as_rust_log_does_and_hostile_ones_are_refused() {
        assert!(parse("debug").is_ok());
        assert!(parse("info,mesh_node::proxy=trace").is_ok());
        assert!(matches!(parse("info,=??"), Err(LogLevelError::Invalid(_))));
        assert!(matches!(
            parse(&"a".repeat(MAX_FILTER_LEN + 1)),
            Err(LogLevelError::TooLong)
        ));
    }

    #[test]
    fn without_an_installed_filter_nothing_is_changed() {
        // The test harness installs none.
        assert!(matches!(set("debug"), Err(LogLevelError::NotInstalled)));
        assert!(matches!(current(), Err(LogLevelError::NotInstalled)));
    }
}
