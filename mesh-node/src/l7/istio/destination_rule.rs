//! `DestinationRule` -> the subsets of a Service (label selectors over its endpoints, which
//! VirtualService destinations name) and a [`Resilience`] of the registry
//! ([`crate::l7::resilience`]), the same one a TrafficPolicy compiles to:
//!
//! - `trafficPolicy.connectionPool`: `tcp.maxConnections`, `http.http1MaxPendingRequests`
//!   and `http.http2MaxRequests` are the breaker's connection, queue and request limits.
//! - `trafficPolicy.outlierDetection`: `consecutive5xxErrors` (5xx answers and failed tries,
//!   which is what the detector counts), `interval`, `baseEjectionTime`,
//!   `maxEjectionPercent`.
//! - `trafficPolicy.loadBalancer.simple: ROUND_ROBIN` is what the waypoint does anyway.
//!
//! Everything else (other balancers, per-subset and per-port policies, TLS settings, ...)
//! rejects the object with its path. Of several DestinationRules for one Service, the first in
//! `namespace/name` order applies ([`precedence_of_rules`]).

use std::collections::BTreeMap;

use serde_json::Value;

use super::{duration, no_extra, service_of, unsupported};
use crate::{
    k8s::istio_networking::{DestinationRuleSpec, TrafficPolicy},
    l7::{
        resilience::{
            Resilience,
            breaker::{DEFAULT_MAX_PENDING_REQUESTS, PoolLimits},
            compile::{
                MAX_CONNECTIONS, MAX_CONSECUTIVE_ERRORS, MAX_PENDING_REQUESTS, MAX_REQUESTS,
            },
            outlier::OutlierPolicy,
        },
        route::RouteError,
    },
    policy::PolicyId,
};

/// Subsets in one rule at most.
pub const MAX_SUBSETS: usize = 64;
/// Labels in one subset at most.
pub const MAX_SUBSET_LABELS: usize = 16;

/// A converted `DestinationRule`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Destination {
    pub id: PolicyId,
    pub generation: Option<i64>,
    /// The Service it applies to (in `id.namespace`).
    pub service: String,
    /// Subset name -> the labels an endpoint's workload must all have.
    pub subsets: BTreeMap<String, BTreeMap<String, String>>,
    /// The traffic policy, if it sets one.
    pub resilience: Option<Resilience>,
}

/// Converts the `DestinationRule` `namespace/name`, or names the first field it cannot honour.
pub fn convert(
    namespace: &str,
    name: &str,
    generation: Option<i64>,
    spec: &Value,
) -> Result<Destination, RouteError> {
    if namespace.is_empty() {
        return Err(RouteError::MissingMetadata("namespace"));
    }
    if name.is_empty() {
        return Err(RouteError::MissingMetadata("name"));
    }
    let spec: DestinationRuleSpec = serde_path_to_error::deserialize(spec).map_err(|e| {
        let path = e.path().to_string();
        RouteError::Unsupported {
            path: if path == "." {
                "spec".into()
            } else {
                format!("spec.{path}")
            },
            why: format!("cannot be read: {}", e.into_inner()),
        }
    })?;
    no_extra("spec", &spec.extra)?;
    if spec.export_to.iter().any(|e| e != "*" && e != ".") {
        return Err(unsupported(
            "spec.exportTo",
            "only \"*\" and \".\" are supported",
        ));
    }
    let Some((ns, service)) = service_of(&spec.host, namespace) else {
        return Err(unsupported(
            "spec.host",
            format!(
                "{:?} is not a Service of the cluster (short name, <service>.<namespace> or <service>.<namespace>.svc.<domain>)",
                spec.host
            ),
        ));
    };
    if ns != namespace {
        return Err(unsupported(
            "spec.host",
            format!(
                "{:?} is in namespace {ns}: a DestinationRule applies only to Services of its own namespace ({namespace})",
                spec.host
            ),
        ));
    }
    if spec.subsets.len() > MAX_SUBSETS {
        return Err(RouteError::too_many(
            "spec.subsets",
            MAX_SUBSETS,
            spec.subsets.len(),
        ));
    }
    let mut subsets = BTreeMap::new();
    for (i, subset) in spec.subsets.iter().enumerate() {
        let path = format!("spec.subsets[{i}]");
        no_extra(&path, &subset.extra)?;
        if subset.traffic_policy.is_some() {
            return Err(unsupported(
                format!("{path}.trafficPolicy"),
                "per-subset traffic policies are not implemented; set trafficPolicy on the DestinationRule",
            ));
        }
        if subset.name.is_empty() {
            return Err(unsupported(format!("{path}.name"), "is required"));
        }
        if subset.labels.len() > MAX_SUBSET_LABELS {
            return Err(RouteError::too_many(
                format!("{path}.labels"),
                MAX_SUBSET_LABELS,
                subset.labels.len(),
            ));
        }
        if subsets
            .insert(subset.name.clone(), subset.labels.clone())
            .is_some()
        {
            return Err(unsupported(
                format!("{path}.name"),
                format!("{:?} is defined twice", subset.name),
            ));
        }
    }
    let id = PolicyId {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
    };
    let resilience = spec
        .traffic_policy
        .as_ref()
        .map(|p| resilience(&id, generation, &service, p))
        .transpose()?
        .flatten();
    Ok(Destination {
        id,
        generation,
        service,
        subsets,
        resilience,
    })
}

