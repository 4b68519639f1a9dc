//! Specification tests of waypoint routing. Routes are written as users write them (YAML
//! manifests) and go through [`compile`] exactly as in production; requests are `http` parts.
//!
//! Fixtures: namespace `shop`, waypoint Gateway `shop/waypoint`, Services `shop/web` (port
//! 8080), `shop/v1`, `shop/v2`.

mod backends;
mod conversion;
mod filters;
mod hostile;
mod matching;
mod precedence;
mod status;

use http::request::Parts;

use super::{CompiledRoute, GatewayRef, RouteKind, RouteTable, Routing, ServiceRef, compile};

const GW: GatewayRef<'static> = GatewayRef {
    namespace: "shop",
    name: "waypoint",
};

const WEB: ServiceRef<'static> = ServiceRef {
    namespace: "shop",
    name: "web",
    port: 8080,
};

/// Converts one manifest (`kind`, `metadata`, `spec`) as the waypoint does.
fn route(manifest: &str) -> CompiledRoute {
    let value: serde_json::Value = serde_saphyr::from_str(manifest).expect("test manifest is YAML");
    let kind = value["kind"]
        .as_str()
        .expect("manifest has a kind")
        .parse::<RouteKind>()
        .expect("manifest is a route kind");
    let meta = &value["metadata"];
    compile(
        kind,
        meta["namespace"].as_str().unwrap_or("shop"),
        meta["name"].as_str().expect("manifest has a name"),
        meta["generation"].as_i64(),
        &value["spec"],
    )
}

/// A route expected to be programmed.
fn valid(manifest: &str) -> CompiledRoute {
    let compiled = route(manifest);
    if let Err(e) = &compiled.outcome {
        panic!("{} should be valid, rejected: {e}", compiled.id);
    }
    compiled
}

/// The reason a route is not programmed.
fn rejection(manifest: &str) -> String {
    match route(manifest).outcome {
        Ok(_) => panic!("route should be rejected:\n{manifest}"),
        Err(e) => e.to_string(),
    }
}

fn table(manifests: &[&str]) -> RouteTable {
    RouteTable::new(manifests.iter().map(|m| route(m)))
}

/// A request: method, URI (origin form with a `Host` header, or absolute) and headers.
fn request(method: &str, uri: &str, headers: &[(&str, &str)]) -> Parts {
    let mut builder = http::Request::builder().method(method).uri(uri);
    if !uri.starts_with("http") {
        builder = builder.header("host", "web.shop.svc.cluster.local:8080");
    }
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    builder
        .body(())
        .expect("test request is valid")
        .into_parts()
        .0
}

fn get(uri: &str) -> Parts {
    request("GET", uri, &[])
}

/// `name#rule` of the matched rule, `404` for no match, `-` for not routed.
fn routed(table: &RouteTable, service: &ServiceRef<'_>, request: &Parts) -> String {
    match table.lookup(&GW, service, request) {
        Routing::Matched(m) => format!("{}#{}", m.id().route.name, m.id().index),
        Routing::NoMatch => "404".into(),
        Routing::NotRouted => "-".into(),
    }
}

/// Deterministic pseudo-random numbers (splitmix64), uniform over `u64`.
fn randoms(count: usize) -> impl Iterator<Item = u64> {
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    std::iter::repeat_with(move || {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    })
    .take(count)
}
