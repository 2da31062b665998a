//! `hubctl-docs DIR`: writes hubctl's man pages and shell completions under
//! DIR, made from hubctl's own command-line definition. For packagers:
//! `packaging/build-deb.sh` runs it; the Debian package ships what it
//! writes, and this program itself is not installed.

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let mut args = std::env::args_os().skip(1);
    let (Some(dir), None) = (args.next(), args.next()) else {
        eprintln!("usage: hubctl-docs DIR");
        return ExitCode::from(2);
    };
    match hubctl::write_docs(&PathBuf::from(dir)) {
        Ok(written) => {
            for path in written {
                println!("{}", path.display());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("hubctl-docs: {e}");
            ExitCode::FAILURE
        }
    }
}
