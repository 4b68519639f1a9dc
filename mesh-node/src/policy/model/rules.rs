//! Conversion of `AuthorizationPolicy` rules: sources, operations and `when` conditions.
//!
//! How request attributes (HTTP fields, JWT principals, `when`) are converted depends on
//! where the policy is enforced ([`Binding`](super::binding::Binding)):
//!
//! - **On workloads** (node agents) they cannot be evaluated: each field is noted as
//!   [`Why::Layer7`] and fails closed exactly as before waypoints existed (an `ALLOW` rule
//!   using one matches nothing; a `DENY` rule matches on its other fields).
//! - **At waypoints** they are compiled and evaluated per request; only values that cannot be
//!   matched as written ([`Why::Pattern`], unknown `when` keys) are noted, and those evaluate
//!   as unknown on their own.
//!
//! Either way an `ALLOW` rule with any noted field matches nothing, whichever part of it is
//! affected; a `DENY` rule keeps the finer flags and matches on everything it can evaluate.

use super::{
    attributes::{
        self, HttpMatch, StringMatch, WhenKey, WhenMatch, WhenValue, host_match, method_match,
        path_match, request_principal_match,
    },
    authz::{Action, OperationMatch, PortHint, Rule, SourceMatch},
    conversion::{Notes, PolicyError, Why, ip_blocks, port},
    source::{
        NamespaceMatch, PrincipalMatch, ServiceAccountMatch, TrustDomainMatch, namespace_match,
        principal_match, service_account_match, trust_domain_match,
    },
};
use crate::k8s::policy as crd;

/// What converting one policy's rules needs to know.
pub(super) struct Ctx<'n> {
    pub(super) notes: &'n mut Notes,
    pub(super) action: Action,
    /// Request attributes are evaluated (the policy is bound to waypoints).
    pub(super) at_waypoint: bool,
}

fn principals(path: &str, values: &[String], notes: &mut Notes) -> Vec<PrincipalMatch> {
    let mut out = Vec::with_capacity(values.len());
    for (i, v) in values.iter().enumerate() {
        let m = principal_match(v);
        if m == PrincipalMatch::Unsupported {
            notes.add(format!("{path}[{i}]"), Why::NotLiteral(v.clone()));
        }
        out.push(m);
    }
    out
}

fn namespaces(path: &str, values: &[String], notes: &mut Notes) -> Vec<NamespaceMatch> {
    let mut out = Vec::with_capacity(values.len());
    for (i, v) in values.iter().enumerate() {
        let m = namespace_match(v);
        if m == NamespaceMatch::Unsupported {
            notes.add(format!("{path}[{i}]"), Why::NotLiteral(v.clone()));
        }
        out.push(m);
    }
    out
}

fn service_accounts(path: &str, values: &[String], notes: &mut Notes) -> Vec<ServiceAccountMatch> {
    let mut out = Vec::with_capacity(values.len());
    for (i, v) in values.iter().enumerate() {
        let m = service_account_match(v);
        if m == ServiceAccountMatch::Unsupported {
            notes.add(format!("{path}[{i}]"), Why::NotLiteral(v.clone()));
        }
        out.push(m);
    }
    out
}

fn trust_domains(path: &str, values: &[String], notes: &mut Notes) -> Vec<TrustDomainMatch> {
    let mut out = Vec::with_capacity(values.len());
    for (i, v) in values.iter().enumerate() {
        let m = trust_domain_match(v);
        if m == TrustDomainMatch::Unsupported {
            notes.add(format!("{path}[{i}]"), Why::NotLiteral(v.clone()));
        }
        out.push(m);
    }
    out
}

/// A request attribute's values. At a waypoint, unmatchable values are noted; on workloads
/// the whole field is noted once as layer 7 (the values are kept, never evaluated there).
fn attribute(
    ctx: &mut Ctx<'_>,
    path: &str,
    field: &str,
    values: &[String],
    parse: fn(&str) -> StringMatch,
    (what, expected): (&'static str, &'static str),
) -> Vec<StringMatch> {
    let out: Vec<StringMatch> = values.iter().map(|v| parse(v)).collect();
    if !ctx.at_waypoint {
        ctx.notes.l7(path, field, values, what);
        return out;
    }
    for (i, (m, v)) in out.iter().zip(values).enumerate() {
        if *m == StringMatch::Unsupported {
            ctx.notes.add(
                format!("{path}.{field}[{i}]"),
                Why::Pattern {
                    value: v.clone(),
                    expected,
                },
            );
        }
    }
    out
}

