//! Loop protection at run time: each rule's cooldown and its cap on runs per
//! minute. Validation refuses the obvious self-triggering rules; this catches
//! the rest (two rules feeding each other, a device that echoes commands).
//!
//! The runner owns one [`RunLimiter`] and asks it before each run, passing
//! the time in; nothing here reads a clock.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::time::Duration;

use jiff::Timestamp;

use super::{Rule, RuleName};

/// The window `max_runs_per_minute` counts in.
const MINUTE: Duration = Duration::from_secs(60);

/// Why a rule that fired may not run now. A normal outcome, recorded in the
/// rule's history, not an error.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The rule ran less than its `cooldown` ago.
    Cooldown { remaining: Duration },
    /// The rule already ran `limit` times in the last minute.
    TooManyRuns { limit: u32, retry_after: Duration },
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::Cooldown { remaining } => {
                write!(
                    f,
                    "cooling down for another {:.1}s",
                    remaining.as_secs_f64()
                )
            }
            Refusal::TooManyRuns { limit, retry_after } => write!(
                f,
                "ran {limit} times in the last minute (max_runs_per_minute); next run allowed in {:.1}s",
                retry_after.as_secs_f64()
            ),
        }
    }
}

/// What the limiter remembers about one rule.
#[derive(Debug, Default)]
struct History {
    /// The last allowed run, for the cooldown (which may exceed a minute).
    last: Option<Timestamp>,
    /// Allowed runs in the last minute, oldest first; at most the cap long.
    recent: VecDeque<Timestamp>,
}

/// Per-rule cooldown and runs-per-minute bookkeeping.
#[derive(Debug, Default)]
pub struct RunLimiter {
    rules: HashMap<RuleName, History>,
}

impl RunLimiter {
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether `rule` may run at `now`; if so the run is recorded.
    pub fn allow(&mut self, rule: &Rule, now: Timestamp) -> Result<(), Refusal> {
        let history = self.rules.entry(rule.name.clone()).or_default();
        // A clock set backwards (NTP catching up on a board without a
        // real-time clock goes forwards, but a wrong manual setting may go
        // back) would otherwise hold the rule for as long as the jump.
        if history.last.is_some_and(|last| last > now) {
            *history = History::default();
        }
        let since =
            |then: Timestamp| Duration::try_from(now.duration_since(then)).unwrap_or_default();
        if let (Some(cooldown), Some(last)) = (rule.cooldown, history.last) {
            let elapsed = since(last);
            if elapsed < cooldown {
                return Err(Refusal::Cooldown {
                    remaining: cooldown - elapsed,
                });
            }
        }
        while history.recent.front().is_some_and(|t| since(*t) >= MINUTE) {
            history.recent.pop_front();
        }
        let limit = rule.max_runs_per_minute;
        if history.recent.len() >= usize::try_from(limit).unwrap_or(usize::MAX) {
            let oldest = history.recent.front().copied().unwrap_or(now);
            return Err(Refusal::TooManyRuns {
                limit,
                retry_after: MINUTE.saturating_sub(since(oldest)),
            });
        }
        history.last = Some(now);
        history.recent.push_back(now);
        Ok(())
    }

    /// Drops what is known about a rule: call it when the rule is removed or
    /// replaced, so a changed rule starts afresh and memory stays bounded.
    pub fn forget(&mut self, name: &RuleName) {
        self.rules.remove(name);
    }
}
