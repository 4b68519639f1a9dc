//! `matches` of `HTTPRoute` and `GRPCRoute` rules, defaults applied: a rule without matches
//! has one (path prefix `/`, or any gRPC method).

use http::Method;

use super::{Ctx, values};
use crate::l7::route::{
    error::RouteError,
    limits,
    model::{GrpcMatch, HeaderMatch, HttpMatch, Matches, PathMatch, QueryMatch, StringMatch},
    spec::{GrpcRouteMatch, HttpRouteMatch, ValueMatch},
};

/// The match of a rule that has none: every request.
fn default_http() -> HttpMatch {
    HttpMatch {
        path: PathMatch::Prefix {
            prefix: String::new(),
            written: 1,
        },
        headers: Vec::new(),
        query: Vec::new(),
        method: None,
    }
}

pub(super) fn http(
    ctx: &mut Ctx<'_>,
    rule: &str,
    matches: &[HttpRouteMatch],
) -> Result<Matches, RouteError> {
    if matches.len() > limits::HTTP_MATCHES {
        return Err(RouteError::too_many(
            format!("{rule}.matches"),
            limits::HTTP_MATCHES,
            matches.len(),
        ));
    }
    if matches.is_empty() {
        return Ok(Matches::Http(vec![default_http()]));
    }
    let compiled = matches
        .iter()
        .enumerate()
        .map(|(i, m)| http_match(ctx, &format!("{rule}.matches[{i}]"), m))
        .collect::<Result<_, _>>()?;
    Ok(Matches::Http(compiled))
}

fn http_match(ctx: &mut Ctx<'_>, path: &str, m: &HttpRouteMatch) -> Result<HttpMatch, RouteError> {
    let path_match = match &m.path {
        None => default_http().path,
        Some(p) => {
            let value = p.value.as_deref().unwrap_or("/");
            let at = format!("{path}.path.value");
            match p.type_.as_deref().unwrap_or("PathPrefix") {
                "Exact" => {
                    values::match_path(&at, value)?;
                    PathMatch::Exact(value.into())
                }
                "PathPrefix" => {
                    values::match_path(&at, value)?;
                    PathMatch::Prefix {
                        prefix: value.trim_end_matches('/').into(),
                        written: value.len(),
                    }
                }
                "RegularExpression" => {
                    PathMatch::Regex(ctx.regex(&at, value, limits::PATH_LENGTH)?)
                }
                other => {
                    return Err(RouteError::invalid(
                        format!("{path}.path.type"),
                        other,
                        "is not one of Exact, PathPrefix, RegularExpression",
                    ));
                }
            }
        }
    };
    let method = m
        .method
        .as_deref()
        .map(|method| http_method(&format!("{path}.method"), method))
        .transpose()?;
    Ok(HttpMatch {
        path: path_match,
        headers: headers(ctx, path, &m.headers)?,
        query: query(ctx, path, &m.query_params)?,
        method,
    })
}

fn http_method(path: &str, method: &str) -> Result<Method, RouteError> {
    const METHODS: [&str; 9] = [
        "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
    ];
    if !METHODS.contains(&method) {
        return Err(RouteError::invalid(
            path,
            method,
            "is not one of GET, HEAD, POST, PUT, DELETE, CONNECT, OPTIONS, TRACE, PATCH",
        ));
    }
    Method::from_bytes(method.as_bytes())
        .map_err(|_| RouteError::invalid(path, method, "is not an HTTP method"))
}

/// `Exact` (default) or `RegularExpression`.
fn string_match(
    ctx: &mut Ctx<'_>,
    path: &str,
    type_: Option<&str>,
    value: &str,
    max: usize,
) -> Result<StringMatch, RouteError> {
    let at = format!("{path}.value");
    match type_.unwrap_or("Exact") {
        "Exact" => {
            values::length(&at, value, max)?;
            Ok(StringMatch::Exact(value.into()))
        }
        "RegularExpression" => Ok(StringMatch::Regex(ctx.regex(&at, value, max)?)),
        other => Err(RouteError::invalid(
            format!("{path}.type"),
            other,
            "is not one of Exact, RegularExpression",
        )),
    }
}

/// Header matches. Names are case-insensitive; of several entries for one name only the
/// first counts, as the specification requires.
fn headers(
    ctx: &mut Ctx<'_>,
    path: &str,
    headers: &[ValueMatch],
) -> Result<Vec<HeaderMatch>, RouteError> {
    if headers.len() > limits::CONDITIONS {
        return Err(RouteError::too_many(
            format!("{path}.headers"),
            limits::CONDITIONS,
            headers.len(),
        ));
    }
    let mut out: Vec<HeaderMatch> = Vec::with_capacity(headers.len());
    for (i, h) in headers.iter().enumerate() {
        let at = format!("{path}.headers[{i}]");
        let name = values::header_name(&format!("{at}.name"), &h.name)?;
        let value = string_match(
            ctx,
            &at,
            h.type_.as_deref(),
            &h.value,
            limits::HEADER_VALUE_LENGTH,
        )?;
        if !out.iter().any(|m| m.name == name) {
            out.push(HeaderMatch { name, value });
        }
    }
    Ok(out)
}

