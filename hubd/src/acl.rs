//! The topic ACL: who may publish to which topic and subscribe to which filter,
//! and the syntax checks every topic and filter must pass first.
//!
//! This module is pure: no I/O, no clocks, no locks. The edge calls
//! [`check_publish`] and [`check_subscribe`] on every PUBLISH and SUBSCRIBE
//! before anything reaches the router, and tests can exercise the whole policy
//! without a network. The table it implements is DESIGN.md's "Topics and ACL".

use crate::model::{DeviceId, Grants};

/// The rights a connected principal has, chosen when its session starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// A paired device: its own `d/<id>/...` topics and the hub broadcast.
    Device(DeviceId),
    /// A device cut off from commands: it may report state and metadata and
    /// hear only its own isolation notice.
    Isolated(DeviceId),
    /// An integration (Home Assistant, Node-RED): exactly the filters granted
    /// at pairing or since, and never a command to an isolated device.
    Integration(DeviceId, Grants),
    /// The hub itself (automations, the admin API): anything.
    Hub,
}

/// Limits on the shape of topics and filters, from `[edge]` in the config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TopicLimits {
    /// Longest topic or filter in bytes.
    pub max_len: usize,
    /// Most `/`-separated levels.
    pub max_depth: usize,
}

/// Why a topic name or filter is malformed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TopicError {
    #[error("topic is empty")]
    Empty,
    #[error("topic is {len} bytes, more than the limit of {max}")]
    TooLong { len: usize, max: usize },
    #[error("topic has {depth} levels, more than the limit of {max}")]
    TooDeep { depth: usize, max: usize },
    #[error("topic name contains a wildcard ('+' or '#')")]
    WildcardInName,
    #[error("topic contains a NUL character")]
    Nul,
    #[error("topic contains a control character")]
    Control,
    #[error("'#' must be the last level of a filter, alone in its level")]
    BadMultiLevelWildcard,
    #[error("'+' must stand alone in its level")]
    BadSingleLevelWildcard,
}

/// Checks a topic name as it appears in a PUBLISH (UTF-8 is guaranteed by `&str`).
pub fn validate_topic(topic: &str, limits: TopicLimits) -> Result<(), TopicError> {
    check_common(topic, limits)?;
    if topic.contains(['+', '#']) {
        return Err(TopicError::WildcardInName);
    }
    Ok(())
}

/// Checks a topic filter as it appears in a SUBSCRIBE.
pub fn validate_filter(filter: &str, limits: TopicLimits) -> Result<(), TopicError> {
    check_common(filter, limits)?;
    let levels: Vec<&str> = filter.split('/').collect();
    for (i, level) in levels.iter().enumerate() {
        if level.contains('#') && (*level != "#" || i != levels.len() - 1) {
            return Err(TopicError::BadMultiLevelWildcard);
        }
        if level.contains('+') && *level != "+" {
            return Err(TopicError::BadSingleLevelWildcard);
        }
    }
    Ok(())
}

fn check_common(s: &str, limits: TopicLimits) -> Result<(), TopicError> {
    if s.is_empty() {
        return Err(TopicError::Empty);
    }
    if s.len() > limits.max_len {
        return Err(TopicError::TooLong {
            len: s.len(),
            max: limits.max_len,
        });
    }
    let depth = s.split('/').count();
    if depth > limits.max_depth {
        return Err(TopicError::TooDeep {
            depth,
            max: limits.max_depth,
        });
    }
    if s.contains('\0') {
        return Err(TopicError::Nul);
    }
    // MQTT says topics SHOULD NOT hold control characters; refusing them also
    // frees U+0001 for the edge's internal `$` escape.
    if s.chars().any(char::is_control) {
        return Err(TopicError::Control);
    }
    Ok(())
}

/// May `who` publish to `topic`? The topic must already have passed
/// [`validate_topic`]. `is_isolated` says whether a device id is isolated:
/// commands to such a device are refused to integrations. (The hub's own
/// commands are checked with [`command_target`] by whoever sends them.)
pub fn check_publish(who: &Principal, topic: &str, is_isolated: &dyn Fn(&str) -> bool) -> bool {
    match who {
        Principal::Hub => true,
        Principal::Device(id) => {
            let Some(rest) = own_suffix(id, topic) else {
                return false;
            };
            rest == "state"
                || rest == "meta"
                || rest == "cert/csr"
                || rest == "update/get"
                || rest == "update/result"
                || under(rest, "event")
                || under(rest, "ack")
        }
        Principal::Isolated(id) => {
            matches!(own_suffix(id, topic), Some("state") | Some("meta"))
        }
        Principal::Integration(_, grants) => {
            grants.publish.iter().any(|g| topic_matches(g, topic))
                && !command_target(topic).is_some_and(is_isolated)
        }
    }
}

