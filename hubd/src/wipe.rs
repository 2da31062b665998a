//! The ownership-transfer wipe (principle 11): everything the hub knows is
//! destroyed, beyond recovery, and the hub starts again as on first start,
//! with a new CA that no old device certificate chains to.
//!
//! The steps, in an order that survives a crash at any point:
//!
//! 1. A marker file `WIPE` is written durably (temp file, fsync, rename,
//!    fsync of the directory) before anything is destroyed. It records the
//!    old CA fingerprint and when the wipe started.
//! 2. The daemon sends every online device a reset command and waits for
//!    acknowledgements, then stops the edge, automation and the other
//!    subsystems ([`crate::daemon`] does this part).
//! 3. [`erase`]: the data key is crypto-erased (overwritten with random
//!    bytes, fsynced, unlinked: flash wear-levelling keeps old copies of
//!    overwritten blocks, so the sealed store must become unreadable rather
//!    than merely deleted), then the CA and server keys the same way, then
//!    every other file and directory in the state dir but the marker.
//! 4. The daemon creates a new CA and an empty store, signs the receipt with
//!    the new CA, and only then removes the marker.
//!
//! A hubd that starts and finds the marker (a crash or power cut anywhere
//! in 2 to 4) runs [`erase`] again before anything else, so the state dir
//! is never half old and half new: either the wipe has not begun (no
//! marker) or it is finished on this start.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

/// The marker's file name in the state dir.
pub const MARKER: &str = "WIPE";

/// Why a wipe step failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("wipe: {}: {source}", .path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("wipe: marker {}: {detail}", .path.display())]
    Marker { path: PathBuf, detail: String },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_owned(),
        source,
    }
}

/// What the marker records: enough for the receipt of a wipe that a crash
/// interrupted to say what it was.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Marker {
    /// RFC 3339.
    pub started_at: String,
    pub old_ca_fingerprint: String,
}

/// Writes the marker durably. After this returns, a crash at any point
/// ends in a finished wipe.
pub fn begin(state_dir: &Path, marker: &Marker) -> Result<(), Error> {
    let path = state_dir.join(MARKER);
    let tmp = state_dir.join(format!("{MARKER}.tmp"));
    let bytes = serde_json::to_vec(marker).map_err(|e| Error::Marker {
        path: path.clone(),
        detail: e.to_string(),
    })?;
    {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io_err(&tmp))?;
        f.write_all(&bytes).map_err(io_err(&tmp))?;
        f.sync_all().map_err(io_err(&tmp))?;
    }
    fs::rename(&tmp, &path).map_err(io_err(&path))?;
    sync_dir(state_dir)
}

/// The marker of an unfinished wipe, if there is one.
pub fn pending(state_dir: &Path) -> Result<Option<Marker>, Error> {
    let path = state_dir.join(MARKER);
    match fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            // A torn marker still means a wipe was asked for: finish it.
            .or_else(|_| {
                Ok(Some(Marker {
                    started_at: String::new(),
                    old_ca_fingerprint: String::new(),
                }))
            }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(Error::Io { path, source }),
    }
}

/// Removes the marker: the wipe is finished.
pub fn finish(state_dir: &Path) -> Result<(), Error> {
    let path = state_dir.join(MARKER);
    match fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(source) => return Err(Error::Io { path, source }),
    }
    sync_dir(state_dir)
}

/// The files whose destruction makes everything else unreadable or
/// worthless, relative to the state dir: overwritten before they go.
pub const SECRETS: [&str; 3] = ["keys/data.key", "ca/ca.key", "ca/server.key"];

