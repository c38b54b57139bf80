//! Evaluating Erlang expressions inside the running ejabberd node with `erl_call`.
//!
//! `erl_call` is a small C program speaking the Erlang distribution protocol: one call costs a
//! few milliseconds, where every `ejabberdctl` command boots a whole Erlang VM (about 0.5 s of
//! CPU). The expression travels on stdin and the cookie is read from `$HOME/.erlang.cookie`,
//! so neither appears on a command line.
//!
//! Invariant: every expression sent is built by this crate from validated parts (vhost names
//! and hex tokens, see [`binary_literal`]), never from text received from the network.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::process::Command;

/// A failed evaluation.
#[derive(Debug, thiserror::Error)]
pub enum ErlError {
    #[error("cannot run {program}: {source}")]
    Spawn {
        program: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("erl_call to {node} did not answer within {timeout:?}")]
    Timeout { node: String, timeout: Duration },
    #[error("cannot reach Erlang node {node}: {detail}")]
    Unreachable { node: String, detail: String },
    #[error("evaluation on {node} failed: {detail}")]
    Eval { node: String, detail: String },
}

/// How to reach one Erlang node.
#[derive(Debug, Clone)]
pub struct ErlNode {
    /// Path of `erl_call` (Debian: `/usr/lib/erlang/bin/erl_call`).
    pub erl_call: PathBuf,
    /// Full node name, `ejabberd@e1server` or `ejabberd@e1server.domain.local`.
    pub node: String,
    /// Directory whose `.erlang.cookie` holds the cluster cookie (Debian: `/var/lib/ejabberd`).
    pub cookie_home: PathBuf,
    /// The epmd port when it is not the default 4369 (`ERL_EPMD_PORT`).
    pub epmd_port: Option<u16>,
    /// Upper bound for one evaluation.
    pub timeout: Duration,
}

impl ErlNode {
    /// Evaluates `expr` (a sequence of Erlang expressions ending with `.`) on the node and
    /// returns the printed result term.
    pub async fn eval(&self, expr: &str) -> Result<String, ErlError> {
        // Short names have no dot in the host part, exactly as ejabberdctl decides.
        let name_flag = match self.node.split_once('@') {
            Some((_, host)) if host.contains('.') => "-name",
            _ => "-sname",
        };
        let timeout_secs = self.timeout.as_secs().max(1).to_string();
        // erl_call otherwise always calls itself `c17`: two overlapping calls would share a
        // node name, and a late reply to an abandoned call would be read as the answer to
        // the next one.
        let own_name = format!("ha_agent_{:016x}", rand::random::<u64>());
        let mut cmd = Command::new(&self.erl_call);
        cmd.arg(name_flag)
            .arg(&self.node)
            .args(["-h", &own_name])
            .args(["-timeout", &timeout_secs, "-e"])
            .env("HOME", &self.cookie_home)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        match self.epmd_port {
            Some(port) => cmd.env("ERL_EPMD_PORT", port.to_string()),
            None => cmd.env_remove("ERL_EPMD_PORT"),
        };
        let spawn_err = |source| ErlError::Spawn {
            program: self.erl_call.clone(),
            source,
        };
        let mut child = cmd.spawn().map_err(spawn_err)?;
        let mut stdin = child
            .stdin
            .take()
            .ok_or_else(|| spawn_err(std::io::Error::other("erl_call stdin was not captured")))?;
        let run = async {
            stdin.write_all(expr.as_bytes()).await?;
            // The Erlang scanner needs a newline after the final `.` to close the form, and
            // erl_call evaluates once stdin reaches end of file.
            stdin.write_all(b"\n").await?;
            drop(stdin);
            child.wait_with_output().await
        };
        let output = tokio::time::timeout(self.timeout, run)
            .await
            .map_err(|_| ErlError::Timeout {
                node: self.node.clone(),
                timeout: self.timeout,
            })?
            .map_err(spawn_err)?;
        let stdout = String::from_utf8_lossy(&output.stdout).trim().to_owned();
        let stderr = String::from_utf8_lossy(&output.stderr).trim().to_owned();
        if !output.status.success() {
            return Err(ErlError::Unreachable {
                node: self.node.clone(),
                detail: if stderr.is_empty() { stdout } else { stderr },
            });
        }
        parse_reply(&stdout).map_err(|detail| ErlError::Eval {
            node: self.node.clone(),
            detail,
        })
    }
}

