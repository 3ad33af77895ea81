//! `ferry` with the test hooks of `FERRY_FAILPOINTS` installed ([`ferry_tests::hooks`]):
//! what end-to-end tests run when they crash, stall or unfence a step. The shipped
//! `ferry` installs none.

fn main() -> std::process::ExitCode {
    ferry_tests::hooks::install_from_env();
    ferry_cli::run()
}
