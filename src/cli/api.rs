//! Commands that act on a running server through its admin API: DEK
//! rotation, scrub, volume stats, and KEK and root key rotation while
//! serving. Status, scrub and volume stats open the pool here when no server
//! answers (the pool lock makes that safe), and the key commands rotate
//! offline; the DEK rotation commands need the server.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use indicatif::{HumanBytes, ProgressBar, ProgressStyle};

use super::secret::open_pool;
use super::{PoolArgs, default_profile, parse_duration};
use crate::admin::client::{AdminClient, ClientError};
use crate::admin::{
    AdminBackend, CheckReport, CreateVolumeRequest, CreateZoneRequest, EmergencyRequest,
    KekRotateRequest, KeyInfo, PrepareRequest, RotationPhase, RotationStatus, ScrubStatus,
    VolumeStats, ZoneInfo,
};
use crate::pool::Pool;

/// A pool and one of its zones.
#[derive(Args, Debug)]
pub(super) struct ZoneTarget {
    #[command(flatten)]
    pool: PoolArgs,
    /// Zone.
    #[arg(long)]
    zone: String,
}

/// `keyturn rotate ...`: DEK rotation of a zone, on the running server.
#[derive(Subcommand, Debug)]
pub(super) enum RotateCmd {
    /// Open a rotation window: make the next DEK and start staging. The
    /// flip happens at --at, after --window, or by `rotate flip`.
    Prepare {
        #[command(flatten)]
        target: ZoneTarget,
        /// Flip at this time: RFC 3339 (2026-05-01T02:00:00Z, or with an
        /// offset like +02:00) or Unix seconds.
        #[arg(long, value_name = "TIME", conflicts_with = "window")]
        at: Option<String>,
        /// Flip this long after the window opens (90s, 10m, 2h, 1d).
        #[arg(long, value_name = "DURATION")]
        window: Option<String>,
    },
    /// Flip the zone to the next DEK now.
    Flip(ZoneTarget),
    /// Pause the staging pipeline or the migrator.
    Pause(ZoneTarget),
    /// Resume it.
    Resume(ZoneTarget),
    /// Abort the window: drop the staged copies and destroy the next key.
    Abort(ZoneTarget),
    /// Emergency rotation: mark the active key compromised, flip at once,
    /// migrate unthrottled.
    Emergency {
        #[command(flatten)]
        target: ZoneTarget,
        /// Why (recorded in the audit log).
        #[arg(long)]
        reason: String,
        /// An approval token (from `approve`); once per operator when the
        /// pool requires dual control.
        #[arg(long = "approval", value_name = "FILE")]
        approvals: Vec<PathBuf>,
    },
    /// Roll back the last flip: the key it retired is the write key again,
    /// the new one stays for decryption and blocks migrate back. Only
    /// within the grace period, and not to a destroyed or compromised key.
    Rollback {
        #[command(flatten)]
        target: ZoneTarget,
        /// An approval token (operation rollback-rotation); once per
        /// operator when the pool requires dual control.
        #[arg(long = "approval", value_name = "FILE")]
        approvals: Vec<PathBuf>,
    },
    /// Show where the zone's rotation is: phase, blocks per key version,
    /// staging, unstaged writes, errors.
    Status {
        #[command(flatten)]
        target: ZoneTarget,
        /// JSON output (one line per poll with --watch).
        #[arg(long)]
        json: bool,
        /// Follow the rotation with a progress bar, once a second, until
        /// the zone is idle or in grace (or Ctrl-C).
        #[arg(long)]
        watch: bool,
    },
    /// The predictive plan of the zone's next DEK rotation: when its window
    /// opens and it flips, the predicted coverage, and every input.
    Plan {
        #[command(flatten)]
        target: ZoneTarget,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
}

/// `keyturn scrub`.
#[derive(Args, Debug)]
pub(super) struct ScrubArgs {
    #[command(flatten)]
    target: ZoneTarget,
    /// JSON output (the final scrub status).
    #[arg(long)]
    json: bool,
}

/// Where an operation runs: the pool's server, or the pool opened here
/// when no server answers.
pub(super) enum Admin {
    Remote(AdminClient),
    Local(Box<Pool>),
}

impl Admin {
    /// The running server's API, else the pool opened in this process
    /// (saying so on stderr).
    fn open(args: &PoolArgs) -> Result<Self> {
        Self::connect(args, true)
    }

