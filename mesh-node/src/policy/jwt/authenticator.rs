//! The per-request token check at a waypoint (see [`super`] for the semantics).
//!
//! Steps, each bounded: find the `RequestAuthentication`s applying at the target; read the
//! token from every location their rules name (one distinct token at most); refuse it if
//! larger than [`MAX_TOKEN_LEN`]; read its header and, unverified, its issuer, only to pick
//! the rules of that issuer reading that location; then verify the signature with the
//! rule's keys (the key named by `kid`, or each key suited to the algorithm) and check
//! `exp`, `nbf` (with [`CLOCK_SKEW_SECS`] of leeway) and the audience.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::Arc,
    time::{SystemTime, UNIX_EPOCH},
};

use http::{HeaderMap, HeaderName};
use jsonwebtoken::{Algorithm, Header, Validation};
use serde_json::Value;

use super::{
    fetch::JwksFetcher,
    keys::{KeySet, MAX_JWKS_BYTES},
    policy::{JwksSource, JwtPolicy, JwtRule, TokenLocation},
};
use crate::policy::{
    facts::{VerifiedJwt, WaypointTarget},
    targets::TargetIndex,
};

/// The longest token accepted, in bytes; longer ones are refused before decoding.
pub const MAX_TOKEN_LEN: usize = 16 * 1024;

/// Clock skew tolerated on `exp` and `nbf`, in seconds (Envoy's default).
pub const CLOCK_SKEW_SECS: u64 = 60;

/// The outcome of authentication for one request.
#[derive(Debug, Clone, PartialEq)]
pub enum JwtOutcome {
    /// No token in any location read here (or no `RequestAuthentication` applies).
    None,
    Verified(VerifiedJwt),
    /// A token that does not verify: the caller answers 401.
    Invalid(JwtError),
}

/// Why a token was refused. Messages name what to check.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    #[error("the token is larger than {MAX_TOKEN_LEN} bytes")]
    TooLarge,
    #[error("the request carries more than one token (or one token header twice)")]
    SeveralTokens,
    #[error("the token is not a well-formed JWT (three base64url parts, JSON header and claims)")]
    Malformed,
    #[error(
        "the token's algorithm {0} is not accepted (only RS256/384/512, PS256/384/512, ES256, ES384)"
    )]
    Algorithm(String),
    #[error("no RequestAuthentication rule here accepts issuer {0:?} in this header")]
    UnknownIssuer(String),
    #[error("the issuer's key set has no key {0:?} usable for this algorithm")]
    UnknownKey(String),
    #[error("the issuer's key set has no key usable for this algorithm")]
    NoKey,
    #[error("the issuer's keys are not available: {0}")]
    KeysUnavailable(String),
    #[error("the token's signature does not verify with the issuer's keys")]
    Signature,
    #[error("the token has expired")]
    Expired,
    #[error("the token is not valid yet (nbf)")]
    NotYetValid,
    #[error("the token's audience is not one the rule accepts")]
    Audience,
    #[error("the token's claim {0} has the wrong type")]
    ClaimType(&'static str),
    #[error("the token's header lists critical extensions (crit), which are not supported")]
    CriticalExtension,
}

/// Verifies the tokens of requests at waypoints. Immutable: build a new one when the
/// `RequestAuthentication`s change (key sets from URIs live in the shared [`JwksFetcher`]).
#[derive(Debug)]
pub struct JwtAuthenticator {
    index: TargetIndex<Arc<JwtPolicy>>,
    /// Key sets of `jwksFile` rules, read when the authenticator was built.
    files: HashMap<PathBuf, Result<Arc<KeySet>, String>>,
    fetcher: Option<JwksFetcher>,
}

impl JwtAuthenticator {
    /// Indexes the policies attached to waypoints, reads their key files, and has `fetcher`
    /// keep the key sets of their URIs (and only those) fresh. Without a fetcher, rules with
    /// a `jwksUri` refuse every token.
    pub fn new(
        root_namespace: &str,
        policies: impl IntoIterator<Item = JwtPolicy>,
        fetcher: Option<JwksFetcher>,
    ) -> Self {
        let mut index = TargetIndex::new(root_namespace);
        let mut files = HashMap::new();
        let mut uris = Vec::new();
        for policy in policies {
            if !policy.binding.at_waypoints() {
                continue;
            }
            for rule in &policy.rules {
                match &rule.jwks {
                    JwksSource::File(path) => {
                        files
                            .entry(path.clone())
                            .or_insert_with(|| read_key_file(path));
                    }
                    JwksSource::Uri(uri) => uris.push(uri.clone()),
                    JwksSource::Inline(_) => {}
                }
            }
            let policy = Arc::new(policy);
            index.insert(&policy.id.namespace, &policy.binding, policy.clone());
        }
        if let Some(fetcher) = &fetcher {
            fetcher.watch(uris);
        }
        Self {
            index,
            files,
            fetcher,
        }
    }

