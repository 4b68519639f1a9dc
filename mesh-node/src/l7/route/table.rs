//! The routing table: which rule of which route a request takes.
//!
//! For a request through waypoint `gw` to Service `svc`:
//!
//! 1. Routes attached to `svc` (a Service parent naming it, with no port or `svc`'s port)
//!    apply, if there is any. Their hostnames are ignored (mesh profile).
//! 2. Otherwise routes attached to `gw` whose hostnames match the request's host (or that
//!    have none) apply.
//! 3. Otherwise the request is not routed ([`Routing::NotRouted`]): the caller forwards it to
//!    `svc` unchanged. When routes apply but none of their rules matches, the answer is
//!    [`Routing::NoMatch`] (a 404).
//!
//! Among the matches of the applicable routes, the first in this order wins: `GRPCRoute`
//! before `HTTPRoute` (a `GRPCRoute` match only takes gRPC requests); for Gateway parents the
//! more specific hostname ([`HostRank`]); the match precedence of the Gateway API (exact path,
//! then regular expression, then the longest prefix; a method; more header matches; more
//! query matches; for gRPC the longer service, then method, then more header matches); then
//! `namespace/name` order of the routes (creation timestamps do not reach the waypoint), rule
//! order and match order. The order is computed once per table, so a lookup is a scan that
//! stops at the first match that nothing later can beat.

use std::{collections::HashMap, fmt, sync::Arc};

use http::{request, response};

use super::{
    CompiledRoute, RouteId, RouteKind,
    compile::ParentKind,
    filters::RequestAction,
    matching::{HostRank, RequestView, host_rank},
    model::{
        Backend, BackendSlot, InvalidBackend, Matches, Mirror, PathMatch, Retry, Route, Rule,
        StringMatch, Timeouts, scale,
    },
};

/// The waypoint a request came through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GatewayRef<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
}

/// The Service a request was sent to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServiceRef<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
    pub port: u16,
}

/// The answer of [`RouteTable::lookup`].
#[derive(Debug)]
pub enum Routing<'a> {
    /// This rule applies.
    Matched(MatchedRule<'a>),
    /// Routes apply to the request but none of their rules matches: answer 404.
    NoMatch,
    /// No route applies: forward to the original Service unchanged.
    NotRouted,
}

/// All programmed routes, indexed by parent. Immutable: build a new one when routes change.
#[derive(Debug, Default)]
pub struct RouteTable {
    /// In `RouteId` order: the order in which ties between routes are broken.
    routes: Vec<Arc<Route>>,
    /// Namespace, then name.
    services: HashMap<String, HashMap<String, Attached>>,
    gateways: HashMap<String, HashMap<String, Attached>>,
}

/// The routes attached to one parent and their matches in precedence order.
#[derive(Debug, Default)]
struct Attached {
    routes: Vec<AttachedRoute>,
    entries: Vec<Entry>,
}

#[derive(Debug)]
struct AttachedRoute {
    /// Index into [`RouteTable::routes`].
    route: usize,
    /// Service ports the route is attached for; `None`: all.
    ports: Option<Vec<u16>>,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    /// Index into [`Attached::routes`].
    local: usize,
    rule: usize,
    index: usize,
    kind: RouteKind,
}

/// Precedence of one match within its kind: larger is more specific.
type Specificity = [usize; 5];

fn specificity(rule: &Rule, index: usize) -> Specificity {
    let string = |m: Option<&StringMatch>| match m {
        Some(StringMatch::Exact(s)) => (2, s.len()),
        Some(StringMatch::Regex(re)) => (1, re.as_str().len()),
        None => (0, 0),
    };
    match &rule.matches {
        Matches::Http(matches) => matches.get(index).map_or([0; 5], |m| {
            let (tier, len) = match &m.path {
                PathMatch::Exact(p) => (3, p.len()),
                PathMatch::Regex(re) => (2, re.as_str().len()),
                PathMatch::Prefix { written, .. } => (1, *written),
            };
            [
                tier,
                len,
                usize::from(m.method.is_some()),
                m.headers.len(),
                m.query.len(),
            ]
        }),
        Matches::Grpc(matches) => matches.get(index).map_or([0; 5], |m| {
            let (service_tier, service_len) = string(m.service.as_ref());
            let (method_tier, method_len) = string(m.method.as_ref());
            [
                service_tier,
                service_len,
                method_tier,
                method_len,
                m.headers.len(),
            ]
        }),
    }
}

