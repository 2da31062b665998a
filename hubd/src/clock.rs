//! Time without a real-time clock.
//!
//! A Raspberry Pi has no battery-backed clock: until NTP (or fake-hwclock)
//! sets it, the system time may be years in the past. hubd cannot know the
//! true time then, but it knows a lower bound: the moment it was built. So
//! "now" for certificates is never earlier than the build time, which keeps
//! certificates from being refused as "not yet valid" and keeps new ones
//! from being issued already expired; and status says the clock is behind
//! until it catches up, which it does by itself.

use time::OffsetDateTime;

/// Seconds since the epoch when this hubd was built (see build.rs).
const BUILD_UNIX: &str = env!("HUBD_BUILD_UNIX");

/// When this hubd was built: the earliest the true time can be.
pub fn build_time() -> OffsetDateTime {
    BUILD_UNIX
        .parse::<i64>()
        .ok()
        .and_then(|secs| OffsetDateTime::from_unix_timestamp(secs).ok())
        .unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

/// The time to use for certificates: the system time, but never earlier
/// than the build time.
pub fn trusted_now() -> OffsetDateTime {
    OffsetDateTime::now_utc().max(build_time())
}

/// What is wrong with the system clock now, if anything.
pub fn warning() -> Option<String> {
    warning_at(OffsetDateTime::now_utc(), build_time())
}

/// What is wrong with a clock reading `now` for a hubd built at `built`.
pub fn warning_at(now: OffsetDateTime, built: OffsetDateTime) -> Option<String> {
    (now < built).then(|| {
        format!(
            "the system clock reads {} UTC, before this hubd was built ({} UTC): \
             it has probably not been set yet (no real-time clock, no network time); \
             certificates are checked against the build date until it is",
            now.date(),
            built.date()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_clock_before_the_build_is_reported_and_one_after_is_not() {
        let built = OffsetDateTime::from_unix_timestamp(1_790_000_000).unwrap();
        let early = OffsetDateTime::UNIX_EPOCH;
        let warning = warning_at(early, built).unwrap();
        assert!(
            warning.contains("1970-01-01") && warning.contains("not been set"),
            "{warning}"
        );
        assert_eq!(warning_at(built + time::Duration::seconds(1), built), None);
    }

    #[test]
    fn trusted_now_is_never_before_the_build() {
        assert!(trusted_now() >= build_time());
        assert!(
            build_time() > OffsetDateTime::UNIX_EPOCH,
            "build.rs set the build time"
        );
    }
}
