//! The decision table, status and schema checks, and property tests of the policy engine.
//!
//! Policies are written as users write them (YAML manifests) and go through the same
//! conversion as in production, so the table also specifies the conversion.

use std::{collections::BTreeMap, net::IpAddr};

use kube::CustomResourceExt;

use super::{
    engine::{DEFAULT_ROOT_NAMESPACE, Decision, Engine, PeerAuthSet, Reason, Verdict},
    facts::{Destination, Flow},
    model::{AuthzPolicy, Enforcement, MtlsMode, PeerPolicy, PolicyError, PolicyId, StandIn},
    status,
};
use crate::identity::Identity;
use crate::k8s::policy::{AuthorizationPolicy, PeerAuthentication, RequestAuthentication};

const ROOT: &str = "trellis-system";

mod l7;
mod plaintext;

/// Converts manifests (each a YAML document of either kind) the way the node does.
fn engine(manifests: &[&str]) -> Engine {
    let mut authz = Vec::new();
    let mut peer = Vec::new();
    for text in manifests {
        let value: serde_json::Value = serde_saphyr::from_str(text).expect("test manifest is YAML");
        match value["kind"].as_str() {
            Some("AuthorizationPolicy") => {
                let obj: AuthorizationPolicy =
                    serde_json::from_value(value).expect("manifest is an AuthorizationPolicy");
                authz.push(AuthzPolicy::compile(&obj).expect("manifest has metadata"));
            }
            Some("PeerAuthentication") => {
                let obj: PeerAuthentication =
                    serde_json::from_value(value).expect("manifest is a PeerAuthentication");
                peer.push(PeerPolicy::compile(&obj).expect("manifest has metadata"));
            }
            other => panic!("test manifest of unexpected kind {other:?}"),
        }
    }
    Engine::new(ROOT, authz, peer)
}

fn authz(text: &str) -> AuthzPolicy {
    let obj: AuthorizationPolicy = serde_saphyr::from_str(text).expect("manifest parses");
    AuthzPolicy::compile(&obj).expect("manifest has metadata")
}

// ---------------------------------------------------------------------------------------------
// Fixtures. Namespace `shop` runs `web` (app=web) and `db` (app=db); `other` runs a `db` too.

const ALLOW_WEB_TO_DB: &str = r#"
apiVersion: security.trellis.dev/v1
kind: AuthorizationPolicy
metadata: {namespace: shop, name: allow-web}
spec:
  selector: {matchLabels: {app: db}}
  action: ALLOW
  rules:
  - from: [{source: {principals: ["cluster.local/ns/shop/sa/web"]}}]
    to: [{operation: {ports: ["5432"]}}]
"#;

const ALLOW_WEB_SPIFFE_FORM: &str = r#"
kind: AuthorizationPolicy
metadata: {namespace: shop, name: allow-web-uri}
spec:
  selector: {matchLabels: {app: db}}
  rules:
  - from: [{source: {principals: ["spiffe://cluster.local/ns/shop/sa/web"]}}]
"#;

const ALLOW_FROM_SHOP: &str = r#"
kind: AuthorizationPolicy
metadata: {namespace: shop, name: same-namespace}
spec:
  rules: [{from: [{source: {namespaces: ["shop"]}}]}]
"#;

const ALLOW_NOT_EVIL: &str = r#"
kind: AuthorizationPolicy
metadata: {namespace: shop, name: not-evil}
spec:
  rules: [{from: [{source: {notNamespaces: ["evil"]}}]}]
"#;

const ALLOW_OFFICE_NET: &str = r#"
kind: AuthorizationPolicy
metadata: {namespace: shop, name: office}
spec:
  rules: [{from: [{source: {ipBlocks: ["10.1.0.0/16"]}}]}]
"#;

const DENY_OUTSIDE_CLUSTER_NET: &str = r#"
kind: AuthorizationPolicy
metadata: {namespace: shop, name: outside}
spec:
  action: DENY
  rules: [{from: [{source: {notIpBlocks: ["10.0.0.0/8"]}}]}]
"#;

const ALLOW_NOT_SSH: &str = r#"
kind: AuthorizationPolicy
metadata: {namespace: shop, name: no-ssh}
spec:
  rules: [{to: [{operation: {notPorts: ["22"]}}]}]
"#;

const ALLOW_WEB_PORTS: &str = r#"
kind: AuthorizationPolicy
metadata: {namespace: shop, name: web-ports}
spec:
  rules:
  - to: [{operation: {ports: ["8443"]}}]
  - to: [{operation: {ports: ["80", "443"]}}]
"#;

const ALLOW_ALL: &str = r#"
kind: AuthorizationPolicy
metadata: {namespace: shop, name: allow-all}
spec:
  rules: [{}]
"#;

const DENY_WEB_TO_5432: &str = r#"
kind: AuthorizationPolicy
metadata: {namespace: shop, name: deny-web}
spec:
  action: DENY
  rules:
  - from: [{source: {principals: ["cluster.local/ns/shop/sa/web"]}}]
    to: [{operation: {ports: ["5432"]}}]
"#;

const MESH_DENY_EVIL: &str = r#"
kind: AuthorizationPolicy
metadata: {namespace: trellis-system, name: deny-evil}
spec:
  action: DENY
  rules: [{from: [{source: {namespaces: ["evil"]}}]}]
"#;

const MESH_ALLOW_MONITORING: &str = r#"
kind: AuthorizationPolicy
metadata: {namespace: trellis-system, name: monitoring}
spec:
  rules: [{from: [{source: {namespaces: ["monitoring"]}}]}]
"#;

const MESH_ALLOW_DB_FROM_WEB: &str = r#"
kind: AuthorizationPolicy
metadata: {namespace: trellis-system, name: db-from-web}
spec:
  selector: {matchLabels: {app: db}}
  rules: [{from: [{source: {principals: ["cluster.local/ns/shop/sa/web"]}}]}]
"#;

const OTHER_NS_ALLOW_NOTHING: &str = r#"
kind: AuthorizationPolicy
metadata: {namespace: other, name: allow-nothing}
spec: {}
"#;

