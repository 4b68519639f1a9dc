//! `filters` of rules and backends, and the rule-level checks that involve them.
//!
//! Implemented: `RequestHeaderModifier`, `ResponseHeaderModifier`, `RequestMirror` (both
//! kinds), `RequestRedirect` and `URLRewrite` (`HTTPRoute`). Any other type is never skipped:
//! the filter is recorded as unsupported and requests that reach it get a 500.

use http::{HeaderName, HeaderValue, StatusCode};

use super::{Ctx, Resolved, resolve, values};
use crate::l7::route::{
    RouteKind,
    error::RouteError,
    limits,
    model::{
        BackendSlot, Filters, HeaderModifier, Matches, Mirror, PathModifier, RedirectConfig,
        RewriteConfig,
    },
    spec::{self, HeaderFilter, MirrorFilter, RedirectFilter, RouteFilter, UrlRewriteFilter},
};

const HEADER: &str = "RequestHeaderModifier";
const RESPONSE_HEADER: &str = "ResponseHeaderModifier";
const MIRROR: &str = "RequestMirror";
const REDIRECT: &str = "RequestRedirect";
const REWRITE: &str = "URLRewrite";
const CORS: &str = "CORS";
const EXTENSION: &str = "ExtensionRef";
const EXTERNAL_AUTH: &str = "ExternalAuth";

/// Which configuration fields a filter sets, by the type they belong to.
fn configured(f: &RouteFilter) -> Vec<&'static str> {
    [
        (f.request_header_modifier.is_some(), HEADER),
        (f.response_header_modifier.is_some(), RESPONSE_HEADER),
        (f.request_mirror.is_some(), MIRROR),
        (f.request_redirect.is_some(), REDIRECT),
        (f.url_rewrite.is_some(), REWRITE),
        (f.cors.is_some(), CORS),
        (f.extension_ref.is_some(), EXTENSION),
        (f.external_auth.is_some(), EXTERNAL_AUTH),
    ]
    .into_iter()
    .filter_map(|(set, t)| set.then_some(t))
    .collect()
}

/// The field holding a type's configuration.
fn field_of(type_: &str) -> &'static str {
    match type_ {
        HEADER => "requestHeaderModifier",
        RESPONSE_HEADER => "responseHeaderModifier",
        MIRROR => "requestMirror",
        REDIRECT => "requestRedirect",
        REWRITE => "urlRewrite",
        CORS => "cors",
        EXTENSION => "extensionRef",
        _ => "externalAuth",
    }
}

pub(super) fn filters(
    ctx: &mut Ctx<'_>,
    kind: RouteKind,
    path: &str,
    list: &[RouteFilter],
) -> Result<Filters, RouteError> {
    if list.len() > limits::FILTERS {
        return Err(RouteError::too_many(path, limits::FILTERS, list.len()));
    }
    let (implemented, known): (&[&str], &[&str]) = match kind {
        RouteKind::Http | RouteKind::Virtual => (
            &[HEADER, RESPONSE_HEADER, MIRROR, REDIRECT, REWRITE],
            &[CORS, EXTENSION, EXTERNAL_AUTH],
        ),
        RouteKind::Grpc => (&[HEADER, RESPONSE_HEADER, MIRROR], &[EXTENSION]),
    };
    let mut out = Filters::default();
    for (i, f) in list.iter().enumerate() {
        let at = format!("{path}[{i}]");
        let t = f.type_.as_str();
        if !implemented.contains(&t) && !known.contains(&t) {
            // Unknown values of an enumeration must not be skipped either.
            out.unsupported.get_or_insert_with(|| {
                format!("{at}.type: filter type {t:?} is not supported by the waypoint")
            });
            continue;
        }
        let set = configured(f);
        if !set.contains(&t) || set.len() > 1 {
            return Err(RouteError::unsupported(
                at,
                format!(
                    "a {t} filter must set {} and no other filter's configuration",
                    field_of(t)
                ),
            ));
        }
        if !implemented.contains(&t) {
            out.unsupported.get_or_insert_with(|| {
                format!("{at}: filter type {t} is not supported by the waypoint")
            });
            continue;
        }
        let once = |taken: bool| {
            if taken {
                Err(RouteError::unsupported(
                    at.clone(),
                    format!("a rule or backend may have only one {t} filter"),
                ))
            } else {
                Ok(())
            }
        };
        match (
            &f.request_header_modifier,
            &f.response_header_modifier,
            &f.request_mirror,
            &f.request_redirect,
            &f.url_rewrite,
        ) {
            (Some(h), ..) => {
                once(out.request_headers.is_some())?;
                out.request_headers =
                    Some(header_modifier(&format!("{at}.requestHeaderModifier"), h)?);
            }
            (_, Some(h), ..) => {
                once(out.response_headers.is_some())?;
                out.response_headers =
                    Some(header_modifier(&format!("{at}.responseHeaderModifier"), h)?);
            }
            (_, _, Some(m), ..) => {
                if let Some(mirror) = mirror(ctx, &format!("{at}.requestMirror"), m)? {
                    out.mirrors.push(mirror);
                }
            }
            (_, _, _, Some(r), _) => {
                once(out.redirect.is_some())?;
                out.redirect = Some(redirect(&format!("{at}.requestRedirect"), r)?);
            }
            (.., Some(r)) => {
                once(out.rewrite.is_some())?;
                out.rewrite = Some(rewrite(&format!("{at}.urlRewrite"), r)?);
            }
            _ => {}
        }
    }
    if out.redirect.is_some() && out.rewrite.is_some() {
        return Err(RouteError::IncompatibleFilters {
            path: path.into(),
            why: "RequestRedirect and URLRewrite cannot be used together".into(),
        });
    }
    Ok(out)
}

