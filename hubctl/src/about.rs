//! `hubctl about`: what this hub is, until when it gets security updates, and
//! whom to tell about a vulnerability. Static facts compiled into hubctl, so
//! it needs no running hub.
//!
//! The support end date is written in one place, `packaging/support-end`;
//! hubctl embeds it, the Debian package's support statement is made from it,
//! and a test checks that SECURITY.md and the README say the same date.

use serde::{Deserialize, Serialize};
use time::Date;
use time::macros::format_description;

/// The product this hubctl administers.
pub const PRODUCT: &str = "hubd";

/// The last day this release line gets security updates (YYYY-MM-DD), from
/// `packaging/support-end`.
pub const SUPPORT_END: &str = include_str!("../../packaging/support-end").trim_ascii();

/// Where to report a vulnerability: the project's own security address, as
/// in SECURITY.md and security.txt.
pub const SECURITY_CONTACT: &str = "security@hubd.example";

/// Where the installed package keeps the disclosure policy.
pub const SECURITY_POLICY: &str = "/usr/share/doc/hubd/SECURITY.md";

/// Where the installed package keeps the privacy notice.
pub const PRIVACY_NOTICE: &str = "/usr/share/doc/hubd/PRIVACY.md";

/// Where the installed package keeps the support statement.
pub const SUPPORT_STATEMENT: &str = "/usr/share/doc/hubd/SUPPORT";

/// `about --json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AboutView {
    pub product: String,
    /// hubctl's version; the package ships hubd and hubctl of one version.
    pub version: String,
    /// The last day of security updates, YYYY-MM-DD.
    pub support_end: String,
    /// Whether that day has passed (by this machine's clock).
    pub support_ended: bool,
    pub security_contact: String,
    pub security_policy: String,
    pub privacy_notice: String,
    pub support_statement: String,
}

impl AboutView {
    /// The facts, with `support_ended` judged on `today`.
    pub fn new(today: Date) -> AboutView {
        AboutView {
            product: PRODUCT.to_owned(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            support_end: SUPPORT_END.to_owned(),
            support_ended: support_end().is_some_and(|end| today > end),
            security_contact: SECURITY_CONTACT.to_owned(),
            security_policy: SECURITY_POLICY.to_owned(),
            privacy_notice: PRIVACY_NOTICE.to_owned(),
            support_statement: SUPPORT_STATEMENT.to_owned(),
        }
    }

    /// The human rendering: `key: value` lines.
    pub fn text(&self) -> String {
        let support = if self.support_ended {
            format!(
                "{} (ended: this release gets no more security updates)",
                self.support_end
            )
        } else {
            format!("{} (security updates until this day)", self.support_end)
        };
        crate::output::key_values(&[
            (
                "product",
                format!("{} (local-first smart-home hub)", self.product),
            ),
            ("version", self.version.clone()),
            ("support end", support),
            ("security contact", self.security_contact.clone()),
            ("security policy", self.security_policy.clone()),
            ("privacy notice", self.privacy_notice.clone()),
            ("support statement", self.support_statement.clone()),
        ])
    }
}

/// [`SUPPORT_END`] as a date; `None` only if the file is malformed, which a
/// test rules out.
fn support_end() -> Option<Date> {
    Date::parse(SUPPORT_END, format_description!("[year]-[month]-[day]")).ok()
}

#[cfg(test)]
mod tests {
    use time::macros::date;

    use super::*;

    #[test]
    fn the_support_end_file_holds_one_date() {
        let end = support_end().expect("packaging/support-end is YYYY-MM-DD");
        assert_eq!(end.to_string(), SUPPORT_END);
    }

    #[test]
    fn support_ends_after_the_last_day() {
        let end = support_end().expect("a date");
        assert!(!AboutView::new(end).support_ended);
        assert!(AboutView::new(end.next_day().expect("not the last day")).support_ended);
        let text = AboutView::new(end.next_day().expect("not the last day")).text();
        assert!(text.contains("ended"), "{text}");
    }

    #[test]
    fn text_names_every_fact() {
        let view = AboutView::new(date!(2026 - 01 - 01));
        let text = view.text();
        for needle in [
            PRODUCT,
            env!("CARGO_PKG_VERSION"),
            SUPPORT_END,
            SECURITY_CONTACT,
            SECURITY_POLICY,
            PRIVACY_NOTICE,
            SUPPORT_STATEMENT,
        ] {
            assert!(text.contains(needle), "{needle} missing from\n{text}");
        }
    }
}