impl RouteTable {
    /// Builds the table from converted routes; routes that are not programmed are left out,
    /// and of several with the same kind, namespace and name the last one counts.
    pub fn new(routes: impl IntoIterator<Item = CompiledRoute>) -> Self {
        let by_id: std::collections::BTreeMap<RouteId, CompiledRoute> =
            routes.into_iter().map(|r| (r.id.clone(), r)).collect();
        let mut table = Self::default();
        for compiled in by_id.into_values() {
            let Ok(route) = compiled.outcome else {
                continue;
            };
            let index = table.routes.len();
            table.routes.push(route);
            for parent in compiled.parents.iter().filter(|p| p.refusal.is_none()) {
                let (map, port) = match parent.kind {
                    Some(ParentKind::Service) => (&mut table.services, parent.port),
                    Some(ParentKind::Gateway) => (&mut table.gateways, None),
                    None => continue,
                };
                let attached = map
                    .entry(parent.namespace.clone())
                    .or_default()
                    .entry(parent.name.clone())
                    .or_default();
                match attached.routes.iter_mut().find(|r| r.route == index) {
                    Some(existing) => match (&mut existing.ports, port) {
                        (Some(ports), Some(port)) => ports.push(port),
                        (ports, _) => *ports = None,
                    },
                    None => attached.routes.push(AttachedRoute {
                        route: index,
                        ports: port.map(|p| vec![p]),
                    }),
                }
            }
        }
        let routes = &table.routes;
        for attached in table
            .services
            .values_mut()
            .chain(table.gateways.values_mut())
            .flat_map(HashMap::values_mut)
        {
            attached.sort_entries(routes);
        }
        table
    }

    /// Number of programmed routes.
    pub fn len(&self) -> usize {
        self.routes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    /// The rule a request takes. See the module documentation for the order.
    pub fn lookup<'t>(
        &'t self,
        gateway: &GatewayRef<'_>,
        service: &ServiceRef<'_>,
        request: &request::Parts,
    ) -> Routing<'t> {
        let view = RequestView::new(request);
        if let Some(attached) = find(&self.services, service.namespace, service.name) {
            let ranks: Vec<Option<HostRank>> = attached
                .routes
                .iter()
                .map(|r| {
                    r.ports
                        .as_ref()
                        .is_none_or(|ports| ports.contains(&service.port))
                        .then_some(HostRank::ANY)
                })
                .collect();
            if ranks.iter().any(Option::is_some) {
                return self.best(attached, &ranks, &view);
            }
        }
        if let Some(attached) = find(&self.gateways, gateway.namespace, gateway.name) {
            let ranks: Vec<Option<HostRank>> = attached
                .routes
                .iter()
                .map(|r| host_rank(&self.routes[r.route].hostnames, view.host.as_deref()))
                .collect();
            if ranks.iter().any(Option::is_some) {
                return self.best(attached, &ranks, &view);
            }
        }
        Routing::NotRouted
    }

    /// The first matching entry that no later entry can beat: entries are in precedence
    /// order within a kind, and a host rank only ever improves on an earlier match.
    fn best<'t>(
        &'t self,
        attached: &Attached,
        ranks: &[Option<HostRank>],
        view: &RequestView<'_>,
    ) -> Routing<'t> {
        let top = ranks.iter().flatten().max().copied();
        let mut best: Option<(HostRank, Entry)> = None;
        for entry in &attached.entries {
            if let Some((rank, found)) = best
                && (found.kind != entry.kind || Some(rank) == top)
            {
                break;
            }
            let Some(rank) = ranks.get(entry.local).copied().flatten() else {
                continue;
            };
            if best.is_some_and(|(found, _)| rank <= found) {
                continue;
            }
            let route = &self.routes[attached.routes[entry.local].route];
            let Some(rule) = route.rules.get(entry.rule) else {
                continue;
            };
            let matched = match &rule.matches {
                Matches::Http(m) => m.get(entry.index).is_some_and(|m| m.matches(view)),
                Matches::Grpc(m) => m.get(entry.index).is_some_and(|m| m.matches(view)),
            };
            if matched {
                best = Some((rank, *entry));
            }
        }
        let Some((_, entry)) = best else {
            return Routing::NoMatch;
        };
        let route = &self.routes[attached.routes[entry.local].route];
        match route.rules.get(entry.rule) {
            Some(rule) => Routing::Matched(MatchedRule {
                route,
                rule,
                rule_index: entry.rule,
                prefix: rule.matches.prefix(entry.index),
            }),
            None => Routing::NoMatch,
        }
    }
}

fn find<'m>(
    map: &'m HashMap<String, HashMap<String, Attached>>,
    namespace: &str,
    name: &str,
) -> Option<&'m Attached> {
    map.get(namespace)?.get(name)
}

impl Attached {
    fn sort_entries(&mut self, routes: &[Arc<Route>]) {
        let mut keyed = Vec::new();
        for (local, attached) in self.routes.iter().enumerate() {
            let route = &routes[attached.route];
            for (rule_index, rule) in route.rules.iter().enumerate() {
                for index in 0..rule.matches.len() {
                    let entry = Entry {
                        local,
                        rule: rule_index,
                        index,
                        kind: route.id.kind,
                    };
                    // gRPC first; then the most specific match; then route, rule and match
                    // order.
                    // A VirtualService's rules keep their written order (Istio's first
                    // match), so they all rank alike.
                    let (kind_order, specificity) = match route.id.kind {
                        RouteKind::Grpc => (0, specificity(rule, index)),
                        RouteKind::Http => (1, specificity(rule, index)),
                        RouteKind::Virtual => (2, [0; 5]),
                    };
                    let key = (
                        kind_order,
                        std::cmp::Reverse(specificity),
                        attached.route,
                        rule_index,
                        index,
                    );
                    keyed.push((key, entry));
                }
            }
        }
        keyed.sort_by_key(|(key, _)| *key);
        self.entries = keyed.into_iter().map(|(_, e)| e).collect();
    }
}

