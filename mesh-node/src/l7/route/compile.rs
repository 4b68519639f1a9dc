//! Conversion of a route as written into the [`model`](super::model), checking everything the
//! Gateway API's CRD schema and CEL rules check (the manifest directory source has no API
//! server to do it) plus this implementation's own limits ([`super::limits`]).
//!
//! [`compile`] never fails: the result carries either the programmed [`Route`] or the
//! [`RouteError`] naming the first offending field, and in both cases what the status needs
//! (the parents as written, the backend references).
//!
//! - [`values`]: grammars of single values (hostnames, header names, paths, regexes, ports).
//! - [`matches`]: `matches` of both kinds.
//! - [`filters`]: `filters` of rules and backends.

mod filters;
mod matches;
mod values;

use std::sync::Arc;

use serde::Deserialize;

use super::{
    RouteId, RouteKind,
    duration::parse as parse_duration,
    error::RouteError,
    limits,
    model::{Backend, BackendSlot, InvalidBackend, RefProblem, Retry, Route, Rule, Timeouts},
    spec::{
        BackendObjectReference, BackendRef, GrpcRouteRule, GrpcRouteSpec, HttpRouteRetry,
        HttpRouteRule, HttpRouteSpec, HttpRouteTimeouts, ParentReference, ParentRefsOnly,
        RouteFilter,
    },
};

/// The port of the waypoint's only listener (HBONE).
pub const WAYPOINT_PORT: u16 = 15008;

/// A route after conversion, programmed or not.
#[derive(Debug, Clone)]
pub struct CompiledRoute {
    pub id: RouteId,
    pub generation: Option<i64>,
    /// The first [`limits::PARENT_REFS`] parent references, as written and as understood.
    pub parents: Vec<Parent>,
    /// Every backend reference (backends and mirrors); `None` when the spec could not be read.
    pub refs: Option<Vec<RefCheck>>,
    /// The route to program, or why it is not programmed.
    pub outcome: Result<Arc<Route>, RouteError>,
}

impl CompiledRoute {
    pub fn route(&self) -> Option<&Arc<Route>> {
        self.outcome.as_ref().ok()
    }
}

/// A parent reference as written and as this implementation understands it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parent {
    /// Echoed in `status.parents[].parentRef`.
    pub written: ParentReference,
    /// `None`: a kind this implementation does not serve (another controller's parent).
    pub kind: Option<ParentKind>,
    pub namespace: String,
    pub name: String,
    pub port: Option<u16>,
    /// Recognised, but the route will not attach to it.
    pub refusal: Option<Refusal>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParentKind {
    /// A core `Service`: the route applies to requests for that Service.
    Service,
    /// A Gateway (`gateway.networking.k8s.io`): the route applies to requests through that
    /// waypoint, if it is one.
    Gateway,
}

/// Why a route does not attach to a parent it names: the `Accepted: False` reason and message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub reason: &'static str,
    pub message: String,
}

/// One backend reference, for `ResolvedRefs`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefCheck {
    /// Where it is written (`spec.rules[0].backendRefs[1]`).
    pub path: String,
    pub namespace: String,
    pub name: String,
    /// `None`: a Service in the route's namespace, which must also exist.
    pub problem: Option<RefProblem>,
}

