//! The Kubernetes API source: kube-rs watches of Pods, Namespaces,
//! NetworkPolicies and this Node, turned into [`super::Event`]s.
//! (Being written: see issue 3.)
