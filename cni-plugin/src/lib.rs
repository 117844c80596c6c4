//! nodeplane-cni (work in progress)
