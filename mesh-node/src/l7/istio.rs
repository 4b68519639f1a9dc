//! Istio's `networking.istio.io` kinds, translated into the waypoint's one L7 model: a
//! `VirtualService` becomes a route of the [`super::route`] table (kind
//! [`RouteKind::Virtual`](super::route::RouteKind::Virtual)), a `DestinationRule` becomes
//! the subsets its routes name and a [`Resilience`](super::resilience::Resilience) of the
//! [`super::resilience`] registry. There is no second engine: after conversion an Istio object
//! is served exactly like its Gateway API or TrafficPolicy counterpart.
//!
//! Each kind has a pure conversion, object as written -> model or the first field that cannot
//! be honoured ([`virtual_service::convert`], [`destination_rule::convert`]), called by the
//! waypoints to serve and by the controller to write the status, so both always agree.
//!
//! ## Choices
//!
//! - **All or nothing.** A field Trellis does not implement (or a value it cannot honour)
//!   rejects the whole object with the field's path; the object is then left out, so traffic
//!   keeps the routing it had without it. Nothing is ever half-applied.
//! - **Hosts.** `hosts` and `destination.host` name Services: a short name (`reviews`, in the
//!   object's namespace), `<service>.<namespace>`, or `<service>.<namespace>.svc[.<domain>]`.
//!   A VirtualService applies at waypoints to Services of its own namespace only (like a
//!   producer route); wildcards and hosts outside the cluster are rejected.
//! - **Order.** A VirtualService's `http[]` rules are tried in order, the first match wins
//!   (Istio's rule), unlike the Gateway API's specificity order between routes.
//! - **Precedence** ([`precedence`]): on a Service with an HTTPRoute or GRPCRoute attached,
//!   VirtualServices are not applied (reported `Conflicted`): the Gateway API is what Istio's
//!   ambient documentation recommends, and it calls mixing both undefined. Of several
//!   VirtualServices naming one Service, the first in `namespace/name` order applies and the
//!   others are `Conflicted` (creation timestamps do not reach the waypoints, so "oldest wins"
//!   cannot be decided there).
//! - **Ports.** A destination without `port` goes to the port the client dialled.

pub mod destination_rule;
mod precedence;
pub mod virtual_service;

#[cfg(test)]
mod tests;

use std::time::Duration;

use crate::l7::route::RouteError;

/// The kinds' names, as in manifests and in route resources.
pub const VIRTUAL_SERVICE: &str = "VirtualService";
pub const DESTINATION_RULE: &str = "DestinationRule";

/// `path: why` for a field Trellis does not implement.
fn unsupported(path: impl Into<String>, why: impl Into<String>) -> RouteError {
    RouteError::Unsupported {
        path: path.into(),
        why: why.into(),
    }
}

/// Rejects the first field of `extra` (fields this version does not read).
fn no_extra(path: &str, extra: &crate::k8s::policy::ExtraFields) -> Result<(), RouteError> {
    match extra.keys().next() {
        Some(key) => Err(unsupported(
            format!("{path}.{key}"),
            "is not implemented by Trellis waypoints (or is misspelt); the object is not applied",
        )),
        None => Ok(()),
    }
}

/// The Service a host names, from an object in `namespace`: `(namespace, name)`.
pub fn service_of(host: &str, namespace: &str) -> Option<(String, String)> {
    let host = host.to_ascii_lowercase();
    let labels: Vec<&str> = host.split('.').collect();
    let dns_label = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if !labels.iter().all(|l| dns_label(l)) {
        return None;
    }
    match labels.as_slice() {
        [name] => Some((namespace.to_owned(), (*name).to_owned())),
        [name, ns] => Some(((*ns).to_owned(), (*name).to_owned())),
        [name, ns, "svc", ..] => Some(((*ns).to_owned(), (*name).to_owned())),
        _ => None,
    }
}

/// An Istio duration (`5s`, `0.5s`, `100ms`, `1m`, `1h`, or the Gateway API's `1m30s`), at
/// most one hour.
pub fn duration(path: &str, text: &str) -> Result<Duration, RouteError> {
    let bad = |why: &str| RouteError::Invalid {
        path: path.to_owned(),
        value: crate::l7::route::error::shown(text),
        why: why.to_owned(),
    };
    let parsed = match crate::l7::route::duration::parse(text) {
        Ok(d) => d,
        Err(_) => {
            let seconds = text
                .strip_suffix('s')
                .filter(|n| n.len() <= 12 && n.bytes().all(|b| b.is_ascii_digit() || b == b'.'))
                .and_then(|n| n.parse::<f64>().ok())
                .filter(|s| s.is_finite() && *s >= 0.0 && *s <= 3600.0)
                .ok_or_else(|| bad("is not a duration (like 500ms, 1.5s, 2m or 1h)"))?;
            Duration::from_secs_f64(seconds)
        }
    };
    if parsed > Duration::from_hours(1) {
        return Err(bad("is longer than one hour"));
    }
    Ok(parsed)
}

/// `duration` in the Gateway API's syntax (whole milliseconds, rounded up).
fn gateway_duration(duration: Duration) -> String {
    let ms = duration.as_micros().div_ceil(1000);
    let (h, rest) = (ms / 3_600_000, ms % 3_600_000);
    let (m, rest) = (rest / 60_000, rest % 60_000);
    let (s, ms) = (rest / 1000, rest % 1000);
    let mut out = String::new();
    for (value, unit) in [(h, "h"), (m, "m"), (s, "s"), (ms, "ms")] {
        if value > 0 {
            out.push_str(&format!("{value}{unit}"));
        }
    }
    if out.is_empty() {
        out.push_str("0s");
    }
    out
}

