//! One request through the waypoint, top to bottom:
//!
//! sanitize -> admit (method, target form, one authority) -> trace context -> normalize the
//! path -> authenticate (JWT) -> authorize -> route -> rate limit ->
//! inject faults -> admit (circuit breaker) -> send, with retries and timeouts -> mirror ->
//! respond; then one metric sample, one access log event and, for a sampled trace with a
//! collector configured, one exported span. All three end at the response head.
//!
//! Responses the waypoint makes itself carry a short reason in `response_flags` (metrics)
//! and in the access log, so an operator can tell a 503 of the waypoint from one of the app;
//! the flags and what each means are [`ResponseFlags`]. The body of such a response is the
//! status's reason phrase only: which policy denied, why a token failed or which endpoint was
//! unreachable is for the access log, not for the client. CONNECT is refused here with 405
//! `BR` ([`admit`]).

mod admit;
mod plan;
mod send;

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Instant, SystemTime},
};

use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, header, request::Parts};
use hyper::body::Incoming;

use super::{
    Target, WaypointInputs,
    body::{self, Body, BodyBytes},
    l7::L7,
    response_flags::ResponseFlags,
    telemetry::RequestLabels,
    trace::{
        TraceContext,
        export::{Attribute, RequestSpan},
    },
};
use crate::{
    identity::Identity,
    metrics::ServiceLabels,
    policy::{
        Destination, Flow, RequestFacts, Verdict, WaypointTarget,
        jwt::{JwtOutcome, VerifiedJwt},
        normalize_path,
    },
    state::{MeshState, Service, Workload},
};

/// The client side of one tunnel: who sent it, and where it was going.
pub struct Downstream {
    pub inputs: Arc<WaypointInputs>,
    /// The identity that authenticated the HBONE connection.
    pub peer: Arc<Identity>,
    /// The source workload, when its node's `forwarded` address matches that identity.
    pub source: Option<Arc<Workload>>,
    pub client_addr: SocketAddr,
    pub target: Target,
}

/// Prefix of headers only the mesh may set; a client's are dropped.
const INTERNAL_PREFIX: &str = "x-trellis-";

/// Headers that describe one hop, never forwarded (RFC 9110 section 7.6.1). `te: trailers`
/// is the exception (gRPC needs it end to end).
const HOP_BY_HOP: [header::HeaderName; 5] = [
    header::CONNECTION,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHORIZATION,
    header::PROXY_AUTHENTICATE,
];

/// What happened to a request, for metrics and the access log.
struct Outcome {
    status: StatusCode,
    flags: ResponseFlags,
    /// The Service the request was for: the routed backend, else the one dialled.
    service: Option<Arc<Service>>,
    endpoint: Option<SocketAddr>,
    /// `HTTPRoute ns/name rule N`, when a rule matched.
    route: Option<String>,
    tries: u32,
    error: Option<String>,
    trace: Option<TraceContext>,
}

impl Outcome {
    fn new(service: Option<Arc<Service>>) -> Self {
        Self {
            trace: None,
            status: StatusCode::OK,
            flags: ResponseFlags::Upstream,
            service,
            endpoint: None,
            route: None,
            tries: 0,
            error: None,
        }
    }

    /// A response the waypoint makes itself: `error` goes to the access log and the span,
    /// the client reads only the reason phrase (policy names, token failures and endpoint
    /// addresses would tell it how to get past the waypoint or what lies behind it).
    fn local(
        mut self,
        status: StatusCode,
        flags: ResponseFlags,
        error: String,
    ) -> (Response<Body>, Self) {
        let reason = status.canonical_reason().unwrap_or("Error");
        let mut response = Response::new(body::full(format!("{reason}\n")));
        *response.status_mut() = status;
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        self.status = status;
        self.flags = flags;
        self.error = Some(error);
        (response, self)
    }
}

