//! The `keyturn` binary.

fn main() -> std::process::ExitCode {
    keyturn::cli::main()
}