/// The rule a request matched, and everything needed to serve it.
#[derive(Debug, Clone, Copy)]
pub struct MatchedRule<'a> {
    route: &'a Route,
    rule: &'a Rule,
    rule_index: usize,
    /// The matched `PathPrefix` (without trailing `/`), for `ReplacePrefixMatch`.
    prefix: Option<&'a str>,
}

/// Which rule matched, for logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RuleId<'a> {
    pub route: &'a RouteId,
    /// Position in `spec.rules`.
    pub index: usize,
    pub name: Option<&'a str>,
}

impl fmt::Display for RuleId<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} rule {}", self.route, self.index)?;
        if let Some(name) = self.name {
            write!(f, " ({name})")?;
        }
        Ok(())
    }
}

/// Why no backend takes a request: answer 500 (for a `GRPCRoute`, the specification asks for
/// gRPC status `UNAVAILABLE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoBackend<'a> {
    /// The rule has no backends (and no redirect).
    None,
    /// Every backend has weight 0.
    ZeroWeights,
    /// The pick fell on a reference that does not resolve.
    Invalid(&'a InvalidBackend),
}

impl fmt::Display for NoBackend<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::None => f.write_str("the rule has no backendRefs"),
            Self::ZeroWeights => f.write_str("every backend of the rule has weight 0"),
            Self::Invalid(b) => write!(f, "backend {} is not usable: {}", b.reference, b.problem),
        }
    }
}

impl<'a> MatchedRule<'a> {
    pub fn route(&self) -> &'a Route {
        self.route
    }

    pub fn id(&self) -> RuleId<'a> {
        RuleId {
            route: &self.route.id,
            index: self.rule_index,
            name: self.rule.name.as_deref(),
        }
    }

    /// Applies the rule's request filters (header changes, rewrite) and says whether to
    /// forward, redirect or fail. Call before [`Self::pick_backend`].
    pub fn apply_request_filters(&self, parts: &mut request::Parts) -> RequestAction {
        self.rule.filters.apply_request(parts, self.prefix)
    }

    /// Picks a backend by weight, given a uniformly random number. References that do not
    /// resolve keep their share of the traffic, which gets a 500 ([`NoBackend::Invalid`]),
    /// as the specification requires.
    pub fn pick_backend(&self, random: u64) -> Result<&'a Backend, NoBackend<'a>> {
        let backends = &self.rule.backends;
        if backends.is_empty() {
            return Err(NoBackend::None);
        }
        let total: u64 = backends.iter().map(|b| u64::from(b.weight())).sum();
        if total == 0 {
            return Err(NoBackend::ZeroWeights);
        }
        let mut point = scale(random, total);
        for slot in backends {
            let weight = u64::from(slot.weight());
            if point < weight {
                return match slot {
                    BackendSlot::Usable(b) => Ok(&**b),
                    BackendSlot::Invalid(b) => Err(NoBackend::Invalid(b)),
                };
            }
            point -= weight;
        }
        Err(NoBackend::ZeroWeights)
    }

    /// Applies the picked backend's own request filters, after the rule's.
    pub fn apply_backend_request_filters(
        &self,
        backend: &Backend,
        parts: &mut request::Parts,
    ) -> RequestAction {
        backend.filters.apply_request(parts, self.prefix)
    }

    /// The mirrors of the rule and of the picked backend; decide each with
    /// [`Mirror::selected`] and its own random number.
    pub fn mirrors(&self, backend: Option<&'a Backend>) -> impl Iterator<Item = &'a Mirror> {
        self.rule
            .filters
            .mirrors
            .iter()
            .chain(backend.into_iter().flat_map(|b| b.filters.mirrors.iter()))
    }

    /// Applies the response header filters of the rule, then of the backend (if one served
    /// the response), so the backend's win.
    pub fn apply_response_filters(&self, backend: Option<&Backend>, parts: &mut response::Parts) {
        self.rule.filters.apply_response(parts);
        if let Some(backend) = backend {
            backend.filters.apply_response(parts);
        }
    }

    pub fn timeouts(&self) -> Timeouts {
        self.rule.timeouts
    }

    /// The rule's own faults (a VirtualService's `fault`).
    pub fn fault(&self) -> Option<&'a crate::l7::resilience::fault::FaultPolicy> {
        self.rule.fault.as_ref()
    }

    pub fn retry(&self) -> Option<&'a Retry> {
        self.rule.retry.as_ref()
    }
}
