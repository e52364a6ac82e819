//! slate (work in progress).