/// Converts a route. See the module documentation.
pub fn compile(
    kind: RouteKind,
    namespace: &str,
    name: &str,
    generation: Option<i64>,
    spec: &serde_json::Value,
) -> CompiledRoute {
    let id = RouteId {
        kind,
        namespace: namespace.into(),
        name: name.into(),
    };
    // An absent spec reads like an empty one, as the API server would default it.
    let empty = serde_json::Value::Object(serde_json::Map::new());
    let spec = if spec.is_null() { &empty } else { spec };
    // Read on their own, so that even an unreadable spec is reported on its parents.
    let written_parents = ParentRefsOnly::deserialize(spec)
        .map(|p| p.parent_refs)
        .unwrap_or_default();
    let parents = written_parents
        .iter()
        .take(limits::PARENT_REFS)
        .map(|p| parent(p, namespace))
        .collect();
    let (refs, outcome) = if namespace.is_empty() {
        (None, Err(RouteError::MissingMetadata("namespace")))
    } else if name.is_empty() {
        (None, Err(RouteError::MissingMetadata("name")))
    } else {
        let mut ctx = Ctx {
            namespace,
            regexes: 0,
        };
        match kind {
            // A VirtualService arrives here already translated to an HTTPRoute's shape.
            RouteKind::Http | RouteKind::Virtual => match HttpRouteSpec::deserialize(spec) {
                Ok(spec) => (
                    Some(ref_checks(
                        namespace,
                        spec.rules.iter().map(|r| (&r.filters, &r.backend_refs)),
                    )),
                    http_route(&mut ctx, &id, generation, &spec),
                ),
                Err(e) => (None, Err(RouteError::unreadable(e))),
            },
            RouteKind::Grpc => match GrpcRouteSpec::deserialize(spec) {
                Ok(spec) => (
                    Some(ref_checks(
                        namespace,
                        spec.rules.iter().map(|r| (&r.filters, &r.backend_refs)),
                    )),
                    grpc_route(&mut ctx, &id, generation, &spec),
                ),
                Err(e) => (None, Err(RouteError::unreadable(e))),
            },
        }
    };
    let outcome = match outcome {
        Ok(_) if written_parents.len() > limits::PARENT_REFS => Err(RouteError::too_many(
            "spec.parentRefs",
            limits::PARENT_REFS,
            written_parents.len(),
        )),
        other => other.map(Arc::new),
    };
    CompiledRoute {
        id,
        generation,
        parents,
        refs,
        outcome,
    }
}

/// State shared while converting one route.
pub(super) struct Ctx<'a> {
    /// The route's namespace: the default of every reference, and the only one permitted.
    pub namespace: &'a str,
    /// Regular expressions compiled so far ([`limits::REGEXES_PER_ROUTE`]).
    pub regexes: usize,
}

fn http_route(
    ctx: &mut Ctx<'_>,
    id: &RouteId,
    generation: Option<i64>,
    spec: &HttpRouteSpec,
) -> Result<Route, RouteError> {
    check_rule_counts(spec.rules.len(), spec.rules.iter().map(|r| r.matches.len()))?;
    let hostnames = values::hostnames(&spec.hostnames)?;
    let rules = spec
        .rules
        .iter()
        .enumerate()
        .map(|(i, rule)| http_rule(ctx, &format!("spec.rules[{i}]"), rule))
        .collect::<Result<_, _>>()?;
    Ok(Route {
        id: id.clone(),
        generation,
        hostnames,
        rules,
    })
}

fn grpc_route(
    ctx: &mut Ctx<'_>,
    id: &RouteId,
    generation: Option<i64>,
    spec: &GrpcRouteSpec,
) -> Result<Route, RouteError> {
    check_rule_counts(spec.rules.len(), spec.rules.iter().map(|r| r.matches.len()))?;
    let hostnames = values::hostnames(&spec.hostnames)?;
    let rules = spec
        .rules
        .iter()
        .enumerate()
        .map(|(i, rule)| grpc_rule(ctx, &format!("spec.rules[{i}]"), rule))
        .collect::<Result<_, _>>()?;
    Ok(Route {
        id: id.clone(),
        generation,
        hostnames,
        rules,
    })
}

fn check_rule_counts(rules: usize, matches: impl Iterator<Item = usize>) -> Result<(), RouteError> {
    if rules > limits::RULES {
        return Err(RouteError::too_many("spec.rules", limits::RULES, rules));
    }
    let total: usize = matches.sum();
    if total > limits::MATCHES_PER_ROUTE {
        return Err(RouteError::too_many(
            "spec.rules[*].matches (all rules together)",
            limits::MATCHES_PER_ROUTE,
            total,
        ));
    }
    Ok(())
}

