//! Applying a matched rule's filters to request and response parts.
//!
//! Redirect `Location`s keep the request's query. Without a configured port, a redirect that
//! changes the scheme uses that scheme's default port; one that does not keeps the port the
//! client addressed (the waypoint's own listener port means nothing to clients). Default
//! ports are never written.

use http::{
    HeaderMap, HeaderValue, Response, StatusCode, Uri, header,
    request::Parts,
    response,
    uri::{Authority, PathAndQuery},
};

use super::{
    matching::{authority, prefix_matches},
    model::{Filters, HeaderModifier, PathModifier, RedirectConfig, RewriteConfig},
};

/// What to do with a request after its filters ran.
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use]
pub enum RequestAction {
    /// Continue: pick a backend (or, after backend filters, send it).
    Forward,
    /// Answer with this redirect instead of forwarding.
    Redirect(Redirect),
    /// Answer 500: the request cannot be served as configured.
    Fail(FilterFailure),
}

/// A redirect response: the status (301, 302, 303, 307 or 308) and the `Location`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Redirect {
    pub status: StatusCode,
    pub location: HeaderValue,
}

impl Redirect {
    /// The response to send (empty body).
    pub fn to_response(&self) -> Response<()> {
        let mut response = Response::new(());
        *response.status_mut() = self.status;
        response
            .headers_mut()
            .insert(header::LOCATION, self.location.clone());
        response
    }
}

/// Why a request gets a 500 from its filters.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FilterFailure {
    /// A filter this waypoint does not implement, which must not be skipped (`path: why`).
    #[error("{0}")]
    Unsupported(String),
    /// The rewritten or redirected URI is not valid (the route's values are validated, so
    /// this takes an unusual request, such as one without a path).
    #[error("the rewritten request URI is not valid: {0}")]
    Uri(String),
}

impl HeaderModifier {
    pub(crate) fn apply(&self, headers: &mut HeaderMap) {
        for name in &self.remove {
            headers.remove(name);
        }
        for (name, value) in &self.set {
            headers.insert(name.clone(), value.clone());
        }
        for (name, value) in &self.add {
            headers.append(name.clone(), value.clone());
        }
    }
}

impl Filters {
    /// Applies the request filters; `prefix` is the matched `PathPrefix`, if any.
    pub(crate) fn apply_request(&self, parts: &mut Parts, prefix: Option<&str>) -> RequestAction {
        if let Some(why) = &self.unsupported {
            return RequestAction::Fail(FilterFailure::Unsupported(why.clone()));
        }
        if let Some(modifier) = &self.request_headers {
            modifier.apply(&mut parts.headers);
        }
        if let Some(rewrite) = &self.rewrite
            && let Err(e) = apply_rewrite(parts, rewrite, prefix)
        {
            return RequestAction::Fail(e);
        }
        match &self.redirect {
            Some(redirect) => match location(parts, redirect, prefix) {
                Ok(location) => RequestAction::Redirect(Redirect {
                    status: redirect.status,
                    location,
                }),
                Err(e) => RequestAction::Fail(e),
            },
            None => RequestAction::Forward,
        }
    }

    pub(crate) fn apply_response(&self, parts: &mut response::Parts) {
        if let Some(modifier) = &self.response_headers {
            modifier.apply(&mut parts.headers);
        }
    }
}

/// `path` with the matched `prefix` (no trailing `/`) replaced by `replacement` (no trailing
/// `/`), keeping element boundaries: `/foo/bar` with `/foo` -> `/xyz` gives `/xyz/bar`, and an
/// empty result is `/`. A path the prefix does not match is returned unchanged.
pub(crate) fn replace_prefix(path: &str, prefix: &str, replacement: &str) -> String {
    if !prefix_matches(prefix, path) {
        return path.into();
    }
    let rest = &path[prefix.len()..];
    let replaced = format!("{replacement}{rest}");
    if replaced.is_empty() {
        "/".into()
    } else {
        replaced
    }
}

fn modified_path(path: &str, modifier: &PathModifier, prefix: Option<&str>) -> String {
    match modifier {
        PathModifier::Full(full) => full.clone(),
        // Compilation guarantees that a rule using ReplacePrefixMatch has a PathPrefix match.
        PathModifier::Prefix(replacement) => match prefix {
            Some(prefix) => replace_prefix(path, prefix, replacement),
            None => path.into(),
        },
    }
}

fn apply_rewrite(
    parts: &mut Parts,
    rewrite: &RewriteConfig,
    prefix: Option<&str>,
) -> Result<(), FilterFailure> {
    let uri_error = |e: &dyn std::fmt::Display| FilterFailure::Uri(e.to_string());
    let mut uri = parts.uri.clone().into_parts();
    if let Some(host) = &rewrite.hostname {
        // Both places a Host travels in: the header (HTTP/1) and the authority (HTTP/2).
        parts.headers.insert(header::HOST, host.clone());
        if uri.authority.is_some() {
            uri.authority = Some(Authority::try_from(host.as_bytes()).map_err(|e| uri_error(&e))?);
        }
    }
    if let Some(modifier) = &rewrite.path {
        let path = modified_path(parts.uri.path(), modifier, prefix);
        let with_query = match parts.uri.query() {
            Some(query) => format!("{path}?{query}"),
            None => path,
        };
        uri.path_and_query = Some(PathAndQuery::try_from(with_query).map_err(|e| uri_error(&e))?);
    }
    parts.uri = Uri::from_parts(uri).map_err(|e| uri_error(&e))?;
    Ok(())
}

fn location(
    parts: &Parts,
    redirect: &RedirectConfig,
    prefix: Option<&str>,
) -> Result<HeaderValue, FilterFailure> {
    let scheme = redirect
        .scheme
        .or_else(|| parts.uri.scheme_str())
        .unwrap_or("http");
    let authority = authority(parts);
    let host = redirect
        .hostname
        .as_deref()
        .or_else(|| authority.as_ref().map(Authority::host));
    let port = match (redirect.port, redirect.scheme) {
        (Some(port), _) => Some(port),
        // A new scheme brings its default port.
        (None, Some(_)) => None,
        (None, None) => authority.as_ref().and_then(Authority::port_u16),
    }
    .filter(|&p| !matches!((scheme, p), ("http", 80) | ("https", 443)));
    let path = match &redirect.path {
        Some(modifier) => modified_path(parts.uri.path(), modifier, prefix),
        None => parts.uri.path().into(),
    };
    let query = parts
        .uri
        .query()
        .map(|q| format!("?{q}"))
        .unwrap_or_default();
    let location = match (host, port) {
        (Some(host), Some(port)) => format!("{scheme}://{host}:{port}{path}{query}"),
        (Some(host), None) => format!("{scheme}://{host}{path}{query}"),
        // No host to redirect to: a relative reference keeps the client on the same one.
        (None, _) => format!("{path}{query}"),
    };
    HeaderValue::try_from(location).map_err(|e| FilterFailure::Uri(e.to_string()))
}
