//! The `keyturn` binary.

/// mimalloc instead of glibc's malloc: the write path makes a dozen small
/// allocations a request, and glibc's were about 3.5% of the machine's CPU
/// on 4 KiB random writes (`malloc_consolidate` among them, from freeing
/// the 4 KiB payload buffers). See docs/benchmarks.md.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    keyturn::cli::main()
}
