//! hubctl's man pages and shell completions, made from the same clap
//! definition that parses the command line, so they cannot drift from it.
//! `packaging/build-deb.sh` runs `hubctl-docs DIR` (src/bin/hubctl-docs.rs)
//! and the Debian package ships what it writes.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use clap::CommandFactory;
use clap_complete::Shell;

use crate::Error;
use crate::cli::Cli;

/// The completion scripts: shell, and the file name each shell looks for.
const COMPLETIONS: [(Shell, &str); 3] = [
    (Shell::Bash, "bash/hubctl"),
    (Shell::Zsh, "zsh/_hubctl"),
    (Shell::Fish, "fish/hubctl.fish"),
];

/// Writes hubctl's man pages (`man/hubctl.1` and one page per subcommand,
/// such as `man/hubctl-devices-list.1`) and its completion scripts
/// (`bash/hubctl`, `zsh/_hubctl`, `fish/hubctl.fish`) under `dir`, and
/// returns the files written, sorted.
pub fn write(dir: &Path) -> Result<Vec<PathBuf>, Error> {
    let what = "writing the docs";
    let file_err = |path: &Path| {
        let path = path.to_owned();
        move |source| Error::File {
            what: what.to_owned(),
            path,
            source,
        }
    };
    let mut cmd = Cli::command();

    // Before `build`, which would add a `help` subcommand (and a page for
    // each `hubctl help ...`) that `--help` already covers.
    let man = dir.join("man");
    fs::create_dir_all(&man).map_err(file_err(&man))?;
    clap_mangen::generate_to(cmd.clone(), &man).map_err(file_err(&man))?;

    for (shell, name) in COMPLETIONS {
        let path = dir.join(name);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).map_err(file_err(parent))?;
        }
        let mut script = Vec::new();
        clap_complete::generate(shell, &mut cmd, "hubctl", &mut script);
        fs::File::create(&path)
            .and_then(|mut f| f.write_all(&script))
            .map_err(file_err(&path))?;
    }

    let mut written = Vec::new();
    for sub in ["man", "bash", "zsh", "fish"] {
        let sub = dir.join(sub);
        for entry in fs::read_dir(&sub).map_err(file_err(&sub))? {
            written.push(entry.map_err(file_err(&sub))?.path());
        }
    }
    written.sort();
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_and_completions_cover_the_commands() {
        let dir = tempfile::tempdir().expect("tempdir");
        let written = write(dir.path()).expect("writes");
        let names: Vec<String> = written
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        for page in [
            "hubctl.1",
            "hubctl-about.1",
            "hubctl-status.1",
            "hubctl-devices.1",
            "hubctl-devices-list.1",
            "hubctl-pair.1",
            "hubctl",
            "_hubctl",
            "hubctl.fish",
        ] {
            assert!(names.iter().any(|n| n == page), "{page} not in {names:?}");
        }
        assert!(
            !names.iter().any(|n| n.contains("-help")),
            "`hubctl help` got pages: {names:?}"
        );
        let top = fs::read_to_string(dir.path().join("man/hubctl.1")).expect("hubctl.1");
        assert!(top.starts_with(".ie"), "not roff: {top:.40}");
        assert!(top.contains("pair"), "the page lists the subcommands");
        let bash = fs::read_to_string(dir.path().join("bash/hubctl")).expect("bash");
        assert!(bash.contains("complete -F"), "{bash:.200}");
        assert!(bash.contains("isolate") && bash.contains("about"));
    }
}
