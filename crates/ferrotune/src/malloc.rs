//! glibc allocator settings for a long-running process (training, a server): set once, first
//! thing in `main`, before any thread starts (the CLI does).
//!
//! A forward or training step allocates and frees buffers of megabytes. By default glibc
//! gives such buffers back to the OS when they are freed (`mmap`/`munmap`, heap trimming)
//! and the next step page-faults them in again, zero-filled: about 15% of a candle
//! training step (docs/DESIGN-NOTES.md, "Allocator"). And each thread other than the main
//! one gets an arena of its own, built of 64 MiB heaps that glibc creates and unmaps as a
//! batch's buffers come and go: the server's inference worker page-faulted 40,000-110,000
//! times a second that way (issue 17, BBC News int8 under `bench/serve-load`). A thread
//! that allocated before the call keeps its arena: hence first thing in `main`.
//! Elsewhere than glibc on Linux this does nothing.

/// Keeps freed memory in the process: buffers up to 32 MiB (glibc's most) come from the
/// heap, the heap is not trimmed below 1 GiB of free space, and every thread allocates from
/// the one main arena. Returns whether the settings were applied (glibc on Linux).
pub fn keep_freed_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // Safety: mallopt takes no pointers and only changes the allocator's parameters
        // (under its own lock); calling it early is for its effect, not for safety.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 32 * 1024 * 1024) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30) == 1
                && libc::mallopt(libc::M_ARENA_MAX, 1) == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}