/// Whether a note makes its whole source or operation unknown (as opposed to a value that
/// evaluates as unknown on its own).
fn spoils_condition(why: &Why) -> bool {
    !matches!(
        why,
        Why::NotLiteral(_) | Why::Pattern { .. } | Why::WhenKey(_)
    )
}

const REQUEST_PRINCIPALS: (&str, &str) = ("request principals (JWT)", attributes::PRINCIPAL_FORMS);

pub(super) fn source(
    path: &str,
    from: &crd::RuleFrom,
    ctx: &mut Ctx<'_>,
) -> Result<SourceMatch, PolicyError> {
    let before = ctx.notes.0.len();
    ctx.notes.extra(path, &from.extra);
    let Some(s) = &from.source else {
        return Ok(SourceMatch {
            unevaluable: ctx.notes.0.len() > before,
            ..SourceMatch::default()
        });
    };
    let path = format!("{path}.source");
    ctx.notes.extra(&path, &s.extra);
    let request_principals = attribute(
        ctx,
        &path,
        "requestPrincipals",
        &s.request_principals,
        request_principal_match,
        REQUEST_PRINCIPALS,
    );
    let not_request_principals = attribute(
        ctx,
        &path,
        "notRequestPrincipals",
        &s.not_request_principals,
        request_principal_match,
        REQUEST_PRINCIPALS,
    );
    // The client address in X-Forwarded-For is whatever the client wrote unless trusted hops
    // are configured, which Trellis does not have: not evaluated anywhere.
    for (field, values) in [
        ("remoteIpBlocks", &s.remote_ip_blocks),
        ("notRemoteIpBlocks", &s.not_remote_ip_blocks),
    ] {
        if !values.is_empty() {
            ctx.notes.add(
                format!("{path}.{field}"),
                Why::NotSupported("remote IP blocks (X-Forwarded-For)"),
            );
        }
    }
    let notes = &mut *ctx.notes;
    let mut out = SourceMatch {
        principals: principals(&format!("{path}.principals"), &s.principals, notes),
        not_principals: principals(&format!("{path}.notPrincipals"), &s.not_principals, notes),
        namespaces: namespaces(&format!("{path}.namespaces"), &s.namespaces, notes),
        not_namespaces: namespaces(&format!("{path}.notNamespaces"), &s.not_namespaces, notes),
        service_accounts: service_accounts(
            &format!("{path}.serviceAccounts"),
            &s.service_accounts,
            notes,
        ),
        not_service_accounts: service_accounts(
            &format!("{path}.notServiceAccounts"),
            &s.not_service_accounts,
            notes,
        ),
        trust_domains: trust_domains(&format!("{path}.trustDomains"), &s.trust_domains, notes),
        not_trust_domains: trust_domains(
            &format!("{path}.notTrustDomains"),
            &s.not_trust_domains,
            notes,
        ),
        ip_blocks: ip_blocks(&format!("{path}.ipBlocks"), &s.ip_blocks)?,
        not_ip_blocks: ip_blocks(&format!("{path}.notIpBlocks"), &s.not_ip_blocks)?,
        request_principals,
        not_request_principals,
        unevaluable: false,
    };
    // Unsupported values evaluate as unknown on their own; the flag covers the conditions
    // that have no place in the model.
    out.unevaluable = notes.0[before..].iter().any(|n| spoils_condition(&n.why));
    Ok(out)
}

