//! Decision time of the L4 authorization engine with 10,000 policies of 10 rules each.
//!
//! `cargo bench -p mesh-node --bench policy`
//!
//! Two layouts of the same 10,000 policies:
//! - `spread`: 100 namespaces of 100 policies, each selecting one of 50 apps, plus one
//!   namespace-wide DENY per namespace; a workload sees a handful of policies.
//! - `one_namespace`: every policy namespace-wide in the destination's namespace, so all
//!   10,000 apply to every connection: the worst case, linear in the policies.

use std::{collections::BTreeMap, net::IpAddr, sync::LazyLock};

use divan::{Bencher, black_box};
use mesh_node::{
    identity::Identity,
    k8s::policy::{
        AuthorizationPolicy, AuthorizationPolicySpec, Operation, Rule, RuleFrom, RuleTo, Source,
        WorkloadSelector,
    },
    policy::{AuthzPolicy, Destination, Engine, Flow, PolicySet},
};

const NAMESPACES: usize = 100;
const PER_NAMESPACE: usize = 100;
const RULES: usize = 10;
const APPS: usize = 50;

fn main() {
    divan::main();
}

fn rule(ns: usize, r: usize) -> Rule {
    let principal = |sa: usize| format!("cluster.local/ns/ns{ns}/sa/client{sa}");
    Rule {
        from: vec![RuleFrom {
            source: Some(Source {
                principals: (0..3).map(|i| principal(r * 3 + i)).collect(),
                namespaces: vec![format!("ns{ns}")],
                not_ip_blocks: vec!["192.168.0.0/16".into(), "172.16.0.0/12".into()],
                ..Source::default()
            }),
            ..RuleFrom::default()
        }],
        to: vec![RuleTo {
            operation: Some(Operation {
                ports: vec![(8000 + r).to_string(), (9000 + r).to_string(), "443".into()],
                ..Operation::default()
            }),
            ..RuleTo::default()
        }],
        ..Rule::default()
    }
}

fn policy(ns: usize, i: usize, namespace_wide: bool) -> AuthzPolicy {
    // One policy in five is a DENY; their rules name clients that never connect below.
    let deny = i.is_multiple_of(5);
    let spec = AuthorizationPolicySpec {
        selector: (!namespace_wide).then(|| WorkloadSelector {
            match_labels: BTreeMap::from([
                ("app".into(), format!("svc{}", i % APPS)),
                ("tier".into(), "backend".into()),
            ]),
            ..WorkloadSelector::default()
        }),
        action: Some(if deny { "DENY" } else { "ALLOW" }.into()),
        rules: (0..RULES)
            .map(|r| rule(if deny { ns + 1000 } else { ns }, r))
            .collect(),
        ..AuthorizationPolicySpec::default()
    };
    let mut obj = AuthorizationPolicy::new(&format!("p{i}"), spec);
    obj.metadata.namespace = Some(format!("ns{ns}"));
    AuthzPolicy::compile(&obj).expect("generated policies have metadata")
}

fn spread() -> Vec<AuthzPolicy> {
    (0..NAMESPACES)
        .flat_map(|ns| (0..PER_NAMESPACE).map(move |i| policy(ns, i, i == 0)))
        .collect()
}

fn one_namespace() -> Vec<AuthzPolicy> {
    (0..NAMESPACES * PER_NAMESPACE)
        .map(|i| policy(42, i, true))
        .collect()
}

static SPREAD: LazyLock<Engine> = LazyLock::new(|| Engine::new("trellis-system", spread(), []));
static ONE_NAMESPACE: LazyLock<Engine> =
    LazyLock::new(|| Engine::new("trellis-system", one_namespace(), []));

static LABELS: LazyLock<BTreeMap<String, String>> = LazyLock::new(|| {
    BTreeMap::from([
        ("app".into(), "svc7".into()),
        ("tier".into(), "backend".into()),
        ("version".into(), "v2".into()),
    ])
});

fn identity(sa: usize) -> Identity {
    Identity::new("cluster.local", "ns42", &format!("client{sa}")).expect("valid identity")
}

fn flow(source: &Identity, port: u16) -> Flow<'_> {
    Flow {
        destination: Destination {
            namespace: "ns42",
            labels: &LABELS,
        },
        port,
        source: Some(source),
        source_ip: Some(IpAddr::from([10, 4, 2, 7])),
    }
}

/// Allowed by the last rule of an ALLOW policy: every DENY and every earlier rule is checked.
#[divan::bench(args = ["spread", "one_namespace"])]
fn allowed_by_last_rule(bencher: Bencher, layout: &str) {
    let engine = if layout == "spread" {
        &*SPREAD
    } else {
        &*ONE_NAMESPACE
    };
    let source = identity(29);
    let flow = flow(&source, 9009);
    assert!(
        engine.decide(&flow).is_allowed(),
        "{}",
        engine.decide(&flow)
    );
    bencher.bench(|| engine.decide(black_box(&flow)).is_allowed());
}

/// Denied because no ALLOW matches: every applicable policy and rule is checked.
#[divan::bench(args = ["spread", "one_namespace"])]
fn denied_no_match(bencher: Bencher, layout: &str) {
    let engine = if layout == "spread" {
        &*SPREAD
    } else {
        &*ONE_NAMESPACE
    };
    let source = identity(999);
    let flow = flow(&source, 9009);
    assert!(
        !engine.decide(&flow).is_allowed(),
        "{}",
        engine.decide(&flow)
    );
    bencher.bench(|| engine.decide(black_box(&flow)).is_allowed());
}

/// Indexing 10,000 converted policies (what a policy change costs the agent).
#[divan::bench(sample_count = 10)]
fn build_index(bencher: Bencher) {
    bencher
        .with_inputs(spread)
        .bench_values(|policies| PolicySet::new("trellis-system", policies).len());
}
