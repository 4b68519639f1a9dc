//! The send phase: rate limit, faults, admission, then the tries (per-try timeout, retries
//! with backoff, outlier records) under the rule's request timeout; mirrors once the answer
//! is in; the rule's response filters last.
//!
//! The request permit of the circuit breaker is held until the response body ends, so
//! `maxRequests` counts requests in flight end to end, streams included.

use std::{net::SocketAddr, time::Duration};

use http::{HeaderValue, Request, Response, StatusCode, Uri, header, request::Parts};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use super::{Downstream, Outcome, error_chain, plan::Plan};
use crate::{
    l7::{
        resilience::{
            NoRetry, OVERFLOW_HEADER, Overflow, RateDecision, Replay, RetryPolicy,
            ServiceResilience,
            retry::{BudgetLimits, RetryOn},
        },
        route::{Mirror, Retry},
    },
    waypoint::{
        body::{self, Body},
        replay::Replayable,
        response_flags::ResponseFlags,
        upstream::ConnectError,
    },
};

/// Retries after the first try when a route rule's `retry` does not say.
const DEFAULT_ROUTE_RETRIES: u32 = 2;
/// A mirrored request is abandoned after this long.
const MIRROR_TIMEOUT: Duration = Duration::from_secs(10);

/// Why no upstream response is returned.
struct Failure {
    status: StatusCode,
    flags: ResponseFlags,
    error: String,
    /// Set when a limit of the circuit breaker refused.
    overflow: Option<Overflow>,
}

impl Failure {
    fn new(status: StatusCode, flags: ResponseFlags, error: String) -> Self {
        Self {
            status,
            flags,
            error,
            overflow: None,
        }
    }
}

/// The request body: streamed once, or kept for retries and mirrors.
enum Source {
    Once(Option<Body>),
    Replay(Replayable),
}

impl Source {
    fn next_try(&mut self) -> Option<Body> {
        match self {
            Self::Once(body) => body.take(),
            Self::Replay(body) => body.next_try(),
        }
    }

    fn replayable(&self) -> bool {
        match self {
            Self::Once(body) => body.is_some(),
            Self::Replay(body) => body.replayable(),
        }
    }
}

