//! What converting an object yields besides the policy itself: the object's identity, why it
//! was rejected ([`PolicyError`]) or which of its fields fail closed ([`Unsupported`]), and
//! how faithfully it is enforced ([`Enforcement`]); and the helpers every kind's conversion
//! shares (metadata, selectors, unknown fields, ports, address blocks).

use std::{collections::BTreeMap, fmt};

use kube::ResourceExt;

use super::source::IpBlock;
use crate::k8s::policy::{self as crd, ExtraFields};

/// The object a policy came from: `namespace/name` and the generation it was converted from.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PolicyId {
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for PolicyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Why an object was rejected. The message starts with the field path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("metadata.{0}: the object has none; it cannot be placed or reported on")]
    MissingMetadata(&'static str),
    #[error("{path}: {value:?} is not one of {allowed}")]
    UnknownValue {
        path: String,
        value: String,
        allowed: &'static str,
    },
    #[error("{path}: {value:?} is not a port number (1-65535)")]
    Port { path: String, value: String },
    #[error("{path}: {value:?} is not an IP address or CIDR block (like 10.0.0.0/8 or fd00::/8)")]
    IpBlock { path: String, value: String },
    /// A value that cannot be used, with what is wrong with it.
    #[error("{path}: {why}")]
    Invalid { path: String, why: String },
    /// The spec does not have the shape of the kind at all (a list where an object belongs).
    #[error("spec: cannot be read: {0}")]
    Unreadable(String),
    /// A field that changes what the whole object means, which this version cannot read.
    #[error("{path}: {why}")]
    Unsupported { path: String, why: Why },
}

impl PolicyError {
    /// The status condition reason for this rejection.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Unsupported { .. } => "Unsupported",
            _ => "Invalid",
        }
    }
}

/// Why a field cannot be evaluated where the policy is enforced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Why {
    /// A request attribute (HTTP, JWT, `when`) in a policy bound to workloads: only a
    /// waypoint sees it, and only policies attached to one with `targetRefs` apply there.
    Layer7(&'static str),
    /// A value of a request attribute that cannot be matched as written.
    Pattern {
        value: String,
        expected: &'static str,
    },
    /// A `when` key this version does not evaluate.
    WhenKey(String),
    /// A field or form Trellis evaluates nowhere.
    NotSupported(&'static str),
    /// A field this version does not know.
    UnknownField,
    /// A value that can never be matched literally (wildcards, patterns, malformed names).
    NotLiteral(String),
    /// `action: CUSTOM` delegates to an external authorizer, which Trellis does not call.
    CustomAction,
    /// Both `selector` and `targetRefs`: the object's scope is ambiguous.
    SelectorAndTargets,
    /// Both `targetRef` and `targetRefs`.
    BothTargetRefForms,
    /// A target of a kind waypoints do not serve (`group/kind`).
    TargetKind(String),
    /// A target in another namespace than the policy's.
    OtherNamespace(String),
    /// `mode: DISABLE`: mesh traffic is always mutual TLS; plaintext stays accepted.
    DisableMode,
}

impl fmt::Display for Why {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Layer7(what) => write!(
                f,
                "{what} cannot be evaluated at L4 (needs a waypoint: attach the policy to one with targetRefs instead of a selector)"
            ),
            Self::Pattern { value, expected } => {
                write!(f, "{value:?} cannot be matched as written: {expected}")
            }
            Self::WhenKey(key) => write!(f, "{key:?} is not a supported condition key"),
            Self::NotSupported(what) => write!(f, "{what} is not supported"),
            Self::UnknownField => f.write_str("unknown field"),
            Self::NotLiteral(v) => write!(
                f,
                "{v:?} is not a literal name: matching is exact, wildcards and patterns are not supported"
            ),
            Self::CustomAction => {
                f.write_str("CUSTOM needs an external authorizer, which is not supported")
            }
            Self::SelectorAndTargets => {
                f.write_str("a policy may have a selector or targetRefs, not both")
            }
            Self::BothTargetRefForms => f.write_str("use targetRefs or targetRef, not both"),
            Self::OtherNamespace(ns) => write!(
                f,
                "targets in another namespace ({ns:?}) are not supported: put the policy in the target's namespace"
            ),
            Self::TargetKind(kind) => write!(
                f,
                "{kind:?} is not a supported target: waypoints serve Gateway and GatewayClass (gateway.networking.k8s.io) and Service (core) targets"
            ),
            Self::DisableMode => f.write_str("DISABLE is not supported; enforced as PERMISSIVE"),
        }
    }
}

/// A field that fails closed, for the status message and `explain`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsupported {
    pub path: String,
    pub why: Why,
}

impl fmt::Display for Unsupported {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.why)
    }
}

