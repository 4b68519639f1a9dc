//! Compiling a stored `TrafficPolicy` spec (untyped JSON) into a [`Resilience`], or rejecting
//! it with an error whose message starts with the offending field's path
//! (`spec.retries.attempts: ...`), for the object's `Accepted` condition.
//!
//! Every problem rejects the whole object and only it: a policy applied in part would be one
//! nobody wrote. Bounds keep every limit within what one waypoint can honour and every table
//! within a fixed size.

use std::{collections::BTreeSet, time::Duration};

use http::StatusCode;

use super::{
    Resilience,
    breaker::{DEFAULT_MAX_PENDING_REQUESTS, PoolLimits},
    crd::{
        ConnectionPoolSpec, FaultSpec, OutlierDetectionSpec, RateLimitSpec, RetriesSpec, TargetRef,
        TrafficPolicy, TrafficPolicySpec,
    },
    fault::{AbortFault, DelayFault, FaultPolicy},
    outlier::OutlierPolicy,
    rate_limit::{RateLimitKey, RateLimitPolicy},
    retry::{BudgetLimits, RetryOn, RetryPolicy},
};
use crate::{
    k8s::policy::ExtraFields,
    policy::{
        PolicyId,
        status::{ACCEPTED, Condition},
    },
};

pub const MAX_TARGETS: usize = 16;
pub const MAX_ATTEMPTS: u32 = 10;
pub const MAX_RETRIABLE_STATUS_CODES: usize = 32;
pub const MAX_MIN_RETRIES_PER_SECOND: u32 = 10_000;
pub const MAX_CONNECTIONS: u32 = 100_000;
pub const MAX_PENDING_REQUESTS: u32 = 100_000;
pub const MAX_REQUESTS: u32 = 1_000_000;
pub const MAX_CONSECUTIVE_ERRORS: u32 = 1_000;
pub const MAX_REQUESTS_PER_SECOND: u32 = 1_000_000;
pub const MAX_BURST: u32 = 10_000_000;
/// The longest duration any field accepts.
pub const MAX_DURATION: Duration = Duration::from_hours(1);

/// Why an object was rejected. Every message starts with the field path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TrafficPolicyError {
    #[error("metadata.{0}: the object has none; it cannot be placed or reported on")]
    MissingMetadata(&'static str),
    /// The value does not have the field's type (a string where a number belongs).
    #[error("{path}: cannot be read: {message}")]
    Unreadable { path: String, message: String },
    /// A field this version does not know (misspelt, or from a newer version).
    #[error(
        "{path}: unknown field; check its spelling, or remove it if it is from a newer version"
    )]
    UnknownField { path: String },
    #[error("{path}: {problem}")]
    Invalid { path: String, problem: String },
}

impl TrafficPolicyError {
    /// The status condition reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::UnknownField { .. } => "Unsupported",
            _ => "Invalid",
        }
    }

    /// The path of the offending field (`spec.retries.attempts`).
    pub fn path(&self) -> String {
        match self {
            Self::MissingMetadata(what) => format!("metadata.{what}"),
            Self::Unreadable { path, .. }
            | Self::UnknownField { path }
            | Self::Invalid { path, .. } => path.clone(),
        }
    }
}

fn invalid(path: impl Into<String>, problem: impl Into<String>) -> TrafficPolicyError {
    TrafficPolicyError::Invalid {
        path: path.into(),
        problem: problem.into(),
    }
}

impl TrafficPolicy {
    /// Compiles the spec of the object `namespace/name` (as stored: untyped JSON; `null` reads
    /// as an empty spec).
    pub fn compile(
        namespace: &str,
        name: &str,
        generation: Option<i64>,
        spec: &serde_json::Value,
    ) -> Result<Resilience, TrafficPolicyError> {
        if namespace.is_empty() {
            return Err(TrafficPolicyError::MissingMetadata("namespace"));
        }
        if name.is_empty() {
            return Err(TrafficPolicyError::MissingMetadata("name"));
        }
        let spec: TrafficPolicySpec = if spec.is_null() {
            TrafficPolicySpec::default()
        } else {
            serde_path_to_error::deserialize(spec).map_err(|e| {
                let inner = e.path().to_string();
                TrafficPolicyError::Unreadable {
                    path: if inner == "." {
                        "spec".into()
                    } else {
                        format!("spec.{inner}")
                    },
                    message: e.into_inner().to_string(),
                }
            })?
        };
        compile_spec(
            PolicyId {
                namespace: namespace.into(),
                name: name.into(),
            },
            generation,
            &spec,
        )
    }
}

