//! Key backup and restore of a whole pool (see [`crate::keys::backup`] for
//! the file): `keyturn keys backup` and `keyturn keys restore`.
//!
//! A backup is taken with the pool closed (its lock held), so the key files,
//! catalog, tables and journal it copies are one consistent, crash-like
//! image; with the data device copied at the same time, a restore into an
//! empty directory on another host opens with every volume readable. The
//! restored pool gets a new root key (sealed under a new passphrase), and
//! its KEKs are re-wrapped from the backup key under it.
//!
//! Both need approvals from distinct operators (always, whatever
//! `[dual_control]` says: a backup is every key of the pool), and both are
//! recorded in the audit log: the backup in the source pool's, the restore
//! (and a refused restore) in the new pool's, naming the backup id.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use super::{Pool, PoolError, Result, io_at, write_atomic};
use crate::audit::{AuditEvent, AuditLog};
use crate::config::{DualControlSection, PoolConfig, RootKeyConfig};
use crate::keys::approval::{self, Operation, Target};
use crate::keys::backup::{self, Payload, Sealer, Transfer};
use crate::keys::passphrase::Passphrase;
use crate::keys::root::RootKeyProvider;
use crate::keys::root_rotation::{RootRotationState, root_id};
use crate::keys::sealed::{KdfParams, SealedFileProvider};
use crate::keys::zone_keys::ZoneKeyFile;
use crate::keys::{KeyState, fsutil};
use crate::pool::{Catalog, RootSecret};

/// Metadata files a backup carries besides the zone key files.
const PLAIN_FILES: [&str; 5] = [
    "catalog.json",
    "journal",
    // The journal's second frame region (see `store::journal`).
    "journal.1",
    "operators.json",
    "approvals-used.json",
];

/// What `keys backup` wrote.
#[derive(Clone, Debug, serde::Serialize)]
pub struct BackupReport {
    /// The backup's id (approvals of a restore name it).
    pub backup_id: String,
    /// Zones in it.
    pub zones: usize,
    /// Keys with material (wrapped) in it.
    pub keys: usize,
    /// Keys recorded as destroyed: their state travels, their bytes do not exist.
    pub destroyed: usize,
    /// Metadata files in it.
    pub files: usize,
}

/// What `keys restore` did.
#[derive(Clone, Debug, serde::Serialize)]
pub struct RestoreReport {
    /// The backup's id.
    pub backup_id: String,
    /// Zones restored.
    pub zones: usize,
    /// KEKs re-wrapped under the new root key.
    pub keks: usize,
    /// The source pool's audit chain head when the backup was taken.
    pub source_audit_head: (u64, String),
}

/// Approvals always needed, whatever the pool's own policy.
fn policy(of: &DualControlSection) -> DualControlSection {
    DualControlSection {
        required: true,
        approvals: of.approvals.max(2),
    }
}

fn audit_err(e: impl std::fmt::Display) -> PoolError {
    PoolError::Audit(e.to_string())
}

impl Pool {
    /// Writes a backup of every key and the metadata of the closed pool in
    /// `dir` to `to` (which must not exist), encrypted under `pass`.
    /// `approvals`: token files approving `backup-keys`. Refused while the
    /// pool is served (its lock) or a root key rotation is unfinished.
    pub fn backup_keys(
        dir: &Path,
        secret: RootSecret<'_>,
        to: &Path,
        pass: &Passphrase,
        kdf: KdfParams,
        approvals: &[PathBuf],
    ) -> Result<BackupReport> {
        let started = Instant::now();
        if !Self::exists(dir) {
            return Err(PoolError::Layout(format!(
                "{} is not a keyturn pool (no pool.toml)",
                dir.display()
            )));
        }
        let _lock = Self::take_lock(dir)?;
        let config = PoolConfig::load(&dir.join("pool.toml"))?;
        let audit = AuditLog::open(dir).map_err(audit_err)?;
        let target = Target::new(Operation::BackupKeys, None, None);
        let now = crate::clock::unix_now();
        let auth = match approval::authorize(
            dir,
            &policy(&config.dual_control),
            &target,
            approvals,
            now,
        ) {
            Ok(a) => a,
            Err(e) => {
                let _ = audit.append(AuditEvent::refused("keys.backup", &e));
                return Err(e.into());
            }
        };
        if RootRotationState::load(dir)?.is_some() {
            let e = PoolError::Conflict(
                "a root key rotation is unfinished; finish it (keys rotate-root) before a backup"
                    .into(),
            );
            let _ = audit.append(AuditEvent::failed("keys.backup", &e).approvers(auth.approvers()));
            return Err(e);
        }
        let provider = Self::open_roots(dir, &config.root_key, secret)?;
        crate::audit::sign::attach(dir, &audit, provider.as_ref());
        let r = Self::write_backup(dir, provider.as_ref(), to, pass, kdf);
        let event = match &r {
            Ok(rep) => AuditEvent::ok("keys.backup")
                .key_id(format!("backup-{}", rep.backup_id))
                .count(rep.keys as u64),
            Err(e) => AuditEvent::failed("keys.backup", e),
        };
        Self::record_outcome(
            &audit,
            vec![
                event
                    .approvers(auth.approvers())
                    .duration(started.elapsed()),
            ],
            "the backup was written",
            r,
        )
    }

