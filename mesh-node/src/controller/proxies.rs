//! The proxies connected to this controller (agents and waypoints): who, which build, since
//! when, which version of the mesh state each was sent and has acknowledged, and the
//! workload certificates this controller signed for each, with their expiry. Discovery
//! streams register here for their lifetime and the CA records what it signs; the monitoring
//! surface lists them at `/debug/proxies`, which `meshctl proxy-status` reads.

use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{SystemTime, UNIX_EPOCH},
};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use super::translate::Role;

/// Every open discovery stream, by registration.
#[derive(Default)]
pub struct Proxies {
    next: AtomicU64,
    open: Mutex<BTreeMap<u64, Arc<Proxy>>>,
    /// By caller (as [`crate::controller::auth::Caller`] prints), the identities signed for
    /// it and when the newest certificate of each expires. Expired ones are dropped when
    /// listed, so the map holds at most what the callers hold now.
    signed: Mutex<BTreeMap<String, BTreeMap<String, SystemTime>>>,
}

/// One open stream's proxy.
pub struct Proxy {
    /// Who the credential proves (a node, or a waypoint's workload), as a log line says it.
    pub peer: String,
    /// The caller, as the CA records what it signs for it.
    pub caller: String,
    pub role: Role,
    /// The node its Hello named.
    pub node: String,
    /// The build its Hello named (empty: an older proxy that does not say).
    pub build: String,
    pub connected_at: SystemTime,
    /// The state version last sent, and last acknowledged (0: none yet).
    pub sent: AtomicU64,
    pub acked: AtomicU64,
    /// Resources it rejected, over the stream's life.
    pub rejected: AtomicU64,
}

/// A stream's place in [`Proxies`]; dropping it removes the proxy.
pub struct Registration {
    proxies: Arc<Proxies>,
    id: u64,
    pub proxy: Arc<Proxy>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.proxies.open.lock().remove(&self.id);
    }
}

/// Whether a proxy holds the controller's current state.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Sync {
    /// It acknowledged the controller's current version.
    Synced,
    /// It acknowledged an older one (an update is on its way, or it is stuck).
    Stale,
    /// Nothing acknowledged yet.
    NotAcked,
}

impl Sync {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Synced => "SYNCED",
            Self::Stale => "STALE",
            Self::NotAcked => "NOT ACKED",
        }
    }
}

/// A proxy as `/debug/proxies` lists it.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Listed {
    pub peer: String,
    /// `agent` or `waypoint`.
    pub role: String,
    pub node: String,
    pub build: String,
    pub connected_at_unix: u64,
    pub sent_version: u64,
    pub acked_version: u64,
    pub rejected_resources: u64,
    pub sync: Sync,
    /// The certificates this controller signed for it that have not expired.
    #[serde(default)]
    pub certificates: Vec<HeldCertificate>,
}

/// A workload certificate a proxy holds, as far as the controller knows (it signed it).
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct HeldCertificate {
    pub identity: String,
    pub expires_unix: u64,
}

/// What `/debug/proxies` answers.
#[derive(Debug, Serialize, Deserialize)]
pub struct Listing {
    pub controller: ControllerInfo,
    pub proxies: Vec<Listed>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ControllerInfo {
    /// The controller's build.
    pub version: String,
    /// The version of the state it serves (`None` before it has loaded one).
    pub state_version: Option<u64>,
}

impl Proxies {
    /// Records a certificate signed for `caller`: the identity's newest expiry.
    pub fn signed(&self, caller: &str, identity: &str, not_after: SystemTime) {
        self.signed
            .lock()
            .entry(caller.to_owned())
            .or_default()
            .insert(identity.to_owned(), not_after);
    }

    pub fn register(
        self: &Arc<Self>,
        peer: String,
        caller: String,
        role: Role,
        node: String,
        build: String,
    ) -> Registration {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let proxy = Arc::new(Proxy {
            peer,
            caller,
            role,
            node,
            build,
            connected_at: SystemTime::now(),
            sent: AtomicU64::new(0),
            acked: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
        });
        self.open.lock().insert(id, proxy.clone());
        Registration {
            proxies: self.clone(),
            id,
            proxy,
        }
    }

