//! Who is calling: turns a bearer credential into a [`Caller`], either a node agent (by the
//! node it runs on) or a workload (by its service account; waypoints call as workloads).
//!
//! Both gRPC services authenticate every call the same way: `authorization: Bearer <token>`
//! metadata, checked by an [`Authenticator`]. Two exist:
//! - [`BootstrapTokens`]: a file of per-caller secrets, for the testbed and clusters without
//!   Kubernetes authentication. A YAML map: a key `<node-name>` is that node's agent; a key
//!   `serviceaccount:<namespace>/<name>` is a workload running as that service account (node
//!   names never contain `:`, so the two cannot be confused). For example:
//!   ```yaml
//!   node-a: 3f9c...                              # the agent of node-a
//!   "serviceaccount:shop/waypoint": 81d0...      # the pods of service account shop/waypoint
//!   ```
//! - [`TokenReview`]: a Kubernetes service account token, checked by the API server. A token
//!   of one of the agents' service accounts is a node agent, whose node comes from the token's
//!   bound pod (`authentication.kubernetes.io/node-name`); any other service account's token is
//!   a workload caller (with its node when the token names one).
//!
//! Authorization (what a caller may ask for) is the services' business, not this module's: a
//! workload credential proves only which service account the caller runs as.

use std::{
    collections::{BTreeMap, BTreeSet},
    future::Future,
    path::Path,
    pin::Pin,
    sync::Arc,
};

use k8s_openapi::api::authentication::v1::{TokenReview as TokenReviewObject, TokenReviewSpec};
use tonic::{Status, metadata::MetadataMap};

use crate::identity::Identity;

/// The TokenReview user extra that names the node of the pod a token is bound to.
pub const NODE_NAME_EXTRA: &str = "authentication.kubernetes.io/node-name";
/// Bootstrap tokens shorter than this are refused at load: they would be guessable.
const MIN_TOKEN_LEN: usize = 16;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("no credential: send `authorization: Bearer <token>` metadata")]
    Missing,
    #[error("credential refused: {0}")]
    Refused(String),
    #[error("cannot check the credential now: {0}")]
    Unavailable(String),
}

impl From<AuthError> for Status {
    fn from(e: AuthError) -> Self {
        match e {
            AuthError::Missing | AuthError::Refused(_) => Status::unauthenticated(e.to_string()),
            AuthError::Unavailable(_) => Status::unavailable(e.to_string()),
        }
    }
}

/// Errors in the authentication configuration, found at start.
#[derive(Debug, thiserror::Error)]
pub enum AuthConfigError {
    #[error("cannot read bootstrap token file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "bootstrap token file {path} is not a YAML map of node name (or serviceaccount:<namespace>/<name>) to token: {reason}"
    )]
    Parse { path: String, reason: String },
    #[error("bootstrap token for {node:?} is invalid: {reason}")]
    Token { node: String, reason: String },
    #[error("token_review.agent_service_accounts entry {0:?} is not <namespace>/<service-account>")]
    ServiceAccount(String),
}

/// Bootstrap token file key prefix for workload callers: `serviceaccount:<namespace>/<name>`.
pub const SERVICE_ACCOUNT_PREFIX: &str = "serviceaccount:";

/// Who a credential belongs to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Caller {
    /// The agent of this node.
    Node(String),
    /// A workload running as `namespace/service_account`, on `node` when the credential says.
    Workload {
        namespace: String,
        service_account: String,
        node: Option<String>,
    },
}

impl Caller {
    /// A workload caller of `namespace/service_account`, on no known node.
    pub fn workload(namespace: &str, service_account: &str) -> Self {
        Self::Workload {
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
            node: None,
        }
    }
}

impl std::fmt::Display for Caller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Caller::Node(node) => write!(f, "node {node}"),
            Caller::Workload {
                namespace,
                service_account,
                node: Some(node),
            } => write!(
                f,
                "service account {namespace}/{service_account} on node {node}"
            ),
            Caller::Workload {
                namespace,
                service_account,
                node: None,
            } => write!(f, "service account {namespace}/{service_account}"),
        }
    }
}

/// Proves who the bearer of a token is.
pub trait Authenticator: Send + Sync {
    /// The caller the credential belongs to.
    fn authenticate<'a>(&'a self, token: &'a str) -> BoxFuture<'a, Result<Caller, AuthError>>;
}

