//! Rewriting `sql_server` / `sql_port` in an `ejabberd.yml`, in place.
//!
//! The file is the operator's: every line, comment, indentation, quoting style and key order
//! that is not one of those two values must come out byte for byte as it went in. A full YAML
//! parser would lose all of that, so this module scans the block-style subset that ejabberd
//! configurations use (mappings, sequences, plain and quoted scalars, comments, block scalars,
//! flow collections that do not concern us) and edits the value spans it found.
//!
//! Invariants:
//! - Only values at the top level and directly under `host_config: <vhost>:` are rewritten;
//!   `sql_server`/`sql_port` anywhere else makes the whole rewrite fail, because ejabberd
//!   would read a value we did not change.
//! - Anything we cannot rewrite with certainty (a flow mapping holding an SQL key, an anchor,
//!   alias or tag on a value, a multi-line or unterminated value, a duplicate key, tabs in
//!   indentation, several documents, no `sql_server` at all) is an error and produces no text.
//! - Rewriting is idempotent: applying the same target twice yields the same text.

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;

/// Why a configuration text cannot be rewritten or read. Line numbers start at 1.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("line {line}: tab in indentation; YAML indentation must use spaces")]
    TabIndent { line: usize },
    #[error("line {line}: a second YAML document; ejabberd reads one document per file")]
    MultipleDocuments { line: usize },
    #[error(
        "line {line}: `{key}` is inside a flow collection ({{...}} or [...]); rewrite it in block style"
    )]
    FlowStyle { line: usize, key: String },
    #[error("line {line}: `{key}` uses an anchor, alias or tag; write the value directly")]
    IndirectValue { line: usize, key: String },
    #[error("line {line}: `{key}` has a value spanning several lines; write it on one line")]
    MultiLineValue { line: usize, key: String },
    #[error("line {line}: malformed quoted scalar: {reason}")]
    BadScalar { line: usize, reason: String },
    #[error("line {line}: `{key}` appears twice in the same mapping")]
    DuplicateKey { line: usize, key: String },
    #[error(
        "line {line}: `{key}` at `{path}`: only the top level and `host_config.<vhost>` are managed"
    )]
    UnexpectedLocation {
        line: usize,
        key: String,
        path: String,
    },
    #[error("line {line}: sql_port {value:?} is not a TCP port number")]
    BadPort { line: usize, value: String },
    #[error("no `sql_server` in the file: nothing tells ejabberd where its database is")]
    NoSqlServer,
    #[error("target host {0:?} is not a hostname or IP address")]
    BadTargetHost(String),
}

/// Where ejabberd should find its database: a validated host and a port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SqlTarget {
    host: String,
    port: u16,
}

impl SqlTarget {
    /// Accepts hostnames, IPv4 and IPv6 literals; anything that would need YAML escaping or
    /// could smuggle syntax into the file is refused.
    pub fn new(host: impl Into<String>, port: u16) -> Result<Self, ConfigError> {
        let host = host.into();
        let valid = !host.is_empty()
            && host.len() <= 253
            && host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b':'))
            && !host.starts_with('-');
        if valid && port != 0 {
            Ok(Self { host, port })
        } else {
            Err(ConfigError::BadTargetHost(host))
        }
    }

    pub fn host(&self) -> &str {
        &self.host
    }

    pub fn port(&self) -> u16 {
        self.port
    }
}

impl fmt::Display for SqlTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// The SQL options of one section (top level or one `host_config` vhost), as written.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SqlSection {
    pub sql_type: Option<String>,
    pub server: Option<String>,
    pub port: Option<u16>,
    pub database: Option<String>,
    pub username: Option<String>,
    pub password: Option<String>,
}

impl SqlSection {
    fn overlay(&self, base: &SqlSection) -> SqlSection {
        SqlSection {
            sql_type: self.sql_type.clone().or_else(|| base.sql_type.clone()),
            server: self.server.clone().or_else(|| base.server.clone()),
            port: self.port.or(base.port),
            database: self.database.clone().or_else(|| base.database.clone()),
            username: self.username.clone().or_else(|| base.username.clone()),
            password: self.password.clone().or_else(|| base.password.clone()),
        }
    }
}

