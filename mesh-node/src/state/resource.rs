//! Why a resource streamed by the controller is refused ([`ResourceError`]), and what every
//! conversion at the boundary applies: the name checks (Kubernetes names are DNS labels or
//! subdomains: [`crate::identity::is_dns_label`], [`crate::identity::is_dns_subdomain`]) and
//! the address form every index uses ([`canonical`]).

use std::net::IpAddr;

use crate::identity::{is_dns_label, is_dns_subdomain};

/// Why a resource from the controller cannot be used. The message names the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct ResourceError {
    pub field: String,
    pub reason: String,
}

pub(crate) fn bad(field: impl Into<String>, reason: impl Into<String>) -> ResourceError {
    ResourceError {
        field: field.into(),
        reason: reason.into(),
    }
}

/// Kubernetes object names: lowercase DNS subdomains.
pub(crate) fn check_subdomain(field: &str, value: &str) -> Result<(), ResourceError> {
    if is_dns_subdomain(value) {
        Ok(())
    } else {
        Err(bad(field, format!("{value:?} is not a DNS subdomain")))
    }
}

/// Service and namespace names are DNS labels; the hostname built from them must be
/// unambiguous, so a dot is refused.
pub(crate) fn check_label(field: &str, value: &str) -> Result<(), ResourceError> {
    if is_dns_label(value) {
        Ok(())
    } else {
        Err(bad(field, format!("{value:?} is not a DNS label")))
    }
}

/// IPv4-mapped IPv6 addresses name the IPv4 workload.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        IpAddr::V4(_) => ip,
    }
}

/// An optional string field of the protobuf: empty means none.
pub(crate) fn non_empty(value: String) -> Option<String> {
    (!value.is_empty()).then_some(value)
}
