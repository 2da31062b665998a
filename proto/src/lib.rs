//! `hub-proto`: the hubd admin API (gRPC package `hub.v1`) and the Unix-socket
//! connector shared by `hubctl` and the tests.
//!
//! Only `hubd::api` on the daemon side may use these types: the rest of the
//! daemon speaks its own domain types.

use std::path::{Path, PathBuf};

use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint};

/// Generated messages and services of package `hub.v1`.
pub mod v1 {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("hub.v1");
}

/// Wipe receipts: signing them on the hub and checking them offline.
pub mod receipt;

/// The version of the admin API this crate speaks; `Status` reports the daemon's.
pub const PROTOCOL_VERSION: u32 = 1;

/// Opens a gRPC channel to hubd's admin socket at `path`.
///
/// The connection is made eagerly, so a missing or refusing socket is reported
/// here rather than on the first call.
pub async fn connect(path: impl AsRef<Path>) -> Result<Channel, tonic::transport::Error> {
    let path: PathBuf = path.as_ref().to_path_buf();
    // The URI is required by the API but never resolved: the connector ignores it.
    Endpoint::from_static("http://hubd.invalid")
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?)) }
        }))
        .await
}

/// An admin client on the socket at `path`.
pub async fn admin_client(
    path: impl AsRef<Path>,
) -> Result<v1::admin_client::AdminClient<Channel>, tonic::transport::Error> {
    Ok(v1::admin_client::AdminClient::new(connect(path).await?))
}
