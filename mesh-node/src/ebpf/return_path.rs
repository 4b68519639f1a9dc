//! The return path of connections the node proxy opens from a client's address.
//!
//! A local pod answers such a connection to the client's address, which the node would
//! forward to the client (or the pod would hand it to the client at layer 2, on a shared
//! bridge). Three parts bring the replies back to the proxy's socket:
//!
//! - [`Deliveries`]: the `DELIVERIES` map, written by the proxy before each such connect with
//!   the exact 4-tuple and forgotten after the socket is gone (TIME_WAIT included). STRICT
//!   pods admit exactly these tuples (`mtls_ingress`), and only their replies are steered.
//! - the `return_path` program, attached (tcx, first in order; netlink `clsact` on kernels
//!   without tcx) to the node side of every link a local pod is reached over (a bridge's
//!   ports, or the pod's own link): it marks those replies, and readdresses a layer-2 reply to
//!   the bridge (`LINK_MACS`).
//! - policy routing: `fwmark RETURN_MARK/RETURN_MARK_MASK lookup RETURN_TABLE`, whose only
//!   route is `local default dev lo`, so a marked reply is delivered to the local stack, where
//!   the proxy's transparent socket owns its 4-tuple.
//!
//! [`ReturnPath::sync`] follows the local pods: a pod's address is reported covered only once
//! the links it is reached over carry the program, so a connection to a pod created a moment
//! ago is delivered from the node rather than lose its replies.

use std::{
    collections::{HashMap as StdHashMap, HashSet, VecDeque},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::Path,
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use arc_swap::ArcSwap;
use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, MapData},
    programs::{
        LinkOrder, SchedClassifier, TcAttachType,
        tc::{SchedClassifierLinkId, TcAttachOptions, qdisc_add_clsact},
    },
};
use futures_util::TryStreamExt;
use mesh_common::{
    Delivery, LinkMac, RETURN_MARK, RETURN_MARK_MASK, RETURN_RULE_PRIORITY, RETURN_TABLE, maps,
    programs,
};
use netlink_packet_route::{
    link::{InfoKind, LinkAttribute, LinkInfo, LinkMessage},
    route::{RouteAttribute, RouteScope, RouteType},
    rule::{RuleAction, RuleAttribute},
};
use parking_lot::Mutex;
use rtnetlink::{Handle, RouteMessageBuilder};

use super::{EbpfError, ip_key, program_mut, take_map};

/// How long a delivered connection's record outlives its socket: Linux's TIME_WAIT, during
/// which the pod's last segments (a retransmitted FIN) must still reach the socket.
const TIME_WAIT: Duration = Duration::from_mins(1);
const LOOPBACK_IFINDEX: u32 = 1;

/// The proxy's connections from client addresses, as the datapath sees them.
pub struct Deliveries {
    map: Mutex<HashMap<MapData, Delivery, u32>>,
    /// Local pod addresses whose links carry the program.
    covered: ArcSwap<HashSet<IpAddr>>,
    /// Records of closed sockets, forgotten once their deadline passes.
    lingering: Mutex<VecDeque<(Instant, Delivery, u32)>>,
    /// Tells a record from a later one of the same 4-tuple (TIME_WAIT reuse).
    generation: AtomicU32,
}

impl Deliveries {
    /// Whether replies of `pod` are steered.
    pub fn covers(&self, pod: IpAddr) -> bool {
        self.covered.load().contains(&pod.to_canonical())
    }

    /// Records a connection about to be opened from `client` to `pod`.
    pub fn record(&self, client: SocketAddr, pod: SocketAddr) -> std::io::Result<()> {
        let generation = self.generation.fetch_add(1, Ordering::Relaxed);
        self.map
            .lock()
            .insert(delivery(client, pod), generation, 0)
            .map_err(std::io::Error::other)
    }

    /// Whether the proxy opened the connection from `client` to `pod` (recorded, not yet
    /// forgotten).
    pub fn contains(&self, client: SocketAddr, pod: SocketAddr) -> bool {
        self.map.lock().get(&delivery(client, pod), 0).is_ok()
    }

