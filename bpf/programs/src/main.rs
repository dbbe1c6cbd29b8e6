//! nodeseal's tc programs: `from_pod`, `from_network`, `to_pod`, and the `pass` baseline.
//!
//! Everything lives behind `cfg(target_arch = "bpf")`; on the host this binary is an empty
//! `main` so that `cargo check --workspace --all-targets` keeps working.
//!
//! Verdicts (every case is explicit; see `parse` for the parsing rules):
//!
//! | program | case | verdict |
//! |---|---|---|
//! | all | ARP | pass |
//! | from_pod, to_pod | other non-IP ethertype (incl. VLAN-tagged frames) | drop `unsupported_l3` |
//! | from_network | non-IP ethertype | pass (not ours to judge) |
//! | all | bad IP version / header length / total length | drop `malformed` |
//! | all | packet ends before a header the verdict needs | drop `truncated` |
//! | all | more than 8 IPv6 extension headers | drop `ipv6_extension_chain` |
//! | from_pod | ingress ifindex not in `ENDPOINTS` | drop `unknown_endpoint` |
//! | from_pod | egress enforced, not a reply, egress policy denies | drop `policy_denied` / `fragment_no_ports` |
//! | from_pod | remote destination, IPsec, peer ready | pass, mark = encrypt(node, slot) |
//! | from_pod | remote destination, peer not ready, strict egress | drop `no_sa` |
//! | from_pod | remote destination, peer not ready, not strict | pass in clear |
//! | from_pod | revoked node's pod CIDR, strict egress | drop `no_sa` (never an encrypt mark) |
//! | from_network | packet already carries a decrypt mark (decrypted inner packet) | pass |
//! | from_network | ESP from a node in `NODES` (IPsec mode) | pass, mark = decrypt(node) |
//! | from_network | ESP from an unknown address (IPsec mode) | drop `unknown_node` |
//! | from_network | plaintext from this node's own pod CIDRs, encryption on | drop `local_source_spoof` |
//! | from_network | plaintext from a revoked node's pod CIDR, encryption on | drop `revoked_source` |
//! | from_network | plaintext from a remote pod CIDR, strict ingress | drop `unencrypted` |
//! | to_pod | ifindex not in `ENDPOINTS` | pass (not a managed pod) |
//! | to_pod | ingress enforced, not a reply, ingress policy denies | drop `policy_denied` / `fragment_no_ports` |
//!
//! Non-first fragments carry no L4 header: policy evaluates them against port-wildcard entries
//! only, and a policy that allows only specific ports drops them (`fragment_no_ports`). The
//! encryption decision never needs ports, so fragments are marked like any other packet.
//! ICMP "fragmentation needed" / ICMPv6 "packet too big" always pass policy (path MTU discovery
//! must work whatever the flow), and so does ICMPv6 neighbour discovery (types 133 to 137, what
//! ARP is to IPv4); other ICMP messages are matched with their type as the port.
//!
//! Replies pass without a rule: every flow crossing a pod's interface is tracked (`CONNTRACK`,
//! `conntrack`), and a packet whose reversed flow was tracked in the other direction is a
//! reply, which policy does not check (as in Kubernetes and Cilium).
#![cfg_attr(target_arch = "bpf", no_std, no_main)]
#![cfg_attr(target_arch = "bpf", feature(asm_experimental_arch))]

#[cfg(target_arch = "bpf")]
mod conntrack;
#[cfg(target_arch = "bpf")]
mod maps;
#[cfg(target_arch = "bpf")]
mod parse;
#[cfg(target_arch = "bpf")]
mod policy;
#[cfg(target_arch = "bpf")]
mod programs;
#[cfg(target_arch = "bpf")]
mod verdict;

#[cfg(not(target_arch = "bpf"))]
fn main() {}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // eBPF cannot panic at run time: the verifier rejects a program with a reachable panic.
    loop {}
}
