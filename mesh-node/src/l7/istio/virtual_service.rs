//! `VirtualService` -> a route of the waypoint's route table.
//!
//! The object is translated field by field into the Gateway API route the model is compiled
//! from (`http[]` -> `rules`, `match` -> `matches`, `route` -> `backendRefs`, `headers`,
//! `redirect`, `rewrite` and `mirror` -> filters, `timeout` and `retries` -> `timeouts` and
//! `retry`), compiled by [`route::compile`] with all its checks and limits, then given what
//! only Istio has: subsets on backends, per-rule faults, ports left to the request, and
//! first-match order. Istio-only semantics kept on the way:
//!
//! - `uri.prefix` is a string prefix (`/rev` matches `/reviews`), so it is matched as a regular
//!   expression, except in a rule that rewrites the URI, where the prefix must be a path
//!   prefix (whole segments) for the rewrite to replace it.
//! - Header and query `prefix` matches are regular expressions too; a header match with no
//!   value (`{}`) requires only the header's presence.
//! - `redirect` answers 301 unless `redirectCode` says otherwise.
//! - `retries`: `attempts` retries after the first try; `retryOn` accepts `5xx`,
//!   `gateway-error`, `connect-failure`, `refused-stream`, `reset`, `retriable-status-codes`
//!   and status codes; connection failures are always retried (nothing was sent).

mod policies;

use std::sync::Arc;

use serde_json::{Map, Value, json};

use super::{duration, gateway_duration, istio_paths, no_extra, service_of, unsupported};
use crate::{
    k8s::istio_networking::{
        Destination, HeaderOperations, HttpMatchRequest, HttpRoute, StringMatch, VirtualServiceSpec,
    },
    l7::{
        resilience::fault::FaultPolicy,
        route::{
            self, CompiledRoute, RouteError, RouteId, RouteKind, limits,
            model::{BackendSlot, SAME_PORT},
        },
    },
};

/// A port the translation writes for a destination without one, replaced by [`SAME_PORT`]
/// once compiled (the route compiler requires a port on every Service backend).
const PLACEHOLDER_PORT: i64 = 1;

/// Converts the `VirtualService` `namespace/name`. Never fails: like [`route::compile`], the
/// result carries the route or the first field that cannot be honoured.
pub fn convert(
    namespace: &str,
    name: &str,
    generation: Option<i64>,
    spec: &Value,
) -> CompiledRoute {
    let id = RouteId {
        kind: RouteKind::Virtual,
        namespace: namespace.into(),
        name: name.into(),
    };
    let rejected = |error: RouteError| CompiledRoute {
        id: id.clone(),
        generation,
        parents: Vec::new(),
        refs: None,
        outcome: Err(error),
    };
    if namespace.is_empty() {
        return rejected(RouteError::MissingMetadata("namespace"));
    }
    if name.is_empty() {
        return rejected(RouteError::MissingMetadata("name"));
    }
    let spec: VirtualServiceSpec = if spec.is_null() {
        VirtualServiceSpec::default()
    } else {
        match serde_path_to_error::deserialize(spec) {
            Ok(spec) => spec,
            Err(e) => {
                let path = e.path().to_string();
                return rejected(RouteError::Unsupported {
                    path: if path == "." {
                        "spec".into()
                    } else {
                        format!("spec.{path}")
                    },
                    why: format!("cannot be read: {}", cut(&e.into_inner().to_string())),
                });
            }
        }
    };
    let translated = match translate(namespace, &spec) {
        Ok(t) => t,
        Err(e) => return rejected(e),
    };
    let mut compiled = route::compile(
        RouteKind::Virtual,
        namespace,
        name,
        generation,
        &translated.route,
    );
    compiled.outcome = match compiled.outcome {
        Ok(mut built) => {
            let route = Arc::make_mut(&mut built);
            for (rule, extra) in route.rules.iter_mut().zip(&translated.rules) {
                rule.fault = extra.fault;
                if let Some(retry) = rule.retry.as_mut() {
                    retry.reset = extra.retry_reset;
                }
                for (slot, (subset, same_port)) in rule.backends.iter_mut().zip(&extra.backends) {
                    if let BackendSlot::Usable(backend) = slot {
                        backend.subset.clone_from(subset);
                        if *same_port {
                            backend.port = SAME_PORT;
                        }
                    }
                }
                if extra.mirror_same_port {
                    for mirror in &mut rule.filters.mirrors {
                        mirror.port = SAME_PORT;
                    }
                }
            }
            Ok(built)
        }
        Err(e) => Err(istio_paths(e)),
    };
    compiled
}