/// Destroys everything in `state_dir` except the marker: the secrets are
/// overwritten with random bytes, fsynced and unlinked first, then every
/// other entry is removed. Safe to run again on a half-erased dir.
pub fn erase(state_dir: &Path) -> Result<(), Error> {
    for secret in SECRETS {
        crypto_erase(&state_dir.join(secret))?;
    }
    for entry in fs::read_dir(state_dir).map_err(io_err(state_dir))? {
        let entry = entry.map_err(io_err(state_dir))?;
        let path = entry.path();
        if entry.file_name() == MARKER {
            continue;
        }
        let kind = entry.file_type().map_err(io_err(&path))?;
        if kind.is_dir() {
            fs::remove_dir_all(&path).map_err(io_err(&path))?;
        } else {
            fs::remove_file(&path).map_err(io_err(&path))?;
        }
    }
    sync_dir(state_dir)
}

/// Overwrites a file with random bytes of the same length, fsyncs, and
/// unlinks it. A missing file is already erased.
fn crypto_erase(path: &Path) -> Result<(), Error> {
    let len = match fs::metadata(path) {
        Ok(m) => m.len(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(Error::Io {
                path: path.to_owned(),
                source,
            });
        }
    };
    let mut noise = vec![0u8; usize::try_from(len).unwrap_or(0).max(32)];
    SystemRandom::new()
        .fill(&mut noise)
        .map_err(|_| Error::Io {
            path: path.to_owned(),
            source: io::Error::other("the OS random number generator failed"),
        })?;
    {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(io_err(path))?;
        f.write_all(&noise).map_err(io_err(path))?;
        f.sync_all().map_err(io_err(path))?;
    }
    fs::remove_file(path).map_err(io_err(path))?;
    if let Some(dir) = path.parent() {
        sync_dir(dir)?;
    }
    Ok(())
}

fn sync_dir(dir: &Path) -> Result<(), Error> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

/// What the householder asked for.
#[derive(Debug, Clone)]
pub struct Request {
    /// How long to wait for devices to acknowledge the reset command.
    pub reset_timeout: std::time::Duration,
}

/// What a finished wipe reports; the admin API turns it into the signed
/// receipt.
#[derive(Debug, Clone)]
pub struct Report {
    pub hub: String,
    pub started_at: String,
    pub finished_at: String,
    pub old_ca_fingerprint: String,
    pub new_ca_fingerprint: String,
    pub new_ca_pem: String,
    /// The new CA's private key (PKCS#8 DER), only to sign the receipt.
    pub new_ca_key_pkcs8: Vec<u8>,
    /// Category → how many records were destroyed.
    pub destroyed: std::collections::BTreeMap<String, u64>,
    pub acknowledged: Vec<String>,
    pub not_acknowledged: Vec<String>,
}

/// A wipe asked of the daemon, with where to send the report.
#[derive(Debug)]
pub struct Job {
    pub request: Request,
    pub reply: oneshot::Sender<Result<Report, String>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn populate(dir: &Path) {
        for (file, body) in [
            ("keys/data.key", &b"0123456789abcdef0123456789abcdef"[..]),
            ("ca/ca.key", b"old ca key"),
            ("ca/server.key", b"old server key"),
            ("ca/ca.pem", b"old ca cert"),
            ("hub.redb", b"sealed store"),
        ] {
            let path = dir.join(file);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(path, body).unwrap();
        }
    }

    #[test]
    fn erase_leaves_only_the_marker_and_can_run_twice() {
        let dir = tempfile::tempdir().unwrap();
        populate(dir.path());
        let marker = Marker {
            started_at: "2026-11-22T10:00:00Z".into(),
            old_ca_fingerprint: "ab".repeat(32),
        };
        begin(dir.path(), &marker).unwrap();
        assert_eq!(pending(dir.path()).unwrap(), Some(marker.clone()));
        erase(dir.path()).unwrap();
        let left: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(left, [MARKER]);
        // A crash after a partial erase: run it again on what is left.
        populate(dir.path());
        fs::remove_file(dir.path().join("ca/ca.key")).unwrap();
        erase(dir.path()).unwrap();
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
        finish(dir.path()).unwrap();
        assert_eq!(pending(dir.path()).unwrap(), None);
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn a_torn_marker_still_means_finish_the_wipe() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(MARKER), b"{\"started").unwrap();
        assert!(pending(dir.path()).unwrap().is_some());
    }
}
