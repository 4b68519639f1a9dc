//! JWT verification: valid RS256 and ES256 tokens, each way a token can be wrong, key sets,
//! the `RequestAuthentication` conversion, and key sets fetched in the background.
//!
//! Keys are generated here (aws-lc-rs) and tokens signed by hand, so that malformed and
//! hostile tokens (`alg: none`, HS256 keyed with the public key) can be written too.

use std::{
    sync::{Arc, LazyLock},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use aws_lc_rs::{
    hmac,
    rand::SystemRandom,
    rsa::{KeySize, PublicKeyComponents},
    signature::{self, ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair as _, RsaKeyPair},
};
use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD as B64};
use bytes::Bytes;
use http::{HeaderMap, HeaderValue};
use parking_lot::Mutex;
use serde_json::{Value, json};

use super::{
    JwtAuthenticator, JwtError, JwtOutcome, JwtPolicy, MAX_TOKEN_LEN,
    fetch::{FetchError, FetchFuture, FetchJwks, FetchSettings, JwksFetcher},
    keys::{KeySet, KeysError, MAX_KEYS},
};
use crate::{
    k8s::policy::RequestAuthentication,
    policy::{
        facts::WaypointTarget,
        model::{Binding, Enforcement, StandIn, TargetRef},
    },
};

const ISSUER: &str = "https://issuer.example";

/// An RSA key (2048 bits takes a moment: generated once).
static RSA: LazyLock<RsaKeyPair> =
    LazyLock::new(|| RsaKeyPair::generate(KeySize::Rsa2048).expect("RSA key generation"));
static RSA_OTHER: LazyLock<RsaKeyPair> =
    LazyLock::new(|| RsaKeyPair::generate(KeySize::Rsa2048).expect("RSA key generation"));
static EC: LazyLock<EcdsaKeyPair> = LazyLock::new(|| {
    EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING).expect("EC key generation")
});

fn rsa_jwk(key: &RsaKeyPair, kid: &str) -> Value {
    let c = PublicKeyComponents::<Vec<u8>>::from(key.public_key());
    json!({"kty": "RSA", "kid": kid, "use": "sig", "n": B64.encode(&c.n), "e": B64.encode(&c.e)})
}

fn ec_jwk(key: &EcdsaKeyPair, kid: &str) -> Value {
    // Uncompressed point: 0x04, x, y.
    let point = key.public_key().as_ref();
    json!({"kty": "EC", "kid": kid, "crv": "P-256", "x": B64.encode(&point[1..33]), "y": B64.encode(&point[33..65])})
}

fn jwks(keys: &[Value]) -> String {
    json!({ "keys": keys }).to_string()
}

/// The standard key set: RSA key `r1`, EC key `e1`.
fn standard_jwks() -> String {
    jwks(&[rsa_jwk(&RSA, "r1"), ec_jwk(&EC, "e1")])
}

enum Signer<'a> {
    Rsa(&'a RsaKeyPair),
    Ec(&'a EcdsaKeyPair),
    Hmac(&'a [u8]),
    None,
}

fn token(header: &Value, claims: &Value, signer: Signer<'_>) -> String {
    let input = format!(
        "{}.{}",
        B64.encode(header.to_string()),
        B64.encode(claims.to_string())
    );
    let rng = SystemRandom::new();
    let signature = match signer {
        Signer::Rsa(key) => {
            let mut sig = vec![0; key.public_modulus_len()];
            key.sign(
                &signature::RSA_PKCS1_SHA256,
                &rng,
                input.as_bytes(),
                &mut sig,
            )
            .expect("RSA signing");
            sig
        }
        Signer::Ec(key) => key
            .sign(&rng, input.as_bytes())
            .expect("EC signing")
            .as_ref()
            .to_vec(),
        Signer::Hmac(secret) => {
            hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, secret), input.as_bytes())
                .as_ref()
                .to_vec()
        }
        Signer::None => Vec::new(),
    };
    format!("{input}.{}", B64.encode(signature))
}

/// Seconds since the epoch of the test clock.
const NOW: u64 = 1_800_000_000;

fn now() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(NOW)
}

fn claims() -> Value {
    json!({"iss": ISSUER, "sub": "alice", "aud": ["shop", "blog"], "exp": NOW + 3600, "groups": ["admins"]})
}

