//! Diagnostics: every problem `pipe validate` finds, with file, line, column and a stable code.
//!
//! Codes never change meaning once published (README lists each with an example), so CI
//! annotations and editor integrations can match on them.

use serde::Serialize;
use std::fmt;

/// A 1-based position in a source file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default, Hash)]
pub struct Pos {
    pub line: usize,
    pub col: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Error,
    Warning,
    /// Worth knowing, never a failure (not even with `--deny-warnings`).
    Note,
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Severity::Error => "error",
            Severity::Warning => "warning",
            Severity::Note => "note",
        })
    }
}

/// The stable diagnostic codes. `E0xx` are errors, `W0xx` warnings, `N0xx` notes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Code {
    /// The file is not valid YAML.
    YamlSyntax,
    /// A mapping has the same key twice.
    DuplicateKey,
    /// A key that the format does not know.
    UnknownKey,
    /// A value of the wrong type (a list where a string belongs, a word where a number belongs).
    WrongType,
    /// A required key is missing.
    MissingKey,
    /// `type:` names no registered step type (or connection type).
    UnknownStepType,
    /// `needs`/`input`/a template names a step that does not exist.
    UnknownStep,
    /// `input` names a step that produces no table.
    NotATable,
    /// A template does not parse.
    TemplateSyntax,
    /// A template references a param that is not declared.
    UnknownParam,
    /// A template references an output a step does not have.
    UnknownOutput,
    /// A template references a variable that does not exist.
    UnknownVariable,
    /// The steps form a cycle.
    Cycle,
    /// A cron expression does not parse.
    InvalidCron,
    /// An unknown IANA timezone.
    InvalidTimezone,
    /// A duration such as `30s` does not parse.
    InvalidDuration,
    /// A param default does not match its type.
    InvalidDefault,
    /// An invalid name (pipeline, step id, param).
    InvalidName,
    /// A value outside its allowed range or set.
    InvalidValue,
    /// A `connection:` names an unknown connection.
    UnknownConnection,
    /// A file could not be read.
    Io,
    /// A template applies a filter that does not exist.
    UnknownFilter,
    /// A literal value in a secret field.
    LiteralSecret,
    /// A template inside a quoted SQL string literal (it is bound as a parameter).
    TemplateInSqlLiteral,
    /// `query_text` runs SQL produced at run time, as given (a note).
    DynamicSql,
}

impl Code {
    pub const ALL: &'static [Code] = &[
        Code::YamlSyntax,
        Code::DuplicateKey,
        Code::UnknownKey,
        Code::WrongType,
        Code::MissingKey,
        Code::UnknownStepType,
        Code::UnknownStep,
        Code::NotATable,
        Code::TemplateSyntax,
        Code::UnknownParam,
        Code::UnknownOutput,
        Code::UnknownVariable,
        Code::Cycle,
        Code::InvalidCron,
        Code::InvalidTimezone,
        Code::InvalidDuration,
        Code::InvalidDefault,
        Code::InvalidName,
        Code::InvalidValue,
        Code::UnknownConnection,
        Code::Io,
        Code::UnknownFilter,
        Code::LiteralSecret,
        Code::TemplateInSqlLiteral,
        Code::DynamicSql,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Code::YamlSyntax => "E001",
            Code::DuplicateKey => "E002",
            Code::UnknownKey => "E003",
            Code::WrongType => "E004",
            Code::MissingKey => "E005",
            Code::UnknownStepType => "E006",
            Code::UnknownStep => "E007",
            Code::NotATable => "E008",
            Code::TemplateSyntax => "E009",
            Code::UnknownParam => "E010",
            Code::UnknownOutput => "E011",
            Code::UnknownVariable => "E012",
            Code::Cycle => "E013",
            Code::InvalidCron => "E014",
            Code::InvalidTimezone => "E015",
            Code::InvalidDuration => "E016",
            Code::InvalidDefault => "E017",
            Code::InvalidName => "E018",
            Code::InvalidValue => "E019",
            Code::UnknownConnection => "E020",
            Code::Io => "E021",
            Code::UnknownFilter => "E022",
            Code::LiteralSecret => "W001",
            Code::TemplateInSqlLiteral => "W002",
            Code::DynamicSql => "N001",
        }
    }

    pub fn severity(self) -> Severity {
        if self.as_str().starts_with('N') {
            Severity::Note
        } else if self.as_str().starts_with('W') {
            Severity::Warning
        } else {
            Severity::Error
        }
    }

    /// One line saying what the code means (README's table is generated from this).
    pub fn summary(self) -> &'static str {
        match self {
            Code::YamlSyntax => "the file is not valid YAML",
            Code::DuplicateKey => "a mapping has the same key twice",
            Code::UnknownKey => "a key the format does not know (with a did-you-mean)",
            Code::WrongType => "a value of the wrong type",
            Code::MissingKey => "a required key is missing",
            Code::UnknownStepType => {
                "`type:` names no step or connection type (the known ones are listed)"
            }
            Code::UnknownStep => "`needs`, `input` or a template names a step that does not exist",
            Code::NotATable => "`input` names a step that produces no table",
            Code::TemplateSyntax => "a template does not parse",
            Code::UnknownParam => "a template uses a param that is not declared",
            Code::UnknownOutput => "a template uses an output the step does not have",
            Code::UnknownVariable => "a template uses a variable that does not exist",
            Code::Cycle => "steps depend on each other in a cycle (the whole chain is printed)",
            Code::InvalidCron => "a cron expression does not parse",
            Code::InvalidTimezone => "an unknown IANA timezone",
            Code::InvalidDuration => "a duration such as `30s` does not parse",
            Code::InvalidDefault => "a param default does not match its type",
            Code::InvalidName => "a pipeline, step or param name breaks the naming rule",
            Code::InvalidValue => "a value outside its allowed range or set",
            Code::UnknownConnection => "`connection:` names a connection that is not declared",
            Code::Io => "a file could not be read (or is larger than 64 MB)",
            Code::UnknownFilter => "a template uses a filter that does not exist (with a did-you-mean)",
            Code::LiteralSecret => "a literal value in a secret field (use secret('NAME'))",
            Code::TemplateInSqlLiteral => {
                "a template inside a quoted SQL literal (templates are bound as parameters: `= {{ x }}`, not `= '{{ x }}'`)"
            }
            Code::DynamicSql => "`query_text` runs SQL produced at run time as given (it is always logged)",
        }
    }
}