/// The device a topic commands (`d/<id>/cmd/...`), if it is a command.
pub fn command_target(topic: &str) -> Option<&str> {
    let rest = topic.strip_prefix("d/")?;
    let (id, rest) = rest.split_once('/')?;
    under(rest, "cmd").then_some(id)
}

/// Does the MQTT filter match the topic? (`#` and `+` at the first level do
/// not match topics starting with `$`, as MQTT says.)
pub fn topic_matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && filter.starts_with(['+', '#']) {
        return false;
    }
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(fl), Some(tl)) if fl == tl => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Is every topic that `filter` matches also matched by `grant`?
pub fn filter_covered(grant: &str, filter: &str) -> bool {
    if filter.starts_with('$') && grant.starts_with(['+', '#']) {
        return false;
    }
    let mut g = grant.split('/');
    let mut f = filter.split('/');
    loop {
        match (g.next(), f.next()) {
            (Some("#"), _) => return true,
            // The filter stopped short of a literal or `+` level. (`a/#`
            // covering `a` is the first arm.)
            (Some(_), None) => return false,
            (None, Some(_)) => return false,
            (None, None) => return true,
            (Some(_), Some("#")) => return false,
            (Some("+"), Some(_)) => {}
            (Some(gl), Some(fl)) if gl == fl && fl != "+" => {}
            _ => return false,
        }
    }
}

/// May `who` subscribe to `filter`? The filter must already have passed
/// [`validate_filter`]. A filter is allowed only if every topic it could match
/// is one the principal may read, so `d/+/cmd/#` is refused to a device even
/// though it matches the device's own commands.
pub fn check_subscribe(who: &Principal, filter: &str) -> bool {
    match who {
        Principal::Hub => true,
        Principal::Device(id) => {
            filter_within(filter, &["d", id.as_str(), "cmd"])
                || filter_within(filter, &["d", id.as_str(), "ota"])
                || filter_within(filter, &["$hub", "broadcast"])
                || filter == format!("d/{id}/cert/new")
        }
        Principal::Isolated(id) => filter == format!("$hub/isolation/{id}"),
        Principal::Integration(_, grants) => {
            grants.subscribe.iter().any(|g| filter_covered(g, filter))
        }
    }
}

/// The part of `topic` after `d/<id>/`, if the topic is in the device's namespace.
pub fn own_suffix<'t>(id: &DeviceId, topic: &'t str) -> Option<&'t str> {
    topic
        .strip_prefix("d/")?
        .strip_prefix(id.as_str())?
        .strip_prefix('/')
}

/// Does `topic` equal `base` or lie below it (MQTT's `base/#`)?
fn under(topic: &str, base: &str) -> bool {
    topic == base
        || topic
            .strip_prefix(base)
            .is_some_and(|rest| rest.starts_with('/'))
}

