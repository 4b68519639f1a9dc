//! Paths as a waypoint authorizes them: however a client spells a target, policies on a path
//! judge its one normal form ([`normalize_path`]), the path the backend receives; a target
//! that has none is refused (400) before authorization.

use std::collections::BTreeMap;

use http::HeaderMap;
use proptest::{prelude::*, sample::select};

use super::engine;
use crate::{
    identity::Identity,
    policy::{
        engine::{Engine, Verdict},
        facts::{Destination, Flow, RequestFacts, WaypointTarget},
        normalize::normalize_path,
    },
};

const DENY_ADMIN: &str = r#"
kind: AuthorizationPolicy
metadata: {namespace: shop, name: deny-admin}
spec:
  targetRefs: [{kind: Service, name: web}]
  action: DENY
  rules:
  - to: [{operation: {paths: ["/admin", "/admin/*"]}}]
"#;

const ALLOW_PUBLIC: &str = r#"
kind: AuthorizationPolicy
metadata: {namespace: shop, name: allow-public}
spec:
  targetRefs: [{kind: Service, name: web}]
  rules:
  - to: [{operation: {paths: ["/public/*"]}}]
"#;

/// The waypoint's verdict on a GET of `path` (normalized, the query passed along) for
/// service `shop/web`.
fn verdict(engine: &Engine, path: &str) -> Verdict {
    let client = Identity::new("cluster.local", "shop", "client").expect("test identity");
    let labels = BTreeMap::new();
    let flow = Flow {
        destination: Destination {
            namespace: "shop",
            labels: &labels,
        },
        port: 80,
        source: Some(&client),
        source_ip: None,
    };
    let target = WaypointTarget {
        gateway_namespace: "shop",
        gateway_name: "waypoint",
        services: &[("shop", "web")],
    };
    let headers = HeaderMap::new();
    let facts = RequestFacts {
        method: "GET",
        path,
        host: "web.shop.svc.cluster.local",
        headers: &headers,
        jwt: None,
    };
    engine.decide_request(&target, &flow, &facts).verdict
}

/// Pieces of targets that land in, near or around the protected prefixes, in many spellings.
fn piece() -> impl Strategy<Value = &'static str> {
    select(vec![
        "/",
        "//",
        ".",
        "..",
        "%2e",
        "%2E",
        "%2e%2e",
        ".%2e",
        "admin",
        "ADMIN",
        "%61dmin",
        "%61%64%6d%69%6e",
        "adm%69n",
        "admin2",
        "public",
        "%70ublic",
        "publi%63",
        "x",
        "~",
        "%7E",
        "%41",
        "%2F",
        "%5C",
        ";",
        "%3B",
        "?",
        "q=/admin",
        "#",
        "%00",
        "%c3%a9",
    ])
}

fn target() -> impl Strategy<Value = String> {
    prop::collection::vec(piece(), 0..12).prop_map(|pieces| format!("/{}", pieces.concat()))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn a_path_under_a_denied_prefix_is_denied_however_it_is_spelled(raw in target()) {
        // A target without a normal form never reaches authorization.
        let Ok(normal) = normalize_path(&raw) else { return Ok(()) };
        let path = normal.path();
        let protected = path == "/admin" || path.starts_with("/admin/");
        let engine = engine(&[DENY_ADMIN]);
        let denied = verdict(&engine, &normal.path_and_query()) == Verdict::Deny;
        prop_assert_eq!(denied, protected, "{:?} normalizes to {}", raw, normal);
    }

    #[test]
    fn only_paths_under_an_allowed_prefix_are_allowed(raw in target()) {
        let Ok(normal) = normalize_path(&raw) else { return Ok(()) };
        let engine = engine(&[ALLOW_PUBLIC]);
        let allowed = verdict(&engine, &normal.path_and_query()) == Verdict::Allow;
        prop_assert_eq!(
            allowed,
            normal.path().starts_with("/public/"),
            "{:?} normalizes to {}",
            raw,
            normal
        );
    }
}
