//! The waypoint's decision table: request attributes, JWT principals, `when`, and which
//! policies a waypoint applies (targetRefs to its Gateway, to the destination Service, to the
//! waypoint GatewayClass from the root namespace; never selector policies).
//!
//! Every case decides a request to service `shop/web` through waypoint `shop/waypoint`
//! unless it names another target.

use std::collections::BTreeMap;

use http::{HeaderMap, HeaderName, HeaderValue};

use super::{Expect, Expect::*, authz, classify, condition_of, engine};
use crate::{
    identity::Identity,
    policy::{
        engine::Engine,
        facts::{Destination, Flow, RequestFacts, VerifiedJwt, WaypointTarget},
        model::{Action, Binding, Enforcement, StandIn, TargetRef},
        stored::{Policy, PolicyKind},
    },
};

// ---------------------------------------------------------------------------------------------
// Fixtures: policies attached to waypoints.

const GET_API_ON_WAYPOINT: &str = r#"
kind: AuthorizationPolicy
metadata: {namespace: shop, name: get-api}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]
  rules:
  - to: [{operation: {methods: ["GET"], paths: ["/api/*"]}}]
"#;

const DENY_ADMIN_ON_WEB: &str = r#"
kind: AuthorizationPolicy
metadata: {namespace: shop, name: deny-admin}
spec:
  targetRefs: [{kind: Service, group: "", name: web}]
  action: DENY
  rules:
  - to: [{operation: {paths: ["/admin", "/admin/*"]}}]
"#;

const ALLOW_ALL_ON_WEB: &str = r"
kind: AuthorizationPolicy
metadata: {namespace: shop, name: allow-all-web}
spec:
  targetRefs: [{kind: Service, name: web}]
  rules: [{}]
";

const ALLOW_HOSTS: &str = r#"
kind: AuthorizationPolicy
metadata: {namespace: shop, name: hosts}
spec:
  targetRef: {kind: Service, name: web}
  rules:
  - to: [{operation: {hosts: ["web.shop.svc.cluster.local", "*.example.com"]}}]
"#;

const DENY_WRITES: &str = r#"
kind: AuthorizationPolicy
metadata: {namespace: shop, name: deny-writes}
spec:
  targetRefs: [{kind: Gateway, name: waypoint}]
  action: DENY
  rules:
  - to: [{operation: {notMethods: ["GET", "HEAD"], notPaths: ["/public/*"]}}]
"#;

const ALLOW_ANY_JWT: &str = r#"
kind: AuthorizationPolicy
metadata: {namespace: shop, name: any-jwt}
spec:
  targetRefs: [{kind: Service, name: web}]
  rules: [{from: [{source: {requestPrincipals: ["*"]}}]}]
"#;

const ALLOW_ISSUER_PREFIX: &str = r#"
kind: AuthorizationPolicy
metadata: {namespace: shop, name: issuer}
spec:
  targetRefs: [{kind: Service, name: web}]
  rules: [{from: [{source: {requestPrincipals: ["https://issuer.example/*"]}}]}]
"#;

const DENY_WITHOUT_JWT: &str = r#"
kind: AuthorizationPolicy
metadata: {namespace: shop, name: require-jwt}
spec:
  targetRefs: [{kind: Service, name: web}]
  action: DENY
  rules: [{from: [{source: {notRequestPrincipals: ["*"]}}]}]
"#;

const ALLOW_TENANT_HEADER: &str = r#"
kind: AuthorizationPolicy
metadata: {namespace: shop, name: tenant}
spec:
  targetRefs: [{kind: Service, name: web}]
  rules: [{when: [{key: "request.headers[X-Tenant]", values: ["acme", "beta*"]}]}]
"#;

const DENY_DEBUG_HEADER: &str = r#"
kind: AuthorizationPolicy
metadata: {namespace: shop, name: no-debug}
spec:
  targetRefs: [{kind: Service, name: web}]
  action: DENY
  rules: [{when: [{key: "request.headers[x-debug]", values: ["*"]}]}]
"#;

const DENY_DEBUG_ON: &str = r#"
kind: AuthorizationPolicy
metadata: {namespace: shop, name: debug-on}
spec:
  targetRefs: [{kind: Service, name: web}]
  action: DENY
  rules: [{when: [{key: "request.headers[x-debug]", values: ["1"]}]}]
"#;

const ALLOW_NOT_TENANT_EVIL: &str = r#"
kind: AuthorizationPolicy
metadata: {namespace: shop, name: not-evil}
spec:
  targetRefs: [{kind: Service, name: web}]
  rules: [{when: [{key: "request.headers[x-tenant]", notValues: ["evil"]}]}]
