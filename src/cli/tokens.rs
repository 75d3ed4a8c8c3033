//! `keyturn token create|list|revoke`: named API tokens with a role,
//! through the running server when there is one (it authenticates with
//! them at once), else in the pool directory's `tokens.json` (the next
//! server reads it).

use anyhow::{Context, Result};
use clap::{Args, Subcommand};

use super::PoolArgs;
use crate::admin::CreateTokenRequest;
use crate::admin::client::{AdminClient, ClientError};
use crate::admin::tokens::{NewToken, Role, TokenInfo, TokenStore};
use crate::audit::{AuditEvent, AuditLog};

/// `keyturn token ...`.
#[derive(Subcommand, Debug)]
pub(super) enum TokenCmd {
    /// Make a token with a role and print it (shown only this once; the
    /// pool keeps its hash).
    Create {
        #[command(flatten)]
        target: TokenTarget,
        /// Token name (letters, digits, '.', '_', '-'): what the audit log records.
        #[arg(long)]
        name: String,
        /// viewer (GET only), operator (rotation control) or admin (zones,
        /// volumes, policies, keys, tokens).
        #[arg(long)]
        role: Role,
    },
    /// The tokens: names, roles, when and by whom made (never their text).
    List(TokenTarget),
    /// Revoke a token: it stops working at once.
    Revoke {
        #[command(flatten)]
        target: TokenTarget,
        /// Token name.
        #[arg(long)]
        name: String,
    },
}

/// A pool, and how to print.
#[derive(Args, Debug)]
pub(super) struct TokenTarget {
    #[command(flatten)]
    pool: PoolArgs,
    /// JSON output.
    #[arg(long)]
    json: bool,
}

impl clap::ValueEnum for Role {
    fn value_variants<'a>() -> &'a [Self] {
        &Role::ALL
    }

    fn to_possible_value(&self) -> Option<clap::builder::PossibleValue> {
        Some(clap::builder::PossibleValue::new(self.name()))
    }
}

/// The running server's API, or `None` when no server answers.
fn server(t: &TokenTarget) -> Result<Option<AdminClient>> {
    super::require_pool_dir(&t.pool.pool)?;
    match AdminClient::for_pool(&t.pool.pool).and_then(|c| c.health().map(|_| c)) {
        Ok(c) => Ok(Some(c)),
        Err(ClientError::NotRunning { .. }) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Records a change made on an unserved pool.
fn audit_local(t: &TokenTarget, event: AuditEvent) -> Result<()> {
    let log = AuditLog::open(&t.pool.pool).context("cannot open the pool's audit log")?;
    log.append(event.actor("local"))
        .context("the token file changed, but the change is not in the audit log")?;
    Ok(())
}

pub(super) fn token(cmd: TokenCmd) -> Result<()> {
    match cmd {
        TokenCmd::Create { target, name, role } => {
            let made: NewToken = match server(&target)? {
                Some(c) => c.post("/api/v1/tokens", &CreateTokenRequest { name, role })?,
                None => {
                    let mut store = TokenStore::load(&target.pool.pool, None)?;
                    let made =
                        store.create(&name, role, Some("local"), crate::clock::unix_now())?;
                    audit_local(
                        &target,
                        AuditEvent::ok("token.create").key_id(format!("token:{name}:{role}")),
                    )?;
                    made
                }
            };
            if target.json {
                println!("{}", serde_json::to_string(&made)?);
            } else {
                eprintln!(
                    "keyturn: token {:?} ({}) made; it is shown only now: keep it (send it as `Authorization: Bearer TOKEN`, or set KEYTURN_API_TOKEN for the CLI)",
                    made.name, made.role
                );
                println!("{}", made.token);
            }
        }
        TokenCmd::List(target) => {
            let list: Vec<TokenInfo> = match server(&target)? {
                Some(c) => c.get("/api/v1/tokens")?,
                None => TokenStore::load(&target.pool.pool, None)?.list(),
            };
            if target.json {
                println!("{}", serde_json::to_string(&list)?);
            } else if list.is_empty() {
                println!("no named tokens (the pool's admin token file acts as admin)");
            } else {
                println!("{:<24} {:<9} {:<20} CREATED BY", "NAME", "ROLE", "CREATED");
                for t in list {
                    let when = crate::audit::rfc3339(
                        std::time::UNIX_EPOCH + std::time::Duration::from_secs(t.created_unix),
                    );
                    println!(
                        "{:<24} {:<9} {:<20} {}",
                        t.name,
                        t.role,
                        when.get(..19).unwrap_or(&when),
                        t.created_by.as_deref().unwrap_or("-")
                    );
                }
            }
        }
        TokenCmd::Revoke { target, name } => {
            let gone: TokenInfo = match server(&target)? {
                Some(c) => c.post_empty(&format!("/api/v1/tokens/{name}/revoke"))?,
                None => {
                    let mut store = TokenStore::load(&target.pool.pool, None)?;
                    let gone = store.revoke(&name)?;
                    audit_local(
                        &target,
                        AuditEvent::ok("token.revoke").key_id(format!("token:{name}")),
                    )?;
                    gone
                }
            };
            if target.json {
                println!("{}", serde_json::to_string(&gone)?);
            } else {
                println!("revoked token {:?} ({})", gone.name, gone.role);
            }
        }
    }
    Ok(())
}