fn cut(message: &str) -> String {
    const MAX: usize = 256;
    match message.char_indices().nth(MAX) {
        Some((at, _)) => format!("{}...", &message[..at]),
        None => message.to_owned(),
    }
}

/// The route as the Gateway API would write it, and what it cannot carry, per rule.
struct Translated {
    route: Value,
    rules: Vec<RuleExtra>,
}

#[derive(Default)]
struct RuleExtra {
    fault: Option<FaultPolicy>,
    retry_reset: bool,
    /// Per backend: its subset, and whether it goes to the dialled port.
    backends: Vec<(Option<String>, bool)>,
    mirror_same_port: bool,
}

fn translate(namespace: &str, spec: &VirtualServiceSpec) -> Result<Translated, RouteError> {
    no_extra("spec", &spec.extra)?;
    if let Some(gateway) = spec.gateways.iter().find(|g| g.as_str() != "mesh") {
        return Err(unsupported(
            "spec.gateways",
            format!("{gateway:?}: only the mesh (\"mesh\", or no gateways) is served by waypoints"),
        ));
    }
    if !spec.tcp.is_empty() {
        return Err(unsupported(
            "spec.tcp",
            "TCP routes are not served by Trellis waypoints (they route HTTP); use a Service per destination",
        ));
    }
    if !spec.tls.is_empty() {
        return Err(unsupported(
            "spec.tls",
            "TLS routes are not served by Trellis waypoints",
        ));
    }
    if spec.export_to.iter().any(|e| e != "*" && e != ".") {
        return Err(unsupported(
            "spec.exportTo",
            "only \"*\" and \".\" are supported",
        ));
    }
    if spec.hosts.is_empty() {
        return Err(unsupported(
            "spec.hosts",
            "is required (the Services the rules apply to)",
        ));
    }
    if spec.hosts.len() > limits::PARENT_REFS {
        return Err(RouteError::too_many(
            "spec.hosts",
            limits::PARENT_REFS,
            spec.hosts.len(),
        ));
    }
    if spec.http.is_empty() {
        return Err(unsupported(
            "spec.http",
            "is required: a waypoint serves HTTP rules only",
        ));
    }
    if spec.http.len() > limits::RULES {
        return Err(RouteError::too_many(
            "spec.http",
            limits::RULES,
            spec.http.len(),
        ));
    }
    let mut parents = Vec::new();
    for (i, host) in spec.hosts.iter().enumerate() {
        let path = format!("spec.hosts[{i}]");
        let Some((ns, service)) = service_of(host, namespace) else {
            return Err(unsupported(
                path,
                format!(
                    "{host:?} is not a Service of the cluster (short name, <service>.<namespace> or <service>.<namespace>.svc.<domain>); wildcards and external hosts are not served by waypoints"
                ),
            ));
        };
        if ns != namespace {
            return Err(unsupported(
                path,
                format!(
                    "{host:?} is in namespace {ns}: a VirtualService applies only to Services of its own namespace ({namespace})"
                ),
            ));
        }
        parents.push(json!({"group": "", "kind": "Service", "name": service}));
    }
    let mut rules = Vec::new();
    let mut extras = Vec::new();
    for (i, http) in spec.http.iter().enumerate() {
        let (rule, extra) = rule(namespace, &format!("spec.http[{i}]"), http)?;
        rules.push(rule);
        extras.push(extra);
    }
    Ok(Translated {
        route: json!({"parentRefs": parents, "rules": rules}),
        rules: extras,
    })
}

