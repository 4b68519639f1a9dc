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
use crate::{
    identity::Identity,
    k8s::policy::{AuthorizationPolicy, PeerAuthentication, RequestAuthentication},
};

const ROOT: &str = "trellis-system";

mod l7;
mod paths;
mod plaintext;
mod properties;

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

const ALLOW_ALL: &str = r"
kind: AuthorizationPolicy
metadata: {namespace: shop, name: allow-all}
spec:
  rules: [{}]
";

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

const OTHER_NS_ALLOW_NOTHING: &str = r"
kind: AuthorizationPolicy
metadata: {namespace: other, name: allow-nothing}
spec: {}
";

const ALLOW_NOTHING: &str = r"
kind: AuthorizationPolicy
metadata: {namespace: shop, name: allow-nothing}
spec: {}
";

const DENY_NO_RULES: &str = r"
kind: AuthorizationPolicy
metadata: {namespace: shop, name: deny-nothing}
spec: {action: DENY}
";

const ALLOW_EMPTY_SOURCE: &str = r#"
kind: AuthorizationPolicy
metadata: {namespace: shop, name: empty-source}
spec:
  rules: [{from: [{source: {}}], to: [{operation: {ports: ["80"]}}]}]
"#;

const ALLOW_EMPTY_PRINCIPALS: &str = r"
kind: AuthorizationPolicy
metadata: {namespace: shop, name: empty-principals}
spec:
  rules: [{from: [{source: {principals: []}}]}]
";

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

const AUDIT_ALL: &str = r"
kind: AuthorizationPolicy
metadata: {namespace: shop, name: audit}
spec:
  action: AUDIT
  rules: [{}]
";

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

const ALLOW_MATCH_EXPRESSIONS: &str = r"
kind: AuthorizationPolicy
metadata: {namespace: shop, name: expressions}
spec:
  selector: {matchExpressions: [{key: app, operator: In, values: [db]}]}
  rules: [{}]
";

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

const PA_SHOP_STRICT: &str = r"
kind: PeerAuthentication
metadata: {namespace: shop, name: default}
spec: {mtls: {mode: STRICT}}
";

const PA_DB_METRICS_PERMISSIVE: &str = r#"
kind: PeerAuthentication
metadata: {namespace: shop, name: db-metrics}
spec:
  selector: {matchLabels: {app: db}}
  mtls: {mode: UNSET}
  portLevelMtls: {"9102": {mode: PERMISSIVE}}
"#;

const PA_MESH_STRICT: &str = r"
kind: PeerAuthentication
metadata: {namespace: trellis-system, name: default}
spec: {mtls: {mode: STRICT}}
";

const PA_SHOP_PERMISSIVE: &str = r"
kind: PeerAuthentication
metadata: {namespace: shop, name: default}
spec: {mtls: {mode: PERMISSIVE}}
";

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
