//! What a request must be before anything reads it: a method the waypoint forwards, a target
//! in origin or absolute form, and exactly one authority.
//!
//! **One authority.** A request's authority is its `:authority` (HTTP/2) or the authority of
//! its absolute-form target (HTTP/1.1), else its `Host` header. A request is refused with 400
//! when it carries more than one `Host` header (RFC 9112 section 3.2), a `Host` that is not a
//! valid authority, or a `Host` naming another host or port than its `:authority` or
//! absolute-form target (RFC 9113 section 8.3.1 calls that malformed; compared without case,
//! a trailing dot or the default port). An admitted request's `Host` header is then set to
//! the authority, so the policy, the route match, the access log and the backend all read the
//! same host. Refusing rather than rewriting one into the other: only a broken or hostile
//! client sends two hosts, and whichever one a rewrite kept, a client could still have meant
//! the other.
//!
//! **Targets.** Only origin form (`/path`) and absolute form (`http://host/path`, scheme
//! `http` or `https`) are forwarded; authority form (`GET open:80`, `GET admin`) and
//! asterisk form are 400 rather than silently forwarded as `/`.
//!
//! **CONNECT** inside a tunnel would ask the waypoint for a raw TCP relay past every L7
//! policy: it is refused with 405.

use http::{
    HeaderValue, Method, StatusCode, header,
    request::Parts,
    uri::{Authority, Scheme},
};

/// Why a request is refused before authorization; each a 400, but CONNECT a 405.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("method CONNECT is not forwarded by the waypoint")]
    Connect,
    #[error("the request target is not in origin or absolute form")]
    TargetForm,
    #[error("the request target's scheme is not http or https")]
    Scheme,
    #[error("the request carries more than one Host header")]
    SeveralHosts,
    #[error("the Host header is not a valid authority")]
    BadHost,
    #[error("the Host header {host:?} names another authority than the request's {authority:?}")]
    HostMismatch { host: String, authority: String },
}

impl Refusal {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::Connect => StatusCode::METHOD_NOT_ALLOWED,
            _ => StatusCode::BAD_REQUEST,
        }
    }
}

/// Checks the method, the target form and the authority, and leaves the one authority in the
/// `Host` header (see the module documentation).
pub fn admit(parts: &mut Parts) -> Result<(), Refusal> {
    if parts.method == Method::CONNECT {
        return Err(Refusal::Connect);
    }
    let uri = &parts.uri;
    match (uri.scheme(), uri.authority()) {
        (None, None) => {}
        (Some(scheme), Some(_)) if *scheme == Scheme::HTTP || *scheme == Scheme::HTTPS => {}
        (Some(_), Some(_)) => return Err(Refusal::Scheme),
        // Authority form (`open:80`) or a scheme without one.
        _ => return Err(Refusal::TargetForm),
    }
    let mut hosts = parts.headers.get_all(header::HOST).iter();
    let host = hosts.next().cloned();
    if hosts.next().is_some() {
        return Err(Refusal::SeveralHosts);
    }
    let host = host
        .map(|h| Authority::try_from(h.as_bytes()).map_err(|_| Refusal::BadHost))
        .transpose()?;
    let https = uri.scheme() == Some(&Scheme::HTTPS);
    let authority = match (uri.authority(), host) {
        (Some(authority), Some(host)) => {
            if !same_authority(authority, &host, https) {
                return Err(Refusal::HostMismatch {
                    host: host.to_string(),
                    authority: authority.to_string(),
                });
            }
            authority.clone()
        }
        (Some(authority), None) => authority.clone(),
        (None, Some(host)) => host,
        // HTTP/1.0 without a Host: nothing to agree on; no host to match or forward.
        (None, None) => return Ok(()),
    };
    if authority.as_str().contains('@') {
        // Userinfo is not a host (`good.example@evil.example`).
        return Err(Refusal::BadHost);
    }
    let value = HeaderValue::from_str(authority.as_str()).map_err(|_| Refusal::BadHost)?;
    parts.headers.insert(header::HOST, value);
    Ok(())
}

/// Whether two authorities name the same host and port: case, one trailing dot and the
/// scheme's default port do not count.
fn same_authority(a: &Authority, b: &Authority, https: bool) -> bool {
    let default = if https { 443 } else { 80 };
    let host = |x: &Authority| {
        let h = x.host().to_ascii_lowercase();
        h.strip_suffix('.').map(str::to_owned).unwrap_or(h)
    };
    host(a) == host(b) && a.port_u16().unwrap_or(default) == b.port_u16().unwrap_or(default)
}

#[cfg(test)]
mod tests {
    use http::Request;

    use super::*;

    fn parts(method: &str, target: &str, hosts: &[&str]) -> Parts {
        let mut builder = Request::builder().method(method).uri(target);
        for h in hosts {
            builder = builder.header(header::HOST, *h);
        }
        builder.body(()).expect("a valid request").into_parts().0
    }

    #[test]
    fn one_authority_or_a_refusal() {
        type Want = Result<Option<&'static str>, Refusal>;
        let table: &[(&str, &str, &[&str], Want)] = &[
            ("GET", "/", &["good.example"], Ok(Some("good.example"))),
            ("GET", "http://good.example/", &[], Ok(Some("good.example"))),
            (
                "GET",
                "http://good.example/",
                &["GOOD.example."],
                Ok(Some("good.example")),
            ),
            (
                "GET",
                "http://good.example/",
                &["good.example:80"],
                Ok(Some("good.example")),
            ),
            (
                "GET",
                "https://good.example/",
                &["good.example:443"],
                Ok(Some("good.example")),
            ),
            ("GET", "/", &[], Ok(None)),
            (
                "GET",
                "http://good.example/",
                &["evil.example"],
                Err(Refusal::HostMismatch {
                    host: "evil.example".into(),
                    authority: "good.example".into(),
                }),
            ),
            (
                "GET",
                "http://good.example/",
                &["good.example:8080"],
                Err(Refusal::HostMismatch {
                    host: "good.example:8080".into(),
                    authority: "good.example".into(),
                }),
            ),
            (
                "GET",
                "/",
                &["good.example", "evil.example"],
                Err(Refusal::SeveralHosts),
            ),
            (
                "GET",
                "/",
                &["good.example", "good.example"],
                Err(Refusal::SeveralHosts),
            ),
            ("GET", "/", &["a b"], Err(Refusal::BadHost)),
            (
                "GET",
                "/",
                &["good.example@evil.example"],
                Err(Refusal::BadHost),
            ),
            ("GET", "open:80", &["x"], Err(Refusal::TargetForm)),
            ("GET", "admin", &["x"], Err(Refusal::TargetForm)),
            ("GET", "ftp://good.example/", &[], Err(Refusal::Scheme)),
            ("CONNECT", "open:80", &["open:80"], Err(Refusal::Connect)),
        ];
        let mut failures = Vec::new();
        for (method, target, hosts, want) in table {
            let mut p = parts(method, target, hosts);
            let got = admit(&mut p).map(|()| {
                p.headers
                    .get(header::HOST)
                    .and_then(|h| h.to_str().ok())
                    .map(str::to_owned)
            });
            let want = want.clone().map(|h| h.map(str::to_owned));
            let same = got == want;
            if !same {
                failures.push(format!(
                    "{method} {target} {hosts:?}: want {want:?}, got {got:?}"
                ));
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }

    #[test]
    fn connect_is_405_and_the_rest_400() {
        assert_eq!(Refusal::Connect.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(Refusal::SeveralHosts.status(), StatusCode::BAD_REQUEST);
    }
}
