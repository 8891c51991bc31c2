//! The `shoal` binary; everything lives in the library ([`shoal::cli`]).

fn main() -> std::process::ExitCode {
    shoal::cli::main()
}
