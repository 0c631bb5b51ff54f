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
    croner::parser::CronParser::builder()
        .seconds(croner::parser::Seconds::Optional)
        .build()
        .parse(expr)
        .map_err(|e| e.to_string())
}

/// Check a cron expression (5 fields, or 6 with seconds first).
pub fn cron(expr: &str) -> Result<(), String> {
    parse(expr).map(|_| ())
}
