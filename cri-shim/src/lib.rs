//! The CRI shim: a faithful relay between the kubelet and containerd that
//! reports pod lifecycle to the node agent.
//!
//! Nothing is implemented here yet (issue 4 builds it). This crate exists so the
//! workspace has the layout later work fills; it must not claim any behaviour.