pub async fn handle(down: Arc<Downstream>, req: Request<Incoming>) -> Response<Body> {
    let started = Instant::now();
    let started_at = SystemTime::now();
    let version = req.version();
    let mesh = down.inputs.mesh.load_full();
    let l7 = down.inputs.l7.load_full();
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let authority = request_authority(&req);
    let grpc = is_grpc(req.headers());
    let request_bytes = BodyBytes::default();
    let mut req = req;
    req.extensions_mut().insert(request_bytes.clone());

    let (response, outcome) = forward(&down, &mesh, &l7, req).await;

    let mut labels = RequestLabels::new(down.source.as_deref(), &down.peer).with_destination(
        outcome
            .endpoint
            .and_then(|e| mesh.workload_by_ip(e.ip()))
            .map(|w| w.as_ref()),
    );
    labels.service = ServiceLabels::of(outcome.service.as_deref());
    labels.request_protocol = if grpc { "grpc" } else { "http" };
    labels.response_code = outcome.status.as_u16();
    labels.response_flags = outcome.flags;
    let duration_ms = started.elapsed().as_secs_f64() * 1000.0;
    tracing::info!(
        target: "access",
        reporter = "waypoint",
        src_addr = %down.client_addr,
        src_identity = %down.peer,
        method = %method,
        authority = %authority,
        path = %path,
        dst_addr = %down.target.addr,
        dst_service = outcome.service.as_ref().map(|s| s.hostname.as_str()).unwrap_or_default(),
        route = outcome.route.as_deref().unwrap_or_default(),
        upstream = %outcome.endpoint.map(|e| e.to_string()).unwrap_or_default(),
        tries = outcome.tries,
        trace_id = outcome.trace.map(|t| t.trace_id_hex()).unwrap_or_default(),
        span_id = outcome.trace.map(|t| t.span_id_hex()).unwrap_or_default(),
        status = outcome.status.as_u16(),
        flags = outcome.flags.as_str(),
        duration_ms = (duration_ms * 1000.0).round() / 1000.0,
        error = outcome.error.as_deref().unwrap_or_default(),
        "request"
    );
    if let (Some(spans), Some(trace)) = (&down.inputs.spans, outcome.trace)
        && trace.sampled()
    {
        let service = outcome.service.as_ref().map(|s| s.hostname.as_str());
        let name = format!("{method} {}", service.unwrap_or(&authority));
        let mut attributes: Vec<(&'static str, Attribute)> = vec![
            ("http.request.method", method.as_str().into()),
            ("server.address", authority.as_str().into()),
            ("url.path", path.as_str().into()),
            ("network.protocol.version", protocol_version(version).into()),
            (
                "http.response.status_code",
                i64::from(outcome.status.as_u16()).into(),
            ),
            ("trellis.response_flags", outcome.flags.as_str().into()),
            ("trellis.source.principal", down.peer.to_string().into()),
            ("trellis.tries", i64::from(outcome.tries).into()),
        ];
        if grpc {
            attributes.push(("rpc.system", "grpc".into()));
        }
        if let Some(service) = service {
            attributes.push(("trellis.destination.service", service.into()));
        }
        if let Some(route) = &outcome.route {
            attributes.push(("trellis.route", route.as_str().into()));
        }
        if let Some(endpoint) = outcome.endpoint {
            attributes.push(("trellis.upstream", endpoint.to_string().into()));
        }
        // Server spans count 5xx as errors; 4xx are the client's.
        let error = outcome.status.is_server_error().then(|| {
            outcome
                .error
                .clone()
                .unwrap_or_else(|| format!("upstream answered {}", outcome.status.as_u16()))
        });
        spans.record(RequestSpan {
            trace,
            name,
            start: started_at,
            duration: started.elapsed(),
            attributes,
            error,
        });
    }
    down.inputs
        .http
        .record_on_end(labels, started, request_bytes, response)
}

fn protocol_version(version: http::Version) -> &'static str {
    match version {
        http::Version::HTTP_09 => "0.9",
        http::Version::HTTP_10 => "1.0",
        http::Version::HTTP_2 => "2",
        http::Version::HTTP_3 => "3",
        _ => "1.1",
    }
}