fn compile_spec(
    id: PolicyId,
    generation: Option<i64>,
    spec: &TrafficPolicySpec,
) -> Result<Resilience, TrafficPolicyError> {
    no_extra("spec", &spec.extra)?;
    let targets = targets(&spec.target_refs)?;
    let retries = spec.retries.as_ref().map(retries).transpose()?;
    let connection_pool = spec
        .connection_pool
        .as_ref()
        .map(connection_pool)
        .transpose()?;
    let outlier_detection = spec
        .outlier_detection
        .as_ref()
        .map(outlier_detection)
        .transpose()?;
    let fault = spec.fault.as_ref().map(fault).transpose()?;
    let rate_limit = spec.rate_limit.as_ref().map(rate_limit).transpose()?;
    Ok(Resilience {
        id,
        generation,
        targets,
        retries,
        connection_pool,
        outlier_detection,
        fault,
        rate_limit,
    })
}

fn no_extra(path: &str, extra: &ExtraFields) -> Result<(), TrafficPolicyError> {
    match extra.keys().next() {
        Some(key) => Err(TrafficPolicyError::UnknownField {
            path: format!("{path}.{key}"),
        }),
        None => Ok(()),
    }
}

/// A present value within `range`, or the default when absent (`None`: required).
fn number(
    path: &str,
    value: Option<u32>,
    default: Option<u32>,
    range: std::ops::RangeInclusive<u32>,
) -> Result<u32, TrafficPolicyError> {
    let value = value.or(default).ok_or_else(|| invalid(path, "required"))?;
    if range.contains(&value) {
        Ok(value)
    } else {
        Err(invalid(
            path,
            format!(
                "{value} is out of range ({} to {})",
                range.start(),
                range.end()
            ),
        ))
    }
}

fn percent(
    path: &str,
    value: Option<u32>,
    default: Option<u32>,
) -> Result<u32, TrafficPolicyError> {
    number(path, value, default, 0..=100)
}

/// A present duration, above zero and at most [`MAX_DURATION`].
fn duration(path: &str, value: &str) -> Result<Duration, TrafficPolicyError> {
    let d = parse_duration(value).ok_or_else(|| {
        invalid(
            path,
            format!("{value:?} is not a duration like 500ms, 2s, 1m or 1h30m"),
        )
    })?;
    if d.is_zero() || d > MAX_DURATION {
        return Err(invalid(
            path,
            format!("{value:?} is out of range (above 0, at most 1h)"),
        ));
    }
    Ok(d)
}

fn optional_duration(
    path: &str,
    value: Option<&String>,
    default: Duration,
) -> Result<Duration, TrafficPolicyError> {
    value.map_or(Ok(default), |v| duration(path, v))
}

/// The Gateway API duration syntax: one to four `<1-5 digits><h|m|s|ms>` parts.
pub fn parse_duration(text: &str) -> Option<Duration> {
    let mut rest = text.as_bytes();
    let mut total = Duration::ZERO;
    let mut parts = 0;
    while !rest.is_empty() {
        parts += 1;
        if parts > 4 {
            return None;
        }
        let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
        if digits == 0 || digits > 5 {
            return None;
        }
        let number: u64 = std::str::from_utf8(&rest[..digits]).ok()?.parse().ok()?;
        rest = &rest[digits..];
        let (unit, len) = match rest {
            [b'm', b's', ..] => (Duration::from_millis(1), 2),
            [b'h', ..] => (Duration::from_hours(1), 1),
            [b'm', ..] => (Duration::from_mins(1), 1),
            [b's', ..] => (Duration::from_secs(1), 1),
            _ => return None,
        };
        rest = &rest[len..];
        total = total.checked_add(unit.checked_mul(u32::try_from(number).ok()?)?)?;
    }
    (parts > 0).then_some(total)
}

fn targets(refs: &[TargetRef]) -> Result<Vec<String>, TrafficPolicyError> {
    if refs.is_empty() {
        return Err(invalid(
            "spec.targetRefs",
            "required: name at least one Service of the policy's namespace",
        ));
    }
    if refs.len() > MAX_TARGETS {
        return Err(invalid(
            "spec.targetRefs",
            format!("{} entries; at most {MAX_TARGETS}", refs.len()),
        ));
    }
    let mut names = BTreeSet::new();
    for (i, target) in refs.iter().enumerate() {
        let path = format!("spec.targetRefs[{i}]");
        no_extra(&path, &target.extra)?;
        if !(target.group.is_empty() || target.group == "core") {
            return Err(invalid(
                format!("{path}.group"),
                format!(
                    "{:?}: only Services (group \"\") can be targeted",
                    target.group
                ),
            ));
        }
        if target.kind != "Service" {
            return Err(invalid(
                format!("{path}.kind"),
                format!("{:?}: only Service can be targeted", target.kind),
            ));
        }
        if !is_service_name(&target.name) {
            return Err(invalid(
                format!("{path}.name"),
                format!(
                    "{:?} is not a Service name (lowercase letters, digits and '-', at most 63)",
                    target.name
                ),
            ));
        }
        names.insert(target.name.clone());
    }
    Ok(names.into_iter().collect())
}

