//! Properties, over small random policy sets and every flow of a small universe: what the
//! engine decides never depends on how its index finds policies, and what cannot be evaluated
//! never allows more.

use std::{collections::BTreeMap, net::IpAddr};

use proptest::{collection::vec, prelude::*, sample};

use super::ROOT;
use crate::{
    identity::Identity,
    k8s::policy::{self as crd, AuthorizationPolicy, AuthorizationPolicySpec},
    policy::{
        engine::Engine,
        facts::{Destination, Flow},
        matching::Truth,
        model::{Action, AuthzPolicy, PortHint},
    },
};

const PRINCIPALS: &[&str] = &[
    "cluster.local/ns/a/sa/x",
    "cluster.local/ns/b/sa/y",
    "*",
    "cluster.local/ns/a/sa/.*",
];
const NAMESPACES: &[&str] = &["a", "b", "*", "a*"];
const BLOCKS: &[&str] = &["10.0.0.0/16", "10.1.0.1", "192.168.0.0/24"];
const PORTS: &[&str] = &["80", "443", "8080"];

fn values(pool: &'static [&'static str]) -> impl Strategy<Value = Vec<String>> {
    sample::subsequence(pool, 0..=2).prop_map(|v| v.into_iter().map(String::from).collect())
}

fn source() -> impl Strategy<Value = crd::RuleFrom> {
    (
        values(PRINCIPALS),
        values(PRINCIPALS),
        values(NAMESPACES),
        values(NAMESPACES),
        values(BLOCKS),
        values(BLOCKS),
        prop::bool::weighted(0.1),
    )
        .prop_map(|(p, np, n, nn, ip, nip, jwt)| crd::RuleFrom {
            source: Some(crd::Source {
                principals: p,
                not_principals: np,
                namespaces: n,
                not_namespaces: nn,
                ip_blocks: ip,
                not_ip_blocks: nip,
                request_principals: if jwt { vec!["iss/sub".into()] } else { vec![] },
                ..crd::Source::default()
            }),
            ..crd::RuleFrom::default()
        })
}

fn operation() -> impl Strategy<Value = crd::RuleTo> {
    (values(PORTS), values(PORTS), prop::bool::weighted(0.1)).prop_map(|(p, np, http)| {
        crd::RuleTo {
            operation: Some(crd::Operation {
                ports: p,
                not_ports: np,
                methods: if http { vec!["GET".into()] } else { vec![] },
                ..crd::Operation::default()
            }),
            ..crd::RuleTo::default()
        }
    })
}

fn rule() -> impl Strategy<Value = crd::Rule> {
    (vec(source(), 0..3), vec(operation(), 0..3)).prop_map(|(from, to)| crd::Rule {
        from,
        to,
        ..crd::Rule::default()
    })
}

fn policy(action: &'static [&'static str]) -> impl Strategy<Value = AuthorizationPolicy> {
    (
        sample::select(&["a", "b", ROOT][..]),
        sample::select(&[None, Some("p"), Some("q")][..]),
        sample::select(action),
        vec(rule(), 0..4),
    )
        .prop_map(|(namespace, app, action, rules)| {
            let mut obj = AuthorizationPolicy::new(
                "generated",
                AuthorizationPolicySpec {
                    selector: app.map(|app| crd::WorkloadSelector {
                        match_labels: BTreeMap::from([("app".into(), app.into())]),
                        ..crd::WorkloadSelector::default()
                    }),
                    action: Some(action.into()),
                    rules,
                    ..AuthorizationPolicySpec::default()
                },
            );
            obj.metadata.namespace = Some(namespace.into());
            obj
        })
}

fn any_policy() -> impl Strategy<Value = AuthorizationPolicy> {
    policy(&["ALLOW", "DENY"])
}

/// Distinct names, so decisions can be told apart.
fn named(mut objs: Vec<AuthorizationPolicy>) -> Vec<AuthorizationPolicy> {
    for (i, obj) in objs.iter_mut().enumerate() {
        obj.metadata.name = Some(format!("p{i}"));
    }
    objs
}