    /// [`Admin::open`] without the notice, for commands that work the same
    /// either way (zones and volumes).
    pub(super) fn open_quietly(args: &PoolArgs) -> Result<Self> {
        Self::connect(args, false)
    }

    fn connect(args: &PoolArgs, announce: bool) -> Result<Self> {
        super::require_pool_dir(&args.pool)?;
        let client = AdminClient::for_pool(&args.pool).and_then(|c| c.health().map(|_| c));
        match client {
            Ok(c) => Ok(Admin::Remote(c)),
            Err(ClientError::NotRunning { .. }) => {
                if announce {
                    eprintln!(
                        "keyturn: no server answers for pool {}; opening it here",
                        args.pool.display()
                    );
                }
                Ok(Admin::Local(Box::new(open_pool(
                    args,
                    &default_profile()?,
                )?)))
            }
            Err(e) => Err(e.into()),
        }
    }

    fn rotation_status(&self, zone: &str) -> Result<RotationStatus> {
        Ok(match self {
            Admin::Remote(c) => c.rotation_status(zone)?,
            Admin::Local(p) => p.rotation_status(zone)?,
        })
    }

    fn scrub_start(&self, zone: &str) -> Result<ScrubStatus> {
        Ok(match self {
            Admin::Remote(c) => c.scrub_start(zone)?,
            Admin::Local(p) => p.scrub_start(zone)?,
        })
    }

    fn scrub_status(&self, zone: &str) -> Result<ScrubStatus> {
        Ok(match self {
            Admin::Remote(c) => c.scrub_status(zone)?,
            Admin::Local(p) => p.scrub_status(zone)?,
        })
    }

    pub(super) fn volume_stats(&self) -> Result<Vec<VolumeStats>> {
        Ok(match self {
            Admin::Remote(c) => c.volume_stats()?,
            Admin::Local(p) => p.volume_stats(),
        })
    }

    pub(super) fn zones(&self) -> Result<Vec<ZoneInfo>> {
        Ok(match self {
            Admin::Remote(c) => c
                .zones()?
                .iter()
                .map(|z| c.zone_info(z))
                .collect::<Result<_, _>>()?,
            Admin::Local(p) => p.zone_infos(),
        })
    }

    pub(super) fn zone_create(&self, req: &CreateZoneRequest) -> Result<ZoneInfo> {
        Ok(match self {
            Admin::Remote(c) => c.zone_create(req)?,
            Admin::Local(p) => p.zone_create(req)?,
        })
    }

    pub(super) fn zone_set_dedup(&self, zone: &str, on: bool) -> Result<ZoneInfo> {
        Ok(match self {
            Admin::Remote(c) => c.zone_set_dedup(zone, on)?,
            Admin::Local(p) => p.zone_set_dedup(zone, on)?,
        })
    }

    pub(super) fn volume_create(&self, req: &CreateVolumeRequest) -> Result<VolumeStats> {
        Ok(match self {
            Admin::Remote(c) => c.volume_create(req)?,
            Admin::Local(p) => p.volume_create(req)?,
        })
    }

    /// The keys of one zone, or of every zone.
    pub(super) fn keys(&self, zone: Option<&str>) -> Result<Vec<KeyInfo>> {
        Ok(match self {
            Admin::Remote(c) => c.keys(zone)?,
            Admin::Local(p) => p.key_inventory(zone)?,
        })
    }

    /// The pool's metadata check.
    pub(super) fn check(&self) -> Result<CheckReport> {
        Ok(match self {
            Admin::Remote(c) => c.check()?,
            Admin::Local(p) => p.check(),
        })
    }