/// How ejabberd connects to its database for one vhost, with ejabberd's defaults applied
/// (`sql_port` 5432, database and user `ejabberd`, empty password).
#[derive(Clone, PartialEq, Eq)]
pub struct DbParams {
    pub sql_type: Option<String>,
    pub host: String,
    pub port: u16,
    pub database: String,
    pub username: String,
    pub password: String,
}

impl fmt::Debug for DbParams {
    // The password must never reach a log line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DbParams")
            .field("sql_type", &self.sql_type)
            .field("host", &self.host)
            .field("port", &self.port)
            .field("database", &self.database)
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

/// The SQL settings found in a file: the top-level section and one per `host_config` vhost.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SqlSettings {
    pub global: SqlSection,
    pub vhosts: BTreeMap<String, SqlSection>,
}

impl SqlSettings {
    /// Reads the SQL settings of `text` (same scanner and refusals as [`rewrite`]).
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        Ok(scan(text)?.settings)
    }

    /// What ejabberd uses for `vhost`: its `host_config` values over the top-level ones.
    /// `None` when no `sql_server` applies to it.
    pub fn effective(&self, vhost: &str) -> Option<DbParams> {
        let section = match self.vhosts.get(vhost) {
            Some(own) => own.overlay(&self.global),
            None => self.global.clone(),
        };
        Some(DbParams {
            sql_type: section.sql_type,
            host: section.server?,
            port: section.port.unwrap_or(5432),
            database: section.database.unwrap_or_else(|| "ejabberd".to_owned()),
            username: section.username.unwrap_or_else(|| "ejabberd".to_owned()),
            password: section.password.unwrap_or_default(),
        })
    }
}

/// The outcome of [`rewrite`]: the new text and whether it differs from the input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rewritten {
    pub text: String,
    pub changed: bool,
    /// Settings as they were before the rewrite (the old servers to check for leftovers).
    pub before: SqlSettings,
}

/// Points every `sql_server` / `sql_port` of `text` at `target`, inserting `sql_port` right
/// after `sql_server` in sections that lack it. See the module docs for what is refused.
pub fn rewrite(text: &str, target: &SqlTarget) -> Result<Rewritten, ConfigError> {
    let scanned = scan(text)?;
    if !scanned.sections.values().any(|s| s.server.is_some()) {
        return Err(ConfigError::NoSqlServer);
    }
    // Edits are (byte range in text, replacement); ranges never overlap by construction.
    let mut edits: Vec<(Range<usize>, String)> = Vec::new();
    for section in scanned.sections.values() {
        if let Some(server) = &section.server {
            edits.push((
                server.span.clone(),
                format_host(target.host(), server.style),
            ));
        }
        match (&section.port, &section.server) {
            (Some(port), _) => {
                edits.push((port.span.clone(), format_port(target.port(), port.style)))
            }
            (None, Some(server)) => {
                let at = server.line_end;
                let line = format!("{}sql_port: {}", server.key_indent, target.port());
                let insertion = if server.eol.is_empty() {
                    format!("{}{line}", scanned.newline)
                } else {
                    format!("{line}{}", server.eol)
                };
                edits.push((at..at, insertion));
            }
            (None, None) => {}
        }
    }
    edits.sort_by_key(|(range, _)| range.start);
    let mut out = String::with_capacity(text.len() + 32);
    let mut cursor = 0;
    for (range, replacement) in edits {
        out.push_str(&text[cursor..range.start]);
        out.push_str(&replacement);
        cursor = range.end;
    }
    out.push_str(&text[cursor..]);
    Ok(Rewritten {
        changed: out != text,
        text: out,
        before: scanned.settings,
    })
}

/// How a scalar was written, so a replacement keeps the operator's style.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Style {
    Plain,
    Single,
    Double,
}

fn format_host(host: &str, style: Style) -> String {
    // SqlTarget guarantees no quote or backslash, so no escaping is ever needed.
    match style {
        Style::Single => format!("'{host}'"),
        Style::Double => format!("\"{host}\""),
        Style::Plain if plain_is_string(host) => host.to_owned(),
        Style::Plain => format!("\"{host}\""),
    }
}

