//! The mesh's nodes ([`NodeInfo`]): where each node's agent takes HBONE, and its zone.

use std::net::SocketAddr;

use super::resource::{ResourceError, bad, check_subdomain, non_empty};
use crate::api::v1 as api;

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct NodeInfo {
    pub name: String,
    pub hbone: SocketAddr,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
}

impl TryFrom<api::Node> for NodeInfo {
    type Error = ResourceError;

    fn try_from(n: api::Node) -> Result<Self, ResourceError> {
        check_subdomain("name", &n.name)?;
        let hbone: SocketAddr = n
            .hbone
            .parse()
            .map_err(|_| bad("hbone", format!("{:?} is not an IP:port address", n.hbone)))?;
        if hbone.ip().is_unspecified() || hbone.port() == 0 {
            return Err(bad("hbone", format!("{hbone} is not a concrete address")));
        }
        Ok(Self {
            name: n.name,
            hbone,
            zone: non_empty(n.zone),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodes_convert_and_malformed_ones_are_refused() {
        let node = |hbone: &str| api::Node {
            name: "node-a".into(),
            hbone: hbone.into(),
            zone: String::new(),
        };
        let ok = NodeInfo::try_from(node("10.1.0.1:15008")).expect("valid");
        assert_eq!(ok.zone, None);
        for bad in ["10.1.0.1", "0.0.0.0:15008", "10.1.0.1:0", "node-a:15008"] {
            assert_eq!(NodeInfo::try_from(node(bad)).expect_err(bad).field, "hbone");
        }
    }
}