/// What replaces a rejected object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StandIn {
    /// A rejected `ALLOW`: an `ALLOW` policy without rules over the same scope. The workloads
    /// stay reachable only through other `ALLOW` policies, a subset of what the author could
    /// have meant.
    AllowNothing,
    /// A rejected `DENY` or `CUSTOM`, or an unknown action: every connection to the scope is
    /// denied.
    DenyAll,
    /// A rejected `PeerAuthentication`: `STRICT` on every port of its scope.
    Strict,
    /// A rejected `AUDIT` policy: audit policies never change a decision, so nothing.
    Nothing,
    /// A rejected `RequestAuthentication`: it accepts no issuer where it applies, so requests
    /// carrying a token there are refused unless another one verifies it.
    RejectTokens,
}

/// How faithfully an object is enforced; the status condition is derived from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Enforcement {
    /// Exactly as written.
    Full,
    /// As written, except these fields, which fail closed.
    FailClosed(Vec<Unsupported>),
    /// Rejected; the stand-in is enforced instead. The scope is the object's selector when it
    /// was readable, otherwise its whole namespace (the whole mesh, in the root namespace).
    Rejected {
        error: PolicyError,
        stand_in: StandIn,
    },
    /// Accepted but never changes a decision (`AUDIT`: audit logging is not implemented).
    NoEffect,
}

/// Collects the fields that fail closed while converting one object.
#[derive(Default)]
pub(super) struct Notes(pub(super) Vec<Unsupported>);

impl Notes {
    pub(super) fn add(&mut self, path: impl Into<String>, why: Why) {
        self.0.push(Unsupported {
            path: path.into(),
            why,
        });
    }

    /// Notes every unknown field under `path`; true if there was any.
    pub(super) fn extra(&mut self, path: &str, extra: &ExtraFields) -> bool {
        for key in extra.keys() {
            self.add(format!("{path}.{key}"), Why::UnknownField);
        }
        !extra.is_empty()
    }

    /// Notes a non-empty layer-7 field; true if it was set.
    pub(super) fn l7(
        &mut self,
        path: &str,
        field: &str,
        values: &[String],
        what: &'static str,
    ) -> bool {
        if !values.is_empty() {
            self.add(format!("{path}.{field}"), Why::Layer7(what));
        }
        !values.is_empty()
    }
}

fn unsupported_err(path: impl Into<String>, why: Why) -> PolicyError {
    PolicyError::Unsupported {
        path: path.into(),
        why,
    }
}

/// The first unknown field of an object whose meaning it could change entirely.
pub(crate) fn reject_extra(path: &str, extra: &ExtraFields) -> Result<(), PolicyError> {
    match extra.keys().next() {
        Some(key) => Err(unsupported_err(format!("{path}.{key}"), Why::UnknownField)),
        None => Ok(()),
    }
}

pub(crate) fn metadata(obj: &impl ResourceExt) -> Result<(PolicyId, Option<i64>), PolicyError> {
    identify(obj.meta())
}

/// The object's `namespace/name` and generation; an object without either name cannot be
/// placed or reported on.
pub(crate) fn identify(
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
) -> Result<(PolicyId, Option<i64>), PolicyError> {
    let part = |value: &Option<String>, what| {
        value
            .clone()
            .filter(|v| !v.is_empty())
            .ok_or(PolicyError::MissingMetadata(what))
    };
    let namespace = part(&meta.namespace, "namespace")?;
    let name = part(&meta.name, "name")?;
    Ok((PolicyId { namespace, name }, meta.generation))
}

/// The selector's labels, `None` for "all workloads of the scope" (absent or empty).
pub(crate) fn selector(
    sel: Option<&crd::WorkloadSelector>,
) -> Result<Option<BTreeMap<String, String>>, PolicyError> {
    let Some(sel) = sel else { return Ok(None) };
    // `matchExpressions` or anything else could narrow or widen the selection in ways this
    // version cannot tell.
    reject_extra("spec.selector", &sel.extra)?;
    Ok((!sel.match_labels.is_empty()).then(|| sel.match_labels.clone()))
}

pub(super) fn port(path: String, value: &str) -> Result<u16, PolicyError> {
    let ok = !value.is_empty() && value.len() <= 5 && value.bytes().all(|b| b.is_ascii_digit());
    match value.parse::<u16>() {
        Ok(p) if ok && p != 0 => Ok(p),
        _ => Err(PolicyError::Port {
            path,
            value: value.into(),
        }),
    }
}

pub(super) fn ip_blocks(path: &str, values: &[String]) -> Result<Vec<IpBlock>, PolicyError> {
    values
        .iter()
        .enumerate()
        .map(|(i, v)| {
            v.parse().map_err(|()| PolicyError::IpBlock {
                path: format!("{path}[{i}]"),
                value: v.clone(),
            })
        })
        .collect()
}
