//! `paheko-push`: parses nothing itself; see the library's `main_with`.

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match paheko_push::main_with(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("paheko-push: {e}");
            ExitCode::from(e.code())
        }
    }
}
