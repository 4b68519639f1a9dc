//! Grammars of single values, as the Gateway API CRDs define them.

use std::net::IpAddr;

use http::{HeaderName, HeaderValue};
use regex::{Regex, RegexBuilder};

use super::{super::limits, Ctx};
use crate::l7::route::{error::RouteError, model::Hostname};

/// An RFC 1123 subdomain, lowercase (`PreciseHostname`, `SectionName`): the mesh's one check,
/// whose length bound is the Gateway API's ([`limits::HOSTNAME_LENGTH`]).
pub(crate) fn is_dns_subdomain(name: &str) -> bool {
    name.len() <= limits::HOSTNAME_LENGTH && crate::identity::is_dns_subdomain(name)
}

/// `spec.hostnames`: precise or `*.`-prefixed names, never IP addresses.
pub(super) fn hostnames(names: &[String]) -> Result<Vec<Hostname>, RouteError> {
    if names.len() > limits::HOSTNAMES {
        return Err(RouteError::too_many(
            "spec.hostnames",
            limits::HOSTNAMES,
            names.len(),
        ));
    }
    names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let path = format!("spec.hostnames[{i}]");
            match name.strip_prefix("*.") {
                Some(rest) if is_dns_subdomain(rest) => Ok(Hostname::Wildcard(format!(".{rest}"))),
                None if is_dns_subdomain(name) && name.parse::<IpAddr>().is_err() => {
                    Ok(Hostname::Exact(name.clone()))
                }
                _ => Err(RouteError::invalid(
                    path,
                    name,
                    "is not a hostname (lowercase DNS name, optionally starting with '*.'; no IP addresses)",
                )),
            }
        })
        .collect()
}

/// A `PreciseHostname` (redirect and rewrite targets).
pub(super) fn precise_hostname(path: &str, name: &str) -> Result<String, RouteError> {
    if is_dns_subdomain(name) {
        Ok(name.into())
    } else {
        Err(RouteError::invalid(
            path,
            name,
            "is not a hostname (lowercase DNS name, no wildcard)",
        ))
    }
}

/// A port number, 1-65535.
pub(crate) fn port(path: &str, port: i64) -> Result<u16, RouteError> {
    u16::try_from(port)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| RouteError::invalid(path, &port.to_string(), "is not a port (1-65535)"))
}

/// The characters of a header name (`HeaderName` in the Gateway API: an RFC 7230 token).
fn is_token(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= limits::NAME_LENGTH
        && name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&c))
}

/// A header name to match on: validated and lowercased.
pub(super) fn header_name(path: &str, name: &str) -> Result<HeaderName, RouteError> {
    if !is_token(name) {
        return Err(RouteError::invalid(
            path,
            name,
            "is not a header name (letters, digits and !#$%&'*+-.^_`|~)",
        ));
    }
    HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes())
        .map_err(|_| RouteError::invalid(path, name, "is not a header name"))
}

