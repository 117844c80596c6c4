//! The CSI driver: Identity, Controller and Node services over node-local
//! volume backends.
//!
//! Nothing is implemented here yet (issue 5 builds it). This crate exists so the
//! workspace has the layout later work fills; it must not claim any behaviour.