fn http_rule(ctx: &mut Ctx<'_>, path: &str, rule: &HttpRouteRule) -> Result<Rule, RouteError> {
    let name = rule_name(path, rule.name.as_deref())?;
    let matches = matches::http(ctx, path, &rule.matches)?;
    let filters = filters::filters(
        ctx,
        RouteKind::Http,
        &format!("{path}.filters"),
        &rule.filters,
    )?;
    let backends = backends(ctx, RouteKind::Http, path, &rule.backend_refs)?;
    filters::check_rule(path, &matches, &filters, &backends)?;
    Ok(Rule {
        name,
        matches,
        filters,
        backends,
        timeouts: timeouts(path, rule.timeouts.as_ref())?,
        retry: rule.retry.as_ref().map(|r| retry(path, r)).transpose()?,
        fault: None,
    })
}

fn grpc_rule(ctx: &mut Ctx<'_>, path: &str, rule: &GrpcRouteRule) -> Result<Rule, RouteError> {
    let name = rule_name(path, rule.name.as_deref())?;
    let matches = matches::grpc(ctx, path, &rule.matches)?;
    let filters = filters::filters(
        ctx,
        RouteKind::Grpc,
        &format!("{path}.filters"),
        &rule.filters,
    )?;
    let backends = backends(ctx, RouteKind::Grpc, path, &rule.backend_refs)?;
    filters::check_rule(path, &matches, &filters, &backends)?;
    Ok(Rule {
        name,
        matches,
        filters,
        backends,
        timeouts: Timeouts::default(),
        retry: None,
        fault: None,
    })
}

/// Rule names appear in logs and metrics: they must be section names (DNS subdomains).
fn rule_name(path: &str, name: Option<&str>) -> Result<Option<String>, RouteError> {
    match name {
        None => Ok(None),
        Some(name) if values::is_dns_subdomain(name) => Ok(Some(name.into())),
        Some(name) => Err(RouteError::invalid(
            format!("{path}.name"),
            name,
            "is not a valid rule name (lowercase letters, digits, '-' and '.')",
        )),
    }
}

fn backends(
    ctx: &mut Ctx<'_>,
    kind: RouteKind,
    path: &str,
    refs: &[BackendRef],
) -> Result<Vec<BackendSlot>, RouteError> {
    if refs.len() > limits::BACKEND_REFS {
        return Err(RouteError::too_many(
            format!("{path}.backendRefs"),
            limits::BACKEND_REFS,
            refs.len(),
        ));
    }
    refs.iter()
        .enumerate()
        .map(|(i, r)| {
            let path = format!("{path}.backendRefs[{i}]");
            let weight = match r.weight {
                None => 1,
                Some(w) => u32::try_from(w)
                    .ok()
                    .filter(|w| *w <= limits::WEIGHT)
                    .ok_or_else(|| {
                        RouteError::invalid(
                            format!("{path}.weight"),
                            &w.to_string(),
                            format!("is not a weight (0-{})", limits::WEIGHT),
                        )
                    })?,
            };
            let filters = filters::filters(ctx, kind, &format!("{path}.filters"), &r.filters)?;
            Ok(match resolve(ctx.namespace, &path, &r.object)? {
                Resolved::Service {
                    namespace,
                    name,
                    port,
                } => BackendSlot::Usable(Box::new(Backend {
                    namespace,
                    name,
                    port,
                    subset: None,
                    weight,
                    filters,
                })),
                Resolved::Problem { reference, problem } => BackendSlot::Invalid(InvalidBackend {
                    reference,
                    problem,
                    weight,
                }),
            })
        })
        .collect()
}

/// A backend reference, resolved as far as the route alone allows.
pub(super) enum Resolved {
    Service {
        namespace: String,
        name: String,
        port: u16,
    },
    Problem {
        reference: String,
        problem: RefProblem,
    },
}