/// Query parameter matches. Names are exact; of several entries for one name only the first
/// counts.
fn query(
    ctx: &mut Ctx<'_>,
    path: &str,
    params: &[ValueMatch],
) -> Result<Vec<QueryMatch>, RouteError> {
    if params.len() > limits::CONDITIONS {
        return Err(RouteError::too_many(
            format!("{path}.queryParams"),
            limits::CONDITIONS,
            params.len(),
        ));
    }
    let mut out: Vec<QueryMatch> = Vec::with_capacity(params.len());
    for (i, q) in params.iter().enumerate() {
        let at = format!("{path}.queryParams[{i}]");
        // Same grammar as header names.
        values::header_name(&format!("{at}.name"), &q.name)?;
        let value = string_match(ctx, &at, q.type_.as_deref(), &q.value, limits::VALUE_LENGTH)?;
        if !out.iter().any(|m| m.name == q.name) {
            out.push(QueryMatch {
                name: q.name.clone(),
                value,
            });
        }
    }
    Ok(out)
}

pub(super) fn grpc(
    ctx: &mut Ctx<'_>,
    rule: &str,
    matches: &[GrpcRouteMatch],
) -> Result<Matches, RouteError> {
    if matches.len() > limits::GRPC_MATCHES {
        return Err(RouteError::too_many(
            format!("{rule}.matches"),
            limits::GRPC_MATCHES,
            matches.len(),
        ));
    }
    if matches.is_empty() {
        return Ok(Matches::Grpc(vec![GrpcMatch {
            service: None,
            method: None,
            headers: Vec::new(),
        }]));
    }
    let compiled = matches
        .iter()
        .enumerate()
        .map(|(i, m)| grpc_match(ctx, &format!("{rule}.matches[{i}]"), m))
        .collect::<Result<_, _>>()?;
    Ok(Matches::Grpc(compiled))
}

fn grpc_match(ctx: &mut Ctx<'_>, path: &str, m: &GrpcRouteMatch) -> Result<GrpcMatch, RouteError> {
    let headers = headers(ctx, path, &m.headers)?;
    let Some(method) = &m.method else {
        return Ok(GrpcMatch {
            service: None,
            method: None,
            headers,
        });
    };
    let at = format!("{path}.method");
    // Empty means "any", like absent.
    let service = method.service.as_deref().filter(|s| !s.is_empty());
    let name = method.method.as_deref().filter(|s| !s.is_empty());
    if service.is_none() && name.is_none() {
        return Err(RouteError::unsupported(
            at,
            "one or both of service and method must be specified",
        ));
    }
    let (service, name) = match method.type_.as_deref().unwrap_or("Exact") {
        "Exact" => {
            if let Some(s) = service
                && !is_grpc_service(s)
            {
                return Err(RouteError::invalid(
                    format!("{at}.service"),
                    s,
                    "is not a gRPC service name (dot-separated identifiers)",
                ));
            }
            if let Some(n) = name
                && !is_identifier(n)
            {
                return Err(RouteError::invalid(
                    format!("{at}.method"),
                    n,
                    "is not a gRPC method name (an identifier)",
                ));
            }
            (
                service.map(|s| StringMatch::Exact(s.into())),
                name.map(|n| StringMatch::Exact(n.into())),
            )
        }
        "RegularExpression" => (
            service
                .map(|s| ctx.regex(&format!("{at}.service"), s, limits::VALUE_LENGTH))
                .transpose()?
                .map(StringMatch::Regex),
            name.map(|n| ctx.regex(&format!("{at}.method"), n, limits::VALUE_LENGTH))
                .transpose()?
                .map(StringMatch::Regex),
        ),
        other => {
            return Err(RouteError::invalid(
                format!("{at}.type"),
                other,
                "is not one of Exact, RegularExpression",
            ));
        }
    };
    Ok(GrpcMatch {
        service,
        method: name,
        headers,
    })
}

/// `[A-Za-z_][A-Za-z_0-9]*`.
fn is_identifier(s: &str) -> bool {
    let b = s.as_bytes();
    b.first()
        .is_some_and(|c| c.is_ascii_alphabetic() || *c == b'_')
        && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'_')
        && s.len() <= limits::VALUE_LENGTH
}

/// Dot-separated identifiers, optionally with a leading dot.
fn is_grpc_service(s: &str) -> bool {
    let s = s.strip_prefix('.').unwrap_or(s);
    s.len() <= limits::VALUE_LENGTH && s.split('.').all(is_identifier)
}
