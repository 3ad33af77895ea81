//! The shipped `ferry` command (no test hooks installed).

fn main() -> std::process::ExitCode {
    ferry_cli::run()
}
