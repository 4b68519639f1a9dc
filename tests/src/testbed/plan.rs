//! The testbed's naming and address plan: pure functions, no side effects.
//!
//! Every resource of one testbed carries its prefix `tb{pid}x{n}`, where `pid` is the
//! process that built it and `n` a per-process counter. The pid lets a later run recognise
//! leftovers of a crashed run (see the stale sweep in [`super`]); the short form keeps
//! namespace names readable. Interface names are fixed and short (`eth0`, `n{i}`, `p{k}`)
//! because each lives in a namespace of its own testbed, so parallel testbeds never clash.
//!
//! IPv6 addresses are written the way DESIGN and the tests spell them, e.g. pod 0 of node 1
//! is `fd00:200:1::10`: the decimal numbers are written as the hex groups' digits.

use std::net::{Ipv4Addr, Ipv6Addr};

/// Most nodes a testbed may have (node LAN addresses stay below the external host's .100).
pub const MAX_NODES: usize = 90;
/// Most pods per node (pod host numbers start at 10 and must stay below 255).
pub const MAX_PODS_PER_NODE: usize = 200;

/// Host number of the first pod in its node's pod subnet.
const FIRST_POD_HOST: usize = 10;

/// The prefix of the `n`-th testbed built by process `pid`.
pub fn prefix(pid: u32, n: u64) -> String {
    format!("tb{pid}x{n}")
}

/// Splits a resource name (`tb123x4` or `tb123x4-n0p1`) into its prefix and the pid that made
/// it. Returns `None` for names that are not testbed resources.
pub fn parse_prefix(name: &str) -> Option<(&str, u32)> {
    let prefix = name.split('-').next()?;
    let rest = prefix.strip_prefix("tb")?;
    let (pid, n) = rest.split_once('x')?;
    if pid.is_empty() || n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((prefix, pid.parse().ok()?))
}

/// The LAN namespace joining all nodes.
pub fn lan_netns(prefix: &str) -> String {
    format!("{prefix}-lan")
}

/// Node `i`'s namespace.
pub fn node_netns(prefix: &str, i: usize) -> String {
    format!("{prefix}-n{i}")
}

/// Namespace of pod `k` on node `i`.
pub fn pod_netns(prefix: &str, i: usize, k: usize) -> String {
    format!("{prefix}-n{i}p{k}")
}

/// The external (non-mesh) host's namespace.
pub fn ext_netns(prefix: &str) -> String {
    format!("{prefix}-ext")
}

/// Display name of node `i`.
pub fn node_name(i: usize) -> String {
    format!("node-{i}")
}

/// Display name of pod `k` on node `i`.
pub fn pod_name(i: usize, k: usize) -> String {
    format!("pod-{i}-{k}")
}

/// The uid of pod `k` on node `i` of the `n`-th testbed of process `pid`: UUID-shaped (as
/// Kubernetes writes them), deterministic, and unique across testbeds and runs of live
/// processes.
pub fn pod_uid(pid: u32, n: u64, i: usize, k: usize) -> String {
    format!(
        "{pid:08x}-{:04x}-4{:03x}-a{:03x}-7e11b5ed0000",
        n & 0xffff,
        i & 0xfff,
        k & 0xfff
    )
}

/// `n`'s decimal digits read as a hex group, so `dec_group(10)` prints as `10` in an IPv6
/// address (valid for n < 10000, far above the plan's limits).
fn dec_group(mut n: usize) -> u16 {
    let (mut group, mut shift) = (0u16, 0);
    while n > 0 && shift < 16 {
        group |= ((n % 10) as u16) << shift;
        n /= 10;
        shift += 4;
    }
    group
}

/// Node `i`'s LAN address.
pub fn node_lan_ip4(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 199, 0, (i + 1) as u8)
}

/// Node `i`'s LAN IPv6 address.
pub fn node_lan_ip6(i: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x199, 0, 0, 0, 0, 0, dec_group(i + 1))
}

/// Node `i`'s address on its `pods` bridge (the pods' default gateway).
pub fn gateway_ip4(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 200, i as u8, 1)
}

/// Node `i`'s IPv6 address on its `pods` bridge.
pub fn gateway_ip6(i: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x200, dec_group(i), 0, 0, 0, 0, 1)
}

/// Pod `k` of node `i`.
pub fn pod_ip4(i: usize, k: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 200, i as u8, (k + FIRST_POD_HOST) as u8)
}

