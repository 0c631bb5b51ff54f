//! Cron expressions: parsing (croner), shared by `pipe validate` and the `scheduler` crate so
//! both accept exactly the same expressions.
//!
//! croner is not DST-proof on its own; the `scheduler` crate wraps it (next fire times
//! through the timezone's wall clock, decision 0018). Here we only parse.

/// Parse a cron expression (5 fields, or 6 with seconds first).
pub fn parse(expr: &str) -> Result<croner::Cron, String> {
    let fields = expr.split_whitespace().count();
    if !(5..=6).contains(&fields) {
        return Err(format!(
            "expected 5 fields (minute hour day month weekday), or 6 with seconds first, found {fields}"
        ));
    }
    let cron = croner::parser::CronParser::builder()
        .seconds(croner::parser::Seconds::Optional)
        .build()
        .parse(expr)
        .map_err(|e| e.to_string())?;
    if !fires_on_some_day(&cron) {
        return Err(
            "it never fires: no date matches its day-of-month, month and weekday fields".into(),
        );
    }
    Ok(cron)
}

/// Whether some date matches the day and month fields (the time fields always match
/// something). Dates repeat their weekdays every 28 years from 1901 to 2099, so 2000-2027
/// holds every combination; croner would otherwise search for seconds before giving up on
/// `0 0 30 2 *`.
fn fires_on_some_day(cron: &croner::Cron) -> bool {
    use chrono::Datelike;
    let Some(mut day) = chrono::NaiveDate::from_ymd_opt(2000, 1, 1) else {
        return true;
    };
    while day.year() < 2028 {
        let p = &cron.pattern;
        if p.month_match(day.month()).unwrap_or(false)
            && p.day_match(day.year(), day.month(), day.day())
                .unwrap_or(false)
        {
            return true;
        }
        day = match day.succ_opt() {
            Some(next) => next,
            None => return true,
        };
    }
    false
}

/// Check a cron expression (5 fields, or 6 with seconds first).
pub fn cron(expr: &str) -> Result<(), String> {
    parse(expr).map(|_| ())
}
