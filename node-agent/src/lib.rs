//! The node agent: the DaemonSet daemon that will hold sources, policy, routes,
//! the CSI host and the app runtime.
//!
//! Nothing is implemented here yet (issue 3 builds it). The CNI plugin works
//! without it by design: the data path never waits for the agent.
