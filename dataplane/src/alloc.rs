//! Large data-path buffers stay in the allocator's heap.
//!
//! A 1 MiB write passes through several buffers of its size (the NBD payload,
//! the ciphertext, the frame, the engine's aligned copy). glibc serves blocks
//! above its mmap threshold with a fresh mmap and returns them with munmap, so
//! every such buffer cost page faults, zeroing of fresh pages and a TLB
//! shootdown: about a quarter of a 1 MiB write's CPU in a profile. Raising the
//! thresholds keeps freed buffers in the heap for the next request.

/// Every block up to 32 MiB (glibc's largest mmap threshold) comes from the heap;
/// the heap is trimmed back only when 64 MiB at its top are free.
#[allow(unsafe_code)]
pub fn keep_large_buffers_in_heap() {
    // SAFETY: mallopt only sets glibc allocator parameters; it takes plain integers and
    // is called at process start, before any other thread allocates.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 64 << 20);
    }
}
