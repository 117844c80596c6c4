//! The manifests-directory source (standalone mode). (Being written.)
