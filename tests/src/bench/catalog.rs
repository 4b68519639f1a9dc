//! What the bench measures: the configurations, the scenarios, the tests with their
//! parameters and durations, and `--only` selection.

use std::time::Duration;

use anyhow::{Result, bail};

/// Server ports in the server pods.
pub const SINK_PORT: u16 = 5001;
pub const ECHO_PORT: u16 = 5002;
pub const ONE_PORT: u16 = 5003;
pub const HTTP_PORT: u16 = 5004;
pub const SOURCE_PORT: u16 = 5005;
/// Every server port, in the order the relay maps them (relay port = base + port - SINK_PORT).
pub const SERVER_PORTS: [(u16, &str); 5] = [
    (SINK_PORT, "sink"),
    (ECHO_PORT, "echo"),
    (ONE_PORT, "one"),
    (HTTP_PORT, "http"),
    (SOURCE_PORT, "source"),
];

/// Request/response size of every `rr` test (1 KiB).
pub const RR_SIZE: usize = 1024;
/// The first request/response test: 1000 rps over 4 connections (the CLI's defaults).
pub const RR_RATE: u64 = 1000;
pub const RR_CONNS: usize = 4;
/// Message size of the closed-loop ping-pong test.
pub const PINGPONG_SIZE: usize = 64;
/// HTTP test: GETs of a 1 KiB body ([`super::serve::HTTP_BODY`]) at 1000 rps over 4
/// keep-alive connections, like the request/response test.
pub const HTTP_RATE: u64 = 1000;
pub const HTTP_CONNS: usize = 4;
/// Concurrent loops of the connection-rate tests.
pub const CONNECT_LOOPS: usize = 4;

/// The ways the same traffic crosses the testbed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Config {
    NoMesh,
    Relay,
    /// Trellis at L4: the agents only (static configuration).
    Trellis,
    /// Trellis with a waypoint on the path (control-plane mode); HTTP test only.
    Waypoint,
    /// Another node proxy given with `--peer` (see [`super::peer`]).
    Peer,
}

impl Config {
    pub const ALL: [Config; 5] = [
        Config::NoMesh,
        Config::Relay,
        Config::Trellis,
        Config::Waypoint,
        Config::Peer,
    ];

