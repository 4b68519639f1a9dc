//! The Istio group's objects compile into the twins' model, with the group's differences and
//! the same fail-closed rules.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde_json::{Value, json};

use crate::{
    identity::Identity,
    policy::{
        Binding, Engine, PolicyError, PolicyKind, SecurityGroup, TargetRef,
        engine::Decision,
        facts::{Destination, Flow},
        model::{Enforcement, StandIn, Why},
        stored::Policy,
    },
};

fn meta() -> ObjectMeta {
    ObjectMeta {
        namespace: Some("shop".into()),
        name: Some("p".into()),
        generation: Some(2),
        ..ObjectMeta::default()
    }
}

fn compile(group: SecurityGroup, kind: PolicyKind, spec: &Value) -> Policy {
    Policy::compile_in(group, kind, &meta(), spec).expect("named")
}

fn authz(group: SecurityGroup, spec: &Value) -> crate::policy::AuthzPolicy {
    match compile(group, PolicyKind::Authorization, spec) {
        Policy::Authorization(p) => p,
        other => panic!("not an authorization policy: {other:?}"),
    }
}

fn decide(spec: &Value, source: Option<&Identity>) -> Decision {
    let engine = Engine::new("trellis-system", [authz(SecurityGroup::Istio, spec)], []);
    let labels = BTreeMap::from([("app".to_owned(), "web".to_owned())]);
    engine.decide(&Flow {
        destination: Destination {
            namespace: "shop",
            labels: &labels,
        },
        port: 8080,
        source,
        source_ip: None,
    })
}

fn id(td: &str, ns: &str, sa: &str) -> Identity {
    Identity::new(td, ns, sa).expect("identity")
}

#[test]
fn qualified_kinds_round_trip_and_keep_trellis_names_unchanged() {
    for group in SecurityGroup::ALL {
        for kind in PolicyKind::ALL {
            let name = group.qualified(kind);
            assert_eq!(SecurityGroup::parse_qualified(name), Some((group, kind)));
        }
    }
    assert_eq!(
        SecurityGroup::Trellis.qualified(PolicyKind::Authorization),
        "AuthorizationPolicy",
        "the wire name of Trellis's own kinds must not change"
    );
    assert_eq!(
        SecurityGroup::parse_qualified("AuthorizationPolicy.example.com"),
        None
    );
    assert_eq!(
        SecurityGroup::from_api_version("security.istio.io/v1beta1"),
        Some(SecurityGroup::Istio)
    );
    assert_eq!(
        SecurityGroup::from_api_version("security.istio.io/v1"),
        Some(SecurityGroup::Istio)
    );
    assert_eq!(
        SecurityGroup::from_api_version("security.istio.io/v1alpha1"),
        None
    );
    assert_eq!(
        SecurityGroup::from_api_version("security.trellis.dev/v1beta1"),
        None
    );
}

#[test]
fn an_istio_object_compiles_into_the_twins_model() {
    let spec = json!({
        "selector": {"matchLabels": {"app": "web"}},
        "action": "DENY",
        "rules": [{"from": [{"source": {"namespaces": ["dev"], "notPrincipals": ["*"]}}],
                   "to": [{"operation": {"ports": ["8080"]}}]}],
    });
    assert_eq!(
        authz(SecurityGroup::Istio, &spec),
        authz(SecurityGroup::Trellis, &spec)
    );
    let peer =
        json!({"mtls": {"mode": "STRICT"}, "portLevelMtls": {"9090": {"mode": "PERMISSIVE"}}});
    assert_eq!(
        compile(SecurityGroup::Istio, PolicyKind::PeerAuthentication, &peer),
        compile(
            SecurityGroup::Trellis,
            PolicyKind::PeerAuthentication,
            &peer
        )
    );
}

#[test]
fn istios_waypoint_class_targets_every_waypoint() {
    for targets in [
        json!({"targetRefs": [{"kind": "GatewayClass", "group": "gateway.networking.k8s.io", "name": "istio-waypoint"}]}),
        json!({"targetRef": {"kind": "GatewayClass", "group": "gateway.networking.k8s.io", "name": "istio-waypoint"}}),
    ] {
        let mut spec = targets;
        spec["rules"] = json!([{"to": [{"operation": {"methods": ["GET"]}}]}]);
        let policy = authz(SecurityGroup::Istio, &spec);
        assert_eq!(
            policy.binding,
            Binding::Targets(vec![TargetRef::GatewayClass("trellis-waypoint".into())]),
            "{spec}"
        );
        assert_eq!(policy.enforcement, Enforcement::Full, "{spec}");
    }
    // In Trellis's own group the name is Istio's class, not a waypoint class.
    let spec = json!({"targetRefs": [{"kind": "GatewayClass", "group": "gateway.networking.k8s.io", "name": "istio-waypoint"}]});
    assert_ne!(
        authz(SecurityGroup::Trellis, &spec).binding,
        Binding::Targets(vec![TargetRef::GatewayClass("trellis-waypoint".into())])
    );
}

