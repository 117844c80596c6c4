//! NetworkPolicy truth tables: an independent oracle, e2e-style scenarios,
//! and a prober that measures reachability between real network namespaces.
//!
//! The method is the Kubernetes e2e one (test/e2e/network/netpol, also
//! cyclonus): nine pods (namespaces x, y, z × pods a, b, c), every pod
//! probing every pod on 80 and 81 over TCP and UDP, and the observed
//! from × to matrix compared cell by cell with the one the policies imply.
//!
//! - [`oracle`]: the semantics, written for reading. [`oracle::allowed`]
//!   decides one connection; [`oracle::Cluster`] holds namespaces, pods,
//!   labels and named ports; [`oracle::validate`] rejects what the
//!   apiserver would.
//! - [`scenarios`]: [`scenarios::all`] returns the cases, each with
//!   policies (YAML and parsed), label [`scenarios::Change`]s to make before
//!   probing, and the [`matrix::Probe`]s to run.
//! - [`matrix`]: [`matrix::expected`] builds the expected
//!   [`matrix::Reachability`]; [`matrix::Reachability::compare`] returns a
//!   [`matrix::Report`] (expected, observed and diff grids) on mismatch.
//! - [`probe`]: [`probe::ProbeServer`] runs `np-probe-server` in a
//!   namespace; [`probe::observe`] probes all pairs in parallel (one thread
//!   per probe, each entering the source pod's namespace with setns).
//! - [`world`]: [`world::World`] creates the nine pods on real namespaces
//!   (e.g. through nodeplane-cni on a [`crate::fixture::Node`]) and starts
//!   their probe servers.
//!
//! A policy-engine test reads:
//!
//! ```no_run
//! use nodeplane_tests::fixture::Node;
//! use nodeplane_tests::policy::{matrix, probe, scenarios, world::World};
//!
//! let node = Node::new(&["10.244.0.0/24"]);
//! let mut world = World::on_node(&node);
//! // In an integration test: env!("CARGO_BIN_EXE_np-probe-server").
//! let server = std::path::Path::new("target/debug/np-probe-server");
//! world.start_servers(server);
//! for s in scenarios::all(&world.cluster) {
//!     // apply s.policies (or s.yaml), then s.changes, to the engine here
//!     let expected = s.expected(&world.cluster);
//!     let observed = probe::observe(&world.probe_pods(), &s.probes);
//!     if let Err(report) = expected.compare(&observed) {
//!         panic!("scenario {}:\n{report}", s.name);
//!     }
//! }
//! ```
//!
//! SCTP cannot be probed on kernels without CONFIG_IP_SCTP: SCTP cells are
//! computed in the expected tables, observed as [`matrix::Cell::NotProbed`],
//! and skipped by the comparison; SCTP scenarios still check that TCP and
//! UDP are denied.

pub mod matrix;
pub mod oracle;
pub mod probe;
pub mod scenarios;
pub mod world;
