//! `keyturn policy ...`, `keyturn scheduler ...` and `keyturn rotate plan`:
//! a zone's rotation policy, the rotation scheduler and its plan of the
//! zone's next DEK rotation, on the running server.

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use serde_json::Value;

use super::PoolArgs;
use crate::admin::client::AdminClient;
use crate::schedule::policy::{OnFailure, Policy, Sensitivity, Span, StagingFull, Weekday, preset};

/// A pool and one of its zones.
#[derive(Args, Debug)]
pub(super) struct PolicyZone {
    #[command(flatten)]
    pool: PoolArgs,
    /// Zone.
    #[arg(long)]
    zone: String,
}

/// `keyturn policy ...`.
#[derive(Subcommand, Debug)]
pub(super) enum PolicyCmd {
    /// Show the zone's policy (its own, or the pool default).
    Show {
        #[command(flatten)]
        target: PolicyZone,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Change the zone's policy: starts from its current policy (or
    /// --preset), applies the options given, and is refused with what to
    /// change when invalid.
    Set(Box<SetArgs>),
    /// Put the zone on hold: the scheduler starts nothing in it.
    Hold(PolicyZone),
    /// Release the hold (its failed rotations are retried).
    Release(PolicyZone),
}

/// `keyturn policy set`.
#[derive(Args, Debug)]
pub(super) struct SetArgs {
    #[command(flatten)]
    target: PolicyZone,
    /// Lifetimes of every key from a preset: 90d (30d grace), 180d (90d),
    /// 365d (180d), 30d (7d).
    #[arg(long)]
    preset: Option<String>,
    /// DEK cryptoperiod (90d, 12h...).
    #[arg(long, value_name = "DURATION")]
    dek_cryptoperiod: Option<String>,
    /// How long the old DEK stays after its rotation.
    #[arg(long, value_name = "DURATION")]
    dek_grace: Option<String>,
    /// KEK cryptoperiod.
    #[arg(long, value_name = "DURATION")]
    kek_cryptoperiod: Option<String>,
    /// KEK grace.
    #[arg(long, value_name = "DURATION")]
    kek_grace: Option<String>,
    /// MAC key cryptoperiod.
    #[arg(long, value_name = "DURATION")]
    mac_cryptoperiod: Option<String>,
    /// MAC key grace.
    #[arg(long, value_name = "DURATION")]
    mac_grace: Option<String>,
    /// low (x1.5), medium (x1), high (x0.5), critical (x0.25): scales the cryptoperiods.
    #[arg(long, value_parser = ["low", "medium", "high", "critical"])]
    sensitivity: Option<String>,
    /// Maintenance window start, UTC, HH:MM.
    #[arg(long, value_name = "HH:MM")]
    window_start: Option<String>,
    /// Maintenance window length (at most 24h).
    #[arg(long, value_name = "DURATION")]
    window_duration: Option<String>,
    /// Days a window starts: mon,tue,... or all.
    #[arg(long, value_name = "DAYS")]
    window_days: Option<String>,
    /// Staging coverage at the flip: percent of the blocks that are neither shared nor hot.
    #[arg(long, value_name = "PERCENT")]
    coverage_rest_percent: Option<u8>,
    /// Throttle for this zone's rotations, MiB/s (0: the pool's).
    #[arg(long)]
    rate_mib_s: Option<u64>,
    /// A write in a window when staging is full: unstaged (acknowledge
    /// after the data write) or strict (wait for space, then fall back).
    #[arg(long, value_parser = ["unstaged", "strict"])]
    staging_full: Option<String>,
    /// How long a strict write waits before it falls back.
    #[arg(long, value_name = "DURATION")]
    strict_wait: Option<String>,
    /// KEK re-wrap batch size.
    #[arg(long)]
    kek_batch: Option<usize>,
    /// Pause between KEK re-wrap batches.
    #[arg(long, value_name = "DURATION")]
    kek_pause: Option<String>,
    /// A rotation the scheduler gave up on: resume (leave it) or abort its window.
    #[arg(long, value_parser = ["resume", "abort"])]
    on_failure: Option<String>,
    /// JSON output.
    #[arg(long)]
    json: bool,
}

/// `keyturn scheduler ...`.
#[derive(Subcommand, Debug)]
pub(super) enum SchedulerCmd {
    /// Whether it runs, is paused, what is running, queued and failed.
    Status(SchedulerArgs),
    /// Start nothing more, pool-wide (running rotations go on).
    Pause(SchedulerArgs),
    /// Start again; failed rotations are retried.
    Resume(SchedulerArgs),
    /// Every queued, running and failed rotation.
    Schedule(SchedulerArgs),
}

/// A pool, and how to print.
#[derive(Args, Debug)]
pub(super) struct SchedulerArgs {
    #[command(flatten)]
    pool: PoolArgs,
    /// JSON output.
    #[arg(long)]
    json: bool,
}

fn client(pool: &PoolArgs) -> Result<AdminClient> {
    super::require_pool_dir(&pool.pool)?;
    AdminClient::for_pool(&pool.pool)
        .context("the policy and scheduler commands need the running server")
}

fn print(v: &Value, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string(v)?);
    } else {
        println!("{}", serde_json::to_string_pretty(v)?);
    }
    Ok(())
}

