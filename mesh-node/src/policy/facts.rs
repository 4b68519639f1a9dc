//! What is known of a connection or a request when it is decided: the destination workload
//! and port, the verified peer identity and address ([`Flow`]); at a waypoint, the waypoint
//! and services a request is for ([`WaypointTarget`]), its method, normalized path, authority,
//! headers and verified token ([`RequestFacts`], [`VerifiedJwt`]).
//!
//! Facts are gathered by the proxies (the node's inbound path, the waypoint) and only read
//! here; whatever the proxy does not know reliably is absent (`None`), never guessed.

use std::{collections::BTreeMap, net::IpAddr};

use http::{HeaderMap, HeaderName};

use crate::identity::Identity;

/// The workload a connection is for.
#[derive(Debug, Clone, Copy)]
pub struct Destination<'a> {
    pub namespace: &'a str,
    pub labels: &'a BTreeMap<String, String>,
}

impl<'a> Destination<'a> {
    pub fn of(workload: &'a crate::state::Workload) -> Self {
        Self {
            namespace: &workload.namespace,
            labels: &workload.labels,
        }
    }
}

/// One inbound connection, as the node knows it.
#[derive(Debug, Clone, Copy)]
pub struct Flow<'a> {
    pub destination: Destination<'a>,
    /// The destination workload's port.
    pub port: u16,
    /// The verified peer identity; `None` for plaintext.
    pub source: Option<&'a Identity>,
    /// The source address if the node knows it reliably; `None` makes `ipBlocks` conditions
    /// unknown (so they fail closed).
    pub source_ip: Option<IpAddr>,
}

/// The waypoint a request arrived at and the services it is for: which policies apply.
#[derive(Debug, Clone, Copy)]
pub struct WaypointTarget<'a> {
    /// The waypoint's `Gateway` object.
    pub gateway_namespace: &'a str,
    pub gateway_name: &'a str,
    /// The destination services (namespace, name): the one whose address was dialled, or,
    /// for a request addressed to a pod, every service that has the pod as an endpoint (the
    /// policies attached to a service protect its endpoints however they are addressed).
    pub services: &'a [(&'a str, &'a str)],
}

/// What a waypoint knows about one request, beyond the connection ([`Flow`]).
#[derive(Debug, Clone, Copy)]
pub struct RequestFacts<'a> {
    pub method: &'a str,
    /// The normalized path ([`super::normalize::NormalizedPath::path`]); a query, if passed
    /// along, is ignored.
    pub path: &'a str,
    /// The request's one authority (`:authority`, absolute-form target or `Host`, which the
    /// waypoint has made agree); case and port are ignored when matching.
    pub host: &'a str,
    pub headers: &'a HeaderMap,
    /// The request's verified JWT, if it carried one (the waypoint's `JwtAuthenticator`
    /// verifies tokens before authorization).
    pub jwt: Option<&'a VerifiedJwt>,
}

/// A token that verified: who the request is from, for authorization.
#[derive(Debug, Clone, PartialEq)]
pub struct VerifiedJwt {
    pub issuer: String,
    /// `sub`, empty when the token has none.
    pub subject: String,
    /// `<iss>/<sub>`, what `requestPrincipals` match.
    pub principal: String,
    /// `aud`, as a list.
    pub audiences: Vec<String>,
    /// The whole payload (`request.auth.claims[...]`).
    pub claims: serde_json::Value,
    /// The headers that carried the token, which the caller removes before forwarding;
    /// empty when the rule keeps them (`forwardOriginalToken: true`).
    pub token_headers: Vec<HeaderName>,
}
