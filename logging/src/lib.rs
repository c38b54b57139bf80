//! Log set-up shared by `ha-monitor`, `ha-agent`, `ha-provision` and `haclt`.
//!
//! Every program logs to stderr (journald keeps both streams; stdout stays free for tools and
//! JSON output), one event per line, either as text or, with `--log-format json` (or
//! `HA_LOG_FORMAT=json`), as one JSON object per line with `timestamp`, `level`, `target`,
//! `fields` (the message is `fields.message`) and the current span, for log shippers. Colour
//! (ANSI escapes) only when stderr is a terminal and `NO_COLOR` is unset: never in journald,
//! in files or in a pipe. The filter comes from the program's environment variable
//! (`RUST_LOG`, `HACLT_LOG`) in `tracing`'s `EnvFilter` syntax, else the program's default.
//!
//! [`parse_args`]: every program's command line, with the exit codes the programs document
//! (64 for a usage error, as sysexits' `EX_USAGE`, not clap's 2).

use std::io::IsTerminal as _;

use tracing_subscriber::EnvFilter;

/// The exit code of a usage error (sysexits' `EX_USAGE`): the systemd units do not restart a
/// daemon that exits with it.
pub const EX_USAGE: u8 = 64;

/// Parses the program's command line. `--help` and `--version` print and exit 0; a usage
/// error prints clap's message and exits [`EX_USAGE`].
pub fn parse_args<T: clap::Parser>() -> T {
    T::try_parse().unwrap_or_else(|e| {
        let _ = e.print();
        let code = if e.use_stderr() {
            i32::from(EX_USAGE)
        } else {
            0
        };
        std::process::exit(code)
    })
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// The command-line options every program takes (flatten into its clap parser).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct LogArgs {
    /// Log line format on stderr.
    #[arg(
        long,
        value_enum,
        default_value_t,
        env = "HA_LOG_FORMAT",
        global = true
    )]
    pub log_format: LogFormat,
}

/// Installs the global subscriber: `filter_env` names the variable with the filter,
/// `default_filter` applies without it (or when it does not parse). A second call is a no-op.
pub fn init(args: &LogArgs, filter_env: &str, default_filter: &str) {
    let filter =
        EnvFilter::try_from_env(filter_env).unwrap_or_else(|_| EnvFilter::new(default_filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match args.log_format {
        LogFormat::Text => builder.with_ansi(colour()).try_init(),
        LogFormat::Json => builder.json().with_ansi(false).try_init(),
    };
}

/// Whether text lines get colour: stderr is a terminal and `NO_COLOR` is not set.
fn colour() -> bool {
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}
