//! `pod-app grpc`: a gRPC health `Check`, and optionally a `Watch`, against an `l7` server
//! (or anything serving `grpc.health.v1.Health`), over HTTP/2 without TLS.

use std::{net::SocketAddr, time::Duration};

use anyhow::{Context, Result, anyhow};
use serde_json::{Value, json};
use tonic::transport::Endpoint;
use tonic_health::pb::{
    HealthCheckRequest, HealthCheckResponse, health_check_response::ServingStatus,
    health_client::HealthClient,
};

/// Checks `service`; with `watch`, then reads that many `Watch` messages and cancels the
/// stream. Fails on any gRPC error; completes unverified if the stream ends early.
pub async fn grpc(
    to: SocketAddr,
    service: &str,
    watch: Option<usize>,
    timeout: Duration,
) -> Result<(Value, bool)> {
    let channel = Endpoint::from_shared(format!("http://{to}"))
        .context("building the endpoint")?
        .connect_timeout(timeout)
        .connect()
        .await
        .with_context(|| format!("connecting to {to}"))?;
    let mut client = HealthClient::new(channel);
    let request = || HealthCheckRequest {
        service: service.to_owned(),
    };
    let check = client
        .check(request())
        .await
        .map_err(|s| grpc_error("Check", &s))?
        .into_inner();
    let mut statuses = Vec::new();
    if let Some(n) = watch {
        let mut stream = client
            .watch(request())
            .await
            .map_err(|s| grpc_error("Watch", &s))?
            .into_inner();
        while statuses.len() < n {
            match stream
                .message()
                .await
                .map_err(|s| grpc_error("Watch", &s))?
            {
                Some(message) => statuses.push(status_name(message)),
                None => break,
            }
        }
        // Dropping the stream cancels the call (RST_STREAM).
    }
    let ok = watch.is_none_or(|n| statuses.len() == n);
    Ok((
        json!({
            "check": status_name(check),
            "watched": statuses.len(),
            "statuses": statuses,
            "ok": ok,
        }),
        ok,
    ))
}

/// `SERVING`, `NOT_SERVING`, ... or the number if it is not a known status.
fn status_name(response: HealthCheckResponse) -> String {
    ServingStatus::try_from(response.status).map_or_else(
        |_| response.status.to_string(),
        |s| s.as_str_name().to_owned(),
    )
}

/// `Check: gRPC status Unavailable (14): message[: cause]`, so tests can match on the code.
fn grpc_error(call: &str, status: &tonic::Status) -> anyhow::Error {
    let code = status.code();
    let mut text = format!(
        "{call}: gRPC status {code:?} ({}): {}",
        code as i32,
        status.message()
    );
    let mut source = std::error::Error::source(status);
    while let Some(s) = source {
        text.push_str(&format!(": {s}"));
        source = s.source();
    }
    anyhow!(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_code() {
        let e = grpc_error("Check", &tonic::Status::not_found("service not registered"));
        assert_eq!(
            e.to_string(),
            "Check: gRPC status NotFound (5): service not registered"
        );
    }

    #[test]
    fn statuses_are_named() {
        let r = |status| HealthCheckResponse { status };
        assert_eq!(status_name(r(1)), "SERVING");
        assert_eq!(status_name(r(2)), "NOT_SERVING");
        assert_eq!(status_name(r(42)), "42");
    }
}
