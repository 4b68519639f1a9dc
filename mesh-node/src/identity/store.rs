//! The certificates this node holds for its local workloads, one per identity.
//!
//! Readers (TLS handshakes on both sides) take a lock-free snapshot; the store's owner issues,
//! renews at half life and drops certificates. A certificate exists only for identities of
//! workloads scheduled on this node.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::{Duration, SystemTime},
};

use arc_swap::ArcSwap;
use rustls::{ClientConfig, crypto::CryptoProvider, sign::CertifiedKey};

use super::{Identity, LocalCa, ca::CaError};
use crate::tls::{self, TlsError};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Ca(#[from] CaError),
    #[error(transparent)]
    Tls(#[from] TlsError),
}

/// One identity's current certificate, with everything a handshake needs ready-made.
pub struct WorkloadCert {
    pub identity: Identity,
    /// What the inbound listener presents when a client asks for this identity.
    pub server_key: Arc<CertifiedKey>,
    /// What the outbound side uses to open HBONE connections as this identity.
    pub client_config: Arc<ClientConfig>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl WorkloadCert {
    /// Renewal is due at half of the lifetime.
    pub fn renew_at(&self) -> SystemTime {
        let life = self
            .not_after
            .duration_since(self.not_before)
            .unwrap_or_default();
        self.not_before + life / 2
    }
}

pub struct CertStore {
    ca: LocalCa,
    provider: Arc<CryptoProvider>,
    roots: Arc<rustls::RootCertStore>,
    trust_domain: String,
    ttl: Duration,
    certs: ArcSwap<HashMap<Identity, Arc<WorkloadCert>>>,
}

impl CertStore {
    pub fn new(
        ca: LocalCa,
        provider: Arc<CryptoProvider>,
        trust_domain: &str,
        ttl: Duration,
    ) -> Result<Self, StoreError> {
        let roots = Arc::new(tls::root_store(ca.cert_der())?);
        Ok(Self {
            ca,
            provider,
            roots,
            trust_domain: trust_domain.into(),
            ttl,
            certs: ArcSwap::default(),
        })
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }
    pub fn roots(&self) -> &Arc<rustls::RootCertStore> {
        &self.roots
    }
    pub fn provider(&self) -> &Arc<CryptoProvider> {
        &self.provider
    }

    /// The current certificate for `identity`, if this node holds one.
    pub fn get(&self, identity: &Identity) -> Option<Arc<WorkloadCert>> {
        self.certs.load().get(identity).cloned()
    }

    /// Every certificate held, for the config dump.
    pub fn snapshot(&self) -> Arc<HashMap<Identity, Arc<WorkloadCert>>> {
        self.certs.load_full()
    }

    /// Makes the held set exactly `wanted`: issues what is missing or due for renewal, drops
    /// certificates of identities no longer on this node.
    pub fn reconcile(&self, wanted: &HashSet<Identity>) -> Result<(), StoreError> {
        let now = SystemTime::now();
        let current = self.certs.load_full();
        let mut next = HashMap::with_capacity(wanted.len());
        for identity in wanted {
            let cert = match current.get(identity) {
                Some(cert) if cert.renew_at() > now => cert.clone(),
                _ => Arc::new(self.issue(identity)?),
            };
            next.insert(identity.clone(), cert);
        }
        self.certs.store(Arc::new(next));
        Ok(())
    }

    /// The earliest time any held certificate is due for renewal.
    pub fn next_renewal(&self) -> Option<SystemTime> {
        self.certs.load().values().map(|c| c.renew_at()).min()
    }

    fn issue(&self, identity: &Identity) -> Result<WorkloadCert, StoreError> {
        let issued = self.ca.issue(identity, self.ttl)?;
        let server_key =
            tls::certified_key(&self.provider, issued.chain.clone(), issued.key.clone_key())?;
        let client_config = tls::client_config(
            self.provider.clone(),
            self.roots.clone(),
            &self.trust_domain,
            issued.chain,
            issued.key,
        )?;
        tracing::info!(%identity, not_after = ?issued.not_after, "issued workload certificate");
        Ok(WorkloadCert {
            identity: identity.clone(),
            server_key,
            client_config: Arc::new(client_config),
            not_before: issued.not_before,
            not_after: issued.not_after,
        })
    }
}

impl std::fmt::Debug for CertStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertStore")
            .field("identities", &self.certs.load().len())
            .finish()
    }
}

/// Serves the inbound listener: presents the certificate of the identity the client asked for
/// (by server name), and only to clients that speak HTTP/2.
impl rustls::server::ResolvesServerCert for CertStore {
    fn resolve(&self, hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let offers_h2 = hello
            .alpn()
            .is_some_and(|mut protos| protos.any(|p| p == tls::ALPN_H2));
        if !offers_h2 {
            tracing::debug!("refusing handshake: client did not offer ALPN h2");
            return None;
        }
        let name = hello.server_name()?;
        let identity = Identity::from_sni(name, &self.trust_domain).ok()?;
        self.get(&identity).map(|c| c.server_key.clone())
    }
}