/// An RFC 1035 label, which every Service name is.
fn is_service_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    (1..=63).contains(&bytes.len())
        && bytes[0].is_ascii_lowercase()
        && bytes[bytes.len() - 1].is_ascii_alphanumeric()
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
}

fn retries(spec: &RetriesSpec) -> Result<RetryPolicy, TrafficPolicyError> {
    const P: &str = "spec.retries";
    no_extra(P, &spec.extra)?;
    let attempts = number(
        &format!("{P}.attempts"),
        spec.attempts,
        None,
        0..=MAX_ATTEMPTS,
    )?;
    let per_try_timeout = spec
        .per_try_timeout
        .as_deref()
        .map(|t| duration(&format!("{P}.perTryTimeout"), t))
        .transpose()?;
    let retry_on = match &spec.retry_on {
        None => RetryOn {
            connect_failure: true,
            reset: true,
            gateway_error: true,
            ..RetryOn::default()
        },
        Some(list) if list.is_empty() => {
            return Err(invalid(
                format!("{P}.retryOn"),
                "empty: list at least one condition, or remove the field for the defaults",
            ));
        }
        Some(list) => {
            let mut on = RetryOn::default();
            for (i, condition) in list.iter().enumerate() {
                let flag = match condition.as_str() {
                    "5xx" => &mut on.server_error,
                    "gateway-error" => &mut on.gateway_error,
                    "connect-failure" => &mut on.connect_failure,
                    "reset" => &mut on.reset,
                    "retriable-status-codes" => &mut on.retriable_status_codes,
                    other => {
                        return Err(invalid(
                            format!("{P}.retryOn[{i}]"),
                            format!(
                                "{other:?} is not one of 5xx, gateway-error, connect-failure, reset, retriable-status-codes"
                            ),
                        ));
                    }
                };
                *flag = true;
            }
            on
        }
    };
    let codes_path = format!("{P}.retriableStatusCodes");
    if spec.retriable_status_codes.len() > MAX_RETRIABLE_STATUS_CODES {
        return Err(invalid(
            &codes_path,
            format!(
                "{} entries; at most {MAX_RETRIABLE_STATUS_CODES}",
                spec.retriable_status_codes.len()
            ),
        ));
    }
    let mut codes = Vec::with_capacity(spec.retriable_status_codes.len());
    for (i, code) in spec.retriable_status_codes.iter().enumerate() {
        match StatusCode::from_u16(*code) {
            Ok(status) if (400..=599).contains(code) => codes.push(status),
            _ => {
                return Err(invalid(
                    format!("{codes_path}[{i}]"),
                    format!("{code} is not an error status (400 to 599)"),
                ));
            }
        }
    }
    codes.sort_unstable();
    codes.dedup();
    if retry_on.retriable_status_codes && codes.is_empty() {
        return Err(invalid(
            &codes_path,
            "required with retryOn retriable-status-codes",
        ));
    }
    if !retry_on.retriable_status_codes && !codes.is_empty() {
        return Err(invalid(
            &codes_path,
            "listed, but retryOn lacks retriable-status-codes, so they would never be retried",
        ));
    }
    let defaults = BudgetLimits::default();
    let budget = match &spec.budget {
        None => defaults,
        Some(budget) => {
            let path = format!("{P}.budget");
            no_extra(&path, &budget.extra)?;
            BudgetLimits {
                percent: percent(
                    &format!("{path}.percent"),
                    budget.percent,
                    Some(defaults.percent),
                )?,
                min_retries_per_second: number(
                    &format!("{path}.minRetriesPerSecond"),
                    budget.min_retries_per_second,
                    Some(defaults.min_retries_per_second),
                    0..=MAX_MIN_RETRIES_PER_SECOND,
                )?,
            }
        }
    };
    Ok(RetryPolicy {
        attempts,
        per_try_timeout,
        retry_on,
        retriable_status_codes: codes,
        budget,
    })
}

fn connection_pool(spec: &ConnectionPoolSpec) -> Result<PoolLimits, TrafficPolicyError> {
    const P: &str = "spec.connectionPool";
    no_extra(P, &spec.extra)?;
    let optional = |field: &str, value: Option<u32>, max: u32| {
        value
            .map(|v| number(&format!("{P}.{field}"), Some(v), None, 1..=max))
            .transpose()
    };
    Ok(PoolLimits {
        max_connections: optional("maxConnections", spec.max_connections, MAX_CONNECTIONS)?,
        max_pending_requests: number(
            &format!("{P}.maxPendingRequests"),
            spec.max_pending_requests,
            Some(DEFAULT_MAX_PENDING_REQUESTS),
            0..=MAX_PENDING_REQUESTS,
        )?,
        max_requests: optional("maxRequests", spec.max_requests, MAX_REQUESTS)?,
    })
}

