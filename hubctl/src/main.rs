//! The `hubctl` binary: hands the real arguments and streams to [`hubctl::run`].

use std::process::ExitCode;

fn main() -> ExitCode {
    let mut stdout = std::io::stdout().lock();
    let mut stderr = std::io::stderr().lock();
    ExitCode::from(hubctl::run(std::env::args_os(), &mut stdout, &mut stderr))
}
