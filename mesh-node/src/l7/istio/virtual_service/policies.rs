//! A VirtualService rule's `retries` and `fault`, converted for the route model.

use serde_json::{Value, json};

use super::super::{duration, no_extra, unsupported, whole_percent};
use crate::{
    k8s::istio_networking::{HttpFaultInjection, HttpRetry},
    l7::{
        resilience::fault::{AbortFault, DelayFault, FaultPolicy},
        route::RouteError,
    },
};

/// `retry` of the translated rule, the per-try timeout, and whether resets are retried.
pub(super) fn retry(
    path: &str,
    r: &HttpRetry,
) -> Result<(Value, Option<std::time::Duration>, bool), RouteError> {
    no_extra(path, &r.extra)?;
    let attempts = r.attempts.unwrap_or(2);
    let per_try = r
        .per_try_timeout
        .as_deref()
        .map(|t| duration(&format!("{path}.perTryTimeout"), t))
        .transpose()?;
    let mut codes: Vec<u16> = Vec::new();
    // Istio's default: connection failures and refused streams.
    let mut reset = r.retry_on.is_none();
    for token in r
        .retry_on
        .as_deref()
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
    {
        match token {
            "5xx" => codes.extend(500..=599),
            "gateway-error" => codes.extend([502, 503, 504]),
            "connect-failure" | "retriable-status-codes" => {}
            "reset" | "refused-stream" => reset = true,
            code => match code.parse::<u16>() {
                Ok(c) if (400..=599).contains(&c) => codes.push(c),
                _ => {
                    return Err(unsupported(
                        format!("{path}.retryOn"),
                        format!(
                            "{:?} is not implemented (5xx, gateway-error, connect-failure, refused-stream, reset, retriable-status-codes and status codes 400-599 are)",
                            crate::l7::route::error::shown(code)
                        ),
                    ));
                }
            },
        }
    }
    codes.sort_unstable();
    codes.dedup();
    Ok((
        json!({"attempts": attempts, "codes": codes}),
        per_try,
        reset,
    ))
}

pub(super) fn fault_policy(
    path: &str,
    fault: &HttpFaultInjection,
) -> Result<FaultPolicy, RouteError> {
    no_extra(path, &fault.extra)?;
    let delay = match &fault.delay {
        None => None,
        Some(d) => {
            let dpath = format!("{path}.delay");
            no_extra(&dpath, &d.extra)?;
            let Some(fixed) = &d.fixed_delay else {
                return Err(unsupported(
                    format!("{dpath}.fixedDelay"),
                    "is required (exponentialDelay is not implemented)",
                ));
            };
            let percent = match &d.percentage {
                None => 100,
                Some(p) => {
                    no_extra(&format!("{dpath}.percentage"), &p.extra)?;
                    whole_percent(&format!("{dpath}.percentage.value"), p.value)?
                }
            };
            Some(DelayFault {
                delay: duration(&format!("{dpath}.fixedDelay"), fixed)?,
                percent,
            })
        }
    };
    let abort = match &fault.abort {
        None => None,
        Some(a) => {
            let apath = format!("{path}.abort");
            no_extra(&apath, &a.extra)?;
            let status = a
                .http_status
                .and_then(|s| u16::try_from(s).ok())
                .filter(|s| (200..=599).contains(s))
                .and_then(|s| http::StatusCode::from_u16(s).ok())
                .ok_or_else(|| unsupported(format!("{apath}.httpStatus"), "is required: a status from 200 to 599 (grpcStatus and http2Error are not implemented)"))?;
            let percent = match &a.percentage {
                None => 100,
                Some(p) => {
                    no_extra(&format!("{apath}.percentage"), &p.extra)?;
                    whole_percent(&format!("{apath}.percentage.value"), p.value)?
                }
            };
            Some(AbortFault { status, percent })
        }
    };
    Ok(FaultPolicy { delay, abort })
}