const ALLOW_NOTHING: &str = r#"
kind: AuthorizationPolicy
metadata: {namespace: shop, name: allow-nothing}
spec: {}
"#;

const DENY_NO_RULES: &str = r#"
kind: AuthorizationPolicy
metadata: {namespace: shop, name: deny-nothing}
spec: {action: DENY}
"#;

const ALLOW_EMPTY_SOURCE: &str = r#"
kind: AuthorizationPolicy
metadata: {namespace: shop, name: empty-source}
spec:
  rules: [{from: [{source: {}}], to: [{operation: {ports: ["80"]}}]}]
"#;

const ALLOW_EMPTY_PRINCIPALS: &str = r#"
kind: AuthorizationPolicy
metadata: {namespace: shop, name: empty-principals}
spec:
  rules: [{from: [{source: {principals: []}}]}]
"#;

const ALLOW_GET_ON_80: &str = r#"
kind: AuthorizationPolicy
metadata: {namespace: shop, name: get-only}
spec:
  rules: [{to: [{operation: {ports: ["80"], methods: ["GET"]}}]}]
"#;

const ALLOW_PATHS_THEN_PORT: &str = r#"
kind: AuthorizationPolicy
metadata: {namespace: shop, name: paths-then-port}
spec:
  rules:
  - to: [{operation: {paths: ["/admin"]}}]
  - to: [{operation: {ports: ["9090"]}}]
"#;

const DENY_WEB_POST: &str = r#"
kind: AuthorizationPolicy
metadata: {namespace: shop, name: deny-post}
spec:
  action: DENY
  rules:
  - from: [{source: {principals: ["cluster.local/ns/shop/sa/web"]}}]
    to: [{operation: {methods: ["POST"]}}]
"#;

const DENY_WHEN: &str = r#"
kind: AuthorizationPolicy
metadata: {namespace: shop, name: deny-when}
spec:
  action: DENY
  rules:
  - to: [{operation: {ports: ["8080"]}}]
    when: [{key: "request.headers[x-debug]", values: ["1"]}]
"#;

const DENY_MISSPELT_FIELD: &str = r#"
kind: AuthorizationPolicy
metadata: {namespace: shop, name: deny-misspelt}
spec:
  action: DENY
  rules: [{to: [{operation: {portz: ["22"]}}]}]
"#;

const ALLOW_MISSPELT_FIELD: &str = r#"
kind: AuthorizationPolicy
metadata: {namespace: shop, name: allow-misspelt}
spec:
  rules: [{from: [{source: {principalz: ["cluster.local/ns/shop/sa/web"]}}]}]
"#;

const DENY_JWT_OR_WEB: &str = r#"
kind: AuthorizationPolicy
metadata: {namespace: shop, name: deny-jwt}
spec:
  action: DENY
  rules:
  - from:
    - source: {principals: ["cluster.local/ns/shop/sa/web"]}
    - source: {requestPrincipals: ["issuer/subject"], namespaces: ["evil"]}
"#;

const CUSTOM_ON_9000: &str = r#"
kind: AuthorizationPolicy
metadata: {namespace: shop, name: ext-authz}
spec:
  action: CUSTOM
  provider: {name: opa}
  rules: [{to: [{operation: {ports: ["9000"]}}]}]
"#;

const AUDIT_ALL: &str = r#"
kind: AuthorizationPolicy
metadata: {namespace: shop, name: audit}
spec:
  action: AUDIT
  rules: [{}]
"#;

const ALLOW_BAD_PORT: &str = r#"
kind: AuthorizationPolicy
metadata: {namespace: shop, name: bad-port}
spec:
  selector: {matchLabels: {app: db}}
  rules: [{to: [{operation: {ports: ["5432", "80x"]}}]}]
"#;

const DENY_BAD_CIDR: &str = r#"
kind: AuthorizationPolicy
metadata: {namespace: shop, name: bad-cidr}
spec:
  selector: {matchLabels: {app: db}}
  action: DENY
  rules: [{from: [{source: {ipBlocks: ["10.0.0.0/33"]}}]}]
"#;

const UNKNOWN_ACTION: &str = r#"
kind: AuthorizationPolicy
metadata: {namespace: shop, name: typo}
spec:
  selector: {matchLabels: {app: db}}
  action: DENYY
  rules: [{to: [{operation: {ports: ["22"]}}]}]
"#;

const ALLOW_MATCH_EXPRESSIONS: &str = r#"
kind: AuthorizationPolicy
metadata: {namespace: shop, name: expressions}
spec:
  selector: {matchExpressions: [{key: app, operator: In, values: [db]}]}
  rules: [{}]
"#;

const ALLOW_TARGET_REFS: &str = r#"
kind: AuthorizationPolicy
metadata: {namespace: shop, name: waypoint-policy}
spec:
  targetRefs: [{kind: Service, group: "", name: db}]
  rules: [{}]
"#;

const ALLOW_REGEX_PRINCIPAL: &str = r#"
kind: AuthorizationPolicy
metadata: {namespace: shop, name: regex-principal}
spec:
  rules: [{from: [{source: {principals: ["cluster.local/ns/shop/sa/.*"]}}]}]
"#;

const DENY_REGEX_PRINCIPAL: &str = r#"
kind: AuthorizationPolicy
metadata: {namespace: shop, name: deny-regex}
spec:
  action: DENY
  rules: [{from: [{source: {principals: ["cluster.local/ns/.*/sa/web"]}}]}]
"#;

const ALLOW_DOTTED_SA: &str = r#"
kind: AuthorizationPolicy
metadata: {namespace: shop, name: dotted-sa}
spec:
  rules: [{from: [{source: {principals: ["cluster.local/ns/shop/sa/w.b"]}}]}]
"#;

const ALLOW_DOTTED_NAMESPACE: &str = r#"
kind: AuthorizationPolicy
metadata: {namespace: shop, name: dotted-ns}
spec:
  rules: [{from: [{source: {namespaces: ["sh.p"]}}]}]
