//! Least privilege, the other way round: every test of the suite fails on a call the chart
//! refuses the controller; this one fails on a grant the controller never uses. With one
//! object of every kind the controller reads (Istio's and the Gateway API's CRDs installed, as
//! on a cluster that has them), the API server's audit log must show each (group, resource,
//! verb) of the chart's ClusterRole and Role called, and answered, at least once.

use std::collections::BTreeSet;

use mesh_tests::{
    cluster::{Cluster, audit::service_account_user, gateway_api},
    mesh::{
        MESH_LABEL, Mesh, MeshOptions,
        kubernetes::{RELEASE_NAMESPACE, render_chart},
        waypoint::USE_WAYPOINT_LABEL,
    },
};
use serde_json::Value;

use super::{APPS, CONVERGE, assert_no_refused_calls, cluster_on, gate, poll, testbed};

/// (API group, resource, verb).
type Grant = (String, String, String);

/// Grants no request is audited under, each with why the chart needs it.
const UNAUDITED: [(&str, &str, &str, &str); 1] = [(
    "",
    "configmaps",
    "create",
    "the trust bundle's server-side apply is audited as a patch; the API server also \
     authorizes it as a create while the ConfigMap does not exist",
)];

/// Every (group, resource, verb) the chart's `trellis-controller` roles grant.
fn granted(objects: &[Value]) -> BTreeSet<Grant> {
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| s.as_str().map(str::to_owned))
            .collect()
    };
    objects
        .iter()
        .filter(|o| {
            matches!(o["kind"].as_str(), Some("ClusterRole" | "Role"))
                && o["metadata"]["name"] == "trellis-controller"
        })
        .flat_map(|role| role["rules"].as_array().cloned().unwrap_or_default())
        .flat_map(|rule| {
            let mut grants = Vec::new();
            for group in strings(&rule["apiGroups"]) {
                for resource in strings(&rule["resources"]) {
                    for verb in strings(&rule["verbs"]) {
                        grants.push((group.clone(), resource.clone(), verb));
                    }
                }
            }
            grants
        })
        .collect()
}

/// One object of each kind the controller reads and reports status on, in [`APPS`].
fn one_of_each() -> String {
    let policy = |group: &str, kind: &str, name: &str, spec: &str| {
        format!(
            "---\napiVersion: {group}/v1\nkind: {kind}\n\
             metadata: {{name: {name}, namespace: {APPS}}}\nspec: {spec}\n"
        )
    };
    let mut all = String::new();
    for group in ["security.trellis.dev", "security.istio.io"] {
        all += &policy(
            group,
            "AuthorizationPolicy",
            "deny-nobody",
            "{action: DENY, rules: [{from: [{source: {namespaces: [nowhere]}}]}]}",
        );
        all += &policy(
            group,
            "PeerAuthentication",
            "permissive",
            "{mtls: {mode: PERMISSIVE}}",
        );
        all += &policy(
            group,
            "RequestAuthentication",
            "tokens",
            "{jwtRules: [{issuer: https://issuer.example, jwks: '{\"keys\": []}'}]}",
        );
    }
    all += &policy(
        "traffic.trellis.dev",
        "TrafficPolicy",
        "web",
        "{targetRefs: [{group: '', kind: Service, name: web}], retries: {attempts: 2}}",
    );
    all += &policy(
        "networking.istio.io",
        "VirtualService",
        "web",
        "{hosts: [web], http: [{route: [{destination: {host: web}}]}]}",
    );
    all += &policy(
        "networking.istio.io",
        "DestinationRule",
        "web",
        "{host: web, trafficPolicy: {loadBalancer: {simple: ROUND_ROBIN}}}",
    );
    for kind in ["HTTPRoute", "GRPCRoute"] {
        all += &policy(
            "gateway.networking.k8s.io",
            kind,
            &format!("web-{}", kind.to_ascii_lowercase()),
            "{parentRefs: [{group: '', kind: Service, name: web, port: 80}], \
             rules: [{backendRefs: [{name: web, port: 80}]}]}",
        );
    }
    all
}

/// Whether the object at `path` (kubectl `get` arguments) carries status the controller wrote.
fn reported(cluster: &Cluster, args: &[&str]) -> bool {
    cluster.get_json(args).is_ok_and(|o| {
        let status = &o["status"];
        status["conditions"]
            .as_array()
            .is_some_and(|c| c.iter().any(|c| c["type"] == "Accepted"))
            || status["parents"].as_array().is_some_and(|p| {
                p.iter()
                    .any(|p| p["controllerName"] == "trellis.dev/waypoint")
            })
    })
}

