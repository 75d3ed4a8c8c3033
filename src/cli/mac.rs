//! `keyturn mac rotate|status --zone Z`: MAC key rotation on the running
//! server (see `rotation::mac`).

use anyhow::{Context, Result};
use clap::{Args, Subcommand};

use super::PoolArgs;
use crate::admin::client::AdminClient;

/// A pool, one of its zones, and the output format.
#[derive(Args, Debug)]
pub(super) struct MacZone {
    #[command(flatten)]
    pool: PoolArgs,
    /// Zone.
    #[arg(long)]
    zone: String,
    /// JSON output.
    #[arg(long)]
    json: bool,
}

/// `keyturn mac ...`.
#[derive(Subcommand, Debug)]
pub(super) enum MacCmd {
    /// Make a new MAC key for the zone: it tags new blocks at once, a
    /// background pass re-tags the others, then the old key is destroyed.
    Rotate(MacZone),
    /// The zone's MAC key versions and the re-tag pass's progress.
    Status(MacZone),
}

/// Runs a `keyturn mac` command.
pub(super) fn run(cmd: MacCmd) -> Result<()> {
    let (t, rotate) = match cmd {
        MacCmd::Rotate(t) => (t, true),
        MacCmd::Status(t) => (t, false),
    };
    super::require_pool_dir(&t.pool.pool)?;
    let client =
        AdminClient::for_pool(&t.pool.pool).context("the mac commands need the running server")?;
    let v = client
        .mac(&t.zone, rotate)
        .with_context(|| format!("MAC key of zone {:?}", t.zone))?;
    if t.json {
        println!("{}", serde_json::to_string(&v)?);
        return Ok(());
    }
    let n = |k: &str| v[k].as_u64().unwrap_or(0);
    println!(
        "zone {}: MAC key v{} active",
        v["zone"].as_str().unwrap_or(&t.zone),
        n("active_version")
    );
    let retiring: Vec<String> = v["retiring_versions"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|x| x.as_u64())
        .map(|x| format!("v{x}"))
        .collect();
    if retiring.is_empty() {
        println!("no MAC rotation under way");
    } else {
        println!(
            "re-tagging: {} of {} blocks under the new key; retiring {}",
            n("blocks_active"),
            n("blocks_active") + n("blocks_retiring"),
            retiring.join(", ")
        );
    }
    if n("retag_errors") > 0 {
        println!(
            "blocks that failed their integrity check: {} (run `keyturn scrub`)",
            n("retag_errors")
        );
    }
    Ok(())
}