impl Code {
    /// The code whose [`Code::as_str`] is `text` (`"W002"`).
    pub fn parse(text: &str) -> Option<Code> {
        Code::ALL.iter().copied().find(|c| c.as_str() == text)
    }
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for Code {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// One problem, located in a file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Diagnostic {
    pub file: String,
    pub line: usize,
    pub column: usize,
    pub severity: Severity,
    pub code: Code,
    pub message: String,
}

impl Diagnostic {
    pub fn new(file: &str, pos: Pos, code: Code, message: impl Into<String>) -> Self {
        Diagnostic {
            file: file.to_string(),
            line: pos.line.max(1),
            column: pos.col.max(1),
            severity: code.severity(),
            code,
            message: message.into(),
        }
    }

    fn sort_key(&self) -> (&str, usize, usize, Code, &str) {
        (&self.file, self.line, self.column, self.code, &self.message)
    }
}

impl PartialOrd for Diagnostic {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Diagnostic {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.sort_key().cmp(&other.sort_key())
    }
}

/// Text as one line of a terminal or CI log: control characters (CR, LF, ESC …) are shown
/// escaped (`\n`), so a crafted key or file name cannot start a line of its own (a fake
/// diagnostic, a `::error::` workflow command) or drive the terminal.
pub fn one_line(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.chars().any(char::is_control) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            '\t' => out.push(' '),
            c if c.is_control() => out.extend(c.escape_default()),
            c => out.push(c),
        }
    }
    std::borrow::Cow::Owned(out)
}

/// GitHub workflow-command escaping of a message (the data after `::`).
pub fn github_data(text: &str) -> String {
    text.replace('%', "%25")
        .replace('\r', "%0D")
        .replace('\n', "%0A")
}

/// GitHub workflow-command escaping of a property value (`file=`, `title=`).
pub fn github_property(text: &str) -> String {
    github_data(text).replace(':', "%3A").replace(',', "%2C")
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}[{}]: {}",
            one_line(&self.file),
            self.line,
            self.column,
            self.severity,
            self.code,
            one_line(&self.message)
        )
    }
}

/// A collector of diagnostics for one file.
#[derive(Debug, Default)]
pub struct Diags {
    pub file: String,
    pub items: Vec<Diagnostic>,
}

impl Diags {
    pub fn new(file: &str) -> Self {
        Diags {
            file: file.to_string(),
            items: Vec::new(),
        }
    }
    pub fn push(&mut self, pos: Pos, code: Code, message: impl Into<String>) {
        let d = Diagnostic::new(&self.file, pos, code, message);
        if !self.items.contains(&d) {
            self.items.push(d);
        }
    }
    pub fn has_errors(&self) -> bool {
        self.items.iter().any(|d| d.severity == Severity::Error)
    }
}

/// "did you mean `x`?" for the closest candidate, when one is close enough.
pub fn did_you_mean<'a>(
    word: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    candidates
        .into_iter()
        .map(|c| (strsim::jaro_winkler(word, c), c))
        .filter(|(score, _)| *score > 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0).then_with(|| b.1.cmp(a.1)))
        .map(|(_, c)| c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_escaping() {
        assert_eq!(one_line("a\nb\r\u{1b}[2J\tc"), "a\\nb\\r\\u{1b}[2J c");
        assert_eq!(github_data("50%\n::error::x"), "50%25%0A::error::x");
        assert_eq!(github_property("a,b:c%\n"), "a%2Cb%3Ac%25%0A");
    }
}