pub async fn send(
    down: &Downstream,
    plan: Plan<'_>,
    parts: Parts,
    incoming: Incoming,
    mut outcome: Outcome,
) -> (Response<Body>, Outcome) {
    outcome.service = plan.service().cloned().or(outcome.service);
    outcome.route = plan.route.clone();
    let mut rng = fastrand::Rng::new();
    let resilience = plan.resilience.as_deref();

    // Rate limit.
    if let Some(res) = resilience {
        let source = down.peer.to_string();
        let bucket = plan.route.as_deref().unwrap_or("-");
        if let RateDecision::Deny { retry_after_secs } = res.check_rate(bucket, Some(&source)) {
            let (mut response, outcome) = outcome.local(
                StatusCode::TOO_MANY_REQUESTS,
                ResponseFlags::RateLimited,
                format!("rate limited by {}", describe(res)),
            );
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs));
            return (response, outcome);
        }
    }

    // Faults.
    let fault = resilience.map(|r| r.fault(&mut rng)).unwrap_or_default();
    if let Some(delay) = fault.delay {
        tokio::time::sleep(delay).await;
        outcome.flags = ResponseFlags::FaultDelay;
    }
    if let Some(status) = fault.abort {
        let text = format!(
            "fault injected by {}",
            resilience.map(describe).unwrap_or_default()
        );
        return outcome.local(status, ResponseFlags::FaultAbort, text);
    }

    // Admission.
    let permit = match resilience {
        Some(res) => match res.admit().await {
            Ok(permit) => permit,
            Err(overflow) => return overflowed(outcome, overflow),
        },
        None => None,
    };

    // Tries, under the request timeout.
    let route_retry = plan.rule.and_then(|r| r.retry()).map(route_retry_policy);
    let mirrors: Vec<&Mirror> = match &plan.rule {
        Some(rule) => rule
            .mirrors(plan.backend)
            .filter(|m| m.selected(rng.u64(..)))
            .collect(),
        None => Vec::new(),
    };
    let retries = route_retry.is_some() || resilience.is_some_and(|r| r.policy().retries.is_some());
    let streamed = body::from_client(incoming, parts.extensions.get().cloned());
    let mut source = if retries || !mirrors.is_empty() {
        Source::Replay(Replayable::new(
            streamed,
            down.inputs.limits.max_buffered_body_bytes,
        ))
    } else {
        Source::Once(Some(streamed))
    };
    let timeouts = plan.rule.map(|r| r.timeouts()).unwrap_or_default();
    let per_try = match (
        timeouts.backend_request,
        resilience.and_then(ServiceResilience::per_try_timeout),
    ) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    let tries = Tries {
        down,
        plan: &plan,
        parts: &parts,
        per_try,
        route_retry: route_retry.as_ref(),
    };
    let result = match timeouts.request {
        Some(limit) => {
            match tokio::time::timeout(limit, tries.run(&mut source, &mut rng, &mut outcome)).await
            {
                Ok(result) => result,
                Err(_) => Err(Failure::new(
                    StatusCode::GATEWAY_TIMEOUT,
                    ResponseFlags::Timeout,
                    format!("request timeout ({limit:?}) expired"),
                )),
            }
        }
        None => tries.run(&mut source, &mut rng, &mut outcome).await,
    };
    let response = match result {
        Ok(response) => response,
        Err(Failure {
            overflow: Some(overflow),
            ..
        }) => return overflowed(outcome, overflow),
        Err(failure) => return outcome.local(failure.status, failure.flags, failure.error),
    };

    // Mirrors, fire and forget.
    if let Source::Replay(body) = &source {
        for mirror in mirrors {
            mirror_request(down, mirror, &parts, body);
        }
    }

    // Respond.
    outcome.status = response.status();
    let (mut head, incoming) = response.into_parts();
    if let Some(rule) = &plan.rule {
        rule.apply_response_filters(plan.backend, &mut head);
    }
    let body = body::streamed(incoming);
    let body = match permit {
        // Held by the body, released when the client has the whole response or goes away.
        Some(permit) => body
            .map_err(move |e| {
                let _held = &permit;
                e
            })
            .boxed(),
        None => body,
    };
    (Response::from_parts(head, body), outcome)
}

/// The tries of one request.
struct Tries<'a> {
    down: &'a Downstream,
    plan: &'a Plan<'a>,
    parts: &'a Parts,
    per_try: Option<Duration>,
    route_retry: Option<&'a (RetryPolicy, Option<Duration>)>,
}

