//! Section 5: invocation across two nodes (agent-to-agent mTLS).
//!
//! Not built yet: the agents' mTLS link is being written. When it lands,
//! this section makes a second `World` (node 2, its own pod CIDR), routes
//! the two node namespaces to each other (a veth pair between them with
//! each node's pod CIDR routed over it), puts pod B on node 2 and names it
//! in node 1's manifests (status.podIP / hostIP), and runs
//! `load::run` from pod A with the direct path A → B's pod IP across the
//! nodes and the runtime path A → runtime (node 1) → mTLS → runtime
//! (node 2) → B, printing the same table and a PASS/MISS for added p99
//! ≤ 1 ms.

use crate::Report;

pub fn section(report: &mut Report) {
    println!("\n== 5. invoke across two nodes (mTLS) ==");
    println!("  cross-node: not built yet");
    report.targets.push(
        "across nodes: added p99 ≤ 1 ms: not measured (cross-node invocation not built yet)".into(),
    );
}