fn bounded(path: &str, value: i64, max: u32) -> Result<u32, RouteError> {
    u32::try_from(value)
        .ok()
        .filter(|v| *v >= 1 && *v <= max)
        .ok_or_else(|| RouteError::Invalid {
            path: path.to_owned(),
            value: value.to_string(),
            why: format!("is not from 1 to {max}"),
        })
}

fn resilience(
    id: &PolicyId,
    generation: Option<i64>,
    service: &str,
    policy: &TrafficPolicy,
) -> Result<Option<Resilience>, RouteError> {
    let path = "spec.trafficPolicy";
    no_extra(path, &policy.extra)?;
    if !policy.port_level_settings.is_empty() {
        return Err(unsupported(
            format!("{path}.portLevelSettings"),
            "per-port traffic policies are not implemented; set them for the whole Service",
        ));
    }
    if let Some(lb) = &policy.load_balancer {
        let lpath = format!("{path}.loadBalancer");
        no_extra(&lpath, &lb.extra)?;
        if lb.consistent_hash.is_some() {
            return Err(unsupported(
                format!("{lpath}.consistentHash"),
                "is not implemented by Trellis waypoints",
            ));
        }
        match lb.simple.as_deref() {
            None | Some("ROUND_ROBIN" | "UNSPECIFIED") => {}
            Some(other) => {
                return Err(unsupported(
                    format!("{lpath}.simple"),
                    format!("{other:?} is not implemented; waypoints balance ROUND_ROBIN"),
                ));
            }
        }
    }
    let connection_pool = match &policy.connection_pool {
        None => None,
        Some(pool) => {
            let ppath = format!("{path}.connectionPool");
            no_extra(&ppath, &pool.extra)?;
            let mut limits = PoolLimits {
                max_pending_requests: DEFAULT_MAX_PENDING_REQUESTS,
                ..PoolLimits::default()
            };
            if let Some(tcp) = &pool.tcp {
                no_extra(&format!("{ppath}.tcp"), &tcp.extra)?;
                if let Some(max) = tcp.max_connections {
                    limits.max_connections = Some(bounded(
                        &format!("{ppath}.tcp.maxConnections"),
                        max,
                        MAX_CONNECTIONS,
                    )?);
                }
            }
            if let Some(http) = &pool.http {
                let hpath = format!("{ppath}.http");
                no_extra(&hpath, &http.extra)?;
                if let Some(max) = http.http1_max_pending_requests {
                    limits.max_pending_requests = bounded(
                        &format!("{hpath}.http1MaxPendingRequests"),
                        max,
                        MAX_PENDING_REQUESTS,
                    )?;
                }
                if let Some(max) = http.http2_max_requests {
                    limits.max_requests = Some(bounded(
                        &format!("{hpath}.http2MaxRequests"),
                        max,
                        MAX_REQUESTS,
                    )?);
                }
                if http.max_requests_per_connection.is_some_and(|m| m != 0) {
                    return Err(unsupported(
                        format!("{hpath}.maxRequestsPerConnection"),
                        "is not implemented (waypoint connections are reused without a request count)",
                    ));
                }
                if http.max_retries.is_some() {
                    return Err(unsupported(
                        format!("{hpath}.maxRetries"),
                        "is not implemented; retries are bounded by each route's attempts",
                    ));
                }
            }
            Some(limits)
        }
    };
    let outlier_detection = match &policy.outlier_detection {
        None => None,
        Some(o) => {
            let opath = format!("{path}.outlierDetection");
            no_extra(&opath, &o.extra)?;
            if o.consecutive_gateway_errors.is_some() {
                return Err(unsupported(
                    format!("{opath}.consecutiveGatewayErrors"),
                    "is not implemented; consecutive5xxErrors counts 5xx answers and failed tries",
                ));
            }
            let defaults = OutlierPolicy::default();
            Some(OutlierPolicy {
                consecutive_errors: match o.consecutive_5xx_errors {
                    Some(n) => bounded(
                        &format!("{opath}.consecutive5xxErrors"),
                        n,
                        MAX_CONSECUTIVE_ERRORS,
                    )?,
                    None => defaults.consecutive_errors,
                },
                interval: match &o.interval {
                    Some(t) => nonzero(&format!("{opath}.interval"), t)?,
                    None => defaults.interval,
                },
                base_ejection_time: match &o.base_ejection_time {
                    Some(t) => nonzero(&format!("{opath}.baseEjectionTime"), t)?,
                    None => defaults.base_ejection_time,
                },
                max_ejection_percent: match o.max_ejection_percent {
                    Some(p) => u32::try_from(p).ok().filter(|p| *p <= 100).ok_or_else(|| {
                        RouteError::Invalid {
                            path: format!("{opath}.maxEjectionPercent"),
                            value: p.to_string(),
                            why: "is not a percentage (0 to 100)".into(),
                        }
                    })?,
                    None => defaults.max_ejection_percent,
                },
            })
        }
    };
    if connection_pool.is_none() && outlier_detection.is_none() {
        return Ok(None);
    }
    Ok(Some(Resilience {
        id: id.clone(),
        generation,
        targets: vec![service.to_owned()],
        retries: None,
        connection_pool,
        outlier_detection,
        fault: None,
        rate_limit: None,
    }))
}

fn nonzero(path: &str, text: &str) -> Result<std::time::Duration, RouteError> {
    let d = duration(path, text)?;
    if d.is_zero() {
        return Err(RouteError::Invalid {
            path: path.to_owned(),
            value: crate::l7::route::error::shown(text),
            why: "must be above zero".into(),
        });
    }
    Ok(d)
}

/// Which converted DestinationRules apply: the first per Service in `namespace/name` order.
/// Returns, for each one that does not, the rule that does.
pub fn precedence_of_rules(rules: &[Destination]) -> BTreeMap<PolicyId, PolicyId> {
    let mut sorted: Vec<&Destination> = rules.iter().collect();
    sorted.sort_by(|a, b| a.id.cmp(&b.id));
    let mut winners: BTreeMap<(&str, &str), &PolicyId> = BTreeMap::new();
    let mut losers = BTreeMap::new();
    for rule in sorted {
        match winners.get(&(rule.id.namespace.as_str(), rule.service.as_str())) {
            Some(winner) => {
                losers.insert(rule.id.clone(), (*winner).clone());
            }
            None => {
                winners.insert((&rule.id.namespace, &rule.service), &rule.id);
            }
        }
    }
    losers
}