impl Tries<'_> {
    async fn run(
        &self,
        source: &mut Source,
        rng: &mut fastrand::Rng,
        outcome: &mut Outcome,
    ) -> Result<Response<Incoming>, Failure> {
        let mut tried = Vec::new();
        loop {
            let Some(endpoint) = self.plan.endpoint(&tried) else {
                return Err(Failure::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    ResponseFlags::NoHealthyUpstream,
                    "no ready endpoint".into(),
                ));
            };
            let Some(body) = source.next_try() else {
                return Err(Failure::new(
                    StatusCode::BAD_GATEWAY,
                    ResponseFlags::UpstreamClosed,
                    "the request body cannot be sent again".into(),
                ));
            };
            tried.push(endpoint);
            outcome.tries += 1;
            outcome.endpoint = Some(endpoint);
            let request = upstream_request(self.parts, endpoint, body)?;
            let client = self.down.inputs.upstreams.for_version(self.parts.version);
            let sent = client.request(request);
            let result = match self.per_try {
                Some(limit) => tokio::time::timeout(limit, sent).await.map_err(|_| limit),
                None => Ok(sent.await),
            };
            let (verdict, answer) = match result {
                Ok(Ok(response)) => (
                    crate::l7::resilience::Outcome::Status(response.status()),
                    Ok(response),
                ),
                Ok(Err(e)) => {
                    if body::is_client_body_error(&e) {
                        // The client's framing failed, not the endpoint: no retry, no outlier
                        // record, and 400 as for any other malformed request.
                        return Err(Failure::new(
                            StatusCode::BAD_REQUEST,
                            ResponseFlags::BadRequest,
                            format!("request body: {}", error_chain(&e)),
                        ));
                    }
                    if let Some(overflow) = overflow_of(&e) {
                        // A limit of this waypoint, not a fault of the endpoint.
                        return Err(Failure {
                            overflow: Some(overflow),
                            ..Failure::new(
                                StatusCode::SERVICE_UNAVAILABLE,
                                ResponseFlags::Overflow,
                                overflow.to_string(),
                            )
                        });
                    }
                    let (verdict, status, flags) = if e.is_connect() {
                        (
                            crate::l7::resilience::Outcome::ConnectFailure,
                            StatusCode::SERVICE_UNAVAILABLE,
                            ResponseFlags::UpstreamConnectFailure,
                        )
                    } else {
                        (
                            crate::l7::resilience::Outcome::Reset,
                            StatusCode::BAD_GATEWAY,
                            ResponseFlags::UpstreamClosed,
                        )
                    };
                    let error = format!("upstream {endpoint}: {}", error_chain(&e));
                    (verdict, Err(Failure::new(status, flags, error)))
                }
                Err(limit) => (
                    crate::l7::resilience::Outcome::Timeout,
                    Err(Failure::new(
                        StatusCode::GATEWAY_TIMEOUT,
                        ResponseFlags::Timeout,
                        format!("upstream {endpoint}: per-try timeout ({limit:?}) expired"),
                    )),
                ),
            };
            let replay = Replay::of(&self.parts.method, source.replayable());
            let again = self.after_try(endpoint, outcome.tries, verdict, replay, rng);
            match again {
                Ok(backoff) => {
                    tracing::debug!(
                        upstream = %endpoint,
                        tries = outcome.tries,
                        status = verdict.status().as_u16(),
                        ?backoff,
                        "retrying"
                    );
                    drop(answer);
                    tokio::time::sleep(backoff).await;
                }
                Err(_) if outcome.tries > 1 && verdict.status().is_server_error() => {
                    return match answer {
                        Ok(response) => {
                            outcome.flags = ResponseFlags::RetriesExhausted;
                            Ok(response)
                        }
                        Err(failure) => Err(Failure {
                            flags: ResponseFlags::RetriesExhausted,
                            ..failure
                        }),
                    };
                }
                Err(_) => return answer,
            }
        }
    }

    /// Records the try for outlier detection and decides on a retry: by the rule's `retry`
    /// when it has one, else by the Service's `TrafficPolicy`.
    fn after_try(
        &self,
        endpoint: SocketAddr,
        tries: u32,
        verdict: crate::l7::resilience::Outcome,
        replay: Replay,
        rng: &mut fastrand::Rng,
    ) -> Result<Duration, NoRetry> {
        let resilience = self.plan.resilience.as_deref();
        let Some((policy, backoff)) = self.route_retry else {
            return match resilience {
                Some(res) => res.after_try(Some(endpoint), tries, verdict, replay, rng),
                None => Err(NoRetry::NotRetriable),
            };
        };
        if let Some(outliers) = resilience.and_then(ServiceResilience::outliers) {
            outliers.record(endpoint, verdict);
        }
        match resilience.and_then(ServiceResilience::retry_budget) {
            Some(budget) => policy.next(budget, tries, verdict, replay, rng).map(|_| ()),
            None if policy.should_retry(tries, verdict, replay) => Ok(()),
            None => Err(NoRetry::NotRetriable),
        }
        .map(|_| backoff.unwrap_or_else(|| policy.backoff(tries, rng)))
    }
}

/// A route rule's `retry` as a retry policy: its codes, and connect failures (nothing was
/// sent, so retrying is always safe); the backoff it sets, if any.
fn route_retry_policy(retry: &Retry) -> (RetryPolicy, Option<Duration>) {
    let mut codes = retry.codes.clone();
    codes.sort();
    codes.dedup();
    (
        RetryPolicy {
            attempts: retry.attempts.unwrap_or(DEFAULT_ROUTE_RETRIES),
            per_try_timeout: None,
            retry_on: RetryOn {
                connect_failure: true,
                retriable_status_codes: !codes.is_empty(),
                ..RetryOn::default()
            },
            retriable_status_codes: codes,
            budget: BudgetLimits::default(),
        },
        retry.backoff,
    )
}

