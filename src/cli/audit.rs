//! `keyturn audit`: verify the chain (and its signatures, with the public
//! key alone), export a self-verifying bundle, print the public key. None of
//! these opens the pool or needs a secret.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Subcommand;

use crate::audit::export::{self, Bound};
use crate::audit::sign;
use crate::audit::signed::{self, SignedError, SignedReport};

#[derive(Subcommand, Debug)]
pub(super) enum AuditCmd {
    /// Check the whole hash chain of POOL/audit.log against its anchor, and
    /// name the first broken record. Reads only the log: no passphrase needed.
    ///
    /// With --public-key, also check the signed digests (POOL/audit.digests)
    /// with that key alone: a record rewritten with recomputed hashes, a
    /// record appended without the signing key, a cut tail and a forged
    /// signature are named. With --bundle, check an exported bundle instead
    /// of a pool.
    Verify {
        /// Pool directory.
        #[arg(long, env = "KEYTURN_POOL", required_unless_present = "bundle")]
        pool: Option<PathBuf>,
        /// The audit public key (PEM, from `keyturn audit public-key`),
        /// obtained independently of the pool being checked.
        #[arg(long, value_name = "FILE")]
        public_key: Option<PathBuf>,
        /// Check this bundle (from `keyturn audit export`) instead of a pool.
        #[arg(long, value_name = "FILE", conflicts_with = "pool")]
        bundle: Option<PathBuf>,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Write a self-verifying bundle of the records from --from to --to:
    /// the records verbatim, the digests that sign them and the public key.
    Export {
        /// Pool directory.
        #[arg(long, env = "KEYTURN_POOL")]
        pool: PathBuf,
        /// First record: an event id, a date (2026-12-06) or an RFC 3339 time.
        #[arg(long, default_value = "1")]
        from: Bound,
        /// Last record: an event id (inclusive), or a date or time (exclusive).
        #[arg(long, default_value = "18446744073709551615")]
        to: Bound,
        /// Output file [default: standard output].
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// Print the pool's audit signing public key (PEM), and on standard
    /// error where its private key is kept (in the PKCS#11 token, or
    /// wrapped under the root key).
    PublicKey {
        /// Pool directory.
        #[arg(long, env = "KEYTURN_POOL")]
        pool: PathBuf,
        /// Write it to this file instead of standard output.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
}

/// Runs an `audit` subcommand.
pub(super) fn audit(cmd: AuditCmd) -> Result<()> {
    match cmd {
        AuditCmd::Verify {
            pool,
            public_key,
            bundle,
            json,
        } => match (pool, public_key, bundle) {
            (_, key, Some(bundle)) => verify_bundle(&bundle, key.as_deref(), json),
            (Some(pool), Some(key), None) => verify_signed(&pool, &key, json),
            (Some(pool), None, None) => {
                audit_verify(&pool, json)?;
                if !json && pool.join(sign::DIGEST_FILE).exists() {
                    println!(
                        "signatures not checked: add --public-key FILE (from `keyturn audit public-key`)"
                    );
                }
                Ok(())
            }
            (None, _, None) => bail!("give --pool or --bundle"),
        },
        AuditCmd::Export {
            pool,
            from,
            to,
            out,
        } => {
            let b = export::export(&pool, &from, &to)
                .with_context(|| format!("cannot export the audit log of {}", pool.display()))?;
            let mut text = serde_json::to_string_pretty(&b)?;
            text.push('\n');
            match out {
                Some(path) => {
                    std::fs::write(&path, &text)
                        .with_context(|| format!("cannot write {}", path.display()))?;
                    eprintln!(
                        "wrote {} records ({} signed digests) to {}",
                        b.records.len(),
                        b.digests.len(),
                        path.display()
                    );
                }
                None => print!("{text}"),
            }
            Ok(())
        }
        AuditCmd::PublicKey { pool, out } => {
            let key = sign::public_key(&pool).with_context(|| {
                format!(
                    "pool {} has no audit signing key yet (it is made when the pool is created or next opened)",
                    pool.display()
                )
            })?;
            let pem = sign::public_key_pem(&key);
            // Standard error: standard output is the PEM alone.
            if let Ok((id, place)) = sign::key_place(&pool) {
                eprintln!("audit signing key {id}: {place}");
            }
            match out {
                Some(path) => std::fs::write(&path, &pem)
                    .with_context(|| format!("cannot write {}", path.display()))?,
                None => print!("{pem}"),
            }
            Ok(())
        }
    }
}

fn verify_signed(pool: &Path, key: &Path, json: bool) -> Result<()> {
    let public = sign::read_public_key(key)?;
    let r = signed::verify_pool(pool, &public);
    let r = report(
        r.map_err(anyhow_or_finding),
        &pool.display().to_string(),
        json,
    );
    if !json && let Ok((id, place)) = sign::key_place(pool) {
        println!("the pool's audit signing key {id} is kept {place}");
    }
    r
}

fn verify_bundle(bundle: &Path, key: Option<&Path>, json: bool) -> Result<()> {
    let trusted = key.map(sign::read_public_key).transpose()?;
    let text =
        std::fs::read(bundle).with_context(|| format!("cannot read {}", bundle.display()))?;
    let r = export::verify_bundle(&text, trusted.as_ref()).map_err(|e| match e {
        export::BundleError::Signed(s) => anyhow_or_finding(s),
        other => Outcome::Error(other.into()),
    });
    if trusted.is_none() && !json {
        println!(
            "note: checked with the key the bundle carries; pass --public-key to check who signed it"
        );
    }
    report(r, &bundle.display().to_string(), json)
}

enum Outcome {
    Finding(signed::Finding),
    Error(anyhow::Error),
}

fn anyhow_or_finding(e: SignedError) -> Outcome {
    match e {
        SignedError::Failed(f) => Outcome::Finding(f),
        other => Outcome::Error(other.into()),
    }
}

fn report(r: std::result::Result<SignedReport, Outcome>, what: &str, json: bool) -> Result<()> {
    match r {
        Ok(rep) => {
            if json {
                let mut v = serde_json::to_value(&rep)?;
                v["ok"] = true.into();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!(
                    "audit log {what}: {} records (events {} to {}), chain intact, every record covered by a valid signature of key {} ({} digests)",
                    rep.records, rep.first_id, rep.last_id, rep.key_id, rep.digests
                );
            }
            Ok(())
        }
        Err(Outcome::Finding(f)) => {
            if json {
                let mut v = serde_json::to_value(&f)?;
                v["ok"] = false.into();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!(
                    "first record not covered or altered: event {} ({})",
                    f.id.map_or_else(|| "unknown".into(), |i| i.to_string()),
                    f.kind
                );
                println!("{}", f.reason);
            }
            bail!("audit log {what} does not verify: {}", f.reason)
        }
        Err(Outcome::Error(e)) => Err(e),
    }
}

/// `keyturn audit verify`: never opens the pool (no key, no lock), so it
/// also runs while the pool is served.
fn audit_verify(pool: &Path, json: bool) -> Result<()> {
    use crate::audit::{self, AuditError};
    let log = pool.join(audit::LOG_FILE);
    match audit::verify(pool) {
        Ok(report) => {
            if json {
                let mut v = serde_json::to_value(&report)?;
                v["ok"] = true.into();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!(
                    "audit log {}: {} records, chain intact, ends at event {} (hash {})",
                    log.display(),
                    report.records,
                    report.last_id,
                    report.last_hash
                );
                if report.unanchored > 0 {
                    println!(
                        "note: the last record is not yet in audit.head (an append was interrupted); the next open of the pool moves the anchor"
                    );
                }
            }
            Ok(())
        }
        Err(AuditError::Broken {
            path,
            line,
            id,
            why,
        }) => {
            // Show the offending line, escaped and cut short: it may hold
            // anything, including terminal escapes.
            let text = std::fs::read(&path).ok().and_then(|data| {
                let l = data
                    .split(|&b| b == b'\n')
                    .nth(usize::try_from(line).ok()?.checked_sub(1)?)?;
                let l = String::from_utf8_lossy(l);
                let mut shown: String = l.chars().take(400).collect();
                if l.chars().count() > 400 {
                    shown.push('…');
                }
                Some(shown)
            });
            if json {
                let v = serde_json::json!({
                    "ok": false, "line": line, "id": id, "kind": why.kind(),
                    "reason": why.to_string(), "record": text,
                });
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!(
                    "first broken record: line {line}, event id {}",
                    id.map_or_else(|| "unknown".into(), |i| i.to_string())
                );
                println!("why: {why}");
                if let Some(t) = &text {
                    println!("record: {t:?}");
                }
            }
            bail!(
                "audit log {} is broken at line {line} (event id {}): {why}",
                path.display(),
                id.map_or_else(|| "unknown".into(), |i| i.to_string())
            )
        }
        Err(e) => {
            if json {
                let v =
                    serde_json::json!({"ok": false, "kind": "unreadable", "reason": e.to_string()});
                println!("{}", serde_json::to_string_pretty(&v)?);
            }
            Err(e)
                .with_context(|| format!("cannot verify the audit log of pool {}", pool.display()))
        }
    }
}