pub(super) fn operation(
    path: &str,
    to: &crd::RuleTo,
    ctx: &mut Ctx<'_>,
) -> Result<OperationMatch, PolicyError> {
    let mut unevaluable = ctx.notes.extra(path, &to.extra);
    let Some(op) = &to.operation else {
        return Ok(OperationMatch {
            unevaluable,
            ..OperationMatch::default()
        });
    };
    let path = format!("{path}.operation");
    unevaluable |= ctx.notes.extra(&path, &op.extra);
    let before = ctx.notes.0.len();
    let hosts = ("hosts", attributes::HOST_FORMS);
    let methods = ("HTTP methods", attributes::METHOD_FORMS);
    let paths = ("HTTP paths", attributes::PATH_FORMS);
    let http = HttpMatch {
        hosts: attribute(ctx, &path, "hosts", &op.hosts, host_match, hosts),
        not_hosts: attribute(ctx, &path, "notHosts", &op.not_hosts, host_match, hosts),
        methods: attribute(ctx, &path, "methods", &op.methods, method_match, methods),
        not_methods: attribute(
            ctx,
            &path,
            "notMethods",
            &op.not_methods,
            method_match,
            methods,
        ),
        paths: attribute(ctx, &path, "paths", &op.paths, path_match, paths),
        not_paths: attribute(ctx, &path, "notPaths", &op.not_paths, path_match, paths),
    };
    unevaluable |= ctx.notes.0[before..]
        .iter()
        .any(|n| spoils_condition(&n.why));
    let ports = |field: &str, values: &[String]| {
        values
            .iter()
            .enumerate()
            .map(|(i, v)| port(format!("{path}.{field}[{i}]"), v))
            .collect::<Result<Vec<_>, _>>()
    };
    Ok(OperationMatch {
        ports: ports("ports", &op.ports)?,
        not_ports: ports("notPorts", &op.not_ports)?,
        http,
        unevaluable,
    })
}

/// The `when` conditions of a waypoint rule; unknown keys and unmatchable values are noted.
fn when(path: &str, conditions: &[crd::WhenCondition], notes: &mut Notes) -> Vec<WhenMatch> {
    let mut out = Vec::with_capacity(conditions.len());
    for (i, c) in conditions.iter().enumerate() {
        let path = format!("{path}.when[{i}]");
        let mut key = WhenKey::parse(&c.key);
        if notes.extra(&path, &c.extra) {
            // A field of the condition this version does not know could change its meaning.
            key = WhenKey::Unsupported;
        } else if key == WhenKey::Unsupported {
            notes.add(format!("{path}.key"), Why::WhenKey(c.key.clone()));
        }
        if c.values.is_empty() && c.not_values.is_empty() {
            notes.add(
                path.clone(),
                Why::NotSupported("a condition without values or notValues"),
            );
        }
        let mut values = |field: &str, list: &[String]| -> Vec<WhenValue> {
            let mut parsed = Vec::with_capacity(list.len());
            for (j, v) in list.iter().enumerate() {
                let value = WhenValue::parse(&key, v);
                if value == WhenValue::Unsupported && key != WhenKey::Unsupported {
                    notes.add(
                        format!("{path}.{field}[{j}]"),
                        Why::Pattern {
                            value: v.clone(),
                            expected: when_forms(&key),
                        },
                    );
                }
                parsed.push(value);
            }
            parsed
        };
        let values_ = values("values", &c.values);
        let not_values = values("notValues", &c.not_values);
        out.push(WhenMatch {
            key,
            values: values_,
            not_values,
        });
    }
    out
}

fn when_forms(key: &WhenKey) -> &'static str {
    match key {
        WhenKey::SourcePrincipal => {
            "source principals are literal <trust-domain>/ns/<namespace>/sa/<account> or *"
        }
        WhenKey::SourceNamespace => "source namespaces are literal namespace names or *",
        WhenKey::DestinationPort => "ports are numbers 1-65535",
        _ => attributes::VALUE_FORMS,
    }
}

pub(super) fn rule(path: &str, r: &crd::Rule, ctx: &mut Ctx<'_>) -> Result<Rule, PolicyError> {
    let before = ctx.notes.0.len();
    let mut unevaluable = ctx.notes.extra(path, &r.extra);
    let when = if ctx.at_waypoint {
        when(path, &r.when, ctx.notes)
    } else {
        if !r.when.is_empty() {
            ctx.notes.add(
                format!("{path}.when"),
                Why::Layer7("request conditions (when)"),
            );
            unevaluable = true;
        }
        Vec::new()
    };
    let from = r
        .from
        .iter()
        .enumerate()
        .map(|(i, f)| source(&format!("{path}.from[{i}]"), f, ctx))
        .collect::<Result<_, _>>()?;
    let to: Vec<OperationMatch> =
        r.to.iter()
            .enumerate()
            .map(|(i, t)| operation(&format!("{path}.to[{i}]"), t, ctx))
            .collect::<Result<_, _>>()?;
    // An ALLOW rule that cannot be fully evaluated matches nothing, whichever part of it is
    // affected. DENY keeps the finer flags, so it matches on everything it can evaluate.
    if ctx.action == Action::Allow && ctx.notes.0.len() > before {
        unevaluable = true;
    }
    Ok(Rule {
        port_hint: PortHint::of(&to),
        from,
        to,
        when,
        unevaluable,
    })
}
