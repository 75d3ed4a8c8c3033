//! `keyturn threat ...`: raise and clear threat levels, show them, and
//! approve the emergency rotation a critical level waits on (dual control),
//! on the running server.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{ArgGroup, Args, Subcommand};
use serde_json::Value;

use super::PoolArgs;
use crate::admin::client::AdminClient;
use crate::schedule::threat::{ThreatChange, ThreatLevel};

/// One zone or the whole pool.
#[derive(Args, Debug)]
#[command(group(ArgGroup::new("scope").required(true).args(["zone", "all"])))]
pub(super) struct Scope {
    #[command(flatten)]
    pool: PoolArgs,
    /// Zone.
    #[arg(long)]
    zone: Option<String>,
    /// Every zone (the pool-wide level).
    #[arg(long)]
    all: bool,
    /// Why (recorded in the audit log).
    #[arg(long)]
    reason: String,
}

/// `keyturn threat ...`.
#[derive(Subcommand, Debug)]
pub(super) enum ThreatCmd {
    /// Raise the level: elevated and high shorten the cryptoperiods by the
    /// policy's factor; critical also starts an emergency DEK rotation.
    Raise {
        #[command(flatten)]
        scope: Scope,
        /// elevated, high or critical.
        #[arg(long, value_parser = ["elevated", "high", "critical"])]
        level: String,
    },
    /// Back to normal (--all clears the pool-wide level and every zone's).
    Clear(Scope),
    /// Levels raised, and the level of every zone.
    Show {
        #[command(flatten)]
        pool: PoolArgs,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Hand the approvals of a filed emergency rotation request to the
    /// scheduler, which runs the rotation.
    Approve {
        #[command(flatten)]
        pool: PoolArgs,
        /// Zone.
        #[arg(long)]
        zone: String,
        /// An approval token (from `approve`), once per operator.
        #[arg(long = "approval", value_name = "FILE", required = true)]
        approvals: Vec<PathBuf>,
    },
}

fn client(pool: &PoolArgs) -> Result<AdminClient> {
    super::require_pool_dir(&pool.pool)?;
    AdminClient::for_pool(&pool.pool).context("the threat commands need the running server")
}

fn send(scope: &Scope, level: ThreatLevel) -> Result<Value> {
    let c = client(&scope.pool)?;
    let change = ThreatChange {
        zone: scope.zone.clone(),
        all: scope.all,
        level,
        reason: scope.reason.clone(),
    };
    Ok(c.post("/api/v1/threat", &change)?)
}

fn levels_line(v: &Value) -> String {
    v["levels"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(z, l)| format!("{z}={}", l.as_str().unwrap_or("?")))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default()
}

/// `keyturn threat ...`.
pub(super) fn threat(cmd: ThreatCmd) -> Result<()> {
    match cmd {
        ThreatCmd::Raise { scope, level } => {
            let level: ThreatLevel = serde_json::from_value(Value::String(level))?;
            let v = send(&scope, level)?;
            println!("threat levels: {}", levels_line(&v));
        }
        ThreatCmd::Clear(scope) => {
            let v = send(&scope, ThreatLevel::Normal)?;
            println!("threat levels: {}", levels_line(&v));
        }
        ThreatCmd::Show { pool, json } => {
            let v: Value = client(&pool)?.get("/api/v1/threat")?;
            if json {
                println!("{}", serde_json::to_string(&v)?);
            } else {
                println!("{}", serde_json::to_string_pretty(&v)?);
            }
        }
        ThreatCmd::Approve {
            pool,
            zone,
            approvals,
        } => {
            let tokens = approvals
                .iter()
                .map(|p| {
                    std::fs::read_to_string(p)
                        .with_context(|| format!("reading approval token {}", p.display()))
                })
                .collect::<Result<Vec<_>>>()?;
            let _: Value = client(&pool)?.post(
                "/api/v1/threat/approve",
                &serde_json::json!({ "zone": zone, "approvals": tokens }),
            )?;
            println!("zone {zone}: the approved emergency rotation ran");
        }
    }
    Ok(())
}