fn rs256(claims: &Value) -> String {
    token(
        &json!({"alg": "RS256", "kid": "r1"}),
        claims,
        Signer::Rsa(&RSA),
    )
}

fn es256(claims: &Value) -> String {
    token(
        &json!({"alg": "ES256", "kid": "e1"}),
        claims,
        Signer::Ec(&EC),
    )
}

/// A `RequestAuthentication` on service `shop/web` with these jwtRules (YAML flow text).
fn request_authentication(name: &str, rules: &str) -> JwtPolicy {
    let text = format!(
        "kind: RequestAuthentication\nmetadata: {{namespace: shop, name: {name}}}\nspec:\n  targetRefs: [{{kind: Service, name: web}}]\n  jwtRules: {rules}\n"
    );
    let obj: RequestAuthentication = serde_saphyr::from_str(&text).expect("manifest parses");
    JwtPolicy::compile(&obj).expect("manifest has metadata")
}

fn inline_rule(extra: &str) -> String {
    format!(
        "[{{issuer: \"{ISSUER}\", audiences: [shop], jwks: {}{extra}}}]",
        serde_json::to_string(&standard_jwks()).expect("string escapes")
    )
}

fn authenticator(policies: Vec<JwtPolicy>) -> JwtAuthenticator {
    JwtAuthenticator::new("trellis-system", policies, None)
}

const WEB: WaypointTarget<'static> = WaypointTarget {
    gateway_namespace: "shop",
    gateway_name: "waypoint",
    services: &[("shop", "web")],
};

fn bearer(token: &str) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(
        http::header::AUTHORIZATION,
        HeaderValue::from_str(&format!("Bearer {token}")).expect("token is a header value"),
    );
    headers
}

fn outcome_of(token: &str) -> JwtOutcome {
    authenticator(vec![request_authentication("jwt", &inline_rule(""))]).authenticate(
        &WEB,
        &bearer(token),
        now(),
    )
}

