//! What the waypoint's end-to-end tests share: the mesh with a waypoint on pod (0, 1) for the
//! whole namespace, `l7` backends, Services through the waypoint, and a JWT issuer.

#![allow(
    dead_code,
    reason = "each test binary that includes the fixture uses its own part of it"
)]

use std::{
    net::{Ipv4Addr, SocketAddr},
    time::Duration,
};

use mesh_tests::{
    mesh::{
        Mesh, MeshOptions, NAMESPACE,
        waypoint::{USE_WAYPOINT_LABEL, Waypoint},
    },
    testbed::{Pod, RequestsOpts, Server, Testbed},
};
use serde_json::{Value, json};

pub const PORT: u16 = 80;
pub const TARGET_PORT: u16 = 8080;
pub const WAYPOINT: &str = "waypoint";
pub const WAIT: Duration = Duration::from_secs(20);
pub const ISSUER: &str = "https://issuer.test";

/// Two nodes of `pods` pods each.
pub fn testbed(pods: usize) -> Testbed {
    Testbed::builder()
        .nodes(2)
        .pods_per_node(pods)
        .build()
        .expect("testbed")
}

/// Requests from `pod` to `to` as `opts` says; the client's JSON summary.
pub fn requests(tb: &Testbed, pod: &Pod, to: SocketAddr, opts: RequestsOpts) -> Value {
    tb.requests(pod, to, &opts)
        .unwrap_or_else(|e| panic!("requests to {to}{}: {e:#}", opts.path))
}

/// `count` GETs of `path` at `to` from `pod`.
pub fn get(tb: &Testbed, pod: &Pod, to: SocketAddr, path: &str, count: usize) -> Value {
    get_with(tb, pod, to, path, count, &[])
}

/// `count` GETs of `path` at `to` from `pod`, with `headers` (`name: value`).
pub fn get_with(
    tb: &Testbed,
    pod: &Pod,
    to: SocketAddr,
    path: &str,
    count: usize,
    headers: &[&str],
) -> Value {
    requests(
        tb,
        pod,
        to,
        RequestsOpts {
            path: path.into(),
            count,
            headers: headers.iter().map(|h| (*h).to_owned()).collect(),
            ..Default::default()
        },
    )
}

/// One request with these headers; its status.
pub fn status_of(
    tb: &Testbed,
    pod: &Pod,
    to: SocketAddr,
    method: &str,
    path: &str,
    headers: &[String],
) -> u64 {
    let summary = requests(
        tb,
        pod,
        to,
        RequestsOpts {
            path: path.into(),
            method: method.into(),
            count: 1,
            headers: headers.to_vec(),
            ..Default::default()
        },
    );
    summary["last"]["status"]
        .as_u64()
        .unwrap_or_else(|| panic!("no status for {method} {path}: {summary}"))
}

/// `summary[field][key]`, 0 when absent.
pub fn count_of(summary: &Value, field: &str, key: &str) -> u64 {
    summary[field][key].as_u64().unwrap_or(0)
}

/// The mesh with a waypoint on pod (0, 1) for the whole namespace; clients run on (0, 0).
pub fn start(tb: &Testbed) -> (Mesh<'_>, Waypoint<'_>) {
    let mut mesh = Mesh::start(
        tb,
        &MeshOptions {
            control_plane: true,
            ..Default::default()
        },
    )
    .expect("mesh");
    let waypoint = mesh
        .start_waypoint(WAYPOINT, tb.pod(0, 1))
        .expect("waypoint starts");
    mesh.set_namespace_label(NAMESPACE, USE_WAYPOINT_LABEL, Some(WAYPOINT))
        .expect("label namespace");
    (mesh, waypoint)
}

/// An `l7` server on `pod:8080` that answers with the pod's name. Its connections live as
/// long as the test (the default bound would recycle the waypoint's pooled connections).
pub fn serve(tb: &Testbed, pod: &Pod) -> Server {
    tb.spawn_server(
        pod,
        &[
            "--timeout-ms",
            "600000",
            "--listen",
            &format!("0.0.0.0:{TARGET_PORT}=l7"),
            "--name",
            &pod.name,
        ],
    )
    .expect("server")
}

/// Service `name` with VIP `10.96.0.<octet>:80` over `pods:8080`; waits until node 0's agent
/// sends it through the waypoint.
pub fn service(mesh: &mut Mesh<'_>, name: &str, octet: u8, pods: &[&Pod]) -> SocketAddr {
    let vip = Ipv4Addr::new(10, 96, 0, octet);
    let endpoints: Vec<(&Pod, bool)> = pods.iter().map(|p| (*p, true)).collect();
    mesh.write_service(
        name,
        &[vip.into()],
        &[(PORT, TARGET_PORT)],
        &endpoints,
        None,
    )
    .expect("service");
    mesh.wait_config(0, WAIT, |dump| {
        dump["services"].as_array().is_some_and(|services| {
            services.iter().any(|s| {
                s["name"] == name
                    && s["waypoint"] == format!("{NAMESPACE}/{WAYPOINT}")
                    && s["endpoints"].as_array().map(Vec::len) == Some(pods.len())
            })
        })
    })
    .expect("service through the waypoint in node 0's config");
    SocketAddr::from((vip, PORT))
}

/// An ES256 key, its JWKS and tokens signed with it.
pub struct Issuer {
    key: aws_lc_rs::signature::EcdsaKeyPair,
}

impl Issuer {
    pub fn new() -> Self {
        let key = aws_lc_rs::signature::EcdsaKeyPair::generate(
            &aws_lc_rs::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
        )
        .expect("EC key");
        Self { key }
    }

    pub fn jwks(&self) -> String {
        use aws_lc_rs::signature::KeyPair as _;
        use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD as B64};
        // Uncompressed point: 0x04, x, y.
        let point = self.key.public_key().as_ref();
        json!({"keys": [{"kty": "EC", "crv": "P-256", "kid": "k1",
                         "x": B64.encode(&point[1..33]), "y": B64.encode(&point[33..65])}]})
        .to_string()
    }

    /// A token for `sub` expiring `ttl_secs` from now (negative: already expired).
    pub fn token(&self, sub: &str, ttl_secs: i64) -> String {
        let header = json!({"alg": "ES256", "kid": "k1", "typ": "JWT"});
        self.token_with_header(&header, sub, ttl_secs)
    }

    /// A token for `sub` with any JOSE header.
    pub fn token_with_header(&self, header: &Value, sub: &str, ttl_secs: i64) -> String {
        self.signed(header, sub, ttl_secs, &json!({}))
    }

    /// A token for `sub`, valid for an hour, carrying the claims of `extra` too.
    pub fn token_with_claims(&self, sub: &str, extra: &Value) -> String {
        let header = json!({"alg": "ES256", "kid": "k1", "typ": "JWT"});
        self.signed(&header, sub, 3600, extra)
    }

    fn signed(&self, header: &Value, sub: &str, ttl_secs: i64, extra: &Value) -> String {
        use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD as B64};
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock after 1970")
            .as_secs()
            .cast_signed();
        let mut claims = json!({"iss": ISSUER, "sub": sub, "exp": now + ttl_secs, "iat": now});
        if let (Some(claims), Some(extra)) = (claims.as_object_mut(), extra.as_object()) {
            claims.extend(extra.clone());
        }
        let input = format!(
            "{}.{}",
            B64.encode(header.to_string()),
            B64.encode(claims.to_string())
        );
        let signature = self
            .key
            .sign(&aws_lc_rs::rand::SystemRandom::new(), input.as_bytes())
            .expect("signing");
        format!("{input}.{}", B64.encode(signature.as_ref()))
    }
}
