//! What the binaries (`verify`, `resnet-bench`) ask of their allocator,
//! mimalloc (each declares it `#[global_allocator]`; the Python module
//! keeps the host's).

/// mimalloc's `mi_option_purge_delay`, its place in mimalloc.h's option
/// enum (v2 and v3 alike): libmimalloc-sys 0.1 names no constant for it.
const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Keeps freed memory for reuse rather than returning it to the system
/// 10 ms later (mimalloc's default): verify frees each stage's arrays and
/// allocates the next ones, and memory returned is faulted back in and
/// zeroed by the kernel, page by page. verify on a ResNet50 dump: 0.25-0.27
/// s with the default, 0.21-0.23 s with this. All of it goes back when the
/// process exits.
pub fn keep_freed_memory() {
    // SAFETY: sets one of mimalloc's options; any value is allowed (-1:
    // never purge).
    unsafe { libmimalloc_sys::mi_option_set(PURGE_DELAY, -1) }
}

/// Turns transparent huge pages off for this process. mimalloc asks for
/// them (MADV_HUGEPAGE) wherever the system leaves the choice to the
/// program, and a 2 MB page first touched after the machine has been idle
/// a few seconds can cost the kernel far more than 512 small ones: verify
/// on a ResNet50 dump took 0.66-0.72 s (0.6 s of it in the kernel) when
/// run 15 s after the last run, against 0.24-0.29 s with small pages.
/// Back to back, huge pages are faster (0.14 s against 0.21 s), but one
/// verify after other work is the common case. The long-running benchmark
/// keeps them: its passes reuse their memory, and read weights through
/// fewer TLB entries (3% faster at one thread).
pub fn without_huge_pages() {
    #[cfg(target_os = "linux")]
    // SAFETY: PR_SET_THP_DISABLE takes a flag and three zeros, each read
    // as an unsigned long; it only changes how this process's later page
    // faults are served. (Were it refused, verify would only be slower.)
    unsafe {
        let (on, zero): (libc::c_ulong, libc::c_ulong) = (1, 0);
        libc::prctl(libc::PR_SET_THP_DISABLE, on, zero, zero, zero);
    }
}
