//! hubd: a local-first smart-home hub. See `ARCHITECTURE.md` beside this crate
//! for the bird's-eye view, the code map and the layer rule.
//!
//! The binary (`main.rs`) parses arguments, binds the sockets and calls
//! [`run`]; the tests call the same [`run`] on port 0 and temp dirs.

// Layer 0: pure types and policy, and the hub's idea of the time.
pub mod acl;
pub mod bus;
pub mod clock;
pub mod config;
pub mod model;
// Layer 1: persistence and the CA.
pub mod ca;
pub mod store;
// Layer 2: devices, the pure pairing-window state machine, and the
// hash-chained security log.
pub mod pairing;
pub mod registry;
pub mod seclog;
pub mod telemetry;
// Layer 3: the network edge.
pub mod edge;
// Layer 3 too: the rules engine, and firmware, support periods and updates.
pub mod automation;
pub mod lifecycle;
// Layer 3: the ownership-transfer wipe's file steps and marker.
pub mod wipe;
// Layer 4: the admin API, the only module that knows protobuf.
pub mod api;
// Layer 5: composition and the service manager.
pub mod daemon;
pub mod systemd;

pub use api::bind_admin_socket;
pub use config::Config;
pub use daemon::{Listeners, bind_mqtt, run};
