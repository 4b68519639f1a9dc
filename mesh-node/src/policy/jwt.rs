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
//! or to the destination service, see [`Binding`](super::model::Binding)):
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

pub mod authenticator;
pub mod fetch;
pub mod keys;
pub mod policy;

#[cfg(test)]
mod tests;

pub use authenticator::{CLOCK_SKEW_SECS, JwtAuthenticator, JwtError, JwtOutcome, MAX_TOKEN_LEN};
pub use fetch::{FetchSettings, JwksFetcher};
pub use keys::KeySet;
pub use policy::{JwtPolicy, JwtRule};

// Defined with the other facts of a request, which authorization reads.
pub use super::facts::VerifiedJwt;
