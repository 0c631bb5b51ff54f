//! Cron expressions: parsing (croner) and the next fire times in a timezone.
//!
//! croner is not DST-proof on its own; the scheduler (a later issue) wraps it. Here we only
//! check that an expression parses, for `pipe validate`.

/// Check a cron expression (5 fields, or 6 with seconds first).
pub fn cron(expr: &str) -> Result<(), String> {
    let fields = expr.split_whitespace().count();
    if !(5..=6).contains(&fields) {
        return Err(format!(
            "expected 5 fields (minute hour day month weekday), found {fields}"
        ));
    }
    croner::parser::CronParser::builder()
        .seconds(croner::parser::Seconds::Optional)
        .build()
        .parse(expr)
        .map(|_| ())
        .map_err(|e| e.to_string())
}
