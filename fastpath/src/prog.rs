//! The fast-path program, attached at tc ingress (clsact, direct action) of every pod's host veth.
//!
//! For a packet a pod sends to another pod on this node, the routed path is:
//! host veth in, IP forwarding and netfilter, the other host veth out, the
//! other pod's veth in. This program takes the last three steps in one: it
//! does what forwarding would (TTL or hop limit minus one, the gateway's MAC
//! as source and the pod's as destination) and calls `bpf_redirect_peer`,
//! which delivers the packet to the destination pod's interface within the
//! same softirq.
//!
//! It only does so when skipping netfilter changes nothing:
//! - both addresses belong to pods in the `pods` map, the packet came in on
//!   the source pod's own veth (so it is not spoofed), and both pods carry the
//!   fast flag (set only where no policy applies to them);
//! - the packet is plain TCP over IPv4 without options or fragments, or over
//!   IPv6 without extension headers, with TTL/hop limit above 1;
//! - the connection was opened pod to pod: its SYN, sent to the other pod's
//!   own address, recorded both directions in `flows`. A connection to a
//!   Service address (DNAT by kube-proxy) never has such a SYN, so its replies
//!   keep going through conntrack, which translates them back. UDP and
//!   everything else have no such marker and always take the routed path.
//!
//! Anything else returns `TCX_NEXT`, and the kernel carries on as if the
//! program were not there.

use crate::asm::{Asm, Cond, Size, FP, R0, R1, R2, R3, R4, R6, R7, R8, R9};

/// `struct __sk_buff` offsets (linux/bpf.h).
const SKB_PKT_TYPE: i16 = 4;
const SKB_VLAN_PRESENT: i16 = 20;
const SKB_IFINDEX: i16 = 40;
const SKB_DATA: i16 = 76;
const SKB_DATA_END: i16 = 80;

const HELPER_MAP_LOOKUP: i32 = 1;
const HELPER_MAP_UPDATE: i32 = 2;
const HELPER_REDIRECT_PEER: i32 = 155;

/// TC_ACT_UNSPEC (TCX_NEXT on tcx): not ours, the next filter or the stack has it.
const TCX_NEXT: i32 = -1;

/// Layout of a `pods` value: ifindex of the host veth (u32), the pod's MAC
/// (6 bytes), flags (u8), one byte of padding.
pub const POD_VALUE_SIZE: u32 = 12;
pub const POD_IFINDEX: i16 = 0;
pub const POD_MAC: i16 = 4;
pub const POD_FLAGS: i16 = 10;
/// Flag bit: no policy applies to this pod; its traffic may skip netfilter.
pub const FLAG_FAST: u8 = 1;

/// A `pods` key: the address as 16 bytes, IPv4 mapped (::ffff:a.b.c.d).
pub const POD_KEY_SIZE: u32 = 16;
/// A `flows` key: source and destination address (16 bytes each, as in
/// `pods`), then source and destination port as on the wire.
pub const FLOW_KEY_SIZE: u32 = 36;
pub const FLOW_VALUE_SIZE: u32 = 4;
/// A `flows` value (u32): the direction the SYN went (the connection's
/// opener to its listener), or the way back.
pub const FLOW_OPENER: i32 = 1;
pub const FLOW_ANSWERER: i32 = 2;

// Stack layout, as offsets from the frame pointer.
/// The packet's flow key; its source and destination addresses double as
/// `pods` keys.
const KEY: i16 = -40;
const KEY_DST: i16 = KEY + 16;
const KEY_PORTS: i16 = KEY + 32;
/// The reverse direction's flow key, built for a SYN.
const REV: i16 = -80;
const FLOW_VALUE: i16 = -84;
const TCP_FLAGS: i16 = -96;

const ETH_LEN: i32 = 14;
const TCP_SYN: i32 = 0x02;
const TCP_ACK: i32 = 0x10;
/// Ethertypes as a little-endian load of the big-endian field sees them.
const ETH_P_IP_LE: i32 = 0x0008;
const ETH_P_IPV6_LE: i32 = 0xdd86;
/// The host veths' MAC (every byte 0xee): the pods' gateway.
const HOST_MAC_WORD: i32 = 0xeeee_eeee_u32 as i32;
const HOST_MAC_HALF: i32 = 0xeeee;