"#;

const ALLOW_ADMINS_GROUP: &str = r#"
kind: AuthorizationPolicy
metadata: {namespace: shop, name: admins}
spec:
  targetRefs: [{kind: Service, name: web}]
  rules:
  - when:
    - {key: "request.auth.claims[groups]", values: ["admins"]}
    - {key: "request.auth.audiences", values: ["shop"]}
    - {key: "request.auth.claims[org][tier]", notValues: ["free"]}
"#;

const ALLOW_SHOP_SOURCES_WHEN: &str = r#"
kind: AuthorizationPolicy
metadata: {namespace: shop, name: shop-sources}
spec:
  targetRefs: [{kind: Service, name: web}]
  rules:
  - when:
    - {key: source.namespace, values: ["shop"]}
    - {key: source.principal, notValues: ["cluster.local/ns/shop/sa/api"]}
    - {key: destination.port, values: ["80"]}
"#;

const DENY_UNKNOWN_KEY: &str = r#"
kind: AuthorizationPolicy
metadata: {namespace: shop, name: deny-unknown-key}
spec:
  targetRefs: [{kind: Service, name: web}]
  action: DENY
  rules:
  - to: [{operation: {methods: ["DELETE"]}}]
    when: [{key: "experimental.envoy.filters.x", values: ["1"]}]
"#;

const ALLOW_UNKNOWN_KEY: &str = r#"
kind: AuthorizationPolicy
metadata: {namespace: shop, name: allow-unknown-key}
spec:
  targetRefs: [{kind: Service, name: web}]
  rules: [{when: [{key: "source.ip", values: ["10.0.0.1"]}]}]
"#;

const ALLOW_BAD_PATH_PATTERN: &str = r#"
kind: AuthorizationPolicy
metadata: {namespace: shop, name: bad-pattern}
spec:
  targetRefs: [{kind: Service, name: web}]
  rules:
  - to: [{operation: {paths: ["/api/*/items"]}}]
  - to: [{operation: {paths: ["/health"]}}]
"#;

const DENY_BAD_PATH_PATTERN: &str = r#"
kind: AuthorizationPolicy
metadata: {namespace: shop, name: deny-bad-pattern}
spec:
  targetRefs: [{kind: Service, name: web}]
  action: DENY
  rules: [{to: [{operation: {methods: ["POST"], paths: ["/a/{*}/b"]}}]}]
"#;

const DENY_ON_DB: &str = r"
kind: AuthorizationPolicy
metadata: {namespace: shop, name: deny-db}
spec:
  targetRefs: [{kind: Service, name: db}]
  action: DENY
  rules: [{}]
";

const DENY_ON_OTHER_GATEWAY: &str = r"
kind: AuthorizationPolicy
metadata: {namespace: shop, name: deny-other-gateway}
spec:
  targetRefs: [{kind: Gateway, name: other-waypoint}]
  action: DENY
  rules: [{}]
";

const OTHER_NS_DENY_WEB: &str = r"
kind: AuthorizationPolicy
metadata: {namespace: blog, name: deny-web}
spec:
  targetRefs: [{kind: Service, name: web}]
  action: DENY
  rules: [{}]
";

const ROOT_CLASS_DENY_TRACE: &str = r#"
kind: AuthorizationPolicy
metadata: {namespace: trellis-system, name: no-trace}
spec:
  targetRefs: [{kind: GatewayClass, group: gateway.networking.k8s.io, name: trellis-waypoint}]
  action: DENY
  rules: [{to: [{operation: {methods: ["TRACE"]}}]}]
"#;

const NON_ROOT_CLASS_DENY_ALL: &str = r"
kind: AuthorizationPolicy
metadata: {namespace: shop, name: class-from-shop}
spec:
  targetRefs: [{kind: GatewayClass, name: trellis-waypoint}]
  action: DENY
  rules: [{}]
";

const ROOT_WIDE_DENY_ALL: &str = r#"
kind: AuthorizationPolicy
metadata: {namespace: trellis-system, name: mesh-deny}
spec:
  action: DENY
  rules: [{to: [{operation: {ports: ["80"]}}]}]
"#;

const SELECTOR_DENY_GET: &str = r#"
kind: AuthorizationPolicy
metadata: {namespace: shop, name: selector-deny}
spec:
  selector: {matchLabels: {app: web}}
  action: DENY
  rules: [{to: [{operation: {methods: ["GET"]}}]}]
"#;

const ALLOW_BAD_PORT_ON_WEB: &str = r#"
kind: AuthorizationPolicy
metadata: {namespace: shop, name: bad-port-web}
spec:
  targetRefs: [{kind: Service, name: web}]
  rules: [{to: [{operation: {ports: ["eighty"]}}]}]
