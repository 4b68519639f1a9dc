//! The CA service: signs agents' certificate requests for the identities of their own pods,
//! and waypoints' requests for their own identity.
//!
//! Each call is authenticated (the [`Caller`], see [`super::auth`]) and authorized against the
//! latest published mesh state:
//! - a node agent may obtain the identity of at least one enrolled pod scheduled on its node,
//!   and never a waypoint's identity (even if an enrolled pod shares its service account: the
//!   translation rejects that pod instead), so no node can impersonate a waypoint;
//! - a workload may obtain only its own identity, and only when its service account is that of
//!   a waypoint (`Translation::waypoint_accounts`); other workloads get their certificates from
//!   their node's agent.
//!
//! Anything else is refused before any signing, logged and counted. The certificate is built
//! from the identity alone (one URI SAN, no CN); only the request's public key is used, so
//! private keys never leave their holders.

use std::{sync::Arc, time::Duration};

use tonic::{Request, Response, Status};

use super::{
    SharedState, Translation,
    auth::{self, Authenticator, Caller},
    metrics::{ControllerMetrics, SignResult},
};
use crate::{
    api::v1::{SignRequest, SignResponse, certificate_authority_server::CertificateAuthority},
    identity::{Identity, LocalCa},
};

/// Requests larger than this are not certificate requests for a P-256 key.
const MAX_CSR_BYTES: usize = 16 * 1024;

pub struct CaService {
    ca: Arc<LocalCa>,
    auth: Arc<dyn Authenticator>,
    state: SharedState,
    metrics: Arc<ControllerMetrics>,
    /// Where what is signed is recorded for `/debug/proxies`.
    proxies: Arc<super::proxies::Proxies>,
    trust_domain: String,
    ttl: Ttl,
}

/// Workload certificate lifetimes: given when a request asks for none, and the most granted.
#[derive(Clone, Copy, Debug)]
pub struct Ttl {
    pub default: Duration,
    pub max: Duration,
}

impl CaService {
    pub fn new(
        ca: Arc<LocalCa>,
        auth: Arc<dyn Authenticator>,
        state: SharedState,
        metrics: Arc<ControllerMetrics>,
        proxies: Arc<super::proxies::Proxies>,
        trust_domain: String,
        ttl: Ttl,
    ) -> Self {
        Self {
            ca,
            auth,
            state,
            metrics,
            proxies,
            trust_domain,
            ttl,
        }
    }

    fn fail(&self, result: SignResult, status: Status) -> Status {
        self.metrics.sign(result);
        status
    }

    async fn sign_inner(&self, request: Request<SignRequest>) -> Result<SignResponse, Status> {
        let caller = match auth::authenticate(self.auth.as_ref(), request.metadata()).await {
            Ok(caller) => caller,
            Err(status) => {
                tracing::warn!(peer = ?request.remote_addr(), reason = status.message(), "certificate request not authenticated");
                let result = if status.code() == tonic::Code::Unavailable {
                    SignResult::Unavailable
                } else {
                    SignResult::Unauthenticated
                };
                return Err(self.fail(result, status));
            }
        };
        let request = request.into_inner();
        let identity: Identity = request.identity.parse().map_err(|e| {
            self.fail(
                SignResult::Invalid,
                Status::invalid_argument(format!("identity: {e}")),
            )
        })?;
        if identity.trust_domain() != self.trust_domain {
            return Err(self.fail(
                SignResult::Invalid,
                Status::invalid_argument(format!(
                    "identity {identity} is not in trust domain {}",
                    self.trust_domain
                )),
            ));
        }
        if request.csr_pem.len() > MAX_CSR_BYTES {
            return Err(self.fail(
                SignResult::Invalid,
                Status::invalid_argument(format!("csr_pem is larger than {MAX_CSR_BYTES} bytes")),
            ));
        }

        let Some(state) = self.state.borrow().clone() else {
            return Err(self.fail(
                SignResult::Unavailable,
                Status::unavailable("the controller has not loaded the cluster state yet; retry"),
            ));
        };
        if let Err(reason) = may_hold(&state.translation, &caller, &identity) {
            tracing::warn!(
                %caller,
                %identity,
                version = state.version,
                %reason,
                "refused certificate"
            );
            return Err(self.fail(SignResult::Denied, Status::permission_denied(reason)));
        }

        let ttl = match request.ttl_secs {
            0 => self.ttl.default,
            secs => Duration::from_secs(secs).min(self.ttl.max),
        };
        let signed = self
            .ca
            .sign_csr(&request.csr_pem, &identity, ttl)
            .map_err(|e| match e {
                crate::identity::ca::CaError::Csr(_) => {
                    self.fail(SignResult::Invalid, Status::invalid_argument(e.to_string()))
                }
                other => {
                    tracing::error!(error = %other, %identity, "signing failed");
                    self.fail(SignResult::Error, Status::internal(other.to_string()))
                }
            })?;
        self.metrics.sign(SignResult::Signed);
        self.proxies
            .signed(&caller.to_string(), &identity.to_string(), signed.not_after);
        tracing::info!(%caller, %identity, ttl_secs = ttl.as_secs(), "signed workload certificate");
        Ok(SignResponse {
            chain_pem: signed.chain_pem,
            roots_pem: vec![self.ca.cert_pem().to_owned()],
        })
    }
}

/// Whether `caller` may obtain a certificate for `identity` (see the module docs); the refusal
/// names both.
fn may_hold(translation: &Translation, caller: &Caller, identity: &Identity) -> Result<(), String> {
    let (namespace, account) = (identity.namespace(), identity.service_account());
    match caller {
        Caller::Node(node) if translation.is_waypoint_account(namespace, account) => Err(format!(
            "node {node} may not obtain identity {identity}: it is a waypoint's, which only the waypoint's own pods may obtain"
        )),
        Caller::Node(node) if !translation.node_may_hold(node, identity) => Err(format!(
            "node {node} runs no enrolled pod with identity {identity}: an agent may only obtain certificates for identities of pods scheduled on its own node"
        )),
        Caller::Node(_) => Ok(()),
        Caller::Workload {
            namespace: own_namespace,
            service_account: own_account,
            ..
        } if (own_namespace.as_str(), own_account.as_str()) != (namespace, account) => {
            Err(format!(
                "{caller} may not obtain identity {identity}: a workload may only obtain its own identity"
            ))
        }
        Caller::Workload { .. } if !translation.is_waypoint_account(namespace, account) => {
            Err(format!(
                "{caller} is not the service account of a waypoint with running pods: other workloads get their certificates from their node's agent"
            ))
        }
        Caller::Workload { .. } => Ok(()),
    }
}

#[tonic::async_trait]
impl CertificateAuthority for CaService {
    async fn sign(&self, request: Request<SignRequest>) -> Result<Response<SignResponse>, Status> {
        self.sign_inner(request).await.map(Response::new)
    }
}

#[cfg(test)]
mod tests;
