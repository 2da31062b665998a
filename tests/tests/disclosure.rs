//! The disclosure policy and the support period, as the UK PSTI regulations
//! ask of a connected product (principles 2 and 3): SECURITY.md states a
//! contact, response times, scope and safe harbour; security.txt (RFC 9116)
//! has a Contact, a Policy and an Expires in the coming year; the support end
//! date in `packaging/support-end` is the one SECURITY.md, the README and
//! `hubctl about` state.

use std::path::{Path, PathBuf};

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits in the workspace root")
        .to_path_buf()
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// security.txt's `Field: value` lines (comments and blanks left out).
fn security_txt_fields() -> Vec<(String, String)> {
    read("packaging/security.txt")
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (k, v) = l
                .split_once(':')
                .unwrap_or_else(|| panic!("security.txt: not a field: {l:?}"));
            (k.to_owned(), v.trim().to_owned())
        })
        .collect()
}

fn security_contact() -> String {
    let fields = security_txt_fields();
    let contact = fields
        .iter()
        .find(|(k, _)| k == "Contact")
        .map(|(_, v)| v.clone())
        .expect("security.txt has a Contact");
    contact
        .strip_prefix("mailto:")
        .unwrap_or_else(|| panic!("Contact {contact:?} is not a mailto: URI"))
        .to_owned()
}

#[test]
fn security_txt_has_contact_policy_and_an_expiry_in_the_coming_year() {
    let fields = security_txt_fields();
    let known = [
        "Contact",
        "Expires",
        "Policy",
        "Preferred-Languages",
        "Canonical",
        "Encryption",
        "Acknowledgments",
        "Hiring",
    ];
    for (k, _) in &fields {
        assert!(
            known.contains(&k.as_str()),
            "security.txt: unknown field {k}"
        );
    }
    let count = |name: &str| fields.iter().filter(|(k, _)| k == name).count();
    // RFC 9116: Contact at least once, Expires exactly once.
    assert!(count("Contact") >= 1);
    assert_eq!(count("Expires"), 1);
    let contact = security_contact();
    assert!(
        contact.contains('@') && !contact.contains(' '),
        "{contact:?}"
    );
    let value = |name: &str| {
        fields
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| panic!("security.txt has no {name}"))
    };
    assert!(value("Policy").starts_with("https://"));
    assert!(value("Canonical").starts_with("https://"));
    let expires = OffsetDateTime::parse(&value("Expires"), &Rfc3339)
        .unwrap_or_else(|e| panic!("Expires {:?}: {e}", value("Expires")));
    let now = OffsetDateTime::now_utc();
    assert!(
        expires > now,
        "security.txt expired on {expires}: every release refreshes Expires (SECURITY.md)"
    );
    // RFC 9116 recommends less than a year ahead.
    assert!(
        expires - now <= time::Duration::days(366),
        "security.txt Expires {expires} is more than a year ahead"
    );
}

/// The first number in `line` after `word`, if any.
fn number_after(line: &str, word: &str) -> Option<u32> {
    let rest = &line[line.find(word)? + word.len()..];
    let digits: String = rest
        .trim_start()
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

#[test]
fn security_md_states_contact_response_times_scope_and_safe_harbour() {
    let policy = read("SECURITY.md");
    let contact = security_contact();
    assert!(
        policy.contains(&contact),
        "SECURITY.md does not name {contact}"
    );
    let lines: Vec<String> = policy.lines().map(str::to_lowercase).collect();
    let ack = lines
        .iter()
        .filter(|l| l.contains("acknowledg"))
        .find_map(|l| number_after(l, "within"))
        .expect("SECURITY.md states acknowledgement within N days");
    assert!(ack > 0 && ack <= 7, "acknowledgement within {ack} days");
    let update = lines
        .iter()
        .filter(|l| l.contains("update"))
        .find_map(|l| number_after(l, "every"))
        .expect("SECURITY.md states status updates every N days");
    assert!(update > 0 && update <= 30, "updates every {update} days");
    for heading in ["## scope", "## safe harbour", "## support period"] {
        assert!(
            lines.iter().any(|l| l == heading),
            "SECURITY.md has no {heading:?} section"
        );
    }
}

/// Every YYYY-MM-DD date in `text` on a line that mentions support.
fn support_dates(text: &str) -> Vec<String> {
    let mut dates = Vec::new();
    for line in text
        .lines()
        .filter(|l| l.to_lowercase().contains("support"))
    {
        for (i, _) in line.char_indices() {
            let Some(candidate) = line.get(i..i + 10) else {
                continue;
            };
            let shape = candidate.bytes().enumerate().all(|(j, b)| match j {
                4 | 7 => b == b'-',
                _ => b.is_ascii_digit(),
            });
            if shape {
                dates.push(candidate.to_owned());
            }
        }
    }
    dates
}

fn hubctl_about_json() -> serde_json::Value {
    let mut out = Vec::new();
    let mut err = Vec::new();
    let code = hubctl::run(["hubctl", "about", "--json"], &mut out, &mut err);
    assert_eq!(code, 0, "{}", String::from_utf8_lossy(&err));
    serde_json::from_slice(&out).expect("about --json is JSON")
}

#[test]
fn the_support_end_date_is_the_same_everywhere() {
    let end = read("packaging/support-end").trim().to_owned();
    let date = time::Date::parse(
        &end,
        time::macros::format_description!("[year]-[month]-[day]"),
    )
    .expect("packaging/support-end is YYYY-MM-DD");
    assert!(
        date > OffsetDateTime::now_utc().date(),
        "the support end {end} has passed: this release line is out of support"
    );
    for doc in ["SECURITY.md", "README.md"] {
        let dates = support_dates(&read(doc));
        assert!(!dates.is_empty(), "{doc} does not state the support end");
        assert!(
            dates.iter().all(|d| *d == end),
            "{doc} states support dates {dates:?}, packaging/support-end says {end}"
        );
    }
    // The package's statement is made from the template by build-deb.sh.
    let template = read("packaging/SUPPORT.in");
    assert!(template.contains("@SUPPORT_END@"));
    assert!(
        support_dates(&template).is_empty(),
        "SUPPORT.in hard-codes a date"
    );
    let about = hubctl_about_json();
    assert_eq!(about["support_end"], end.as_str());
    assert_eq!(about["support_ended"], false);
}

#[test]
fn hubctl_about_names_the_published_contact() {
    let about = hubctl_about_json();
    assert_eq!(about["product"], "hubd");
    assert_eq!(about["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(about["security_contact"], security_contact().as_str());
    let privacy = read("packaging/PRIVACY.md");
    assert!(privacy.contains(&security_contact()));
    assert!(privacy.contains("/var/lib/hubd") && privacy.contains("apt purge hubd"));
}
