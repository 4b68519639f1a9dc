//! The `traffic.trellis.dev/v1` `TrafficPolicy` custom resource, as users write it, and its
//! generated CustomResourceDefinition.
//!
//! The types are only the shape: every bound, default and cross-field rule is checked when an
//! object is compiled ([`crate::l7::resilience::compile`]), so that a bad object is rejected alone with a
//! reason naming the field. Like the policy CRDs, the schema keeps unknown fields
//! (`x-kubernetes-preserve-unknown-fields`): a misspelt field pruned by the API server would
//! leave a policy weaker than written without anyone noticing, while a kept one is reported.
//! Enumerated strings carry an `enum` in the schema so `kubectl apply` already refuses a typo.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{policy::ExtraFields, status::PolicyStatus};

/// The duration syntax of the Gateway API: one to four `<number><unit>` parts, units `h`, `m`,
/// `s`, `ms` (`500ms`, `2s`, `1m30s`). Checked again by the compiler, which also bounds it.
const DURATION_PATTERN: &str = "^([0-9]{1,5}(h|m|s|ms)){1,4}$";

/// Resilience for the Services it targets, applied by their waypoint: retries, connection
/// limits (circuit breaking), outlier ejection, fault injection and local rate limiting.
#[allow(
    clippy::duplicated_attributes,
    reason = "each `printcolumn(...)` repeats `type_`, which clippy takes for a duplicated attribute"
)]
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "traffic.trellis.dev",
    version = "v1",
    kind = "TrafficPolicy",
    namespaced,
    status = "PolicyStatus",
    derive = "PartialEq",
    shortname = "tp",
    doc = "Retries, circuit breaking, outlier ejection, fault injection and rate limiting for Services behind a waypoint.",
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
pub struct TrafficPolicySpec {
    /// The Services of the policy's namespace it applies to (at least one).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub target_refs: Vec<TargetRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<RetriesSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_pool: Option<ConnectionPoolSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier_detection: Option<OutlierDetectionSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault: Option<FaultSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimitSpec>,
    #[serde(flatten)]
    #[schemars(skip)]
    pub extra: ExtraFields,
}

/// A Service of the policy's own namespace (`group: ""`, `kind: Service`, the defaults).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-preserve-unknown-fields" = true))]
pub struct TargetRef {
    #[serde(default)]
    pub group: String,
    // The schema's default must be one of its `enum` values, or the API server refuses the CRD.
    #[serde(default = "TargetRef::service_kind")]
    #[schemars(extend("enum" = ["Service"]))]
    pub kind: String,
    pub name: String,
    #[serde(flatten)]
    #[schemars(skip)]
    pub extra: ExtraFields,
}

impl TargetRef {
    fn service_kind() -> String {
        "Service".into()
    }
}

/// Retries of failed requests, within a budget.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-preserve-unknown-fields" = true))]
pub struct RetriesSpec {
    /// Retries after the first try (0 to 10); required.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempts: Option<u32>,
    /// Time limit of each try, like `500ms`; absent: only the route's request timeout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("pattern" = DURATION_PATTERN))]
    pub per_try_timeout: Option<String>,
    /// What is retried; absent: `connect-failure`, `reset`, `gateway-error`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("items" = {"type": "string", "enum": ["5xx", "gateway-error", "connect-failure", "reset", "retriable-status-codes"]}))]
    pub retry_on: Option<Vec<String>>,
    /// The response codes retried with `retriable-status-codes`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retriable_status_codes: Vec<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<RetryBudgetSpec>,
    #[serde(flatten)]
    #[schemars(skip)]
    pub extra: ExtraFields,
}

/// At most `percent` of the requests of the last seconds may be retries, but at least
/// `minRetriesPerSecond` retries per second are always allowed.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-preserve-unknown-fields" = true))]
pub struct RetryBudgetSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percent: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_retries_per_second: Option<u32>,
    #[serde(flatten)]
    #[schemars(skip)]
    pub extra: ExtraFields,
}

/// Limits per Service of the waypoint towards it; absent fields are unlimited.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-preserve-unknown-fields" = true))]
pub struct ConnectionPoolSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_pending_requests: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_requests: Option<u32>,
    #[serde(flatten)]
    #[schemars(skip)]
    pub extra: ExtraFields,
}

/// Ejection of endpoints that keep failing.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-preserve-unknown-fields" = true))]
pub struct OutlierDetectionSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consecutive_errors: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("pattern" = DURATION_PATTERN))]
    pub interval: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("pattern" = DURATION_PATTERN))]
    pub base_ejection_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_ejection_percent: Option<u32>,
    #[serde(flatten)]
    #[schemars(skip)]
    pub extra: ExtraFields,
}

/// Faults injected into a percentage of requests, for testing how callers cope.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-preserve-unknown-fields" = true))]
pub struct FaultSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay: Option<DelaySpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abort: Option<AbortSpec>,
    #[serde(flatten)]
    #[schemars(skip)]
    pub extra: ExtraFields,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-preserve-unknown-fields" = true))]
pub struct DelaySpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("pattern" = DURATION_PATTERN))]
    pub fixed_delay: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percent: Option<u32>,
    #[serde(flatten)]
    #[schemars(skip)]
    pub extra: ExtraFields,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-preserve-unknown-fields" = true))]
pub struct AbortSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_status: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percent: Option<u32>,
    #[serde(flatten)]
    #[schemars(skip)]
    pub extra: ExtraFields,
}

/// A token bucket: `requestsPerSecond` sustained, `burst` at once.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-preserve-unknown-fields" = true))]
pub struct RateLimitSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests_per_second: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
    /// `route` (default): one bucket per route; `source`: one per calling identity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("enum" = ["route", "source"]))]
    pub per: Option<String>,
    #[serde(flatten)]
    #[schemars(skip)]
    pub extra: ExtraFields,
}

/// The `TrafficPolicy` CRD as one YAML document, starting with `---`, so it can be appended to
/// the policy CRDs' stream (`mesh-node crds`, the chart's `crds/` file and its drift test).
pub fn crd_yaml() -> Result<String, serde_saphyr::ser::Error> {
    use kube::CustomResourceExt;

    let mut out = String::from("---\n");
    out.push_str(&serde_saphyr::to_string(&TrafficPolicy::crd())?);
    Ok(out)
}