fn error_of(token: &str) -> JwtError {
    match outcome_of(token) {
        JwtOutcome::Invalid(e) => e,
        other => panic!("expected an invalid token, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Valid tokens.

#[test]
fn a_valid_rs256_token_gives_the_principal_and_claims() {
    let JwtOutcome::Verified(jwt) = outcome_of(&rs256(&claims())) else {
        panic!("expected a verified token");
    };
    assert_eq!(jwt.principal, "https://issuer.example/alice");
    assert_eq!(
        (jwt.issuer.as_str(), jwt.subject.as_str()),
        (ISSUER, "alice")
    );
    assert_eq!(jwt.audiences, ["shop", "blog"]);
    assert_eq!(jwt.claims["groups"], json!(["admins"]));
    assert_eq!(jwt.token_headers, [http::header::AUTHORIZATION]);
}

#[test]
fn a_valid_es256_token_verifies() {
    let JwtOutcome::Verified(jwt) = outcome_of(&es256(&claims())) else {
        panic!("expected a verified token");
    };
    assert_eq!(jwt.principal, "https://issuer.example/alice");
}

#[test]
fn a_token_without_kid_is_tried_against_each_suitable_key() {
    let t = token(&json!({"alg": "ES256"}), &claims(), Signer::Ec(&EC));
    assert!(matches!(outcome_of(&t), JwtOutcome::Verified(_)));
}

#[test]
fn a_token_with_critical_extensions_is_refused_even_when_signed() {
    let header = json!({"alg": "ES256", "kid": "e1", "crit": ["exp-ext"], "exp-ext": 1});
    let t = token(&header, &claims(), Signer::Ec(&EC));
    assert_eq!(error_of(&t), JwtError::CriticalExtension);
    // The same token without `crit` verifies: the key and claims are not what failed.
    let t = token(
        &json!({"alg": "ES256", "kid": "e1"}),
        &claims(),
        Signer::Ec(&EC),
    );
    assert!(matches!(outcome_of(&t), JwtOutcome::Verified(_)));
}

#[test]
fn expiry_tolerates_a_minute_of_clock_skew() {
    let mut c = claims();
    c["exp"] = json!(NOW - 30);
    assert!(matches!(outcome_of(&rs256(&c)), JwtOutcome::Verified(_)));
    c["exp"] = json!(NOW - 120);
    assert_eq!(error_of(&rs256(&c)), JwtError::Expired);
    let mut c = claims();
    c["nbf"] = json!(NOW + 30);
    assert!(matches!(outcome_of(&rs256(&c)), JwtOutcome::Verified(_)));
    c["nbf"] = json!(NOW + 600);
    assert_eq!(error_of(&rs256(&c)), JwtError::NotYetValid);
    // A token without exp does not expire (as Envoy treats it).
    let mut c = claims();
    c.as_object_mut().map(|o| o.remove("exp"));
    assert!(matches!(outcome_of(&rs256(&c)), JwtOutcome::Verified(_)));
    c["exp"] = json!("tomorrow");
    assert_eq!(error_of(&rs256(&c)), JwtError::ClaimType("exp"));
}

// ---------------------------------------------------------------------------------------------
// Invalid tokens: refused (401), whatever authorization says.

#[test]
fn wrong_issuer_audience_key_or_signature() {
    let mut c = claims();
    c["iss"] = json!("https://evil.example");
    assert_eq!(
        error_of(&rs256(&c)),
        JwtError::UnknownIssuer("https://evil.example".into())
    );
    let mut c = claims();
    c["aud"] = json!("blog");
    assert_eq!(error_of(&rs256(&c)), JwtError::Audience);
    c.as_object_mut().map(|o| o.remove("aud"));
    assert_eq!(error_of(&rs256(&c)), JwtError::Audience);
    let unknown_kid = token(
        &json!({"alg": "RS256", "kid": "r9"}),
        &claims(),
        Signer::Rsa(&RSA),
    );
    assert_eq!(error_of(&unknown_kid), JwtError::UnknownKey("r9".into()));
    // The right kid, signed by another key.
    let forged = token(
        &json!({"alg": "RS256", "kid": "r1"}),
        &claims(),
        Signer::Rsa(&RSA_OTHER),
    );
    assert_eq!(error_of(&forged), JwtError::Signature);
    // An EC algorithm naming the RSA key: the key does not serve that algorithm.
    let mismatched = token(
        &json!({"alg": "ES256", "kid": "r1"}),
        &claims(),
        Signer::Ec(&EC),
    );
    assert_eq!(error_of(&mismatched), JwtError::UnknownKey("r1".into()));
    // Claims changed after signing.
    let t = rs256(&claims());
    let mut parts: Vec<&str> = t.split('.').collect();
    let mut c = claims();
    c["sub"] = json!("admin");
    let tampered_claims = B64.encode(c.to_string());
    parts[1] = &tampered_claims;
    assert_eq!(error_of(&parts.join(".")), JwtError::Signature);
}

#[test]
fn alg_none_and_hmac_never_verify() {
    let none = token(&json!({"alg": "none"}), &claims(), Signer::None);
    assert_eq!(error_of(&none), JwtError::Malformed);
    // The classic confusion: HS256 keyed with the RSA public key (DER and JWK forms).
    let public_der = RSA.public_key().as_ref().to_vec();
    for secret in [public_der, rsa_jwk(&RSA, "r1").to_string().into_bytes()] {
        let hs = token(
            &json!({"alg": "HS256", "kid": "r1"}),
            &claims(),
            Signer::Hmac(&secret),
        );
        assert_eq!(error_of(&hs), JwtError::Algorithm("HS256".into()));
    }
}

#[test]
fn malformed_and_oversized_tokens() {
    let valid = rs256(&claims());
    for bad in [
        "not-a-jwt",
        "a.b",
        "a.b.c",
        "!!!.@@@.###",
        &valid[..valid.len() - 10].replace('.', ""),
    ] {
        assert_eq!(error_of(bad), JwtError::Malformed, "{bad:?}");
    }
    // Valid base64 of something that is not JSON.
    let not_json = format!("{}.{}.sig", B64.encode("{\"alg\""), B64.encode("claims"));
    assert_eq!(error_of(&not_json), JwtError::Malformed);
    let mut c = claims();
    c["padding"] = json!("x".repeat(MAX_TOKEN_LEN));
    assert_eq!(error_of(&rs256(&c)), JwtError::TooLarge);
}

// ---------------------------------------------------------------------------------------------
// Locations and applicability.

#[test]
fn no_token_passes_and_other_schemes_are_not_tokens() {
    let auth = authenticator(vec![request_authentication("jwt", &inline_rule(""))]);
    assert_eq!(
        auth.authenticate(&WEB, &HeaderMap::new(), now()),
        JwtOutcome::None
    );
    let mut basic = HeaderMap::new();
    basic.insert(
        http::header::AUTHORIZATION,
        HeaderValue::from_static("Basic dXNlcjpwdw=="),
    );
    assert_eq!(auth.authenticate(&WEB, &basic, now()), JwtOutcome::None);
    // The scheme is case-insensitive.
    let mut lower = HeaderMap::new();
    let value = format!("bearer {}", rs256(&claims()));
    lower.insert(
        http::header::AUTHORIZATION,
        HeaderValue::from_str(&value).expect("header"),
    );
    assert!(matches!(
        auth.authenticate(&WEB, &lower, now()),
        JwtOutcome::Verified(_)
    ));
}

#[test]
fn two_tokens_are_refused() {
    let auth = authenticator(vec![request_authentication("jwt", &inline_rule(""))]);
    let mut headers = bearer(&rs256(&claims()));
    headers.append(
        http::header::AUTHORIZATION,
        HeaderValue::from_str(&format!("Bearer {}", es256(&claims()))).expect("header"),
    );
    assert_eq!(
        auth.authenticate(&WEB, &headers, now()),
        JwtOutcome::Invalid(JwtError::SeveralTokens)
    );
}

#[test]
fn custom_headers_and_forwarding_the_token() {
    let rules = inline_rule(", fromHeaders: [{name: X-Jwt-Assertion}], forwardOriginalToken: true");
    let auth = authenticator(vec![request_authentication("custom", &rules)]);
    let mut headers = HeaderMap::new();
    headers.insert(
        "x-jwt-assertion",
        HeaderValue::from_str(&rs256(&claims())).expect("header"),
    );
    let JwtOutcome::Verified(jwt) = auth.authenticate(&WEB, &headers, now()) else {
        panic!("expected a verified token");
    };
    assert!(
        jwt.token_headers.is_empty(),
        "forwardOriginalToken keeps it"
    );
    // That rule does not read Authorization: a token there is not seen.
    assert_eq!(
        auth.authenticate(&WEB, &bearer(&rs256(&claims())), now()),
        JwtOutcome::None
    );
}

#[test]
fn tokens_are_only_read_where_a_request_authentication_applies() {
    let auth = authenticator(vec![request_authentication("jwt", &inline_rule(""))]);
    let db = WaypointTarget {
        services: &[("shop", "db")],
        ..WEB
    };
    assert_eq!(
        auth.authenticate(&db, &bearer("garbage"), now()),
        JwtOutcome::None
    );
    assert_eq!(
        auth.authenticate(&WEB, &bearer("garbage"), now()),
        JwtOutcome::Invalid(JwtError::Malformed)
    );
}

#[test]
fn a_rejected_request_authentication_refuses_tokens_but_not_their_absence() {
    let broken = request_authentication("broken", "[{issuer: \"\", jwks: \"{}\"}]");
    assert!(matches!(
        broken.enforcement,
        Enforcement::Rejected {
            stand_in: StandIn::RejectTokens,
            ..
        }
    ));
    assert_eq!(
        broken.binding,
        Binding::Targets(vec![TargetRef::Service("web".into())])
    );
    let auth = authenticator(vec![broken.clone()]);
    assert_eq!(
        auth.authenticate(&WEB, &bearer(&rs256(&claims())), now()),
        JwtOutcome::Invalid(JwtError::UnknownIssuer(ISSUER.into()))
    );
    assert_eq!(
        auth.authenticate(&WEB, &HeaderMap::new(), now()),
        JwtOutcome::None
    );
    // Another RequestAuthentication there still verifies its issuer.
    let auth = authenticator(vec![
        broken,
        request_authentication("jwt", &inline_rule("")),
    ]);
    assert!(matches!(
        auth.authenticate(&WEB, &bearer(&rs256(&claims())), now()),
        JwtOutcome::Verified(_)
    ));
}

#[test]
fn key_files_are_read_when_the_authenticator_is_built() {
    let dir = std::env::temp_dir().join(format!("trellis-jwks-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let file = dir.join("jwks.json");
    std::fs::write(&file, standard_jwks()).expect("write key file");
    let rules = format!(
        "[{{issuer: \"{ISSUER}\", jwksFile: \"{}\"}}]",
        file.display()
    );
    let auth = authenticator(vec![request_authentication("file", &rules)]);
    assert!(matches!(
        auth.authenticate(&WEB, &bearer(&es256(&claims())), now()),
        JwtOutcome::Verified(_)
    ));
    let missing = format!(
        "[{{issuer: \"{ISSUER}\", jwksFile: \"{}\"}}]",
        dir.join("nope").display()
    );
    let auth = authenticator(vec![request_authentication("missing", &missing)]);
    assert!(matches!(
        auth.authenticate(&WEB, &bearer(&es256(&claims())), now()),
        JwtOutcome::Invalid(JwtError::KeysUnavailable(_))
    ));
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------------------------------------
// Key sets.

#[test]
fn key_sets_keep_only_asymmetric_signing_keys() {
    let set = KeySet::parse(
        jwks(&[
            json!({"kty": "oct", "kid": "h", "k": "c2VjcmV0"}),
            json!({"kty": "RSA", "kid": "enc", "use": "enc", "n": "AQAB", "e": "AQAB"}),
            json!({"kty": "OKP", "crv": "Ed25519", "x": "AAAA"}),
            json!({"kty": "EC", "crv": "P-521", "x": "AAAA", "y": "AAAA"}),
            // Pinned to an algorithm its type cannot do.
            {
                let mut k = rsa_jwk(&RSA, "pinned");
                k["alg"] = json!("ES256");
                k
            },
            ec_jwk(&EC, "e1"),
        ])
        .as_bytes(),
    )
    .expect("one usable key");
    assert_eq!(set.len(), 1);
    assert_eq!(
        KeySet::parse(jwks(&[json!({"kty": "oct", "k": "c2VjcmV0"})]).as_bytes()),
        Err(KeysError::NoUsableKey)
    );
    let many: Vec<Value> = (0..=MAX_KEYS)
        .map(|i| ec_jwk(&EC, &i.to_string()))
        .collect();
    assert_eq!(
        KeySet::parse(jwks(&many).as_bytes()),
        Err(KeysError::TooMany)
    );
    let huge = format!("{{\"keys\": [], \"pad\": \"{}\"}}", "x".repeat(300 * 1024));
    assert_eq!(KeySet::parse(huge.as_bytes()), Err(KeysError::TooLarge));
    assert!(matches!(KeySet::parse(b"[]"), Err(KeysError::Shape(_))));
}

#[test]
fn a_key_pinned_to_rs256_does_not_verify_ps256() {
    let mut k = rsa_jwk(&RSA, "r1");
    k["alg"] = json!("RS256");
    let rules = format!(
        "[{{issuer: \"{ISSUER}\", jwks: {}}}]",
        serde_json::to_string(&jwks(&[k])).expect("string escapes")
    );
    let auth = authenticator(vec![request_authentication("pinned", &rules)]);
    let input = format!(
        "{}.{}",
        B64.encode(json!({"alg": "PS256", "kid": "r1"}).to_string()),
        B64.encode(claims().to_string())
    );
    let mut sig = vec![0; RSA.public_modulus_len()];
    RSA.sign(
        &signature::RSA_PSS_SHA256,
        &SystemRandom::new(),
        input.as_bytes(),
        &mut sig,
    )
    .expect("PSS signing");
    let ps256 = format!("{input}.{}", B64.encode(sig));
    assert_eq!(
        auth.authenticate(&WEB, &bearer(&ps256), now()),
        JwtOutcome::Invalid(JwtError::UnknownKey("r1".into()))
    );
}

// ---------------------------------------------------------------------------------------------
// Conversion (the status conditions derived from it are tested with the status).

#[test]
fn request_authentication_conversion() {
    let ok = request_authentication("jwt", &inline_rule(""));
    assert_eq!(ok.enforcement, Enforcement::Full);
    let partial = request_authentication("params", &inline_rule(", fromParams: [token]"));
    let Enforcement::FailClosed(fields) = &partial.enforcement else {
        panic!("fromParams fails closed: {:?}", partial.enforcement);
    };
    assert!(
        fields
            .iter()
            .any(|f| f.path == "spec.jwtRules[0].fromParams"),
        "{fields:?}"
    );
    for (rules, expected) in [
        ("[{jwks: \"{}\"}]", "spec.jwtRules[0].issuer: is required"),
        ("[{issuer: i}]", "needs one of jwks, jwksUri or jwksFile"),
        (
            "[{issuer: i, jwksUri: \"https://x/k\", jwksFile: /k}]",
            "exactly one of",
        ),
        (
            "[{issuer: i, jwksUri: \"ftp://x/keys\"}]",
            "must be an http or https URI",
        ),
        (
            "[{issuer: i, jwks: \"{\\\"keys\\\": []}\"}]",
            "spec.jwtRules[0].jwks: the key set has no usable signing key",
        ),
        (
            "[{issuer: i, jwksFile: /k, outputPayloadToHeader: x-user}]",
            "spec.jwtRules[0].outputPayloadToHeader: unknown field",
        ),
        (
            "[{issuer: i, jwksFile: /k, fromHeaders: [{name: \"bad header\"}]}]",
            "fromHeaders[0].name: is not a header name",
        ),
    ] {
        let bad = request_authentication("bad", rules);
        let Enforcement::Rejected { error, stand_in } = &bad.enforcement else {
            panic!("{rules} is rejected: {:?}", bad.enforcement);
        };
        assert_eq!(*stand_in, StandIn::RejectTokens, "{rules}");
        assert!(
            error.to_string().contains(expected),
            "{expected:?} in {error}"
        );
        assert!(
            bad.rules.is_empty(),
            "{rules}: the stand-in accepts no issuer"
        );
    }
    let selector: RequestAuthentication = serde_saphyr::from_str(
        "kind: RequestAuthentication\nmetadata: {namespace: shop, name: sel}\nspec:\n  selector: {matchLabels: {app: web}}\n  jwtRules: [{issuer: i, jwksFile: /k}]\n",
    )
    .expect("manifest parses");
    let selector = JwtPolicy::compile(&selector).expect("metadata");
    assert_eq!(selector.binding, Binding::Workloads);
    assert_eq!(selector.enforcement, Enforcement::NoEffect);
}

// ---------------------------------------------------------------------------------------------
// Key sets from URIs.

/// Answers from a script: each fetch takes the next answer (the last one repeats).
struct Scripted {
    answers: Mutex<Vec<Option<Result<String, u16>>>>,
    calls: Mutex<usize>,
}

impl Scripted {
    /// `None` never answers; `Ok` is a body; `Err` an HTTP status.
    fn new(answers: Vec<Option<Result<String, u16>>>) -> Arc<Self> {
        Arc::new(Self {
            answers: Mutex::new(answers),
            calls: Mutex::new(0),
        })
    }

    fn calls(&self) -> usize {
        *self.calls.lock()
    }
}

impl FetchJwks for Scripted {
    fn fetch<'a>(&'a self, _uri: &'a str, _max_body: usize) -> FetchFuture<'a> {
        let answer = {
            let mut answers = self.answers.lock();
            *self.calls.lock() += 1;
            if answers.len() > 1 {
                answers.remove(0)
            } else {
                answers.first().cloned().unwrap_or(None)
            }
        };
        Box::pin(async move {
            match answer {
                None => std::future::pending().await,
                Some(Ok(body)) => Ok(Bytes::from(body)),
                Some(Err(status)) => Err(FetchError::Status(
                    http::StatusCode::from_u16(status).expect("test status"),
                )),
            }
        })
    }
}

const URI: &str = "https://issuer.example/keys";

fn settings() -> FetchSettings {
    FetchSettings {
        timeout: Duration::from_secs(5),
        refresh: Duration::from_mins(10),
        retry: Duration::from_secs(1),
        max_body: 64 * 1024,
    }
}

fn uri_rule() -> String {
    format!("[{{issuer: \"{ISSUER}\", jwksUri: \"{URI}\"}}]")
}

/// Lets the fetch task run at the current (paused) time.
async fn settle() {
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
}

#[tokio::test(start_paused = true)]
async fn uri_keys_are_fetched_retried_and_refreshed() {
    let client = Scripted::new(vec![
        Some(Err(503)),
        None,
        Some(Ok(jwks(&[rsa_jwk(&RSA, "r1")]))),
        Some(Ok(jwks(&[ec_jwk(&EC, "e1")]))),
    ]);
    let fetcher = JwksFetcher::new(client.clone(), settings());
    let auth = JwtAuthenticator::new(
        "trellis-system",
        [request_authentication("uri", &uri_rule())],
        Some(fetcher.clone()),
    );
    let rsa_token = bearer(&rs256(&claims()));
    let ec_token = bearer(&es256(&claims()));
    settle().await;
    // The first fetch failed: tokens are refused, never accepted unverified.
    assert!(matches!(
        auth.authenticate(&WEB, &rsa_token, now()),
        JwtOutcome::Invalid(JwtError::KeysUnavailable(_))
    ));
    // Retry after 1 s hangs until the 5 s timeout; the next retry (2 s later) succeeds.
    tokio::time::sleep(Duration::from_secs(1)).await;
    settle().await;
    assert_eq!(client.calls(), 2);
    tokio::time::sleep(Duration::from_secs(5 + 2)).await;
    settle().await;
    assert_eq!(client.calls(), 3);
    assert!(matches!(
        auth.authenticate(&WEB, &rsa_token, now()),
        JwtOutcome::Verified(_)
    ));
    // The refresh picks up the rotated key set.
    tokio::time::sleep(Duration::from_mins(10)).await;
    settle().await;
    assert_eq!(client.calls(), 4);
    assert!(matches!(
        auth.authenticate(&WEB, &ec_token, now()),
        JwtOutcome::Verified(_)
    ));
    assert!(matches!(
        auth.authenticate(&WEB, &rsa_token, now()),
        JwtOutcome::Invalid(JwtError::UnknownKey(_))
    ));
    // A URI no longer used is dropped, and its task stopped.
    fetcher.watch(Vec::new());
    assert!(fetcher.keys(URI).is_none());
    tokio::time::sleep(Duration::from_hours(1)).await;
    settle().await;
    assert_eq!(client.calls(), 4);
}

#[tokio::test(start_paused = true)]
async fn a_failed_refresh_keeps_the_previous_keys() {
    let client = Scripted::new(vec![
        Some(Ok(jwks(&[rsa_jwk(&RSA, "r1")]))),
        Some(Ok("not json".into())),
    ]);
    let fetcher = JwksFetcher::new(client.clone(), settings());
    fetcher.watch([URI.to_owned()]);
    settle().await;
    assert_eq!(fetcher.keys(URI).map(|k| k.len()), Some(1));
    tokio::time::sleep(Duration::from_mins(10)).await;
    settle().await;
    assert_eq!(client.calls(), 2);
    assert_eq!(fetcher.keys(URI).map(|k| k.len()), Some(1));
}

/// Serves one canned HTTP/1.1 response per connection on a loopback port.
async fn serve(response: Vec<u8>) -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind loopback");
    let addr = listener.local_addr().expect("local address");
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let response = response.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = stream.read(&mut buf).await;
                let _ = stream.write_all(&response).await;
                let _ = stream.shutdown().await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn the_http_client_bounds_the_body_and_checks_the_status() {
    use super::fetch::HttpFetch;
    let client = HttpFetch::new();
    let body = standard_jwks();
    let ok = serve(
        format!(
            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes(),
    )
    .await;
    let got = client
        .fetch(&format!("http://{ok}/keys"), 64 * 1024)
        .await
        .expect("fetched");
    assert_eq!(KeySet::parse(&got).map(|k| k.len()), Ok(2));
    let err = client
        .fetch(&format!("http://{ok}/keys"), 100)
        .await
        .expect_err("declared length over the limit");
    assert!(matches!(err, FetchError::TooLarge(100)), "{err}");
    // Without a declared length the limit applies while reading.
    let chunked = serve(
        format!(
            "HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n{}",
            "x".repeat(5000)
        )
        .into_bytes(),
    )
    .await;
    let err = client
        .fetch(&format!("http://{chunked}/keys"), 1000)
        .await
        .expect_err("body over the limit");
    assert!(matches!(err, FetchError::TooLarge(1000)), "{err}");
    let missing = serve(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n".to_vec()).await;
    let err = client
        .fetch(&format!("http://{missing}/keys"), 1000)
        .await
        .expect_err("404");
    assert!(matches!(err, FetchError::Status(s) if s == 404), "{err}");
    let err = client
        .fetch("ftp://x/keys", 1000)
        .await
        .expect_err("scheme");
    assert!(matches!(err, FetchError::Uri(_)), "{err}");
}
