//! `ha-docgen OUT_DIR`: man pages (`OUT_DIR/man/NAME.1`) and shell completions
//! (`OUT_DIR/completions/{bash/NAME, zsh/_NAME, fish/NAME.fish}`) for the four binaries, from
//! their own clap definitions, so they never disagree with `--help`. Run by
//! `scripts/gen-docs.sh`; the Debian packages install the output.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap::CommandFactory as _;
use clap_complete::Shell;

/// Every binary the packages ship, with its command line.
fn commands() -> Vec<clap::Command> {
    vec![
        haclt::cli::Cli::command().name("haclt"),
        ha_monitor::cli::Args::command(),
        ha_agent::cli::Args::command(),
        ha_provision::cli::Cli::command().name("ha-provision"),
    ]
}

/// Writes everything under `out`; returns the files written.
fn generate(out: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut written = Vec::new();
    let man = out.join("man");
    std::fs::create_dir_all(&man).with_context(|| format!("creating {}", man.display()))?;
    for cmd in commands() {
        let name = cmd.get_name().to_owned();
        let path = man.join(format!("{name}.1"));
        let mut page = Vec::new();
        clap_mangen::Man::new(cmd.clone()).render(&mut page)?;
        std::fs::write(&path, page).with_context(|| format!("writing {}", path.display()))?;
        written.push(path);
        for (shell, file) in [
            (Shell::Bash, name.clone()),
            (Shell::Zsh, format!("_{name}")),
            (Shell::Fish, format!("{name}.fish")),
        ] {
            let dir = out.join("completions").join(shell.to_string());
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            let path = dir.join(file);
            let mut text = Vec::new();
            clap_complete::generate(shell, &mut cmd.clone(), &name, &mut text);
            std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
            written.push(path);
        }
    }
    Ok(written)
}

fn main() -> anyhow::Result<()> {
    let out = std::env::args_os()
        .nth(1)
        .map(PathBuf::from)
        .context("usage: ha-docgen OUT_DIR")?;
    for path in generate(&out)? {
        println!("{}", path.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn a_man_page_and_three_completions_per_binary() {
        let dir = tempfile::tempdir().unwrap();
        let written = generate(dir.path()).unwrap();
        assert_eq!(written.len(), 4 * 4);
        for name in ["haclt", "ha-monitor", "ha-agent", "ha-provision"] {
            let page = std::fs::read_to_string(dir.path().join(format!("man/{name}.1"))).unwrap();
            assert!(page.contains(".TH"), "{name}: {page}");
            assert!(
                page.contains("\\-\\-config") || name == "ha-provision",
                "{name}"
            );
            let bash = std::fs::read_to_string(dir.path().join(format!("completions/bash/{name}")))
                .unwrap();
            assert!(bash.contains("complete") && bash.contains(name), "{bash}");
        }
    }
}