    fn write_backup(
        dir: &Path,
        provider: &dyn RootKeyProvider,
        to: &Path,
        pass: &Passphrase,
        kdf: KdfParams,
    ) -> Result<BackupReport> {
        let cat_path = Self::catalog_path(dir);
        let catalog: Catalog =
            serde_json::from_slice(&std::fs::read(&cat_path).map_err(io_at(&cat_path))?)
                .map_err(|e| PoolError::Layout(format!("{}: {e}", cat_path.display())))?;
        let sealer = Sealer::new(pass, kdf, crate::clock::unix_now())?;
        let transfer = Transfer {
            from: provider,
            to: sealer.key(),
            to_id: sealer
                .key()
                .root_id()
                .expect("a backup key has an id")
                .to_string(),
        };
        let (mut keys, mut destroyed) = (0, 0);
        let mut zones = Vec::new();
        for z in &catalog.zones {
            let mut file = ZoneKeyFile::load(&Self::zone_key_path(dir, z.id))?;
            file.rewrap_root_batch(&transfer, usize::MAX)?;
            for r in file.records() {
                if r.state == KeyState::Destroyed || r.wrapped.is_none() {
                    destroyed += 1;
                } else {
                    keys += 1;
                }
            }
            zones.push(file);
        }
        let mut files = BTreeMap::new();
        let mut add = |rel: String| -> Result<()> {
            let p = dir.join(&rel);
            match std::fs::read(&p) {
                Ok(b) => {
                    files.insert(rel, b);
                    Ok(())
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(io_at(&p)(e)),
            }
        };
        for f in PLAIN_FILES {
            add(f.to_string())?;
        }
        for (sub, prefix) in [("tables", ""), ("keys", "stream-zone-")] {
            let d = dir.join(sub);
            for e in std::fs::read_dir(&d).map_err(io_at(&d))? {
                let e = e.map_err(io_at(&d))?;
                let name = e.file_name().to_string_lossy().into_owned();
                if e.file_type().map_err(io_at(&d))?.is_file() && name.starts_with(prefix) {
                    add(format!("{sub}/{name}"))?;
                }
            }
        }
        let head = crate::audit::verify(dir).map_err(audit_err)?;
        let payload = Payload {
            source: dir.display().to_string(),
            audit_head: (head.last_id, head.last_hash),
            pool_toml: std::fs::read_to_string(dir.join("pool.toml"))
                .map_err(io_at(&dir.join("pool.toml")))?,
            zones,
            files,
        };
        sealer.write(to, &payload)?;
        Ok(BackupReport {
            backup_id: sealer.backup_id().to_string(),
            zones: payload.zones.len(),
            keys,
            destroyed,
            files: payload.files.len(),
        })
    }

    /// Restores the backup `from` (opened with `pass`) into `dir`, which
    /// must not hold a pool, as a new pool whose root key is sealed under
    /// `new_pass` and whose data device is `data` (the source's, copied).
    /// `staging`: the source's staging device, copied (needed only when
    /// staged copies were live at backup time), else a new empty one.
    /// `approvals`: token files approving `restore-keys` of this backup id,
    /// signed by operators registered in the backed-up pool. A refusal is
    /// recorded in `dir`'s audit log (nothing else is written but the
    /// operator registry from the backup, so approvals can be checked).
    #[allow(clippy::too_many_arguments)]
    pub fn restore_keys(
        dir: &Path,
        from: &Path,
        pass: &Passphrase,
        new_pass: &Passphrase,
        kdf: KdfParams,
        data: &Path,
        staging: Option<&Path>,
        approvals: &[PathBuf],
    ) -> Result<RestoreReport> {
        let started = Instant::now();
        if Self::exists(dir) {
            return Err(PoolError::Layout(format!(
                "{} already holds a pool; restore into an empty directory",
                dir.display()
            )));
        }
        if !data.exists() {
            return Err(PoolError::Invalid(format!(
                "data device {} does not exist: copy the source pool's data device first",
                data.display()
            )));
        }
        let opened = backup::open(from, pass)?;
        let payload = &opened.payload;
        let source: PoolConfig = toml::from_str(&payload.pool_toml)
            .map_err(|e| PoolError::Layout(format!("the backup's pool.toml: {e}")))?;
        for sub in [dir.to_path_buf(), dir.join("keys"), dir.join("tables")] {
            std::fs::create_dir_all(&sub).map_err(io_at(&sub))?;
        }
        // The registry comes from the (authenticated) backup; spent nonces of
        // an earlier attempt here stay spent.
        if let Some(ops) = payload.files.get("operators.json") {
            write_atomic(&dir.join("operators.json"), ops)?;
        }
        let used = dir.join("approvals-used.json");
        if let (Some(b), false) = (payload.files.get("approvals-used.json"), used.exists()) {
            write_atomic(&used, b)?;
        }
        let audit = AuditLog::create_or_open(dir).map_err(audit_err)?;
        let label = format!("backup-{}", opened.backup_id);
        let target = Target::new(Operation::RestoreKeys, None, Some(&opened.backup_id));
        let now = crate::clock::unix_now();
        let auth = match approval::authorize(
            dir,
            &policy(&source.dual_control),
            &target,
            approvals,
            now,
        ) {
            Ok(a) => a,
            Err(e) => {
                let _ = audit.append(AuditEvent::refused("keys.restore", &e).key_id(label));
                return Err(e.into());
            }
        };
        let r = Self::write_restore(dir, &opened, source, new_pass, kdf, data, staging);
        let event = match &r {
            Ok((rep, provider)) => {
                crate::audit::sign::attach(dir, &audit, provider.as_ref());
                AuditEvent::ok("keys.restore").count(rep.keks as u64)
            }
            Err(e) => AuditEvent::failed("keys.restore", e),
        };
        Self::record_outcome(
            &audit,
            vec![
                event
                    .key_id(label)
                    .approvers(auth.approvers())
                    .duration(started.elapsed()),
            ],
            "the pool was restored",
            r.map(|(rep, _)| rep),
        )
    }

    fn write_restore(
        dir: &Path,
        opened: &backup::Opened,
        mut config: PoolConfig,
        new_pass: &Passphrase,
        kdf: KdfParams,
        data: &Path,
        staging: Option<&Path>,
    ) -> Result<(RestoreReport, Box<dyn RootKeyProvider>)> {
        let payload = &opened.payload;
        let root_config = RootKeyConfig::SealedFile {
            path: "keys/root.sealed".into(),
        };
        let root_path = dir.join("keys/root.sealed");
        // A refused or failed attempt may have left a root key: replace it
        // (nothing is wrapped under it until pool.toml exists).
        if root_path.exists() {
            fsutil::destroy_file("root key file", &root_path)?;
        }
        let root = SealedFileProvider::create(&root_path, new_pass, kdf)?;
        let transfer = Transfer {
            from: &opened.key,
            to: &root,
            to_id: root_id(&root_config),
        };
        let mut keks = 0;
        for file in &payload.zones {
            let mut file = file.clone();
            file.rewrap_root_batch(&transfer, usize::MAX)?;
            keks += file.check_keks_unwrap(&root)?;
            file.save(&Self::zone_key_path(dir, file.zone()))?;
        }
        for (rel, bytes) in &payload.files {
            if rel == "operators.json" || rel == "approvals-used.json" {
                continue;
            }
            let ok = match rel.split_once('/') {
                None => PLAIN_FILES.contains(&rel.as_str()),
                Some(("tables", name)) => !name.contains('/') && !name.starts_with('.'),
                Some(("keys", name)) => {
                    name.starts_with("stream-zone-")
                        && !name.contains('/')
                        && name.ends_with(".json")
                }
                _ => false,
            };
            if !ok {
                return Err(PoolError::Layout(format!(
                    "the backup names an unexpected file {rel:?}"
                )));
            }
            let p = dir.join(rel);
            if rel.starts_with("keys/") {
                fsutil::write_private_atomic("stream key file", &p, bytes, fsutil::Replace::Allow)?;
            } else {
                write_atomic(&p, bytes)?;
            }
        }
        config.root_key = root_config;
        config.data = std::path::absolute(data).map_err(io_at(data))?;
        config.staging = match staging {
            Some(s) => std::path::absolute(s).map_err(io_at(s))?,
            None => "staging".into(),
        };
        let staging_path = Self::resolve(dir, &config.staging);
        if !staging_path.exists() {
            std::fs::File::create(&staging_path).map_err(io_at(&staging_path))?;
        }
        // pool.toml last: its presence marks a complete pool.
        write_atomic(&dir.join("pool.toml"), config.to_toml().as_bytes())?;
        Ok((
            RestoreReport {
                backup_id: opened.backup_id.clone(),
                zones: payload.zones.len(),
                keks,
                source_audit_head: payload.audit_head.clone(),
            },
            Box::new(root),
        ))
    }
}
