//! One request through the waypoint, top to bottom: sanitize -> choose the endpoint ->
//! send over HBONE -> respond; then one metric sample and one access log event.
//!
//! Responses the waypoint makes itself carry a short reason in `response_flags` (metrics)
//! and in the access log, so an operator can tell a 503 of the waypoint from one of the app.

use std::{net::SocketAddr, sync::Arc, time::Instant};

use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, Uri, header};
use hyper::body::Incoming;

use super::{
    Target, WaypointInputs,
    body::{self, Body},
    telemetry::RequestLabels,
};
use crate::{
    identity::Identity,
    workload::{MeshState, Workload},
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
    flags: &'static str,
    endpoint: Option<SocketAddr>,
    error: Option<String>,
}

pub async fn handle(down: Arc<Downstream>, req: Request<Incoming>) -> Response<Body> {
    let started = Instant::now();
    let mesh = down.inputs.mesh.load_full();
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let authority = request_authority(&req);
    let grpc = is_grpc(req.headers());

    let (response, outcome) = forward(&down, &mesh, req).await;

    let mut labels = RequestLabels::new(down.source.as_deref(), &down.peer).with_destination(
        outcome
            .endpoint
            .and_then(|e| mesh.workload_by_ip(e.ip()))
            .map(|w| w.as_ref()),
    );
    if let Some(service) = &down.target.service {
        labels.destination_service = service.hostname.clone();
        labels.destination_service_name = service.name.clone();
        labels.destination_service_namespace = service.namespace.clone();
    }
    labels.request_protocol = if grpc { "grpc" } else { "http" };
    labels.response_code = outcome.status.as_u16();
    labels.response_flags = outcome.flags;
    let duration_ms = started.elapsed().as_secs_f64() * 1000.0;
    down.inputs.http.record(&labels, duration_ms);
    tracing::info!(
        target: "access",
        reporter = "waypoint",
        src_addr = %down.client_addr,
        src_identity = %down.peer,
        method = %method,
        authority = %authority,
        path = %path,
        dst_addr = %down.target.addr,
        dst_service = down.target.service.as_ref().map(|s| s.hostname.as_str()).unwrap_or_default(),
        upstream = %outcome.endpoint.map(|e| e.to_string()).unwrap_or_default(),
        status = outcome.status.as_u16(),
        flags = outcome.flags,
        duration_ms = (duration_ms * 1000.0).round() / 1000.0,
        error = outcome.error.as_deref().unwrap_or_default(),
        "request"
    );
    response
}

async fn forward(
    down: &Downstream,
    mesh: &MeshState,
    req: Request<Incoming>,
) -> (Response<Body>, Outcome) {
    let (mut parts, incoming) = req.into_parts();
    sanitize(&mut parts.headers);

    // Choose the endpoint.
    let Some(endpoint) = down.target.endpoint(mesh) else {
        return local(
            StatusCode::SERVICE_UNAVAILABLE,
            "UH",
            None,
            format!("{} has no ready endpoint", down.target.addr),
        );
    };

    // Send.
    if parts.headers.get(header::HOST).is_none()
        && let Some(host) = parts
            .uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    {
        parts.headers.insert(header::HOST, host);
    }
    let path_and_query = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    parts.uri = match Uri::builder()
        .scheme("http")
        .authority(endpoint.to_string())
        .path_and_query(path_and_query)
        .build()
    {
        Ok(uri) => uri,
        Err(e) => {
            return local(
                StatusCode::BAD_REQUEST,
                "BR",
                Some(endpoint),
                format!("request target cannot be forwarded: {e}"),
            );
        }
    };
    let client = down.inputs.upstreams.for_version(parts.version);
    let request = Request::from_parts(parts, body::streamed(incoming));
    match client.request(request).await {
        Ok(response) => {
            let status = response.status();
            (
                response.map(body::streamed),
                Outcome {
                    status,
                    flags: "-",
                    endpoint: Some(endpoint),
                    error: None,
                },
            )
        }
        Err(e) => {
            let flags = if e.is_connect() { "UF" } else { "UC" };
            local(
                StatusCode::SERVICE_UNAVAILABLE,
                flags,
                Some(endpoint),
                format!("upstream {endpoint}: {}", error_chain(&e)),
            )
        }
    }
}

/// A response the waypoint makes itself.
fn local(
    status: StatusCode,
    flags: &'static str,
    endpoint: Option<SocketAddr>,
    error: String,
) -> (Response<Body>, Outcome) {
    let mut response = Response::new(body::full(format!("{error}\n")));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    (
        response,
        Outcome {
            status,
            flags,
            endpoint,
            error: Some(error),
        },
    )
}

/// Drops hop-by-hop headers (and those the `connection` header names) and internal ones.
fn sanitize(headers: &mut HeaderMap) {
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
}
