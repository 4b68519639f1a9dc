//! End-user authentication at the waypoint: `RequestAuthentication` and JSON Web Tokens.
//!
//! - [`policy`]: the converted `RequestAuthentication` ([`JwtPolicy`]): per issuer, its
//!   accepted audiences, where its keys come from and where tokens are read.
//! - [`keys`]: JSON Web Key Sets, reduced to the asymmetric signing keys they hold.
//! - [`fetch`]: key sets from `jwksUri`, fetched and refreshed in the background with bounded
//!   size and time ([`JwksFetcher`]).
//! - [`authenticator`]: the per-request check ([`JwtAuthenticator::authenticate`]).
//!
//! Semantics are Istio's. Where a `RequestAuthentication` applies (attached to the waypoint
//! or to the destination service, see [`super::binding`]):
//!
//! - a request **without a token** passes; authorization decides whether one was needed
//!   (`requestPrincipals: ["*"]`);
//! - a request with a token that does not verify (bad signature, unknown issuer or key,
//!   expired, wrong audience, malformed, oversized, several tokens, a `crit` header) is
//!   **refused with 401**,
//!   whatever the authorization policies say;
//! - a verified token gives the request principal `<iss>/<sub>` and its claims to
//!   authorization ([`VerifiedJwt`]); unless `forwardOriginalToken` is set, the caller removes
//!   the token's headers before forwarding ([`VerifiedJwt::token_headers`]).
//!
//! Where none applies, tokens are not looked at and requests have no request principal.
//!
//! Tokens are read from headers only: `Authorization: Bearer` unless a rule names others
//! (`fromHeaders`). Istio also reads an `access_token` query parameter by default; Trellis
//! does not, so a token there is ignored and the request has no request principal (it can
//! only lose access by it, never gain any).
//!
//! Only asymmetric algorithms are accepted (RS256/384/512, PS256/384/512, ES256, ES384), and
//! each key only for the algorithms of its type and curve: `alg: none`, HMAC algorithms (and
//! so the classic confusion of an RSA public key used as an HMAC secret) and keys embedded in
//! the token (`jwk`, `jku`, `x5u`) never verify anything.

use http::HeaderName;

pub mod authenticator;
pub mod fetch;
pub mod keys;
pub mod policy;

#[cfg(test)]
mod tests;

pub use authenticator::JwtAuthenticator;
pub use fetch::{FetchSettings, JwksFetcher};
pub use keys::KeySet;
pub use policy::{JwtPolicy, JwtRule};

/// The longest token accepted, in bytes; longer ones are refused before decoding.
pub const MAX_TOKEN_LEN: usize = 16 * 1024;

/// Clock skew tolerated on `exp` and `nbf`, in seconds (Envoy's default).
pub const CLOCK_SKEW_SECS: u64 = 60;

/// A token that verified: who the request is from, for authorization.
#[derive(Debug, Clone, PartialEq)]
pub struct VerifiedJwt {
    pub issuer: String,
    /// `sub`, empty when the token has none.
    pub subject: String,
    /// `<iss>/<sub>`, what `requestPrincipals` match.
    pub principal: String,
    /// `aud`, as a list.
    pub audiences: Vec<String>,
    /// The whole payload (`request.auth.claims[...]`).
    pub claims: serde_json::Value,
    /// The headers that carried the token, which the caller removes before forwarding;
    /// empty when the rule keeps them (`forwardOriginalToken: true`).
    pub token_headers: Vec<HeaderName>,
}

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
