//! The Gateway API kinds a waypoint test needs (Gateway, HTTPRoute, GRPCRoute), as CustomResourceDefinitions
//! for the test cluster. The mesh does not ship them (a cluster installs the Gateway API itself);
//! these are reduced to what the API server must know to serve the kinds as a real install
//! does: their names, the `status` subresource, and `status.parents` as an atomic list (so a
//! server-side apply of it replaces the whole list, the behaviour the controller's route
//! status writer is built for). The rest of each object is kept as written.

use serde_json::{Value, json};

/// The CRDs as one YAML (JSON) stream for `kubectl apply`.
pub fn crds() -> String {
    [
        crd(
            "Gateway",
            "gateways",
            json!({"type": "object",
            "x-kubernetes-preserve-unknown-fields": true}),
        ),
        crd(
            "HTTPRoute",
            "httproutes",
            json!({"type": "object", "properties": {
                "parents": {
                    "type": "array",
                    "x-kubernetes-list-type": "atomic",
                    "items": {"type": "object", "x-kubernetes-preserve-unknown-fields": true},
                },
            }}),
        ),
        crd(
            "GRPCRoute",
            "grpcroutes",
            json!({"type": "object", "properties": {
                "parents": {
                    "type": "array",
                    "x-kubernetes-list-type": "atomic",
                    "items": {"type": "object", "x-kubernetes-preserve-unknown-fields": true},
                },
            }}),
        ),
    ]
    .iter()
    .map(|c| format!("---\n{c}\n"))
    .collect()
}

fn crd(kind: &str, plural: &str, status: Value) -> Value {
    json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": format!("{plural}.gateway.networking.k8s.io"),
            // `*.k8s.io` groups are the Kubernetes project's: the API server refuses a CRD in
            // one without the URL of its API review.
            "annotations": {"api-approved.kubernetes.io": "https://github.com/kubernetes-sigs/gateway-api"},
        },
        "spec": {
            "group": "gateway.networking.k8s.io",
            "scope": "Namespaced",
            "names": {
                "kind": kind,
                "listKind": format!("{kind}List"),
                "plural": plural,
                "singular": kind.to_ascii_lowercase(),
            },
            "versions": [{
                "name": "v1",
                "served": true,
                "storage": true,
                "subresources": {"status": {}},
                "schema": {"openAPIV3Schema": {"type": "object", "properties": {
                    "spec": {"type": "object", "x-kubernetes-preserve-unknown-fields": true},
                    "status": status,
                }}},
            }],
        },
    })
}