async fn forward(
    down: &Downstream,
    mesh: &MeshState,
    l7: &L7,
    req: Request<Incoming>,
) -> (Response<Body>, Outcome) {
    let mut outcome = Outcome::new(down.target.service.clone());
    let (mut parts, incoming) = req.into_parts();
    sanitize(&mut parts.headers);
    // One method, target form and authority for everything below ([`admit`]).
    if let Err(refusal) = admit::admit(&mut parts) {
        return outcome.local(
            refusal.status(),
            ResponseFlags::BadRequest,
            refusal.to_string(),
        );
    }
    let spans = down.inputs.spans.as_ref();
    outcome.trace = Some(TraceContext::propagate(
        &mut parts.headers,
        &mut fastrand::Rng::new(),
        |rng| spans.is_some_and(|s| s.sample_new(rng)),
    ));

    // Normalize: the path that policies and routes see is the path the backend receives.
    if let Err(e) = normalize(&mut parts) {
        return outcome.local(StatusCode::BAD_REQUEST, ResponseFlags::BadRequest, e);
    }

    // Authenticate, then authorize.
    let me = &down.inputs.me;
    let services = target_services(mesh, &down.target);
    let target = WaypointTarget {
        gateway_namespace: &me.namespace,
        gateway_name: &me.name,
        services: &services,
    };
    let jwt = match &l7.jwt {
        Some(authenticator) => {
            match authenticator.authenticate(&target, &parts.headers, std::time::SystemTime::now())
            {
                JwtOutcome::None => None,
                JwtOutcome::Verified(jwt) => Some(jwt),
                JwtOutcome::Invalid(e) => {
                    let (mut response, outcome) = outcome.local(
                        StatusCode::UNAUTHORIZED,
                        ResponseFlags::Unauthenticated,
                        format!("request token refused: {e}"),
                    );
                    response
                        .headers_mut()
                        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
                    return (response, outcome);
                }
            }
        }
        None => None,
    };
    if let Err(reason) = authorize(down, mesh, &target, &parts, jwt.as_ref()) {
        return outcome.local(StatusCode::FORBIDDEN, ResponseFlags::Denied, reason);
    }
    if let Some(jwt) = &jwt {
        for name in &jwt.token_headers {
            parts.headers.remove(name);
        }
    }

    // Route, then send.
    let plan = match plan::plan(down, mesh, l7, &mut parts) {
        Ok(plan) => plan,
        Err(refusal) => return refusal.respond(outcome),
    };
    send::send(down, plan, parts, incoming, outcome).await
}

/// The services whose attached policies apply: the one dialled, or every service that has the
/// dialled pod as an endpoint (a Service's policies protect its endpoints however the client
/// addresses them).
fn target_services<'m>(mesh: &'m MeshState, target: &'m Target) -> Vec<(&'m str, &'m str)> {
    match &target.service {
        Some(s) => vec![(s.namespace.as_str(), s.name.as_str())],
        None => {
            let ips = target.workload.iter().flat_map(|w| w.ips.iter().copied());
            let mut out: Vec<(&str, &str)> = Vec::new();
            for ip in std::iter::once(target.addr.ip()).chain(ips) {
                for s in mesh.services_by_endpoint(ip) {
                    let id = (s.namespace.as_str(), s.name.as_str());
                    if !out.contains(&id) {
                        out.push(id);
                    }
                }
            }
            out
        }
    }
}

/// Rewrites the request target into its normal form, or says why it has none.
fn normalize(parts: &mut Parts) -> Result<(), String> {
    let raw = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let normalized = normalize_path(raw).map_err(|e| e.to_string())?;
    if normalized.path_and_query() != raw {
        let path_and_query = normalized
            .path_and_query()
            .parse::<http::uri::PathAndQuery>()
            .map_err(|e| format!("normalized request target is not valid: {e}"))?;
        let mut uri = std::mem::take(&mut parts.uri).into_parts();
        uri.path_and_query = Some(path_and_query);
        parts.uri =
            http::Uri::from_parts(uri).map_err(|e| format!("request target is not valid: {e}"))?;
    }
    Ok(())
}

