//! The HBONE wire: HTTP/2 CONNECT over mutual TLS 1.3, one stream per proxied connection.
//!
//! What both ends agree on lives here: the strict `:authority` parser, the telemetry headers,
//! and the HTTP/2 limits that keep a hostile peer from growing our memory. The streams are
//! driven on `h2` directly: [`client`] and [`server`] open and accept them, [`stream`] moves
//! their bytes (resets stay resets), [`keepalive`] finds dead peers and [`flood`] ends
//! connections that flood control frames.

pub mod client;
pub mod flood;
pub mod keepalive;
pub mod server;
pub mod stream;

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

pub use stream::{H2Io, H2Stream};

/// Port of the HBONE listener.
pub const PORT: u16 = 15008;
/// Largest header block accepted (HPACK-decoded).
pub const MAX_HEADER_LIST_SIZE: u32 = 16 * 1024;
/// Flow-control windows: large enough that one stream can fill a fast link.
pub const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
pub const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
pub const MAX_FRAME_SIZE: u32 = 256 * 1024;
/// Streams a client puts on one connection before opening another, so one TLS stream does not
/// become a single-core bottleneck and a peer's stream limit is never hit.
pub const CLIENT_STREAMS_PER_CONNECTION: usize = 100;
/// HEADERS+RST_STREAM pairs tolerated before the connection is closed (rapid reset).
pub const MAX_PENDING_ACCEPT_RESETS: usize = 50;
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthorityError {
    #[error("missing :authority")]
    Missing,
    #[error(":authority {0:?} is not IP:port (hostnames, zone ids and bare addresses are refused)")]
    Malformed(String),
    #[error(":authority {0:?} has port 0")]
    PortZero(String),
    #[error(":authority {0:?} names a loopback, unspecified or multicast address")]
    NotRoutable(String),
}

/// Parses a CONNECT `:authority` into the destination address. Only a literal `IP:port` is
/// accepted (IPv6 in brackets, no zone id), so nothing is ever resolved or reinterpreted.
pub fn parse_authority(authority: Option<&str>) -> Result<SocketAddr, AuthorityError> {
    let text = authority.ok_or(AuthorityError::Missing)?;
    if text.is_empty() {
        return Err(AuthorityError::Missing);
    }
    if text.contains('%') {
        return Err(AuthorityError::Malformed(text.into()));
    }
    let addr: SocketAddr = text
        .parse()
        .map_err(|_| AuthorityError::Malformed(text.into()))?;
    if addr.port() == 0 {
        return Err(AuthorityError::PortZero(text.into()));
    }
    let ip = crate::state::canonical(addr.ip());
    if ip.is_loopback() || ip.is_unspecified() || ip.is_multicast() || is_broadcast(ip) {
        return Err(AuthorityError::NotRoutable(text.into()));
    }
    Ok(SocketAddr::new(ip, addr.port()))
}

/// `for="ADDR"` from a `forwarded` header (telemetry only).
pub fn parse_forwarded_for(value: &str) -> Option<SocketAddr> {
    value
        .split(';')
        .find_map(|part| part.trim().strip_prefix("for="))
        .map(|v| v.trim_matches('"'))
        .and_then(|v| v.parse().ok())
}

fn is_broadcast(ip: IpAddr) -> bool {
    matches!(ip, IpAddr::V4(v4) if v4.is_broadcast())
}

/// `forwarded: for="<client>"`, RFC 7239; telemetry only, never trusted for authorization.
pub fn forwarded_for(client: SocketAddr) -> String {
    format!("for=\"{client}\"")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_literal_ip_and_port() {
        assert_eq!(
            parse_authority(Some("10.0.0.1:80")),
            Ok("10.0.0.1:80".parse().expect("addr"))
        );
        assert_eq!(
            parse_authority(Some("[fd00::1]:443")),
            Ok("[fd00::1]:443".parse().expect("addr"))
        );
        assert_eq!(
            parse_authority(Some("[::ffff:10.0.0.1]:80")),
            Ok("10.0.0.1:80".parse().expect("addr"))
        );
    }

    #[test]
    fn refuses_everything_else() {
        assert_eq!(parse_authority(None), Err(AuthorityError::Missing));
        assert_eq!(parse_authority(Some("")), Err(AuthorityError::Missing));
        for bad in [
            "10.0.0.1",
            "example.com:80",
            "[fe80::1%eth0]:80",
            "10.0.0.1:http",
            "10.0.0.1:70000",
            "10.0.0.1:80/x",
            " 10.0.0.1:80",
            "fd00::1:80",
        ] {
            assert!(
                matches!(
                    parse_authority(Some(bad)),
                    Err(AuthorityError::Malformed(_))
                ),
                "{bad}"
            );
        }
        assert!(matches!(
            parse_authority(Some("10.0.0.1:0")),
            Err(AuthorityError::PortZero(_))
        ));
        for bad in [
            "127.0.0.1:15001",
            "[::1]:80",
            "0.0.0.0:80",
            "[::]:80",
            "224.0.0.1:80",
            "255.255.255.255:80",
            "[::ffff:127.0.0.1]:80",
        ] {
            assert!(
                matches!(
                    parse_authority(Some(bad)),
                    Err(AuthorityError::NotRoutable(_))
                ),
                "{bad}"
            );
        }
    }
}
