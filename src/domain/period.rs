//! Quota periods and the one function that computes their boundaries.
//!
//! Every counter key carries the start of its period, so a counter never has to be reset: a new
//! period simply writes to a new key and the old one expires. That makes the boundary computation
//! the single source of truth for "which counter is current", and it lives here, taking the clock
//! and the org's billing cycle as inputs.
//!
//! Two monthly periods exist. `month` is the calendar month in UTC, the same for every org (and
//! the meter billing reads is always one). `billing_month` follows the org's own cycle: it
//! starts on the day and time of the org's billing anchor, clamped to the length of short months
//! (an anchor on the 31st resets on Feb 28 or 29, Mar 31, Apr 30), and is the calendar month
//! while the org has no anchor.
//!
//! Changing an anchor never resets usage. The period in progress when the anchor changes keeps
//! its start and runs until the new anchor's next boundary (a *carried* period, which may be
//! shorter or longer than a month); after it the org's periods follow the new anchor. Because a
//! counter's key carries its period's start, the carried period keeps counting on the very
//! counter it had.

use chrono::{DateTime, Datelike, Duration, NaiveDate, TimeZone, Timelike, Utc};
use serde::{Deserialize, Serialize};

/// A quota period: calendar-aligned (UTC), or the org's billing month.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Period {
    Minute,
    Hour,
    Day,
    /// The calendar month (UTC).
    Month,
    /// The org's billing cycle (see [`BillingCycle`]); the calendar month without an anchor.
    BillingMonth,
}

impl Period {
    pub fn as_str(self) -> &'static str {
        match self {
            Period::Minute => "minute",
            Period::Hour => "hour",
            Period::Day => "day",
            Period::Month => "month",
            Period::BillingMonth => "billing_month",
        }
    }

    /// The name used in config, keys and answers.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "minute" => Period::Minute,
            "hour" => Period::Hour,
            "day" => Period::Day,
            "month" => Period::Month,
            "billing_month" => Period::BillingMonth,
            _ => return None,
        })
    }
}

/// Where an org's billing cycle starts. Billing months then run from the anchor's day-of-month
/// and time of day (clamped to the length of short months) instead of the calendar month.
pub type BillingAnchor = DateTime<Utc>;

/// An org's billing cycle: its anchor, and the period carried over an anchor change, if any.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BillingCycle {
    pub anchor: Option<BillingAnchor>,
    /// The period that was in progress when the anchor last changed, extended to the new
    /// anchor's next boundary. Only used while `now` is inside it.
    pub carry: Option<Window>,
}

impl BillingCycle {
    pub fn new(anchor: Option<BillingAnchor>, carry: Option<Window>) -> Self {
        Self { anchor, carry }
    }

    /// The billing month containing `now`.
    pub fn window(&self, now: DateTime<Utc>) -> Window {
        match self.carry {
            Some(c) if c.start <= now && now < c.end => c,
            _ => month_window(now, self.anchor),
        }
    }

    /// Whether a billing month of this cycle starts exactly at `t`. A provider that only tells
    /// the current period's start (not the anchor) sends Feb 28 for an anchor on the 31st; that
    /// start is already explained by the cycle and must not move the anchor to the 28th.
    pub fn starts_at(&self, t: DateTime<Utc>) -> bool {
        self.window(t).start == t
    }

    /// The cycle after setting the anchor to `anchor` (or removing it: `None`) at `now`. The
    /// period in progress keeps its start and runs until the new cycle's next boundary, so the
    /// usage counted in it is carried, never reset; when that boundary is the period's own end
    /// nothing needs carrying.
    pub fn with_anchor(&self, anchor: Option<BillingAnchor>, now: DateTime<Utc>) -> Self {
        let old = self.window(now);
        let new = month_window(now, anchor);
        let carry = (old != new).then_some(Window {
            start: old.start,
            end: new.end,
        });
        Self { anchor, carry }
    }
}

/// A half-open interval `[start, end)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
}

impl Window {
    /// Seconds from `now` until the window ends, rounded up (never 0 while inside the window).
    pub fn seconds_until_end(&self, now: DateTime<Utc>) -> u64 {
        let ms = (self.end - now).num_milliseconds().max(0) as u64;
        ms.div_ceil(1000)
    }

