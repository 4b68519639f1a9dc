//! Aborts stay aborts: whatever ends a proxied connection, each application's own system
//! calls report what really happened to it.
//!
//! - A client that resets its connection (SO_LINGER 0) mid-upload: the server's read fails
//!   with a reset, never a clean end of stream; across nodes the reset crosses HBONE as
//!   `RST_STREAM`.
//! - A server that resets its connection: the client's write or read fails with a reset.
//! - An agent killed (SIGKILL) mid-transfer, the source's or the destination's: both pods see
//!   their connection reset. The dead agent's sockets were armed to reset on its death; the
//!   surviving agent sees the HBONE connection break and resets its pod.
//!
//! Each case runs cross-node (through HBONE) and same-node (the agent relays locally), over
//! IPv4, IPv6 and IPv4-mapped IPv6 addresses.

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use mesh_tests::{
    mesh::{Mesh, MeshOptions},
    testbed::{Pod, Proc, SpawnOptions, Testbed, e2e_gate},
};
use serde_json::Value;

/// Each side's bound on the whole transfer: a case that hangs ends as `timeout`.
const SIDE_TIMEOUT_MS: &str = "20000";
const WAIT: Duration = Duration::from_secs(25);

/// Who breaks the connection.
#[derive(Clone, Copy, Debug)]
enum Breaker {
    /// The client resets its socket after 1 MiB.
    Client,
    /// The server resets its socket after 1 MiB.
    Server,
    /// This node's agent is killed once bytes flow.
    Agent(usize),
}

/// How the client addresses the server.
#[derive(Clone, Copy, Debug)]
enum Family {
    V4,
    V6,
    /// The server's IPv4 address in IPv4-mapped IPv6 form, from an IPv6 socket.
    Mapped,
}

impl Family {
    fn target(self, server: &Pod, port: u16) -> SocketAddr {
        let ip = match self {
            Family::V4 => IpAddr::V4(server.ip4),
            Family::V6 => IpAddr::V6(server.ip6),
            Family::Mapped => IpAddr::V6(server.ip4.to_ipv6_mapped()),
        };
        SocketAddr::new(ip, port)
    }

    fn listen(self, port: u16) -> String {
        match self {
            Family::V4 => format!("0.0.0.0:{port}"),
            // Dual-stack: a mapped client arrives as IPv4.
            Family::V6 | Family::Mapped => format!("[::]:{port}"),
        }
    }
}

/// One transfer from `client` to `server` (port `port`), broken by `breaker`; returns how
/// the client and the server saw it end.
fn transfer(
    tb: &Testbed,
    mesh: &mut Mesh<'_>,
    (client, server): (&Pod, &Pod),
    family: Family,
    port: u16,
    breaker: Breaker,
) -> (Value, Value) {
    let mut watch = vec![
        "pod-app".to_owned(),
        "--timeout-ms".into(),
        SIDE_TIMEOUT_MS.into(),
        "end-watch".into(),
        "--listen".into(),
        family.listen(port),
    ];
    let mut stream = vec![
        "pod-app".to_owned(),
        "--timeout-ms".into(),
        SIDE_TIMEOUT_MS.into(),
        "end-stream".into(),
        "--to".into(),
        family.target(server, port).to_string(),
    ];
    match breaker {
        Breaker::Server => watch.extend(["--abort-after".into(), "1M".into()]),
        Breaker::Client => stream.extend(["--abort-after".into(), "1M".into()]),
        Breaker::Agent(_) => {}
    }
    let mut watcher = tb
        .spawn(server, &watch, SpawnOptions::new())
        .expect("start end-watch");
    watcher
        .wait_for_stdout_line(WAIT, |l| l.contains("\"listening\""))
        .expect("end-watch listening");
    let mut streamer = tb
        .spawn(client, &stream, SpawnOptions::new())
        .expect("start end-stream");
    if let Breaker::Agent(node) = breaker {
        watcher
            .wait_for_stdout_line(WAIT, |l| l.contains("\"flowing\""))
            .expect("bytes flow before the agent is killed");
        mesh.kill_agent(node);
    }
    let ends = (end_of(&mut streamer), end_of(&mut watcher));
    if let Breaker::Agent(node) = breaker {
        mesh.start_agent(node).expect("agent restarts");
    }
    ends
}

/// The `{"end": ...}` report of a side.
fn end_of(side: &mut Proc) -> Value {
    let line = side
        .wait_for_stdout_line(WAIT, |l| l.contains("\"end\""))
        .unwrap_or_else(|e| panic!("{e:#}"));
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line}: {e}"))
}

fn assert_ends(case: &str, (client, server): &(Value, Value), expected: (&str, &str)) {
    assert_eq!(
        (client["end"].as_str(), server["end"].as_str()),
        (Some(expected.0), Some(expected.1)),
        "{case}: client saw {client}, server saw {server}"
    );
}

#[test]
fn resets_and_crashes_reach_the_other_side_as_resets_never_as_clean_ends() {
    if !e2e_gate("resets_and_crashes_reach_the_other_side_as_resets_never_as_clean_ends") {
        return;
    }
    let tb = Testbed::builder()
        .nodes(2)
        .pods_per_node(2)
        .build()
        .expect("testbed");
    let mut mesh = Mesh::start(&tb, &MeshOptions::default()).expect("mesh");
    let (a, b, remote) = (tb.pod(0, 0), tb.pod(0, 1), tb.pod(1, 0));

    let cases = [
        (
            "client reset, cross-node",
            a,
            remote,
            Breaker::Client,
            ("aborted", "reset"),
        ),
        (
            "client reset, same node",
            a,
            b,
            Breaker::Client,
            ("aborted", "reset"),
        ),
        (
            "server reset, cross-node",
            a,
            remote,
            Breaker::Server,
            ("reset", "aborted"),
        ),
        (
            "server reset, same node",
            a,
            b,
            Breaker::Server,
            ("reset", "aborted"),
        ),
        (
            "source agent killed, cross-node",
            a,
            remote,
            Breaker::Agent(0),
            ("reset", "reset"),
        ),
        (
            "destination agent killed, cross-node",
            a,
            remote,
            Breaker::Agent(1),
            ("reset", "reset"),
        ),
        (
            "agent killed, same node",
            a,
            b,
            Breaker::Agent(0),
            ("reset", "reset"),
        ),
    ];
    let mut port = 7100;
    for family in [Family::V4, Family::V6, Family::Mapped] {
        for (case, client, server, breaker, expected) in cases {
            port += 1;
            let ends = transfer(&tb, &mut mesh, (client, server), family, port, breaker);
            assert_ends(&format!("{case}, {family:?}"), &ends, expected);
        }
    }
}