struct Universe {
    labels: [BTreeMap<String, String>; 2],
    identities: Vec<Identity>,
}

impl Universe {
    fn new() -> Self {
        let labels = ["p", "q"].map(|app| BTreeMap::from([("app".into(), app.into())]));
        let identities = [("a", "x"), ("a", "y"), ("b", "x"), ("b", "y")]
            .iter()
            .map(|(ns, sa)| Identity::new("cluster.local", ns, sa).expect("valid identity"))
            .collect();
        Self { labels, identities }
    }

    /// Every flow, with its source address replaced by each of `ips`.
    fn for_each(&self, ips: &[Option<IpAddr>], mut f: impl FnMut(&[Flow<'_>])) {
        for namespace in ["a", "b", ROOT] {
            for labels in &self.labels {
                for port in [80, 443, 8080] {
                    let sources = std::iter::once(None).chain(self.identities.iter().map(Some));
                    for source in sources {
                        let flows: Vec<Flow<'_>> = ips
                            .iter()
                            .map(|ip| Flow {
                                destination: Destination { namespace, labels },
                                port,
                                source,
                                source_ip: *ip,
                            })
                            .collect();
                        f(&flows);
                    }
                }
            }
        }
    }
}

fn ips() -> Vec<Option<IpAddr>> {
    ["10.0.0.1", "10.1.0.1", "192.168.0.7"]
        .iter()
        .map(|ip| Some(ip.parse().expect("valid address")))
        .chain([None])
        .collect()
}

/// Asserts that every flow `wider` denies, `narrower` denies too.
fn never_allows_more(wider: &Engine, narrower: &Engine) -> Result<(), TestCaseError> {
    let universe = Universe::new();
    let mut result = Ok(());
    universe.for_each(&ips(), |flows| {
        for flow in flows {
            if result.is_ok()
                && !wider.decide(flow).is_allowed()
                && narrower.decide(flow).is_allowed()
            {
                result = Err(TestCaseError::fail(format!(
                    "{flow:?} was denied ({}) and is now allowed ({})",
                    wider.decide(flow),
                    narrower.decide(flow)
                )));
            }
        }
    });
    result
}

/// The same decision, computed by scanning every policy and without the rules' port hints:
/// checks the index and the hints.
fn linear(policies: &[AuthzPolicy], flow: &Flow<'_>) -> bool {
    let applies = |p: &&AuthzPolicy| {
        (p.id.namespace == flow.destination.namespace || p.id.namespace == ROOT)
            && p.selector.as_ref().is_none_or(|sel| {
                sel.iter()
                    .all(|(k, v)| flow.destination.labels.get(k) == Some(v))
            })
    };
    let denied = policies
        .iter()
        .filter(applies)
        .filter(|p| p.action == Action::Deny)
        .any(|p| p.rules.iter().any(|r| r.eval(flow) != Truth::No));
    let allows: Vec<_> = policies
        .iter()
        .filter(applies)
        .filter(|p| p.action == Action::Allow)
        .collect();
    !denied
        && (allows.is_empty()
            || allows
                .iter()
                .any(|p| p.rules.iter().any(|r| r.eval(flow) == Truth::Yes)))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn adding_a_deny_only_removes_allowed_flows(
        base in vec(any_policy(), 0..6),
        deny in policy(&["DENY"]),
    ) {
        let base = named(base);
        let mut with_deny = base.clone();
        with_deny.push(deny);
        let with_deny = named(with_deny);
        never_allows_more(&engine_from(&base), &engine_from(&with_deny))?;
    }

    #[test]
    fn unevaluable_fields_never_allow_more(
        base in vec(any_policy(), 1..6),
        pick in any::<prop::sample::Index>(),
        kind in 0..3usize,
    ) {
        let base = named(base);
        let mut changed = base.clone();
        let i = pick.index(changed.len());
        let spec = &mut changed[i].spec;
        if spec.rules.is_empty() {
            spec.rules.push(crd::Rule::default());
        }
        let j = pick.index(spec.rules.len());
        let rule = &mut spec.rules[j];
        match kind {
            0 => rule.when.push(crd::WhenCondition {
                key: "request.headers[x]".into(),
                values: vec!["1".into()],
                ..crd::WhenCondition::default()
            }),
            1 => {
                rule.extra.insert("fromm".into(), serde_json::json!([]));
            }
            _ => {
                // A written value the node cannot match literally.
                let value = rule
                    .from
                    .iter_mut()
                    .filter_map(|f| f.source.as_mut())
                    .flat_map(|s| s.principals.iter_mut().chain(s.not_principals.iter_mut()))
                    .next();
                match value {
                    Some(v) => *v = "cluster.local/ns/a/sa/*".into(),
                    None => rule.when.push(crd::WhenCondition::default()),
                }
            }
        }
        never_allows_more(&engine_from(&base), &engine_from(&changed))?;
    }

    #[test]
    fn rejected_objects_never_allow_more(
        base in vec(any_policy(), 1..6),
        pick in any::<prop::sample::Index>(),
        kind in 0..3usize,
    ) {
        let base = named(base);
        let mut broken = base.clone();
        let i = pick.index(broken.len());
        let spec = &mut broken[i].spec;
        match kind {
            0 => spec.action = Some("BOGUS".into()),
            1 => spec.rules.push(crd::Rule {
                to: vec![crd::RuleTo {
                    operation: Some(crd::Operation {
                        ports: vec!["0".into()],
                        ..crd::Operation::default()
                    }),
                    ..crd::RuleTo::default()
                }],
                ..crd::Rule::default()
            }),
            _ => {
                spec.selector.get_or_insert_with(Default::default).extra.insert(
                    "matchExpressions".into(),
                    serde_json::json!([{"key": "app", "operator": "Exists"}]),
                );
            }
        }
        never_allows_more(&engine_from(&base), &engine_from(&broken))?;
    }

    #[test]
    fn an_unknown_source_address_is_never_more_permissive(
        base in vec(any_policy(), 0..6),
    ) {
        let engine = engine_from(&named(base));
        let universe = Universe::new();
        let mut result = Ok(());
        universe.for_each(&ips(), |flows| {
            let (unknown, known) = flows.split_last().expect("several addresses");
            if result.is_ok()
                && engine.decide(unknown).is_allowed()
                && let Some(flow) = known.iter().find(|f| !engine.decide(f).is_allowed())
            {
                result = Err(TestCaseError::fail(format!(
                    "allowed with an unknown address but denied for {flow:?}: {}",
                    engine.decide(flow)
                )));
            }
        });
        result?;
    }

    #[test]
    fn the_index_agrees_with_a_linear_scan(base in vec(any_policy(), 0..8)) {
        let objs = named(base);
        let mut policies: Vec<AuthzPolicy> = objs
            .iter()
            .map(|o| AuthzPolicy::compile(o).expect("generated policies have metadata"))
            .collect();
        for rule in policies.iter_mut().flat_map(|p| p.rules.iter_mut()) {
            rule.port_hint = PortHint::Any;
        }
        let engine = engine_from(&objs);
        let universe = Universe::new();
        let mut result = Ok(());
        universe.for_each(&ips(), |flows| {
            for flow in flows {
                if result.is_ok() && engine.decide(flow).is_allowed() != linear(&policies, flow) {
                    result = Err(TestCaseError::fail(format!(
                        "index and scan disagree on {flow:?}: {}",
                        engine.decide(flow)
                    )));
                }
            }
        });
        result?;
    }
}

fn engine_from(objs: &[AuthorizationPolicy]) -> Engine {
    let policies = objs
        .iter()
        .map(|o| AuthzPolicy::compile(o).expect("policy has metadata"));
    Engine::new(ROOT, policies, [])
}