#[test]
fn a_trellis_addition_is_an_unknown_field_in_an_istio_object() {
    let spec = json!({
        "targetRefs": [{"kind": "Gateway", "group": "gateway.networking.k8s.io", "name": "waypoint"}],
        "jwtRules": [{"issuer": "https://issuer.example", "jwksFile": "/etc/shadow"}],
    });
    let Policy::RequestAuthentication(istio) = compile(
        SecurityGroup::Istio,
        PolicyKind::RequestAuthentication,
        &spec,
    ) else {
        panic!("not a request authentication");
    };
    match &istio.enforcement {
        Enforcement::Rejected { error, stand_in } => {
            assert_eq!(*stand_in, StandIn::RejectTokens);
            assert!(
                error.to_string().contains("jwtRules[0].jwksFile"),
                "{error}"
            );
        }
        other => panic!("an Istio object cannot name a file: {other:?}"),
    }
    assert!(
        istio.rules.is_empty(),
        "no issuer is accepted by the stand-in"
    );
    let Policy::RequestAuthentication(trellis) = compile(
        SecurityGroup::Trellis,
        PolicyKind::RequestAuthentication,
        &spec,
    ) else {
        panic!("not a request authentication");
    };
    assert_eq!(trellis.enforcement, Enforcement::Full);
}

#[test]
fn hostile_istio_objects_never_widen_access() {
    let alice = id("cluster.local", "dev", "alice");
    // Wrong types: the strictest stand-in for the whole namespace.
    for spec in [
        json!({"action": "ALLOW", "rules": "everyone"}),
        json!({"action": ["DENY"]}),
        json!({"rules": [{"from": {"source": {}}}]}),
        json!({"selector": {"matchLabels": {"app": 7}}}),
        json!("ALLOW"),
    ] {
        let policy = authz(SecurityGroup::Istio, &spec);
        assert!(
            matches!(policy.enforcement, Enforcement::Rejected { .. }),
            "{spec}: {:?}",
            policy.enforcement
        );
        assert!(!decide(&spec, Some(&alice)).is_allowed(), "{spec}");
    }
    // An unknown field in an ALLOW rule's source: that rule matches nothing, and says which
    // field; the object is reported, not dropped.
    let spec = json!({"rules": [{"from": [{"source": {"serviceAccount": ["dev/alice"]}}]}]});
    let policy = authz(SecurityGroup::Istio, &spec);
    let Enforcement::FailClosed(notes) = &policy.enforcement else {
        panic!("{:?}", policy.enforcement);
    };
    assert_eq!(notes[0].path, "spec.rules[0].from[0].source.serviceAccount");
    assert_eq!(notes[0].why, Why::UnknownField);
    assert!(!decide(&spec, Some(&alice)).is_allowed());
    // The same in a DENY rule: the rule matches everyone its other conditions allow.
    let spec = json!({"action": "DENY",
        "rules": [{"from": [{"source": {"serviceAccount": ["other/bob"]}}]}]});
    assert!(!decide(&spec, Some(&alice)).is_allowed());
    // An unknown top-level field may change what the whole object means.
    let spec = json!({"action": "DENY", "rules": [{}], "audit": true});
    assert!(!decide(&spec, Some(&alice)).is_allowed());
    let spec = json!({"rules": [{}], "inverted": true});
    let policy = authz(SecurityGroup::Istio, &spec);
    assert!(
        matches!(
            &policy.enforcement,
            Enforcement::Rejected { error: PolicyError::Unsupported { path, .. }, .. } if path == "spec.inverted"
        ),
        "{:?}",
        policy.enforcement
    );
    assert!(!decide(&spec, Some(&alice)).is_allowed());
}

#[test]
fn service_accounts_and_trust_domains_match_the_verified_identity() {
    let alice = id("cluster.local", "dev", "alice");
    let bob = id("cluster.local", "dev", "bob");
    let foreign_alice = id("partner.example", "dev", "alice");
    let allow = |source: Value| json!({"rules": [{"from": [{"source": source}]}]});

    let spec = allow(json!({"serviceAccounts": ["dev/alice"]}));
    assert!(decide(&spec, Some(&alice)).is_allowed());
    assert!(
        decide(&spec, Some(&foreign_alice)).is_allowed(),
        "any trust domain"
    );
    assert!(!decide(&spec, Some(&bob)).is_allowed());
    assert!(
        !decide(&spec, None).is_allowed(),
        "plaintext has no service account"
    );

    let spec = allow(json!({"notServiceAccounts": ["dev/alice"]}));
    assert!(!decide(&spec, Some(&alice)).is_allowed());
    assert!(decide(&spec, Some(&bob)).is_allowed());

    let spec = allow(json!({"serviceAccounts": ["dev/alice"], "trustDomains": ["cluster.local"]}));
    assert!(decide(&spec, Some(&alice)).is_allowed());
    assert!(!decide(&spec, Some(&foreign_alice)).is_allowed());

    let spec = allow(json!({"notTrustDomains": ["partner.example"]}));
    assert!(decide(&spec, Some(&alice)).is_allowed());
    assert!(!decide(&spec, Some(&foreign_alice)).is_allowed());
    assert!(
        decide(&spec, None).is_allowed(),
        "as notNamespaces: plaintext matches"
    );

    // Values that are not literal names are reported and evaluate as unknown: an ALLOW
    // never matches on them, a DENY always does.
    for source in [
        json!({"serviceAccounts": ["dev/*"]}),
        json!({"serviceAccounts": ["alice"]}),
        json!({"trustDomains": ["*.local"]}),
    ] {
        let policy = authz(SecurityGroup::Istio, &allow(source.clone()));
        let Enforcement::FailClosed(notes) = &policy.enforcement else {
            panic!("{source}: {:?}", policy.enforcement);
        };
        assert!(matches!(notes[0].why, Why::NotLiteral(_)), "{source}");
        assert!(
            !decide(&allow(source.clone()), Some(&alice)).is_allowed(),
            "{source}"
        );
        let mut deny = allow(source.clone());
        deny["action"] = json!("DENY");
        assert!(!decide(&deny, Some(&alice)).is_allowed(), "{source}");
    }
}
