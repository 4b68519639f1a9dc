//! `RequestAuthentication` converted: the rules a waypoint verifies tokens with.
//!
//! Problems are sorted as for authorization policies ([`crate::policy::model`]):
//!
//! - **Invalid** objects (a rule without issuer, without a key source or with several, an
//!   unreadable inline key set or URI, a bad header name, an unknown field that could change
//!   what is accepted, such as `outputPayloadToHeader`, whose header a backend may trust) are
//!   rejected whole. The stand-in keeps the object's binding and accepts no issuer: where it
//!   applies, every request carrying a token in `Authorization` is refused unless another
//!   `RequestAuthentication` there verifies it. Requests without a token still pass, so
//!   authorization keeps deciding them.
//! - Token locations this version does not read (`fromParams`, `fromCookies`) and the fetch
//!   `timeout` are noted: tokens there are not seen, so such requests have no request
//!   principal and only match policies that need none.
//!
//! Key sets from `jwksFile` are read by the waypoint ([`super::JwtAuthenticator::new`]), since
//! the controller converting the object for its status does not have the file.

use std::{path::PathBuf, sync::Arc};

use http::HeaderName;

use super::keys::KeySet;
use crate::{
    k8s::policy::{self as crd, RequestAuthentication},
    policy::model::{
        Binding, Enforcement, PolicyError, PolicyId, StandIn, Unsupported, Why, metadata,
        reject_extra, selector,
    },
};

/// Where a rule's keys come from.
#[derive(Debug, Clone, PartialEq)]
pub enum JwksSource {
    Inline(Arc<KeySet>),
    File(PathBuf),
    Uri(String),
}

/// A header a token is read from, after a prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenLocation {
    pub header: HeaderName,
    /// Compared case-insensitively (`Bearer ` by default).
    pub prefix: String,
}

impl TokenLocation {
    /// `Authorization: Bearer <token>`, where tokens are read when a rule names no header.
    pub fn default_location() -> Self {
        Self {
            header: http::header::AUTHORIZATION,
            prefix: "Bearer ".into(),
        }
    }
}

/// The tokens of one issuer.
#[derive(Debug, Clone, PartialEq)]
pub struct JwtRule {
    pub issuer: String,
    /// Accepted `aud` values; empty: not checked.
    pub audiences: Vec<String>,
    pub jwks: JwksSource,
    /// Never empty: the default location when the rule names none.
    pub locations: Vec<TokenLocation>,
    pub forward_original_token: bool,
}

/// A `RequestAuthentication` ready to apply.
#[derive(Debug, Clone, PartialEq)]
pub struct JwtPolicy {
    pub id: PolicyId,
    pub generation: Option<i64>,
    /// Only waypoint bindings have an effect.
    pub binding: Binding,
    pub rules: Vec<JwtRule>,
    pub enforcement: Enforcement,
}

/// The longest list of headers a rule may read tokens from.
const MAX_FROM_HEADERS: usize = 16;

fn invalid(path: String, why: impl Into<String>) -> PolicyError {
    PolicyError::Invalid {
        path,
        why: why.into(),
    }
}

