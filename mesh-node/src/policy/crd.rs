//! The `security.trellis.dev/v1` custom resources, as users write them.
//!
//! Field names and shapes follow Istio's `security.istio.io` API so existing manifests carry
//! over. These types are deliberately lenient: enumerations and ports are plain strings, and
//! every object keeps the fields it does not know in `extra`. Whether a value is usable is
//! decided when the object is converted into the model ([`super::model`]), which can then name
//! the offending field in the object's status and fail closed, instead of the object vanishing
//! in a deserialisation error or a field being silently dropped.
//!
//! The generated schemas mark every object with `x-kubernetes-preserve-unknown-fields` for the
//! same reason: the API server would otherwise prune a field it does not know (a misspelt
//! `notPorts`, an HTTP field of a newer Istio), and the node would enforce a policy broader than
//! the one written.

use std::collections::BTreeMap;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::status::PolicyStatus;

/// Fields of an object that this version does not know, kept so they can be reported.
pub type ExtraFields = BTreeMap<String, serde_json::Value>;

/// Who may reach which workloads, on which ports.
///
/// A policy in the root namespace (`trellis-system` by default) applies mesh-wide: without a
/// selector to every workload, with a selector to the matching workloads of every namespace.
/// Elsewhere it applies to its own namespace's workloads, all of them or the selected ones.
// Each `printcolumn(...)` repeats `type_`, which clippy takes for a duplicated attribute.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "security.trellis.dev",
    version = "v1",
    kind = "AuthorizationPolicy",
    namespaced,
    status = "PolicyStatus",
    derive = "PartialEq",
    shortname = "ap",
    doc = "Layer-4 authorization for mesh workloads (Istio-compatible fields).",
    printcolumn(name = "Action", type_ = "string", json_path = ".spec.action"),
    printcolumn(
        name = "Accepted",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Accepted\")].status"
    ),
    printcolumn(
        name = "Reason",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Accepted\")].reason"
    )
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-preserve-unknown-fields" = true))]
pub struct AuthorizationPolicySpec {
    /// The workloads the policy applies to; absent or empty: the whole namespace (or the whole
    /// mesh, in the root namespace).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<WorkloadSelector>,
    /// `ALLOW` (default), `DENY`; `CUSTOM` is enforced as `DENY` and `AUDIT` not at all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("enum" = ["ALLOW", "DENY", "AUDIT", "CUSTOM"]))]
    pub action: Option<String>,
    /// The rules; the policy matches when any rule matches. No rules: the policy matches
    /// nothing (so an `ALLOW` policy without rules allows nothing).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<Rule>,
    /// The external authorizer of a `CUSTOM` policy (recognised; not supported).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("x-kubernetes-preserve-unknown-fields" = true))]
    pub provider: Option<serde_json::Value>,
    /// Istio's binding of a policy to a gateway or service (recognised; not supported at L4).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("x-kubernetes-preserve-unknown-fields" = true))]
    pub target_ref: Option<serde_json::Value>,
    /// Istio's binding of a policy to gateways or services (recognised; not supported at L4).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("x-kubernetes-preserve-unknown-fields" = true))]
    pub target_refs: Option<serde_json::Value>,
    #[serde(flatten)]
    #[schemars(skip)]
    pub extra: ExtraFields,
}

/// Selects workloads by their labels; every listed label must match exactly.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-preserve-unknown-fields" = true))]
pub struct WorkloadSelector {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub match_labels: BTreeMap<String, String>,
    #[serde(flatten)]
    #[schemars(skip)]
    pub extra: ExtraFields,
}