"#;

const ALLOW_PREFIX_NAMESPACE: &str = r#"
kind: AuthorizationPolicy
metadata: {namespace: shop, name: prefix-ns}
spec:
  rules: [{from: [{source: {namespaces: ["sho*"]}}]}]
"#;

const ALLOW_ANY_AUTHENTICATED: &str = r#"
kind: AuthorizationPolicy
metadata: {namespace: shop, name: any-authenticated}
spec:
  rules: [{from: [{source: {principals: ["*"]}}]}]
"#;

const DENY_PLAINTEXT: &str = r#"
kind: AuthorizationPolicy
metadata: {namespace: shop, name: deny-plaintext}
spec:
  action: DENY
  rules: [{from: [{source: {notPrincipals: ["*"]}}]}]
"#;

const PA_SHOP_STRICT: &str = r#"
kind: PeerAuthentication
metadata: {namespace: shop, name: default}
spec: {mtls: {mode: STRICT}}
"#;

const PA_DB_METRICS_PERMISSIVE: &str = r#"
kind: PeerAuthentication
metadata: {namespace: shop, name: db-metrics}
spec:
  selector: {matchLabels: {app: db}}
  mtls: {mode: UNSET}
  portLevelMtls: {"9102": {mode: PERMISSIVE}}
"#;

const PA_MESH_STRICT: &str = r#"
kind: PeerAuthentication
metadata: {namespace: trellis-system, name: default}
spec: {mtls: {mode: STRICT}}
"#;

const PA_SHOP_PERMISSIVE: &str = r#"
kind: PeerAuthentication
metadata: {namespace: shop, name: default}
spec: {mtls: {mode: PERMISSIVE}}
"#;

// ---------------------------------------------------------------------------------------------
// The table.

