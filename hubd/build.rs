//! Records when hubd was built (or `SOURCE_DATE_EPOCH`, for reproducible
//! builds): the hub's clock can never truly be earlier than that, which lets
//! a Raspberry Pi without a real-time clock tell that its time is not set.

use std::time::{SystemTime, UNIX_EPOCH};

fn main() {
    println!("cargo:rerun-if-env-changed=SOURCE_DATE_EPOCH");
    let built = std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0)
        });
    println!("cargo:rustc-env=HUBD_BUILD_UNIX={built}");
}