fn rule(namespace: &str, path: &str, http: &HttpRoute) -> Result<(Value, RuleExtra), RouteError> {
    no_extra(path, &http.extra)?;
    let mut extra = RuleExtra::default();
    let mut rule = Map::new();
    let rewrites_uri = http.rewrite.as_ref().is_some_and(|r| r.uri.is_some());
    if http.matches.len() > limits::HTTP_MATCHES {
        return Err(RouteError::too_many(
            format!("{path}.match"),
            limits::HTTP_MATCHES,
            http.matches.len(),
        ));
    }
    let matches = http
        .matches
        .iter()
        .enumerate()
        .map(|(j, m)| match_request(&format!("{path}.match[{j}]"), m, rewrites_uri))
        .collect::<Result<Vec<_>, _>>()?;
    let prefixed = http
        .matches
        .iter()
        .filter(|m| m.uri.as_ref().is_some_and(|u| u.prefix.is_some()))
        .count();
    if rewrites_uri && prefixed > 0 && prefixed != http.matches.len() {
        return Err(unsupported(
            format!("{path}.rewrite.uri"),
            "with some matches by uri prefix and others not, which part to rewrite is ambiguous; split the rule",
        ));
    }
    if !matches.is_empty() {
        rule.insert("matches".into(), Value::Array(matches));
    }

    let mut filters = Vec::new();
    if let Some(headers) = &http.headers {
        no_extra(&format!("{path}.headers"), &headers.extra)?;
        if let Some(ops) = &headers.request {
            filters.push(json!({"type": "RequestHeaderModifier", "requestHeaderModifier": header_ops(&format!("{path}.headers.request"), ops)?}));
        }
        if let Some(ops) = &headers.response {
            filters.push(json!({"type": "ResponseHeaderModifier", "responseHeaderModifier": header_ops(&format!("{path}.headers.response"), ops)?}));
        }
    }
    if let Some(redirect) = &http.redirect {
        let rpath = format!("{path}.redirect");
        no_extra(&rpath, &redirect.extra)?;
        if !http.route.is_empty() {
            return Err(unsupported(rpath, "cannot be combined with route"));
        }
        let mut r = Map::new();
        if let Some(scheme) = &redirect.scheme {
            r.insert("scheme".into(), json!(scheme));
        }
        if let Some(authority) = &redirect.authority {
            r.insert("hostname".into(), json!(authority));
        }
        if let Some(port) = redirect.port {
            r.insert("port".into(), json!(port));
        }
        if let Some(uri) = &redirect.uri {
            r.insert(
                "path".into(),
                json!({"type": "ReplaceFullPath", "replaceFullPath": uri}),
            );
        }
        r.insert(
            "statusCode".into(),
            json!(redirect.redirect_code.unwrap_or(301)),
        );
        filters.push(json!({"type": "RequestRedirect", "requestRedirect": r}));
    }
    if let Some(rewrite) = &http.rewrite {
        let rpath = format!("{path}.rewrite");
        no_extra(&rpath, &rewrite.extra)?;
        let mut r = Map::new();
        if let Some(authority) = &rewrite.authority {
            r.insert("hostname".into(), json!(authority));
        }
        if let Some(uri) = &rewrite.uri {
            let modifier = if prefixed > 0 {
                json!({"type": "ReplacePrefixMatch", "replacePrefixMatch": uri})
            } else {
                json!({"type": "ReplaceFullPath", "replaceFullPath": uri})
            };
            r.insert("path".into(), modifier);
        }
        filters.push(json!({"type": "URLRewrite", "urlRewrite": r}));
    }
    if let Some(mirror) = &http.mirror {
        let mpath = format!("{path}.mirror");
        let (reference, same_port, subset) = destination(namespace, &mpath, mirror)?;
        if subset.is_some() {
            return Err(unsupported(
                format!("{mpath}.subset"),
                "mirroring to a subset is not implemented; mirror to a Service",
            ));
        }
        extra.mirror_same_port = same_port;
        let mut m = Map::new();
        m.insert("backendRef".into(), reference);
        if let Some(percent) = &http.mirror_percentage {
            let ppath = format!("{path}.mirrorPercentage");
            no_extra(&ppath, &percent.extra)?;
            if !(0.0..=100.0).contains(&percent.value) {
                return Err(RouteError::Invalid {
                    path: format!("{ppath}.value"),
                    value: percent.value.to_string(),
                    why: "is not a percentage (0 to 100)".into(),
                });
            }
            // Parts per million: the finest Istio writes is a hundredth of a percent... and finer.
            #[allow(
                clippy::cast_possible_truncation,
                clippy::cast_sign_loss,
                reason = "a percentage checked to be in 0..=100 above, times 10^4, fits a u32"
            )]
            let numerator = (percent.value * 10_000.0).round() as u32;
            m.insert(
                "fraction".into(),
                json!({"numerator": numerator, "denominator": 1_000_000}),
            );
        }
        filters.push(json!({"type": "RequestMirror", "requestMirror": m}));
    } else if http.mirror_percentage.is_some() {
        return Err(unsupported(
            format!("{path}.mirrorPercentage"),
            "is set without mirror",
        ));
    }
    if !filters.is_empty() {
        rule.insert("filters".into(), Value::Array(filters));
    }

    if http.route.len() > limits::BACKEND_REFS {
        return Err(RouteError::too_many(
            format!("{path}.route"),
            limits::BACKEND_REFS,
            http.route.len(),
        ));
    }
    let single = http.route.len() == 1;
    let mut backends = Vec::new();
    for (k, target) in http.route.iter().enumerate() {
        let bpath = format!("{path}.route[{k}]");
        no_extra(&bpath, &target.extra)?;
        let Some(dest) = &target.destination else {
            return Err(unsupported(format!("{bpath}.destination"), "is required"));
        };
        let (reference, same_port, subset) =
            destination(namespace, &format!("{bpath}.destination"), dest)?;
        let mut backend = reference.as_object().cloned().unwrap_or_default();
        // Istio: a lone destination takes all traffic; otherwise an absent weight is 0.
        let weight = match target.weight {
            Some(w) => w,
            None if single => 1,
            None => 0,
        };
        backend.insert("weight".into(), json!(weight));
        if let Some(headers) = &target.headers {
            no_extra(&format!("{bpath}.headers"), &headers.extra)?;
            let mut f = Vec::new();
            if let Some(ops) = &headers.request {
                f.push(json!({"type": "RequestHeaderModifier", "requestHeaderModifier": header_ops(&format!("{bpath}.headers.request"), ops)?}));
            }
            if let Some(ops) = &headers.response {
                f.push(json!({"type": "ResponseHeaderModifier", "responseHeaderModifier": header_ops(&format!("{bpath}.headers.response"), ops)?}));
            }
            backend.insert("filters".into(), Value::Array(f));
        }
        backends.push(Value::Object(backend));
        extra.backends.push((subset, same_port));
    }
    if http.route.is_empty() && http.redirect.is_none() {
        return Err(unsupported(
            format!("{path}.route"),
            "is required unless the rule redirects",
        ));
    }
    if !backends.is_empty() {
        rule.insert("backendRefs".into(), Value::Array(backends));
    }

    let mut timeouts = Map::new();
    let mut request_timeout = None;
    if let Some(timeout) = &http.timeout {
        let d = duration(&format!("{path}.timeout"), timeout)?;
        timeouts.insert("request".into(), json!(gateway_duration(d)));
        request_timeout = Some(d).filter(|d| !d.is_zero());
    }
    if let Some(retries) = &http.retries {
        let (retry, per_try, reset) = policies::retry(&format!("{path}.retries"), retries)?;
        extra.retry_reset = reset;
        // A try cannot outlast the request: Istio lets it be written longer, the model not.
        let per_try = match (per_try, request_timeout) {
            (Some(t), Some(limit)) => Some(t.min(limit)),
            (t, _) => t,
        };
        if let Some(per_try) = per_try.filter(|t| !t.is_zero()) {
            timeouts.insert("backendRequest".into(), json!(gateway_duration(per_try)));
        }
        rule.insert("retry".into(), retry);
    }
    if !timeouts.is_empty() {
        rule.insert("timeouts".into(), Value::Object(timeouts));
    }
    if let Some(fault) = &http.fault {
        extra.fault = Some(policies::fault_policy(&format!("{path}.fault"), fault)?);
    }
    Ok((Value::Object(rule), extra))
}