    /// Forgets a connection: at once, or (`linger`) once TIME_WAIT is over.
    pub fn forget(&self, client: SocketAddr, pod: SocketAddr, linger: bool) {
        let key = delivery(client, pod);
        let mut map = self.map.lock();
        let Ok(generation) = map.get(&key, 0) else {
            return;
        };
        if linger {
            self.lingering
                .lock()
                .push_back((Instant::now() + TIME_WAIT, key, generation));
        } else {
            let _ = map.remove(&key);
        }
    }

    /// Forgets the records whose TIME_WAIT is over, unless the tuple was recorded again since.
    fn sweep(&self, now: Instant) {
        loop {
            let due = {
                let mut lingering = self.lingering.lock();
                match lingering.front() {
                    Some((deadline, _, _)) if *deadline <= now => lingering.pop_front(),
                    _ => None,
                }
            };
            let Some((_, key, generation)) = due else {
                return;
            };
            let mut map = self.map.lock();
            if map.get(&key, 0).is_ok_and(|current| current == generation) {
                let _ = map.remove(&key);
            }
        }
    }
}

fn delivery(client: SocketAddr, pod: SocketAddr) -> Delivery {
    Delivery {
        client: ip_key(client.ip()),
        pod: ip_key(pod.ip()),
        client_port: u32::from(client.port()),
        pod_port: u32::from(pod.port()),
    }
}

/// The return path's program, its links and the policy routing; owned by one task.
pub struct ReturnPath {
    ebpf: Ebpf,
    macs: HashMap<MapData, u32, LinkMac>,
    /// Links carrying the program, by index and name (an index alone may be reused).
    attached: StdHashMap<(u32, String), SchedClassifierLinkId>,
    /// The links each covered pod is reached over.
    pod_links: StdHashMap<IpAddr, Vec<(u32, String)>>,
    netlink: Handle,
    deliveries: std::sync::Arc<Deliveries>,
}

impl ReturnPath {
    /// Loads the program against the datapath's pinned maps (`maps_dir`), empties
    /// `DELIVERIES` (a previous agent's sockets are gone) and installs the policy routing.
    pub async fn install(maps_dir: &Path) -> Result<Self, EbpfError> {
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(maps_dir)
            .load(super::OBJECT)?;
        let mut map: HashMap<MapData, Delivery, u32> = take_map(&mut ebpf, maps::DELIVERIES)?;
        let stale: Vec<Delivery> = map.keys().filter_map(Result::ok).collect();
        for key in stale {
            let _ = map.remove(&key);
        }
        let macs = take_map(&mut ebpf, maps::LINK_MACS)?;
        let name = programs::RETURN_PATH;
        let program: &mut SchedClassifier = program_mut(&mut ebpf, name)?;
        program
            .load()
            .map_err(|source| EbpfError::Program { name, source })?;
        let (connection, netlink, _) = rtnetlink::new_connection().map_err(EbpfError::Netlink)?;
        tokio::spawn(connection);
        install_routing(&netlink).await?;
        Ok(Self {
            ebpf,
            macs,
            attached: StdHashMap::new(),
            pod_links: StdHashMap::new(),
            netlink,
            deliveries: std::sync::Arc::new(Deliveries {
                map: Mutex::new(map),
                covered: ArcSwap::default(),
                lingering: Mutex::new(VecDeque::new()),
                generation: AtomicU32::new(0),
            }),
        })
    }

    /// What the proxy records its connections in.
    pub fn deliveries(&self) -> std::sync::Arc<Deliveries> {
        self.deliveries.clone()
    }

    /// Attaches the program to the links `pods` are reached over, and publishes which pods
    /// are covered. Also forgets records whose TIME_WAIT is over. A pod covered before keeps
    /// its links unless one went away; `full` asks the routes again for every pod. Failures
    /// are logged: a pod left uncovered is delivered from the node.
    pub async fn sync(&mut self, pods: &[IpAddr], full: bool) {
        self.deliveries.sweep(Instant::now());
        let links = match self.links().await {
            Ok(links) => links,
            Err(e) => {
                tracing::warn!(error = %e, "return path: cannot list the node's links");
                return;
            }
        };
        // Links that went away took their attachment with them.
        self.attached
            .retain(|(index, name), _| links.get(index).is_some_and(|l| &l.name == name));
        let mut pod_links = StdHashMap::new();
        for pod in pods {
            let pod = pod.to_canonical();
            if !full
                && let Some(known) = self.pod_links.remove(&pod)
                && known.iter().all(|key| self.attached.contains_key(key))
            {
                pod_links.insert(pod, known);
                continue;
            }
            match self.cover(pod, &links).await {
                Ok(keys) => {
                    pod_links.insert(pod, keys);
                }
                Err(e) => {
                    tracing::debug!(%pod, error = %e, "return path does not cover this pod yet");
                }
            }
        }
        let covered = pod_links.keys().copied().collect();
        self.pod_links = pod_links;
        self.deliveries.covered.store(std::sync::Arc::new(covered));
    }

