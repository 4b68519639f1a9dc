//! What a node that follows the controller (agent or waypoint) builds from its control plane
//! section before it serves, in this order: the mesh roots, the certificate store that
//! trusts them, the lazily connected channel, the bearer token, and the CA client that signs
//! through that channel ([`Remote`]). Both roles then start their certificate manager and
//! their server TLS on what it returns.

use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use tonic::transport::Channel;

use super::channel::{self, BearerToken, ChannelError};
use crate::{
    config::ControlPlaneConfig,
    identity::{
        CertStore,
        store::{Issuer, RemoteCa, StoreError},
    },
};

/// Why the control plane section cannot be put to use.
#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    /// The mesh roots or the controller's endpoint.
    #[error(transparent)]
    Channel(#[from] ChannelError),
    /// The certificate store refuses the roots.
    #[error(transparent)]
    Certs(#[from] StoreError),
}

/// The node's side of the control plane, ready to use.
pub struct Remote {
    pub certs: Arc<CertStore>,
    pub channel: Channel,
    pub token: BearerToken,
    /// The controller's CA service, through [`Remote::channel`].
    pub issuer: Issuer,
}

/// Builds the node's side of the control plane from its configuration section.
pub fn connect(
    cp: &ControlPlaneConfig,
    trust_domain: &str,
    provider: &Arc<CryptoProvider>,
) -> Result<Remote, BootstrapError> {
    let roots = channel::read_roots(cp)?;
    let certs = Arc::new(CertStore::new(provider.clone(), &roots, trust_domain)?);
    let channel = channel::channel(cp)?;
    let token = BearerToken::new(cp.token_file.clone());
    let issuer = Issuer::Remote(RemoteCa::new(
        channel.clone(),
        token.clone(),
        certs.roots().clone(),
        provider.clone(),
    ));
    Ok(Remote {
        certs,
        channel,
        token,
        issuer,
    })
}