/// Whether `host` written unquoted is read back by YAML as that same string (not a number,
/// boolean or null, and no `:` that could read as a mapping).
fn plain_is_string(host: &str) -> bool {
    let lower = host.to_ascii_lowercase();
    let special = matches!(
        lower.as_str(),
        "true" | "false" | "yes" | "no" | "on" | "off" | "null" | "~" | "y" | "n"
    );
    !special
        && !host.contains(':')
        && host.parse::<f64>().is_err()
        && host.bytes().any(|b| !b.is_ascii_digit())
}

fn format_port(port: u16, style: Style) -> String {
    match style {
        Style::Plain => port.to_string(),
        Style::Single => format!("'{port}'"),
        Style::Double => format!("\"{port}\""),
    }
}

/// One `sql_server` or `sql_port` value found in the text.
#[derive(Debug, Clone)]
struct Found {
    span: Range<usize>,
    style: Style,
    /// Byte offset just past the line, line ending included (where a new line goes).
    line_end: usize,
    eol: &'static str,
    /// Whitespace before the key, reused for an inserted `sql_port`.
    key_indent: String,
}

#[derive(Debug, Default)]
struct FoundSection {
    server: Option<Found>,
    port: Option<Found>,
}

struct Scan {
    /// Keyed by vhost; `None` is the top level.
    sections: BTreeMap<Option<String>, FoundSection>,
    settings: SqlSettings,
    newline: &'static str,
}

/// What is open at a given indentation while scanning.
#[derive(Debug, Clone)]
enum Frame {
    /// A key whose value is the nested block below it.
    Key(String),
    /// A sequence item (`- `).
    Item,
}

/// The value part of a `key: value` line, classified.
enum Value {
    /// Nothing on the line: a nested block (or a multi-line scalar) follows.
    Empty,
    Scalar {
        span: Range<usize>,
        style: Style,
        text: String,
    },
    /// `|` or `>`: the following more-indented lines are text.
    BlockScalar,
    /// `[` or `{`: the depth still open at the end of the line, and an SQL key named inside.
    Flow {
        open: usize,
        mentions: Option<String>,
    },
    /// `&anchor`, `*alias` or `!tag`, possibly followed by more.
    Indirect { opens_block: bool },
}

/// Continuation lines that belong to the previous value and must not be read as keys.
#[derive(Debug, Clone, Copy)]
enum Skip {
    None,
    /// Lines indented deeper than `parent` (block scalar or multi-line plain scalar);
    /// `sql_key` marks an SQL value that would continue there.
    Deeper {
        parent: usize,
        sql_key: Option<usize>,
    },
    /// Inside a flow collection until brackets balance.
    Flow {
        open: usize,
    },
}

const SQL_KEYS: [&str; 6] = [
    "sql_type",
    "sql_server",
    "sql_port",
    "sql_database",
    "sql_username",
    "sql_password",
];

