//! `response_flags`: the short reason a request's metric sample, access log event and span
//! carry, telling the waypoint's own answers from the application's. Each variant renders the
//! label value operators and dashboards read (Envoy's spelling where Envoy has one); the
//! values are a contract and never change.
//!
//! | flag | status | meaning |
//! |------|--------|---------|
//! | `-` | any | the upstream's own response |
//! | `BR` | 400 | the request target, its authority or its body cannot be forwarded as sent |
//! | `BR` | 405 | method CONNECT, never relayed |
//! | `UA` | 401 | a JSON Web Token that does not verify |
//! | `DENY` | 403 | an AuthorizationPolicy denies the request |
//! | `NR` | 404 | routes apply to the destination but no rule matches |
//! | `NC` | 500 | the chosen backend Service is unknown or has no such port |
//! | `CF` | 500 | the matched rule cannot be served as configured (filter or backend) |
//! | `RL` | 429 | rate limited (`retry-after` says when to come back) |
//! | `FI` | any | an injected abort (`DI` when only a delay was injected) |
//! | `UO` | 503 | a connection or request limit is reached (`trellis-overflow` names it) |
//! | `UH` | 503 | no ready endpoint |
//! | `UF` | 503 | the upstream connection failed |
//! | `UC` | 502 | the upstream closed or reset before answering |
//! | `UT` | 504 | a request or per-try timeout expired |
//! | `URX` | any | the last of several tries failed; the status is that try's |

use std::fmt;

use prometheus_client::encoding::{EncodeLabelValue, LabelValueEncoder};

/// Why the waypoint answered as it did; [`ResponseFlags::Upstream`] when it relayed the
/// application's response.
#[derive(Clone, Copy, Debug, Default, Hash, PartialEq, Eq)]
pub enum ResponseFlags {
    /// `-`: the upstream's own response.
    #[default]
    Upstream,
    /// `BR`: a request that cannot be forwarded as sent (target, authority, body, CONNECT).
    BadRequest,
    /// `UA`: a JSON Web Token that does not verify.
    Unauthenticated,
    /// `DENY`: an AuthorizationPolicy denies the request.
    Denied,
    /// `NR`: routes apply but no rule matches.
    NoRoute,
    /// `NC`: the backend Service is unknown or has no such port.
    NoCluster,
    /// `CF`: the matched rule cannot be served as configured.
    ConfigError,
    /// `RL`: rate limited.
    RateLimited,
    /// `FI`: an injected abort.
    FaultAbort,
    /// `DI`: an injected delay only.
    FaultDelay,
    /// `UO`: a connection or request limit is reached.
    Overflow,
    /// `UH`: no ready endpoint.
    NoHealthyUpstream,
    /// `UF`: the upstream connection failed.
    UpstreamConnectFailure,
    /// `UC`: the upstream closed or reset before answering.
    UpstreamClosed,
    /// `UT`: a request or per-try timeout expired.
    Timeout,
    /// `URX`: the last of several tries failed.
    RetriesExhausted,
}

impl ResponseFlags {
    /// Every flag, in the order of the table above.
    pub const ALL: [Self; 16] = [
        Self::Upstream,
        Self::BadRequest,
        Self::Unauthenticated,
        Self::Denied,
        Self::NoRoute,
        Self::NoCluster,
        Self::ConfigError,
        Self::RateLimited,
        Self::FaultAbort,
        Self::FaultDelay,
        Self::Overflow,
        Self::NoHealthyUpstream,
        Self::UpstreamConnectFailure,
        Self::UpstreamClosed,
        Self::Timeout,
        Self::RetriesExhausted,
    ];

    /// The label value.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Upstream => "-",
            Self::BadRequest => "BR",
            Self::Unauthenticated => "UA",
            Self::Denied => "DENY",
            Self::NoRoute => "NR",
            Self::NoCluster => "NC",
            Self::ConfigError => "CF",
            Self::RateLimited => "RL",
            Self::FaultAbort => "FI",
            Self::FaultDelay => "DI",
            Self::Overflow => "UO",
            Self::NoHealthyUpstream => "UH",
            Self::UpstreamConnectFailure => "UF",
            Self::UpstreamClosed => "UC",
            Self::Timeout => "UT",
            Self::RetriesExhausted => "URX",
        }
    }
}

impl fmt::Display for ResponseFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl EncodeLabelValue for ResponseFlags {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), fmt::Error> {
        fmt::Write::write_str(encoder, self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_flag_renders_the_label_value_dashboards_read() {
        let rendered: Vec<String> = ResponseFlags::ALL.iter().map(ToString::to_string).collect();
        assert_eq!(
            rendered,
            [
                "-", "BR", "UA", "DENY", "NR", "NC", "CF", "RL", "FI", "DI", "UO", "UH", "UF",
                "UC", "UT", "URX"
            ]
        );
        for flag in ResponseFlags::ALL {
            assert_eq!(flag.to_string(), flag.as_str());
        }
        assert_eq!(ResponseFlags::default(), ResponseFlags::Upstream);
    }

    #[test]
    fn the_metric_label_is_the_flag() {
        use prometheus_client::{
            encoding::{EncodeLabelSet, text::encode},
            metrics::{counter::Counter, family::Family},
            registry::Registry,
        };
        #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
        struct Labels {
            response_flags: ResponseFlags,
        }
        let family = Family::<Labels, Counter>::default();
        family
            .get_or_create(&Labels {
                response_flags: ResponseFlags::RetriesExhausted,
            })
            .inc();
        let mut registry = Registry::default();
        registry.register("requests", "requests", family);
        let mut text = String::new();
        encode(&mut text, &registry).expect("encodes");
        assert!(
            text.contains("requests_total{response_flags=\"URX\"} 1"),
            "{text}"
        );
    }
}
