//! Request path normalization at the waypoint: one canonical form of the path, computed before
//! authorization and routing and forwarded upstream in place of the original, so that what a
//! policy authorized is exactly what the backend receives.
//!
//! [`normalize_path`] takes the request target in origin form (`/path?query`) and:
//!
//! - decodes percent-encoded **unreserved** characters (`A-Z a-z 0-9 - . _ ~`), so `/%61dmin`
//!   is `/admin`, and writes every other escape with upper-case hex (`%2a` becomes `%2A`);
//!   it never decodes twice (`%2561` stays `%2561`);
//! - **rejects** (the caller answers 400) what backends disagree on or what could smuggle a
//!   separator past a policy: path parameters (a `;` in any segment, raw or as `%3B`), an
//!   encoded `/` or `\` (`%2F`, `%5C`), an encoded or raw control
//!   character (NUL included), a raw `\`, `#` or non-ASCII byte, an invalid escape (`%G0`, a
//!   truncated `%4`), and escapes that do not decode to valid UTF-8 (overlong forms such as
//!   `%C0%AF`, a historical way of spelling `/`);
//! - merges runs of `/` (`//admin` is `/admin`) and resolves `.` and `..` segments (RFC 3986
//!   section 5.2.4), never climbing above the root (`/../admin` is `/admin`);
//! - keeps the query string exactly as received, separately ([`NormalizedPath::query`]).
//!
//! What it deliberately leaves alone, and how to write policies for it:
//!
//! - **Case** is significant in paths: `/ADMIN` and `/admin` stay distinct (Istio and
//!   most backends agree). Match both explicitly if a backend folds case.
//! - A **trailing slash** is kept: `/admin/` and `/admin` are different paths, for Istio's
//!   exact `paths` as here. Use the prefix form `/admin*` to cover both and everything below.
//!
//! **Path parameters are refused, not stripped.** Backends disagree on `;`: servlet
//! containers drop `;params` from every segment before routing (so `/;x/admin`, `/..;/admin`
//! and, in some, `/%3B/admin` reach `/admin`), while most others treat `;` as data. No single
//! rewrite is right for both, and stripping would silently change what applications that use
//! matrix parameters receive; refusing makes the path that policy and routes see the only one
//! any backend can read. The cost: a `;jsessionid=` URL or matrix parameters cannot cross a
//! waypoint (put them in the query or a cookie).
//!
//! Input is bounded: a target longer than [`MAX_TARGET_LEN`] bytes is rejected before any work.

use std::fmt;

/// The longest request target accepted, in bytes (Envoy and hyper use limits of this order).
pub const MAX_TARGET_LEN: usize = 8192;

/// Why a request target was refused; the caller answers 400 Bad Request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("the request path is empty or does not start with '/'")]
    NotOriginForm,
    #[error("the request target is longer than {MAX_TARGET_LEN} bytes")]
    TooLong,
    #[error("the request path contains an invalid percent escape")]
    BadEscape,
    #[error("the request path contains an encoded '/' or '\\' (%2F, %5C)")]
    EncodedSeparator,
    #[error("the request path contains a control character (raw or percent-encoded)")]
    Control,
    #[error("the request path contains a character not allowed in a request target ({0:?})")]
    BadCharacter(char),
    #[error("the request path contains percent escapes that are not valid UTF-8")]
    InvalidUtf8,
    #[error("the request path contains a path parameter (';' or %3B)")]
    PathParameters,
}

/// A normalized request target: the path to authorize, route and forward, and the query as
/// received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NormalizedPath {
    path: String,
    query: Option<String>,
}

impl NormalizedPath {
    /// The normalized path, always starting with `/`, without the query.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The query string after `?`, untouched; `None` when the target had no `?`.
    pub fn query(&self) -> Option<&str> {
        self.query.as_deref()
    }

    /// `path?query`, what the waypoint forwards upstream.
    pub fn path_and_query(&self) -> String {
        match &self.query {
            Some(q) => format!("{}?{q}", self.path),
            None => self.path.clone(),
        }
    }
}

