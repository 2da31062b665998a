//! `hubctl audit`: the running hub's self-audit against the UK Code of
//! Practice for consumer IoT security and ETSI EN 303 645. hubd runs the
//! checks; this prints one line per check, a fix for each failure and
//! warning, and a summary, and exits 1 when any check fails.

use std::io::Write;
use std::path::Path;

use hub_proto::v1;
use serde::{Deserialize, Serialize};

use crate::Error;
use crate::commands::{call, connect, print, print_json};
use crate::output::sanitize;

/// One check as `audit --json` prints it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckView {
    pub id: String,
    pub principle: String,
    pub provision: String,
    /// `pass`, `warn` or `fail`.
    pub status: String,
    pub detail: String,
    /// Empty on pass.
    pub fix: String,
}

impl From<v1::AuditCheck> for CheckView {
    fn from(c: v1::AuditCheck) -> Self {
        CheckView {
            id: c.id,
            principle: c.principle,
            provision: c.provision,
            status: c.status,
            detail: c.detail,
            fix: c.fix,
        }
    }
}

/// `audit --json`: every check and the counts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditView {
    pub checks: Vec<CheckView>,
    pub passed: usize,
    pub warnings: usize,
    pub failed: usize,
}

impl AuditView {
    /// The view of hubd's answer, with the counts.
    pub fn new(checks: Vec<CheckView>) -> AuditView {
        let count = |s: &str| checks.iter().filter(|c| c.status == s).count();
        AuditView {
            passed: count("pass"),
            warnings: count("warn"),
            failed: count("fail"),
            checks,
        }
    }

    /// The human rendering: a line per check, a `fix:` line under each
    /// failure and warning, and a summary.
    pub fn text(&self) -> String {
        let mut text = String::new();
        for c in &self.checks {
            text.push_str(&format!(
                "{:<4}  {}  {} (EN 303 645 {}): {}\n",
                sanitize(&c.status.to_uppercase()),
                sanitize(&c.id),
                sanitize(&c.principle),
                sanitize(&c.provision),
                sanitize(&c.detail)
            ));
            if c.status != "pass" && !c.fix.is_empty() {
                text.push_str(&format!("      fix: {}\n", sanitize(&c.fix)));
            }
        }
        text.push_str(&format!(
            "{} checks: {} passed, {} warning{}, {} failed\n",
            self.checks.len(),
            self.passed,
            self.warnings,
            if self.warnings == 1 { "" } else { "s" },
            self.failed
        ));
        text
    }

    /// The ids of the failed checks.
    fn failed_ids(&self) -> Vec<&str> {
        self.checks
            .iter()
            .filter(|c| c.status == "fail")
            .map(|c| c.id.as_str())
            .collect()
    }
}

/// Runs `audit`: prints the checks, and fails when any check failed.
pub(crate) async fn audit(json: bool, socket: &Path, out: &mut dyn Write) -> Result<(), Error> {
    let what = "audit".to_owned();
    let mut client = connect(socket).await?;
    let answer = call(&what, client.audit(v1::AuditRequest {})).await?;
    let view = AuditView::new(answer.checks.into_iter().map(CheckView::from).collect());
    if json {
        print_json(out, &view)?;
    } else {
        print(out, &view.text())?;
    }
    if view.failed == 0 {
        return Ok(());
    }
    Err(Error::Check {
        what,
        detail: format!(
            "{} check{} failed: {}",
            view.failed,
            if view.failed == 1 { "" } else { "s" },
            sanitize(&view.failed_ids().join(", "))
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(id: &str, status: &str, fix: &str) -> CheckView {
        CheckView {
            id: id.to_owned(),
            principle: "4 Store credentials securely".to_owned(),
            provision: "5.4-1".to_owned(),
            status: status.to_owned(),
            detail: "found".to_owned(),
            fix: fix.to_owned(),
        }
    }

    #[test]
    fn text_has_a_line_per_check_fixes_and_a_summary() {
        let view = AuditView::new(vec![
            check("tls", "pass", ""),
            check("key_files", "fail", "chmod 600 /x"),
            check("certificates", "warn", "renew"),
        ]);
        assert_eq!((view.passed, view.warnings, view.failed), (1, 1, 1));
        let text = view.text();
        assert_eq!(
            text,
            "PASS  tls  4 Store credentials securely (EN 303 645 5.4-1): found\n\
             FAIL  key_files  4 Store credentials securely (EN 303 645 5.4-1): found\n      fix: chmod 600 /x\n\
             WARN  certificates  4 Store credentials securely (EN 303 645 5.4-1): found\n      fix: renew\n\
             3 checks: 1 passed, 1 warning, 1 failed\n"
        );
        assert_eq!(view.failed_ids(), vec!["key_files"]);
    }

    #[test]
    fn control_characters_from_hubd_are_not_printed() {
        let mut c = check("tls", "pass", "");
        c.detail = "a\x1b[2Jb".to_owned();
        let text = AuditView::new(vec![c]).text();
        assert!(!text.contains('\x1b'), "{text:?}");
    }
}
