//! The shared per-node app runtime (issue 6): one process serves the Dapr
//! v1.0 HTTP API to every pod on the node.