"#;

const DENY_SERVICE_ENTRY: &str = r#"
kind: AuthorizationPolicy
metadata: {namespace: shop, name: deny-service-entry}
spec:
  targetRefs: [{kind: ServiceEntry, group: networking.istio.io, name: external}]
  action: DENY
  rules: [{to: [{operation: {paths: ["/x"]}}]}]
"#;

const SELECTOR_AND_TARGETS_DENY: &str = r"
kind: AuthorizationPolicy
metadata: {namespace: shop, name: both}
spec:
  selector: {matchLabels: {app: web}}
  targetRefs: [{kind: Service, name: web}]
  action: DENY
  rules: [{}]
";

// ---------------------------------------------------------------------------------------------
// Requests.

#[derive(Clone, Copy)]
struct Req {
    method: &'static str,
    path: &'static str,
    host: &'static str,
    headers: &'static [(&'static str, &'static str)],
    /// The verified token's claims (JSON), if any.
    jwt: Option<&'static str>,
    /// Source `(namespace, account)`, or plaintext.
    source: Option<(&'static str, &'static str)>,
    port: u16,
    service: (&'static str, &'static str),
}

const GET: Req = Req {
    method: "GET",
    path: "/",
    host: "web.shop.svc.cluster.local",
    headers: &[],
    jwt: None,
    source: Some(("shop", "client")),
    port: 80,
    service: ("shop", "web"),
};

const fn get(path: &'static str) -> Req {
    Req { path, ..GET }
}

const fn method(method: &'static str, path: &'static str) -> Req {
    Req {
        method,
        path,
        ..GET
    }
}

const fn host(host: &'static str) -> Req {
    Req { host, ..GET }
}

const fn headers(headers: &'static [(&'static str, &'static str)]) -> Req {
    Req { headers, ..GET }
}

const fn jwt(claims: &'static str) -> Req {
    Req {
        jwt: Some(claims),
        ..GET
    }
}

const fn from(ns: &'static str, sa: &'static str) -> Req {
    Req {
        source: Some((ns, sa)),
        ..GET
    }
}

const fn to_service(ns: &'static str, name: &'static str) -> Req {
    Req {
        service: (ns, name),
        ..GET
    }
}

const ALICE: &str = r#"{"iss": "https://issuer.example", "sub": "alice", "aud": ["shop", "blog"], "groups": ["admins", "dev"], "org": {"tier": "gold"}}"#;
const BOB: &str = r#"{"iss": "https://other.example", "sub": "bob", "aud": "shop", "groups": "dev", "org": {"tier": "free"}}"#;
const CAROL_NUMERIC_GROUPS: &str =
    r#"{"iss": "https://issuer.example", "sub": "carol", "aud": "shop", "groups": [1, 2]}"#;

fn verified(claims: &str) -> VerifiedJwt {
    let claims: serde_json::Value = serde_json::from_str(claims).expect("test claims are JSON");
    let text = |k: &str| claims[k].as_str().unwrap_or_default().to_owned();
    let audiences = match &claims["aud"] {
        serde_json::Value::String(a) => vec![a.clone()],
        serde_json::Value::Array(a) => a
            .iter()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect(),
        _ => Vec::new(),
    };
    VerifiedJwt {
        principal: format!("{}/{}", text("iss"), text("sub")),
        issuer: text("iss"),
        subject: text("sub"),
        audiences,
        claims,
        token_headers: Vec::new(),
    }
}

fn decide(policies: &[&str], req: Req) -> Expect {
    let engine = engine(policies);
    let mut map = HeaderMap::new();
    for (name, value) in req.headers {
        map.append(
            HeaderName::from_bytes(name.as_bytes()).expect("test header name"),
            HeaderValue::from_str(value).expect("test header value"),
        );
    }
    let jwt = req.jwt.map(verified);
    let identity = req
        .source
        .map(|(ns, sa)| Identity::new("cluster.local", ns, sa).expect("test identity"));
    let labels = BTreeMap::from([("app".to_owned(), req.service.1.to_owned())]);
    let flow = Flow {
        destination: Destination {
            namespace: req.service.0,
            labels: &labels,
        },
        port: req.port,
        source: identity.as_ref(),
        source_ip: None,
    };
    let target = WaypointTarget {
        gateway_namespace: "shop",
        gateway_name: "waypoint",
        services: &[req.service],
    };
    let facts = RequestFacts {
        method: req.method,
        path: req.path,
        host: req.host,
        headers: &map,
        jwt: jwt.as_ref(),
    };
    classify(&engine.decide_request(&target, &flow, &facts))
}