/// Headers that frame or route the message itself: a header filter changing them would
/// corrupt the exchange (hop-by-hop headers, body framing) or bypass `URLRewrite` (`host`).
const PROTECTED: &[&str] = &[
    "connection",
    "content-length",
    "host",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// A header name a filter modifies.
pub(super) fn modifiable_header(path: &str, name: &str) -> Result<HeaderName, RouteError> {
    let header = header_name(path, name)?;
    if PROTECTED.contains(&header.as_str()) {
        return Err(RouteError::unsupported(
            path,
            format!(
                "header {:?} cannot be modified by a filter (it frames or addresses the message; use URLRewrite for the host)",
                header.as_str()
            ),
        ));
    }
    Ok(header)
}

/// A header value a filter writes: visible ASCII, spaces and tabs, 1-4096 bytes.
pub(super) fn header_value(path: &str, value: &str) -> Result<HeaderValue, RouteError> {
    if value.is_empty() || value.len() > limits::HEADER_VALUE_LENGTH {
        return Err(RouteError::invalid(
            path,
            value,
            format!("must be 1 to {} bytes", limits::HEADER_VALUE_LENGTH),
        ));
    }
    HeaderValue::from_str(value).map_err(|_| {
        RouteError::invalid(
            path,
            value,
            "is not a header value (visible ASCII, spaces and tabs only)",
        )
    })
}

/// Checks a value's length: 1 to `max` bytes.
pub(super) fn length(path: &str, value: &str, max: usize) -> Result<(), RouteError> {
    if value.is_empty() || value.len() > max {
        return Err(RouteError::invalid(
            path,
            value,
            format!("must be 1 to {max} bytes"),
        ));
    }
    Ok(())
}

/// Path characters the Gateway API allows in `Exact` and `PathPrefix` values: unreserved,
/// sub-delimiters, `:`, `@`, `/`, and `%` followed by two hex digits.
fn has_path_characters(value: &str) -> bool {
    let b = value.as_bytes();
    let mut i = 0;
    // Each pass consumes one character or one escape.
    while i < b.len() {
        let c = b[i];
        if c == b'%' {
            if !(b.get(i + 1).is_some_and(u8::is_ascii_hexdigit)
                && b.get(i + 2).is_some_and(u8::is_ascii_hexdigit))
            {
                return false;
            }
            i += 3;
        } else if c.is_ascii_alphanumeric() || b"-/._~!$&'()*+,;=:@".contains(&c) {
            i += 1;
        } else {
            return false;
        }
    }
    true
}

/// An `Exact` or `PathPrefix` value: absolute, no empty or dot segments, no encoded slash,
/// no fragment, only path characters.
pub(super) fn match_path(path: &str, value: &str) -> Result<(), RouteError> {
    let why = if value.len() > limits::PATH_LENGTH {
        Some("is too long (at most 1024 bytes)")
    } else if !value.starts_with('/') {
        Some("must start with '/'")
    } else if value.contains("//") {
        Some("must not contain '//'")
    } else if value.contains("/./") || value.ends_with("/.") {
        Some("must not contain '.' segments")
    } else if value.contains("/../") || value.ends_with("/..") {
        Some("must not contain '..' segments")
    } else if value.to_ascii_lowercase().contains("%2f") {
        Some("must not contain an encoded '/' (%2F)")
    } else if !has_path_characters(value) {
        Some(
            "must contain only path characters (letters, digits, -._~!$&'()*+,;=:@/ and %XX escapes)",
        )
    } else {
        None
    };
    match why {
        Some(why) => Err(RouteError::invalid(path, value, why)),
        None => Ok(()),
    }
}

/// A path written by a rewrite or redirect: empty (prefix replacement only) or absolute,
/// path characters only, so the resulting URI is always valid.
pub(super) fn replacement_path(path: &str, value: &str, full: bool) -> Result<(), RouteError> {
    let why = if value.len() > limits::PATH_LENGTH {
        Some("is too long (at most 1024 bytes)")
    } else if value.is_empty() && full {
        Some("must not be empty")
    } else if !value.is_empty() && !value.starts_with('/') {
        Some("must start with '/'")
    } else if !has_path_characters(value) {
        Some(
            "must contain only path characters (letters, digits, -._~!$&'()*+,;=:@/ and %XX escapes)",
        )
    } else {
        None
    };
    match why {
        Some(why) => Err(RouteError::invalid(path, value, why)),
        None => Ok(()),
    }
}

impl Ctx<'_> {
    /// Compiles a regular expression that must match the whole value; `max` is the length
    /// the field allows.
    pub(super) fn regex(
        &mut self,
        path: &str,
        pattern: &str,
        max: usize,
    ) -> Result<Regex, RouteError> {
        self.regexes += 1;
        if self.regexes > limits::REGEXES_PER_ROUTE {
            return Err(RouteError::too_many(
                format!("{path} (regular expressions in the route)"),
                limits::REGEXES_PER_ROUTE,
                self.regexes,
            ));
        }
        length(path, pattern, max)?;
        let build = |pattern: &str| {
            RegexBuilder::new(pattern)
                .size_limit(limits::REGEX_SIZE)
                .dfa_size_limit(limits::REGEX_SIZE)
                .nest_limit(limits::REGEX_NESTING)
                .build()
        };
        // Compiled alone first: wrapped right away, an unbalanced pattern such as `a)|(b`
        // would compile into something that is not anchored.
        let fail = |e: regex::Error| {
            let why = match e {
                regex::Error::CompiledTooBig(limit) => {
                    format!("is too complex (compiles to more than {limit} bytes)")
                }
                e => format!("is not a regular expression: {}", one_line(&e.to_string())),
            };
            RouteError::invalid(path, pattern, why)
        };
        build(pattern).map_err(fail)?;
        build(&format!("^(?:{pattern})$")).map_err(fail)
    }
}

/// The last line of a multi-line parser message (the part that says what is wrong).
fn one_line(message: &str) -> &str {
    message
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or(message)
        .trim()
}