fn scan(text: &str) -> Result<Scan, ConfigError> {
    let newline = if text.contains("\r\n") { "\r\n" } else { "\n" };
    let mut sections: BTreeMap<Option<String>, FoundSection> = BTreeMap::new();
    let mut settings = SqlSettings::default();
    let mut stack: Vec<(usize, Frame)> = Vec::new();
    // SQL keys seen per managed section, to refuse duplicates.
    let mut seen: BTreeMap<(Option<String>, String), usize> = BTreeMap::new();
    let mut skip = Skip::None;
    let mut content_seen = false;
    let mut offset = 0;

    for (index, raw) in text.split_inclusive('\n').enumerate() {
        let line_no = index + 1;
        let line_start = offset;
        offset += raw.len();
        let (content, eol) = if let Some(c) = raw.strip_suffix("\r\n") {
            (c, "\r\n")
        } else if let Some(c) = raw.strip_suffix('\n') {
            (c, "\n")
        } else {
            (raw, "")
        };
        let indent = content.len() - content.trim_start_matches(' ').len();
        let rest = &content[indent..];
        let blank = rest.trim().is_empty() || rest.starts_with('#');

        match skip {
            Skip::Flow { open } => {
                let (depth, mentions) = flow_depth(rest, open);
                if let Some(key) = mentions {
                    return Err(ConfigError::FlowStyle { line: line_no, key });
                }
                skip = if depth == 0 {
                    Skip::None
                } else {
                    Skip::Flow { open: depth }
                };
                continue;
            }
            Skip::Deeper { parent, sql_key } => {
                if blank || indent > parent {
                    if let (Some(k), false) = (sql_key, blank) {
                        return Err(ConfigError::MultiLineValue {
                            line: line_no - 1,
                            key: SQL_KEYS[k].to_owned(),
                        });
                    }
                    continue;
                }
                skip = Skip::None;
            }
            Skip::None => {}
        }
        if blank {
            continue;
        }
        if rest.starts_with('\t') {
            return Err(ConfigError::TabIndent { line: line_no });
        }
        if indent == 0 && (rest == "---" || rest.starts_with("--- ") || rest == "...") {
            if content_seen {
                return Err(ConfigError::MultipleDocuments { line: line_no });
            }
            continue;
        }
        content_seen = true;

        // Sequence dashes open items; the item's mapping starts after "- ".
        let mut col = indent;
        let mut body = rest;
        let mut dashes = Vec::new();
        while body == "-" || body.starts_with("- ") {
            dashes.push(col);
            let after = &body[1..];
            let spaces = after.len() - after.trim_start_matches(' ').len();
            col += 1 + spaces;
            body = &after[spaces..];
        }
        let first_col = dashes.first().copied().unwrap_or(col);
        // A dash at the same indentation as the key that opened a block belongs to that key.
        while let Some((top_indent, frame)) = stack.last() {
            let keeps =
                *top_indent == first_col && !dashes.is_empty() && matches!(frame, Frame::Key(_));
            if *top_indent > first_col || (*top_indent == first_col && !keeps) {
                stack.pop();
            } else {
                break;
            }
        }
        for &dash_col in &dashes {
            stack.push((dash_col, Frame::Item));
        }
        if body.is_empty() || body.starts_with('#') {
            continue;
        }
        let body_start = line_start + (content.len() - body.len());

        let Some((key, value_part)) = split_key(body, line_no)? else {
            // A scalar sequence item or a continuation of a plain scalar.
            skip = Skip::Deeper {
                parent: col,
                sql_key: None,
            };
            continue;
        };
        let value_offset = body_start + (body.len() - value_part.len());
        let value = classify(value_part, value_offset, line_no)?;
        let path: Vec<String> = stack
            .iter()
            .map(|(_, f)| match f {
                Frame::Key(k) => k.clone(),
                Frame::Item => "-".to_owned(),
            })
            .collect();
        let sql_index = SQL_KEYS.iter().position(|k| *k == key);

        if let Value::Flow {
            mentions: Some(named),
            ..
        } = &value
        {
            return Err(ConfigError::FlowStyle {
                line: line_no,
                key: named.clone(),
            });
        }
        let section = match path.as_slice() {
            [] => Some(None),
            [hc, vhost] if hc == "host_config" => Some(Some(vhost.clone())),
            _ => None,
        };
        if let (Some(k), Some(section)) = (sql_index, section) {
            if seen
                .insert((section.clone(), key.clone()), line_no)
                .is_some()
            {
                return Err(ConfigError::DuplicateKey { line: line_no, key });
            }
            let (span, style, decoded) = match value {
                Value::Scalar { span, style, text } => (span, style, text),
                Value::Empty | Value::BlockScalar => {
                    return Err(ConfigError::MultiLineValue { line: line_no, key });
                }
                Value::Flow { .. } => return Err(ConfigError::FlowStyle { line: line_no, key }),
                Value::Indirect { .. } => {
                    return Err(ConfigError::IndirectValue { line: line_no, key });
                }
            };
            let sink = match &section {
                None => &mut settings.global,
                Some(v) => settings.vhosts.entry(v.clone()).or_default(),
            };
            match k {
                0 => sink.sql_type = Some(decoded),
                1 => sink.server = Some(decoded),
                2 => {
                    let port = decoded
                        .trim()
                        .parse::<u16>()
                        .ok()
                        .filter(|p| *p != 0)
                        .ok_or(ConfigError::BadPort {
                            line: line_no,
                            value: decoded.clone(),
                        })?;
                    sink.port = Some(port);
                }
                3 => sink.database = Some(decoded),
                4 => sink.username = Some(decoded),
                _ => sink.password = Some(decoded),
            }
            if k == 1 || k == 2 {
                let found = Found {
                    span,
                    style,
                    line_end: line_start + raw.len(),
                    eol,
                    key_indent: " ".repeat(col),
                };
                let entry = sections.entry(section).or_default();
                if k == 1 {
                    entry.server = Some(found);
                } else {
                    entry.port = Some(found);
                }
            }
            // A value on this line followed by deeper lines would be a multi-line scalar.
            skip = Skip::Deeper {
                parent: col,
                sql_key: Some(k),
            };
            continue;
        }
        if key == "sql_server" || key == "sql_port" {
            return Err(ConfigError::UnexpectedLocation {
                line: line_no,
                key,
                path: path.join("."),
            });
        }

        match value {
            Value::Empty | Value::Indirect { opens_block: true } => {
                stack.push((col, Frame::Key(key)));
            }
            other => skip = skip_after(&other, col),
        }
    }

    Ok(Scan {
        sections,
        settings,
        newline,
    })
}

