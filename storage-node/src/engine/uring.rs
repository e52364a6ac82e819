//! uring (work in progress).
