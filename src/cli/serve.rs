//! `keyturn serve`: open a pool, start its listeners (NBD, admin API,
//! change stream, NATS) and background work, and stop them all cleanly on
//! SIGTERM or SIGINT.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::Args;

use super::secret::Secret;
use super::{PoolArgs, demo, error_chain, tls};
use crate::admin::AdminBackend;
use crate::admin::client::ADDR_FILE;
use crate::admin::http as admin_http;
use crate::admin::metrics::Exporter;
use crate::admin::token::AdminToken;
use crate::audit::AuditEvent;
use crate::config::Profile;
use crate::nbd;
use crate::pool::Pool;

/// Where `serve` writes the stream listener's address (removed at a clean stop).
const STREAM_ADDR_FILE: &str = "stream.addr";

#[derive(Args, Debug)]
pub(super) struct ServeArgs {
    #[command(flatten)]
    pool: PoolArgs,
    /// TCP address to listen on [default: from pool.toml, else 127.0.0.1:10809]; port 0 picks a free port.
    #[arg(long)]
    listen: Option<String>,
    /// Also listen on this Unix socket.
    #[arg(long)]
    unix: Option<PathBuf>,
    /// Hardware profile: a name from hw-profiles/ or a path to a profile file.
    #[arg(long)]
    profile: Option<String>,
    /// Loopback address of the admin API [default: [admin] listen in
    /// pool.toml, 127.0.0.1:10810; a free port when the NBD address has port 0].
    #[arg(long, value_name = "ADDR")]
    admin_listen: Option<String>,
    /// Address of the change stream listener for replication agents
    /// [default: [stream] listen in pool.toml; none when empty].
    #[arg(long, value_name = "ADDR")]
    stream_listen: Option<String>,
    /// Publish every streaming zone's records to this NATS JetStream
    /// cluster: nats://HOST:PORT[,HOST:PORT...] [default: [stream.nats] url
    /// in pool.toml; none when empty].
    #[arg(long, value_name = "URL")]
    nats: Option<String>,
    /// Serve NBD without TLS on an address beyond loopback (logs a warning).
    #[arg(long)]
    allow_plaintext: bool,
}

/// `keyturn serve`.
pub(super) fn run(a: ServeArgs) -> Result<()> {
    let secret = Secret::for_pool(&a.pool)?;
    let listen = Listen {
        nbd: a.listen,
        unix: a.unix,
        admin: a.admin_listen,
        stream: a.stream_listen,
        nats: a.nats,
        allow_plaintext: a.allow_plaintext,
    };
    serve(&a.pool.pool, &secret, listen, a.profile, None)
}

/// Where `serve` listens; `None` takes pool.toml's setting.
pub(super) struct Listen {
    pub(super) nbd: Option<String>,
    pub(super) unix: Option<PathBuf>,
    pub(super) admin: Option<String>,
    pub(super) stream: Option<String>,
    pub(super) nats: Option<String>,
    pub(super) allow_plaintext: bool,
}

/// The admin API address: `--admin-listen`, else pool.toml's; with port 0
/// when the NBD address has port 0 (a free port for each), so that servers
/// started that way never collide on the admin port.
fn admin_listen(
    given: Option<String>,
    nbd: &str,
    config: &crate::config::AdminSection,
) -> Result<String> {
    if let Some(addr) = given {
        return Ok(addr);
    }
    let nbd_port_0 = nbd
        .rsplit_once(':')
        .is_some_and(|(_, port)| port.parse() == Ok(0u16));
    if !nbd_port_0 {
        return Ok(config.listen.clone());
    }
    let mut addr = admin_http::loopback_addr(&config.listen)
        .with_context(|| format!("[admin] listen in pool.toml is {:?}", config.listen))?;
    addr.set_port(0);
    Ok(addr.to_string())
}

/// Installs the test clock named by `KEYTURN_TEST_CLOCK`, only on a pool
/// whose pool.toml allows it (a test facility: see [`crate::clock`]).
fn install_test_clock(config: &crate::config::PoolConfig) -> Result<()> {
    let Some(path) = std::env::var_os(crate::clock::TEST_CLOCK_ENV) else {
        return Ok(());
    };
    if !config.test.allow_test_clock {
        bail!(
            "{} is set, but the test clock is a test facility: this pool's pool.toml does not have \
             `[test] allow_test_clock = true`; unset {} to serve with the system clock",
            crate::clock::TEST_CLOCK_ENV,
            crate::clock::TEST_CLOCK_ENV
        );
    }
    let clock = crate::clock::Clock::file(Path::new(&path))?;
    let now = clock.unix_now();
    crate::clock::install(clock)?;
    tracing::warn!(
        file = %Path::new(&path).display(),
        now,
        "TEST CLOCK ON: calendar time (key ages, rotation timers, the scheduler) comes from a file; never use this in production"
    );
    Ok(())
}