    /// The open streams' proxies, in connection order, judged against `current` (the
    /// controller's state version; `None` before it has one).
    pub fn list(&self, current: Option<u64>) -> Vec<Listed> {
        let open: Vec<Arc<Proxy>> = self.open.lock().values().cloned().collect();
        let now = SystemTime::now();
        let unix = |t: SystemTime| t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let mut signed = self.signed.lock();
        for held in signed.values_mut() {
            held.retain(|_, not_after| *not_after > now);
        }
        signed.retain(|_, held| !held.is_empty());
        open.iter()
            .map(|p| {
                let acked = p.acked.load(Ordering::Relaxed);
                Listed {
                    peer: p.peer.clone(),
                    role: match p.role {
                        Role::Agent => "agent",
                        Role::Waypoint => "waypoint",
                    }
                    .to_owned(),
                    node: p.node.clone(),
                    build: p.build.clone(),
                    connected_at_unix: p
                        .connected_at
                        .duration_since(UNIX_EPOCH)
                        .map_or(0, |d| d.as_secs()),
                    sent_version: p.sent.load(Ordering::Relaxed),
                    acked_version: acked,
                    rejected_resources: p.rejected.load(Ordering::Relaxed),
                    sync: match (acked, current) {
                        (0, _) => Sync::NotAcked,
                        (acked, Some(current)) if acked >= current => Sync::Synced,
                        _ => Sync::Stale,
                    },
                    certificates: signed
                        .get(&p.caller)
                        .into_iter()
                        .flatten()
                        .map(|(identity, not_after)| HeldCertificate {
                            identity: identity.clone(),
                            expires_unix: unix(*not_after),
                        })
                        .collect(),
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_proxy_is_listed_while_its_stream_is_open_and_judged_by_what_it_acknowledged() {
        let proxies = Arc::new(Proxies::default());
        let agent = proxies.register(
            "node n1".into(),
            "node n1".into(),
            Role::Agent,
            "n1".into(),
            "0.1.0".into(),
        );
        let waypoint = proxies.register(
            "waypoint x".into(),
            "x".into(),
            Role::Waypoint,
            "n2".into(),
            String::new(),
        );
        let sync =
            |current| -> Vec<Sync> { proxies.list(current).iter().map(|l| l.sync).collect() };
        assert_eq!(sync(Some(3)), [Sync::NotAcked, Sync::NotAcked]);
        agent.proxy.sent.store(3, Ordering::Relaxed);
        agent.proxy.acked.store(3, Ordering::Relaxed);
        waypoint.proxy.acked.store(2, Ordering::Relaxed);
        assert_eq!(sync(Some(3)), [Sync::Synced, Sync::Stale]);
        assert_eq!(sync(Some(4)), [Sync::Stale, Sync::Stale]);
        let listed = proxies.list(Some(3));
        assert_eq!(listed[0].role, "agent");
        assert_eq!(listed[0].sent_version, 3);
        assert_eq!(listed[1].role, "waypoint");
        let later = SystemTime::now() + std::time::Duration::from_hours(1);
        proxies.signed("node n1", "spiffe://td/ns/a/sa/b", later);
        proxies.signed("node n1", "spiffe://td/ns/a/sa/gone", UNIX_EPOCH);
        proxies.signed("x", "spiffe://td/ns/w/sa/waypoint", later);
        let listed = proxies.list(Some(3));
        assert_eq!(
            listed[0].certificates,
            [HeldCertificate {
                identity: "spiffe://td/ns/a/sa/b".into(),
                expires_unix: later.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
            }],
            "an expired certificate is not listed"
        );
        assert_eq!(listed[1].certificates.len(), 1, "each proxy its own");
        drop(agent);
        let left = proxies.list(Some(3));
        assert_eq!(left.len(), 1, "a closed stream is gone");
        assert_eq!(left[0].peer, "waypoint x");
    }
}