/// A backend reference (name, namespace, port) for `dest`, whether it goes to the dialled
/// port, and its subset.
fn destination(
    namespace: &str,
    path: &str,
    dest: &Destination,
) -> Result<(Value, bool, Option<String>), RouteError> {
    no_extra(path, &dest.extra)?;
    let Some((ns, name)) = service_of(&dest.host, namespace) else {
        return Err(unsupported(
            format!("{path}.host"),
            format!(
                "{:?} is not a Service of the cluster (short name, <service>.<namespace> or <service>.<namespace>.svc.<domain>)",
                dest.host
            ),
        ));
    };
    let (port, same_port) = match &dest.port {
        Some(p) => {
            no_extra(&format!("{path}.port"), &p.extra)?;
            match p.number {
                Some(n) => (i64::from(n), false),
                None => (PLACEHOLDER_PORT, true),
            }
        }
        None => (PLACEHOLDER_PORT, true),
    };
    if let Some(subset) = &dest.subset
        && (subset.is_empty() || subset.len() > 253)
    {
        return Err(RouteError::Invalid {
            path: format!("{path}.subset"),
            value: crate::l7::route::error::shown(subset),
            why: "is not a subset name".into(),
        });
    }
    Ok((
        json!({"name": name, "namespace": ns, "port": port}),
        same_port,
        dest.subset.clone(),
    ))
}