/// A whole percentage (0 to 100): faults are drawn per percent.
fn whole_percent(path: &str, value: f64) -> Result<u32, RouteError> {
    if !(0.0..=100.0).contains(&value) {
        return Err(RouteError::Invalid {
            path: path.to_owned(),
            value: value.to_string(),
            why: "is not a percentage (0 to 100)".into(),
        });
    }
    if value.fract() != 0.0 {
        return Err(unsupported(
            path,
            format!("{value} is not a whole percentage; Trellis waypoints draw faults per percent"),
        ));
    }
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "in 0..=100 and whole (checked above): exact"
    )]
    Ok(value as u32)
}

/// Rewrites the paths of an error the route compiler reported on the translated route to
/// the fields of the VirtualService they came from.
fn istio_paths(error: RouteError) -> RouteError {
    let map = |path: String| {
        match_fields(
            &path
                .replace("spec.rules[", "spec.http[")
                .replace(".matches[", ".match[")
                .replace(".backendRefs[", ".route[")
                .replace("spec.parentRefs", "spec.hosts"),
        )
    };
    match error {
        RouteError::TooMany { path, max, found } => RouteError::TooMany {
            path: map(path),
            max,
            found,
        },
        RouteError::Invalid { path, value, why } => RouteError::Invalid {
            path: map(path),
            value,
            why,
        },
        RouteError::Unsupported { path, why } => RouteError::Unsupported {
            path: map(path),
            why,
        },
        RouteError::IncompatibleFilters { path, why } => RouteError::IncompatibleFilters {
            path: map(path),
            why,
        },
        other => other,
    }
}

/// Within each `match[n]` of a path: the translated `path` is the VirtualService's `uri`,
/// and the translated `headers` / `queryParams` lists are its maps of the same names (whose
/// entries the message names by value).
fn match_fields(path: &str) -> String {
    let mut parts = path.split(".match[");
    let mut out = parts.next().unwrap_or_default().to_owned();
    for part in parts {
        out.push_str(".match[");
        let Some((index, rest)) = part.split_once(']') else {
            out.push_str(part);
            continue;
        };
        out.push_str(index);
        out.push(']');
        let field = rest.strip_prefix('.').map(|r| r.split(['.', '[']).next());
        let rest = match field.flatten() {
            Some("path") => ".uri",
            Some("headers") => ".headers",
            Some("queryParams") => ".queryParams",
            _ => rest,
        };
        out.push_str(rest);
    }
    out
}

/// The `Accepted` condition of an Istio object: applied as written, or why not.
pub fn condition(
    outcome: Result<(), &RouteError>,
    generation: Option<i64>,
) -> crate::policy::status::Condition {
    let (status, reason, message) = match outcome {
        Ok(()) => ("True", "Accepted", "applied as written".to_owned()),
        Err(e) => (
            "False",
            match e {
                RouteError::Conflicted { .. } => "Conflicted",
                RouteError::Unsupported { .. } => "Unsupported",
                _ => "Invalid",
            },
            format!("rejected: {e}; the object has no effect until it is fixed"),
        ),
    };
    crate::policy::status::Condition {
        type_: crate::policy::status::ACCEPTED.into(),
        status: status.into(),
        reason: reason.into(),
        message,
        observed_generation: generation,
        last_transition_time: String::new(),
    }
}

/// The `Accepted` condition of every VirtualService and DestinationRule among `routes`
/// (converted routes of every kind, VirtualServices included) and `rules` (converted
/// DestinationRules, or why not, by object), with precedence applied as the waypoints apply
/// it. Keyed by kind name and object.
pub fn conditions(
    routes: &mut [route::CompiledRoute],
    rules: &[(
        crate::policy::PolicyId,
        Option<i64>,
        Result<Destination, RouteError>,
    )],
) -> Vec<(
    &'static str,
    crate::policy::PolicyId,
    crate::policy::status::Condition,
)> {
    precedence(routes);
    let mut out = Vec::new();
    for r in routes
        .iter()
        .filter(|r| r.id.kind == route::RouteKind::Virtual)
    {
        let id = crate::policy::PolicyId {
            namespace: r.id.namespace.clone(),
            name: r.id.name.clone(),
        };
        out.push((
            VIRTUAL_SERVICE,
            id,
            condition(r.outcome.as_ref().map(|_| ()), r.generation),
        ));
    }
    let accepted: Vec<Destination> = rules
        .iter()
        .filter_map(|(_, _, r)| r.as_ref().ok().cloned())
        .collect();
    let losers = precedence_of_rules(&accepted);
    for (id, generation, result) in rules {
        let outcome = match (result, losers.get(id)) {
            (Err(e), _) => Err(e.clone()),
            (Ok(d), Some(winner)) => Err(RouteError::Conflicted {
                path: "spec.host".into(),
                why: format!(
                    "Service {}/{} already has DestinationRule {winner} (the first in namespace/name order applies)",
                    d.id.namespace, d.service
                ),
            }),
            (Ok(_), None) => Ok(()),
        };
        out.push((
            DESTINATION_RULE,
            id.clone(),
            condition(outcome.as_ref().map(|&()| ()), *generation),
        ));
    }
    out
}

pub use destination_rule::{Destination, precedence_of_rules};
pub use precedence::precedence;

use crate::l7::route;
