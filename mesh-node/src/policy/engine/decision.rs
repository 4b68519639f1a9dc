//! A decision and what made it, for access logs and `meshctl policy explain`.

use std::{fmt, sync::Arc};

use crate::policy::model::{Enforcement, PeerPolicy, PolicyRef};

/// Allow or deny.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    Deny,
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Allow => "allow",
            Self::Deny => "deny",
        })
    }
}

/// What decided, for access logs and `meshctl policy explain`.
#[derive(Debug, Clone)]
pub enum Reason {
    /// No `DENY` policy matched and no `ALLOW` policy applies to the workload.
    NoAllowPolicy,
    Allowed {
        policy: PolicyRef,
        rule: usize,
    },
    /// `fail_closed`: the rule matched only because part of it cannot be evaluated.
    Denied {
        policy: PolicyRef,
        rule: usize,
        fail_closed: bool,
    },
    /// `ALLOW` policies apply to the workload and none matched.
    NoAllowMatched {
        allow_policies: usize,
    },
    /// A plaintext connection to a port that requires mutual TLS.
    MtlsRequired {
        policy: Arc<PeerPolicy>,
        port_level: bool,
    },
}

#[derive(Debug, Clone)]
pub struct Decision {
    pub verdict: Verdict,
    pub reason: Reason,
}

impl Decision {
    pub(super) fn allow(reason: Reason) -> Self {
        Self {
            verdict: Verdict::Allow,
            reason,
        }
    }

    pub(super) fn deny(reason: Reason) -> Self {
        Self {
            verdict: Verdict::Deny,
            reason,
        }
    }

    pub fn is_allowed(&self) -> bool {
        self.verdict == Verdict::Allow
    }

    /// The authorization policy that decided, if one did.
    pub fn policy(&self) -> Option<&PolicyRef> {
        match &self.reason {
            Reason::Allowed { policy, .. } | Reason::Denied { policy, .. } => Some(policy),
            _ => None,
        }
    }
}

fn enforcement_note(enforcement: &Enforcement) -> &'static str {
    match enforcement {
        Enforcement::Rejected { .. } => " (the policy is rejected: its fail-closed stand-in)",
        _ => "",
    }
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: ", self.verdict)?;
        match &self.reason {
            Reason::NoAllowPolicy => {
                f.write_str("no DENY policy matched and no ALLOW policy applies to the workload")
            }
            Reason::Allowed { policy, rule } => write!(
                f,
                "ALLOW policy {} rule {rule} matched{}",
                policy.id,
                enforcement_note(&policy.enforcement)
            ),
            Reason::Denied {
                policy,
                rule,
                fail_closed,
            } => {
                write!(
                    f,
                    "DENY policy {} rule {rule} matched{}",
                    policy.id,
                    enforcement_note(&policy.enforcement)
                )?;
                if *fail_closed {
                    f.write_str(
                        " (fail closed: part of the rule cannot be evaluated for this connection)",
                    )?;
                }
                Ok(())
            }
            Reason::NoAllowMatched { allow_policies } => write!(
                f,
                "{allow_policies} ALLOW {} to the workload and none matched",
                if *allow_policies == 1 {
                    "policy applies"
                } else {
                    "policies apply"
                }
            ),
            Reason::MtlsRequired { policy, port_level } => write!(
                f,
                "plaintext connection, but PeerAuthentication {} requires mutual TLS{}",
                policy.id,
                if *port_level { " on this port" } else { "" }
            ),
        }
    }
}
