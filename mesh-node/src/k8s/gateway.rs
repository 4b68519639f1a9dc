//! `HTTPRoute` and `GRPCRoute` specs as users write them (Gateway API v1), only the fields the
//! waypoint reads.
//!
//! Deliberately lenient: enumerations are strings, numbers are `i64`, and lists may be `null`.
//! Whether a value is usable is decided by [`crate::l7::route::compile`], which can then name the field in
//! the route's status. Unknown fields are ignored (they are either status-irrelevant or from a
//! newer API version; the API server has already validated the object against its schema).
//! Ours rather than the `gateway-api` crate's, whose enums refuse a whole object for one bad
//! value (and whose 0.22 is built on kube 4 and k8s-openapi 0.28, not our 5 and 0.29).

use serde::{Deserialize, Deserializer, Serialize};

/// A list that may be absent or `null`.
fn list<'de, D, T>(deserializer: D) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    Ok(Option::<Vec<T>>::deserialize(deserializer)?.unwrap_or_default())
}

/// The spec of an `HTTPRoute`.
#[derive(Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteSpec {
    #[serde(default, deserialize_with = "list")]
    pub parent_refs: Vec<ParentReference>,
    #[serde(default, deserialize_with = "list")]
    pub hostnames: Vec<String>,
    #[serde(default, deserialize_with = "list")]
    pub rules: Vec<HttpRouteRule>,
}

/// The spec of a `GRPCRoute`.
#[derive(Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct GrpcRouteSpec {
    #[serde(default, deserialize_with = "list")]
    pub parent_refs: Vec<ParentReference>,
    #[serde(default, deserialize_with = "list")]
    pub hostnames: Vec<String>,
    #[serde(default, deserialize_with = "list")]
    pub rules: Vec<GrpcRouteRule>,
}

/// Only the parent references, read on their own so that a route whose spec cannot be read
/// still gets a status on each parent it names.
#[derive(Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ParentRefsOnly {
    #[serde(default, deserialize_with = "list")]
    pub parent_refs: Vec<ParentReference>,
}

/// A parent of the route: a Gateway (the waypoint) or a Service. Serialised back as written
/// into `status.parents[].parentRef`.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ParentReference {
    /// Absent: `gateway.networking.k8s.io`; `""` for the core group (Services).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// Absent: `Gateway`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// Absent: the route's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default)]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub section_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<i64>,
}

#[derive(Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteRule {
    #[serde(default)]
    pub name: Option<String>,
    /// Absent or empty: one match, path prefix `/`.
    #[serde(default, deserialize_with = "list")]
    pub matches: Vec<HttpRouteMatch>,
    #[serde(default, deserialize_with = "list")]
    pub filters: Vec<RouteFilter>,
    #[serde(default, deserialize_with = "list")]
    pub backend_refs: Vec<BackendRef>,
    #[serde(default)]
    pub timeouts: Option<HttpRouteTimeouts>,
    #[serde(default)]
    pub retry: Option<HttpRouteRetry>,
}

#[derive(Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct GrpcRouteRule {
    #[serde(default)]
    pub name: Option<String>,
    /// Absent or empty: every gRPC request.
    #[serde(default, deserialize_with = "list")]
    pub matches: Vec<GrpcRouteMatch>,
    #[serde(default, deserialize_with = "list")]
    pub filters: Vec<RouteFilter>,
    #[serde(default, deserialize_with = "list")]
    pub backend_refs: Vec<BackendRef>,
}

#[derive(Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteMatch {
    /// Absent: prefix `/`.
    #[serde(default)]
    pub path: Option<PathMatch>,
    #[serde(default, deserialize_with = "list")]
    pub headers: Vec<ValueMatch>,
    #[serde(default, deserialize_with = "list")]
    pub query_params: Vec<ValueMatch>,
    #[serde(default)]
    pub method: Option<String>,
}

#[derive(Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PathMatch {
    /// `Exact`, `PathPrefix` (default) or `RegularExpression`.
    #[serde(default, rename = "type")]
    pub type_: Option<String>,
    /// Absent: `/`.
    #[serde(default)]
    pub value: Option<String>,
}

/// A header or query parameter match.
#[derive(Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ValueMatch {
    /// `Exact` (default) or `RegularExpression`.
    #[serde(default, rename = "type")]
    pub type_: Option<String>,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub value: String,
}

