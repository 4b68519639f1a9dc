//! `--peer`: another node proxy measured as one more configuration, started from a command
//! template in each node's namespace.
//!
//! The template is split on whitespace (no shell: wrap anything more in a script), then each
//! word's placeholders are replaced per node:
//!
//! | placeholder    | value                                                                 |
//! |----------------|-----------------------------------------------------------------------|
//! | `{bench}`      | this bench binary                                                     |
//! | `{node}`       | the node's name                                                       |
//! | `{index}`      | the node's index (0: the client's node, 1: the cross-node server's)   |
//! | `{lan_ip}`     | the node's LAN address (where nodes reach each other)                 |
//! | `{gateway_ip}` | the node's address on its pods' side (their default gateway)          |
//! | `{peer_lan_ip}`| the other node's LAN address                                          |
//! | `{pod_cgroup}` | the cgroup v2 directory above the node's pods                         |
//! | `{maps}`       | a word of its own: `--map LISTEN=TARGET` per port the relay floor maps |
//! |                | on this node (so `{bench} relay {maps}` is the relay floor itself)    |
//!
//! The process must stay in the foreground: its CPU time and memory (threads included,
//! children not) are the configuration's proxy figures, and it is killed when the
//! configuration's turn ends. With `--peer-dial direct` (the default) the client dials the
//! server pod as in no mesh and Trellis, so the peer must intercept pod traffic itself; with
//! `--peer-dial relay` the client dials the relay floor's addresses on its node instead.

use std::{net::Ipv4Addr, str::FromStr};

use anyhow::{Result, ensure};

/// A `--peer` configuration.
#[derive(Clone, Debug)]
pub struct Peer {
    /// The command template, one entry per word.
    pub template: Vec<String>,
    pub dial: Dial,
}

/// Where the client dials in the peer configuration.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Dial {
    /// The server pod, as without a mesh.
    #[default]
    Direct,
    /// The relay floor's listening addresses on the client's node.
    Relay,
}

impl FromStr for Dial {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "direct" => Ok(Dial::Direct),
            "relay" => Ok(Dial::Relay),
            other => Err(format!("unknown --peer-dial {other:?} (direct, relay)")),
        }
    }
}

impl Peer {
    pub fn new(template: &str, dial: Dial) -> Result<Self> {
        let template: Vec<String> = template.split_whitespace().map(str::to_owned).collect();
        ensure!(!template.is_empty(), "--peer needs a command");
        Ok(Self { template, dial })
    }
}

/// One node's values for the placeholders.
#[derive(Clone, Debug)]
pub struct NodeVars {
    pub bench: String,
    pub node: String,
    pub index: usize,
    pub lan_ip: Ipv4Addr,
    pub gateway_ip: Ipv4Addr,
    pub peer_lan_ip: Ipv4Addr,
    pub pod_cgroup: String,
    /// `LISTEN=TARGET` pairs, each becoming `--map PAIR` where `{maps}` stands.
    pub maps: Vec<String>,
}

/// The command for one node.
pub fn expand(template: &[String], vars: &NodeVars) -> Vec<String> {
    let mut out = Vec::new();
    for word in template {
        if word == "{maps}" {
            for m in &vars.maps {
                out.extend(["--map".to_owned(), m.clone()]);
            }
            continue;
        }
        let word = word
            .replace("{bench}", &vars.bench)
            .replace("{node}", &vars.node)
            .replace("{index}", &vars.index.to_string())
            .replace("{lan_ip}", &vars.lan_ip.to_string())
            .replace("{gateway_ip}", &vars.gateway_ip.to_string())
            .replace("{peer_lan_ip}", &vars.peer_lan_ip.to_string())
            .replace("{pod_cgroup}", &vars.pod_cgroup);
        out.push(word);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_replaced_per_node_and_maps_become_arguments() {
        let peer = Peer::new(
            "  {bench} relay {maps} --node {node}#{index} --on {lan_ip}:15008,{gateway_ip} \
             --to {peer_lan_ip} --cgroup {pod_cgroup}",
            Dial::Relay,
        )
        .expect("parsed");
        let vars = NodeVars {
            bench: "/bin/bench".into(),
            node: "n0".into(),
            index: 0,
            lan_ip: Ipv4Addr::new(10, 0, 0, 1),
            gateway_ip: Ipv4Addr::new(10, 1, 0, 1),
            peer_lan_ip: Ipv4Addr::new(10, 0, 0, 2),
            pod_cgroup: "/sys/fs/cgroup/tb/n0".into(),
            maps: vec!["a=b".into(), "c=d".into()],
        };
        assert_eq!(
            expand(&peer.template, &vars),
            [
                "/bin/bench",
                "relay",
                "--map",
                "a=b",
                "--map",
                "c=d",
                "--node",
                "n0#0",
                "--on",
                "10.0.0.1:15008,10.1.0.1",
                "--to",
                "10.0.0.2",
                "--cgroup",
                "/sys/fs/cgroup/tb/n0",
            ]
        );
        assert!(Peer::new("   ", Dial::Direct).is_err());
        assert_eq!("relay".parse::<Dial>(), Ok(Dial::Relay));
        assert!("tproxy".parse::<Dial>().is_err());
    }
}