/// How to treat the lines that continue a value we do not manage.
fn skip_after(value: &Value, col: usize) -> Skip {
    match value {
        Value::Flow { open, .. } if *open > 0 => Skip::Flow { open: *open },
        Value::Flow { .. } => Skip::None,
        Value::BlockScalar | Value::Scalar { .. } | Value::Indirect { .. } | Value::Empty => {
            Skip::Deeper {
                parent: col,
                sql_key: None,
            }
        }
    }
}

/// Splits `key: value` (the key plain or quoted). `None` when the line holds no key.
fn split_key(body: &str, line: usize) -> Result<Option<(String, &str)>, ConfigError> {
    let (key, after) = if body.starts_with('"') || body.starts_with('\'') {
        let (decoded, consumed, _) = quoted(body, line)?;
        let after = body[consumed..].trim_start_matches(' ');
        match after.strip_prefix(':') {
            Some(a) if a.is_empty() || a.starts_with(' ') => (decoded, a),
            _ => return Ok(None),
        }
    } else {
        let bytes = body.as_bytes();
        let mut found = None;
        for (i, &b) in bytes.iter().enumerate() {
            if b == b'#' && i > 0 && bytes[i - 1] == b' ' {
                break;
            }
            if b == b':' && (i + 1 == bytes.len() || bytes[i + 1] == b' ') {
                found = Some(i);
                break;
            }
        }
        let Some(i) = found else { return Ok(None) };
        (body[..i].trim_end().to_owned(), &body[i + 1..])
    };
    Ok(Some((key, after)))
}

/// Classifies what follows `key:`; `offset` is the byte offset of `part` in the whole text.
fn classify(part: &str, offset: usize, line: usize) -> Result<Value, ConfigError> {
    let lead = part.len() - part.trim_start_matches(' ').len();
    let v = &part[lead..];
    let start = offset + lead;
    if v.is_empty() || v.starts_with('#') {
        return Ok(Value::Empty);
    }
    match v.as_bytes()[0] {
        b'|' | b'>' => Ok(Value::BlockScalar),
        b'[' | b'{' => {
            let (open, mentions) = flow_depth(v, 0);
            Ok(Value::Flow { open, mentions })
        }
        b'&' | b'*' | b'!' => {
            // `key: &anchor` alone opens a block; `&a value` or `*alias` is inline.
            let word_end = v.find(' ').unwrap_or(v.len());
            let tail = v[word_end..].trim_start();
            Ok(Value::Indirect {
                opens_block: v.starts_with('&') && (tail.is_empty() || tail.starts_with('#')),
            })
        }
        b'"' | b'\'' => {
            let (text, consumed, style) = quoted(v, line)?;
            let tail = v[consumed..].trim_start_matches(' ');
            if !(tail.is_empty() || tail.starts_with('#')) {
                return Err(ConfigError::BadScalar {
                    line,
                    reason: format!("unexpected text after the closing quote: {tail:?}"),
                });
            }
            Ok(Value::Scalar {
                span: start..start + consumed,
                style,
                text,
            })
        }
        _ => {
            let end = v.find(" #").unwrap_or(v.len());
            let text = v[..end].trim_end();
            Ok(Value::Scalar {
                span: start..start + text.len(),
                style: Style::Plain,
                text: text.to_owned(),
            })
        }
    }
}