pub(super) fn serve(
    dir: &Path,
    secret: &Secret,
    listen: Listen,
    profile: Option<String>,
    demo: Option<()>,
) -> Result<()> {
    if !Pool::exists(dir) {
        bail!(
            "{} is not a keyturn pool (no pool.toml); create one with `keyturn init` or `keyturn demo`",
            dir.display()
        );
    }
    let config = crate::config::PoolConfig::load(&dir.join("pool.toml"))?;
    let profile = Profile::load(profile.as_deref().unwrap_or(&config.server.profile))?;
    install_test_clock(&config)?;
    let unix = listen.unix.or(config.server.unix.clone());
    let listen_admin = admin_listen(
        listen.admin,
        listen.nbd.as_deref().unwrap_or(&config.server.listen),
        &config.admin,
    )?;
    let stream_listen = listen
        .stream
        .clone()
        .unwrap_or_else(|| config.stream.listen.clone());
    let mut nats = config.stream.nats.clone();
    if let Some(url) = listen.nats.clone() {
        nats.url = url;
    }
    nats.url = nats
        .url
        .split(',')
        .map(|a| a.trim().trim_start_matches("nats://"))
        .collect::<Vec<_>>()
        .join(",");
    nats.validate().map_err(anyhow::Error::msg)?;
    let allow_plaintext = listen.allow_plaintext;
    let listen = listen.nbd.unwrap_or(config.server.listen.clone());
    let secured = tls::setup(dir, &config, &listen, allow_plaintext)?;
    // Refused before anything is opened: the admin API is loopback only,
    // unless it can be served over HTTPS.
    let admin_tls = secured.admin_tls(&listen_admin);
    if admin_tls.is_none() {
        admin_http::loopback_addr(&listen_admin)?;
    }
    let token_path = config.admin.token_path(dir);
    let token = AdminToken::load_or_create(&token_path).with_context(|| {
        format!(
            "cannot read or create the admin API token {}",
            token_path.display()
        )
    })?;
    let tokens = crate::admin::tokens::TokenStore::load(dir, Some(token))
        .context("cannot read the pool's API tokens")?;
    let exporter = Exporter::install()?;
    let addr_file = dir.join(ADDR_FILE);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(profile.server.worker_threads.max(1))
        .thread_name("keyturn-worker")
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let pool = Arc::new(
        Pool::open_with(dir, secret.as_root(), &profile)
            .with_context(|| format!("cannot open pool {}", dir.display()))?,
    );
    // Serving is not refused when the audit log cannot take records: the
    // pool already logged that loudly, and data availability comes first.
    let started = std::time::Instant::now();
    pool.start_background();
    // Serving goes on without the scheduler if its files are unreadable:
    // data availability comes first, and the log says why.
    let scheduler = match crate::schedule::Scheduler::start(&pool) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::error!(error = %e, "ALERT: the rotation scheduler cannot start; no rotation will start by itself");
            None
        }
    };
    let reporter = crate::report::scheduled::Reporter::start(&pool).unwrap_or_else(|e| {
        tracing::error!(error = %e, "ALERT: scheduled reports cannot start; none will be written");
        None
    });
    if let Err(e) = pool.record(AuditEvent::ok("serve.start")) {
        tracing::warn!(error = %e, "serve.start not recorded");
    }
    let mut stream_task: Option<tokio::task::JoinHandle<()>> = None;
    secured.attach(&pool);
    let result = runtime.block_on(async {
        let reload = secured.spawn_reload()?;
        let server_config = nbd::server::ServerConfig {
            max_in_flight: profile.server.max_inflight_per_conn,
            handshake_timeout: std::time::Duration::from_secs(
                config.server.handshake_timeout_secs.max(1),
            ),
            ..nbd::server::ServerConfig::default()
        };
        let (tx, rx) = tokio::sync::watch::channel(false);
        let mut tasks = Vec::new();
        // The admin port first: if it is taken, no NBD client was ever accepted.
        let admin_listener = admin_http::bind(&listen_admin, admin_tls.is_some()).await?;
        let admin_addr = admin_listener.local_addr()?;
        let tcp = nbd::server::bind(&listen).await?;
        crate::pool::write_atomic(&addr_file, format!("{admin_addr}\n").as_bytes())?;
        let addr = tcp.local_addr().to_string();
        let export = pool
            .catalog()
            .volumes
            .first()
            .map(|v| v.name.clone())
            .unwrap_or_default();
        tasks.push(tokio::spawn(nbd::server::serve_secured(
            tcp,
            pool.clone(),
            server_config.clone(),
            secured.nbd.clone(),
            rx.clone(),
        )));
        let mut unix_uri = None;
        if let Some(path) = &unix {
            let _ = std::fs::remove_file(path);
            let l = nbd::server::bind(&format!("unix:{}", path.display())).await?;
            unix_uri = Some(format!("nbd+unix:///{export}?socket={}", path.display()));
            // A local socket: no TLS, but the same access rules.
            let local = nbd::Security {
                mode: crate::tls::TlsMode::Off,
                tls: None,
                gate: secured.nbd.gate.clone(),
            };
            tasks.push(tokio::spawn(nbd::server::serve_secured(
                l,
                pool.clone(),
                server_config.clone(),
                local,
                rx.clone(),
            )));
        }
        let mut stream_line = None;
        if !stream_listen.is_empty() {
            let l = tokio::net::TcpListener::bind(&stream_listen)
                .await
                .with_context(|| format!("cannot listen for stream agents on {stream_listen}"))?;
            let a = l.local_addr()?;
            crate::pool::write_atomic(&dir.join(STREAM_ADDR_FILE), format!("{a}\n").as_bytes())?;
            let stream_tls = secured.stream_tls(&stream_listen);
            let scheme = if stream_tls.is_some() {
                "keyturns"
            } else {
                "keyturn"
            };
            stream_line = Some(format!("stream: {scheme}://{a}"));
            let source: Arc<dyn crate::stream::serve::StreamSource> =
                Arc::new(crate::pool::PoolStreams(pool.clone()));
            stream_task = Some(tokio::spawn(crate::stream::serve::run_secured(
                l, source, stream_tls,
            )));
        }
        let nats_task = (!nats.url.is_empty()).then(|| {
            let source: Arc<dyn crate::stream::serve::StreamSource> =
                Arc::new(crate::pool::PoolStreams(pool.clone()));
            tokio::spawn(crate::stream::nats::run(nats.clone(), source))
        });
        let backend: Arc<dyn AdminBackend> = pool.clone();
        let admin = tokio::spawn(admin_http::serve(
            admin_listener,
            backend,
            tokens,
            exporter,
            rx.clone(),
            admin_tls.clone(),
        ));
        let uri = format!("nbd://{addr}/{export}");
        if demo.is_some() {
            // On stdout, before the ready line: what a person (or a script) needs.
            print!("{}", demo::hints(&uri, dir, &demo::shown_exe()));
        }
        // Handlers first: a SIGTERM sent as soon as "ready:" is read must
        // stop the server cleanly, not kill it with the default action.
        let shutdown = ShutdownSignals::install()?;
        let mut out = std::io::stdout().lock();
        let admin_scheme = if admin_tls.is_some() { "https" } else { "http" };
        writeln!(out, "admin: {admin_scheme}://{admin_addr}/")?;
        if let Some(l) = &stream_line {
            writeln!(out, "{l}")?;
        }
        if !nats.url.is_empty() {
            writeln!(out, "stream: nats://{} (prefix {})", nats.url, nats.prefix)?;
        }
        writeln!(out, "ready: nbd://{addr}/")?;
        if let Some(u) = &unix_uri {
            writeln!(out, "ready: {u}")?;
        }
        out.flush()?;
        drop(out);
        tracing::info!(%addr, exports = pool.catalog().volumes.len(), "serving");
        shutdown.wait().await;
        tracing::info!("shutting down: finishing requests in flight");
        reload.abort();
        let _ = tx.send(true);
        if let Some(t) = stream_task.take() {
            t.abort();
        }
        if let Some(t) = nats_task {
            t.abort();
        }
        for t in tasks {
            let _ = t.await;
        }
        // Bounded: a client stuck in the middle of a request must not hold
        // the shutdown up.
        match tokio::time::timeout(std::time::Duration::from_secs(5), admin).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => tracing::error!(error = %e, "admin API server failed"),
            Ok(Err(e)) => tracing::error!(error = %e, "admin API task failed"),
            Err(_) => tracing::warn!("admin API requests still open after 5 s; closing them"),
        }
        anyhow::Ok(())
    });
    if let Some(s) = &scheduler {
        s.stop();
    }
    if let Some(r) = &reporter {
        r.stop();
    }
    pool.stop_background();
    let _ = std::fs::remove_file(dir.join(STREAM_ADDR_FILE));
    if let Err(e) = std::fs::remove_file(&addr_file)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(file = %addr_file.display(), error = %e, "cannot remove the admin address file");
    }
    let synced = pool.sync().context("final flush failed");
    let event = match (&result, &synced) {
        (Ok(()), Ok(())) => AuditEvent::ok("serve.stop"),
        (Err(e), _) | (_, Err(e)) => AuditEvent::failed("serve.stop", &error_chain(e)),
    };
    if let Err(e) = pool.record(event.duration(started.elapsed())) {
        tracing::warn!(error = %e, "serve.stop not recorded");
    }
    synced?;
    result
}

/// SIGTERM and SIGINT, caught from the moment of `install` on.
struct ShutdownSignals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl ShutdownSignals {
    fn install() -> std::io::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    /// Until either signal arrives (or arrived since `install`).
    async fn wait(mut self) {
        tokio::select! {
            _ = self.term.recv() => {},
            _ = self.int.recv() => {},
        }
    }
}