/// Assembles the program around the two maps' file descriptors.
pub fn program(pods: i32, flows: i32) -> Vec<u64> {
    let mut a = Asm::default();
    a.mov(R6, R1);
    // Only frames addressed to the gateway, without an offloaded VLAN tag.
    a.load(Size::W, R2, R6, SKB_PKT_TYPE);
    a.jump_if(Cond::Ne, R2, 0, "pass");
    a.load(Size::W, R2, R6, SKB_VLAN_PRESENT);
    a.jump_if(Cond::Ne, R2, 0, "pass");
    a.load(Size::W, R7, R6, SKB_DATA);
    a.load(Size::W, R3, R6, SKB_DATA_END);
    a.mov(R2, R7);
    a.add_imm(R2, ETH_LEN);
    a.jump_if_reg(Cond::Gt, R2, R3, "pass");
    a.load(Size::H, R2, R7, 12);
    a.jump_if(Cond::Eq, R2, ETH_P_IP_LE, "v4");
    a.jump_if(Cond::Eq, R2, ETH_P_IPV6_LE, "v6");
    a.jump("pass");

    // IPv4: 20-byte header, TCP, not a fragment, TTL > 1.
    a.label("v4");
    a.mov(R2, R7);
    a.add_imm(R2, ETH_LEN + 20 + 14);
    a.jump_if_reg(Cond::Gt, R2, R3, "pass");
    a.load(Size::B, R2, R7, 14);
    a.jump_if(Cond::Ne, R2, 0x45, "pass");
    a.load(Size::B, R2, R7, 23);
    a.jump_if(Cond::Ne, R2, 6, "pass");
    // More-fragments bit and fragment offset (not DF), as a LE load sees them.
    a.load(Size::H, R2, R7, 20);
    a.and_imm(R2, 0xff3f);
    a.jump_if(Cond::Ne, R2, 0, "pass");
    a.load(Size::B, R2, R7, 22);
    a.jump_if(Cond::Le, R2, 1, "pass");
    for (key_at, pkt_at) in [(KEY, 26), (KEY_DST, 30)] {
        a.store_imm(Size::DW, FP, key_at, 0);
        a.store_imm(Size::W, FP, key_at + 8, 0xffff_0000_u32 as i32);
        a.load(Size::W, R2, R7, pkt_at);
        a.store(Size::W, FP, key_at + 12, R2);
    }
    a.load(Size::W, R2, R7, 34);
    a.store(Size::W, FP, KEY_PORTS, R2);
    a.load(Size::B, R2, R7, 34 + 13);
    a.store(Size::DW, FP, TCP_FLAGS, R2);
    a.mov_imm(R9, 4);
    a.jump("pods");

    // IPv6: TCP as the first next header, hop limit > 1.
    a.label("v6");
    a.mov(R2, R7);
    a.add_imm(R2, ETH_LEN + 40 + 14);
    a.jump_if_reg(Cond::Gt, R2, R3, "pass");
    a.load(Size::B, R2, R7, 20);
    a.jump_if(Cond::Ne, R2, 6, "pass");
    a.load(Size::B, R2, R7, 21);
    a.jump_if(Cond::Le, R2, 1, "pass");
    for (key_at, pkt_at) in [(KEY, 22), (KEY_DST, 38)] {
        for w in 0..4 {
            a.load(Size::W, R2, R7, pkt_at + 4 * w);
            a.store(Size::W, FP, key_at + 4 * w, R2);
        }
    }
    a.load(Size::W, R2, R7, 54);
    a.store(Size::W, FP, KEY_PORTS, R2);
    a.load(Size::B, R2, R7, 54 + 13);
    a.store(Size::DW, FP, TCP_FLAGS, R2);
    a.mov_imm(R9, 6);

    // Both ends are pods here; the source sent it from its own veth; both may skip netfilter.
    a.label("pods");
    lookup(&mut a, pods, KEY_DST);
    a.mov(R8, R0);
    lookup(&mut a, pods, KEY);
    a.load(Size::W, R2, R0, POD_IFINDEX);
    a.load(Size::W, R3, R6, SKB_IFINDEX);
    a.jump_if_reg(Cond::Ne, R2, R3, "pass");
    a.load(Size::B, R2, R0, POD_FLAGS);
    a.load(Size::B, R3, R8, POD_FLAGS);
    a.and(R2, R3);
    a.and_imm(R2, i32::from(FLAG_FAST));
    a.jump_if(Cond::Eq, R2, 0, "pass");

    // A SYN opens the flow both ways; any other segment needs its flow.
    a.load(Size::DW, R2, FP, TCP_FLAGS);
    a.and_imm(R2, TCP_SYN | TCP_ACK);
    a.jump_if(Cond::Eq, R2, TCP_SYN, "syn");
    lookup(&mut a, flows, KEY);
    a.jump("forward");

    a.label("syn");
    for (to, from) in [(REV, KEY_DST), (REV + 16, KEY)] {
        for half in [0, 8] {
            a.load(Size::DW, R2, FP, from + half);
            a.store(Size::DW, FP, to + half, R2);
        }
    }
    a.load(Size::H, R2, FP, KEY_PORTS);
    a.store(Size::H, FP, REV + 34, R2);
    a.load(Size::H, R2, FP, KEY_PORTS + 2);
    a.store(Size::H, FP, REV + 32, R2);
    for (key, value) in [(KEY, FLOW_OPENER), (REV, FLOW_ANSWERER)] {
        a.store_imm(Size::W, FP, FLOW_VALUE, value);
        a.load_map(R1, flows);
        a.mov(R2, FP);
        a.add_imm(R2, i32::from(key));
        a.mov(R3, FP);
        a.add_imm(R3, i32::from(FLOW_VALUE));
        a.mov_imm(R4, 0);
        a.call(HELPER_MAP_UPDATE);
    }

    // What IP forwarding would have done, then straight to the pod.
    a.label("forward");
    a.load(Size::W, R7, R6, SKB_DATA);
    a.load(Size::W, R3, R6, SKB_DATA_END);
    a.jump_if(Cond::Eq, R9, 6, "hop6");
    a.mov(R2, R7);
    a.add_imm(R2, ETH_LEN + 20);
    a.jump_if_reg(Cond::Gt, R2, R3, "pass");
    a.load(Size::B, R2, R7, 22);
    a.sub_imm(R2, 1);
    a.store(Size::B, R7, 22, R2);
    // Incremental checksum for TTL - 1, as the kernel's ip_decrease_ttl.
    a.load(Size::H, R2, R7, 24);
    a.add_imm(R2, 1);
    a.jump_if(Cond::Lt, R2, 0xffff, "csum_done");
    a.add_imm(R2, 1);
    a.label("csum_done");
    a.store(Size::H, R7, 24, R2);
    a.jump("macs");

    a.label("hop6");
    a.mov(R2, R7);
    a.add_imm(R2, ETH_LEN + 40);
    a.jump_if_reg(Cond::Gt, R2, R3, "pass");
    a.load(Size::B, R2, R7, 21);
    a.sub_imm(R2, 1);
    a.store(Size::B, R7, 21, R2);

    a.label("macs");
    a.load(Size::W, R2, R8, POD_MAC);
    a.store(Size::W, R7, 0, R2);
    a.load(Size::H, R2, R8, POD_MAC + 4);
    a.store(Size::H, R7, 4, R2);
    a.mov_imm(R2, HOST_MAC_WORD);
    a.store(Size::W, R7, 6, R2);
    a.mov_imm(R2, HOST_MAC_HALF);
    a.store(Size::H, R7, 10, R2);
    a.load(Size::W, R1, R8, POD_IFINDEX);
    a.mov_imm(R2, 0);
    a.call(HELPER_REDIRECT_PEER);
    a.exit();

    a.label("pass");
    a.mov_imm(R0, TCX_NEXT);
    a.exit();
    a.finish()
}

/// `r0 = map[fp + key]`, leaving the program (TCX_NEXT) when absent.
fn lookup(a: &mut Asm, map: i32, key: i16) {
    a.load_map(R1, map);
    a.mov(R2, FP);
    a.add_imm(R2, i32::from(key));
    a.call(HELPER_MAP_LOOKUP);
    a.jump_if(Cond::Eq, R0, 0, "pass");
}
