//! What the kernel is told to refuse for plaintext: [`Engine::plaintext_refusals`] is the
//! engine's own verdict for a caller without an identity, on every port that can decide
//! differently.

use std::collections::BTreeMap;

use super::{Destination, Engine, Flow, engine};

/// Whether ports no policy names refuse plaintext, and the named ports that differ.
type Refusals = (bool, BTreeMap<u16, bool>);

fn refusals(manifests: &[&str]) -> Refusals {
    let engine = engine(manifests);
    let labels = BTreeMap::from([("app".to_owned(), "db".to_owned())]);
    engine.plaintext_refusals(&Destination {
        namespace: "shop",
        labels: &labels,
    })
}

fn authz(spec: &str) -> String {
    format!(
        "apiVersion: security.trellis.dev/v1\nkind: AuthorizationPolicy\n\
         metadata: {{namespace: shop, name: p}}\nspec: {spec}\n"
    )
}

fn peer(spec: &str) -> String {
    format!(
        "apiVersion: security.trellis.dev/v1\nkind: PeerAuthentication\n\
         metadata: {{namespace: shop, name: m}}\nspec: {spec}\n"
    )
}

#[test]
fn plaintext_is_refused_exactly_where_the_engine_denies_a_caller_without_identity() {
    let allow_web = authz(
        "{selector: {matchLabels: {app: db}}, \
         rules: [{from: [{source: {principals: [cluster.local/ns/shop/sa/web]}}]}]}",
    );
    let allow_web_on_5432 = authz(
        "{selector: {matchLabels: {app: db}}, rules: [{from: [{source: \
         {principals: [cluster.local/ns/shop/sa/web]}}], to: [{operation: {ports: ['5432']}}]}]}",
    );
    let allow_anyone_on_9090 = authz("{rules: [{to: [{operation: {ports: ['9090']}}]}]}");
    let deny_web = authz(
        "{action: DENY, rules: [{from: [{source: {principals: [cluster.local/ns/shop/sa/web]}}]}]}",
    );
    let deny_not_shop = authz(
        "{action: DENY, rules: [{from: [{source: {notNamespaces: [shop]}}], \
         to: [{operation: {notPorts: ['8081']}}]}]}",
    );
    let allow_ip = authz("{rules: [{from: [{source: {ipBlocks: [10.0.0.0/8]}}]}]}");
    let deny_port_when =
        authz("{action: DENY, rules: [{when: [{key: destination.port, values: ['7000']}]}]}");
    let strict = peer(
        "{mtls: {mode: STRICT}, selector: {matchLabels: {app: db}}, \
         portLevelMtls: {'8080': {mode: PERMISSIVE}}}",
    );
    let none = BTreeMap::new();
    let table: Vec<(&str, Vec<&str>, Refusals)> = vec![
        (
            "no policy: plaintext is let in",
            vec![],
            (false, none.clone()),
        ),
        (
            "an ALLOW that needs a principal refuses it everywhere",
            vec![&allow_web],
            (true, none.clone()),
        ),
        (
            "an ALLOW on one port still refuses it everywhere (no rule admits it)",
            vec![&allow_web_on_5432],
            (true, none.clone()),
        ),
        (
            "an ALLOW of anyone on one port opens that port only",
            vec![&allow_anyone_on_9090],
            (true, BTreeMap::from([(9090, false)])),
        ),
        (
            "a DENY of a principal does not touch plaintext",
            vec![&deny_web],
            (false, none.clone()),
        ),
        (
            "a DENY of everyone outside the namespace denies plaintext except on notPorts",
            vec![&deny_not_shop],
            (true, BTreeMap::from([(8081, false)])),
        ),
        (
            "ipBlocks cannot be weighed for plaintext: refused",
            vec![&allow_ip],
            (true, none.clone()),
        ),
        (
            "a DENY with a `when` condition, which a node cannot evaluate, fails closed",
            vec![&deny_port_when],
            (true, none.clone()),
        ),
        (
            "STRICT refuses it, a port-level PERMISSIVE opens that port",
            vec![&strict],
            (true, BTreeMap::from([(8080, false)])),
        ),
        (
            "a port PERMISSIVE for mutual TLS is still closed by an ALLOW",
            vec![&strict, &allow_web],
            (true, none.clone()),
        ),
    ];
    for (what, manifests, want) in table {
        assert_eq!(refusals(&manifests), want, "{what}");
    }
}

#[test]
fn the_refusals_agree_with_the_engine_on_every_port() {
    let manifests = [
        authz("{rules: [{to: [{operation: {ports: ['9090', '9091']}}]}]}"),
        authz("{action: DENY, rules: [{to: [{operation: {ports: ['9091']}}]}]}"),
        peer("{mtls: {mode: PERMISSIVE}, portLevelMtls: {'9092': {mode: STRICT}}}"),
    ];
    let manifests: Vec<&str> = manifests.iter().map(String::as_str).collect();
    let engine: Engine = engine(&manifests);
    let labels = BTreeMap::from([("app".to_owned(), "db".to_owned())]);
    let destination = Destination {
        namespace: "shop",
        labels: &labels,
    };
    let (default, ports) = engine.plaintext_refusals(&destination);
    for port in [1, 80, 9089, 9090, 9091, 9092, 9093, 65535] {
        let refused = !engine
            .decide(&Flow {
                destination,
                port,
                source: None,
                source_ip: None,
            })
            .is_allowed();
        assert_eq!(
            ports.get(&port).copied().unwrap_or(default),
            refused,
            "port {port}"
        );
    }
}
