//! The `shoal` binary; everything lives in the library ([`shoal::cli`]).

/// mimalloc: the ingest paths allocate many small buffers per record; glibc malloc spent a
/// fifth of the CPU of a bulk ingest in malloc, free and consolidation (perf).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    shoal::cli::main()
}