    /// Attaches to the links `pod` is reached over: a bridge's ports (a bridge's own ingress
    /// never sees what it forwards between ports), or the link itself.
    async fn cover(
        &mut self,
        pod: IpAddr,
        links: &StdHashMap<u32, Link>,
    ) -> Result<Vec<(u32, String)>, String> {
        let oif = self.route_oif(pod).await?;
        let link = links
            .get(&oif)
            .ok_or_else(|| format!("link {oif} vanished"))?;
        if link.bridge {
            let mac = LinkMac {
                addr: link.mac.ok_or("bridge without a MAC address")?,
                reserved: [0; 2],
            };
            let ports: Vec<(u32, String)> = links
                .values()
                .filter(|l| l.controller == Some(oif))
                .map(|l| (l.index, l.name.clone()))
                .collect();
            for (index, name) in &ports {
                self.macs
                    .insert(index, mac, 0)
                    .map_err(|e| format!("LINK_MACS: {e}"))?;
                self.attach(*index, name)?;
            }
            Ok(ports)
        } else {
            let _ = self.macs.remove(&oif);
            let name = link.name.clone();
            self.attach(oif, &name)?;
            Ok(vec![(oif, name)])
        }
    }

    fn attach(&mut self, index: u32, name: &str) -> Result<(), String> {
        let key = (index, name.to_owned());
        if self.attached.contains_key(&key) {
            return Ok(());
        }
        let program: &mut SchedClassifier =
            program_mut(&mut self.ebpf, programs::RETURN_PATH).map_err(|e| e.to_string())?;
        let id = match program.attach_with_options(
            name,
            TcAttachType::Ingress,
            TcAttachOptions::TcxOrder(LinkOrder::first()),
        ) {
            Ok(id) => id,
            Err(tcx) => {
                // Kernels before 6.6 have no tcx: a clsact filter, alongside others.
                let _ = qdisc_add_clsact(name);
                program
                    .attach(name, TcAttachType::Ingress)
                    .map_err(|e| format!("attaching to {name}: {tcx}; then {e}"))?
            }
        };
        tracing::info!(link = name, "return path attached");
        self.attached.insert(key, id);
        Ok(())
    }

    /// The link the node routes `pod` over.
    async fn route_oif(&self, pod: IpAddr) -> Result<u32, String> {
        let message = match pod {
            IpAddr::V4(ip) => RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(ip, 32)
                .build(),
            IpAddr::V6(ip) => RouteMessageBuilder::<Ipv6Addr>::new()
                .destination_prefix(ip, 128)
                .build(),
        };
        let mut routes = self.netlink.route().get(message).execute();
        while let Some(route) = routes.try_next().await.map_err(|e| e.to_string())? {
            if let Some(oif) = route.attributes.iter().find_map(|a| match a {
                RouteAttribute::Oif(oif) => Some(*oif),
                _ => None,
            }) {
                return Ok(oif);
            }
        }
        Err(format!("no route to {pod}"))
    }

    async fn links(&self) -> Result<StdHashMap<u32, Link>, rtnetlink::Error> {
        let mut out = StdHashMap::new();
        let mut stream = self.netlink.link().get().execute();
        while let Some(message) = stream.try_next().await? {
            let link = Link::of(&message);
            out.insert(link.index, link);
        }
        Ok(out)
    }
}

/// What the return path needs to know of a link.
struct Link {
    index: u32,
    name: String,
    mac: Option<[u8; 6]>,
    controller: Option<u32>,
    bridge: bool,
}

