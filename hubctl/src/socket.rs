//! Where hubd's admin socket is when neither `--socket` nor `$HUBD_SOCKET` says.
//!
//! The order mirrors the one hubd uses to place the socket, so a plain
//! `hubctl status` finds a hubd started by systemd and one started by hand.

use std::ffi::OsString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// The socket of the packaged, systemd-managed hubd (`RuntimeDirectory=hubd`).
pub(crate) const SYSTEM_SOCKET: &str = "/run/hubd/hubd.sock";

/// The socket's file name inside whichever directory is chosen.
const SOCKET_NAME: &str = "hubd.sock";

/// Picks the default admin socket path.
///
/// In order: `$RUNTIME_DIRECTORY/hubd.sock` (we run under systemd), then
/// [`SYSTEM_SOCKET`] if it exists (or `exists` cannot tell, as for a user
/// outside the admin group, whom its directory keeps out), then `$XDG_RUNTIME_DIR/hubd/hubd.sock`,
/// then `$XDG_DATA_HOME/hubd/hubd.sock`, then `~/.local/share/hubd/hubd.sock`.
/// With none of those variables set it falls back to [`SYSTEM_SOCKET`], so the
/// "cannot reach" message names the place a packaged hubd would be.
///
/// `env` and `exists` are injected so that tests do not depend on the host.
pub(crate) fn default_path(
    env: &dyn Fn(&str) -> Option<OsString>,
    exists: &dyn Fn(&Path) -> bool,
) -> PathBuf {
    // Empty values count as unset, as a shell user would expect.
    let var = |name: &str| env(name).filter(|v| !v.is_empty());
    // The XDG base-directory spec says relative paths are invalid and must be ignored.
    let absolute = |name: &str| var(name).map(PathBuf::from).filter(|p| p.is_absolute());

    if let Some(dirs) = var("RUNTIME_DIRECTORY") {
        // systemd joins several RuntimeDirectory= entries with ':'; hubd uses the first.
        let first = dirs
            .as_bytes()
            .split(|b| *b == b':')
            .next()
            .unwrap_or_default();
        if !first.is_empty() {
            return Path::new(std::ffi::OsStr::from_bytes(first)).join(SOCKET_NAME);
        }
    }
    let system = Path::new(SYSTEM_SOCKET);
    if exists(system) {
        return system.to_path_buf();
    }
    if let Some(dir) = absolute("XDG_RUNTIME_DIR") {
        return dir.join("hubd").join(SOCKET_NAME);
    }
    if let Some(dir) = absolute("XDG_DATA_HOME") {
        return dir.join("hubd").join(SOCKET_NAME);
    }
    if let Some(home) = absolute("HOME") {
        return home.join(".local/share/hubd").join(SOCKET_NAME);
    }
    system.to_path_buf()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path_with(vars: &[(&str, &str)], system_exists: bool) -> PathBuf {
        let env = |name: &str| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| OsString::from(v))
        };
        default_path(&env, &|_| system_exists)
    }

    #[test]
    fn runtime_directory_wins() {
        let all = [
            ("RUNTIME_DIRECTORY", "/run/hubd:/run/other"),
            ("XDG_RUNTIME_DIR", "/run/user/1000"),
            ("HOME", "/home/a"),
        ];
        assert_eq!(path_with(&all, true), Path::new("/run/hubd/hubd.sock"));
        let one = [("RUNTIME_DIRECTORY", "/tmp/rd")];
        assert_eq!(path_with(&one, true), Path::new("/tmp/rd/hubd.sock"));
    }

    #[test]
    fn system_socket_beats_user_dirs_when_it_exists() {
        let vars = [("XDG_RUNTIME_DIR", "/run/user/1000"), ("HOME", "/home/a")];
        assert_eq!(path_with(&vars, true), Path::new(SYSTEM_SOCKET));
        assert_eq!(
            path_with(&vars, false),
            Path::new("/run/user/1000/hubd/hubd.sock")
        );
    }

    #[test]
    fn user_fallbacks_in_order() {
        let vars = [("XDG_DATA_HOME", "/d"), ("HOME", "/home/a")];
        assert_eq!(path_with(&vars, false), Path::new("/d/hubd/hubd.sock"));
        let vars = [("XDG_DATA_HOME", "relative"), ("HOME", "/home/a")];
        assert_eq!(
            path_with(&vars, false),
            Path::new("/home/a/.local/share/hubd/hubd.sock")
        );
        let vars = [("RUNTIME_DIRECTORY", ""), ("XDG_RUNTIME_DIR", "")];
        assert_eq!(path_with(&vars, false), Path::new(SYSTEM_SOCKET));
    }
}
