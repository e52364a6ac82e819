//! slate-meta (work in progress).