fn outlier_detection(spec: &OutlierDetectionSpec) -> Result<OutlierPolicy, TrafficPolicyError> {
    const P: &str = "spec.outlierDetection";
    no_extra(P, &spec.extra)?;
    let defaults = OutlierPolicy::default();
    Ok(OutlierPolicy {
        consecutive_errors: number(
            &format!("{P}.consecutiveErrors"),
            spec.consecutive_errors,
            Some(defaults.consecutive_errors),
            1..=MAX_CONSECUTIVE_ERRORS,
        )?,
        interval: optional_duration(
            &format!("{P}.interval"),
            spec.interval.as_ref(),
            defaults.interval,
        )?,
        base_ejection_time: optional_duration(
            &format!("{P}.baseEjectionTime"),
            spec.base_ejection_time.as_ref(),
            defaults.base_ejection_time,
        )?,
        max_ejection_percent: percent(
            &format!("{P}.maxEjectionPercent"),
            spec.max_ejection_percent,
            Some(defaults.max_ejection_percent),
        )?,
    })
}

fn fault(spec: &FaultSpec) -> Result<FaultPolicy, TrafficPolicyError> {
    const P: &str = "spec.fault";
    no_extra(P, &spec.extra)?;
    if spec.delay.is_none() && spec.abort.is_none() {
        return Err(invalid(P, "has neither delay nor abort"));
    }
    let delay = match &spec.delay {
        None => None,
        Some(delay) => {
            let path = format!("{P}.delay");
            no_extra(&path, &delay.extra)?;
            let fixed = delay
                .fixed_delay
                .as_deref()
                .ok_or_else(|| invalid(format!("{path}.fixedDelay"), "required"))?;
            Some(DelayFault {
                delay: duration(&format!("{path}.fixedDelay"), fixed)?,
                // Required: faulting every request by leaving it out is too easy a mistake.
                percent: percent(&format!("{path}.percent"), delay.percent, None)?,
            })
        }
    };
    let abort = match &spec.abort {
        None => None,
        Some(abort) => {
            let path = format!("{P}.abort");
            no_extra(&path, &abort.extra)?;
            let status_path = format!("{path}.httpStatus");
            let code = abort
                .http_status
                .ok_or_else(|| invalid(&status_path, "required"))?;
            let status = StatusCode::from_u16(code)
                .ok()
                .filter(|_| (400..=599).contains(&code))
                .ok_or_else(|| {
                    invalid(
                        &status_path,
                        format!("{code} is not an error status (400 to 599)"),
                    )
                })?;
            Some(AbortFault {
                status,
                percent: percent(&format!("{path}.percent"), abort.percent, None)?,
            })
        }
    };
    Ok(FaultPolicy { delay, abort })
}

fn rate_limit(spec: &RateLimitSpec) -> Result<RateLimitPolicy, TrafficPolicyError> {
    const P: &str = "spec.rateLimit";
    no_extra(P, &spec.extra)?;
    let requests_per_second = number(
        &format!("{P}.requestsPerSecond"),
        spec.requests_per_second,
        None,
        1..=MAX_REQUESTS_PER_SECOND,
    )?;
    let burst = number(
        &format!("{P}.burst"),
        spec.burst,
        Some(requests_per_second),
        1..=MAX_BURST,
    )?;
    let per = match spec.per.as_deref() {
        None | Some("route") => RateLimitKey::Route,
        Some("source") => RateLimitKey::Source,
        Some(other) => {
            return Err(invalid(
                format!("{P}.per"),
                format!("{other:?} is not one of route, source"),
            ));
        }
    };
    Ok(RateLimitPolicy {
        requests_per_second,
        burst,
        per,
    })
}

/// The `Accepted` condition of a compiled object (without transition time: see
/// [`crate::policy::status::set_condition`]). A rejected object has no effect: its Services
/// are proxied as if it did not exist.
pub fn condition(
    compiled: &Result<Resilience, TrafficPolicyError>,
    generation: Option<i64>,
) -> Condition {
    let (status, reason, message) = match compiled {
        Ok(_) => ("True", "Accepted", "applied as written".to_owned()),
        Err(e) => (
            "False",
            e.reason(),
            format!("rejected: {e}; the policy has no effect until it is fixed"),
        ),
    };
    Condition {
        type_: ACCEPTED.into(),
        status: status.into(),
        reason: reason.into(),
        message,
        observed_generation: generation,
        last_transition_time: String::new(),
    }
}

#[cfg(test)]
mod tests;
