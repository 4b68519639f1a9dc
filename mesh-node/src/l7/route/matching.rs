//! Whether a request satisfies a match, and how specific a route's hostname is for it.
//!
//! The request is read as the caller hands it over: the path is matched as it is in the URI,
//! so the caller normalises it first (dot segments, duplicate slashes, escapes: HOSTILE.md
//! 28), and policy and routing then see the same path.

use http::{HeaderMap, HeaderName, Method, header, request::Parts, uri::Authority};

use super::model::{
    GrpcMatch, HeaderMatch, Hostname, HttpMatch, PathMatch, QueryMatch, StringMatch,
};

/// What routing reads from one request, extracted once.
#[derive(Debug)]
pub(crate) struct RequestView<'a> {
    pub parts: &'a Parts,
    pub path: &'a str,
    /// Lowercase, without port or trailing dot; from the URI's authority (`:authority`) or
    /// the `Host` header.
    pub host: Option<String>,
    /// `(service, method)` of a gRPC request.
    pub grpc: Option<(&'a str, &'a str)>,
}

impl<'a> RequestView<'a> {
    pub(crate) fn new(parts: &'a Parts) -> Self {
        let path = parts.uri.path();
        Self {
            parts,
            path,
            host: authority(parts).map(|a| {
                let host = a.host();
                host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase()
            }),
            grpc: grpc_call(parts, path),
        }
    }
}

/// The request's authority: the URI's (HTTP/2 `:authority`, absolute-form HTTP/1) or the
/// `Host` header's.
pub(crate) fn authority(parts: &Parts) -> Option<Authority> {
    if let Some(a) = parts.uri.authority() {
        return Some(a.clone());
    }
    let host = parts.headers.get(header::HOST)?;
    Authority::try_from(host.as_bytes()).ok()
}

/// `(service, method)` when the request is a gRPC call: `POST /<service>/<method>` with a
/// `content-type` of `application/grpc`, optionally followed by `+<codec>` or parameters
/// (gRPC-Web is a different protocol and is not included).
fn grpc_call<'a>(parts: &Parts, path: &'a str) -> Option<(&'a str, &'a str)> {
    if parts.method != Method::POST {
        return None;
    }
    let content_type = parts.headers.get(header::CONTENT_TYPE)?.as_bytes();
    let rest = content_type.strip_prefix(b"application/grpc")?;
    if !(rest.is_empty() || rest.starts_with(b"+") || rest.starts_with(b";")) {
        return None;
    }
    let (service, method) = path.strip_prefix('/')?.split_once('/')?;
    (!service.is_empty() && !method.is_empty() && !method.contains('/'))
        .then_some((service, method))
}

impl StringMatch {
    pub(crate) fn matches(&self, value: &str) -> bool {
        match self {
            Self::Exact(expected) => expected == value,
            Self::Regex(re) => re.is_match(value),
        }
    }
}

/// A header's value for matching: its only value, or all its values joined with `,` (their
/// meaning per RFC 9110). Values that are not UTF-8 never match.
fn header_value(headers: &HeaderMap, name: &HeaderName) -> Option<String> {
    let mut values = headers.get_all(name).iter();
    let first = values.next()?;
    let mut joined = std::str::from_utf8(first.as_bytes()).ok()?.to_owned();
    // Bounded by the number of header lines the server accepted.
    for more in values {
        joined.push(',');
        joined.push_str(std::str::from_utf8(more.as_bytes()).ok()?);
    }
    Some(joined)
}

fn headers_match(matches: &[HeaderMatch], headers: &HeaderMap) -> bool {
    matches
        .iter()
        .all(|m| header_value(headers, &m.name).is_some_and(|value| m.value.matches(&value)))
}

/// The first value of the parameter, percent-decoded (as the specification recommends).
fn query_match(m: &QueryMatch, query: Option<&str>) -> bool {
    let Some(query) = query else {
        return false;
    };
    form_urlencoded::parse(query.as_bytes())
        .find(|(name, _)| *name == m.name)
        .is_some_and(|(_, value)| m.value.matches(&value))
}

/// `prefix` (without trailing `/`) matches `path` element by element: `/foo` matches `/foo`,
/// `/foo/` and `/foo/bar`, not `/foobar`.
pub(crate) fn prefix_matches(prefix: &str, path: &str) -> bool {
    path.strip_prefix(prefix)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

impl HttpMatch {
    pub(crate) fn matches(&self, req: &RequestView<'_>) -> bool {
        let path = match &self.path {
            PathMatch::Exact(p) => p == req.path,
            PathMatch::Prefix { prefix, .. } => prefix_matches(prefix, req.path),
            PathMatch::Regex(re) => re.is_match(req.path),
        };
        path && self.method.as_ref().is_none_or(|m| *m == req.parts.method)
            && headers_match(&self.headers, &req.parts.headers)
            && self
                .query
                .iter()
                .all(|q| query_match(q, req.parts.uri.query()))
    }
}

impl GrpcMatch {
    pub(crate) fn matches(&self, req: &RequestView<'_>) -> bool {
        let Some((service, method)) = req.grpc else {
            return false;
        };
        self.service.as_ref().is_none_or(|s| s.matches(service))
            && self.method.as_ref().is_none_or(|m| m.matches(method))
            && headers_match(&self.headers, &req.parts.headers)
    }
}

/// How specifically a route's hostnames match a request's host; more specific routes take
/// precedence. Orders as the specification ranks them: an exact hostname over a wildcard,
/// then the longer one; a route without hostnames ranks lowest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct HostRank {
    exact: bool,
    length: usize,
}

impl HostRank {
    /// A route without hostnames.
    pub(crate) const ANY: Self = Self {
        exact: false,
        length: 0,
    };
}

/// The best rank among `hostnames` for `host`; `None` if the route has hostnames and none
/// matches (or the request has no host).
pub(crate) fn host_rank(hostnames: &[Hostname], host: Option<&str>) -> Option<HostRank> {
    if hostnames.is_empty() {
        return Some(HostRank::ANY);
    }
    let host = host?;
    hostnames
        .iter()
        .filter_map(|h| match h {
            Hostname::Exact(name) => (name == host).then_some(HostRank {
                exact: true,
                length: name.len(),
            }),
            // `.example.com` needs at least one more label: `a.example.com`, not
            // `example.com` or `.example.com`.
            Hostname::Wildcard(suffix) => {
                (host.len() > suffix.len() && host.ends_with(suffix.as_str())).then_some(HostRank {
                    exact: false,
                    length: suffix.len() + 1,
                })
            }
        })
        .max()
}
