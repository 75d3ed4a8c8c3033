//! `keyturn report`: the key-rotation report of a period, as JSON, Markdown
//! or HTML. Keys come through the server when one answers for the pool.

use std::path::PathBuf;
use std::time::SystemTime;

use anyhow::{Context, Result};
use clap::Args;

use super::PoolArgs;
use super::api::Admin;
use crate::audit::export::parse_time;
use crate::report::{self, render};

/// `keyturn report`.
#[derive(Args, Debug)]
pub(super) struct ReportArgs {
    #[command(flatten)]
    pool: PoolArgs,
    /// Start of the period (inclusive): a date (2026-12-01, UTC) or an RFC 3339 time.
    #[arg(long)]
    from: String,
    /// End of the period (exclusive) [default: now].
    #[arg(long)]
    to: Option<String>,
    /// Output format.
    #[arg(long, value_enum, default_value = "json")]
    format: render::Format,
    /// Write to this file instead of standard output.
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
}

/// Runs `keyturn report`.
pub(super) fn report(a: ReportArgs) -> Result<()> {
    let from = parse_time(&a.from).map_err(anyhow::Error::msg)?;
    let now = SystemTime::now();
    let to = match &a.to {
        Some(t) => parse_time(t).map_err(anyhow::Error::msg)?,
        None => now,
    };
    let keys = Admin::open_quietly(&a.pool)?.keys(None)?;
    let r = report::build(&a.pool.pool, keys, from, to, now)
        .with_context(|| format!("cannot make the report of pool {}", a.pool.pool.display()))?;
    let text = render::render(&r, a.format);
    match &a.out {
        Some(p) => {
            std::fs::write(p, text).with_context(|| format!("cannot write {}", p.display()))?
        }
        None => print!("{text}"),
    }
    Ok(())
}