fn match_request(
    path: &str,
    m: &HttpMatchRequest,
    rewrites_uri: bool,
) -> Result<Value, RouteError> {
    no_extra(path, &m.extra)?;
    if m.port.is_some() {
        return Err(unsupported(
            format!("{path}.port"),
            "matching on the destination port is not implemented by Trellis waypoints; write one VirtualService per Service instead",
        ));
    }
    let mut out = Map::new();
    if let Some(uri) = &m.uri {
        let upath = format!("{path}.uri");
        let (kind, value) = one_of(&upath, uri)?;
        let path_match = match kind {
            Kind::Exact => json!({"type": "Exact", "value": value}),
            Kind::Prefix if rewrites_uri => {
                json!({"type": "PathPrefix", "value": value})
            }
            Kind::Prefix => {
                json!({"type": "RegularExpression", "value": format!("{}.*", regex::escape(value))})
            }
            Kind::Regex => json!({"type": "RegularExpression", "value": value}),
        };
        out.insert("path".into(), path_match);
    }
    if let Some(method) = &m.method {
        let mpath = format!("{path}.method");
        match one_of(&mpath, method)? {
            (Kind::Exact, value) => {
                out.insert("method".into(), json!(value));
            }
            _ => {
                return Err(unsupported(
                    mpath,
                    "only exact method matches are implemented",
                ));
            }
        }
    }
    let values = |field: &str,
                  map: &std::collections::BTreeMap<String, StringMatch>|
     -> Result<Vec<Value>, RouteError> {
        map.iter()
            .map(|(name, sm)| {
                let vpath = format!("{path}.{field}[{name:?}]");
                let empty = sm.exact.is_none() && sm.prefix.is_none() && sm.regex.is_none();
                if empty && field == "headers" {
                    no_extra(&vpath, &sm.extra)?;
                    return Ok(json!({"type": "RegularExpression", "name": name, "value": ".*"}));
                }
                let (kind, value) = one_of(&vpath, sm)?;
                Ok(match kind {
                    Kind::Exact => json!({"type": "Exact", "name": name, "value": value}),
                    Kind::Prefix => json!({"type": "RegularExpression", "name": name, "value": format!("{}.*", regex::escape(value))}),
                    Kind::Regex => json!({"type": "RegularExpression", "name": name, "value": value}),
                })
            })
            .collect()
    };
    let headers = values("headers", &m.headers)?;
    if !headers.is_empty() {
        out.insert("headers".into(), Value::Array(headers));
    }
    let query = values("queryParams", &m.query_params)?;
    if !query.is_empty() {
        out.insert("queryParams".into(), Value::Array(query));
    }
    Ok(Value::Object(out))
}

enum Kind {
    Exact,
    Prefix,
    Regex,
}

fn one_of<'a>(path: &str, m: &'a StringMatch) -> Result<(Kind, &'a str), RouteError> {
    no_extra(path, &m.extra)?;
    match (&m.exact, &m.prefix, &m.regex) {
        (Some(v), None, None) => Ok((Kind::Exact, v)),
        (None, Some(v), None) => Ok((Kind::Prefix, v)),
        (None, None, Some(v)) => Ok((Kind::Regex, v)),
        _ => Err(unsupported(
            path,
            "must set exactly one of exact, prefix and regex",
        )),
    }
}

fn header_ops(path: &str, ops: &HeaderOperations) -> Result<Value, RouteError> {
    no_extra(path, &ops.extra)?;
    let pairs = |m: &std::collections::BTreeMap<String, String>| -> Vec<Value> {
        m.iter()
            .map(|(name, value)| json!({"name": name, "value": value}))
            .collect()
    };
    Ok(json!({"set": pairs(&ops.set), "add": pairs(&ops.add), "remove": ops.remove}))
}