#[derive(Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct GrpcRouteMatch {
    /// Absent: every service and method.
    #[serde(default)]
    pub method: Option<GrpcMethodMatch>,
    #[serde(default, deserialize_with = "list")]
    pub headers: Vec<ValueMatch>,
}

#[derive(Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct GrpcMethodMatch {
    /// `Exact` (default) or `RegularExpression`.
    #[serde(default, rename = "type")]
    pub type_: Option<String>,
    #[serde(default)]
    pub service: Option<String>,
    #[serde(default)]
    pub method: Option<String>,
}

/// A filter of either route kind; which types a kind allows is checked on conversion.
#[derive(Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RouteFilter {
    #[serde(default, rename = "type")]
    pub type_: String,
    #[serde(default)]
    pub request_header_modifier: Option<HeaderFilter>,
    #[serde(default)]
    pub response_header_modifier: Option<HeaderFilter>,
    #[serde(default)]
    pub request_mirror: Option<MirrorFilter>,
    #[serde(default)]
    pub request_redirect: Option<RedirectFilter>,
    #[serde(default)]
    pub url_rewrite: Option<UrlRewriteFilter>,
    /// Recognised so that a filter naming one type and configuring another is caught.
    #[serde(default)]
    pub extension_ref: Option<serde_json::Value>,
    #[serde(default)]
    pub cors: Option<serde_json::Value>,
    #[serde(default)]
    pub external_auth: Option<serde_json::Value>,
}

#[derive(Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HeaderFilter {
    #[serde(default, deserialize_with = "list")]
    pub set: Vec<Header>,
    #[serde(default, deserialize_with = "list")]
    pub add: Vec<Header>,
    #[serde(default, deserialize_with = "list")]
    pub remove: Vec<String>,
}

#[derive(Deserialize, Clone, Debug, Default, PartialEq)]
pub struct Header {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub value: String,
}

#[derive(Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RedirectFilter {
    /// `http` or `https`; absent: the request's.
    #[serde(default)]
    pub scheme: Option<String>,
    #[serde(default)]
    pub hostname: Option<String>,
    #[serde(default)]
    pub path: Option<PathModifier>,
    #[serde(default)]
    pub port: Option<i64>,
    /// 301, 302 (default), 303, 307 or 308.
    #[serde(default)]
    pub status_code: Option<i64>,
}

#[derive(Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct UrlRewriteFilter {
    #[serde(default)]
    pub hostname: Option<String>,
    #[serde(default)]
    pub path: Option<PathModifier>,
}

#[derive(Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PathModifier {
    /// `ReplaceFullPath` or `ReplacePrefixMatch`.
    #[serde(default, rename = "type")]
    pub type_: String,
    #[serde(default)]
    pub replace_full_path: Option<String>,
    #[serde(default)]
    pub replace_prefix_match: Option<String>,
}

#[derive(Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MirrorFilter {
    #[serde(default)]
    pub backend_ref: BackendObjectReference,
    #[serde(default)]
    pub percent: Option<i64>,
    #[serde(default)]
    pub fraction: Option<Fraction>,
}

#[derive(Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Fraction {
    #[serde(default)]
    pub numerator: i64,
    /// Absent: 100.
    #[serde(default)]
    pub denominator: Option<i64>,
}

/// A reference to a backend object (a Service, for this implementation).
#[derive(Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct BackendObjectReference {
    /// Absent or `""`: the core group.
    #[serde(default)]
    pub group: Option<String>,
    /// Absent: `Service`.
    #[serde(default)]
    pub kind: Option<String>,
    #[serde(default)]
    pub name: String,
    /// Absent: the route's namespace.
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub port: Option<i64>,
}

/// A rule's backend, of either route kind.
#[derive(Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct BackendRef {
    #[serde(flatten)]
    pub object: BackendObjectReference,
    /// Absent: 1.
    #[serde(default)]
    pub weight: Option<i64>,
    #[serde(default, deserialize_with = "list")]
    pub filters: Vec<RouteFilter>,
}

#[derive(Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteTimeouts {
    #[serde(default)]
    pub request: Option<String>,
    #[serde(default)]
    pub backend_request: Option<String>,
}

#[derive(Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteRetry {
    #[serde(default, deserialize_with = "list")]
    pub codes: Vec<i64>,
    #[serde(default)]
    pub attempts: Option<i64>,
    #[serde(default)]
    pub backoff: Option<String>,
}