/// `erl_call -e` prints `{ok, Term}` or `{error, Reason}`, with spaces and line breaks of its
/// own choosing; the term comes back compacted (see [`compact`]).
fn parse_reply(out: &str) -> Result<String, String> {
    let out = compact(out);
    out.strip_prefix("{ok,")
        .and_then(|r| r.strip_suffix('}'))
        .map(str::to_owned)
        .ok_or(out)
}

/// Removes whitespace outside double-quoted strings, so `{started, true}` reads
/// `{started,true}` whatever the printer's layout.
fn compact(term: &str) -> String {
    let mut out = String::with_capacity(term.len());
    let mut in_string = false;
    let mut escaped = false;
    for c in term.chars() {
        if in_string {
            out.push(c);
            match (escaped, c) {
                (false, '\\') => escaped = true,
                (false, '"') => in_string = false,
                _ => escaped = false,
            }
        } else if !c.is_whitespace() {
            in_string = c == '"';
            out.push(c);
        }
    }
    out
}

/// An Erlang binary literal for `s`, which must be made of characters that need no escaping
/// (letters, digits, `.`, `-`, `_`, `:`, `'`, `,`, `(`, `)`, `|`, `*`, `=`, `<`, `>`, space).
/// Returns `None` for anything else so a caller cannot build an expression from unchecked text.
pub fn binary_literal(s: &str) -> Option<String> {
    let safe = s.chars().all(|c| {
        c.is_ascii_alphanumeric()
            || matches!(
                c,
                '.' | '-' | '_' | ':' | '\'' | ',' | '(' | ')' | '|' | '*' | '=' | '<' | '>' | ' '
            )
    });
    safe.then(|| format!("<<\"{s}\">>"))
}

/// Reads a printed Erlang string (`"a b"`, possibly split by the pretty printer into adjacent
/// `"..."` pieces over several lines).
pub fn parse_string(term: &str) -> Option<String> {
    let mut out = String::new();
    let mut rest = term.trim();
    if rest == "[]" {
        return Some(out);
    }
    while !rest.is_empty() {
        let inner = rest.strip_prefix('"')?;
        let end = inner.find('"')?;
        let piece = &inner[..end];
        if piece.contains('\\') {
            return None;
        }
        out.push_str(piece);
        rest = inner[end + 1..].trim_start();
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn replies_are_parsed() {
        assert_eq!(parse_reply("{ok, ok}"), Ok("ok".to_owned()));
        assert_eq!(
            parse_reply("{ok, {started,true}}"),
            Ok("{started,true}".to_owned())
        );
        assert!(parse_reply("{error, \"*** eval: boom\"}").is_err());
    }

    #[test]
    fn strings_join_pretty_printed_pieces() {
        assert_eq!(parse_string("\"a@x b@y\"").unwrap(), "a@x b@y");
        assert_eq!(parse_string("\"ab\"\"cd\"").unwrap(), "abcd");
        assert_eq!(parse_string("[]").unwrap(), "");
        assert!(parse_string("ok").is_none());
        assert!(parse_string("\"a\\\"b\"").is_none());
    }

    #[test]
    fn literals_refuse_text_that_needs_escaping() {
        assert_eq!(
            binary_literal("domain.local").unwrap(),
            "<<\"domain.local\">>"
        );
        for bad in ["a\"b", "a\\b", "a\nb", "ä", "a#b"] {
            assert!(binary_literal(bad).is_none(), "{bad:?}");
        }
    }
}
