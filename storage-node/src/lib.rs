//! slate-node (work in progress).
