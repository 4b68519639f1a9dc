//! Conditions on the source of a connection: its verified identity (`principals`,
//! `namespaces`, `serviceAccounts`, `trustDomains`) and its address (`ipBlocks`).
//!
//! Identities match literally: principals are compared component by component with the
//! verified SPIFFE ID, namespaces by equality; the only pattern is Istio's `"*"` alone, meaning
//! "any authenticated source". Other wildcard or regular-expression forms are unsupported
//! values, never patterns: they evaluate as unknown.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    str::FromStr,
};

use crate::identity::{Identity, is_dns_label, is_dns_subdomain};

/// One value of `principals` / `notPrincipals` (or a `source.principal` condition).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PrincipalMatch {
    Exact(Identity),
    /// `"*"`: any verified identity.
    AnyAuthenticated,
    /// Could never be compared literally; evaluates as unknown.
    Unsupported,
}

/// One value of `namespaces` / `notNamespaces` (or a `source.namespace` condition).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NamespaceMatch {
    Exact(String),
    /// `"*"`: any verified identity.
    AnyAuthenticated,
    /// Not a namespace name; evaluates as unknown.
    Unsupported,
}

/// One value of `serviceAccounts` / `notServiceAccounts`: a verified source whose SPIFFE ID
/// names this namespace and service account, in any trust domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServiceAccountMatch {
    Exact {
        namespace: String,
        service_account: String,
    },
    /// Not `<namespace>/<service-account>`; evaluates as unknown.
    Unsupported,
}

/// One value of `trustDomains` / `notTrustDomains`: the trust domain of a verified source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TrustDomainMatch {
    Exact(String),
    /// Not a trust domain name; evaluates as unknown.
    Unsupported,
}

/// `<namespace>/<service-account>`, both literal Kubernetes names.
pub(super) fn service_account_match(value: &str) -> ServiceAccountMatch {
    match value.split_once('/') {
        Some((ns, sa)) if is_dns_label(ns) && is_dns_subdomain(sa) => ServiceAccountMatch::Exact {
            namespace: ns.to_owned(),
            service_account: sa.to_owned(),
        },
        _ => ServiceAccountMatch::Unsupported,
    }
}

/// A trust domain, validated as identities validate theirs (so a value that no identity can
/// carry is reported instead of silently never matching).
pub(super) fn trust_domain_match(value: &str) -> TrustDomainMatch {
    match Identity::new(value, "default", "default") {
        Ok(_) => TrustDomainMatch::Exact(value.to_owned()),
        Err(_) => TrustDomainMatch::Unsupported,
    }
}

/// `<trust-domain>/ns/<namespace>/sa/<service-account>`, optionally with `spiffe://`, or `*`.
pub(super) fn principal_match(value: &str) -> PrincipalMatch {
    if value == "*" {
        return PrincipalMatch::AnyAuthenticated;
    }
    let rest = value.strip_prefix("spiffe://").unwrap_or(value);
    let mut parts = rest.split('/');
    if let (Some(td), Some("ns"), Some(ns), Some("sa"), Some(sa), None) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) && let Ok(id) = Identity::new(td, ns, sa)
    {
        return PrincipalMatch::Exact(id);
    }
    PrincipalMatch::Unsupported
}

/// A namespace name, or `*`.
pub(super) fn namespace_match(value: &str) -> NamespaceMatch {
    let label = !value.is_empty()
        && value.len() <= 63
        && value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !value.starts_with('-')
        && !value.ends_with('-');
    match value {
        "*" => NamespaceMatch::AnyAuthenticated,
        v if label => NamespaceMatch::Exact(v.into()),
        _ => NamespaceMatch::Unsupported,
    }
}

/// An address block; the address has its host bits cleared, IPv4 is never stored IPv4-mapped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IpBlock {
    addr: IpAddr,
    prefix: u8,
}

impl IpBlock {
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                mask4(u32::from(ip), self.prefix) == u32::from(net)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                mask6(u128::from(ip), self.prefix) == u128::from(net)
            }
            _ => false,
        }
    }
}

fn mask4(v: u32, prefix: u8) -> u32 {
    v & u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0)
}

fn mask6(v: u128, prefix: u8) -> u128 {
    v & u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0)
}

impl FromStr for IpBlock {
    type Err = ();

    /// `a.b.c.d`, `a.b.c.d/n`, IPv6 alike. Host bits are cleared (`10.1.2.3/8` is `10.0.0.0/8`);
    /// an IPv4-mapped IPv6 block of prefix 96 or more is the IPv4 block it maps.
    fn from_str(s: &str) -> Result<Self, ()> {
        let (addr, prefix) = match s.split_once('/') {
            Some((addr, prefix)) => {
                // Digits only: `u8::from_str` would also take a leading `+`.
                if prefix.is_empty()
                    || prefix.len() > 3
                    || !prefix.bytes().all(|b| b.is_ascii_digit())
                {
                    return Err(());
                }
                (addr, Some(prefix.parse::<u8>().map_err(|_| ())?))
            }
            None => (s, None),
        };
        match addr.parse::<IpAddr>().map_err(|_| ())? {
            IpAddr::V4(v4) => {
                let prefix = prefix.unwrap_or(32);
                if prefix > 32 {
                    return Err(());
                }
                Ok(Self::v4(v4, prefix))
            }
            IpAddr::V6(v6) => {
                let prefix = prefix.unwrap_or(128);
                if prefix > 128 {
                    return Err(());
                }
                match v6.to_ipv4_mapped() {
                    Some(v4) if prefix >= 96 => Ok(Self::v4(v4, prefix - 96)),
                    _ => Ok(Self {
                        addr: IpAddr::V6(Ipv6Addr::from(mask6(u128::from(v6), prefix))),
                        prefix,
                    }),
                }
            }
        }
    }
}

impl IpBlock {
    fn v4(addr: Ipv4Addr, prefix: u8) -> Self {
        Self {
            addr: IpAddr::V4(Ipv4Addr::from(mask4(u32::from(addr), prefix))),
            prefix,
        }
    }
}

impl fmt::Display for IpBlock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}