fn rule(
    path: &str,
    r: &crd::JwtRule,
    notes: &mut Vec<Unsupported>,
) -> Result<JwtRule, PolicyError> {
    for key in r.extra.keys() {
        match key.as_str() {
            "fromParams" | "fromCookies" => notes.push(Unsupported {
                path: format!("{path}.{key}"),
                why: Why::NotSupported(
                    "reading tokens from query parameters or cookies (tokens there are ignored)",
                ),
            }),
            "timeout" => notes.push(Unsupported {
                path: format!("{path}.{key}"),
                why: Why::NotSupported("a per-rule fetch timeout (the waypoint's is used)"),
            }),
            _ => {
                return Err(PolicyError::Unsupported {
                    path: format!("{path}.{key}"),
                    why: Why::UnknownField,
                });
            }
        }
    }
    if r.issuer.is_empty() {
        return Err(invalid(format!("{path}.issuer"), "is required"));
    }
    let jwks = match (&r.jwks, &r.jwks_uri, &r.jwks_file) {
        (Some(inline), None, None) => JwksSource::Inline(Arc::new(
            KeySet::parse(inline.as_bytes())
                .map_err(|e| invalid(format!("{path}.jwks"), e.to_string()))?,
        )),
        (None, Some(uri), None) => {
            let parsed: http::Uri = uri
                .parse()
                .map_err(|_| invalid(format!("{path}.jwksUri"), "is not a URI"))?;
            let scheme_ok = matches!(parsed.scheme_str(), Some("http" | "https"));
            if !scheme_ok || parsed.host().is_none_or(str::is_empty) {
                return Err(invalid(
                    format!("{path}.jwksUri"),
                    "must be an http or https URI with a host",
                ));
            }
            JwksSource::Uri(uri.clone())
        }
        (None, None, Some(file)) if !file.is_empty() => JwksSource::File(PathBuf::from(file)),
        (None, None, None) => {
            return Err(invalid(
                path.to_owned(),
                "needs one of jwks, jwksUri or jwksFile (OpenID discovery is not supported)",
            ));
        }
        _ => {
            return Err(invalid(
                path.to_owned(),
                "takes exactly one of jwks, jwksUri and jwksFile",
            ));
        }
    };
    if r.from_headers.len() > MAX_FROM_HEADERS {
        return Err(invalid(
            format!("{path}.fromHeaders"),
            "lists more than 16 headers",
        ));
    }
    let mut locations = Vec::with_capacity(r.from_headers.len().max(1));
    for (i, h) in r.from_headers.iter().enumerate() {
        let hpath = format!("{path}.fromHeaders[{i}]");
        reject_extra(&hpath, &h.extra)?;
        let header = HeaderName::from_bytes(h.name.to_ascii_lowercase().as_bytes())
            .map_err(|_| invalid(format!("{hpath}.name"), "is not a header name"))?;
        locations.push(TokenLocation {
            header,
            prefix: h.prefix.clone().unwrap_or_default(),
        });
    }
    if locations.is_empty() {
        locations.push(TokenLocation::default_location());
    }
    Ok(JwtRule {
        issuer: r.issuer.clone(),
        audiences: r.audiences.clone(),
        jwks,
        locations,
        forward_original_token: r.forward_original_token.unwrap_or(false),
    })
}

impl TryFrom<&RequestAuthentication> for JwtPolicy {
    type Error = PolicyError;

    /// The strict conversion; [`JwtPolicy::compile`] gives the stand-in for rejected objects.
    fn try_from(obj: &RequestAuthentication) -> Result<Self, PolicyError> {
        let (id, generation) = metadata(obj)?;
        let spec = &obj.spec;
        reject_extra("spec", &spec.extra)?;
        let selector = selector(spec.selector.as_ref())?;
        let binding = Binding::of(
            &id.namespace,
            selector.is_some(),
            spec.target_ref.as_ref(),
            spec.target_refs.as_ref(),
        )?;
        let mut notes = Vec::new();
        let rules = spec
            .jwt_rules
            .iter()
            .enumerate()
            .map(|(i, r)| rule(&format!("spec.jwtRules[{i}]"), r, &mut notes))
            .collect::<Result<_, _>>()?;
        let enforcement = if !binding.at_waypoints() {
            Enforcement::NoEffect
        } else if notes.is_empty() {
            Enforcement::Full
        } else {
            Enforcement::FailClosed(notes)
        };
        Ok(Self {
            id,
            generation,
            binding,
            rules,
            enforcement,
        })
    }
}

impl JwtPolicy {
    /// Converts an object, replacing a rejected one by its stand-in (see the module
    /// documentation). Fails only without namespace or name.
    pub fn compile(obj: &RequestAuthentication) -> Result<Self, PolicyError> {
        let error = match Self::try_from(obj) {
            Ok(policy) => return Ok(policy),
            Err(e @ PolicyError::MissingMetadata(_)) => return Err(e),
            Err(e) => e,
        };
        let (id, generation) = metadata(obj)?;
        let spec = &obj.spec;
        let binding = Binding::stand_in(
            &id.namespace,
            spec.selector.is_some(),
            spec.target_ref.as_ref(),
            spec.target_refs.as_ref(),
        );
        Ok(Self::stand_in(id, generation, binding, error))
    }

    /// The stand-in for a spec that cannot be read at all: its binding is unknown, so it
    /// applies at every waypoint of its namespace.
    pub fn unreadable(id: PolicyId, generation: Option<i64>, error: String) -> Self {
        Self::stand_in(
            id,
            generation,
            Binding::NamespaceWaypoints,
            PolicyError::Unreadable(error),
        )
    }

    fn stand_in(
        id: PolicyId,
        generation: Option<i64>,
        binding: Binding,
        error: PolicyError,
    ) -> Self {
        Self {
            id,
            generation,
            binding,
            rules: Vec::new(),
            enforcement: Enforcement::Rejected {
                error,
                stand_in: StandIn::RejectTokens,
            },
        }
    }
}
