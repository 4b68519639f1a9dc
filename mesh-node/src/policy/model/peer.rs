//! `PeerAuthentication` converted: whether a workload's ports accept plaintext.

use std::{collections::BTreeMap, fmt};

use super::conversion::{
    Enforcement, Notes, PolicyError, PolicyId, StandIn, Why, metadata, port, reject_extra, selector,
};
use crate::k8s::policy::{self as crd, PeerAuthentication};

/// Whether a workload accepts plaintext.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum MtlsMode {
    Permissive,
    Strict,
}

impl fmt::Display for MtlsMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Permissive => "PERMISSIVE",
            Self::Strict => "STRICT",
        })
    }
}

/// A `PeerAuthentication` ready to resolve.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerPolicy {
    pub id: PolicyId,
    pub generation: Option<i64>,
    pub selector: Option<BTreeMap<String, String>>,
    /// `None`: inherit from the next level.
    pub mode: Option<MtlsMode>,
    /// Port-level modes; `UNSET` entries are left out (they inherit `mode`).
    pub ports: BTreeMap<u16, MtlsMode>,
    pub enforcement: Enforcement,
}

impl PeerPolicy {
    /// This policy's mode for a port and whether a port-level entry gave it; `None`: inherit.
    pub fn mode_for(&self, port: u16) -> Option<(MtlsMode, bool)> {
        match self.ports.get(&port) {
            Some(mode) => Some((*mode, true)),
            None => self.mode.map(|m| (m, false)),
        }
    }
}

fn mtls_mode(
    path: &str,
    m: &crd::MutualTls,
    notes: &mut Notes,
) -> Result<Option<MtlsMode>, PolicyError> {
    // An unknown field here might mean anything about what is accepted.
    reject_extra(path, &m.extra)?;
    match m.mode.as_deref().unwrap_or("UNSET") {
        "UNSET" => Ok(None),
        "STRICT" => Ok(Some(MtlsMode::Strict)),
        "PERMISSIVE" => Ok(Some(MtlsMode::Permissive)),
        "DISABLE" => {
            notes.add(format!("{path}.mode"), Why::DisableMode);
            Ok(Some(MtlsMode::Permissive))
        }
        other => Err(PolicyError::UnknownValue {
            path: format!("{path}.mode"),
            value: other.into(),
            allowed: "UNSET, DISABLE, PERMISSIVE, STRICT",
        }),
    }
}

impl TryFrom<&PeerAuthentication> for PeerPolicy {
    type Error = PolicyError;

    fn try_from(obj: &PeerAuthentication) -> Result<Self, PolicyError> {
        let (id, generation) = metadata(obj)?;
        let spec = &obj.spec;
        let mut notes = Notes::default();
        reject_extra("spec", &spec.extra)?;
        let selector = selector(spec.selector.as_ref())?;
        let mode = match &spec.mtls {
            Some(m) => mtls_mode("spec.mtls", m, &mut notes)?,
            None => None,
        };
        let mut ports = BTreeMap::new();
        for (key, m) in &spec.port_level_mtls {
            let path = format!("spec.portLevelMtls[{key:?}]");
            let p = port(path.clone(), key)?;
            if let Some(mode) = mtls_mode(&path, m, &mut notes)? {
                ports.insert(p, mode);
            }
        }
        let enforcement = if notes.0.is_empty() {
            Enforcement::Full
        } else {
            Enforcement::FailClosed(notes.0)
        };
        Ok(Self {
            id,
            generation,
            selector,
            mode,
            ports,
            enforcement,
        })
    }
}

impl PeerPolicy {
    /// The stand-in for an object whose spec cannot be read: `STRICT` for its whole
    /// namespace (the whole mesh, in the root namespace).
    pub fn unreadable(id: PolicyId, generation: Option<i64>, error: String) -> Self {
        Self {
            id,
            generation,
            selector: None,
            mode: Some(MtlsMode::Strict),
            ports: BTreeMap::new(),
            enforcement: Enforcement::Rejected {
                error: PolicyError::Unreadable(error),
                stand_in: StandIn::Strict,
            },
        }
    }

    /// Converts an object; a rejected one becomes `STRICT` on every port of the scope it may
    /// have meant. Fails only without namespace or name.
    pub fn compile(obj: &PeerAuthentication) -> Result<Self, PolicyError> {
        let error = match Self::try_from(obj) {
            Ok(policy) => return Ok(policy),
            Err(e @ PolicyError::MissingMetadata(_)) => return Err(e),
            Err(e) => e,
        };
        let (id, generation) = metadata(obj)?;
        Ok(Self {
            id,
            generation,
            selector: selector(obj.spec.selector.as_ref()).unwrap_or(None),
            mode: Some(MtlsMode::Strict),
            ports: BTreeMap::new(),
            enforcement: Enforcement::Rejected {
                error,
                stand_in: StandIn::Strict,
            },
        })
    }
}