fn span(s: &Option<String>) -> Result<Option<Span>> {
    s.as_deref()
        .map(Span::parse)
        .transpose()
        .map_err(Into::into)
}

/// `keyturn policy ...`.
pub(super) fn policy(cmd: PolicyCmd) -> Result<()> {
    match cmd {
        PolicyCmd::Show { target, json } => {
            let c = client(&target.pool)?;
            let v: Value = c.get(&format!("/api/v1/zones/{}/policy", target.zone))?;
            print(&v, json)
        }
        PolicyCmd::Hold(t) => {
            let c = client(&t.pool)?;
            let _: Value = c.post_empty(&format!("/api/v1/zones/{}/policy/hold", t.zone))?;
            println!("zone {} is on hold", t.zone);
            Ok(())
        }
        PolicyCmd::Release(t) => {
            let c = client(&t.pool)?;
            let _: Value = c.post_empty(&format!("/api/v1/zones/{}/policy/release", t.zone))?;
            println!("zone {} is released", t.zone);
            Ok(())
        }
        PolicyCmd::Set(a) => {
            let c = client(&a.target.pool)?;
            let path = format!("/api/v1/zones/{}/policy", a.target.zone);
            let mut p: Policy = match &a.preset {
                Some(name) => {
                    let mut p: Policy = current(&c, &path)?;
                    let l = preset(name)?;
                    (p.dek, p.kek, p.mac, p.preset) = (l, l, l, Some(name.clone()));
                    p
                }
                None => current(&c, &path)?,
            };
            apply(&mut p, &a)?;
            let v: Value = c.put(&path, &p)?;
            print(&v, a.json)
        }
    }
}

fn current(c: &AdminClient, path: &str) -> Result<Policy> {
    let v: Value = c.get(path)?;
    serde_json::from_value(v["policy"].clone()).context("the server's policy answer")
}

fn apply(p: &mut Policy, a: &SetArgs) -> Result<()> {
    let custom = |p: &mut Policy| p.preset = None;
    for (field, value) in [
        (&mut p.dek.cryptoperiod, &a.dek_cryptoperiod),
        (&mut p.dek.grace, &a.dek_grace),
        (&mut p.kek.cryptoperiod, &a.kek_cryptoperiod),
        (&mut p.kek.grace, &a.kek_grace),
        (&mut p.mac.cryptoperiod, &a.mac_cryptoperiod),
        (&mut p.mac.grace, &a.mac_grace),
    ] {
        if let Some(s) = span(value)? {
            *field = s;
        }
    }
    if [
        &a.dek_cryptoperiod,
        &a.dek_grace,
        &a.kek_cryptoperiod,
        &a.kek_grace,
        &a.mac_cryptoperiod,
        &a.mac_grace,
    ]
    .iter()
    .any(|o| o.is_some())
    {
        custom(p);
    }
    if let Some(s) = &a.sensitivity {
        p.sensitivity = match s.as_str() {
            "low" => Sensitivity::Low,
            "high" => Sensitivity::High,
            "critical" => Sensitivity::Critical,
            _ => Sensitivity::Medium,
        };
    }
    if let Some(s) = &a.window_start {
        p.window.start = s.clone();
    }
    if let Some(s) = span(&a.window_duration)? {
        p.window.duration = s;
    }
    if let Some(days) = &a.window_days {
        p.window.days = parse_days(days)?;
    }
    if let Some(n) = a.coverage_rest_percent {
        p.coverage.rest_percent = n;
    }
    if let Some(n) = a.rate_mib_s {
        p.rate_mib_s = n;
    }
    if let Some(s) = &a.staging_full {
        p.staging_full = if s == "strict" {
            StagingFull::Strict
        } else {
            StagingFull::Unstaged
        };
    }
    if let Some(s) = span(&a.strict_wait)? {
        p.strict_wait = s;
    }
    if let Some(n) = a.kek_batch {
        p.kek_batch = n;
    }
    if let Some(s) = span(&a.kek_pause)? {
        p.kek_pause = s;
    }
    if let Some(s) = &a.on_failure {
        p.on_failure = if s == "abort" {
            OnFailure::Abort
        } else {
            OnFailure::Resume
        };
    }
    Ok(())
}