    pub(super) fn volume_delete(&self, volume: &str) -> Result<()> {
        match self {
            Admin::Remote(c) => c.volume_delete(volume).map(drop)?,
            Admin::Local(p) => p.volume_delete(volume).map(drop)?,
        }
        Ok(())
    }
}

/// The client of the pool's running server (the rotation commands need one).
fn server(args: &PoolArgs) -> Result<AdminClient> {
    super::require_pool_dir(&args.pool)?;
    Ok(AdminClient::for_pool(&args.pool)?)
}

/// The JSON text of each approval file, as the API takes them.
pub(super) fn read_approvals(files: &[PathBuf]) -> Result<Vec<String>> {
    files
        .iter()
        .map(|f| {
            std::fs::read_to_string(f)
                .with_context(|| format!("cannot read approval {}", f.display()))
        })
        .collect()
}

/// `keyturn rotate ...`.
pub(super) fn rotate(cmd: RotateCmd) -> Result<()> {
    let (zone, status) = match cmd {
        RotateCmd::Status {
            target,
            json,
            watch,
        } => return status(&target, json, watch),
        RotateCmd::Plan { target, json } => {
            return super::schedule::plan(&target.pool, &target.zone, json);
        }
        RotateCmd::Prepare { target, at, window } => {
            let req = PrepareRequest {
                at_unix: at.as_deref().map(parse_time).transpose()?,
                window_secs: match window.as_deref().map(parse_duration).transpose()? {
                    Some(d) if d.is_zero() => bail!("--window must be longer than 0s"),
                    d => d.map(|d| d.as_secs()),
                },
            };
            let s = server(&target.pool).and_then(|c| Ok(c.rotation_prepare(&target.zone, &req)?));
            (target.zone, s)
        }
        RotateCmd::Emergency {
            target,
            reason,
            approvals,
        } => {
            let req = EmergencyRequest {
                reason,
                approvals: read_approvals(&approvals)?,
            };
            let s =
                server(&target.pool).and_then(|c| Ok(c.rotation_emergency(&target.zone, &req)?));
            (target.zone, s)
        }
        RotateCmd::Rollback { target, approvals } => {
            let req = crate::admin::RollbackRequest {
                approvals: read_approvals(&approvals)?,
            };
            let s = server(&target.pool).and_then(|c| Ok(c.rotation_rollback(&target.zone, &req)?));
            (target.zone, s)
        }
        RotateCmd::Flip(t) => action(t, "flip"),
        RotateCmd::Pause(t) => action(t, "pause"),
        RotateCmd::Resume(t) => action(t, "resume"),
        RotateCmd::Abort(t) => action(t, "abort"),
    };
    let status = status.with_context(|| format!("rotation of zone {zone:?}"))?;
    print_status(&status);
    Ok(())
}

fn action(t: ZoneTarget, action: &str) -> (String, Result<RotationStatus>) {
    let s = server(&t.pool).and_then(|c| Ok(c.rotation_action(&t.zone, action)?));
    (t.zone, s)
}

fn status(t: &ZoneTarget, json: bool, watch: bool) -> Result<()> {
    let admin = Admin::open(&t.pool)?;
    let zone = &t.zone;
    let get = || {
        admin
            .rotation_status(zone)
            .with_context(|| format!("no rotation status for zone {zone:?}"))
    };
    if !watch {
        let s = get()?;
        if json {
            println!("{}", serde_json::to_string_pretty(&s)?);
        } else {
            print_status(&s);
        }
        return Ok(());
    }
    let bar = if json {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(1000)
    };
    bar.set_style(ProgressStyle::with_template(
        "{spinner} {prefix:9} [{bar:40}] {msg}",
    )?);
    loop {
        let s = get()?;
        if json {
            println!("{}", serde_json::to_string(&s)?);
        }
        if matches!(s.phase, RotationPhase::Idle | RotationPhase::Grace) {
            bar.finish_and_clear();
            if !json {
                print_status(&s);
            }
            return Ok(());
        }
        bar.set_prefix(phase_name(s.phase));
        bar.set_position((s.progress_percent.clamp(0.0, 100.0) * 10.0) as u64);
        bar.set_message(progress_line(&s));
        bar.tick();
        std::thread::sleep(Duration::from_secs(1));
    }
}

fn phase_name(p: RotationPhase) -> &'static str {
    match p {
        RotationPhase::Idle => "idle",
        RotationPhase::Window => "window",
        RotationPhase::Paused => "paused",
        RotationPhase::Migrating => "migrating",
        RotationPhase::Grace => "grace",
    }
}

/// Which count the phase's progress is of: "staged" before the flip,
/// "migrated" after it (a paused rotation is either).
fn progress_kind(s: &RotationStatus) -> &'static str {
    match s.phase {
        RotationPhase::Window => "staged",
        RotationPhase::Paused if s.next_version.is_some() => "staged",
        _ => "migrated",
    }
}

