//! The `security.trellis.dev/v1` custom resources, as users write them.
//!
//! Field names and shapes follow Istio's `security.istio.io` API so existing manifests carry
//! over. These types are deliberately lenient: enumerations and ports are plain strings, and
//! every object keeps the fields it does not know in `extra`. Whether a value is usable is
//! decided when the object is converted into the model ([`crate::policy::model`]), which can then name
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

/// Who may reach which workloads, on which ports, and with which requests.
///
/// A policy in the root namespace (`trellis-system` by default) applies mesh-wide: without a
/// selector to every workload, with a selector to the matching workloads of every namespace.
/// Elsewhere it applies to its own namespace's workloads, all of them or the selected ones.
/// A policy with `targetRefs` is attached to waypoints instead, where request attributes
/// (methods, paths, hosts, JWT principals, `when`) are evaluated.
#[allow(
    clippy::duplicated_attributes,
    reason = "each `printcolumn(...)` repeats `type_`, which clippy takes for a duplicated attribute"
)]
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "security.trellis.dev",
    version = "v1",
    kind = "AuthorizationPolicy",
    namespaced,
    status = "PolicyStatus",
    derive = "PartialEq",
    shortname = "ap",
    doc = "Authorization for mesh workloads (L4, node agents) and requests (L7, waypoints), with Istio-compatible fields.",
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
    /// The older single form of `targetRefs`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("x-kubernetes-preserve-unknown-fields" = true))]
    pub target_ref: Option<serde_json::Value>,
    /// Attaches the policy to waypoints instead of workloads: `{kind: Gateway, group:
    /// gateway.networking.k8s.io, name}` (that waypoint), `{kind: Service, group: "", name}`
    /// (requests for that service), or, from the root namespace, `{kind: GatewayClass, name:
    /// trellis-waypoint}` (every waypoint). Targets are in the policy's namespace; at most one
    /// of `selector` and `targetRefs`.
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
    /// Request conditions, evaluated by waypoints (policies with `targetRefs`).
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
    /// JWT principals `<iss>/<sub>`, evaluated by waypoints (policies with `targetRefs`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub request_principals: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_request_principals: Vec<String>,
    /// Service accounts of verified sources, `<namespace>/<service-account>` (any trust
    /// domain; narrow with `trustDomains`). Literal names only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub service_accounts: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_service_accounts: Vec<String>,
    /// Trust domains of verified sources (the first part of their SPIFFE IDs), literal.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub trust_domains: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_trust_domains: Vec<String>,
    /// Client addresses from `X-Forwarded-For` (recognised; not supported: they fail closed).
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
    /// HTTP attributes, evaluated by waypoints (policies with `targetRefs`): exact values or
    /// `prefix*`, `*suffix`, `*`; methods exact only.
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

/// An Istio `when` condition, evaluated by waypoints (policies with `targetRefs`).
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
#[allow(
    clippy::duplicated_attributes,
    reason = "each `printcolumn(...)` repeats `type_`, which clippy takes for a duplicated attribute"
)]
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

/// End-user authentication with JSON Web Tokens at waypoints (Istio's `RequestAuthentication`).
///
/// A request carrying a token from a configured location is verified against the rule of
/// its issuer; an invalid token is refused (401) even if no policy requires one, a request
/// without a token passes, and `AuthorizationPolicy` `requestPrincipals` decide whether one
/// is required. Attached to waypoints with `targetRefs` like `AuthorizationPolicy`; with a
/// `selector` it has no effect (node agents do not see requests).
#[allow(
    clippy::duplicated_attributes,
    reason = "each `printcolumn(...)` repeats `type_`, which clippy takes for a duplicated attribute"
)]
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "security.trellis.dev",
    version = "v1",
    kind = "RequestAuthentication",
    namespaced,
    status = "PolicyStatus",
    derive = "PartialEq",
    shortname = "ra",
    doc = "JWT end-user authentication at waypoints (Istio-compatible fields).",
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
pub struct RequestAuthenticationSpec {
    /// Workloads (recognised; no effect: attach to waypoints with `targetRefs`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<WorkloadSelector>,
    /// The older single form of `targetRefs`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("x-kubernetes-preserve-unknown-fields" = true))]
    pub target_ref: Option<serde_json::Value>,
    /// The waypoints or services the rules apply at, as for `AuthorizationPolicy`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("x-kubernetes-preserve-unknown-fields" = true))]
    pub target_refs: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub jwt_rules: Vec<JwtRule>,
    #[serde(flatten)]
    #[schemars(skip)]
    pub extra: ExtraFields,
}

/// How to verify the tokens of one issuer.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-preserve-unknown-fields" = true))]
pub struct JwtRule {
    /// The `iss` claim of the tokens this rule verifies (required).
    #[serde(default)]
    pub issuer: String,
    /// Accepted `aud` values; a token must carry one of them. Empty: not checked.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub audiences: Vec<String>,
    /// The JSON Web Key Set, inline as a JSON string.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks: Option<String>,
    /// Where the waypoint fetches the key set (http or https), refreshed in the background.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks_uri: Option<String>,
    /// A file holding the key set, read by the waypoint (Trellis addition, for the
    /// directory mode and tests).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks_file: Option<String>,
    /// Headers carrying the token; default `Authorization: Bearer <token>`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from_headers: Vec<JwtHeader>,
    /// Keep the token in the request forwarded upstream (default: removed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forward_original_token: Option<bool>,
    #[serde(flatten)]
    #[schemars(skip)]
    pub extra: ExtraFields,
}

/// A header carrying the token, after an optional prefix (like `Bearer `).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-preserve-unknown-fields" = true))]
pub struct JwtHeader {
    #[serde(default)]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    #[serde(flatten)]
    #[schemars(skip)]
    pub extra: ExtraFields,
}

/// The CRDs as one multi-document YAML stream, in a fixed order: the text of
/// `charts/trellis/crds/security.trellis.dev.yaml`, printed by `mesh-node crds`, written by
/// `cargo xtask crds`, and compared byte for byte by the chart's drift test, so the chart can
/// never ship a schema the types above do not produce.
pub fn crds_yaml() -> Result<String, serde_saphyr::ser::Error> {
    use kube::CustomResourceExt;

    let mut out = String::from(
        "# Generated by `mesh-node crds` (run `cargo xtask crds`) from mesh-node/src/k8s/policy.rs.\n\
         # Do not edit by hand: change the types and regenerate.\n",
    );
    for crd in [
        AuthorizationPolicy::crd(),
        PeerAuthentication::crd(),
        RequestAuthentication::crd(),
    ] {
        out.push_str("---\n");
        out.push_str(&serde_saphyr::to_string(&crd)?);
    }
    Ok(out)
}