    /// The outcome for a request at `target` with these headers, at time `now`.
    pub fn authenticate(
        &self,
        target: &WaypointTarget<'_>,
        headers: &HeaderMap,
        now: SystemTime,
    ) -> JwtOutcome {
        let mut policies = self.index.find(target);
        if policies.is_empty() {
            return JwtOutcome::None;
        }
        policies.sort_by(|a, b| a.id.cmp(&b.id));
        policies.dedup_by(|a, b| Arc::ptr_eq(a, b));
        let rules: Vec<&JwtRule> = policies.iter().flat_map(|p| &p.rules).collect();
        // Where tokens are read: every rule's locations; a stand-in (no rules) reads the
        // default one, so that tokens there are refused.
        let mut locations: Vec<&TokenLocation> = rules.iter().flat_map(|r| &r.locations).collect();
        let default = TokenLocation::default_location();
        if policies.iter().any(|p| p.rules.is_empty()) {
            locations.push(&default);
        }
        let (token, found_in) = match find_token(headers, &locations) {
            Ok(Some(found)) => found,
            Ok(None) => return JwtOutcome::None,
            Err(e) => return JwtOutcome::Invalid(e),
        };
        match self.verify(&rules, token, &found_in, now) {
            Ok(jwt) => JwtOutcome::Verified(jwt),
            Err(e) => JwtOutcome::Invalid(e),
        }
    }

    fn verify(
        &self,
        rules: &[&JwtRule],
        token: &str,
        found_in: &[&TokenLocation],
        now: SystemTime,
    ) -> Result<VerifiedJwt, JwtError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(JwtError::TooLarge);
        }
        // Read without verification only to route the token to its issuer's rules.
        let unverified = jsonwebtoken::dangerous::insecure_decode::<Value>(token)
            .map_err(|_| JwtError::Malformed)?;
        let header = unverified.header;
        check_algorithm(header.alg)?;
        // RFC 7515 section 4.1.11: a recipient must refuse a token whose `crit` names an
        // extension it does not implement; this verifier implements none.
        if header.crit.is_some() {
            return Err(JwtError::CriticalExtension);
        }
        let issuer = match unverified.claims.get("iss") {
            Some(Value::String(iss)) => iss.clone(),
            Some(_) => return Err(JwtError::ClaimType("iss")),
            None => return Err(JwtError::UnknownIssuer(String::new())),
        };
        let candidates = rules
            .iter()
            .filter(|r| r.issuer == issuer && r.locations.iter().any(|l| found_in.contains(&l)));
        let mut last = JwtError::UnknownIssuer(issuer.clone());
        for rule in candidates {
            match self.verify_with(rule, token, &header, now) {
                Ok(claims) => return verified(rule, claims, found_in),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// Verifies with one rule: signature, then time and audience. Returns the claims.
    fn verify_with(
        &self,
        rule: &JwtRule,
        token: &str,
        header: &Header,
        now: SystemTime,
    ) -> Result<Value, JwtError> {
        let keys = self.keys(&rule.jwks)?;
        let mut validation = Validation::new(header.alg);
        validation.algorithms = vec![header.alg];
        validation.required_spec_claims.clear();
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.validate_aud = false;
        let kid = header.kid.as_deref();
        if let Some(kid) = kid
            && !keys.has_kid(kid)
        {
            return Err(JwtError::UnknownKey(kid.to_owned()));
        }
        let mut tried = false;
        let mut claims = None;
        for key in keys.candidates(kid, header.alg) {
            tried = true;
            if let Ok(data) = jsonwebtoken::decode::<Value>(token, &key.key, &validation) {
                claims = Some(data.claims);
                break;
            }
        }
        let claims = match (claims, tried) {
            (Some(c), _) => c,
            (None, true) => return Err(JwtError::Signature),
            (None, false) => {
                return Err(kid.map_or(JwtError::NoKey, |k| JwtError::UnknownKey(k.to_owned())));
            }
        };
        check_time(&claims, now)?;
        check_audience(&claims, &rule.audiences)?;
        Ok(claims)
    }

    fn keys(&self, source: &JwksSource) -> Result<Arc<KeySet>, JwtError> {
        match source {
            JwksSource::Inline(keys) => Ok(keys.clone()),
            JwksSource::File(path) => match self.files.get(path) {
                Some(Ok(keys)) => Ok(keys.clone()),
                Some(Err(e)) => Err(JwtError::KeysUnavailable(e.clone())),
                None => Err(JwtError::KeysUnavailable(format!(
                    "{} was not read",
                    path.display()
                ))),
            },
            JwksSource::Uri(uri) => {
                self.fetcher
                    .as_ref()
                    .and_then(|f| f.keys(uri))
                    .ok_or_else(|| {
                        JwtError::KeysUnavailable(format!(
                            "{uri} has not been fetched successfully"
                        ))
                    })
            }
        }
    }
}

/// Reads a key file, bounded; the error says what to check.
fn read_key_file(path: &Path) -> Result<Arc<KeySet>, String> {
    use std::io::Read;

    let file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut bytes = Vec::new();
    // One byte more than allowed tells an oversized file from a full one.
    let limit = u64::try_from(MAX_JWKS_BYTES + 1).unwrap_or(u64::MAX);
    file.take(limit)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let keys = KeySet::parse(&bytes).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(Arc::new(keys))
}

/// The one token of the request and the locations it was found in; `None` without one.
fn find_token<'h, 'l>(
    headers: &'h HeaderMap,
    locations: &[&'l TokenLocation],
) -> Result<Option<(&'h str, Vec<&'l TokenLocation>)>, JwtError> {
    let mut found: Option<(&str, Vec<&TokenLocation>)> = None;
    let mut seen: Vec<&HeaderName> = Vec::new();
    for &location in locations {
        let mut values = headers.get_all(&location.header).iter();
        let Some(value) = values.next() else {
            continue;
        };
        // The same header twice leaves which token counts open: refuse rather than pick.
        if values.next().is_some() {
            return Err(JwtError::SeveralTokens);
        }
        let Some(token) = value
            .to_str()
            .ok()
            .and_then(|v| strip_prefix_ignore_case(v, &location.prefix))
        else {
            // Another scheme (`Authorization: Basic ...`) is not a token.
            continue;
        };
        let token = token.trim_matches(' ');
        match &mut found {
            None => found = Some((token, vec![location])),
            Some((t, locs)) if *t == token => locs.push(location),
            Some((_, _)) if seen.contains(&&location.header) => continue,
            Some(_) => return Err(JwtError::SeveralTokens),
        }
        seen.push(&location.header);
    }
    Ok(found)
}

fn strip_prefix_ignore_case<'v>(value: &'v str, prefix: &str) -> Option<&'v str> {
    let head = value.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &value[prefix.len()..])
}

