//! A business date as instants: where it starts and ends in the configured time zone, and the
//! grace windows on either side of each cut-off.
//!
//! The business date of an instant is its calendar date in the configured time zone (default
//! `Asia/Shanghai`), exactly as the ledger's `business_date` is computed at booking. A day runs
//! from its first local instant (normally 00:00) to the next day's first local instant, so a
//! day in a zone with daylight saving may be 23 or 25 hours long. The grace window of a cut-off
//! (midnight) is `grace_minutes` on either side of it.

use chrono::{DateTime, NaiveDate, TimeDelta, TimeZone, Utc};
use chrono_tz::Tz;

/// The longest grace window accepted: the windows around a day's two cut-offs must not meet.
pub const MAX_GRACE_MINUTES: u32 = 12 * 60;

/// One business date in one time zone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Day {
    pub date: NaiveDate,
    pub tz: Tz,
    /// The day's first instant (its start cut-off).
    pub start: DateTime<Utc>,
    /// The next day's first instant (its end cut-off); the day is `[start, end)`.
    pub end: DateTime<Utc>,
    pub grace_minutes: u32,
}

/// Where an instant falls relative to a day.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// Inside the day.
    OnDay,
    /// On a neighbouring day, inside the grace window of the cut-off it shares with this day.
    Edge,
    /// Anywhere else.
    Outside,
}

impl Day {
    /// The day `date` in `tz` with a grace window of `grace_minutes` around each cut-off.
    pub fn new(date: NaiveDate, tz: Tz, grace_minutes: u32) -> Result<Day, String> {
        if grace_minutes > MAX_GRACE_MINUTES {
            return Err(format!(
                "reconciler.grace_minutes is {grace_minutes}; at most {MAX_GRACE_MINUTES} (12 hours) \
                 so that the windows around a day's two cut-offs do not meet"
            ));
        }
        let next = date
            .succ_opt()
            .ok_or_else(|| format!("{date} has no next day"))?;
        Ok(Day {
            date,
            tz,
            start: first_instant(date, tz)?,
            end: first_instant(next, tz)?,
            grace_minutes,
        })
    }

    pub fn grace(&self) -> TimeDelta {
        TimeDelta::minutes(i64::from(self.grace_minutes))
    }

    /// The business date of an instant.
    pub fn business_date_of(&self, at: DateTime<Utc>) -> NaiveDate {
        at.with_timezone(&self.tz).date_naive()
    }

    /// Where `at` falls relative to this day.
    pub fn place(&self, at: DateTime<Utc>) -> Placement {
        let grace = self.grace();
        if at >= self.start && at < self.end {
            Placement::OnDay
        } else if (at >= self.start - grace && at < self.start)
            || (at >= self.end && at < self.end + grace)
        {
            Placement::Edge
        } else {
            Placement::Outside
        }
    }

    /// Whether, at `as_of`, the grace window after the day's end cut-off is over: what is
    /// recorded live (the ledger, provider attempts) is then complete for that window.
    pub fn next_window_closed(&self, as_of: DateTime<Utc>) -> bool {
        as_of >= self.end + self.grace()
    }

    /// Whether, at `as_of`, the grace window before the day's start cut-off is over.
    pub fn previous_window_closed(&self, as_of: DateTime<Utc>) -> bool {
        as_of >= self.start
    }
}

/// The first instant of `date` in `tz`: local midnight, or the first local time after a gap
/// when midnight does not exist that day.
fn first_instant(date: NaiveDate, tz: Tz) -> Result<DateTime<Utc>, String> {
    let midnight = date.and_hms_opt(0, 0, 0).ok_or("no midnight")?;
    for minutes in 0..=(24 * 60) {
        let local = midnight + TimeDelta::minutes(minutes);
        if let Some(t) = tz.from_local_datetime(&local).earliest() {
            return Ok(t.with_timezone(&Utc));
        }
    }
    Err(format!("{date} has no local time in {tz}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn a_shanghai_day_runs_from_16_00_utc_to_16_00_utc() {
        let d = Day::new(
            NaiveDate::from_ymd_opt(2026, 11, 21).unwrap(),
            chrono_tz::Asia::Shanghai,
            30,
        )
        .unwrap();
        assert_eq!(d.start, at("2026-11-20T16:00:00Z"));
        assert_eq!(d.end, at("2026-11-21T16:00:00Z"));
        assert_eq!(d.place(at("2026-11-21T15:59:59.999Z")), Placement::OnDay);
        assert_eq!(d.place(at("2026-11-21T16:00:00Z")), Placement::Edge);
        assert_eq!(d.place(at("2026-11-21T16:29:59Z")), Placement::Edge);
        assert_eq!(d.place(at("2026-11-21T16:30:00Z")), Placement::Outside);
        assert_eq!(d.place(at("2026-11-20T15:30:00Z")), Placement::Edge);
        assert_eq!(d.place(at("2026-11-20T15:29:59Z")), Placement::Outside);
    }

    #[test]
    fn a_day_with_a_daylight_saving_change_is_not_24_hours_long() {
        let d = Day::new(
            NaiveDate::from_ymd_opt(2026, 3, 29).unwrap(),
            chrono_tz::Europe::Berlin,
            0,
        )
        .unwrap();
        assert_eq!(d.end - d.start, TimeDelta::hours(23));
    }

    #[test]
    fn a_grace_window_longer_than_half_a_day_is_refused() {
        let e = Day::new(
            NaiveDate::from_ymd_opt(2026, 11, 21).unwrap(),
            chrono_tz::UTC,
            721,
        )
        .unwrap_err();
        assert!(e.contains("reconciler.grace_minutes"), "{e}");
    }
}