/// Decodes a quoted scalar at the start of `s`: (value, bytes consumed, style).
fn quoted(s: &str, line: usize) -> Result<(String, usize, Style), ConfigError> {
    let bad = |reason: &str| ConfigError::BadScalar {
        line,
        reason: reason.to_owned(),
    };
    let mut out = String::new();
    if let Some(inner) = s.strip_prefix('\'') {
        let mut chars = inner.char_indices().peekable();
        while let Some((i, c)) = chars.next() {
            if c == '\'' {
                if chars.peek().is_some_and(|(_, n)| *n == '\'') {
                    chars.next();
                    out.push('\'');
                } else {
                    return Ok((out, i + 2, Style::Single));
                }
            } else {
                out.push(c);
            }
        }
        return Err(bad(
            "unterminated single-quoted scalar (multi-line values are not supported)",
        ));
    }
    let inner = s.strip_prefix('"').ok_or_else(|| bad("expected a quote"))?;
    let mut chars = inner.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Ok((out, i + 2, Style::Double)),
            '\\' => {
                let (_, e) = chars.next().ok_or_else(|| bad("dangling backslash"))?;
                let simple = match e {
                    '\\' => Some('\\'),
                    '"' => Some('"'),
                    '/' => Some('/'),
                    'n' => Some('\n'),
                    't' => Some('\t'),
                    'r' => Some('\r'),
                    '0' => Some('\0'),
                    ' ' => Some(' '),
                    _ => None,
                };
                if let Some(ch) = simple {
                    out.push(ch);
                    continue;
                }
                let digits = match e {
                    'x' => 2,
                    'u' => 4,
                    'U' => 8,
                    _ => return Err(bad(&format!("unsupported escape \\{e}"))),
                };
                let mut code = 0u32;
                for _ in 0..digits {
                    let (_, d) = chars.next().ok_or_else(|| bad("short hex escape"))?;
                    let v = d.to_digit(16).ok_or_else(|| bad("bad hex escape"))?;
                    code = code * 16 + v;
                }
                out.push(char::from_u32(code).ok_or_else(|| bad("escape is not a character"))?);
            }
            other => out.push(other),
        }
    }
    Err(bad(
        "unterminated double-quoted scalar (multi-line values are not supported)",
    ))
}