#[test]
fn the_controller_uses_every_grant_the_chart_gives_it() {
    let Some(tools) = gate("the_controller_uses_every_grant_the_chart_gives_it") else {
        return;
    };
    let tb = testbed(1);
    let cluster = cluster_on(&tb, tools);
    // The Gateway API's and Istio's CRDs, as a cluster that has them installed does.
    cluster
        .apply(&gateway_api::crds())
        .expect("Gateway API CRDs");
    let with_istio =
        render_chart(&cluster, &["--set", "istio.installCrds=true"]).expect("helm template");
    let istio_crds: String = with_istio
        .iter()
        .filter(|o| {
            o["kind"] == "CustomResourceDefinition"
                && o["spec"]["group"]
                    .as_str()
                    .is_some_and(|g| g.ends_with(".istio.io"))
        })
        .map(|o| format!("---\n{o}\n"))
        .collect();
    cluster.apply(&istio_crds).expect("Istio CRDs");
    cluster
        .kubectl(&[
            "wait",
            "--for=condition=Established",
            "crd",
            "--all",
            "--timeout=60s",
        ])
        .expect("CRDs established");

    let mesh = Mesh::start_kubernetes(&tb, &cluster, &MeshOptions::default()).expect("mesh");
    cluster
        .apply(&format!(
            "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {APPS}\n  labels: \
             {{{MESH_LABEL}: enabled, {USE_WAYPOINT_LABEL}: waypoint}}\n---\n\
             apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: {APPS}}}\n\
             spec: {{selector: {{app: web}}, ports: [{{name: http, port: 80, targetPort: 8080}}]}}\n\
             ---\napiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\n\
             metadata: {{name: waypoint, namespace: {APPS}}}\n\
             spec: {{gatewayClassName: trellis-waypoint, listeners: [{{name: mesh, port: 15008, protocol: HBONE}}]}}\n"
        ))
        .expect("namespace, Service and waypoint Gateway");
    cluster
        .apply(&one_of_each())
        .expect("one object of each kind");
    for kind in [
        "authorizationpolicies.security.trellis.dev/deny-nobody",
        "peerauthentications.security.trellis.dev/permissive",
        "requestauthentications.security.trellis.dev/tokens",
        "authorizationpolicies.security.istio.io/deny-nobody",
        "peerauthentications.security.istio.io/permissive",
        "requestauthentications.security.istio.io/tokens",
        "trafficpolicies.traffic.trellis.dev/web",
        "virtualservices.networking.istio.io/web",
        "destinationrules.networking.istio.io/web",
        "httproutes.gateway.networking.k8s.io/web-httproute",
        "grpcroutes.gateway.networking.k8s.io/web-grpcroute",
    ] {
        poll(
            CONVERGE,
            &format!("the controller to report on {kind}"),
            || reported(&cluster, &[kind, "-n", APPS]).then_some(()),
        );
    }
    assert_no_refused_calls(&mesh);

    let controller = service_account_user(RELEASE_NAMESPACE, "trellis-controller");
    let used: BTreeSet<Grant> = cluster
        .audit()
        .expect("audit log")
        .into_iter()
        .filter(|r| r.user == controller)
        // Answered: a success, or a get told the object is not there (the CA Secret before
        // the controller first creates it).
        .filter(|r| {
            r.code
                .is_some_and(|c| (200..300).contains(&c) || (c == 404 && r.verb == "get"))
        })
        .filter_map(|r| Some((r.api_group?, r.resource, r.verb)))
        .collect();
    let granted = granted(&render_chart(&cluster, &[]).expect("helm template"));
    let unused: Vec<&Grant> = granted
        .iter()
        .filter(|(g, r, v)| !used.contains(&(g.clone(), r.clone(), v.clone())))
        .filter(|(g, r, v)| {
            !UNAUDITED
                .iter()
                .any(|(ug, ur, uv, _)| (g.as_str(), r.as_str(), v.as_str()) == (*ug, *ur, *uv))
        })
        .collect();
    assert!(
        unused.is_empty(),
        "the chart grants the controller what it never used: {unused:?}\nused: {used:?}"
    );
}