    pub fn length_seconds(&self) -> u64 {
        (self.end - self.start).num_seconds().max(0) as u64
    }
}

/// The window of `period` containing `now`. The cycle only affects billing months.
pub fn window(period: Period, now: DateTime<Utc>, cycle: &BillingCycle) -> Window {
    match period {
        Period::Minute => {
            let start = now
                .with_nanosecond(0)
                .and_then(|t| t.with_second(0))
                .unwrap_or(now);
            Window {
                start,
                end: start + Duration::minutes(1),
            }
        }
        Period::Hour => {
            let start = Utc
                .with_ymd_and_hms(now.year(), now.month(), now.day(), now.hour(), 0, 0)
                .single()
                .unwrap_or(now);
            Window {
                start,
                end: start + Duration::hours(1),
            }
        }
        Period::Day => {
            let start = Utc
                .with_ymd_and_hms(now.year(), now.month(), now.day(), 0, 0, 0)
                .single()
                .unwrap_or(now);
            Window {
                start,
                end: start + Duration::days(1),
            }
        }
        Period::Month => month_window(now, None),
        Period::BillingMonth => cycle.window(now),
    }
}

/// The calendar month (UTC) containing `now`: the period every metric is metered in.
pub fn calendar_month(now: DateTime<Utc>) -> Window {
    month_window(now, None)
}

fn month_window(now: DateTime<Utc>, anchor: Option<BillingAnchor>) -> Window {
    let (year, month) = (now.year(), now.month());
    let this = cycle_start(year, month, anchor);
    if this <= now {
        let (ny, nm) = next_month(year, month);
        Window {
            start: this,
            end: cycle_start(ny, nm, anchor),
        }
    } else {
        let (py, pm) = prev_month(year, month);
        Window {
            start: cycle_start(py, pm, anchor),
            end: this,
        }
    }
}

/// The start of the billing cycle that begins in `year`/`month`.
fn cycle_start(year: i32, month: u32, anchor: Option<BillingAnchor>) -> DateTime<Utc> {
    let (day, h, m, s) = match anchor {
        None => (1, 0, 0, 0),
        Some(a) => (
            a.day().min(days_in_month(year, month)),
            a.hour(),
            a.minute(),
            a.second(),
        ),
    };
    Utc.with_ymd_and_hms(year, month, day, h, m, s)
        .single()
        .unwrap_or(DateTime::<Utc>::MIN_UTC)
}

fn next_month(year: i32, month: u32) -> (i32, u32) {
    if month == 12 {
        (year + 1, 1)
    } else {
        (year, month + 1)
    }
}

fn prev_month(year: i32, month: u32) -> (i32, u32) {
    if month == 1 {
        (year - 1, 12)
    } else {
        (year, month - 1)
    }
}