/// The bearer token of a request.
pub fn bearer_token(metadata: &MetadataMap) -> Result<&str, AuthError> {
    let value = metadata.get("authorization").ok_or(AuthError::Missing)?;
    let value = value
        .to_str()
        .map_err(|_| AuthError::Refused("authorization metadata is not text".into()))?;
    let token = value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))
        .ok_or_else(|| AuthError::Refused("authorization is not a Bearer credential".into()))?
        .trim();
    if token.is_empty() {
        return Err(AuthError::Missing);
    }
    Ok(token)
}

/// Authenticates a request: who it comes from, or the status to answer with.
pub async fn authenticate(
    auth: &dyn Authenticator,
    metadata: &MetadataMap,
) -> Result<Caller, Status> {
    let token = bearer_token(metadata)?;
    auth.authenticate(token).await.map_err(Status::from)
}

/// Per-caller secrets from a file: a YAML map of `node-name` or
/// `serviceaccount:<namespace>/<name>` to token (see the module docs).
pub struct BootstrapTokens {
    tokens: Vec<(Caller, String)>,
}

impl std::fmt::Debug for BootstrapTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the tokens themselves.
        f.debug_struct("BootstrapTokens")
            .field(
                "callers",
                &self
                    .tokens
                    .iter()
                    .map(|(c, _)| c.to_string())
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl BootstrapTokens {
    pub fn load(path: &Path) -> Result<Self, AuthConfigError> {
        let display = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| AuthConfigError::Read {
            path: display.clone(),
            source,
        })?;
        let map: BTreeMap<String, String> =
            serde_saphyr::from_str(&text).map_err(|e| AuthConfigError::Parse {
                path: display,
                reason: e.to_string(),
            })?;
        Self::new(map)
    }

    pub fn new(map: BTreeMap<String, String>) -> Result<Self, AuthConfigError> {
        let mut seen = BTreeSet::new();
        let mut tokens = Vec::with_capacity(map.len());
        for (node, token) in &map {
            let invalid = |reason: &str| AuthConfigError::Token {
                node: node.clone(),
                reason: reason.into(),
            };
            if node.is_empty() {
                return Err(invalid("the node name is empty"));
            }
            let caller = match node.strip_prefix(SERVICE_ACCOUNT_PREFIX) {
                None => Caller::Node(node.clone()),
                Some(account) => {
                    let (namespace, name) = account
                        .split_once('/')
                        // The identity rules, whatever the trust domain: a caller that could
                        // never hold an identity is a typo.
                        .filter(|(ns, name)| Identity::new("cluster.local", ns, name).is_ok())
                        .ok_or_else(|| {
                            invalid(
                                "a workload key is serviceaccount:<namespace>/<name>, both valid Kubernetes names",
                            )
                        })?;
                    Caller::workload(namespace, name)
                }
            };
            if token.len() < MIN_TOKEN_LEN {
                return Err(invalid(
                    "shorter than 16 characters; use a long random secret",
                ));
            }
            if !token.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(invalid("only printable ASCII without spaces is allowed"));
            }
            if !seen.insert(token.as_str()) {
                return Err(invalid(
                    "the same token is given to another node or account",
                ));
            }
            tokens.push((caller, token.clone()));
        }
        Ok(Self { tokens })
    }
}

/// Compares in time that depends only on the lengths, not on where the bytes differ, so a
/// caller cannot find a token byte by byte from response times.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

impl Authenticator for BootstrapTokens {
    fn authenticate<'a>(&'a self, token: &'a str) -> BoxFuture<'a, Result<Caller, AuthError>> {
        // Every entry is compared, so the time taken does not say which caller matched.
        let mut found = None;
        for (caller, expected) in &self.tokens {
            if constant_time_eq(expected.as_bytes(), token.as_bytes()) {
                found = Some(caller.clone());
            }
        }
        Box::pin(std::future::ready(found.ok_or_else(|| {
            AuthError::Refused("unknown bootstrap token".into())
        })))
    }
}