struct Case {
    name: &'static str,
    policies: &'static [&'static str],
    req: Req,
    expect: Expect,
}

#[rustfmt::skip]
const TABLE: &[Case] = &[
    Case { name: "no policy attached allows", policies: &[], req: GET, expect: AllowDefault },

    // Methods and paths.
    Case { name: "GET under the prefix", policies: &[GET_API_ON_WAYPOINT], req: get("/api/orders"), expect: Allow("shop/get-api", 0) },
    Case { name: "prefix /api/* does not match /api", policies: &[GET_API_ON_WAYPOINT], req: get("/api"), expect: DenyNoAllow },
    Case { name: "POST is not GET", policies: &[GET_API_ON_WAYPOINT], req: method("POST", "/api/orders"), expect: DenyNoAllow },
    Case { name: "methods are case-sensitive", policies: &[GET_API_ON_WAYPOINT], req: method("get", "/api/orders"), expect: DenyNoAllow },
    Case { name: "paths are case-sensitive", policies: &[GET_API_ON_WAYPOINT], req: get("/API/orders"), expect: DenyNoAllow },
    Case { name: "a query does not take part in path matching", policies: &[GET_API_ON_WAYPOINT], req: get("/api/x?admin=1"), expect: Allow("shop/get-api", 0) },
    Case { name: "DENY exact path", policies: &[DENY_ADMIN_ON_WEB], req: get("/admin"), expect: Deny("shop/deny-admin", 0) },
    Case { name: "DENY prefix covers the subtree", policies: &[DENY_ADMIN_ON_WEB], req: get("/admin/users"), expect: Deny("shop/deny-admin", 0) },
    Case { name: "DENY prefix covers the trailing slash", policies: &[DENY_ADMIN_ON_WEB], req: get("/admin/"), expect: Deny("shop/deny-admin", 0) },
    Case { name: "DENY exact path spares a longer name", policies: &[DENY_ADMIN_ON_WEB], req: get("/administrator"), expect: AllowDefault },
    Case { name: "DENY of /admin does not cover /ADMIN", policies: &[DENY_ADMIN_ON_WEB], req: get("/ADMIN"), expect: AllowDefault },
    Case { name: "notMethods and notPaths: POST outside /public denied", policies: &[DENY_WRITES], req: method("POST", "/orders"), expect: Deny("shop/deny-writes", 0) },
    Case { name: "notMethods: GET passes", policies: &[DENY_WRITES], req: get("/orders"), expect: AllowDefault },
    Case { name: "notPaths: POST under /public passes", policies: &[DENY_WRITES], req: method("POST", "/public/form"), expect: AllowDefault },

    // Hosts.
    Case { name: "host exact", policies: &[ALLOW_HOSTS], req: GET, expect: Allow("shop/hosts", 0) },
    Case { name: "host case-insensitive, port-insensitive", policies: &[ALLOW_HOSTS], req: host("Web.Shop.SVC.cluster.local:8080"), expect: Allow("shop/hosts", 0) },
    Case { name: "host with a trailing dot", policies: &[ALLOW_HOSTS], req: host("web.shop.svc.cluster.local."), expect: Allow("shop/hosts", 0) },
    Case { name: "host suffix pattern", policies: &[ALLOW_HOSTS], req: host("api.example.com"), expect: Allow("shop/hosts", 0) },
    Case { name: "suffix pattern does not match the bare domain", policies: &[ALLOW_HOSTS], req: host("example.com"), expect: DenyNoAllow },
    Case { name: "other host", policies: &[ALLOW_HOSTS], req: host("web.shop"), expect: DenyNoAllow },

    // DENY over ALLOW; ALLOW must match.
    Case { name: "DENY wins over a matching ALLOW", policies: &[ALLOW_ALL_ON_WEB, DENY_ADMIN_ON_WEB], req: get("/admin"), expect: Deny("shop/deny-admin", 0) },
    Case { name: "ALLOW where the DENY does not match", policies: &[ALLOW_ALL_ON_WEB, DENY_ADMIN_ON_WEB], req: get("/home"), expect: Allow("shop/allow-all-web", 0) },
    Case { name: "ALLOW on the gateway or the service may match", policies: &[GET_API_ON_WAYPOINT, ALLOW_HOSTS], req: get("/home"), expect: Allow("shop/hosts", 0) },

    // Request principals.
    Case { name: "requestPrincipals * needs a JWT", policies: &[ALLOW_ANY_JWT], req: GET, expect: DenyNoAllow },
    Case { name: "requestPrincipals * with a JWT", policies: &[ALLOW_ANY_JWT], req: jwt(BOB), expect: Allow("shop/any-jwt", 0) },
    Case { name: "requestPrincipals prefix: the issuer", policies: &[ALLOW_ISSUER_PREFIX], req: jwt(ALICE), expect: Allow("shop/issuer", 0) },
    Case { name: "requestPrincipals prefix: another issuer", policies: &[ALLOW_ISSUER_PREFIX], req: jwt(BOB), expect: DenyNoAllow },
    Case { name: "notRequestPrincipals *: no JWT denied", policies: &[DENY_WITHOUT_JWT], req: GET, expect: Deny("shop/require-jwt", 0) },
    Case { name: "notRequestPrincipals *: a JWT passes", policies: &[DENY_WITHOUT_JWT], req: jwt(ALICE), expect: AllowDefault },

    // when: headers.
    Case { name: "header value exact", policies: &[ALLOW_TENANT_HEADER], req: headers(&[("x-tenant", "acme")]), expect: Allow("shop/tenant", 0) },
    Case { name: "header value prefix", policies: &[ALLOW_TENANT_HEADER], req: headers(&[("x-tenant", "beta-3")]), expect: Allow("shop/tenant", 0) },
    Case { name: "header absent", policies: &[ALLOW_TENANT_HEADER], req: GET, expect: DenyNoAllow },
    Case { name: "header values are case-sensitive", policies: &[ALLOW_TENANT_HEADER], req: headers(&[("x-tenant", "ACME")]), expect: DenyNoAllow },
    Case { name: "ALLOW: every value of a repeated header must match", policies: &[ALLOW_TENANT_HEADER], req: headers(&[("x-tenant", "acme"), ("x-tenant", "evil")]), expect: DenyNoAllow },
    Case { name: "ALLOW: every value of a repeated header must match, in any order", policies: &[ALLOW_TENANT_HEADER], req: headers(&[("x-tenant", "evil"), ("x-tenant", "acme")]), expect: DenyNoAllow },
    Case { name: "ALLOW: a repeated header whose values all match", policies: &[ALLOW_TENANT_HEADER], req: headers(&[("x-tenant", "acme"), ("x-tenant", "beta-1")]), expect: Allow("shop/tenant", 0) },
    Case { name: "ALLOW notValues: one excluded value among several", policies: &[ALLOW_NOT_TENANT_EVIL], req: headers(&[("x-tenant", "acme"), ("x-tenant", "evil")]), expect: DenyNoAllow },
    Case { name: "ALLOW notValues: no excluded value", policies: &[ALLOW_NOT_TENANT_EVIL], req: headers(&[("x-tenant", "acme"), ("x-tenant", "beta")]), expect: Allow("shop/not-evil", 0) },
    Case { name: "DENY: any value of a repeated header matching denies", policies: &[DENY_DEBUG_ON], req: headers(&[("x-debug", "1"), ("x-debug", "0")]), expect: DenyFailClosed("shop/debug-on", 0) },
    Case { name: "DENY: any value, in any order", policies: &[DENY_DEBUG_ON], req: headers(&[("x-debug", "0"), ("x-debug", "1")]), expect: DenyFailClosed("shop/debug-on", 0) },
    Case { name: "DENY: every value matching denies surely", policies: &[DENY_DEBUG_ON], req: headers(&[("x-debug", "1"), ("x-debug", "1")]), expect: Deny("shop/debug-on", 0) },
    Case { name: "DENY: no value matching passes", policies: &[DENY_DEBUG_ON], req: headers(&[("x-debug", "0"), ("x-debug", "2")]), expect: AllowDefault },
    Case { name: "DENY: one field line is one value, commas included", policies: &[DENY_DEBUG_ON], req: headers(&[("x-debug", "1,0")]), expect: AllowDefault },
    Case { name: "header presence (*) denies", policies: &[DENY_DEBUG_HEADER], req: headers(&[("X-Debug", "")]), expect: Deny("shop/no-debug", 0) },
    Case { name: "header presence: absent passes", policies: &[DENY_DEBUG_HEADER], req: GET, expect: AllowDefault },

    // when: JWT claims and audiences.
    Case { name: "claim list contains, audience listed, nested notValues", policies: &[ALLOW_ADMINS_GROUP], req: jwt(ALICE), expect: Allow("shop/admins", 0) },
    Case { name: "claim string not equal", policies: &[ALLOW_ADMINS_GROUP], req: jwt(BOB), expect: DenyNoAllow },
    Case { name: "claims need a JWT", policies: &[ALLOW_ADMINS_GROUP], req: GET, expect: DenyNoAllow },
    Case { name: "a claim of numbers is never matched", policies: &[ALLOW_ADMINS_GROUP], req: jwt(CAROL_NUMERIC_GROUPS), expect: DenyNoAllow },

    // when: connection attributes.
    Case { name: "source namespace, principal and port", policies: &[ALLOW_SHOP_SOURCES_WHEN], req: GET, expect: Allow("shop/shop-sources", 0) },
    Case { name: "source principal in notValues", policies: &[ALLOW_SHOP_SOURCES_WHEN], req: from("shop", "api"), expect: DenyNoAllow },
    Case { name: "source namespace not listed", policies: &[ALLOW_SHOP_SOURCES_WHEN], req: from("blog", "client"), expect: DenyNoAllow },
    Case { name: "destination port not listed", policies: &[ALLOW_SHOP_SOURCES_WHEN], req: Req { port: 8080, ..GET }, expect: DenyNoAllow },

    // Fail closed: unknown keys and unmatchable values.
    Case { name: "DENY with an unknown when key matches on its other fields", policies: &[DENY_UNKNOWN_KEY], req: method("DELETE", "/x"), expect: DenyFailClosed("shop/deny-unknown-key", 0) },
    Case { name: "DENY with an unknown when key spares what it surely excludes", policies: &[DENY_UNKNOWN_KEY], req: GET, expect: AllowDefault },
    Case { name: "ALLOW with an unknown when key matches nothing", policies: &[ALLOW_UNKNOWN_KEY], req: GET, expect: DenyNoAllow },
    Case { name: "ALLOW rule with an unmatchable path matches nothing", policies: &[ALLOW_BAD_PATH_PATTERN], req: get("/api/x/items"), expect: DenyNoAllow },
    Case { name: "other rules of that ALLOW still match", policies: &[ALLOW_BAD_PATH_PATTERN], req: get("/health"), expect: Allow("shop/bad-pattern", 1) },
    Case { name: "DENY with an unmatchable path matches on its method", policies: &[DENY_BAD_PATH_PATTERN], req: method("POST", "/z"), expect: DenyFailClosed("shop/deny-bad-pattern", 0) },
    Case { name: "DENY with an unmatchable path spares other methods", policies: &[DENY_BAD_PATH_PATTERN], req: GET, expect: AllowDefault },

    // Which policies apply.
    Case { name: "a policy on another service does not apply", policies: &[DENY_ON_DB], req: GET, expect: AllowDefault },
    Case { name: "a policy on the service applies", policies: &[DENY_ON_DB], req: to_service("shop", "db"), expect: Deny("shop/deny-db", 0) },
    Case { name: "a policy on another gateway does not apply", policies: &[DENY_ON_OTHER_GATEWAY], req: GET, expect: AllowDefault },
    Case { name: "a Service target is in the policy's namespace", policies: &[OTHER_NS_DENY_WEB], req: GET, expect: AllowDefault },
    Case { name: "the same name in the policy's namespace", policies: &[OTHER_NS_DENY_WEB], req: to_service("blog", "web"), expect: Deny("blog/deny-web", 0) },
    Case { name: "the gateway policy applies to every service it serves", policies: &[GET_API_ON_WAYPOINT], req: Req { service: ("blog", "web"), ..get("/x") }, expect: DenyNoAllow },
    Case { name: "root-namespace GatewayClass applies at every waypoint", policies: &[ROOT_CLASS_DENY_TRACE], req: method("TRACE", "/"), expect: Deny("trellis-system/no-trace", 0) },
    Case { name: "GatewayClass outside the root namespace binds nothing", policies: &[NON_ROOT_CLASS_DENY_ALL], req: GET, expect: AllowDefault },
    Case { name: "root-namespace policies without targetRefs stay on workloads", policies: &[ROOT_WIDE_DENY_ALL], req: GET, expect: AllowDefault },
    Case { name: "selector policies stay on workloads", policies: &[SELECTOR_DENY_GET], req: GET, expect: AllowDefault },

    // Rejected waypoint policies: stand-ins.
    Case { name: "rejected ALLOW on the service allows nothing there", policies: &[ALLOW_BAD_PORT_ON_WEB], req: GET, expect: DenyNoAllow },
    Case { name: "rejected ALLOW leaves other services alone", policies: &[ALLOW_BAD_PORT_ON_WEB], req: to_service("shop", "db"), expect: AllowDefault },
    Case { name: "unsupported target kind: DENY at every waypoint of the namespace", policies: &[DENY_SERVICE_ENTRY], req: GET, expect: Deny("shop/deny-service-entry", 0) },
    Case { name: "unsupported target kind: the namespace's waypoint, for any service", policies: &[DENY_SERVICE_ENTRY], req: Req { service: ("blog", "web"), ..GET }, expect: Deny("shop/deny-service-entry", 0) },
    Case { name: "selector and targetRefs: DENY at the waypoints too", policies: &[SELECTOR_AND_TARGETS_DENY], req: GET, expect: Deny("shop/both", 0) },
];