    /// The JSON key.
    pub fn key(self) -> &'static str {
        match self {
            Config::NoMesh => "no_mesh",
            Config::Relay => "relay",
            Config::Trellis => "trellis",
            Config::Waypoint => "waypoint",
            Config::Peer => "peer",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Scenario {
    CrossNode,
    SameNode,
}

impl Scenario {
    pub const ALL: [Scenario; 2] = [Scenario::CrossNode, Scenario::SameNode];

    pub fn key(self) -> &'static str {
        match self {
            Scenario::CrossNode => "cross-node",
            Scenario::SameNode => "same-node",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Test {
    /// Bulk client -> server, 1 and 8 streams.
    Bulk1,
    Bulk8,
    /// Bulk server -> client, 1 and 8 streams.
    Bulk1Rev,
    Bulk8Rev,
    /// Open-loop 1 KiB request/response: 1000 rps over 4 connections, 1000 rps over 64,
    /// 10,000 rps over 16.
    Rr,
    Rr64,
    Rr10k,
    /// Closed-loop 64-byte ping-pong on one connection.
    PingPong,
    /// New connections per second (pooled HBONE connection under Trellis).
    Connect,
    /// New connections per second, each with a full mutual-TLS handshake under Trellis.
    ConnectCold,
    /// HTTP/1.1 GETs through the L7 path.
    Http,
}

impl Test {
    pub const ALL: [Test; 11] = [
        Test::Bulk1,
        Test::Bulk8,
        Test::Bulk1Rev,
        Test::Bulk8Rev,
        Test::Rr,
        Test::Rr64,
        Test::Rr10k,
        Test::PingPong,
        Test::Connect,
        Test::ConnectCold,
        Test::Http,
    ];

    pub fn key(self) -> &'static str {
        match self {
            Test::Bulk1 => "bulk1",
            Test::Bulk8 => "bulk8",
            Test::Bulk1Rev => "bulk1-rev",
            Test::Bulk8Rev => "bulk8-rev",
            Test::Rr => "rr",
            Test::Rr64 => "rr64",
            Test::Rr10k => "rr10k",
            Test::PingPong => "pingpong",
            Test::Connect => "connect",
            Test::ConnectCold => "connect-cold",
            Test::Http => "http",
        }
    }

    /// Another name `--only` matches (`cross-node-l7`).
    fn alias(self) -> Option<&'static str> {
        match self {
            Test::Http => Some("l7"),
            _ => None,
        }
    }

    pub fn port(self) -> u16 {
        match self {
            Test::Bulk1 | Test::Bulk8 => SINK_PORT,
            Test::Bulk1Rev | Test::Bulk8Rev => SOURCE_PORT,
            Test::Rr | Test::Rr64 | Test::Rr10k | Test::PingPong => ECHO_PORT,
            Test::Connect | Test::ConnectCold => ONE_PORT,
            Test::Http => HTTP_PORT,
        }
    }

    /// Bulk tests: (streams, server to client).
    pub fn bulk(self) -> Option<(usize, bool)> {
        match self {
            Test::Bulk1 => Some((1, false)),
            Test::Bulk8 => Some((8, false)),
            Test::Bulk1Rev => Some((1, true)),
            Test::Bulk8Rev => Some((8, true)),
            _ => None,
        }
    }

    /// Request/response tests: (rate, connections).
    pub fn rr(self) -> Option<(u64, usize)> {
        match self {
            Test::Rr => Some((RR_RATE, RR_CONNS)),
            Test::Rr64 => Some((1000, 64)),
            Test::Rr10k => Some((10_000, 16)),
            _ => None,
        }
    }

    /// The configurations the test runs in: the byte-stream tests compare Trellis with the
    /// relay floor (and a `--peer`); the HTTP test compares Trellis at L4 with Trellis through
    /// a waypoint (a waypoint speaks HTTP only, and the relay adds nothing an L4 comparison
    /// lacks).
    pub fn runs_in(self, config: Config) -> bool {
        match self {
            Test::Http => matches!(config, Config::NoMesh | Config::Trellis | Config::Waypoint),
            _ => config != Config::Waypoint,
        }
    }

    /// Whether the test needs agents that pool no HBONE connection in `config` (a separate
    /// Trellis turn; elsewhere every connection is as cold as it gets anyway).
    pub fn single_use_agents(self, config: Config) -> bool {
        self == Test::ConnectCold && config == Config::Trellis
    }

    /// The scenarios the test runs in: a waypoint is measured cross-node only (on one node
    /// the waypoint's two hops would stay on that node, which no deployment can count on).
    fn runs_on(self, scenario: Scenario) -> bool {
        self != Test::Http || scenario == Scenario::CrossNode
    }

    /// The names `--only` matches against.
    fn names(self, scenario: Scenario) -> Vec<String> {
        std::iter::once(self.key())
            .chain(self.alias())
            .map(|k| format!("{}-{k}", scenario.key()))
            .collect()
    }
}

/// How long each test measures.
#[derive(Clone, Copy, Debug)]
pub struct Durations {
    pub bulk: Duration,
    pub rr: Duration,
    pub connect: Duration,
    pub http: Duration,
}

impl Durations {
    pub fn new(quick: bool) -> Self {
        if quick {
            Self {
                bulk: Duration::from_secs(1),
                rr: Duration::from_secs(2),
                connect: Duration::from_secs(1),
                http: Duration::from_secs(2),
            }
        } else {
            Self {
                bulk: Duration::from_secs(5),
                rr: Duration::from_secs(10),
                connect: Duration::from_secs(5),
                http: Duration::from_secs(10),
            }
        }
    }

    pub fn of(self, test: Test) -> Duration {
        match test {
            Test::Bulk1 | Test::Bulk8 | Test::Bulk1Rev | Test::Bulk8Rev => self.bulk,
            Test::Rr | Test::Rr64 | Test::Rr10k | Test::PingPong => self.rr,
            Test::Connect | Test::ConnectCold => self.connect,
            Test::Http => self.http,
        }
    }
}

/// The tests `only` selects, in a fixed order. A selector equal to a test's full name selects
/// that test alone (`same-node-rr` is not also `same-node-rr64`); any other selects every
/// test whose name contains it (`rr`, `cross-node`, `bulk`).
pub fn select(only: &[String]) -> Result<Vec<(Scenario, Test)>> {
    let all: Vec<(Scenario, Test)> = Scenario::ALL
        .iter()
        .flat_map(|&s| Test::ALL.iter().map(move |&t| (s, t)))
        .filter(|(s, t)| t.runs_on(*s))
        .collect();
    let exact = |o: &str| all.iter().any(|(s, t)| t.names(*s).iter().any(|n| n == o));
    let selected: Vec<_> = all
        .iter()
        .copied()
        .filter(|(s, t)| {
            let names = t.names(*s);
            only.is_empty()
                || only.iter().any(|o| {
                    if exact(o) {
                        names.iter().any(|n| n == o)
                    } else {
                        names.iter().any(|n| n.contains(o.as_str()))
                    }
                })
        })
        .collect();
    if selected.is_empty() {
        let tests: Vec<&str> = Test::ALL.iter().map(|t| t.key()).collect();
        bail!(
            "--only {only:?} selects no test; names are SCENARIO-TEST with SCENARIO cross-node or \
             same-node and TEST one of {}, (http: cross-node only, alias l7)",
            tests.join(", ")
        );
    }
    Ok(selected)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(only: &[&str]) -> Vec<String> {
        let only: Vec<String> = only.iter().map(ToString::to_string).collect();
        select(&only)
            .expect("selects")
            .into_iter()
            .map(|(s, t)| format!("{}-{}", s.key(), t.key()))
            .collect()
    }

    #[test]
    fn a_full_name_selects_that_test_alone_and_a_part_every_match() {
        assert_eq!(names(&["same-node-rr"]), vec!["same-node-rr"]);
        assert_eq!(
            names(&["cross-node-rr1"]),
            vec!["cross-node-rr10k"],
            "a part of a name"
        );
        assert_eq!(
            names(&["cross-node-bulk1"]),
            vec!["cross-node-bulk1"],
            "not bulk1-rev"
        );
        assert_eq!(
            names(&["rev"]),
            vec![
                "cross-node-bulk1-rev",
                "cross-node-bulk8-rev",
                "same-node-bulk1-rev",
                "same-node-bulk8-rev"
            ]
        );
        assert_eq!(names(&["l7"]), vec!["cross-node-http"]);
        assert!(select(&["nothing".to_owned()]).is_err());
    }
}
