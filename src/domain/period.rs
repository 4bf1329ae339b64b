//! Quota periods and the one function that computes their boundaries.
//!
//! Every counter key carries the start of its period, so a counter never has to be reset: a new
//! period simply writes to a new key and the old one expires. That makes the boundary computation
//! the single source of truth for "which counter is current", and it lives here, taking the clock
//! and an optional per-org billing anchor as inputs.

use chrono::{DateTime, Datelike, Duration, NaiveDate, TimeZone, Timelike, Utc};
use serde::{Deserialize, Serialize};

/// A calendar-aligned (UTC) quota period.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Period {
    Minute,
    Hour,
    Day,
    Month,
}

impl Period {
    pub fn as_str(self) -> &'static str {
        match self {
            Period::Minute => "minute",
            Period::Hour => "hour",
            Period::Day => "day",
            Period::Month => "month",
        }
    }
}

/// Where an org's billing cycle starts. Month periods then run from the anchor's day-of-month and
/// time of day (clamped to the length of short months) instead of the calendar month.
pub type BillingAnchor = DateTime<Utc>;

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

/// The window of `period` containing `now`. The anchor only affects month periods.
pub fn window(period: Period, now: DateTime<Utc>, anchor: Option<BillingAnchor>) -> Window {
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
        Period::Month => month_window(now, anchor),
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

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn calendar_periods_are_aligned_in_utc() {
        let now = t("2026-11-25T06:18:53.250Z");
        let w = window(Period::Minute, now, None);
        assert_eq!(
            (w.start, w.end),
            (t("2026-11-25T06:18:00Z"), t("2026-11-25T06:19:00Z"))
        );
        let w = window(Period::Hour, now, None);
        assert_eq!(
            (w.start, w.end),
            (t("2026-11-25T06:00:00Z"), t("2026-11-25T07:00:00Z"))
        );
        let w = window(Period::Day, now, None);
        assert_eq!(
            (w.start, w.end),
            (t("2026-11-25T00:00:00Z"), t("2026-11-26T00:00:00Z"))
        );
        let w = window(Period::Month, now, None);
        assert_eq!(
            (w.start, w.end),
            (t("2026-11-01T00:00:00Z"), t("2026-12-01T00:00:00Z"))
        );
        let w = window(Period::Month, t("2026-12-31T23:59:59Z"), None);
        assert_eq!(
            (w.start, w.end),
            (t("2026-12-01T00:00:00Z"), t("2027-01-01T00:00:00Z"))
        );
    }

    #[test]
    fn boundaries_belong_to_the_new_period() {
        let w = window(Period::Month, t("2026-12-01T00:00:00Z"), None);
        assert_eq!(w.start, t("2026-12-01T00:00:00Z"));
    }

    #[test]
    fn anchored_months_follow_the_billing_day_and_clamp_short_months() {
        let anchor = Some(t("2026-01-31T12:00:00Z"));
        let w = window(Period::Month, t("2026-02-15T00:00:00Z"), anchor);
        assert_eq!(
            (w.start, w.end),
            (t("2026-01-31T12:00:00Z"), t("2026-02-28T12:00:00Z"))
        );
        let w = window(Period::Month, t("2026-02-28T12:00:00Z"), anchor);
        assert_eq!(
            (w.start, w.end),
            (t("2026-02-28T12:00:00Z"), t("2026-03-31T12:00:00Z"))
        );
        let w = window(Period::Month, t("2026-03-05T00:00:00Z"), anchor);
        assert_eq!(w.start, t("2026-02-28T12:00:00Z"));
    }

    #[test]
    fn seconds_until_end_rounds_up() {
        let w = window(Period::Minute, t("2026-11-25T06:18:59.001Z"), None);
        assert_eq!(w.seconds_until_end(t("2026-11-25T06:18:59.001Z")), 1);
        assert_eq!(w.length_seconds(), 60);
    }
}