/// The phase's progress on one line, its counts adding up:
/// "42.0% staged (420/1000 blocks), 12.0 MiB/s, ETA 3m 20s" while it runs,
/// "100.0% staged (1000/1000 blocks), done in 2.00 s (1.95 MiB/s)" once done
/// (no ETA), "... paused" while paused.
fn progress_line(s: &RotationStatus) -> String {
    let what = progress_kind(s);
    let (done, total) = if what == "staged" {
        (s.staged_blocks, s.content_blocks)
    } else {
        (s.migrated_blocks, s.migrated_blocks + s.remaining_blocks)
    };
    let counts = if total == 0 {
        // Nothing counted in this server run (say, migrated before it
        // started): no "0/0" to show.
        format!("{:.1}% {what}", s.progress_percent)
    } else {
        format!("{:.1}% {what} ({done}/{total} blocks)", s.progress_percent)
    };
    let rate = |r: f64| format!("{}/s", HumanBytes(r.max(0.0) as u64));
    if s.phase == RotationPhase::Paused {
        return format!("{counts}, paused");
    }
    if s.remaining_blocks == 0 {
        // Done: the rate is the phase's average, and there is no ETA.
        let secs = if what == "staged" {
            s.staging_secs
        } else {
            s.migration_secs
        };
        return match (secs, s.rate_bytes_per_sec > 0.0) {
            (Some(t), true) => format!(
                "{counts}, done in {t:.2} s ({})",
                rate(s.rate_bytes_per_sec)
            ),
            (Some(t), false) => format!("{counts}, done in {t:.2} s"),
            (None, _) => format!("{counts}, done"),
        };
    }
    let eta = s.eta_secs.map_or_else(
        || "ETA unknown".to_owned(),
        |e| {
            format!(
                "ETA {}",
                humantime::format_duration(Duration::from_secs(e.max(0.0).round() as u64))
            )
        },
    );
    if s.rate_bytes_per_sec > 0.0 {
        format!("{counts}, {}, {eta}", rate(s.rate_bytes_per_sec))
    } else {
        // Nothing moved yet in this phase: no rate to show.
        format!("{counts}, {eta}")
    }
}

/// A Unix time as RFC 3339 (UTC, seconds).
fn rfc3339(t: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_secs(t)).to_string()
}

/// How far ahead `t` is of `now`: "in 59m 58s", or "due now" once reached.
fn ahead(t: u64, now: u64) -> String {
    match t.checked_sub(now) {
        Some(d) if d > 0 => format!("in {}", humantime::format_duration(Duration::from_secs(d))),
        _ => "due now".to_owned(),
    }
}

/// The rotation's events, as of `now` (Unix seconds): what happened in the
/// past tense, what is to come as scheduled.
fn event_lines(s: &RotationStatus, now: u64) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(t) = s.window_opened_unix {
        out.push(format!("window opened: {}", rfc3339(t)));
    }
    match (s.flipped_unix, s.flip_at_unix) {
        (Some(t), _) => out.push(format!("flipped: {}", rfc3339(t))),
        (None, Some(t)) if s.phase != RotationPhase::Idle => {
            out.push(format!(
                "flip scheduled at: {} ({})",
                rfc3339(t),
                ahead(t, now)
            ));
        }
        _ => {}
    }
    if let Some(t) = s.destroy_at_unix {
        let key = s
            .old_version
            .map_or_else(|| "old key".to_owned(), |v| format!("old key v{v}"));
        out.push(format!(
            "{key} destruction scheduled at: {} ({})",
            rfc3339(t),
            ahead(t, now)
        ));
    }
    out
}