fn header_modifier(path: &str, f: &HeaderFilter) -> Result<HeaderModifier, RouteError> {
    for (list, len) in [
        ("set", f.set.len()),
        ("add", f.add.len()),
        ("remove", f.remove.len()),
    ] {
        if len > limits::FILTERS {
            return Err(RouteError::too_many(
                format!("{path}.{list}"),
                limits::FILTERS,
                len,
            ));
        }
    }
    let pairs = |list: &str, headers: &[spec::Header]| {
        headers
            .iter()
            .enumerate()
            .map(|(i, h)| {
                let at = format!("{path}.{list}[{i}]");
                Ok((
                    values::modifiable_header(&format!("{at}.name"), &h.name)?,
                    values::header_value(&format!("{at}.value"), &h.value)?,
                ))
            })
            .collect::<Result<Vec<(HeaderName, HeaderValue)>, RouteError>>()
    };
    let modifier = HeaderModifier {
        set: pairs("set", &f.set)?,
        add: pairs("add", &f.add)?,
        remove: f
            .remove
            .iter()
            .enumerate()
            .map(|(i, name)| values::modifiable_header(&format!("{path}.remove[{i}]"), name))
            .collect::<Result<_, _>>()?,
    };
    let mut names: Vec<&str> = modifier
        .set
        .iter()
        .chain(&modifier.add)
        .map(|(n, _)| n)
        .chain(&modifier.remove)
        .map(HeaderName::as_str)
        .collect();
    names.sort_unstable();
    if let Some([name, _]) = names.windows(2).find(|w| matches!(w, [a, b] if a == b)) {
        return Err(RouteError::unsupported(
            path,
            format!(
                "header {name:?} appears more than once: only one action per header name is permitted"
            ),
        ));
    }
    Ok(modifier)
}

fn redirect(path: &str, r: &RedirectFilter) -> Result<RedirectConfig, RouteError> {
    let scheme = match r.scheme.as_deref() {
        None => None,
        Some("http") => Some("http"),
        Some("https") => Some("https"),
        Some(other) => {
            return Err(RouteError::invalid(
                format!("{path}.scheme"),
                other,
                "is not one of http, https",
            ));
        }
    };
    let status = match r.status_code {
        None => StatusCode::FOUND,
        Some(code @ (301 | 302 | 303 | 307 | 308)) => u16::try_from(code)
            .ok()
            .and_then(|c| StatusCode::from_u16(c).ok())
            .unwrap_or(StatusCode::FOUND),
        Some(other) => {
            return Err(RouteError::invalid(
                format!("{path}.statusCode"),
                &other.to_string(),
                "is not one of 301, 302, 303, 307, 308",
            ));
        }
    };
    Ok(RedirectConfig {
        scheme,
        hostname: r
            .hostname
            .as_deref()
            .map(|h| values::precise_hostname(&format!("{path}.hostname"), h))
            .transpose()?,
        path: r
            .path
            .as_ref()
            .map(|p| path_modifier(&format!("{path}.path"), p))
            .transpose()?,
        port: r
            .port
            .map(|p| values::port(&format!("{path}.port"), p))
            .transpose()?,
        status,
    })
}

fn rewrite(path: &str, r: &UrlRewriteFilter) -> Result<RewriteConfig, RouteError> {
    let hostname = match r.hostname.as_deref() {
        None => None,
        Some(h) => {
            let at = format!("{path}.hostname");
            let h = values::precise_hostname(&at, h)?;
            Some(
                HeaderValue::from_str(&h)
                    .map_err(|_| RouteError::invalid(at, &h, "is not a hostname"))?,
            )
        }
    };
    Ok(RewriteConfig {
        hostname,
        path: r
            .path
            .as_ref()
            .map(|p| path_modifier(&format!("{path}.path"), p))
            .transpose()?,
    })
}

