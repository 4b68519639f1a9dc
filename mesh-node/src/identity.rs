//! Workload identity: SPIFFE IDs, the local CA that signs them, and the store of certificates
//! this node holds for its own workloads.
//!
//! `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>` is the only identity form the
//! mesh accepts. Parsing is strict and literal: no percent-decoding, no case folding, no extra
//! path segments, so two spellings can never name the same principal.

use std::{fmt, str::FromStr};

pub mod ca;
pub mod store;

pub use ca::LocalCa;
pub use store::{CertStore, WorkloadCert};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdentityError {
    #[error(
        "{0:?} is not a SPIFFE ID of the form spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>"
    )]
    Malformed(String),
    #[error("trust domain {0:?} is invalid: use lowercase letters, digits, '.', '-' and '_'")]
    TrustDomain(String),
    #[error("namespace {0:?} is not a DNS label")]
    Namespace(String),
    #[error("service account {0:?} is not a DNS subdomain")]
    ServiceAccount(String),
    #[error("server name {0:?} does not name a workload identity")]
    ServerName(String),
}

/// A workload's SPIFFE identity.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity {
    trust_domain: String,
    namespace: String,
    service_account: String,
}

/// Suffix of the TLS server names that carry a destination identity (see [`Identity::to_sni`]).
const SNI_SUFFIX: &str = ".id.trellis";

impl Identity {
    pub fn new(
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, IdentityError> {
        let td_ok = !trust_domain.is_empty()
            && trust_domain.len() <= 255
            && trust_domain.bytes().all(|b| {
                b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')
            });
        if !td_ok {
            return Err(IdentityError::TrustDomain(trust_domain.into()));
        }
        if !is_dns_label(namespace) {
            return Err(IdentityError::Namespace(namespace.into()));
        }
        if !is_dns_subdomain(service_account) {
            return Err(IdentityError::ServiceAccount(service_account.into()));
        }
        Ok(Self {
            trust_domain: trust_domain.into(),
            namespace: namespace.into(),
            service_account: service_account.into(),
        })
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }
    pub fn namespace(&self) -> &str {
        &self.namespace
    }
    pub fn service_account(&self) -> &str {
        &self.service_account
    }

    /// The TLS server name a client sends to ask the destination node for this identity's
    /// certificate: `<namespace>.<service-account>.id.trellis`. Namespaces never contain dots,
    /// so the first label is the namespace and the rest up to the suffix the service account.
    /// The trust domain is implied: a node only serves identities of its own trust domain.
    pub fn to_sni(&self) -> String {
        format!("{}.{}{SNI_SUFFIX}", self.namespace, self.service_account)
    }

    /// Inverse of [`Identity::to_sni`], within `trust_domain`.
    pub fn from_sni(name: &str, trust_domain: &str) -> Result<Self, IdentityError> {
        let bad = || IdentityError::ServerName(name.into());
        let rest = name.strip_suffix(SNI_SUFFIX).ok_or_else(bad)?;
        let (namespace, service_account) = rest.split_once('.').ok_or_else(bad)?;
        Self::new(trust_domain, namespace, service_account).map_err(|_| bad())
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

impl FromStr for Identity {
    type Err = IdentityError;

    fn from_str(uri: &str) -> Result<Self, Self::Err> {
        let malformed = || IdentityError::Malformed(uri.into());
        let rest = uri.strip_prefix("spiffe://").ok_or_else(malformed)?;
        let mut parts = rest.split('/');
        let (Some(td), Some("ns"), Some(ns), Some("sa"), Some(sa), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(malformed());
        };
        Self::new(td, ns, sa)
    }
}

/// An RFC 1123 DNS label, as Kubernetes names namespaces, services and node name parts: the
/// one check every module uses.
pub fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// An RFC 1123 DNS subdomain, lowercase, as Kubernetes names most objects and its nodes (and
/// as HTTP hostnames are written): at most 253 bytes of dot-separated [`is_dns_label`]s.
pub fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_dns_label)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_spiffe_ids() {
        let id: Identity = "spiffe://cluster.local/ns/shop/sa/web"
            .parse()
            .expect("valid");
        assert_eq!(id.namespace(), "shop");
        assert_eq!(id.service_account(), "web");
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/shop/sa/web");
    }

    #[test]
    fn rejects_everything_else() {
        for bad in [
            "spiffe://cluster.local/ns/shop/sa/web/extra",
            "spiffe://cluster.local/ns/shop/sa/",
            "spiffe://cluster.local/ns//sa/web",
            "spiffe://cluster.local/sa/web/ns/shop",
            "spiffe://Cluster.local/ns/shop/sa/web",
            "spiffe://cluster.local/ns/Shop/sa/web",
            "spiffe://cluster.local/ns/shop/sa/w%65b",
            "spiffe://cluster.local/ns/shop/sa/web?x=1",
            "spiffe:///ns/shop/sa/web",
            "https://cluster.local/ns/shop/sa/web",
            "spiffe://cluster.local/ns/sh.op/sa/web",
            "",
        ] {
            assert!(bad.parse::<Identity>().is_err(), "{bad} must be rejected");
        }
    }

    #[test]
    fn service_accounts_may_contain_dots_and_round_trip_through_sni() {
        let id = Identity::new("cluster.local", "shop", "web.v2").expect("valid");
        let sni = id.to_sni();
        assert_eq!(sni, "shop.web.v2.id.trellis");
        assert_eq!(Identity::from_sni(&sni, "cluster.local"), Ok(id));
        assert!(Identity::from_sni("shop.id.trellis", "cluster.local").is_err());
        assert!(Identity::from_sni("shop.web.example.com", "cluster.local").is_err());
        assert!(Identity::from_sni("SHOP.web.id.trellis", "cluster.local").is_err());
    }
}