/// Kubernetes service account tokens, checked with the TokenReview API. Only tokens of the
/// agents' own service accounts make a node agent: every pod's bound token names its node, and
/// a workload must not be able to pass as its node's agent. Other service accounts' tokens make
/// workload callers, which the services authorize far more narrowly.
pub struct TokenReview {
    client: kube::Client,
    /// Usernames allowed: `system:serviceaccount:<namespace>:<name>`.
    agents: BTreeSet<String>,
    audiences: Vec<String>,
}

impl TokenReview {
    /// `agent_service_accounts` are `<namespace>/<name>`; `audiences` (if any) must all be
    /// in the token.
    pub fn new(
        client: kube::Client,
        agent_service_accounts: &[String],
        audiences: Vec<String>,
    ) -> Result<Self, AuthConfigError> {
        let mut agents = BTreeSet::new();
        for account in agent_service_accounts {
            let Some((ns, name)) = account
                .split_once('/')
                .filter(|(ns, name)| !ns.is_empty() && !name.is_empty() && !name.contains('/'))
            else {
                return Err(AuthConfigError::ServiceAccount(account.clone()));
            };
            agents.insert(format!("system:serviceaccount:{ns}:{name}"));
        }
        Ok(Self {
            client,
            agents,
            audiences,
        })
    }

    async fn review(&self, token: &str) -> Result<Caller, AuthError> {
        let api: kube::Api<TokenReviewObject> = kube::Api::all(self.client.clone());
        let review = TokenReviewObject {
            spec: TokenReviewSpec {
                token: Some(token.to_owned()),
                audiences: (!self.audiences.is_empty()).then(|| self.audiences.clone()),
            },
            ..TokenReviewObject::default()
        };
        let reviewed = api
            .create(&kube::api::PostParams::default(), &review)
            .await
            .map_err(|e| {
                AuthError::Unavailable(format!(
                    "TokenReview failed: {e} (check the controller's RBAC allows creating tokenreviews)"
                ))
            })?;
        let status = reviewed.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            let why = status
                .error
                .unwrap_or_else(|| "token not authenticated".into());
            return Err(AuthError::Refused(why));
        }
        let user = status.user.unwrap_or_default();
        let username = user.username.unwrap_or_default();
        let node = match user
            .extra
            .unwrap_or_default()
            .remove(NODE_NAME_EXTRA)
            .as_deref()
        {
            Some([node]) if !node.is_empty() => Some(node.clone()),
            _ => None,
        };
        if self.agents.contains(&username) {
            return node.map(Caller::Node).ok_or_else(|| {
                AuthError::Refused(format!(
                    "the token is not bound to a pod on a node (no {NODE_NAME_EXTRA}); use a projected service account token"
                ))
            });
        }
        // Kubernetes names service accounts `system:serviceaccount:<namespace>:<name>`;
        // neither part can contain ':'.
        match username
            .strip_prefix("system:serviceaccount:")
            .and_then(|account| account.split_once(':'))
        {
            Some((namespace, name)) if !namespace.is_empty() && !name.is_empty() => {
                Ok(Caller::Workload {
                    namespace: namespace.to_owned(),
                    service_account: name.to_owned(),
                    node,
                })
            }
            _ => Err(AuthError::Refused(format!(
                "{username} is not a service account"
            ))),
        }
    }
}

impl Authenticator for TokenReview {
    fn authenticate<'a>(&'a self, token: &'a str) -> BoxFuture<'a, Result<Caller, AuthError>> {
        Box::pin(self.review(token))
    }
}

/// Accepts what any of its authenticators accepts, asking them in order.
pub struct AnyOf(pub Vec<Arc<dyn Authenticator>>);

impl Authenticator for AnyOf {
    fn authenticate<'a>(&'a self, token: &'a str) -> BoxFuture<'a, Result<Caller, AuthError>> {
        Box::pin(async move {
            let mut unavailable = None;
            let mut refused = None;
            for auth in &self.0 {
                match auth.authenticate(token).await {
                    Ok(caller) => return Ok(caller),
                    Err(e @ AuthError::Unavailable(_)) => unavailable = Some(e),
                    Err(e) => refused = Some(e),
                }
            }
            // "Try again" is the honest answer if any check could not be made.
            Err(unavailable
                .or(refused)
                .unwrap_or_else(|| AuthError::Refused("no authenticator configured".into())))
        })
    }
}

#[cfg(test)]
pub(crate) mod tests;