/// Bracket depth after scanning `s` from depth `open`, ignoring quoted text and comments;
/// also reports an SQL key named inside the collection.
fn flow_depth(s: &str, open: usize) -> (usize, Option<String>) {
    let mut depth = open;
    let mut quote: Option<char> = None;
    let mut prev = ' ';
    for c in s.chars() {
        match quote {
            Some(q) if c == q => quote = None,
            Some(_) => {}
            None => match c {
                '"' | '\'' => quote = Some(c),
                '#' if prev == ' ' => break,
                '[' | '{' => depth += 1,
                ']' | '}' => depth = depth.saturating_sub(1),
                _ => {}
            },
        }
        prev = c;
    }
    let mentions = ["sql_server", "sql_port"]
        .iter()
        .find(|k| s.contains(*k))
        .map(|k| (*k).to_owned());
    (depth, mentions)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// The reference stand's layout: SQL settings only under `host_config: domain.local`.
    const STAND: &str = r#"###
###              ejabberd configuration file
###
hosts:
  - domain.local

loglevel: info

certfiles:
  - "/etc/ejabberd/ejabberd.pem"

listen:
  -
    port: 5222
    ip: "::"
    module: ejabberd_c2s
    max_stanza_size: 262144
    shaper: c2s_shaper
    access: c2s
    starttls_required: true
  - port: 5280
    ip: "::"
    module: ejabberd_http
    request_handlers:
      /admin: ejabberd_web_admin

host_config:
  domain.local:
    sql_type: pgsql
    sql_server: 192.168.1.10   # psql1server, the primary
    sql_database: "ejabberd-domain-local"
    sql_username: ejabberd
    sql_password: 'it''s secret'
    auth_method: [sql]

acl:
  admin:
    user: admin@domain.local

welcome: |
  sql_server: not a key, block text
  sql_port: 1

modules:
  mod_private: {}
"#;

    fn target(host: &str, port: u16) -> SqlTarget {
        SqlTarget::new(host, port).unwrap()
    }

    #[test]
    fn stand_file_rewritten_in_place_with_port_inserted() {
        let out = rewrite(STAND, &target("192.168.1.11", 5433)).unwrap();
        assert!(out.changed);
        let expected = STAND.replace(
            "    sql_server: 192.168.1.10   # psql1server, the primary\n",
            "    sql_server: 192.168.1.11   # psql1server, the primary\n    sql_port: 5433\n",
        );
        assert_eq!(out.text, expected);
        // The block scalar that merely mentions the keys is untouched.
        assert!(
            out.text
                .contains("  sql_server: not a key, block text\n  sql_port: 1\n")
        );
        assert_eq!(
            out.before.vhosts["domain.local"].server.as_deref(),
            Some("192.168.1.10")
        );
    }

    #[test]
    fn rewrite_is_idempotent() {
        let t = target("psql2server.domain.local", 5432);
        let once = rewrite(STAND, &t).unwrap();
        let twice = rewrite(&once.text, &t).unwrap();
        assert!(!twice.changed);
        assert_eq!(twice.text, once.text);
    }

    #[test]
    fn settings_decode_quotes_and_apply_defaults() {
        let settings = SqlSettings::parse(STAND).unwrap();
        let db = settings.effective("domain.local").unwrap();
        assert_eq!(db.sql_type.as_deref(), Some("pgsql"));
        assert_eq!((db.host.as_str(), db.port), ("192.168.1.10", 5432));
        assert_eq!(db.database, "ejabberd-domain-local");
        assert_eq!(db.username, "ejabberd");
        assert_eq!(db.password, "it's secret");
        assert!(settings.effective("other.local").is_none());
        assert!(
            !format!("{db:?}").contains("secret"),
            "Debug must hide the password"
        );
    }

    const TOP: &str = "# global SQL\r\nsql_type: pgsql\r\nsql_server: \"db-old\" # quoted\r\nsql_port: '5432'\r\nsql_password: \"p\\\"w\"\r\nhosts: [\"a.local\", \"b.local\"]\r\nhost_config:\r\n  \"b.local\":\r\n    sql_port: 6000\r\n";

    #[test]
    fn top_level_keeps_quoting_crlf_and_rewrites_vhost_ports() {
        let out = rewrite(TOP, &target("10.0.0.2", 5440)).unwrap();
        assert_eq!(
            out.text,
            TOP.replace("\"db-old\"", "\"10.0.0.2\"")
                .replace("'5432'", "'5440'")
                .replace("sql_port: 6000", "sql_port: 5440")
        );
        let settings = SqlSettings::parse(&out.text).unwrap();
        assert_eq!(settings.global.password.as_deref(), Some("p\"w"));
        let b = settings.effective("b.local").unwrap();
        assert_eq!((b.host.as_str(), b.port), ("10.0.0.2", 5440));
    }

    #[test]
    fn plain_values_that_would_change_type_get_quoted() {
        let text = "sql_server: db1\nsql_port: 5432\n";
        assert_eq!(
            rewrite(text, &target("::1", 5432)).unwrap().text,
            "sql_server: \"::1\"\nsql_port: 5432\n"
        );
        assert_eq!(
            rewrite(text, &target("true", 5432)).unwrap().text,
            "sql_server: \"true\"\nsql_port: 5432\n"
        );
        assert_eq!(
            rewrite(text, &target("127.0.0.1", 1)).unwrap().text,
            "sql_server: 127.0.0.1\nsql_port: 1\n"
        );
    }

    #[test]
    fn insertion_at_end_of_file_without_newline() {
        let out = rewrite("sql_server: a", &target("b", 7)).unwrap();
        assert_eq!(out.text, "sql_server: b\nsql_port: 7");
    }

    #[test]
    fn sequences_at_parent_indent_do_not_confuse_paths() {
        let text = "listen:\n- port: 5222\n  module: ejabberd_c2s\nhost_config:\n  x.local:\n    sql_server: a\n";
        let out = rewrite(text, &target("b", 5)).unwrap();
        assert_eq!(
            out.text,
            text.replace("sql_server: a\n", "sql_server: b\n    sql_port: 5\n")
        );
    }

    fn refused(text: &str) -> ConfigError {
        rewrite(text, &target("b", 5)).unwrap_err()
    }

    #[test]
    fn refusals() {
        assert_eq!(refused("hosts: [a]\n"), ConfigError::NoSqlServer);
        assert!(matches!(
            refused("host_config:\n  d.local: {sql_type: pgsql, sql_server: a}\n"),
            ConfigError::FlowStyle { line: 2, .. }
        ));
        assert!(matches!(
            refused("host_config: {\n  d.local: {sql_server: a}}\n"),
            ConfigError::FlowStyle { line: 2, .. }
        ));
        assert!(matches!(
            refused("sql_server: &db a\n"),
            ConfigError::IndirectValue { line: 1, .. }
        ));
        assert!(matches!(
            refused("sql_server: *db\n"),
            ConfigError::IndirectValue { .. }
        ));
        assert!(matches!(
            refused("sql_server: !!str a\n"),
            ConfigError::IndirectValue { .. }
        ));
        assert!(matches!(
            refused("sql_server:\n  a\n"),
            ConfigError::MultiLineValue { .. }
        ));
        assert!(matches!(
            refused("sql_server: a\n  b\n"),
            ConfigError::MultiLineValue { line: 1, .. }
        ));
        assert!(matches!(
            refused("sql_server: \"a\n  b\"\n"),
            ConfigError::BadScalar { line: 1, .. }
        ));
        assert!(matches!(
            refused("sql_server: a\nsql_server: b\n"),
            ConfigError::DuplicateKey { line: 2, .. }
        ));
        assert!(matches!(
            refused("sql_server: a\nsql_port: x\n"),
            ConfigError::BadPort { .. }
        ));
        assert!(matches!(
            refused("sql_server: a\n\tsql_port: 1\n"),
            ConfigError::TabIndent { line: 2 }
        ));
        assert!(matches!(
            refused("sql_server: a\n---\nsql_server: b\n"),
            ConfigError::MultipleDocuments { line: 2 }
        ));
        assert!(matches!(
            refused("append_host_config:\n  d.local:\n    sql_server: a\n"),
            ConfigError::UnexpectedLocation { line: 3, .. }
        ));
        assert!(matches!(
            refused("base: &base\n  sql_server: a\nhost_config:\n  d.local: *base\n"),
            ConfigError::UnexpectedLocation { line: 2, .. }
        ));
        assert!(SqlTarget::new("a b", 5).is_err());
        assert!(SqlTarget::new("a\"b", 5).is_err());
        assert!(SqlTarget::new("", 5).is_err());
        assert!(SqlTarget::new("a", 0).is_err());
    }

    #[test]
    fn comments_and_unrelated_lines_survive_byte_for_byte() {
        let text = "# sql_server: commented out\nsql_server: a  # keep me\n  # indented comment\nother: 'x: y' # sql_port: 9\n";
        let out = rewrite(text, &target("b", 5)).unwrap();
        assert_eq!(
            out.text,
            "# sql_server: commented out\nsql_server: b  # keep me\nsql_port: 5\n  # indented comment\nother: 'x: y' # sql_port: 9\n"
        );
    }
}