/// The source of a connection: a verified identity (`ns/sa` in `cluster.local` unless a trust
/// domain is given) or plaintext, from an address (or an unknown one).
#[derive(Clone, Copy)]
struct Src {
    identity: Option<(&'static str, &'static str, &'static str)>,
    ip: Option<&'static str>,
}

const DEFAULT_IP: &str = "10.1.2.3";

/// A destination workload (namespace, `app` label) and port.
#[derive(Clone, Copy)]
struct Dst {
    namespace: &'static str,
    app: &'static str,
    port: u16,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Expect {
    /// No DENY matched and no ALLOW applies.
    AllowDefault,
    /// Allowed by this policy's rule.
    Allow(&'static str, usize),
    /// Denied by this policy's rule, surely matched.
    Deny(&'static str, usize),
    /// Denied by this policy's rule, matched only because part of it cannot be evaluated.
    DenyFailClosed(&'static str, usize),
    /// ALLOW policies apply and none matched.
    DenyNoAllow,
    /// Plaintext to a STRICT port, decided by this PeerAuthentication.
    DenyMtls(&'static str),
}
use Expect::*;

struct Case {
    name: &'static str,
    policies: &'static [&'static str],
    from: Src,
    to: Dst,
    expect: Expect,
}

fn outcome(engine: &Engine, from: Src, to: Dst) -> Expect {
    let labels = BTreeMap::from([("app".to_string(), to.app.to_string())]);
    let identity = from
        .identity
        .map(|(td, ns, sa)| Identity::new(td, ns, sa).expect("test identity is valid"));
    let flow = Flow {
        destination: Destination {
            namespace: to.namespace,
            labels: &labels,
        },
        port: to.port,
        source: identity.as_ref(),
        source_ip: from
            .ip
            .map(|ip| ip.parse::<IpAddr>().expect("test address is valid")),
    };
    classify(&engine.decide(&flow))
}

/// A decision as a table expectation.
fn classify(decision: &Decision) -> Expect {
    let name = |id: &PolicyId| -> &'static str {
        // The table names policies as `namespace/name`; leak to compare with its literals.
        Box::leak(id.to_string().into_boxed_str())
    };
    match (decision.verdict, &decision.reason) {
        (Verdict::Allow, Reason::NoAllowPolicy) => AllowDefault,
        (Verdict::Allow, Reason::Allowed { policy, rule }) => Allow(name(&policy.id), *rule),
        (
            Verdict::Deny,
            Reason::Denied {
                policy,
                rule,
                fail_closed: false,
            },
        ) => Deny(name(&policy.id), *rule),
        (
            Verdict::Deny,
            Reason::Denied {
                policy,
                rule,
                fail_closed: true,
            },
        ) => DenyFailClosed(name(&policy.id), *rule),
        (Verdict::Deny, Reason::NoAllowMatched { .. }) => DenyNoAllow,
        (Verdict::Deny, Reason::MtlsRequired { policy, .. }) => DenyMtls(name(&policy.id)),
        (verdict, reason) => panic!("inconsistent decision {verdict:?} {reason:?}"),
    }
}

#[rustfmt::skip]
const TABLE: &[Case] = &[
    // Nothing configured.
    Case { name: "no policy allows", policies: &[], from: plaintext_c(), to: DB_5432, expect: AllowDefault },

    // Principals.
    Case { name: "listed principal on listed port", policies: &[ALLOW_WEB_TO_DB], from: WEB, to: DB_5432, expect: Allow("shop/allow-web", 0) },
    Case { name: "listed principal on another port", policies: &[ALLOW_WEB_TO_DB], from: WEB, to: DB_5433, expect: DenyNoAllow },
    Case { name: "unlisted principal", policies: &[ALLOW_WEB_TO_DB], from: API, to: DB_5432, expect: DenyNoAllow },
    Case { name: "plaintext never matches principals", policies: &[ALLOW_WEB_TO_DB], from: plaintext_c(), to: DB_5432, expect: DenyNoAllow },
    Case { name: "same namespace and account in another trust domain", policies: &[ALLOW_WEB_TO_DB], from: WEB_OTHER_TD, to: DB_5432, expect: DenyNoAllow },
    Case { name: "workload outside the selector is unaffected", policies: &[ALLOW_WEB_TO_DB], from: API, to: WEB_80, expect: AllowDefault },
    Case { name: "spiffe:// form of a principal", policies: &[ALLOW_WEB_SPIFFE_FORM], from: WEB, to: DB_5432, expect: Allow("shop/allow-web-uri", 0) },
    Case { name: "any authenticated source (\"*\")", policies: &[ALLOW_ANY_AUTHENTICATED], from: API, to: WEB_80, expect: Allow("shop/any-authenticated", 0) },
    Case { name: "\"*\" does not match plaintext", policies: &[ALLOW_ANY_AUTHENTICATED], from: plaintext_c(), to: WEB_80, expect: DenyNoAllow },
    Case { name: "notPrincipals [\"*\"] denies plaintext", policies: &[DENY_PLAINTEXT], from: plaintext_c(), to: WEB_80, expect: Deny("shop/deny-plaintext", 0) },
    Case { name: "notPrincipals [\"*\"] lets authenticated through", policies: &[DENY_PLAINTEXT], from: WEB, to: WEB_80, expect: AllowDefault },

    // Namespaces.
    Case { name: "source namespace listed", policies: &[ALLOW_FROM_SHOP], from: API, to: DB_5432, expect: Allow("shop/same-namespace", 0) },
    Case { name: "namespace is not a prefix match", policies: &[ALLOW_FROM_SHOP], from: SHOP2, to: DB_5432, expect: DenyNoAllow },
    Case { name: "notNamespaces excludes the listed namespace", policies: &[ALLOW_NOT_EVIL], from: EVIL, to: DB_5432, expect: DenyNoAllow },
    Case { name: "notNamespaces matches plaintext (no namespace)", policies: &[ALLOW_NOT_EVIL], from: plaintext_c(), to: DB_5432, expect: Allow("shop/not-evil", 0) },

    // Address blocks.
    Case { name: "source inside ipBlocks", policies: &[ALLOW_OFFICE_NET], from: WEB, to: DB_5432, expect: Allow("shop/office", 0) },
    Case { name: "source outside ipBlocks", policies: &[ALLOW_OFFICE_NET], from: WEB_FROM_10_2, to: DB_5432, expect: DenyNoAllow },
    Case { name: "IPv4-mapped source inside ipBlocks", policies: &[ALLOW_OFFICE_NET], from: WEB_MAPPED, to: DB_5432, expect: Allow("shop/office", 0) },
    Case { name: "unknown source address never matches an ALLOW ipBlocks", policies: &[ALLOW_OFFICE_NET], from: WEB_NO_IP, to: DB_5432, expect: DenyNoAllow },
    Case { name: "DENY notIpBlocks: outside address denied", policies: &[DENY_OUTSIDE_CLUSTER_NET], from: WEB_FROM_192, to: DB_5432, expect: Deny("shop/outside", 0) },
    Case { name: "DENY notIpBlocks: inside address passes", policies: &[DENY_OUTSIDE_CLUSTER_NET], from: WEB, to: DB_5432, expect: AllowDefault },
    Case { name: "unknown source address matches a DENY ipBlocks", policies: &[DENY_OUTSIDE_CLUSTER_NET], from: WEB_NO_IP, to: DB_5432, expect: DenyFailClosed("shop/outside", 0) },

    // Ports.
    Case { name: "notPorts excludes the port", policies: &[ALLOW_NOT_SSH], from: WEB, to: to_c("shop", "db", 22), expect: DenyNoAllow },
    Case { name: "notPorts allows the others", policies: &[ALLOW_NOT_SSH], from: WEB, to: WEB_80, expect: Allow("shop/no-ssh", 0) },
    Case { name: "second rule decides, with its index", policies: &[ALLOW_WEB_PORTS], from: WEB, to: to_c("shop", "web", 443), expect: Allow("shop/web-ports", 1) },

    // DENY over ALLOW, scopes.
    Case { name: "DENY wins over a matching ALLOW", policies: &[ALLOW_ALL, DENY_WEB_TO_5432], from: WEB, to: DB_5432, expect: Deny("shop/deny-web", 0) },
    Case { name: "ALLOW applies where the DENY does not match", policies: &[ALLOW_ALL, DENY_WEB_TO_5432], from: WEB, to: WEB_80, expect: Allow("shop/allow-all", 0) },
    Case { name: "mesh-wide DENY beats a namespace ALLOW", policies: &[ALLOW_ALL, MESH_DENY_EVIL], from: EVIL, to: WEB_80, expect: Deny("trellis-system/deny-evil", 0) },
    Case { name: "mesh-wide ALLOW makes every workload require a match", policies: &[MESH_ALLOW_MONITORING], from: WEB, to: DB_5432, expect: DenyNoAllow },
    Case { name: "mesh-wide ALLOW matches in any namespace", policies: &[MESH_ALLOW_MONITORING], from: MONITORING, to: OTHER_DB, expect: Allow("trellis-system/monitoring", 0) },
    Case { name: "root-namespace selector applies in every namespace", policies: &[MESH_ALLOW_DB_FROM_WEB], from: API, to: OTHER_DB, expect: DenyNoAllow },
    Case { name: "root-namespace selector skips other workloads", policies: &[MESH_ALLOW_DB_FROM_WEB], from: API, to: WEB_80, expect: AllowDefault },
    Case { name: "another namespace's policy does not apply", policies: &[OTHER_NS_ALLOW_NOTHING], from: API, to: DB_5432, expect: AllowDefault },
    Case { name: "ALLOW in either scope may match", policies: &[MESH_ALLOW_MONITORING, ALLOW_FROM_SHOP], from: API, to: DB_5432, expect: Allow("shop/same-namespace", 0) },

    // Empty rules.
    Case { name: "ALLOW without rules allows nothing", policies: &[ALLOW_NOTHING], from: WEB, to: DB_5432, expect: DenyNoAllow },
    Case { name: "DENY without rules denies nothing", policies: &[DENY_NO_RULES], from: WEB, to: DB_5432, expect: AllowDefault },
    Case { name: "empty rule matches everything, plaintext too", policies: &[ALLOW_ALL], from: plaintext_c(), to: DB_5432, expect: Allow("shop/allow-all", 0) },
    Case { name: "empty source matches any source", policies: &[ALLOW_EMPTY_SOURCE], from: plaintext_c(), to: WEB_80, expect: Allow("shop/empty-source", 0) },
    Case { name: "empty principals list is no condition", policies: &[ALLOW_EMPTY_PRINCIPALS], from: plaintext_c(), to: WEB_80, expect: Allow("shop/empty-principals", 0) },

    // Fields the node cannot evaluate.
    Case { name: "ALLOW rule with HTTP methods matches nothing", policies: &[ALLOW_GET_ON_80], from: WEB, to: WEB_80, expect: DenyNoAllow },
    Case { name: "other ALLOW rules still match", policies: &[ALLOW_PATHS_THEN_PORT], from: WEB, to: to_c("shop", "web", 9090), expect: Allow("shop/paths-then-port", 1) },
    Case { name: "DENY rule with HTTP methods matches on its other fields", policies: &[DENY_WEB_POST], from: WEB, to: WEB_80, expect: DenyFailClosed("shop/deny-post", 0) },
    Case { name: "DENY rule with HTTP methods spares sources it surely excludes", policies: &[DENY_WEB_POST], from: API, to: WEB_80, expect: AllowDefault },
    Case { name: "DENY rule with when: denied on its port", policies: &[DENY_WHEN], from: WEB, to: to_c("shop", "web", 8080), expect: DenyFailClosed("shop/deny-when", 0) },
    Case { name: "DENY rule with when: other ports pass", policies: &[DENY_WHEN], from: WEB, to: WEB_80, expect: AllowDefault },
    Case { name: "DENY with a misspelt field denies on every port", policies: &[DENY_MISSPELT_FIELD], from: WEB, to: WEB_80, expect: DenyFailClosed("shop/deny-misspelt", 0) },
    Case { name: "ALLOW with a misspelt field matches nothing", policies: &[ALLOW_MISSPELT_FIELD], from: WEB, to: WEB_80, expect: DenyNoAllow },
    Case { name: "DENY source with a JWT field matches on its namespace", policies: &[DENY_JWT_OR_WEB], from: EVIL, to: WEB_80, expect: DenyFailClosed("shop/deny-jwt", 0) },
    Case { name: "DENY source with a JWT field spares other namespaces", policies: &[DENY_JWT_OR_WEB], from: API, to: WEB_80, expect: AllowDefault },
    Case { name: "DENY with a JWT source still surely matches its other source", policies: &[DENY_JWT_OR_WEB], from: WEB, to: WEB_80, expect: Deny("shop/deny-jwt", 0) },
    Case { name: "CUSTOM is enforced as DENY", policies: &[ALLOW_ALL, CUSTOM_ON_9000], from: WEB, to: to_c("shop", "web", 9000), expect: Deny("shop/ext-authz", 0) },
    Case { name: "AUDIT changes nothing", policies: &[AUDIT_ALL, ALLOW_NOTHING], from: WEB, to: WEB_80, expect: DenyNoAllow },

    // Rejected objects: fail-closed stand-ins.
    Case { name: "ALLOW with a bad port allows nothing on its workloads", policies: &[ALLOW_BAD_PORT], from: WEB, to: DB_5432, expect: DenyNoAllow },
    Case { name: "a rejected ALLOW leaves other ALLOWs working", policies: &[ALLOW_BAD_PORT, ALLOW_WEB_TO_DB], from: WEB, to: DB_5432, expect: Allow("shop/allow-web", 0) },
    Case { name: "a rejected ALLOW keeps its selector", policies: &[ALLOW_BAD_PORT], from: WEB, to: WEB_80, expect: AllowDefault },
    Case { name: "DENY with a bad CIDR denies everything on its workloads", policies: &[DENY_BAD_CIDR, ALLOW_ALL], from: WEB, to: DB_5432, expect: Deny("shop/bad-cidr", 0) },
    Case { name: "unknown action denies everything on its workloads", policies: &[UNKNOWN_ACTION, ALLOW_ALL], from: WEB, to: DB_5432, expect: Deny("shop/typo", 0) },
    Case { name: "unreadable selector: the whole namespace allows nothing", policies: &[ALLOW_MATCH_EXPRESSIONS], from: WEB, to: WEB_80, expect: DenyNoAllow },
    // Changed with waypoints: a policy with targetRefs binds at waypoints only (see l7.rs).
    Case { name: "targetRefs: node agents leave it to waypoints", policies: &[ALLOW_TARGET_REFS], from: WEB, to: DB_5432, expect: AllowDefault },

    // Regular-expression and wildcard characters are never patterns.
    Case { name: "ALLOW principal \".*\" matches nobody", policies: &[ALLOW_REGEX_PRINCIPAL], from: WEB, to: WEB_80, expect: DenyNoAllow },
    Case { name: "DENY principal \".*\" denies any authenticated source", policies: &[DENY_REGEX_PRINCIPAL], from: API, to: WEB_80, expect: DenyFailClosed("shop/deny-regex", 0) },
    Case { name: "DENY principal \".*\" cannot match plaintext", policies: &[DENY_REGEX_PRINCIPAL], from: plaintext_c(), to: WEB_80, expect: AllowDefault },
    Case { name: "'.' in a principal is a literal dot (no match)", policies: &[ALLOW_DOTTED_SA], from: WEB, to: WEB_80, expect: DenyNoAllow },
    Case { name: "'.' in a principal is a literal dot (match)", policies: &[ALLOW_DOTTED_SA], from: id_c("shop", "w.b"), to: WEB_80, expect: Allow("shop/dotted-sa", 0) },
    Case { name: "namespace \"sh.p\" matches nothing", policies: &[ALLOW_DOTTED_NAMESPACE], from: WEB, to: WEB_80, expect: DenyNoAllow },
    Case { name: "namespace prefix wildcard matches nothing", policies: &[ALLOW_PREFIX_NAMESPACE], from: WEB, to: WEB_80, expect: DenyNoAllow },

    // PeerAuthentication.
    Case { name: "STRICT namespace refuses plaintext", policies: &[PA_SHOP_STRICT], from: plaintext_c(), to: WEB_80, expect: DenyMtls("shop/default") },
    Case { name: "STRICT namespace accepts mutual TLS", policies: &[PA_SHOP_STRICT], from: WEB, to: WEB_80, expect: AllowDefault },
    Case { name: "port-level PERMISSIVE overrides STRICT", policies: &[PA_SHOP_STRICT, PA_DB_METRICS_PERMISSIVE], from: plaintext_c(), to: to_c("shop", "db", 9102), expect: AllowDefault },
    Case { name: "UNSET workload mode inherits STRICT", policies: &[PA_SHOP_STRICT, PA_DB_METRICS_PERMISSIVE], from: plaintext_c(), to: DB_5432, expect: DenyMtls("shop/default") },
    Case { name: "mesh-wide STRICT applies without a namespace policy", policies: &[PA_MESH_STRICT], from: plaintext_c(), to: OTHER_DB, expect: DenyMtls("trellis-system/default") },
    Case { name: "namespace PERMISSIVE overrides mesh-wide STRICT", policies: &[PA_MESH_STRICT, PA_SHOP_PERMISSIVE], from: plaintext_c(), to: WEB_80, expect: AllowDefault },
    Case { name: "PERMISSIVE still applies authorization", policies: &[PA_SHOP_PERMISSIVE, ALLOW_WEB_TO_DB], from: plaintext_c(), to: DB_5432, expect: DenyNoAllow },
];

const fn plaintext_c() -> Src {
    Src {
        identity: None,
        ip: Some(DEFAULT_IP),
    }
}

const fn id_c(ns: &'static str, sa: &'static str) -> Src {
    Src {
        identity: Some(("cluster.local", ns, sa)),
        ip: Some(DEFAULT_IP),
    }
}

const fn to_c(namespace: &'static str, app: &'static str, port: u16) -> Dst {
    Dst {
        namespace,
        app,
        port,
    }
}

const WEB: Src = id_c("shop", "web");
const API: Src = id_c("shop", "api");
const SHOP2: Src = id_c("shop2", "web");
const EVIL: Src = id_c("evil", "web");
const MONITORING: Src = id_c("monitoring", "prometheus");
const WEB_OTHER_TD: Src = Src {
    identity: Some(("example.org", "shop", "web")),
    ip: Some(DEFAULT_IP),
};
const WEB_FROM_10_2: Src = Src {
    ip: Some("10.2.0.1"),
    ..WEB
};
const WEB_FROM_192: Src = Src {
    ip: Some("192.168.1.1"),
    ..WEB
};
const WEB_MAPPED: Src = Src {
    ip: Some("::ffff:10.1.2.3"),
    ..WEB
};
const WEB_NO_IP: Src = Src { ip: None, ..WEB };
const DB_5432: Dst = to_c("shop", "db", 5432);
const DB_5433: Dst = to_c("shop", "db", 5433);
const WEB_80: Dst = to_c("shop", "web", 80);
const OTHER_DB: Dst = to_c("other", "db", 5432);

#[test]
fn decision_table() {
    assert!(TABLE.len() >= 40, "the table covers at least 40 cases");
    let mut failures = Vec::new();
    for case in TABLE {
        let got = outcome(&engine(case.policies), case.from, case.to);
        if got != case.expect {
            failures.push(format!(
                "{}: expected {:?}, got {:?}",
                case.name, case.expect, got
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        TABLE.len(),
        failures.join("\n")
    );
}

// ---------------------------------------------------------------------------------------------
// Conversion and status conditions.

fn condition_of(text: &str) -> status::Condition {
    status::authorization_condition(&authz(text))
}

#[test]
fn a_policy_enforced_as_written_is_accepted_with_its_generation() {
    let text = ALLOW_WEB_TO_DB.replace("name: allow-web}", "name: allow-web, generation: 3}");
    let c = condition_of(&text);
    assert_eq!(
        (c.type_.as_str(), c.status.as_str(), c.reason.as_str()),
        ("Accepted", "True", "Accepted")
    );
    assert_eq!(c.observed_generation, Some(3));
}

#[test]
fn partially_enforced_allow_names_each_field_and_its_effect() {
    let c = condition_of(ALLOW_GET_ON_80);
    assert_eq!(
        (c.status.as_str(), c.reason.as_str()),
        ("False", "PartiallyEnforced")
    );
    assert!(
        c.message.contains(
            "spec.rules[0].to[0].operation.methods: HTTP methods cannot be evaluated at L4"
        ),
        "{}",
        c.message
    );
    assert!(
        c.message.contains("ALLOW rules using them match nothing"),
        "{}",
        c.message
    );
}

#[test]
fn partially_enforced_deny_says_it_matches_more() {
    let c = condition_of(DENY_MISSPELT_FIELD);
    assert_eq!(c.reason, "PartiallyEnforced");
    assert!(
        c.message
            .contains("spec.rules[0].to[0].operation.portz: unknown field"),
        "{}",
        c.message
    );
    assert!(
        c.message
            .contains("DENY rules using them match every connection"),
        "{}",
        c.message
    );
}

#[test]
fn wildcard_and_regex_values_are_reported_as_not_literal() {
    let c = condition_of(DENY_REGEX_PRINCIPAL);
    assert_eq!(c.reason, "PartiallyEnforced");
    assert!(
        c.message.contains(
            "spec.rules[0].from[0].source.principals[0]: \"cluster.local/ns/.*/sa/web\" is not a literal name"
        ),
        "{}",
        c.message
    );
    assert_eq!(
        condition_of(ALLOW_PREFIX_NAMESPACE).reason,
        "PartiallyEnforced"
    );
    // "*" alone is a supported form.
    assert_eq!(condition_of(ALLOW_ANY_AUTHENTICATED).reason, "Accepted");
}

#[test]
fn a_bad_value_rejects_the_object_naming_the_field_and_the_stand_in() {
    let policy = authz(ALLOW_BAD_PORT);
    assert!(matches!(
        policy.enforcement,
        Enforcement::Rejected {
            stand_in: StandIn::AllowNothing,
            ..
        }
    ));
    let c = status::authorization_condition(&policy);
    assert_eq!((c.status.as_str(), c.reason.as_str()), ("False", "Invalid"));
    assert!(
        c.message.starts_with(
            "rejected: spec.rules[0].to[0].operation.ports[1]: \"80x\" is not a port number (1-65535); enforced as an ALLOW policy with no rules"
        ),
        "{}",
        c.message
    );
    let c = condition_of(DENY_BAD_CIDR);
    assert!(
        c.message
            .contains("spec.rules[0].from[0].source.ipBlocks[0]: \"10.0.0.0/33\""),
        "{}",
        c.message
    );
    assert!(
        c.message.contains("denying every connection"),
        "{}",
        c.message
    );
    let c = condition_of(UNKNOWN_ACTION);
    assert!(
        c.message
            .contains("spec.action: \"DENYY\" is not one of ALLOW, DENY, AUDIT, CUSTOM"),
        "{}",
        c.message
    );
}

#[test]
fn scope_changing_fields_are_unsupported() {
    // Changed with waypoints: targetRefs are supported (they bind at waypoints; l7.rs tests
    // the invalid forms).
    let c = condition_of(ALLOW_TARGET_REFS);
    assert_eq!((c.status.as_str(), c.reason.as_str()), ("True", "Accepted"));
    let c = condition_of(ALLOW_MATCH_EXPRESSIONS);
    assert!(
        c.message
            .contains("spec.selector.matchExpressions: unknown field"),
        "{}",
        c.message
    );
}

#[test]
fn custom_and_audit_conditions() {
    let c = condition_of(CUSTOM_ON_9000);
    assert_eq!(c.reason, "PartiallyEnforced");
    assert!(
        c.message
            .contains("spec.action: CUSTOM needs an external authorizer"),
        "{}",
        c.message
    );
    assert_eq!(condition_of(AUDIT_ALL).reason, "NoEffect");
}

#[test]
fn an_object_without_namespace_cannot_be_compiled() {
    let obj: AuthorizationPolicy =
        serde_saphyr::from_str("kind: AuthorizationPolicy\nmetadata: {name: x}\nspec: {}\n")
            .expect("manifest parses");
    assert_eq!(
        AuthzPolicy::compile(&obj),
        Err(PolicyError::MissingMetadata("namespace"))
    );
}

#[test]
fn unknown_fields_survive_a_round_trip() {
    let obj: AuthorizationPolicy =
        serde_saphyr::from_str(DENY_MISSPELT_FIELD).expect("manifest parses");
    let json = serde_json::to_value(&obj).expect("serialises");
    assert_eq!(
        json["spec"]["rules"][0]["to"][0]["operation"]["portz"],
        serde_json::json!(["22"])
    );
}

fn peer(text: &str) -> PeerPolicy {
    let obj: PeerAuthentication = serde_saphyr::from_str(text).expect("manifest parses");
    PeerPolicy::compile(&obj).expect("manifest has metadata")
}

#[test]
fn peer_authentication_conversion() {
    let p = peer(PA_DB_METRICS_PERMISSIVE);
    assert_eq!(p.mode, None);
    assert_eq!(p.mode_for(9102), Some((MtlsMode::Permissive, true)));
    assert_eq!(p.mode_for(80), None);
    assert_eq!(status::peer_condition(&p).reason, "Accepted");

    let p = peer(
        "kind: PeerAuthentication\nmetadata: {namespace: shop, name: off}\nspec: {mtls: {mode: DISABLE}}\n",
    );
    assert_eq!(p.mode, Some(MtlsMode::Permissive));
    let c = status::peer_condition(&p);
    assert_eq!(c.reason, "PartiallyEnforced");
    assert!(
        c.message
            .contains("spec.mtls.mode: DISABLE is not supported"),
        "{}",
        c.message
    );

    let p = peer(
        "kind: PeerAuthentication\nmetadata: {namespace: shop, name: bad}\nspec:\n  selector: {matchLabels: {app: db}}\n  portLevelMtls: {http: {mode: PERMISSIVE}}\n",
    );
    assert_eq!(
        p.mode,
        Some(MtlsMode::Strict),
        "a rejected PeerAuthentication is STRICT"
    );
    assert!(p.selector.is_some(), "and keeps its readable selector");
    let c = status::peer_condition(&p);
    assert_eq!(c.reason, "Invalid");
    assert!(
        c.message
            .contains("spec.portLevelMtls[\"http\"]: \"http\" is not a port number"),
        "{}",
        c.message
    );

    let p = peer(
        "kind: PeerAuthentication\nmetadata: {namespace: shop, name: typo}\nspec: {mtls: {mode: STRICKT}}\n",
    );
    assert_eq!(p.mode, Some(MtlsMode::Strict));
}

#[test]
fn same_level_peer_authentication_conflicts_resolve_to_the_strictest() {
    let a = "kind: PeerAuthentication\nmetadata: {namespace: shop, name: a}\nspec:\n  selector: {matchLabels: {app: db}}\n  mtls: {mode: PERMISSIVE}\n";
    let b = "kind: PeerAuthentication\nmetadata: {namespace: shop, name: b}\nspec:\n  selector: {matchLabels: {app: db}}\n  mtls: {mode: STRICT}\n";
    for order in [[a, b], [b, a]] {
        let engine = engine(&order);
        assert_eq!(outcome(&engine, plaintext_c(), DB_5432), DenyMtls("shop/b"));
    }
}

#[test]
fn set_condition_keeps_the_transition_time_while_the_status_holds() {
    let mut conditions = Vec::new();
    let accepted = condition_of(ALLOW_WEB_TO_DB);
    assert!(status::set_condition(
        &mut conditions,
        accepted.clone(),
        "t1"
    ));
    assert_eq!(conditions[0].last_transition_time, "t1");
    assert!(
        !status::set_condition(&mut conditions, accepted, "t2"),
        "nothing changed"
    );
    assert_eq!(conditions[0].last_transition_time, "t1");

    let mut partial = condition_of(ALLOW_GET_ON_80);
    partial.observed_generation = Some(2);
    assert!(status::set_condition(&mut conditions, partial, "t3"));
    assert_eq!(conditions.len(), 1);
    assert_eq!(conditions[0].last_transition_time, "t3");
    assert_eq!(conditions[0].reason, "PartiallyEnforced");
}

#[test]
fn rfc3339_is_utc_with_seconds() {
    let t = time::OffsetDateTime::from_unix_timestamp(1_700_000_000).expect("valid timestamp");
    assert_eq!(status::rfc3339(t), "2023-11-14T22:13:20Z");
}

#[test]
fn decisions_explain_themselves() {
    let engine = engine(&[DENY_WEB_POST]);
    let labels = BTreeMap::from([("app".to_string(), "web".to_string())]);
    let web = Identity::new("cluster.local", "shop", "web").expect("valid identity");
    let flow = Flow {
        destination: Destination {
            namespace: "shop",
            labels: &labels,
        },
        port: 80,
        source: Some(&web),
        source_ip: None,
    };
    assert_eq!(
        engine.decide(&flow).to_string(),
        "deny: DENY policy shop/deny-post rule 0 matched (fail closed: part of the rule cannot be evaluated for this connection)"
    );
    let engine = self::engine(&[ALLOW_BAD_PORT]);
    let labels = BTreeMap::from([("app".to_string(), "db".to_string())]);
    let flow = Flow {
        destination: Destination {
            namespace: "shop",
            labels: &labels,
        },
        ..flow
    };
    assert_eq!(
        engine.decide(&flow).to_string(),
        "deny: 1 ALLOW policy applies to the workload and none matched"
    );
    assert_eq!(engine.authorization.applicable(&flow.destination).len(), 1);
}

// ---------------------------------------------------------------------------------------------
// The generated CustomResourceDefinitions.

#[test]
fn crds_are_namespaced_v1_with_status_and_keep_unknown_fields() {
    for crd in [
        AuthorizationPolicy::crd(),
        PeerAuthentication::crd(),
        RequestAuthentication::crd(),
    ] {
        assert_eq!(crd.spec.group, "security.trellis.dev");
        assert_eq!(crd.spec.scope, "Namespaced");
        let version = &crd.spec.versions[0];
        assert_eq!(version.name, "v1");
        assert!(
            version
                .subresources
                .as_ref()
                .and_then(|s| s.status.as_ref())
                .is_some(),
            "status subresource"
        );
        let schema = serde_json::to_value(&version.schema).expect("schema serialises");
        let spec = &schema["openAPIV3Schema"]["properties"]["spec"];
        assert_eq!(spec["x-kubernetes-preserve-unknown-fields"], true, "{spec}");
        // A structural schema never mixes `properties` with `additionalProperties: false`
        // or leaves `extra` as a property.
        assert!(spec["properties"].get("extra").is_none(), "{spec}");
    }
    let crd = AuthorizationPolicy::crd();
    assert_eq!(crd.spec.names.kind, "AuthorizationPolicy");
    assert_eq!(crd.spec.names.plural, "authorizationpolicies");
    let schema = serde_json::to_value(&crd.spec.versions[0].schema).expect("schema serialises");
    let spec = &schema["openAPIV3Schema"]["properties"]["spec"]["properties"];
    assert_eq!(
        spec["action"]["enum"],
        serde_json::json!(["ALLOW", "DENY", "AUDIT", "CUSTOM"])
    );
    let operation = &spec["rules"]["items"]["properties"]["to"]["items"]["properties"]["operation"];
    assert_eq!(operation["properties"]["ports"]["items"]["type"], "string");
    assert_eq!(operation["x-kubernetes-preserve-unknown-fields"], true);
}

// ---------------------------------------------------------------------------------------------
// Properties, over small random policy sets and every flow of a small universe.

mod properties {
    use std::{collections::BTreeMap, net::IpAddr};

    use proptest::{collection::vec, prelude::*, sample};

    use super::{ROOT, engine_from};
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
}

fn engine_from(objs: &[AuthorizationPolicy]) -> Engine {
    let policies = objs
        .iter()
        .map(|o| AuthzPolicy::compile(o).expect("policy has metadata"));
    Engine::new(ROOT, policies, [])
}

#[test]
fn a_workload_resolves_to_one_mode_and_the_ports_that_differ() {
    let strict_ns = "kind: PeerAuthentication\nmetadata: {namespace: shop, name: ns}\nspec: {mtls: {mode: STRICT}}\n";
    let db_metrics = "kind: PeerAuthentication\nmetadata: {namespace: shop, name: db}\nspec:\n  selector: {matchLabels: {app: db}}\n  portLevelMtls:\n    \"9102\": {mode: PERMISSIVE}\n    \"5432\": {mode: STRICT}\n";
    let set = PeerAuthSet::new(DEFAULT_ROOT_NAMESPACE, [peer(strict_ns), peer(db_metrics)]);
    let db = BTreeMap::from([("app".to_owned(), "db".to_owned())]);
    let web = BTreeMap::from([("app".to_owned(), "web".to_owned())]);
    let of = |labels| Destination {
        namespace: "shop",
        labels,
    };
    // 5432 is STRICT like the rest, so only the metrics port differs.
    assert_eq!(
        set.resolve_workload(&of(&db)),
        (
            MtlsMode::Strict,
            BTreeMap::from([(9102, MtlsMode::Permissive)])
        )
    );
    assert_eq!(
        set.resolve_workload(&of(&web)),
        (MtlsMode::Strict, BTreeMap::new())
    );
    let other = Destination {
        namespace: "blog",
        labels: &web,
    };
    assert_eq!(
        set.resolve_workload(&other),
        (MtlsMode::Permissive, BTreeMap::new())
    );
}