/// Classifies a reference: `(namespace, problem)`.
fn classify(
    route_namespace: &str,
    object: &BackendObjectReference,
) -> (String, Option<RefProblem>) {
    let namespace = object
        .namespace
        .clone()
        .unwrap_or_else(|| route_namespace.into());
    let core = matches!(object.group.as_deref(), None | Some("" | "core"));
    let service = matches!(object.kind.as_deref(), None | Some("Service"));
    let problem = if !(core && service) {
        Some(RefProblem::InvalidKind)
    } else if namespace != route_namespace {
        Some(RefProblem::RefNotPermitted)
    } else {
        None
    };
    (namespace, problem)
}

pub(super) fn resolve(
    route_namespace: &str,
    path: &str,
    object: &BackendObjectReference,
) -> Result<Resolved, RouteError> {
    if object.name.is_empty() {
        return Err(RouteError::unsupported(
            format!("{path}.name"),
            "is required",
        ));
    }
    let (namespace, problem) = classify(route_namespace, object);
    if let Some(problem) = problem {
        let kind = object.kind.as_deref().unwrap_or("Service");
        let reference = match object.group.as_deref() {
            None | Some("") => format!("{kind} {namespace}/{}", object.name),
            Some(group) => format!("{group}/{kind} {namespace}/{}", object.name),
        };
        return Ok(Resolved::Problem { reference, problem });
    }
    let port = match object.port {
        None => {
            return Err(RouteError::unsupported(
                format!("{path}.port"),
                "is required for a Service backend",
            ));
        }
        Some(port) => values::port(&format!("{path}.port"), port)?,
    };
    Ok(Resolved::Service {
        namespace,
        name: object.name.clone(),
        port,
    })
}

/// Every backend and mirror reference of the rules, for `ResolvedRefs`; computed from the
/// spec as written, so that it is available even when the route is rejected.
fn ref_checks<'a>(
    namespace: &str,
    rules: impl Iterator<Item = (&'a Vec<RouteFilter>, &'a Vec<BackendRef>)>,
) -> Vec<RefCheck> {
    fn mirrors(namespace: &str, path: &str, filters: &[RouteFilter], out: &mut Vec<RefCheck>) {
        for (i, filter) in filters.iter().enumerate().take(limits::FILTERS) {
            if let Some(mirror) = &filter.request_mirror {
                out.push(check(
                    namespace,
                    format!("{path}.filters[{i}].requestMirror.backendRef"),
                    &mirror.backend_ref,
                ));
            }
        }
    }
    fn check(namespace: &str, path: String, object: &BackendObjectReference) -> RefCheck {
        let (ns, problem) = classify(namespace, object);
        RefCheck {
            path,
            namespace: ns,
            name: object.name.clone(),
            problem,
        }
    }
    let mut out = Vec::new();
    for (r, (filters, backends)) in rules.enumerate().take(limits::RULES) {
        let path = format!("spec.rules[{r}]");
        mirrors(namespace, &path, filters, &mut out);
        for (b, backend) in backends.iter().enumerate().take(limits::BACKEND_REFS) {
            let path = format!("{path}.backendRefs[{b}]");
            out.push(check(namespace, path.clone(), &backend.object));
            mirrors(namespace, &path, &backend.filters, &mut out);
        }
    }
    out
}

fn timeouts(path: &str, timeouts: Option<&HttpRouteTimeouts>) -> Result<Timeouts, RouteError> {
    let Some(t) = timeouts else {
        return Ok(Timeouts::default());
    };
    let parse = |field: &str, value: Option<&String>| {
        value
            .map(|v| {
                parse_duration(v).map_err(|e| {
                    RouteError::invalid(
                        format!("{path}.timeouts.{field}"),
                        v,
                        format!("is not a duration: it {e}"),
                    )
                })
            })
            .transpose()
    };
    let request = parse("request", t.request.as_ref())?;
    let backend_request = parse("backendRequest", t.backend_request.as_ref())?;
    if let (Some(request), Some(backend)) = (request, backend_request)
        && !request.is_zero()
        && backend > request
    {
        return Err(RouteError::unsupported(
            format!("{path}.timeouts.backendRequest"),
            "cannot be longer than the request timeout",
        ));
    }
    // Zero disables the timeout.
    Ok(Timeouts {
        request: request.filter(|d| !d.is_zero()),
        backend_request: backend_request.filter(|d| !d.is_zero()),
    })
}

