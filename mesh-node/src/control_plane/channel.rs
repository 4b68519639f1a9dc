//! A node's connection to the controller (agent or waypoint): one TLS channel (verified against
//! the mesh root) shared by the discovery feed and the CA client, and the bearer token proving
//! who the node is.

use std::{path::PathBuf, time::Duration};

use rustls_pki_types::CertificateDer;
use tonic::{
    metadata::MetadataValue,
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint},
};

use crate::config::ControlPlaneConfig;

#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    #[error("cannot read the mesh root {path}: {source}")]
    ReadRoot {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("mesh root {path} holds no PEM certificate")]
    NoRoot { path: PathBuf },
    #[error("control plane endpoint {address}: {source}")]
    Endpoint {
        address: String,
        source: tonic::transport::Error,
    },
    #[error("cannot read the node token {path}: {source}")]
    ReadToken {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("node token {path} is empty or not printable ASCII")]
    BadToken { path: PathBuf },
}

/// Time allowed to establish the TCP and TLS connection to the controller.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// HTTP/2 pings notice a silently dead controller (a node that vanished) on idle streams.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(15);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// The mesh roots from the control plane section, DER-encoded.
pub fn read_roots(
    config: &ControlPlaneConfig,
) -> Result<Vec<CertificateDer<'static>>, ChannelError> {
    use rustls_pki_types::pem::PemObject;
    let pem = std::fs::read(&config.ca_cert).map_err(|source| ChannelError::ReadRoot {
        path: config.ca_cert.clone(),
        source,
    })?;
    let roots: Vec<_> = CertificateDer::pem_slice_iter(&pem)
        .filter_map(Result::ok)
        .collect();
    if roots.is_empty() {
        return Err(ChannelError::NoRoot {
            path: config.ca_cert.clone(),
        });
    }
    Ok(roots)
}

/// A lazily connected channel to the controller: it (re)connects on use, so start-up never
/// waits for the controller and a restarted controller is found again without help.
pub fn channel(config: &ControlPlaneConfig) -> Result<Channel, ChannelError> {
    let address = config.address.to_string();
    let endpoint_error = |source| ChannelError::Endpoint {
        address: address.clone(),
        source,
    };
    let pem = std::fs::read(&config.ca_cert).map_err(|source| ChannelError::ReadRoot {
        path: config.ca_cert.clone(),
        source,
    })?;
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(pem))
        .domain_name(config.server_name());
    let endpoint = Endpoint::from_shared(format!("https://{address}"))
        .map_err(endpoint_error)?
        .tls_config(tls)
        .map_err(endpoint_error)?
        .connect_timeout(CONNECT_TIMEOUT)
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true);
    Ok(endpoint.connect_lazy())
}

/// The node's bearer credential, read from its file on every use: kubelet rotates projected
/// service account tokens in place.
#[derive(Clone, Debug)]
pub struct BearerToken {
    path: PathBuf,
}

impl BearerToken {
    pub fn new(path: PathBuf) -> Self {
        Self { path }
    }

    /// Adds `authorization: Bearer <token>` to a request.
    pub async fn authorize<T>(&self, request: &mut tonic::Request<T>) -> Result<(), ChannelError> {
        let text = tokio::fs::read_to_string(&self.path)
            .await
            .map_err(|source| ChannelError::ReadToken {
                path: self.path.clone(),
                source,
            })?;
        let token = text.trim();
        let bad = || ChannelError::BadToken {
            path: self.path.clone(),
        };
        if token.is_empty() {
            return Err(bad());
        }
        let value: MetadataValue<_> = format!("Bearer {token}").parse().map_err(|_| bad())?;
        request.metadata_mut().insert("authorization", value);
        Ok(())
    }
}