/// One rule: it matches when one of its sources (if any) and one of its operations (if any)
/// match. An empty rule matches every connection.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-preserve-unknown-fields" = true))]
pub struct Rule {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from: Vec<RuleFrom>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub to: Vec<RuleTo>,
    /// Request attributes (recognised; they need a waypoint, not supported at L4).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub when: Vec<WhenCondition>,
    #[serde(flatten)]
    #[schemars(skip)]
    pub extra: ExtraFields,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-preserve-unknown-fields" = true))]
pub struct RuleFrom {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<Source>,
    #[serde(flatten)]
    #[schemars(skip)]
    pub extra: ExtraFields,
}

/// Who connects. Every field that is set must match; within a field, any value may match.
/// Principals are `<trust-domain>/ns/<namespace>/sa/<service-account>` (a `spiffe://` prefix
/// is accepted) and match literally; `"*"` alone means any authenticated source.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-preserve-unknown-fields" = true))]
pub struct Source {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub principals: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_principals: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_namespaces: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ip_blocks: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_ip_blocks: Vec<String>,
    /// JWT principals (recognised; not supported at L4).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub request_principals: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_request_principals: Vec<String>,
    /// Client addresses from `X-Forwarded-For` (recognised; not supported at L4).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remote_ip_blocks: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_remote_ip_blocks: Vec<String>,
    #[serde(flatten)]
    #[schemars(skip)]
    pub extra: ExtraFields,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-preserve-unknown-fields" = true))]
pub struct RuleTo {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operation: Option<Operation>,
    #[serde(flatten)]
    #[schemars(skip)]
    pub extra: ExtraFields,
}

/// What is reached. Ports are the destination workload's ports, as decimal strings.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-preserve-unknown-fields" = true))]
pub struct Operation {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_ports: Vec<String>,
    /// HTTP attributes (recognised; they need a waypoint, not supported at L4).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_hosts: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_methods: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_paths: Vec<String>,
    #[serde(flatten)]
    #[schemars(skip)]
    pub extra: ExtraFields,
}

/// An Istio `when` condition (recognised; not supported at L4).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-preserve-unknown-fields" = true))]
pub struct WhenCondition {
    #[serde(default)]
    pub key: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_values: Vec<String>,
    #[serde(flatten)]
    #[schemars(skip)]
    pub extra: ExtraFields,
}

/// Whether workloads accept plaintext. Precedence: a policy selecting the workload, then its
/// namespace's policy, then the mesh-wide policy of the root namespace; a port-level mode
/// overrides the policy's own mode. Without any policy a workload is `PERMISSIVE`.
// Each `printcolumn(...)` repeats `type_`, which clippy takes for a duplicated attribute.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "security.trellis.dev",
    version = "v1",
    kind = "PeerAuthentication",
    namespaced,
    status = "PolicyStatus",
    derive = "PartialEq",
    shortname = "pa",
    doc = "Whether mesh workloads accept plaintext connections (Istio-compatible fields).",
    printcolumn(name = "Mode", type_ = "string", json_path = ".spec.mtls.mode"),
    printcolumn(
        name = "Accepted",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Accepted\")].status"
    )
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-preserve-unknown-fields" = true))]
pub struct PeerAuthenticationSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<WorkloadSelector>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtls: Option<MutualTls>,
    /// Per destination port (decimal string keys), overriding `mtls`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub port_level_mtls: BTreeMap<String, MutualTls>,
    #[serde(flatten)]
    #[schemars(skip)]
    pub extra: ExtraFields,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-preserve-unknown-fields" = true))]
pub struct MutualTls {
    /// `STRICT`, `PERMISSIVE`, `UNSET` (inherit); `DISABLE` is enforced as `PERMISSIVE`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("enum" = ["UNSET", "DISABLE", "PERMISSIVE", "STRICT"]))]
    pub mode: Option<String>,
    #[serde(flatten)]
    #[schemars(skip)]
    pub extra: ExtraFields,
}

/// Both CRDs as one multi-document YAML stream, in a fixed order: the text of
/// `charts/trellis/crds/security.trellis.dev.yaml`, printed by `mesh-node crds`, written by
/// `cargo xtask crds`, and compared byte for byte by the chart's drift test, so the chart can
/// never ship a schema the types above do not produce.
pub fn crds_yaml() -> Result<String, serde_saphyr::ser::Error> {
    use kube::CustomResourceExt;

    let mut out = String::from(
        "# Generated by `mesh-node crds` (run `cargo xtask crds`) from mesh-node/src/policy/crd.rs.\n\
         # Do not edit by hand: change the types and regenerate.\n",
    );
    for crd in [AuthorizationPolicy::crd(), PeerAuthentication::crd()] {
        out.push_str("---\n");
        out.push_str(&serde_saphyr::to_string(&crd)?);
    }
    Ok(out)
}
