//! `return_path`: tc (tcx) ingress on the node side of pod links.
//!
//! The node proxy opens connections to local pods from the client's address (a transparent
//! socket). The pod's replies are addressed to that client, so the node would forward them to
//! it (or, on a shared bridge, the pod would hand them to the client directly). This program
//! finds the replies of exactly the connections the agent recorded in `DELIVERIES` (the
//! reversed 4-tuple of a reply is the key the agent wrote before connecting) and sets the
//! return mark, which the agent's policy routing rule delivers to the local stack, where the
//! proxy's socket owns that 4-tuple. A reply the pod sends at layer 2 to a client on its own
//! bridge is readdressed to the bridge (`LINK_MACS`), so the node's stack sees it at all.
//!
//! Anything else, and anything it cannot parse, is left alone (`TCX_NEXT`): the program never
//! drops, and never steers a packet of a connection the proxy does not hold.

use aya_ebpf::{macros::classifier, programs::TcContext};
use mesh_common::{Delivery, RETURN_MARK, RETURN_MARK_MASK, Stat, v4_mapped};

use crate::{DELIVERIES, ETH_P_IP, ETH_P_IPV6, IPPROTO_TCP, LINK_MACS, count};

/// Hand the packet to the next program of the hook (or on, if it is the last).
const TCX_NEXT: i32 = -1;
const ETH_HLEN: usize = 14;

#[classifier]
pub fn return_path(ctx: TcContext) -> i32 {
    try_return_path(&ctx);
    TCX_NEXT
}

#[inline(always)]
fn try_return_path(ctx: &TcContext) -> Option<()> {
    let key = reply_key(ctx)?;
    // SAFETY: read-only lookup; only its presence is used.
    unsafe { DELIVERIES.get(&key) }?;
    let skb = ctx.skb.skb;
    // SAFETY: the kernel passes a valid `__sk_buff` for the duration of the program.
    let (mark, ifindex) = unsafe { ((*skb).mark, (*skb).ifindex) };
    ctx.set_mark((mark & !RETURN_MARK_MASK) | RETURN_MARK);
    // SAFETY: read-only lookup of a plain-data value, copied out.
    if let Some(mac) = unsafe { LINK_MACS.get(&ifindex) }.copied() {
        // Destination MAC first in the frame; the checksums do not cover it.
        if ctx.store(0, &mac.addr, 0).is_err() {
            return None;
        }
    }
    count(Stat::ReturnSteered);
    Some(())
}

/// The `DELIVERIES` key a reply would match: the reply's destination is the client end, its
/// source the pod. tc data starts at the Ethernet header.
#[inline(always)]
fn reply_key(ctx: &TcContext) -> Option<Delivery> {
    let ethertype = u16::from_be(ctx.load::<u16>(12).ok()?);
    let (src, dst, l4) = if ethertype == ETH_P_IP {
        let version_ihl: u8 = ctx.load(ETH_HLEN).ok()?;
        let ihl = usize::from(version_ihl & 0x0f) * 4;
        if version_ihl >> 4 != 4 || ihl < 20 {
            return None;
        }
        let proto: u8 = ctx.load(ETH_HLEN + 9).ok()?;
        if proto != IPPROTO_TCP {
            return None;
        }
        let src: u32 = ctx.load(ETH_HLEN + 12).ok()?;
        let dst: u32 = ctx.load(ETH_HLEN + 16).ok()?;
        (v4_mapped(src), v4_mapped(dst), ETH_HLEN + ihl)
    } else if ethertype == ETH_P_IPV6 {
        // Replies of the proxy's connections carry no extension headers; anything that does
        // is not steered.
        let next: u8 = ctx.load(ETH_HLEN + 6).ok()?;
        if next != IPPROTO_TCP {
            return None;
        }
        let src: [u32; 4] = ctx.load(ETH_HLEN + 8).ok()?;
        let dst: [u32; 4] = ctx.load(ETH_HLEN + 24).ok()?;
        (src, dst, ETH_HLEN + 40)
    } else {
        return None;
    };
    let ports: [u16; 2] = ctx.load(l4).ok()?;
    Some(Delivery {
        client: dst,
        pod: src,
        client_port: u32::from(u16::from_be(ports[1])),
        pod_port: u32::from(u16::from_be(ports[0])),
    })
}