impl Link {
    fn of(message: &LinkMessage) -> Self {
        let mut link = Link {
            index: message.header.index,
            name: String::new(),
            mac: None,
            controller: None,
            bridge: false,
        };
        for attribute in &message.attributes {
            match attribute {
                LinkAttribute::IfName(name) => link.name.clone_from(name),
                LinkAttribute::Address(bytes) => link.mac = bytes.as_slice().try_into().ok(),
                LinkAttribute::Controller(index) => link.controller = Some(*index),
                LinkAttribute::LinkInfo(infos) => {
                    link.bridge = infos
                        .iter()
                        .any(|i| matches!(i, LinkInfo::Kind(InfoKind::Bridge)));
                }
                _ => {}
            }
        }
        link
    }
}

/// The rule and the `local` route of both families; already present (a previous agent's) is
/// fine.
async fn install_routing(netlink: &Handle) -> Result<(), EbpfError> {
    let exists = |e: &rtnetlink::Error| {
        matches!(e, rtnetlink::Error::NetlinkError(m)
            if m.code.is_some_and(|c| c.get() == -libc::EEXIST))
    };
    let routing = |what: &'static str| move |e: rtnetlink::Error| EbpfError::Routing { what, e };
    for v6 in [false, true] {
        let mut rule = netlink
            .rule()
            .add()
            .action(RuleAction::ToTable)
            .fw_mark(RETURN_MARK)
            .table_id(RETURN_TABLE)
            .priority(RETURN_RULE_PRIORITY);
        rule.message_mut()
            .attributes
            .push(RuleAttribute::FwMask(RETURN_MARK_MASK));
        let added = if v6 {
            rule.v6().execute().await
        } else {
            rule.v4().execute().await
        };
        if let Err(e) = added
            && !exists(&e)
        {
            return Err(routing("rule")(e));
        }
        let route = if v6 {
            RouteMessageBuilder::<Ipv6Addr>::new()
                .kind(RouteType::Local)
                .scope(RouteScope::Host)
                .table_id(RETURN_TABLE)
                .output_interface(LOOPBACK_IFINDEX)
                .build()
        } else {
            RouteMessageBuilder::<Ipv4Addr>::new()
                .kind(RouteType::Local)
                .scope(RouteScope::Host)
                .table_id(RETURN_TABLE)
                .output_interface(LOOPBACK_IFINDEX)
                .build()
        };
        let added = netlink.route().add(route).replace().execute().await;
        if let Err(e) = added
            && !exists(&e)
        {
            return Err(routing("route")(e));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use netlink_packet_route::link::{LinkHeader, LinkMessage};

    use super::*;

    #[test]
    fn deliveries_are_keyed_as_the_pod_sees_them_in_the_programs_address_form() {
        let key = delivery(
            "10.200.0.10:40000".parse().expect("client"),
            "10.200.1.10:8080".parse().expect("pod"),
        );
        assert_eq!(key.client, ip_key("10.200.0.10".parse().expect("ip")));
        assert_eq!(key.pod, ip_key("10.200.1.10".parse().expect("ip")));
        assert_eq!((key.client_port, key.pod_port), (40000, 8080));
        let v6 = delivery(
            "[fd00:200::10]:1".parse().expect("client"),
            "[fd00:200:1::10]:2".parse().expect("pod"),
        );
        assert_eq!(v6.client, ip_key("fd00:200::10".parse().expect("ip")));
    }

    #[test]
    fn links_report_their_bridge_mac_and_controller() {
        let mut message = LinkMessage::default();
        message.header = LinkHeader {
            index: 7,
            ..LinkHeader::default()
        };
        message.attributes = vec![
            LinkAttribute::IfName("pods".into()),
            LinkAttribute::Address(vec![2, 0, 0, 0, 0, 1]),
            LinkAttribute::LinkInfo(vec![LinkInfo::Kind(InfoKind::Bridge)]),
        ];
        let bridge = Link::of(&message);
        assert_eq!(bridge.index, 7);
        assert_eq!(bridge.name, "pods");
        assert_eq!(bridge.mac, Some([2, 0, 0, 0, 0, 1]));
        assert!(bridge.bridge);
        message.attributes = vec![
            LinkAttribute::IfName("p0".into()),
            LinkAttribute::Controller(7),
            LinkAttribute::Address(vec![1, 2, 3]),
        ];
        let port = Link::of(&message);
        assert_eq!(port.controller, Some(7));
        assert_eq!(port.mac, None, "not a MAC address");
        assert!(!port.bridge);
    }
}
