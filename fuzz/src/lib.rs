//! Shared by the fuzz targets: an allocator that refuses any single
//! allocation beyond [`MAX_ALLOC`] (so a decoder that trusts a length
//! field crashes the run instead of quietly reserving gigabytes that the
//! kernel hands out lazily), and scratch files for the decoders that read
//! from a path.

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// Largest single allocation a decoder may make for one fuzz input. The
/// inputs are at most 64 KiB (`-max_len` in tools/fuzz.sh); the NBD session
/// target's buffers are at most 1 MiB (its export).
pub const MAX_ALLOC: usize = 16 << 20;

struct Bounded;

// SAFETY: forwards to the system allocator unchanged; only refuses sizes.
unsafe impl GlobalAlloc for Bounded {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        check(layout.size());
        // SAFETY: the caller's contract is passed on as is.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        check(layout.size());
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        check(new_size);
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

fn check(size: usize) {
    if size > MAX_ALLOC {
        // No formatting (it would allocate): a fixed message, then abort,
        // which libFuzzer records as a crash with this input.
        use std::io::Write;
        let _ = std::io::stderr().write_all(
            b"keyturn-fuzz: one allocation over MAX_ALLOC (an unchecked length field?)\n",
        );
        std::process::abort();
    }
}

#[global_allocator]
static ALLOC: Bounded = Bounded;

/// A directory of this process for the decoders that read files.
pub fn scratch() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("keyturn-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("scratch directory");
        dir
    })
}

/// Writes `bytes` to `name` in the scratch directory (replacing it) and
/// returns its path.
pub fn file(name: &str, bytes: &[u8]) -> PathBuf {
    let path = scratch().join(name);
    std::fs::write(&path, bytes).expect("scratch file");
    path
}

/// Removes `name` from the scratch directory, if it is there.
pub fn remove(name: &str) {
    let _ = std::fs::remove_file(scratch().join(name));
}