fn parse_days(s: &str) -> Result<Vec<Weekday>> {
    if s.trim() == "all" {
        return Ok(Weekday::ALL.to_vec());
    }
    s.split(',')
        .filter(|d| !d.trim().is_empty())
        .map(|d| {
            serde_json::from_value(Value::String(d.trim().to_lowercase())).with_context(|| {
                format!("{d:?} is not a day; write mon,tue,wed,thu,fri,sat,sun or all")
            })
        })
        .collect()
}

/// `keyturn scheduler ...`.
pub(super) fn scheduler(cmd: SchedulerCmd) -> Result<()> {
    let (a, path, post) = match &cmd {
        SchedulerCmd::Status(a) => (a, "/api/v1/key-rotation/scheduler/status", false),
        SchedulerCmd::Pause(a) => (a, "/api/v1/key-rotation/scheduler/pause", true),
        SchedulerCmd::Resume(a) => (a, "/api/v1/key-rotation/scheduler/resume", true),
        SchedulerCmd::Schedule(a) => (a, "/api/v1/key-rotation/schedule", false),
    };
    let c = client(&a.pool)?;
    let v: Value = if post {
        c.post_empty(path)?
    } else {
        c.get(path)?
    };
    print(&v, a.json)
}

fn when(v: &Value) -> String {
    v.as_u64()
        .map(|t| {
            let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(t);
            humantime::format_rfc3339_seconds(t).to_string()
        })
        .unwrap_or_else(|| "-".into())
}

/// `keyturn rotate plan`.
pub(super) fn plan(pool: &PoolArgs, zone: &str, json: bool) -> Result<()> {
    let c = client(pool)?;
    let v: Value = c.get(&format!("/api/v1/zones/{zone}/rotation/plan"))?;
    if json {
        println!("{}", serde_json::to_string(&v)?);
        return Ok(());
    }
    let (i, p) = (&v["inputs"], &v["prediction"]);
    let mib = |x: &Value| x.as_f64().unwrap_or(0.0) / 1048576.0;
    let c = &i["census"];
    println!(
        "zone {zone}: phase {}, threat {}",
        v["phase"], v["threat_level"]
    );
    println!(
        "  deadline      {} (DEK cryptoperiod {}){}",
        when(&i["deadline"]),
        v["dek_cryptoperiod"].as_str().unwrap_or("?"),
        if p["overdue"] == true {
            ", overdue"
        } else {
            ""
        }
    );
    println!("  window opens  {}", when(&p["open_at"]));
    println!(
        "  flip          {} (latest {})",
        when(&p["flip_at"]),
        when(&p["latest_flip"])
    );
    println!(
        "  staging       {} blocks of work: {} s + {} s margin at {:.2} MiB/s ({} {:.2} MiB/s, writes {:.2} MiB/s)",
        p["work_blocks"],
        p["staging_secs"],
        p["margin_secs"],
        mib(&p["effective_bytes_per_sec"]),
        i["rate_source"].as_str().unwrap_or("?"),
        mib(&i["rate_bytes_per_sec"]),
        mib(&i["write_bytes_per_sec"]),
    );
    println!(
        "  blocks        shared {} ({} staged), hot {} ({}), rest {} ({})",
        c["shared"], c["staged_shared"], c["hot"], c["staged_hot"], c["rest"], c["staged_rest"]
    );
    println!(
        "  target        {} blocks ({} staged): shared {}, hot {}, {}% of the rest",
        p["target_blocks"],
        p["target_staged"],
        i["coverage"]["shared"],
        i["coverage"]["hot"],
        i["coverage"]["rest_percent"]
    );
    println!(
        "  staging space {:.1} MiB free{}",
        i["staging_free_bytes"].as_f64().unwrap_or(0.0) / 1048576.0,
        if p["capacity_limited"] == true {
            ", too little for the target"
        } else {
            ""
        }
    );
    println!(
        "  predicted     {:.1}% of the target at the flip ({})",
        p["predicted_coverage_percent"].as_f64().unwrap_or(0.0),
        if p["meets_target"] == true {
            "met"
        } else {
            "missed"
        }
    );
    if let Some(f) = v["last_flip"].as_object() {
        println!(
            "  last flip     {}: predicted {}, achieved {:.1}%",
            when(&f["flipped_unix"]),
            f["predicted_percent"]
                .as_f64()
                .map_or("-".into(), |x| format!("{x:.1}%")),
            f["achieved_percent"].as_f64().unwrap_or(0.0)
        );
    }
    Ok(())
}
