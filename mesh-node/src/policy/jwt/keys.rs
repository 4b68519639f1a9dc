//! JSON Web Key Sets (RFC 7517), reduced to what may verify a token here: RSA keys and EC
//! keys on P-256 or P-384, for signatures. Symmetric (`oct`) and other keys, and keys marked
//! for encryption (`use: enc`), are skipped: a key set can never turn a public key into an
//! HMAC secret. A key with an `alg` is used for that algorithm only; without one, for every
//! algorithm of its type (and curve).
//!
//! Bounded: a key set larger than [`MAX_JWKS_BYTES`] or with more than [`MAX_KEYS`] entries is
//! refused whole.

use jsonwebtoken::{Algorithm, DecodingKey};
use serde_json::Value;

/// The largest key set accepted, in bytes.
pub const MAX_JWKS_BYTES: usize = 256 * 1024;

/// The most keys a key set may list (usable or not).
pub const MAX_KEYS: usize = 64;

const RSA_ALGS: &[Algorithm] = &[
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
];

/// Why a key set cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeysError {
    #[error("the key set is larger than {MAX_JWKS_BYTES} bytes")]
    TooLarge,
    #[error("the key set is not JSON with a \"keys\" list: {0}")]
    Shape(String),
    #[error("the key set lists more than {MAX_KEYS} keys")]
    TooMany,
    #[error(
        "the key set has no usable signing key (RSA, or EC on P-256 / P-384, with use \"sig\" or none)"
    )]
    NoUsableKey,
}

/// One verification key.
#[derive(Clone)]
#[allow(
    clippy::struct_field_names,
    reason = "a JWK is a key; `key` is its decoding material"
)]
pub(super) struct Key {
    pub(super) kid: Option<String>,
    pub(super) algorithms: Vec<Algorithm>,
    pub(super) key: DecodingKey,
}

impl PartialEq for Key {
    fn eq(&self, other: &Self) -> bool {
        use jsonwebtoken::DecodingKeyKind as K;
        let same_key = match (self.key.kind(), other.key.kind()) {
            (K::SecretOrDer(a), K::SecretOrDer(b)) => a == b,
            (K::RsaModulusExponent { n, e }, K::RsaModulusExponent { n: n2, e: e2 }) => {
                n == n2 && e == e2
            }
            _ => false,
        };
        same_key && self.kid == other.kid && self.algorithms == other.algorithms
    }
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Key")
            .field("kid", &self.kid)
            .field("algorithms", &self.algorithms)
            .finish_non_exhaustive()
    }
}

/// The usable keys of one key set.
#[derive(Debug, Clone, PartialEq)]
pub struct KeySet {
    keys: Vec<Key>,
}

impl KeySet {
    /// Parses a key set; `Err` when it is unreadable or has no usable key.
    pub fn parse(json: &[u8]) -> Result<Self, KeysError> {
        if json.len() > MAX_JWKS_BYTES {
            return Err(KeysError::TooLarge);
        }
        let value: Value =
            serde_json::from_slice(json).map_err(|e| KeysError::Shape(e.to_string()))?;
        let Some(entries) = value.get("keys").and_then(Value::as_array) else {
            return Err(KeysError::Shape("no \"keys\" list".into()));
        };
        if entries.len() > MAX_KEYS {
            return Err(KeysError::TooMany);
        }
        let keys: Vec<Key> = entries.iter().filter_map(key).collect();
        if keys.is_empty() {
            return Err(KeysError::NoUsableKey);
        }
        Ok(Self { keys })
    }

    /// The number of usable keys.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The keys that may verify `alg`, restricted to `kid` when the token names one.
    pub(super) fn candidates<'a>(
        &'a self,
        kid: Option<&'a str>,
        alg: Algorithm,
    ) -> impl Iterator<Item = &'a Key> + 'a {
        self.keys.iter().filter(move |k| {
            k.algorithms.contains(&alg) && kid.is_none_or(|kid| k.kid.as_deref() == Some(kid))
        })
    }

    /// Whether any key carries this `kid`, whatever its algorithms.
    pub(super) fn has_kid(&self, kid: &str) -> bool {
        self.keys.iter().any(|k| k.kid.as_deref() == Some(kid))
    }
}

/// A usable key, or `None` for an entry to skip.
fn key(entry: &Value) -> Option<Key> {
    let text = |field: &str| entry.get(field).and_then(Value::as_str);
    if text("use").is_some_and(|u| u != "sig") {
        return None;
    }
    let (key, algorithms) = match text("kty")? {
        "RSA" => (
            DecodingKey::from_rsa_components(text("n")?, text("e")?).ok()?,
            RSA_ALGS.to_vec(),
        ),
        "EC" => {
            let alg = match text("crv")? {
                "P-256" => Algorithm::ES256,
                "P-384" => Algorithm::ES384,
                _ => return None,
            };
            (
                DecodingKey::from_ec_components(text("x")?, text("y")?).ok()?,
                vec![alg],
            )
        }
        _ => return None,
    };
    // A key pinned to one algorithm is used for that one only, if it suits the key at all.
    let algorithms = match entry.get("alg") {
        None | Some(Value::Null) => algorithms,
        Some(alg) => {
            let alg: Algorithm = serde_json::from_value(alg.clone()).ok()?;
            if !algorithms.contains(&alg) {
                return None;
            }
            vec![alg]
        }
    };
    Some(Key {
        kid: text("kid").map(str::to_owned),
        algorithms,
        key,
    })
}