/// Is every topic matched by `filter` also matched by `prefix/#`? True when the
/// filter's first levels equal the prefix literally (no wildcard there).
fn filter_within(filter: &str, prefix: &[&str]) -> bool {
    let mut levels = filter.split('/');
    for want in prefix {
        match levels.next() {
            Some(level) if level == *want => {}
            _ => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: TopicLimits = TopicLimits {
        max_len: 256,
        max_depth: 16,
    };

    fn dev(s: &str) -> Principal {
        Principal::Device(DeviceId::parse(s).unwrap())
    }

    #[test]
    fn device_publishes_only_its_own_topics() {
        let a = dev("a");
        for ok in [
            "d/a/state",
            "d/a/meta",
            "d/a/event",
            "d/a/event/button",
            "d/a/event/x/y",
            "d/a/ack/1",
        ] {
            assert!(check_publish(&a, ok, &|_| false), "{ok} refused");
        }
        for bad in [
            "d/b/state",
            "d/ab/state",
            "d/a/cmd/x",
            "d/a/ota/offer",
            "d/a/statex",
            "d/a/eventx",
            "d/a",
            "$hub/broadcast/x",
            "$SYS/x",
            "x/d/a/state",
        ] {
            assert!(!check_publish(&a, bad, &|_| false), "{bad} allowed");
        }
    }

    #[test]
    fn device_subscribes_only_to_its_commands_ota_and_broadcast() {
        let a = dev("a");
        for ok in [
            "d/a/cmd/#",
            "d/a/cmd/+",
            "d/a/cmd/light/on",
            "d/a/cmd",
            "d/a/ota/#",
            "$hub/broadcast/#",
            "$hub/broadcast/+/x",
        ] {
            assert!(check_subscribe(&a, ok), "{ok} refused");
        }
        for bad in [
            "d/b/#",
            "d/b/cmd/#",
            "#",
            "+/+/+",
            "$SYS/#",
            "d/+/state",
            "d/+/cmd/#",
            "d/a/#",
            "d/a/+/x",
            "d/a/state",
            "$hub/#",
            "$hub/isolation/a",
            "$share/g/d/a/cmd/#",
        ] {
            assert!(!check_subscribe(&a, bad), "{bad} allowed");
        }
    }

    #[test]
    fn isolated_device_keeps_only_the_alerting_channel() {
        let a = Principal::Isolated(DeviceId::parse("a").unwrap());
        assert!(check_publish(&a, "d/a/state", &|_| false));
        assert!(check_publish(&a, "d/a/meta", &|_| false));
        assert!(!check_publish(&a, "d/a/event/x", &|_| false));
        assert!(check_subscribe(&a, "$hub/isolation/a"));
        assert!(!check_subscribe(&a, "d/a/cmd/#"));
        assert!(!check_subscribe(&a, "$hub/isolation/+"));
    }

    #[test]
    fn hub_may_do_anything() {
        assert!(check_publish(&Principal::Hub, "d/a/cmd/x", &|_| false));
        assert!(check_subscribe(&Principal::Hub, "#"));
    }

    #[test]
    fn renewal_topics_belong_to_the_device() {
        let a = dev("a");
        assert!(check_publish(&a, "d/a/cert/csr", &|_| false));
        assert!(!check_publish(&a, "d/b/cert/csr", &|_| false));
        assert!(!check_publish(&a, "d/a/cert/new", &|_| false));
        assert!(check_subscribe(&a, "d/a/cert/new"));
        assert!(!check_subscribe(&a, "d/a/cert/#"));
        assert!(!check_subscribe(&a, "d/b/cert/new"));
        let isolated = Principal::Isolated(DeviceId::parse("a").unwrap());
        assert!(!check_publish(&isolated, "d/a/cert/csr", &|_| false));
    }

    #[test]
    fn update_topics_belong_to_the_device_and_not_to_an_isolated_one() {
        let a = dev("a");
        for t in ["d/a/update/get", "d/a/update/result"] {
            assert!(check_publish(&a, t, &|_| false), "{t}");
        }
        assert!(!check_publish(&a, "d/a/update/other", &|_| false));
        assert!(!check_publish(&a, "d/b/update/get", &|_| false));
        assert!(!check_publish(&a, "d/a/ota/offer", &|_| false));
        assert!(check_subscribe(&a, "d/a/ota/#"));
        assert!(!check_subscribe(&a, "d/a/update/#"));
        let isolated = Principal::Isolated(DeviceId::parse("a").unwrap());
        assert!(!check_publish(&isolated, "d/a/update/result", &|_| false));
        assert!(!check_subscribe(&isolated, "d/a/ota/#"));
    }

    fn integration(publish: &[&str], subscribe: &[&str]) -> Principal {
        Principal::Integration(
            DeviceId::parse("ha").unwrap(),
            Grants {
                publish: publish.iter().map(|s| s.to_string()).collect(),
                subscribe: subscribe.iter().map(|s| s.to_string()).collect(),
            },
        )
    }

    #[test]
    fn integrations_get_exactly_their_grants() {
        let ha = integration(&["d/+/cmd/#"], &["d/+/state", "d/kitchen/#"]);
        let none = |_: &str| false;
        assert!(check_publish(&ha, "d/x/cmd/on", &none));
        assert!(!check_publish(&ha, "d/x/state", &none));
        assert!(!check_publish(&ha, "$hub/broadcast/x", &none));
        assert!(check_subscribe(&ha, "d/+/state"));
        assert!(check_subscribe(&ha, "d/x/state"));
        assert!(check_subscribe(&ha, "d/kitchen/event/#"));
        assert!(check_subscribe(&ha, "d/kitchen"));
        assert!(!check_subscribe(&ha, "d/#"));
        assert!(!check_subscribe(&ha, "d/+/cmd/#"));
        assert!(!check_subscribe(&ha, "#"));
        let nothing = integration(&[], &[]);
        assert!(!check_publish(&nothing, "d/x/cmd/on", &none));
        assert!(!check_subscribe(&nothing, "d/x/state"));
    }

    #[test]
    fn integrations_never_command_an_isolated_device() {
        let ha = integration(&["#"], &[]);
        let isolated = |id: &str| id == "bad";
        assert!(!check_publish(&ha, "d/bad/cmd/on", &isolated));
        assert!(!check_publish(&ha, "d/bad/cmd", &isolated));
        assert!(check_publish(&ha, "d/good/cmd/on", &isolated));
        assert!(check_publish(&ha, "d/bad/state", &isolated));
        assert_eq!(command_target("d/x/cmd/a/b"), Some("x"));
        assert_eq!(command_target("d/x/cmdx"), None);
        assert_eq!(command_target("d/x/state"), None);
    }

    #[test]
    fn mqtt_matching_and_coverage() {
        assert!(topic_matches("d/+/state", "d/a/state"));
        assert!(!topic_matches("d/+/state", "d/a/b/state"));
        assert!(topic_matches("d/#", "d"));
        assert!(topic_matches("#", "a/b"));
        assert!(!topic_matches("#", "$hub/x"));
        assert!(!topic_matches("+/x", "$hub/x"));
        assert!(topic_matches("$hub/#", "$hub/x"));
        assert!(filter_covered("#", "a/+/b"));
        assert!(filter_covered("a/+", "a/b"));
        assert!(filter_covered("a/+", "a/+"));
        assert!(!filter_covered("a/b", "a/+"));
        assert!(!filter_covered("a/+", "a/#"));
        assert!(filter_covered("a/#", "a"));
        assert!(!filter_covered("a/b/#", "a"));
        assert!(!filter_covered("#", "$hub/#"));
        assert!(filter_covered("$hub/#", "$hub/isolation/x"));
    }

    #[test]
    fn topic_syntax() {
        assert_eq!(validate_topic("", LIMITS), Err(TopicError::Empty));
        assert_eq!(
            validate_topic("a/+", LIMITS),
            Err(TopicError::WildcardInName)
        );
        assert_eq!(
            validate_topic("a/#", LIMITS),
            Err(TopicError::WildcardInName)
        );
        assert_eq!(validate_topic("a\0b", LIMITS), Err(TopicError::Nul));
        assert_eq!(validate_topic("a\u{1}b", LIMITS), Err(TopicError::Control));
        assert_eq!(
            validate_filter("\u{1}hub/#", LIMITS),
            Err(TopicError::Control)
        );
        assert!(matches!(
            validate_topic(&"x".repeat(257), LIMITS),
            Err(TopicError::TooLong { len: 257, .. })
        ));
        assert!(matches!(
            validate_topic(&"a/".repeat(16), LIMITS),
            Err(TopicError::TooDeep { depth: 17, .. })
        ));
        assert!(validate_topic("d/a/state", LIMITS).is_ok());
    }

    #[test]
    fn filter_syntax() {
        for ok in ["#", "a/#", "+/b", "a/+/c", "+"] {
            assert!(validate_filter(ok, LIMITS).is_ok(), "{ok}");
        }
        assert_eq!(
            validate_filter("a/#/b", LIMITS),
            Err(TopicError::BadMultiLevelWildcard)
        );
        assert_eq!(
            validate_filter("a#", LIMITS),
            Err(TopicError::BadMultiLevelWildcard)
        );
        assert_eq!(
            validate_filter("a+/b", LIMITS),
            Err(TopicError::BadSingleLevelWildcard)
        );
    }
}