/// The waypoint's authorization decision, on the verified peer and the request's facts.
fn authorize(
    down: &Downstream,
    mesh: &MeshState,
    target: &WaypointTarget<'_>,
    parts: &Parts,
    jwt: Option<&VerifiedJwt>,
) -> Result<(), String> {
    let engine = mesh.policy();
    let empty = std::collections::BTreeMap::new();
    let destination = match (&down.target.workload, &down.target.service) {
        (Some(w), _) => Destination::of(w),
        (None, Some(s)) => Destination {
            namespace: &s.namespace,
            labels: &empty,
        },
        (None, None) => Destination {
            namespace: "",
            labels: &empty,
        },
    };
    let flow = Flow {
        destination,
        port: down.target.addr.port(),
        source: Some(&down.peer),
        // Believed only when the source node's address names a workload holding the
        // identity that authenticated.
        source_ip: down.source.as_ref().map(|_| down.client_addr.ip()),
    };
    let host = parts
        .uri
        .authority()
        .map(|a| a.as_str())
        .or_else(|| {
            parts
                .headers
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
        })
        .unwrap_or_default();
    let facts = RequestFacts {
        method: parts.method.as_str(),
        path: parts.uri.path(),
        host,
        headers: &parts.headers,
        jwt,
    };
    let decision = engine.decide_request(target, &flow, &facts);
    if decision.verdict == Verdict::Allow {
        Ok(())
    } else {
        Err(format!("policy_denied: {decision}"))
    }
}

/// Drops hop-by-hop headers (and those the `connection` header names) and internal ones.
/// A `Content-Length` beside `Transfer-Encoding` is dropped too: the transfer coding framed
/// the body (RFC 9112 section 6.3), and the upstream request is framed anew from the body
/// itself, so a stale length must not travel on and describe a different body.
fn sanitize(headers: &mut HeaderMap) {
    if headers.contains_key(header::TRANSFER_ENCODING) {
        headers.remove(header::CONTENT_LENGTH);
    }
    let named: Vec<header::HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| header::HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
    if headers
        .get(header::TE)
        .is_some_and(|te| te.as_bytes() != b"trailers")
    {
        headers.remove(header::TE);
    }
    headers.remove("keep-alive");
    headers.remove("proxy-connection");
    let internal: Vec<header::HeaderName> = headers
        .keys()
        .filter(|k| k.as_str().starts_with(INTERNAL_PREFIX))
        .cloned()
        .collect();
    for name in internal {
        headers.remove(name);
    }
}

fn request_authority(req: &Request<Incoming>) -> String {
    req.uri()
        .authority()
        .map(|a| a.as_str().to_owned())
        .or_else(|| {
            req.headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_owned)
        })
        .unwrap_or_default()
}

fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

/// An error and its sources, for one log line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    let mut depth = 0;
    while let Some(s) = source
        && depth < 8
    {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
        depth += 1;
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sanitize_drops_hop_by_hop_named_and_internal_headers() {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONNECTION, HeaderValue::from_static("close, x-hop"));
        headers.insert("x-hop", HeaderValue::from_static("1"));
        headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        headers.insert(header::TE, HeaderValue::from_static("gzip"));
        headers.insert("x-trellis-route", HeaderValue::from_static("forged"));
        headers.insert("x-kept", HeaderValue::from_static("yes"));
        sanitize(&mut headers);
        let left: Vec<&str> = headers.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, ["x-kept"]);
    }

    #[test]
    fn a_content_length_beside_a_transfer_coding_is_not_forwarded() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("45"));
        sanitize(&mut headers);
        assert!(headers.is_empty(), "{headers:?}");
        let mut alone = HeaderMap::new();
        alone.insert(header::CONTENT_LENGTH, HeaderValue::from_static("45"));
        sanitize(&mut alone);
        assert_eq!(alone.len(), 1);
    }

    fn parts(target: &str) -> Parts {
        Request::get(target)
            .body(())
            .expect("a valid request")
            .into_parts()
            .0
    }

    #[test]
    fn the_forwarded_path_is_the_normalized_one_with_the_query_untouched() {
        let mut p = parts("/a//b/../%61dmin?x=%2F");
        normalize(&mut p).expect("normalizes");
        assert_eq!(
            p.uri.path_and_query().map(|p| p.as_str()),
            Some("/a/admin?x=%2F")
        );
    }

    #[test]
    fn an_encoded_slash_in_the_path_is_refused() {
        let mut p = parts("/public%2F..%2Fadmin");
        assert!(normalize(&mut p).is_err());
    }
}
