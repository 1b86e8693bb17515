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