/// The request for one try: the client's, aimed at `endpoint`.
fn upstream_request(
    parts: &Parts,
    endpoint: SocketAddr,
    body: Body,
) -> Result<Request<Body>, Failure> {
    let path_and_query = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let uri = Uri::builder()
        .scheme("http")
        .authority(endpoint.to_string())
        .path_and_query(path_and_query)
        .build()
        .map_err(|e| {
            Failure::new(
                StatusCode::BAD_REQUEST,
                ResponseFlags::BadRequest,
                format!("request target cannot be forwarded: {e}"),
            )
        })?;
    let mut request = Request::new(body);
    *request.method_mut() = parts.method.clone();
    *request.uri_mut() = uri;
    *request.version_mut() = parts.version;
    *request.headers_mut() = parts.headers.clone();
    if request.headers().get(header::HOST).is_none()
        && let Some(host) = parts
            .uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    {
        request.headers_mut().insert(header::HOST, host);
    }
    Ok(request)
}

/// Sends a copy of the request to a mirror's Service and ignores the answer. Only a body the
/// client has finished sending, within the buffer limit, can be copied.
fn mirror_request(down: &Downstream, mirror: &Mirror, parts: &Parts, body: &Replayable) {
    let target = format!("{}/{}:{}", mirror.namespace, mirror.name, mirror.port);
    let Some((bytes, _trailers)) = body.complete() else {
        tracing::debug!(mirror = %target, "request not mirrored: its body is not complete in memory");
        return;
    };
    let mesh = down.inputs.mesh.load();
    let endpoint = mesh.service(&mirror.namespace, &mirror.name).and_then(|s| {
        let target_port = s.port(mirror.port)?.target_port?;
        let e = s.candidates("", None).into_iter().next()?;
        Some(SocketAddr::new(e.ip, target_port))
    });
    let Some(endpoint) = endpoint else {
        tracing::debug!(mirror = %target, "request not mirrored: no ready endpoint");
        return;
    };
    let request = match upstream_request(parts, endpoint, body::full(bytes)) {
        Ok(request) => request,
        Err(failure) => {
            tracing::debug!(mirror = %target, error = failure.error, "request not mirrored");
            return;
        }
    };
    let client = down.inputs.upstreams.for_version(parts.version).clone();
    down.inputs.tasks.spawn(async move {
        let sent = tokio::time::timeout(MIRROR_TIMEOUT, async {
            let response = client.request(request).await?;
            let status = response.status();
            // Read (and drop) the answer so the connection can be reused.
            let _ = response.into_body().collect().await;
            Ok::<_, hyper_util::client::legacy::Error>(status)
        })
        .await;
        match sent {
            Ok(Ok(status)) => {
                tracing::debug!(mirror = %target, upstream = %endpoint, status = status.as_u16(), "mirrored");
            }
            Ok(Err(e)) => {
                tracing::debug!(mirror = %target, upstream = %endpoint, error = %error_chain(&e), "mirror failed");
            }
            Err(_) => tracing::debug!(mirror = %target, upstream = %endpoint, "mirror timed out"),
        }
    });
}

fn overflowed(outcome: Outcome, overflow: Overflow) -> (Response<Body>, Outcome) {
    let (mut response, outcome) = outcome.local(
        StatusCode::SERVICE_UNAVAILABLE,
        ResponseFlags::Overflow,
        overflow.to_string(),
    );
    response
        .headers_mut()
        .insert(OVERFLOW_HEADER, HeaderValue::from_static(overflow.as_str()));
    (response, outcome)
}

/// The connection limit that refused an upstream connection, if that is why it failed.
fn overflow_of(e: &hyper_util::client::legacy::Error) -> Option<Overflow> {
    let mut source = std::error::Error::source(e);
    let mut depth = 0;
    while let Some(s) = source
        && depth < 8
    {
        if let Some(ConnectError::Overflow(overflow)) = s.downcast_ref::<ConnectError>() {
            return Some(*overflow);
        }
        source = s.source();
        depth += 1;
    }
    None
}

fn describe(res: &ServiceResilience) -> String {
    let id = &res.policy().id;
    format!("TrafficPolicy {}/{}", id.namespace, id.name)
}