fn print_status(s: &RotationStatus) {
    println!(
        "zone {}: {}{}",
        s.zone,
        phase_name(s.phase),
        if s.emergency { " (emergency)" } else { "" }
    );
    println!("active key version: {}", s.active_version);
    if let Some(v) = s.next_version {
        println!("next key version: {v}");
    }
    if let Some(v) = s.old_version {
        println!("old key version: {v}");
    }
    println!("{:>8} {:<14} {:>14}", "VERSION", "STATE", "BLOCKS");
    for k in &s.keys {
        println!("{:>8} {:<14} {:>14}", k.version, k.state, k.blocks);
    }
    println!("content blocks: {}", s.content_blocks);
    if s.phase != RotationPhase::Idle {
        println!("progress: {}", progress_line(s));
    }
    println!(
        "staging: {} used, {} free",
        HumanBytes(s.staging_used_bytes),
        HumanBytes(s.staging_free_bytes)
    );
    println!("unstaged writes: {}", s.unstaged_writes);
    if s.strict_waited_writes + s.strict_fallbacks > 0 {
        println!(
            "strict writes: {} waited for staging, {} fell back unstaged",
            s.strict_waited_writes, s.strict_fallbacks
        );
    }
    match s.throttle_mib_s {
        0 => println!("throttle: none ({})", s.throttle_source),
        n => println!("throttle: {n} MiB/s ({})", s.throttle_source),
    }
    match &s.last_error {
        Some(e) => println!("errors: {} (last: {e})", s.errors),
        None => println!("errors: {}", s.errors),
    }
    if let Some(why) = &s.waiting_for_space {
        println!("waiting for space: {why}");
    }
    for line in event_lines(s, super::now_unix()) {
        println!("{line}");
    }
    if let Some(us) = s.last_flip_micros {
        println!("last flip took: {:.2} ms", us as f64 / 1000.0);
    }
    if let Some(secs) = s.staging_secs {
        println!("everything staged after: {secs:.2} s");
    }
    if let Some(secs) = s.migration_secs {
        println!("migration took: {secs:.2} s");
    }
    if let (Some(v), Some(t)) = (s.rolled_back_from, s.rolled_back_unix) {
        println!("rolled back from key version {v} at {}", rfc3339(t));
    }
}

/// Parses `--at`: Unix seconds, or RFC 3339 with `Z` or a `±HH:MM` offset.
pub(super) fn parse_time(s: &str) -> Result<u64> {
    let s = s.trim();
    if let Ok(n) = s.parse::<u64>() {
        return Ok(n);
    }
    let bad =
        || format!("bad time {s:?} (use RFC 3339, e.g. 2026-05-01T02:00:00Z, or Unix seconds)");
    // humantime reads UTC only: take a numeric offset off and apply it.
    let split = s
        .len()
        .checked_sub(6)
        .and_then(|i| Some((s.get(..i)?, s.get(i..)?)));
    let (utc, offset) = match split {
        Some((base, off))
            if (off.starts_with('+') || off.starts_with('-')) && off.as_bytes()[3] == b':' =>
        {
            let h: i64 = off[1..3].parse().with_context(bad)?;
            let m: i64 = off[4..6].parse().with_context(bad)?;
            let secs = h * 3600 + m * 60;
            (
                format!("{base}Z"),
                if off.starts_with('-') { -secs } else { secs },
            )
        }
        _ => (s.to_owned(), 0),
    };
    let t = humantime::parse_rfc3339(&utc).with_context(bad)?;
    let local = t
        .duration_since(std::time::UNIX_EPOCH)
        .with_context(bad)?
        .as_secs();
    u64::try_from(i64::try_from(local)? - offset).with_context(bad)
}

/// `keyturn scrub`: starts a scrub, shows its progress, lists bad blocks,
/// and fails if any was found.
pub(super) fn scrub(a: ScrubArgs) -> Result<()> {
    let zone = &a.target.zone;
    let admin = Admin::open(&a.target.pool)?;
    let mut s = admin
        .scrub_start(zone)
        .with_context(|| format!("cannot start a scrub of zone {zone:?}"))?;
    let bar = if a.json {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(s.total)
    };
    bar.set_style(ProgressStyle::with_template(
        "{spinner} scrub [{bar:40}] {pos}/{len} copies, {per_sec}, ETA {eta}",
    )?);
    while s.running {
        bar.set_length(s.total);
        bar.set_position(s.checked);
        std::thread::sleep(Duration::from_millis(500));
        s = admin.scrub_status(zone)?;
    }
    bar.finish_and_clear();
    if a.json {
        println!("{}", serde_json::to_string_pretty(&s)?);
    } else {
        println!(
            "zone {}: {} of {} copies checked, {} bad",
            s.zone,
            s.checked,
            s.total,
            s.bad.len()
        );
        for b in &s.bad {
            println!(
                "bad block: volume {} lba {} cbid {} copy {}: {}",
                if b.volume.is_empty() { "-" } else { &b.volume },
                b.lba,
                b.cbid,
                b.copy,
                b.reason
            );
        }
    }
    if !s.bad.is_empty() {
        bail!("scrub of zone {zone:?} found {} bad blocks", s.bad.len());
    }
    Ok(())
}

