//! `stream`, `agent-key`, `replicate` and `replica` commands: a zone's
//! change stream (through the running server when one answers, else on the
//! pool opened here), and the replication agent.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};

use super::api::{Admin, parse_time, read_approvals};
use super::secret::open_pool;
use super::{PoolArgs, default_profile};
use crate::admin::{AdminBackend, GrantRequest, ShredRequest, StreamRequest};

use crate::replica::{Agent, AgentConfig, parse_source, read_status};
use crate::stream::grant::{AgentKey, hex};

/// A pool and one of its zones.
#[derive(Args, Debug)]
pub(super) struct StreamTarget {
    #[command(flatten)]
    pool: PoolArgs,
    /// Zone.
    #[arg(long)]
    zone: String,
}

/// `keyturn stream ...`.
#[derive(Subcommand, Debug)]
pub(super) enum StreamCmd {
    /// Turn streaming on: every write, trim and write-zeroes of the zone
    /// becomes a record in its stream.
    Enable(StreamTarget),
    /// Turn streaming off (the log and key sets stay until retention ends).
    Disable(StreamTarget),
    /// The stream: sequence numbers kept and served, bytes, dedup on the
    /// wire, consumers.
    Status {
        #[command(flatten)]
        target: StreamTarget,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Key sets and windows, with their states.
    Keys {
        #[command(flatten)]
        target: StreamTarget,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Registered agents and their grants.
    Agents {
        #[command(flatten)]
        target: StreamTarget,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Register an agent with its public key and a grant of windows.
    Grant {
        #[command(flatten)]
        target: StreamTarget,
        /// Agent name.
        #[arg(long)]
        agent: String,
        /// The agent's X25519 public key: 64 hex digits, or a file holding them.
        #[arg(long)]
        public_key: String,
        /// First window granted: windows starting at or after this time
        /// (RFC 3339 or Unix seconds; default: all from the start).
        #[arg(long)]
        from: Option<String>,
        /// Windows starting at or after this time are not granted (default: none).
        #[arg(long)]
        to: Option<String>,
    },
    /// Remove an agent's registration.
    Revoke {
        #[command(flatten)]
        target: StreamTarget,
        /// Agent name.
        #[arg(long)]
        agent: String,
    },
    /// Crypto-shred one window: its key is erased and its records can never
    /// be opened again (dual control when the pool requires it).
    Shred {
        #[command(flatten)]
        target: StreamTarget,
        /// The window's key id, as `stream keys` lists it (z1-stream-s20428-w3).
        #[arg(long)]
        window: String,
        /// An approval token (from `approve`); once per operator when the
        /// pool requires dual control.
        #[arg(long = "approval", value_name = "FILE")]
        approvals: Vec<PathBuf>,
    },
}

/// `keyturn block ...`.
#[derive(Subcommand, Debug)]
pub(super) enum BlockCmd {
    /// Which key protects a block, since when, and the stream record that
    /// last wrote it.
    Show {
        #[command(flatten)]
        pool: PoolArgs,
        /// Volume.
        #[arg(long)]
        volume: String,
        /// Logical block (4 KiB units).
        #[arg(long)]
        lba: u64,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
}

/// `keyturn block show`.
pub(super) fn block(cmd: BlockCmd) -> Result<()> {
    let BlockCmd::Show {
        pool,
        volume,
        lba,
        json,
    } = cmd;
    let admin = Admin::open_quietly(&pool)?;
    let v: serde_json::Value = match &admin {
        Admin::Remote(c) => c.get(&format!("/api/v1/volumes/{volume}/blocks/{lba}"))?,
        Admin::Local(p) => serde_json::to_value(p.block_info(&volume, lba)?)?,
    };
    if json {
        return print_json(&v);
    }
    println!(
        "volume {volume} block {lba} (zone {})",
        v["zone"].as_str().unwrap_or("?")
    );
    if v["mapped"] != true {
        println!("  unmapped: reads as zeros, no key protects it");
    } else {
        println!(
            "  content block {} (shared by {} logical blocks), tag {}",
            v["cbid"],
            v["refcount"],
            v["tag"].as_str().unwrap_or("?")
        );
        let since = v["dek_active_since_unix"].as_u64().map(|t| {
            humantime::format_rfc3339_seconds(
                std::time::UNIX_EPOCH + std::time::Duration::from_secs(t),
            )
            .to_string()
        });
        println!(
            "  protected by {} ({}), active since {}; live copy on the {} device",
            v["dek_key_id"].as_str().unwrap_or("?"),
            v["dek_state"].as_str().unwrap_or("?"),
            since.as_deref().unwrap_or("-"),
            v["live_copy"][0].as_str().unwrap_or("?")
        );
        if let Some(s) = v["staged_version"].as_u64() {
            println!("  staged copy under DEK v{s}");
        }
    }
    match v["stream_record"].as_u64() {
        Some(seq) => println!(
            "  last changed by stream record {seq} ({}), sealed under window key {}",
            v["stream_op"].as_str().unwrap_or("?"),
            v["stream_window_key"].as_str().unwrap_or("?")
        ),
        None if v["stream_records_scanned"].as_u64().unwrap_or(0) > 0 => println!(
            "  no stream record among the newest {} changed it",
            v["stream_records_scanned"]
        ),
        None => {}
    }
    Ok(())
}

/// `keyturn agent-key`.
#[derive(Args, Debug)]
pub(super) struct AgentKeyArgs {
    /// Where to write the secret key (mode 0600; refused if it exists).
    #[arg(long)]
    out: PathBuf,
}

/// Who the agent is, and the replica pool's passphrase: shared by
/// `replicate` and `verify-replica`.
#[derive(Args, Debug)]
pub(super) struct AgentId {
    /// The agent's registered name.
    #[arg(long)]
    agent: String,
    /// The agent's secret key file (from `agent-key`).
    #[arg(long)]
    agent_key: PathBuf,
    /// File holding the replica pool's passphrase (else $KEYTURN_PASSPHRASE).
    #[arg(long)]
    passphrase_file: Option<PathBuf>,
    /// With a nats:// source: the subject prefix the source publishes
    /// under (its `[stream.nats] prefix`).
    #[arg(long, default_value = "keyturn")]
    nats_prefix: String,
    /// With a keyturns:// source: the CA (PEM) the source's certificate must chain to.
    #[arg(long, value_name = "FILE")]
    tls_ca: Option<PathBuf>,
    /// With a keyturns:// source: this agent's client certificate (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// With a keyturns:// source: the client certificate's private key (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
}

/// The agent's TLS configuration: from `--tls-*` for a keyturns:// source.
fn agent_tls(source: &str, id: &AgentId) -> Result<Option<crate::tls::ClientTls>> {
    if !source.starts_with("keyturns://") {
        if id.tls_ca.is_some() || id.tls_cert.is_some() {
            bail!("--tls-ca/--tls-cert/--tls-key need a keyturns:// source");
        }
        return Ok(None);
    }
    let Some(ca) = &id.tls_ca else {
        bail!("a keyturns:// source needs --tls-ca (the CA that signed the source's certificate)");
    };
    let identity = id.tls_cert.as_deref().zip(id.tls_key.as_deref());
    let tls =
        crate::tls::ClientTls::load(ca, identity).context("cannot load the agent's TLS files")?;
    Ok(Some(tls))
}

/// `keyturn replicate`.
#[derive(Args, Debug)]
pub(super) struct ReplicateArgs {
    /// The source: its stream listener (keyturn://HOST:PORT) or the NATS
    /// cluster it publishes to (nats://HOST:PORT[,HOST:PORT...]).
    #[arg(long)]
    source: String,
    /// Source zone.
    #[arg(long)]
    zone: String,
    /// Replica pool directory.
    #[arg(long = "to")]
    to: PathBuf,
    /// Replica zone (created if missing).
    #[arg(long = "to-zone")]
    to_zone: String,
    #[command(flatten)]
    id: AgentId,
    /// Stop once this source record is applied.
    #[arg(long)]
    until_seq: Option<u64>,
    /// Stop once every record durable at the source when the agent
    /// connected is applied.
    #[arg(long)]
    until_caught_up: bool,
    /// Serve Prometheus metrics (lag, apply rate) on this address at
    /// /metrics (printed as `metrics: http://ADDR/metrics`).
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<String>,
}

/// `keyturn verify-replica`.
#[derive(Args, Debug)]
pub(super) struct VerifyReplicaArgs {
    /// The source: its stream listener (keyturn://HOST:PORT) or the NATS
    /// cluster it publishes to (nats://HOST:PORT[,HOST:PORT...]).
    #[arg(long)]
    source: String,
    /// Source zone.
    #[arg(long)]
    zone: String,
    /// Replica pool directory (its agent stopped).
    #[arg(long)]
    replica: PathBuf,
    /// Replica zone.
    #[arg(long = "replica-zone")]
    replica_zone: String,
    #[command(flatten)]
    id: AgentId,
    /// JSON output.
    #[arg(long)]
    json: bool,
}

/// `keyturn replica ...`.
#[derive(Subcommand, Debug)]
pub(super) enum ReplicaCmd {
    /// A replica zone's progress, from the status its agent keeps.
    Status {
        /// Replica pool directory.
        #[arg(long, env = "KEYTURN_POOL")]
        pool: PathBuf,
        /// Replica zone.
        #[arg(long)]
        zone: String,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
}

fn call(t: &StreamTarget, req: StreamRequest) -> Result<serde_json::Value> {
    let admin = Admin::open_quietly(&t.pool)?;
    Ok(match &admin {
        Admin::Remote(c) => {
            let base = format!("/api/v1/zones/{}/stream", t.zone);
            match req {
                StreamRequest::Status => c.get(&base)?,
                StreamRequest::Keys => c.get(&format!("{base}/keys"))?,
                StreamRequest::Agents => c.get(&format!("{base}/agents"))?,
                StreamRequest::Enable => c.post_empty(&format!("{base}/enable"))?,
                StreamRequest::Disable => c.post_empty(&format!("{base}/disable"))?,
                StreamRequest::Grant(g) => c.post(&format!("{base}/grant"), &g)?,
                StreamRequest::Revoke { name } => c.post(
                    &format!("{base}/revoke"),
                    &serde_json::json!({ "name": name }),
                )?,
                StreamRequest::Shred(s) => c.post(&format!("{base}/shred"), &s)?,
            }
        }
        Admin::Local(p) => p.stream_request(&t.zone, req)?,
    })
}

fn print_json(v: &serde_json::Value) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// `keyturn stream ...`.
pub(super) fn stream(cmd: StreamCmd) -> Result<()> {
    match cmd {
        StreamCmd::Enable(t) => {
            let s = call(&t, StreamRequest::Enable)?;
            println!(
                "zone {}: streaming on (stream {}, next record {})",
                t.zone,
                s["stream_id"].as_str().unwrap_or("?"),
                s["last_seq"].as_u64().unwrap_or(0) + 1
            );
        }
        StreamCmd::Disable(t) => {
            call(&t, StreamRequest::Disable)?;
            println!("zone {}: streaming off", t.zone);
        }
        StreamCmd::Status { target, json } => {
            let s = call(&target, StreamRequest::Status)?;
            if json {
                return print_json(&s);
            }
            let n = |k: &str| s[k].as_u64().unwrap_or(0);
            let logical = n("logical_bytes");
            println!(
                "zone {}: stream {}",
                target.zone,
                s["stream_id"].as_str().unwrap_or("?")
            );
            println!(
                "  records kept: {}..={} ({} bytes)",
                n("first_seq"),
                n("last_seq"),
                n("bytes")
            );
            println!(
                "  since start: {} records, {} logical bytes, {} record bytes{}",
                n("records"),
                logical,
                n("record_bytes"),
                if logical > 0 {
                    format!(
                        " ({:.2} of logical)",
                        n("record_bytes") as f64 / logical as f64
                    )
                } else {
                    String::new()
                }
            );
            println!(
                "  blocks on the wire: {} as payload, {} as references",
                n("payload_blocks"),
                n("referenced_blocks")
            );
            if let Some(c) = s["consumers"].as_object() {
                for (name, acked) in c {
                    println!("  consumer {name}: acknowledged {acked}");
                }
            }
            if let Some(c) = s["nats_agents"].as_object() {
                let last = n("last_seq");
                for (name, at) in c {
                    let at = at.as_u64().unwrap_or(0);
                    println!(
                        "  agent {name} (through NATS): durable through {at}, {} records behind",
                        last.saturating_sub(at)
                    );
                }
            }
            if let Some(b) = s["broken"].as_str() {
                println!("  BROKEN: {b}");
            }
        }
        StreamCmd::Keys { target, json } => {
            let s = call(&target, StreamRequest::Keys)?;
            if json {
                return print_json(&s);
            }
            println!(
                "{:<10} {:<10} {:<34} {:<22} STATE",
                "SET", "SET STATE", "KEY ID", "WINDOW START (UTC)"
            );
            for set in s.as_array().into_iter().flatten() {
                for w in set["windows"].as_array().into_iter().flatten() {
                    let start = w["start_unix"].as_u64().unwrap_or(0);
                    println!(
                        "{:<10} {:<10} {:<34} {:<22} {}",
                        set["set"],
                        set["state"].as_str().unwrap_or("?"),
                        w["key_id"].as_str().unwrap_or("?"),
                        humantime::format_rfc3339_seconds(
                            std::time::UNIX_EPOCH + std::time::Duration::from_secs(start)
                        ),
                        w["state"].as_str().unwrap_or("?")
                    );
                }
            }
        }
        StreamCmd::Agents { target, json } => {
            let s = call(&target, StreamRequest::Agents)?;
            if json {
                return print_json(&s);
            }
            println!(
                "{:<20} {:<66} {:<12} {:<12}",
                "AGENT", "PUBLIC KEY", "FROM", "TO"
            );
            for (name, a) in s.as_object().into_iter().flatten() {
                println!(
                    "{:<20} {:<66} {:<12} {:<12}",
                    name,
                    a["public_key"].as_str().unwrap_or("?"),
                    a["from_unix"],
                    a["to_unix"]
                );
            }
        }
        StreamCmd::Grant {
            target,
            agent,
            public_key,
            from,
            to,
        } => {
            let key = if public_key.len() == 64 && public_key.bytes().all(|b| b.is_ascii_hexdigit())
            {
                public_key
            } else {
                std::fs::read_to_string(&public_key)
                    .with_context(|| format!("cannot read the public key file {public_key}"))?
                    .trim()
                    .to_string()
            };
            let req = GrantRequest {
                name: agent.clone(),
                public_key: key,
                from_unix: from.as_deref().map(parse_time).transpose()?.unwrap_or(0),
                to_unix: to.as_deref().map(parse_time).transpose()?,
            };
            call(&target, StreamRequest::Grant(req))?;
            println!(
                "agent {agent} may read zone {}'s stream in its granted windows",
                target.zone
            );
        }
        StreamCmd::Revoke { target, agent } => {
            call(
                &target,
                StreamRequest::Revoke {
                    name: agent.clone(),
                },
            )?;
            println!(
                "agent {agent}: registration removed from zone {}",
                target.zone
            );
        }
        StreamCmd::Shred {
            target,
            window,
            approvals,
        } => {
            let req = ShredRequest {
                key_id: Some(window.clone()),
                set: None,
                window: None,
                approvals: read_approvals(&approvals)?,
            };
            call(&target, StreamRequest::Shred(req))?;
            println!(
                "window {window} of zone {} shredded: its records can no longer be opened",
                target.zone
            );
        }
    }
    Ok(())
}

/// `keyturn agent-key`: a new X25519 key for an agent.
pub(super) fn agent_key(a: AgentKeyArgs) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let key = AgentKey::generate();
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&a.out)
        .with_context(|| format!("cannot create {} (it must not exist)", a.out.display()))?;
    f.write_all(key.secret_hex().as_bytes())?;
    f.write_all(b"\n")?;
    f.sync_all()?;
    println!("{}", hex(&key.public()));
    Ok(())
}

fn read_agent_key(path: &std::path::Path) -> Result<AgentKey> {
    let secret = zeroize::Zeroizing::new(
        std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the agent key {}", path.display()))?,
    );
    AgentKey::from_hex(&secret).with_context(|| format!("{} is not an agent key", path.display()))
}

/// What the agent and `verify-replica` start from.
struct AgentSetup {
    /// The source's address.
    source: crate::replica::Source,
    /// The agent's key.
    key: AgentKey,
    runtime: tokio::runtime::Runtime,
    /// The replica pool, opened here.
    pool: Arc<crate::pool::Pool>,
    /// SIGTERM and SIGINT, caught from before the pool opened (when asked).
    signals: Option<StopSignals>,
}

/// Parses the source, reads the agent's key, starts a runtime, catches
/// stop signals (`catch_stop`) and opens the replica pool.
fn agent_setup(
    source: &str,
    id: &AgentId,
    pool: &std::path::Path,
    catch_stop: bool,
) -> Result<AgentSetup> {
    let source = parse_source(
        source.replacen("keyturns://", "keyturn://", 1).as_str(),
        &id.nats_prefix,
    )
    .map_err(anyhow::Error::msg)?;
    let key = read_agent_key(&id.agent_key)?;
    let pool_args = PoolArgs {
        pool: pool.to_path_buf(),
        passphrase_file: id.passphrase_file.clone(),
        pin_file: None,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    // Caught from here on: a stop asked for while the pool opens (the KDF
    // takes a while) ends the run cleanly instead of by the default action.
    let signals = if catch_stop {
        let _rt = runtime.enter();
        Some(StopSignals::install().context("cannot catch SIGTERM and SIGINT")?)
    } else {
        None
    };
    let pool = Arc::new(open_pool(&pool_args, &default_profile()?)?);
    Ok(AgentSetup {
        source,
        key,
        runtime,
        pool,
        signals,
    })
}

/// SIGTERM and SIGINT, caught from the moment of `install` on.
struct StopSignals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl StopSignals {
    fn install() -> std::io::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    /// Until either signal arrives (or arrived since `install`).
    async fn wait(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {},
            _ = self.int.recv() => {},
        }
    }
}

/// `keyturn verify-replica`: exits 0 when equal, 1 when they differ, 2
/// when the two sides are not at one stream record.
pub(super) fn verify_replica(a: VerifyReplicaArgs) -> Result<u8> {
    let tls = agent_tls(&a.source, &a.id)?;
    let AgentSetup {
        source,
        key,
        runtime,
        pool,
        ..
    } = agent_setup(&a.source, &a.id, &a.replica, false)?;
    let cfg = AgentConfig {
        source,
        zone: a.zone,
        agent: a.id.agent,
        key,
        replica_zone: a.replica_zone,
        until_seq: None,
        until_caught_up: false,
        tls,
    };
    let verdict = runtime.block_on(crate::replica::verify(pool, cfg))?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&verdict)?);
    }
    use crate::replica::Verdict;
    let code = match &verdict {
        Verdict::Equal {
            seq,
            volumes,
            bytes,
        } => {
            if !a.json {
                println!(
                    "equal at record {seq}: {} volume(s) ({}), {bytes} bytes per side",
                    volumes.len(),
                    volumes.join(", ")
                );
            }
            0
        }
        Verdict::Differs { seq, volume, lba } => {
            if !a.json {
                println!(
                    "DIFFERENT at record {seq}: volume {volume}, first differing block {lba} (byte offset {})",
                    lba * 4096
                );
            }
            1
        }
        Verdict::VolumesDiffer { detail } => {
            if !a.json {
                println!("DIFFERENT volumes: {detail}");
            }
            1
        }
        Verdict::NotComparable {
            source_seq,
            source_moved,
            replica_seq,
        } => {
            if !a.json {
                println!(
                    "not comparable: the source is at record {source_seq}{}, the replica at {replica_seq}; stop writes to the source and let the agent catch up (`replicate --until-seq {source_seq}`)",
                    if *source_moved {
                        " and moved while hashing"
                    } else {
                        ""
                    }
                );
            }
            2
        }
    };
    Ok(code)
}