fn check_algorithm(alg: Algorithm) -> Result<(), JwtError> {
    match alg {
        Algorithm::RS256
        | Algorithm::RS384
        | Algorithm::RS512
        | Algorithm::PS256
        | Algorithm::PS384
        | Algorithm::PS512
        | Algorithm::ES256
        | Algorithm::ES384 => Ok(()),
        other => Err(JwtError::Algorithm(format!("{other:?}"))),
    }
}

/// A NumericDate claim, if present; `Err` when it is not a number.
fn numeric(claims: &Value, name: &'static str) -> Result<Option<f64>, JwtError> {
    match claims.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_f64().map(Some).ok_or(JwtError::ClaimType(name)),
    }
}

fn check_time(claims: &Value, now: SystemTime) -> Result<(), JwtError> {
    // Before 1970 is not a time a waypoint runs at; treat it as the epoch.
    let now = now
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    let skew = CLOCK_SKEW_SECS as f64;
    if let Some(exp) = numeric(claims, "exp")?
        && now > exp + skew
    {
        return Err(JwtError::Expired);
    }
    if let Some(nbf) = numeric(claims, "nbf")?
        && now + skew < nbf
    {
        return Err(JwtError::NotYetValid);
    }
    Ok(())
}

/// `aud` as a list (a single string is a list of one).
fn audiences(claims: &Value) -> Result<Vec<String>, JwtError> {
    match claims.get("aud") {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::String(a)) => Ok(vec![a.clone()]),
        Some(Value::Array(items)) => items
            .iter()
            .map(|i| {
                i.as_str()
                    .map(str::to_owned)
                    .ok_or(JwtError::ClaimType("aud"))
            })
            .collect(),
        Some(_) => Err(JwtError::ClaimType("aud")),
    }
}

fn check_audience(claims: &Value, accepted: &[String]) -> Result<(), JwtError> {
    if accepted.is_empty() {
        return Ok(());
    }
    let aud = audiences(claims)?;
    if aud.iter().any(|a| accepted.contains(a)) {
        Ok(())
    } else {
        Err(JwtError::Audience)
    }
}

fn verified(
    rule: &JwtRule,
    claims: Value,
    found_in: &[&TokenLocation],
) -> Result<VerifiedJwt, JwtError> {
    let subject = match claims.get("sub") {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(_) => return Err(JwtError::ClaimType("sub")),
    };
    let audiences = audiences(&claims)?;
    let mut token_headers: Vec<HeaderName> = Vec::new();
    if !rule.forward_original_token {
        for location in found_in {
            if !token_headers.contains(&location.header) {
                token_headers.push(location.header.clone());
            }
        }
    }
    Ok(VerifiedJwt {
        principal: format!("{}/{subject}", rule.issuer),
        issuer: rule.issuer.clone(),
        subject,
        audiences,
        claims,
        token_headers,
    })
}