/// Pod `k` of node `i`, IPv6.
pub fn pod_ip6(i: usize, k: usize) -> Ipv6Addr {
    Ipv6Addr::new(
        0xfd00,
        0x200,
        dec_group(i),
        0,
        0,
        0,
        0,
        dec_group(k + FIRST_POD_HOST),
    )
}

/// Node `i`'s IPv4 pod subnet in CIDR form.
pub fn pod_subnet4(i: usize) -> String {
    format!("10.200.{i}.0/24")
}

/// Node `i`'s IPv6 pod subnet in CIDR form.
pub fn pod_subnet6(i: usize) -> String {
    format!("fd00:200:{i}::/64")
}

/// The external host's LAN address.
pub fn ext_ip4() -> Ipv4Addr {
    Ipv4Addr::new(10, 199, 0, 100)
}

/// The external host's LAN IPv6 address.
pub fn ext_ip6() -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x199, 0, 0, 0, 0, 0, 0x100)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_round_trip_and_reject_foreign_names() {
        let p = prefix(4_194_304, 12);
        assert_eq!(p, "tb4194304x12");
        assert_eq!(parse_prefix(&p), Some(("tb4194304x12", 4_194_304)));
        assert_eq!(
            parse_prefix(&pod_netns(&p, 3, 7)),
            Some(("tb4194304x12", 4_194_304))
        );
        assert_eq!(parse_prefix(&lan_netns("tb1x0")), Some(("tb1x0", 1)));
        for foreign in [
            "", "tb", "tbx1", "tb1x", "tb1y2", "cni-1234", "tb12xab", "tbzx1",
        ] {
            assert_eq!(parse_prefix(foreign), None, "{foreign}");
        }
    }

    #[test]
    fn names_fit_and_do_not_collide() {
        let p = prefix(4_194_304, 999);
        // Netns names have no hard limit, but keep them short enough to read in `ip netns`.
        assert!(pod_netns(&p, MAX_NODES - 1, MAX_PODS_PER_NODE - 1).len() < 32);
        // `tb1x1-...` must not look like it belongs to `tb1x10`.
        assert!(!node_netns("tb1x10", 0).starts_with("tb1x1-"));
        assert_eq!(node_name(2), "node-2");
        assert_eq!(pod_name(1, 0), "pod-1-0");
    }

    #[test]
    fn pod_uids_are_uuid_shaped_and_distinct() {
        let uid = pod_uid(4_194_304, 3, 1, 12);
        assert_eq!(uid, "00400000-0003-4001-a00c-7e11b5ed0000");
        let groups: Vec<usize> = uid.split('-').map(str::len).collect();
        assert_eq!(groups, [8, 4, 4, 4, 12]);
        assert_ne!(pod_uid(1, 0, 0, 1), pod_uid(1, 0, 1, 0));
        assert_ne!(pod_uid(1, 0, 0, 0), pod_uid(1, 1, 0, 0));
    }

    #[test]
    fn addresses_follow_the_plan() {
        assert_eq!(node_lan_ip4(0).to_string(), "10.199.0.1");
        assert_eq!(node_lan_ip6(1).to_string(), "fd00:199::2");
        assert_eq!(gateway_ip4(1).to_string(), "10.200.1.1");
        assert_eq!(gateway_ip6(1).to_string(), "fd00:200:1::1");
        assert_eq!(pod_ip4(1, 0).to_string(), "10.200.1.10");
        assert_eq!(pod_ip6(1, 0).to_string(), "fd00:200:1::10");
        assert_eq!(pod_ip6(0, 2).to_string(), "fd00:200::12");
        assert_eq!(pod_subnet4(3), "10.200.3.0/24");
        assert_eq!(pod_subnet6(3), "fd00:200:3::/64");
        assert_eq!(ext_ip4().to_string(), "10.199.0.100");
        assert_eq!(ext_ip6().to_string(), "fd00:199::100");
        assert_eq!(node_lan_ip4(MAX_NODES - 1).octets()[3], 90);
        assert_eq!(pod_ip4(0, MAX_PODS_PER_NODE - 1).octets()[3], 209);
        assert_eq!(
            pod_ip6(12, MAX_PODS_PER_NODE - 1).to_string(),
            "fd00:200:12::209"
        );
        assert_eq!(dec_group(0), 0);
        assert_eq!(dec_group(1234), 0x1234);
    }
}
