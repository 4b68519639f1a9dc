//! `raw-syn`: one TCP SYN written to a raw socket, as a caller bypassing its socket layer would
//! (a meshed pod with `CAP_NET_RAW` never goes through `connect()`, so nothing redirects it),
//! and what came back: a SYN-ACK (the server's listener answered), a RST, or nothing (dropped).

use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket},
    os::fd::AsRawFd,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use nix::sys::{
    socket::{
        AddressFamily, MsgFlags, SockFlag, SockProtocol, SockType, SockaddrIn, recvfrom, sendto,
        setsockopt, socket, sockopt,
    },
    time::TimeVal,
};
use serde_json::{Value, json};

const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

pub fn raw_syn(to: SocketAddr, wait: Duration) -> Result<(Value, bool)> {
    let SocketAddr::V4(to) = to else {
        bail!("raw-syn sends IPv4 only");
    };
    // The address the kernel would send from, without sending anything.
    let probe = UdpSocket::bind("0.0.0.0:0").context("probe socket")?;
    probe.connect(to).context("route to the target")?;
    let SocketAddr::V4(local) = probe.local_addr().context("local address")? else {
        bail!("no IPv4 route to {to}");
    };
    let fd = socket(
        AddressFamily::Inet,
        SockType::Raw,
        SockFlag::empty(),
        SockProtocol::Tcp,
    )
    .context("raw socket (needs CAP_NET_RAW)")?;
    setsockopt(&fd, sockopt::ReceiveTimeout, &TimeVal::new(0, 100_000)).context("SO_RCVTIMEO")?;
    let src_port = 40_000 + (std::process::id() % 20_000) as u16;
    let segment = syn(*local.ip(), src_port, *to.ip(), to.port());
    sendto(
        fd.as_raw_fd(),
        &segment,
        &SockaddrIn::from(to),
        MsgFlags::empty(),
    )
    .context("sending the SYN")?;

    let deadline = Instant::now() + wait;
    let mut buf = [0u8; 1500];
    while Instant::now() < deadline {
        let Ok((n, _)) = recvfrom::<SockaddrIn>(fd.as_raw_fd(), &mut buf) else {
            continue;
        };
        if let Some(flags) = reply_flags(&buf[..n], to, src_port) {
            let answer = if flags & (TCP_SYN | TCP_ACK) == TCP_SYN | TCP_ACK {
                "syn-ack"
            } else if flags & TCP_RST != 0 {
                "rst"
            } else {
                continue;
            };
            return Ok((json!({ "answer": answer }), true));
        }
    }
    Ok((json!({ "answer": "none" }), true))
}

/// A 20-byte TCP SYN with its checksum over the IPv4 pseudo-header.
fn syn(src: Ipv4Addr, src_port: u16, dst: Ipv4Addr, dst_port: u16) -> [u8; 20] {
    let mut h = [0u8; 20];
    h[0..2].copy_from_slice(&src_port.to_be_bytes());
    h[2..4].copy_from_slice(&dst_port.to_be_bytes());
    h[4..8].copy_from_slice(&0x1234_5678u32.to_be_bytes());
    h[12] = 5 << 4;
    h[13] = TCP_SYN;
    h[14..16].copy_from_slice(&64_240u16.to_be_bytes());
    let mut sum: u32 = 0;
    let mut add = |bytes: &[u8]| {
        for pair in bytes.chunks(2) {
            let word = u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]);
            sum += u32::from(word);
        }
    };
    add(&src.octets());
    add(&dst.octets());
    add(&[0, 6, 0, 20]);
    add(&h);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    h[16..18].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    h
}

/// The TCP flags of `packet` (an IPv4 datagram) if it answers our SYN.
fn reply_flags(packet: &[u8], from: SocketAddrV4, our_port: u16) -> Option<u8> {
    let ihl = usize::from(packet.first()? & 0x0f) * 4;
    if packet.get(9) != Some(&6) || packet.get(12..16)? != from.ip().octets() {
        return None;
    }
    let tcp = packet.get(ihl..ihl + 14)?;
    let src_port = u16::from_be_bytes([tcp[0], tcp[1]]);
    let dst_port = u16::from_be_bytes([tcp[2], tcp[3]]);
    (src_port == from.port() && dst_port == our_port).then_some(tcp[13])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_syn_checksums_to_zero_with_its_pseudo_header() {
        let (src, dst) = (Ipv4Addr::new(10, 200, 0, 10), Ipv4Addr::new(10, 200, 1, 10));
        let h = syn(src, 40_001, dst, 8080);
        let mut sum: u32 = 0;
        for bytes in [
            &src.octets()[..],
            &dst.octets()[..],
            &[0, 6, 0, 20][..],
            &h[..],
        ] {
            for pair in bytes.chunks(2) {
                sum += u32::from(u16::from_be_bytes([pair[0], pair[1]]));
            }
        }
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        assert_eq!(sum, 0xffff);
        assert_eq!(h[13], TCP_SYN);
    }

    #[test]
    fn only_the_targets_answer_to_our_port_counts() {
        let from = SocketAddrV4::new(Ipv4Addr::new(10, 200, 1, 10), 8080);
        let mut packet = [0u8; 40];
        packet[0] = 0x45;
        packet[9] = 6;
        packet[12..16].copy_from_slice(&from.ip().octets());
        packet[20..22].copy_from_slice(&8080u16.to_be_bytes());
        packet[22..24].copy_from_slice(&40_001u16.to_be_bytes());
        packet[33] = TCP_SYN | TCP_ACK;
        assert_eq!(reply_flags(&packet, from, 40_001), Some(TCP_SYN | TCP_ACK));
        assert_eq!(reply_flags(&packet, from, 40_002), None);
        assert_eq!(reply_flags(&packet[..25], from, 40_001), None, "truncated");
    }
}