fn retry(path: &str, retry: &HttpRouteRetry) -> Result<Retry, RouteError> {
    let path = format!("{path}.retry");
    if retry.codes.len() > limits::RETRY_CODES {
        return Err(RouteError::too_many(
            format!("{path}.codes"),
            limits::RETRY_CODES,
            retry.codes.len(),
        ));
    }
    let codes = retry
        .codes
        .iter()
        .map(|&code| {
            u16::try_from(code)
                .ok()
                .filter(|c| (400..=599).contains(c))
                .and_then(|c| http::StatusCode::from_u16(c).ok())
                .ok_or_else(|| {
                    RouteError::invalid(
                        format!("{path}.codes"),
                        &code.to_string(),
                        "is not a status code from 400 to 599",
                    )
                })
        })
        .collect::<Result<_, _>>()?;
    let attempts = retry
        .attempts
        .map(|a| {
            u32::try_from(a).map_err(|_| {
                RouteError::invalid(
                    format!("{path}.attempts"),
                    &a.to_string(),
                    "is not a number of attempts",
                )
            })
        })
        .transpose()?;
    let backoff = retry
        .backoff
        .as_ref()
        .map(|b| {
            parse_duration(b).map_err(|e| {
                RouteError::invalid(
                    format!("{path}.backoff"),
                    b,
                    format!("is not a duration: it {e}"),
                )
            })
        })
        .transpose()?;
    Ok(Retry {
        codes,
        attempts,
        backoff,
        reset: false,
    })
}

/// How one parent reference is understood. See the module documentation of
/// [`super`] for why attachment is limited to the parent's own namespace.
fn parent(written: &ParentReference, route_namespace: &str) -> Parent {
    let group = written.group.as_deref().unwrap_or(RouteKind::GROUP);
    let kind_name = written.kind.as_deref().unwrap_or("Gateway");
    let kind = match (group, kind_name) {
        ("" | "core", "Service") => Some(ParentKind::Service),
        (RouteKind::GROUP, "Gateway") => Some(ParentKind::Gateway),
        _ => None,
    };
    let namespace = written
        .namespace
        .clone()
        .unwrap_or_else(|| route_namespace.into());
    let mut refusal = None;
    let port = match written
        .port
        .map(|p| values::port("parentRef.port", p))
        .transpose()
    {
        Ok(port) => port,
        Err(e) => {
            refusal = Some(Refusal {
                reason: "UnsupportedValue",
                message: e.to_string(),
            });
            None
        }
    };
    let refuse = |reason: &'static str, message: &str| {
        Some(Refusal {
            reason,
            message: message.into(),
        })
    };
    if refusal.is_none() {
        refusal = match kind {
            _ if written.name.is_empty() => {
                refuse("UnsupportedValue", "parentRef.name is required")
            }
            Some(ParentKind::Service) if namespace != route_namespace => refuse(
                "UnsupportedValue",
                "routes for a Service in another namespace (consumer routes) are not supported; create the route in the Service's namespace",
            ),
            Some(ParentKind::Service) if written.section_name.is_some() => refuse(
                "UnsupportedValue",
                "sectionName (a Service port name) is not supported on Service parents; use port",
            ),
            Some(ParentKind::Gateway) if namespace != route_namespace => refuse(
                "NotAllowedByListeners",
                "a waypoint accepts routes from its own namespace only",
            ),
            Some(ParentKind::Gateway) if port.is_some_and(|p| p != WAYPOINT_PORT) => refuse(
                "NoMatchingParent",
                "a waypoint has one listener, on port 15008",
            ),
            _ => None,
        };
    }
    Parent {
        written: written.clone(),
        kind,
        namespace,
        name: written.name.clone(),
        port,
        refusal,
    }
}
