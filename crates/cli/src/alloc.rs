//! The process allocator: mimalloc, told to keep freed memory mapped and committed.
//!
//! Every candle op allocates its output afresh. With glibc's allocator the large tensors of a
//! DeepLab forward pass (tens of MB each) are `mmap`ed and unmapped per op, so each pass pays
//! hundreds of thousands of page faults (Xception-65 at 513x513: ~400k per forward, a quarter
//! of the run time on 2 cores). mimalloc with purging disabled and eagerly committed arenas
//! reuses the same pages from op to op: the page faults drop to a few hundred per pass. The
//! memory a pass needed stays mapped until the process exits (peak RSS is unchanged).

/// The allocator type the `deeplab` binary installs as `#[global_allocator]`.
pub type Allocator = mimalloc::MiMalloc;

// Option indices of mimalloc's `mi_option_t` (mimalloc v3 as vendored by libmimalloc-sys
// 0.1.49, pinned in the workspace manifest); `configure` checks their documented defaults
// before changing anything.
const MI_OPTION_ARENA_EAGER_COMMIT: libmimalloc_sys::mi_option_t = 4;
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Disables purging (freed pages stay committed for reuse) and commits arenas eagerly.
/// Returns whether the options were set (false if the linked mimalloc does not have the
/// expected option table, in which case nothing is changed). `DEEPLAB_ALLOC_PURGE=1` keeps
/// mimalloc's defaults, for comparisons.
pub fn configure() -> bool {
    if std::env::var_os("DEEPLAB_ALLOC_PURGE").is_some() {
        return false;
    }
    // SAFETY: plain FFI calls reading and setting mimalloc's global option table; any
    // option value is valid for these two options.
    unsafe {
        use libmimalloc_sys::{mi_option_get, mi_option_set};
        // defaults (v3 `options.c`): purge_delay 1000 ms, arena_eager_commit 2 (= on
        // overcommit systems; reads back as 0 or 1 once resolved)
        if mi_option_get(MI_OPTION_PURGE_DELAY) != 1000
            || !(0..=2).contains(&mi_option_get(MI_OPTION_ARENA_EAGER_COMMIT))
        {
            return false;
        }
        mi_option_set(MI_OPTION_PURGE_DELAY, -1);
        mi_option_set(MI_OPTION_ARENA_EAGER_COMMIT, 1);
    }
    true
}

#[cfg(test)]
mod tests {
    #[test]
    fn options_have_the_expected_defaults() {
        // The test binary uses the system allocator, but the option table is mimalloc's own
        // and its defaults identify the option indices.
        // SAFETY: reading mimalloc's option table.
        let (purge, eager) = unsafe {
            (
                libmimalloc_sys::mi_option_get(super::MI_OPTION_PURGE_DELAY),
                libmimalloc_sys::mi_option_get(super::MI_OPTION_ARENA_EAGER_COMMIT),
            )
        };
        assert_eq!(purge, 1000, "purge_delay index moved");
        assert!(
            (0..=2).contains(&eager),
            "arena_eager_commit index moved: {eager}"
        );
    }
}
