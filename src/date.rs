//! Calendar arithmetic for timestamps, with no clock and no time-zone database: the one home
//! of the date math the ACK builder (HL7 `DTM`), the store's export (RFC 3339) and the CLI
//! share.

/// The proleptic Gregorian `(year, month, day)` of `days` after (or, negative, before)
/// 1970-01-01.
///
/// Howard Hinnant's `civil_from_days` (<http://howardhinnant.github.io/date_algorithms.html>):
/// eras of 400 years (146 097 days) starting on 0000-03-01, so the leap day falls at the end
/// of each computed year.
///
/// ```
/// use mllp_reactor::date::civil_from_days;
///
/// assert_eq!(civil_from_days(0), (1970, 1, 1));
/// assert_eq!(civil_from_days(11_016), (2000, 2, 29));
/// assert_eq!(civil_from_days(-1), (1969, 12, 31));
/// ```
pub fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468; // days since 0000-03-01
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_from_march = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_from_march + 2) / 5 + 1;
    let month = if month_from_march < 10 {
        month_from_march + 3
    } else {
        month_from_march - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    // Both fit: month is 1..=12, day 1..=31.
    (year, month as u32, day as u32)
}

/// Days after (or, negative, before) 1970-01-01 of the proleptic Gregorian date
/// `year-month-day`: the inverse of [`civil_from_days`] (Howard Hinnant's `days_from_civil`).
/// `month` is 1..=12 and `day` 1..=31; the caller checks the ranges.
///
/// ```
/// use mllp_reactor::date::{civil_from_days, days_from_civil};
///
/// assert_eq!(days_from_civil(1970, 1, 1), 0);
/// assert_eq!(days_from_civil(2000, 3, 1), 11_017);
/// assert_eq!(civil_from_days(days_from_civil(2024, 2, 29)), (2024, 2, 29));
/// ```
pub fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let year_of_era = y - era * 400;
    let month_from_march = (month + 9) % 12;
    let day_of_year = (153 * month_from_march + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}