/// `keyturn replicate`: the agent, until its stop condition, an error, or
/// SIGTERM/SIGINT.
pub(super) fn replicate(a: ReplicateArgs) -> Result<()> {
    let tls = agent_tls(&a.source, &a.id)?;
    let AgentSetup {
        source,
        key,
        runtime,
        pool,
        signals,
    } = agent_setup(&a.source, &a.id, &a.to, true)?;
    let mut signals = signals.expect("asked for");
    let mut agent = Agent::new(
        pool.clone(),
        AgentConfig {
            source,
            zone: a.zone,
            agent: a.id.agent,
            key,
            replica_zone: a.to_zone,
            until_seq: a.until_seq,
            until_caught_up: a.until_caught_up,
            tls,
        },
    )?;
    let result = runtime.block_on(async {
        if let Some(addr) = &a.metrics_listen {
            let exporter = crate::admin::metrics::Exporter::install()?;
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen for metrics on {addr}"))?;
            println!("metrics: http://{}/metrics", l.local_addr()?);
            let app = axum::Router::new().route(
                "/metrics",
                axum::routing::get(move || {
                    let e = exporter.clone();
                    async move { e.render_plain() }
                }),
            );
            tokio::spawn(async move { axum::serve(l, app).await });
        }
        tokio::select! {
            r = agent.run() => r.map(Some).map_err(anyhow::Error::from),
            () = signals.wait() => Ok(None),
        }
    });
    pool.sync().context("final flush of the replica pool")?;
    match result? {
        Some(st) => println!(
            "replica zone {}: applied through record {} ({} records this run, {} full syncs)",
            st.zone, st.applied_seq, st.records_applied, st.full_syncs
        ),
        None => println!("stopped"),
    }
    Ok(())
}

/// `keyturn replica ...`.
pub(super) fn replica(cmd: ReplicaCmd) -> Result<()> {
    match cmd {
        ReplicaCmd::Status { pool, zone, json } => {
            let catalog: crate::pool::Catalog = serde_json::from_slice(
                &std::fs::read(pool.join("catalog.json"))
                    .with_context(|| format!("{} is not a keyturn pool", pool.display()))?,
            )?;
            let Some(z) = catalog.zones.iter().find(|z| z.name == zone) else {
                bail!("no zone named {zone:?} in {}", pool.display());
            };
            let Some(st) = read_status(&pool, z.id) else {
                bail!("zone {zone:?} has no replication status (no agent has run for it)");
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&st)?);
                return Ok(());
            }
            println!(
                "replica zone {} of source zone {} ({}): {}",
                st.zone, st.source_zone, st.source, st.phase
            );
            println!(
                "  applied {} of {}: lag {} records, {} bytes, {:.3} s; {:.1} records/s",
                st.applied_seq,
                st.source_seq,
                st.lag_records,
                st.lag_bytes,
                st.lag_seconds,
                st.apply_rate
            );
            if let Some(e) = &st.error {
                println!("  error: {e}");
            }
        }
    }
    Ok(())
}
