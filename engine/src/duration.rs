//! Durations as people write them in pipelines: `500ms`, `30s`, `2m`, `1h30m`, `1d`.
//!
//! Every conversion is checked: a duration longer than [`MAX`] (`9223372036854775807d`,
//! `1e308`) is an error at its value, never a panic in `Duration`'s arithmetic, and no
//! accepted duration can overflow when it is added to the clock.

use std::time::Duration;

/// The longest duration a pipeline may give: 100 years. Longer ones are mistakes, and
/// `Instant::now() + d` must not overflow for any accepted `d`.
pub const MAX: Duration = Duration::from_secs(100 * 365 * 86_400);

/// `secs` seconds as a duration, when it is a finite number from 0 to [`MAX`].
pub fn from_secs(secs: f64) -> Result<Duration, String> {
    if !(secs >= 0.0 && secs.is_finite()) {
        return Err(format!(
            "invalid duration {secs} (expected 0 or more seconds)"
        ));
    }
    match Duration::try_from_secs_f64(secs) {
        Ok(d) if d <= MAX => Ok(d),
        _ => Err(too_long(&format!("{secs:e}s"))),
    }
}

fn too_long(text: &str) -> String {
    format!("duration `{text}` is too long (at most 100 years)")
}

/// Parse `500ms`, `30s`, `2m`, `1h`, `1d` and sums like `1h30m`. A bare number is seconds.
pub fn parse(text: &str) -> Result<Duration, String> {
    let s = text.trim();
    if s.is_empty() {
        return Err("empty duration".into());
    }
    if let Ok(secs) = s.parse::<f64>() {
        if secs >= 0.0 && secs.is_finite() {
            return from_secs(secs).map_err(|_| too_long(s));
        }
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        if num_len == 0 {
            return Err(bad(text));
        }
        let n: f64 = rest[..num_len].parse().map_err(|_| bad(text))?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let unit = rest[..unit_len].trim();
        rest = &rest[unit_len..];
        let secs = match unit {
            "ms" => n / 1000.0,
            "s" | "sec" | "secs" => n,
            "m" | "min" | "mins" => n * 60.0,
            "h" | "hr" | "hrs" => n * 3600.0,
            "d" | "day" | "days" => n * 86400.0,
            _ => return Err(bad(text)),
        };
        total = from_secs(secs)
            .ok()
            .and_then(|d| total.checked_add(d))
            .filter(|t| *t <= MAX)
            .ok_or_else(|| too_long(s))?;
    }
    Ok(total)
}

fn bad(text: &str) -> String {
    format!("invalid duration `{text}` (expected a number with a unit: 500ms, 30s, 2m, 1h, 1d)")
}

/// Format for people: `850ms`, `12.3s`, `4m05s`.
pub fn human(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        format!("{ms}ms")
    } else if ms < 60_000 {
        format!("{:.1}s", d.as_secs_f64())
    } else {
        let s = d.as_secs();
        format!("{}m{:02}s", s / 60, s % 60)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn parses_units() {
        assert_eq!(parse("2s").unwrap(), Duration::from_secs(2));
        assert_eq!(parse("1m").unwrap(), Duration::from_secs(60));
        assert_eq!(parse("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse("5").unwrap(), Duration::from_secs(5));
        assert!(parse("soon").is_err());
        assert!(parse("5 parsecs").is_err());
    }

    #[test]
    fn huge_durations_are_errors_not_panics() {
        for text in [
            "9223372036854775807d",
            "1e308",
            "18446744073709551615s",
            "18446744073709551615",
            "99999999999999999999999999h",
            "36600d",
            "36000d36000d",
        ] {
            let e = parse(text).unwrap_err();
            assert!(e.contains("too long"), "{text}: {e}");
        }
        assert!(from_secs(f64::MAX).is_err());
        assert!(from_secs(-1.0).is_err());
        assert_eq!(parse("36500d").unwrap(), MAX);
    }
}