/// `keyturn volume stats`.
pub(super) fn volume_stats(pool: &PoolArgs, json: bool) -> Result<()> {
    let stats = Admin::open(pool)?.volume_stats()?;
    if json {
        println!("{}", serde_json::to_string_pretty(&stats)?);
        return Ok(());
    }
    println!(
        "{:<24} {:<16} {:>14} {:>12} {:>12} {:>7}",
        "NAME", "ZONE", "SIZE", "MAPPED", "CONTENT", "DEDUP"
    );
    for v in &stats {
        println!(
            "{:<24} {:<16} {:>14} {:>12} {:>12} {:>7.2}",
            v.name, v.zone, v.size, v.mapped_blocks, v.content_blocks, v.dedup_ratio
        );
    }
    Ok(())
}

/// The client of the server answering for `pool`; `None` when none does
/// (the caller works with the pool opened in its own process).
pub(super) fn server_for(pool: &Path) -> Result<Option<AdminClient>> {
    if !Pool::exists(pool) {
        return Ok(None);
    }
    match AdminClient::for_pool(pool).and_then(|c| c.health().map(|_| c)) {
        Ok(c) => Ok(Some(c)),
        Err(ClientError::NotRunning { .. }) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// `keys rotate-kek` on the running server, if one answers for the pool:
/// `Ok(None)` when none does (the caller rotates offline).
pub(super) fn rotate_kek_online(
    pool: &Path,
    zone: &str,
    approvals: &[PathBuf],
) -> Result<Option<serde_json::Value>> {
    if !Pool::exists(pool) {
        return Ok(None);
    }
    let client = match AdminClient::for_pool(pool) {
        Err(ClientError::NotRunning { .. }) => return Ok(None),
        c => c?,
    };
    let req = KekRotateRequest {
        approvals: read_approvals(approvals)?,
    };
    match client.kek_rotate(zone, &req) {
        Err(ClientError::NotRunning { .. }) => Ok(None),
        r => r
            .map(Some)
            .with_context(|| format!("KEK rotation of zone {zone:?} failed")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window_status() -> RotationStatus {
        RotationStatus {
            zone: "z1".into(),
            phase: RotationPhase::Window,
            active_version: 1,
            next_version: Some(2),
            old_version: None,
            keys: Vec::new(),
            content_blocks: 1000,
            staged_blocks: 420,
            migrated_blocks: 0,
            remaining_blocks: 580,
            progress_percent: 42.0,
            rate_bytes_per_sec: 2.0 * 1024.0 * 1024.0,
            eta_secs: Some(200.0),
            staging_used_bytes: 0,
            staging_free_bytes: 0,
            unstaged_writes: 0,
            errors: 0,
            last_error: None,
            waiting_for_space: None,
            window_opened_unix: Some(1_700_000_000),
            flip_at_unix: None,
            flipped_unix: None,
            destroy_at_unix: None,
            emergency: false,
            reencrypted_blocks: 0,
            last_flip_micros: None,
            staging_secs: None,
            migration_secs: None,
            rolled_back_from: None,
            rolled_back_unix: None,
            throttle_mib_s: 0,
            throttle_source: "pool".into(),
            strict_waited_writes: 0,
            strict_fallbacks: 0,
        }
    }

    #[test]
    fn progress_lines_say_what_is_done() {
        let mut s = window_status();
        assert_eq!(
            progress_line(&s),
            "42.0% staged (420/1000 blocks), 2.00 MiB/s, ETA 3m 20s"
        );
        s.eta_secs = None;
        s.rate_bytes_per_sec = 0.0;
        assert_eq!(
            progress_line(&s),
            "42.0% staged (420/1000 blocks), ETA unknown"
        );
        s.phase = RotationPhase::Paused;
        assert_eq!(progress_line(&s), "42.0% staged (420/1000 blocks), paused");
    }

    #[test]
    fn a_finished_phase_has_its_own_rate_and_no_eta() {
        let mut s = window_status();
        s.staged_blocks = 1000;
        s.remaining_blocks = 0;
        s.progress_percent = 100.0;
        s.eta_secs = None;
        s.staging_secs = Some(2.0);
        s.rate_bytes_per_sec = 1000.0 * 4096.0 / 2.0;
        assert_eq!(
            progress_line(&s),
            "100.0% staged (1000/1000 blocks), done in 2.00 s (1.95 MiB/s)"
        );
        // Staged before this server started: no time of its own to tell.
        s.staging_secs = None;
        s.rate_bytes_per_sec = 0.0;
        assert_eq!(progress_line(&s), "100.0% staged (1000/1000 blocks), done");
    }

    #[test]
    fn migration_counts_add_up_from_the_flip_on() {
        let mut s = window_status();
        // Right after the flip: every block still to move, none moved.
        s.phase = RotationPhase::Migrating;
        s.next_version = None;
        s.old_version = Some(1);
        s.active_version = 2;
        s.staged_blocks = 0;
        s.migrated_blocks = 0;
        s.remaining_blocks = 1000;
        s.progress_percent = 0.0;
        s.rate_bytes_per_sec = 0.0;
        s.eta_secs = None;
        assert_eq!(
            progress_line(&s),
            "0.0% migrated (0/1000 blocks), ETA unknown"
        );
        s.migrated_blocks = 990;
        s.remaining_blocks = 10;
        s.progress_percent = 99.0;
        s.rate_bytes_per_sec = 4096.0;
        s.eta_secs = Some(10.0);
        assert_eq!(
            progress_line(&s),
            "99.0% migrated (990/1000 blocks), 4.00 KiB/s, ETA 10s"
        );
        // Paused after the flip: still a migration.
        s.phase = RotationPhase::Paused;
        assert_eq!(
            progress_line(&s),
            "99.0% migrated (990/1000 blocks), paused"
        );
        s.phase = RotationPhase::Grace;
        s.migrated_blocks = 1000;
        s.remaining_blocks = 0;
        s.progress_percent = 100.0;
        s.migration_secs = Some(0.5);
        s.rate_bytes_per_sec = 8192.0 * 1000.0;
        assert_eq!(
            progress_line(&s),
            "100.0% migrated (1000/1000 blocks), done in 0.50 s (7.81 MiB/s)"
        );
        // In grace after a restart: nothing migrated in this server run.
        s.migrated_blocks = 0;
        s.migration_secs = None;
        s.rate_bytes_per_sec = 0.0;
        assert_eq!(progress_line(&s), "100.0% migrated, done");
    }

    #[test]
    fn events_to_come_are_worded_as_scheduled() {
        let now = 1_700_000_000;
        let mut s = window_status();
        s.flip_at_unix = Some(now + 600);
        assert_eq!(
            event_lines(&s, now),
            [
                "window opened: 2023-11-14T22:13:20Z",
                "flip scheduled at: 2023-11-14T22:23:20Z (in 10m)",
            ]
        );
        // After the flip, only that it happened.
        s.phase = RotationPhase::Grace;
        s.flipped_unix = Some(now + 300);
        s.old_version = Some(1);
        s.destroy_at_unix = Some(now + 3600 + 300);
        let lines = event_lines(&s, now + 302);
        assert_eq!(lines[1], "flipped: 2023-11-14T22:18:20Z");
        assert_eq!(
            lines[2],
            "old key v1 destruction scheduled at: 2023-11-14T23:18:20Z (in 59m 58s)"
        );
        assert!(lines.iter().all(|l| !l.contains("destroyed")), "{lines:?}");
        // Reached but not yet carried out (the scheduler acts within a tick).
        let lines = event_lines(&s, now + 3600 + 300);
        assert!(lines[2].ends_with("(due now)"), "{lines:?}");
    }

    #[test]
    fn times_parse_as_unix_seconds() {
        assert_eq!(parse_time("1700000000").unwrap(), 1_700_000_000);
        assert_eq!(parse_time("2023-11-14T22:13:20Z").unwrap(), 1_700_000_000);
        assert_eq!(
            parse_time("2023-11-15T00:13:20+02:00").unwrap(),
            1_700_000_000
        );
        assert_eq!(
            parse_time("2023-11-14T20:43:20-01:30").unwrap(),
            1_700_000_000
        );
        for bad in [
            "tomorrow",
            "2023-11-14",
            "2023-11-14T22:13:20+2:00",
            "",
            "-5",
            "ééééé",
        ] {
            assert!(parse_time(bad).is_err(), "{bad}");
        }
    }
}
