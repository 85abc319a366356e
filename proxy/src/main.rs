//! `fanout-proxy`: see the library for the layout.

// mimalloc: the data path allocates and frees small buffers per call; glibc's malloc spent
// about 7 % of the proxy's CPU on them, mimalloc less (see `make bench`).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    fanout_proxy::cli::main()
}