fn path_modifier(path: &str, m: &spec::PathModifier) -> Result<PathModifier, RouteError> {
    match (
        m.type_.as_str(),
        &m.replace_full_path,
        &m.replace_prefix_match,
    ) {
        ("ReplaceFullPath", Some(full), None) => {
            values::replacement_path(&format!("{path}.replaceFullPath"), full, true)?;
            Ok(PathModifier::Full(full.clone()))
        }
        ("ReplacePrefixMatch", None, Some(prefix)) => {
            values::replacement_path(&format!("{path}.replacePrefixMatch"), prefix, false)?;
            Ok(PathModifier::Prefix(prefix.trim_end_matches('/').into()))
        }
        ("ReplaceFullPath", ..) => Err(RouteError::unsupported(
            path,
            "type ReplaceFullPath needs replaceFullPath, and only it",
        )),
        ("ReplacePrefixMatch", ..) => Err(RouteError::unsupported(
            path,
            "type ReplacePrefixMatch needs replacePrefixMatch, and only it",
        )),
        (other, ..) => Err(RouteError::invalid(
            format!("{path}.type"),
            other,
            "is not one of ReplaceFullPath, ReplacePrefixMatch",
        )),
    }
}

fn mirror(ctx: &Ctx<'_>, path: &str, m: &MirrorFilter) -> Result<Option<Mirror>, RouteError> {
    let (numerator, denominator) = match (m.percent, &m.fraction) {
        (Some(_), Some(_)) => {
            return Err(RouteError::unsupported(
                path,
                "only one of percent and fraction may be set",
            ));
        }
        (None, None) => (1, 1),
        (Some(p), None) => match u32::try_from(p).ok().filter(|p| *p <= 100) {
            Some(p) => (p, 100),
            None => {
                return Err(RouteError::invalid(
                    format!("{path}.percent"),
                    &p.to_string(),
                    "is not a percentage (0-100)",
                ));
            }
        },
        (None, Some(f)) => {
            let denominator = f.denominator.unwrap_or(100);
            match (u32::try_from(f.numerator), u32::try_from(denominator)) {
                (Ok(n), Ok(d)) if d >= 1 && n <= d => (n, d),
                _ => {
                    return Err(RouteError::invalid(
                        format!("{path}.fraction"),
                        &format!("{}/{denominator}", f.numerator),
                        "is not a fraction (0 <= numerator <= denominator, denominator >= 1)",
                    ));
                }
            }
        }
    };
    // A reference that does not resolve is dropped, as the specification requires; status
    // reports it under ResolvedRefs.
    Ok(
        match resolve(ctx.namespace, &format!("{path}.backendRef"), &m.backend_ref)? {
            Resolved::Service {
                namespace,
                name,
                port,
            } => Some(Mirror {
                namespace,
                name,
                port,
                numerator,
                denominator,
            }),
            Resolved::Problem { .. } => None,
        },
    )
}

fn modifies_prefix(f: &Filters) -> bool {
    let prefix = |p: &Option<PathModifier>| matches!(p, Some(PathModifier::Prefix(_)));
    f.redirect.as_ref().is_some_and(|r| prefix(&r.path))
        || f.rewrite.as_ref().is_some_and(|r| prefix(&r.path))
}

fn modifies_path(f: &Filters) -> bool {
    f.redirect.as_ref().is_some_and(|r| r.path.is_some())
        || f.rewrite.as_ref().is_some_and(|r| r.path.is_some())
}

/// Rule-level constraints between matches, filters and backends.
pub(super) fn check_rule(
    path: &str,
    matches: &Matches,
    filters: &Filters,
    backends: &[BackendSlot],
) -> Result<(), RouteError> {
    let backend_filters = || {
        backends.iter().filter_map(|b| match b {
            BackendSlot::Usable(b) => Some(&b.filters),
            BackendSlot::Invalid(_) => None,
        })
    };
    if filters.redirect.is_some() && !backends.is_empty() {
        return Err(RouteError::unsupported(
            format!("{path}.filters"),
            "a RequestRedirect filter cannot be used together with backendRefs",
        ));
    }
    if (modifies_prefix(filters) || backend_filters().any(modifies_prefix))
        && !(matches.len() == 1 && matches.prefix(0).is_some())
    {
        return Err(RouteError::unsupported(
            format!("{path}.matches"),
            "ReplacePrefixMatch needs exactly one match in the rule, of type PathPrefix",
        ));
    }
    if filters.rewrite.as_ref().is_some_and(|r| r.path.is_some())
        && backend_filters().any(modifies_path)
    {
        return Err(RouteError::IncompatibleFilters {
            path: format!("{path}.backendRefs"),
            why: "the rule rewrites the path: its backends cannot rewrite or redirect it again"
                .into(),
        });
    }
    Ok(())
}