#[test]
fn waypoint_decision_table() {
    assert!(TABLE.len() >= 60, "the table covers at least 60 cases");
    let mut failures = Vec::new();
    for case in TABLE {
        let got = decide(case.policies, case.req);
        if got != case.expect {
            failures.push(format!(
                "{}: expected {:?}, got {got:?}",
                case.name, case.expect
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
// Where policies apply, and their status.

#[test]
fn node_agents_and_waypoints_split_the_policies() {
    let engine = engine(&[
        GET_API_ON_WAYPOINT,
        SELECTOR_DENY_GET,
        SELECTOR_AND_TARGETS_DENY,
    ]);
    // The rejected object with both binds in both places.
    assert_eq!(engine.authorization.len(), 2);
    assert_eq!(engine.waypoint.len(), 2);
    let labels = BTreeMap::from([("app".to_owned(), "web".to_owned())]);
    let dest = Destination {
        namespace: "shop",
        labels: &labels,
    };
    let names: Vec<String> = engine
        .authorization
        .applicable(&dest)
        .iter()
        .map(|p| p.id.to_string())
        .collect();
    assert_eq!(names, ["shop/both", "shop/selector-deny"]);
    let target = WaypointTarget {
        gateway_namespace: "shop",
        gateway_name: "waypoint",
        services: &[("shop", "web")],
    };
    let names: Vec<String> = engine
        .waypoint
        .applicable(&target)
        .iter()
        .map(|p| p.id.to_string())
        .collect();
    assert_eq!(names, ["shop/both", "shop/get-api"]);
}

#[test]
fn a_policy_attached_twice_is_evaluated_once() {
    let both = r#"
kind: AuthorizationPolicy
metadata: {namespace: shop, name: twice}
spec:
  targetRefs: [{kind: Gateway, name: waypoint}, {kind: Service, name: web}, {kind: Service, name: web}]
  rules: [{to: [{operation: {methods: ["PUT"]}}]}]
"#;
    assert_eq!(
        authz(both).binding,
        Binding::Targets(vec![
            TargetRef::Gateway("waypoint".into()),
            TargetRef::Service("web".into())
        ])
    );
    let engine = engine(&[both]);
    let target = WaypointTarget {
        gateway_namespace: "shop",
        gateway_name: "waypoint",
        services: &[("shop", "web")],
    };
    assert_eq!(engine.waypoint.applicable(&target).len(), 1);
    // One ALLOW policy, counted once when none matches.
    let decision = {
        let map = HeaderMap::new();
        let flow = Flow {
            destination: Destination {
                namespace: "shop",
                labels: &BTreeMap::new(),
            },
            port: 80,
            source: None,
            source_ip: None,
        };
        engine.decide_request(
            &target,
            &flow,
            &RequestFacts {
                method: "GET",
                path: "/",
                host: "web",
                headers: &map,
                jwt: None,
            },
        )
    };
    assert_eq!(
        decision.to_string(),
        "deny: 1 ALLOW policy applies to the workload and none matched"
    );
}

#[test]
fn request_attributes_are_enforced_at_waypoints_and_partial_on_workloads() {
    let c = condition_of(GET_API_ON_WAYPOINT);
    assert_eq!((c.status.as_str(), c.reason.as_str()), ("True", "Accepted"));
    let c = condition_of(SELECTOR_DENY_GET);
    assert_eq!(c.reason, "PartiallyEnforced");
    assert!(
        c.message.contains(
            "spec.rules[0].to[0].operation.methods: HTTP methods cannot be evaluated at L4 (needs a waypoint: attach the policy to one with targetRefs"
        ),
        "{}",
        c.message
    );
    let c = condition_of(ALLOW_BAD_PATH_PATTERN);
    assert_eq!(c.reason, "PartiallyEnforced");
    assert!(
        c.message.contains(
            "spec.rules[0].to[0].operation.paths[0]: \"/api/*/items\" cannot be matched as written"
        ),
        "{}",
        c.message
    );
    let c = condition_of(ALLOW_UNKNOWN_KEY);
    assert!(
        c.message
            .contains("spec.rules[0].when[0].key: \"source.ip\" is not a supported condition key"),
        "{}",
        c.message
    );
}

#[test]
fn unmatchable_values_are_named() {
    let values = r#"
kind: AuthorizationPolicy
metadata: {namespace: shop, name: values}
spec:
  targetRefs: [{kind: Service, name: web}]
  action: DENY
  rules:
  - to: [{operation: {hosts: ["web:80"], methods: ["G*"], paths: ["/a//b", "admin", "*.js"]}}]
    from: [{source: {requestPrincipals: ["a*b"], remoteIpBlocks: ["10.0.0.0/8"]}}]
    when: [{key: destination.port, values: ["http"]}, {key: "request.headers[x]"}]
"#;
    let c = condition_of(values);
    for expected in [
        "operation.hosts[0]: \"web:80\"",
        "operation.methods[0]: \"G*\"",
        "operation.paths[0]: \"/a//b\"",
        "operation.paths[1]: \"admin\"",
        "source.requestPrincipals[0]: \"a*b\"",
        "source.remoteIpBlocks: remote IP blocks (X-Forwarded-For) is not supported",
        "when[0].values[0]: \"http\" cannot be matched as written: ports are numbers",
        "when[1]: a condition without values or notValues is not supported",
    ] {
        assert!(
            c.message.contains(expected),
            "{expected:?} in {}",
            c.message
        );
    }
    assert!(!c.message.contains("paths[2]"), "*.js is a valid suffix");
}

#[test]
fn invalid_bindings_are_rejected_with_a_stand_in_where_the_author_aimed() {
    let c = condition_of(SELECTOR_AND_TARGETS_DENY);
    assert_eq!(c.reason, "Unsupported");
    assert!(
        c.message
            .contains("spec.targetRefs: a policy may have a selector or targetRefs, not both"),
        "{}",
        c.message
    );
    assert!(
        c.message.contains(
            "denying every connection to the workloads it may select and the waypoints serving its namespace"
        ),
        "{}",
        c.message
    );
    let c = condition_of(DENY_SERVICE_ENTRY);
    assert!(
        c.message
            .contains("spec.targetRefs[0].kind: \"networking.istio.io/ServiceEntry\" is not a supported target"),
        "{}",
        c.message
    );
    let other_ns = r"
kind: AuthorizationPolicy
metadata: {namespace: shop, name: other-ns}
spec:
  targetRefs: [{kind: Service, name: web, namespace: blog}]
  rules: [{}]
";
    let policy = authz(other_ns);
    assert_eq!(policy.binding, Binding::NamespaceWaypoints);
    assert!(matches!(
        policy.enforcement,
        Enforcement::Rejected {
            stand_in: StandIn::AllowNothing,
            ..
        }
    ));
    let c = condition_of(other_ns);
    assert!(
        c.message
            .contains("spec.targetRefs[0].namespace: targets in another namespace (\"blog\")"),
        "{}",
        c.message
    );
    let malformed = r"
kind: AuthorizationPolicy
metadata: {namespace: shop, name: malformed}
spec:
  targetRefs: [{kind: Service}]
  action: DENY
";
    let c = condition_of(malformed);
    assert_eq!(c.reason, "Invalid");
    assert!(
        c.message.contains("spec.targetRefs[0].name: is missing"),
        "{}",
        c.message
    );
    let policy = authz(ALLOW_BAD_PORT_ON_WEB);
    assert_eq!(
        policy.binding,
        Binding::Targets(vec![TargetRef::Service("web".into())])
    );
    assert_eq!(policy.action, Action::Allow);
    let c = condition_of(ALLOW_BAD_PORT_ON_WEB);
    assert!(
        c.message
            .contains("on the waypoints and services it targets"),
        "{}",
        c.message
    );
}

#[test]
fn an_unreadable_spec_denies_at_the_waypoints_too() {
    let meta = k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
        namespace: Some("shop".into()),
        name: Some("broken".into()),
        ..Default::default()
    };
    let Ok(Policy::Authorization(policy)) = Policy::compile(
        PolicyKind::Authorization,
        &meta,
        &serde_json::json!({"targetRefs": [{"kind": "Service", "name": "web"}], "rules": 7}),
    ) else {
        panic!("expected an authorization policy");
    };
    assert_eq!(policy.binding, Binding::Everywhere);
    let engine = Engine::new(super::ROOT, [policy], []);
    let target = WaypointTarget {
        gateway_namespace: "blog",
        gateway_name: "waypoint",
        services: &[("shop", "web")],
    };
    assert_eq!(engine.waypoint.applicable(&target).len(), 1);
    let elsewhere = WaypointTarget {
        gateway_namespace: "blog",
        gateway_name: "waypoint",
        services: &[("blog", "web")],
    };
    assert!(engine.waypoint.applicable(&elsewhere).is_empty());
}