impl fmt::Display for NormalizedPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.path)?;
        if let Some(q) = &self.query {
            write!(f, "?{q}")?;
        }
        Ok(())
    }
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// Normalizes a request target in origin form (see the module documentation).
pub fn normalize_path(raw: &str) -> Result<NormalizedPath, PathError> {
    if raw.len() > MAX_TARGET_LEN {
        return Err(PathError::TooLong);
    }
    let (path, query) = match raw.split_once('?') {
        Some((path, query)) => (path, Some(query.to_owned())),
        None => (raw, None),
    };
    if !path.starts_with('/') {
        return Err(PathError::NotOriginForm);
    }
    let decoded = decode(path.as_bytes())?;
    Ok(NormalizedPath {
        path: resolve_segments(&decoded),
        query,
    })
}

/// Decodes unreserved escapes and validates the rest; the result is ASCII.
fn decode(path: &[u8]) -> Result<String, PathError> {
    let mut out = String::with_capacity(path.len());
    // Bytes of consecutive escapes above 0x7F, which must form valid UTF-8 together.
    let mut high: Vec<u8> = Vec::new();
    let mut i = 0;
    while i < path.len() {
        let b = path[i];
        if b == b'%' {
            let (Some(h), Some(l)) = (
                path.get(i + 1).copied().and_then(hex),
                path.get(i + 2).copied().and_then(hex),
            ) else {
                return Err(PathError::BadEscape);
            };
            let v = h << 4 | l;
            i += 3;
            if v >= 0x80 {
                high.push(v);
                continue;
            }
            flush_high(&mut high, &mut out)?;
            match v {
                b'/' | b'\\' => return Err(PathError::EncodedSeparator),
                b';' => return Err(PathError::PathParameters),
                0..=0x1F | 0x7F => return Err(PathError::Control),
                v if is_unreserved(v) => out.push(char::from(v)),
                v => push_escape(&mut out, v),
            }
            continue;
        }
        flush_high(&mut high, &mut out)?;
        match b {
            0..=0x1F | 0x7F => return Err(PathError::Control),
            b';' => return Err(PathError::PathParameters),
            b'\\' | b'#' | b' ' => return Err(PathError::BadCharacter(char::from(b))),
            0x80..=0xFF => return Err(PathError::BadCharacter(char::REPLACEMENT_CHARACTER)),
            b => out.push(char::from(b)),
        }
        i += 1;
    }
    flush_high(&mut high, &mut out)?;
    Ok(out)
}

const HEX: &[u8; 16] = b"0123456789ABCDEF";

fn push_escape(out: &mut String, v: u8) {
    out.push('%');
    out.push(char::from(HEX[usize::from(v >> 4)]));
    out.push(char::from(HEX[usize::from(v & 0xF)]));
}

/// Ends a run of escapes above 0x7F: refuses it unless it is valid UTF-8 (which rules out
/// overlong forms and lone continuation bytes), then writes it back still encoded: only
/// unreserved ASCII is ever decoded.
fn flush_high(high: &mut Vec<u8>, out: &mut String) -> Result<(), PathError> {
    if high.is_empty() {
        return Ok(());
    }
    if std::str::from_utf8(high).is_err() {
        return Err(PathError::InvalidUtf8);
    }
    for &v in high.iter() {
        push_escape(out, v);
    }
    high.clear();
    Ok(())
}

/// Merges slashes and resolves dot segments of a decoded, ASCII path starting with `/`
/// (without `;`, which [`decode`] refuses).
fn resolve_segments(path: &str) -> String {
    let mut segments: Vec<&str> = Vec::new();
    let mut trailing_slash = false;
    // Empty segments come from repeated slashes (merged) and the leading slash.
    for segment in path.split('/').skip(1) {
        trailing_slash = false;
        match segment {
            "" => trailing_slash = true,
            "." => trailing_slash = true,
            ".." => {
                segments.pop();
                trailing_slash = true;
            }
            s => segments.push(s),
        }
    }
    let mut out = String::with_capacity(path.len());
    for s in &segments {
        out.push('/');
        out.push_str(s);
    }
    if trailing_slash || segments.is_empty() {
        out.push('/');
    }
    out
}

#[cfg(test)]
mod tests;
