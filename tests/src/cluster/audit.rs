//! The API server's audit log, as the tests read it: which service account made which request,
//! and how it was answered.
//!
//! The policy ([`POLICY`]) records every request of a service account at level `Metadata`
//! (who, verb, what, the response code; no bodies) once its response is complete (a watch,
//! which completes only when it ends, also when its response starts), and nothing of other
//! users (the admin's kubectl and the controller-manager's own accounts would only
//! add noise to a file the tests scan).

use std::path::Path;

use anyhow::{Context, Result};
use serde::Deserialize;

/// The audit policy the cluster's API server runs with.
pub const POLICY: &str = "apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
  - level: Metadata
    userGroups: [\"system:serviceaccounts\"]
  - level: None
";

/// One request, as the audit log records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// `system:serviceaccount:<namespace>:<name>`.
    pub user: String,
    pub verb: String,
    /// `""` for the core group; `None` for a request not about a resource (discovery).
    pub api_group: Option<String>,
    /// `pods`, or `authorizationpolicies/status` for a subresource.
    pub resource: String,
    pub namespace: Option<String>,
    pub name: Option<String>,
    pub uri: String,
    pub code: Option<u16>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Event {
    #[serde(default)]
    verb: String,
    #[serde(default)]
    request_uri: String,
    user: User,
    #[serde(default)]
    object_ref: Option<ObjectRef>,
    #[serde(default)]
    response_status: Option<Status>,
}

#[derive(Deserialize)]
struct User {
    #[serde(default)]
    username: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ObjectRef {
    #[serde(default)]
    resource: String,
    #[serde(default)]
    subresource: Option<String>,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    api_group: Option<String>,
}

#[derive(Deserialize)]
struct Status {
    #[serde(default)]
    code: Option<u16>,
}

/// Every request in the audit log at `path` (missing: none yet), oldest first.
pub fn read(path: &Path) -> Result<Vec<Request>> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|line| {
            let event: Event = serde_json::from_str(line)
                .with_context(|| format!("an audit event that is not JSON: {line}"))?;
            let (api_group, resource, namespace, name) = match event.object_ref {
                Some(o) => {
                    let resource = match o.subresource {
                        Some(sub) if !sub.is_empty() => format!("{}/{sub}", o.resource),
                        _ => o.resource,
                    };
                    (
                        Some(o.api_group.unwrap_or_default()),
                        resource,
                        o.namespace,
                        o.name,
                    )
                }
                None => (None, String::new(), None, None),
            };
            Ok(Request {
                user: event.user.username,
                verb: event.verb,
                api_group,
                resource,
                namespace,
                name,
                uri: event.request_uri,
                code: event.response_status.and_then(|s| s.code),
            })
        })
        .collect()
}

/// The audit user name of service account `namespace/name`.
pub fn service_account_user(namespace: &str, name: &str) -> String {
    format!("system:serviceaccount:{namespace}:{name}")
}