fn days_in_month(year: i32, month: u32) -> u32 {
    let (ny, nm) = next_month(year, month);
    NaiveDate::from_ymd_opt(ny, nm, 1)
        .and_then(|d| d.pred_opt())
        .map(|d| d.day())
        .unwrap_or(28)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NONE: BillingCycle = BillingCycle {
        anchor: None,
        carry: None,
    };

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn calendar_periods_are_aligned_in_utc() {
        let now = t("2026-11-25T06:18:53.250Z");
        let w = window(Period::Minute, now, &NONE);
        assert_eq!(
            (w.start, w.end),
            (t("2026-11-25T06:18:00Z"), t("2026-11-25T06:19:00Z"))
        );
        let w = window(Period::Hour, now, &NONE);
        assert_eq!(
            (w.start, w.end),
            (t("2026-11-25T06:00:00Z"), t("2026-11-25T07:00:00Z"))
        );
        let w = window(Period::Day, now, &NONE);
        assert_eq!(
            (w.start, w.end),
            (t("2026-11-25T00:00:00Z"), t("2026-11-26T00:00:00Z"))
        );
        let w = window(Period::Month, now, &NONE);
        assert_eq!(
            (w.start, w.end),
            (t("2026-11-01T00:00:00Z"), t("2026-12-01T00:00:00Z"))
        );
        let w = window(Period::Month, t("2026-12-31T23:59:59Z"), &NONE);
        assert_eq!(
            (w.start, w.end),
            (t("2026-12-01T00:00:00Z"), t("2027-01-01T00:00:00Z"))
        );
    }

    #[test]
    fn boundaries_belong_to_the_new_period() {
        let w = window(Period::Month, t("2026-12-01T00:00:00Z"), &NONE);
        assert_eq!(w.start, t("2026-12-01T00:00:00Z"));
    }

    #[test]
    fn anchored_months_follow_the_billing_day_and_clamp_short_months() {
        let anchor = &BillingCycle::new(Some(t("2026-01-31T12:00:00Z")), None);
        let w = window(Period::BillingMonth, t("2026-02-15T00:00:00Z"), anchor);
        assert_eq!(
            (w.start, w.end),
            (t("2026-01-31T12:00:00Z"), t("2026-02-28T12:00:00Z"))
        );
        let w = window(Period::BillingMonth, t("2026-02-28T12:00:00Z"), anchor);
        assert_eq!(
            (w.start, w.end),
            (t("2026-02-28T12:00:00Z"), t("2026-03-31T12:00:00Z"))
        );
        let w = window(Period::BillingMonth, t("2026-03-05T00:00:00Z"), anchor);
        assert_eq!(w.start, t("2026-02-28T12:00:00Z"));
        // `month` stays the calendar month whatever the anchor.
        let w = window(Period::Month, t("2026-03-05T00:00:00Z"), anchor);
        assert_eq!(w.start, t("2026-03-01T00:00:00Z"));
        // Without an anchor a billing month is the calendar month.
        let w = window(Period::BillingMonth, t("2026-03-05T00:00:00Z"), &NONE);
        assert_eq!(w, calendar_month(t("2026-03-05T00:00:00Z")));
    }

    /// Walks an injected clock hour by hour over a year and collects the boundaries the cycle
    /// produces, checking on the way that every instant lies in its window and that windows
    /// tile time without gaps.
    fn boundaries_over(cycle: &BillingCycle, from: &str, to: &str) -> Vec<DateTime<Utc>> {
        let (mut now, to) = (t(from), t(to));
        let mut starts = vec![cycle.window(now).start];
        let mut last = cycle.window(now);
        while now < to {
            let w = cycle.window(now);
            assert!(w.start <= now && now < w.end, "{now} outside {w:?}");
            if w != last {
                assert_eq!(w.start, last.end, "windows must tile: {last:?} then {w:?}");
                starts.push(w.start);
                last = w;
            }
            now += Duration::minutes(59);
        }
        starts
    }

    #[test]
    fn anchor_on_the_31st_over_a_year_clamps_short_months() {
        let cycle = BillingCycle::new(Some(t("2026-01-31T10:00:00Z")), None);
        let starts = boundaries_over(&cycle, "2026-01-31T10:00:00Z", "2027-02-01T00:00:00Z");
        let want: Vec<_> = [
            "2026-01-31",
            "2026-02-28",
            "2026-03-31",
            "2026-04-30",
            "2026-05-31",
            "2026-06-30",
            "2026-07-31",
            "2026-08-31",
            "2026-09-30",
            "2026-10-31",
            "2026-11-30",
            "2026-12-31",
            "2027-01-31",
        ]
        .iter()
        .map(|d| t(&format!("{d}T10:00:00Z")))
        .collect();
        assert_eq!(starts, want);
        // A leap year: February has its 29th.
        let w = cycle.window(t("2028-03-01T00:00:00Z"));
        assert_eq!(
            (w.start, w.end),
            (t("2028-02-29T10:00:00Z"), t("2028-03-31T10:00:00Z"))
        );
        // One second before the boundary belongs to the old period.
        let w = cycle.window(t("2026-02-28T09:59:59Z"));
        assert_eq!(w.start, t("2026-01-31T10:00:00Z"));
    }

    #[test]
    fn anchor_on_feb_29_over_a_year_resets_on_the_29th_or_the_last_day() {
        let cycle = BillingCycle::new(Some(t("2028-02-29T00:00:00Z")), None);
        let starts = boundaries_over(&cycle, "2028-02-29T00:00:00Z", "2029-03-01T00:00:00Z");
        let want: Vec<_> = [
            "2028-02-29",
            "2028-03-29",
            "2028-04-29",
            "2028-05-29",
            "2028-06-29",
            "2028-07-29",
            "2028-08-29",
            "2028-09-29",
            "2028-10-29",
            "2028-11-29",
            "2028-12-29",
            "2029-01-29",
            "2029-02-28",
        ]
        .iter()
        .map(|d| t(&format!("{d}T00:00:00Z")))
        .collect();
        assert_eq!(starts, want);
        let w = cycle.window(t("2029-02-28T00:00:00Z"));
        assert_eq!(w.end, t("2029-03-29T00:00:00Z"));
    }

    #[test]
    fn an_anchor_change_carries_the_period_in_progress_to_the_new_boundary() {
        let old = BillingCycle::new(Some(t("2026-01-15T00:00:00Z")), None);
        let now = t("2026-03-20T08:00:00Z");
        assert_eq!(old.window(now).start, t("2026-03-15T00:00:00Z"));
        // To the 25th: the March 15 period runs until March 25, then the 25th rules.
        let new = old.with_anchor(Some(t("2026-01-25T00:00:00Z")), now);
        let w = new.window(now);
        assert_eq!(
            (w.start, w.end),
            (t("2026-03-15T00:00:00Z"), t("2026-03-25T00:00:00Z"))
        );
        let w = new.window(t("2026-03-25T00:00:00Z"));
        assert_eq!(
            (w.start, w.end),
            (t("2026-03-25T00:00:00Z"), t("2026-04-25T00:00:00Z"))
        );
        // To the 10th: the March 15 period runs until April 10.
        let new = old.with_anchor(Some(t("2026-01-10T00:00:00Z")), now);
        let w = new.window(now);
        assert_eq!(
            (w.start, w.end),
            (t("2026-03-15T00:00:00Z"), t("2026-04-10T00:00:00Z"))
        );
        let starts = boundaries_over(&new, "2026-03-20T08:00:00Z", "2026-07-01T00:00:00Z");
        assert_eq!(
            starts[..3],
            [
                t("2026-03-15T00:00:00Z"),
                t("2026-04-10T00:00:00Z"),
                t("2026-05-10T00:00:00Z")
            ]
        );
        // The same schedule is no change; nor is the first anchor of an org that matches the
        // calendar.
        assert_eq!(
            old.with_anchor(Some(t("2025-11-15T00:00:00Z")), now).carry,
            None
        );
        assert_eq!(
            NONE.with_anchor(Some(t("2026-02-01T00:00:00Z")), now).carry,
            None
        );
        // A first anchor carries the calendar month.
        let w = NONE
            .with_anchor(Some(t("2026-01-25T00:00:00Z")), now)
            .window(now);
        assert_eq!(
            (w.start, w.end),
            (t("2026-03-01T00:00:00Z"), t("2026-03-25T00:00:00Z"))
        );
        // Removing the anchor carries too, to the calendar boundary.
        let w = old.with_anchor(None, now).window(now);
        assert_eq!(
            (w.start, w.end),
            (t("2026-03-15T00:00:00Z"), t("2026-04-01T00:00:00Z"))
        );
    }

    #[test]
    fn a_period_start_the_cycle_explains_is_recognised() {
        let cycle = BillingCycle::new(Some(t("2026-01-31T10:00:00Z")), None);
        assert!(cycle.starts_at(t("2026-02-28T10:00:00Z")));
        assert!(cycle.starts_at(t("2026-04-30T10:00:00Z")));
        assert!(!cycle.starts_at(t("2026-04-28T10:00:00Z")));
    }

    #[test]
    fn seconds_until_end_rounds_up() {
        let w = window(Period::Minute, t("2026-11-25T06:18:59.001Z"), &NONE);
        assert_eq!(w.seconds_until_end(t("2026-11-25T06:18:59.001Z")), 1);
        assert_eq!(w.length_seconds(), 60);
    }
}
