//! Root key rotation of a pool, and changing the passphrase of its sealed
//! root key file: offline (the CLI opens the pool; its lock keeps a server
//! out) or online (the server runs them for the admin API, see
//! [`crate::pool_admin`], while it serves volumes). Both go through the same
//! code on a shared `&Pool`; one root key operation at a time.
//!
//! A root key rotation replaces the root key that wraps every zone's KEKs:
//!
//! 1. **begin**: record the rotation in `POOL/keys/root-rotation.json` (see
//!    [`crate::keys::root_rotation`]): for a sealed file, a new random root
//!    key wrapped by the old one; for a PKCS#11 token, the new key's label,
//!    then the key is generated in the token (sensitive, non-extractable).
//!    The pool then unwraps and wraps through the pair of root keys.
//! 2. **re-wrap**: every zone's KEKs, a batch per atomic save of its key
//!    file; each re-wrapped KEK names the new root key. Both root keys stay
//!    usable, so a crash anywhere leaves every KEK readable, the pool opens
//!    (with the old passphrase or the PIN), and running again resumes.
//! 3. **seal and check**: a sealed-file rotation seals the new root key under
//!    the new passphrase into its own file and opens it again; then every
//!    KEK of every zone must unwrap under the new root key alone.
//! 4. **switch**: pool.toml's `[root_key]` names the new root key (one
//!    atomic rename), and the pool uses it alone. From here the new
//!    passphrase opens the pool.
//! 5. **retire**: the old sealed file is overwritten and removed, or the old
//!    key object destroyed in the token (`C_DestroyObject`); then the
//!    rotation record is overwritten and removed.
//!
//! While the pool serves, KEK rotations, DEK rotations and zone creation
//! write the same key files. The rule (see [`Pool`]): every key-file writer
//! holds the zone's `key_file_lock` from its load to its save and uses the
//! root key provider it read after taking the lock; step 2 takes that lock
//! for each batch only, so the others run between batches; the provider is
//! replaced (at 1 and 4) only with the catalog lock and every zone's
//! `key_file_lock` held, and 3's check and 4 happen under one such hold.
//! So whatever is wrapped during the rotation is wrapped by the new root key,
//! whatever was re-wrapped is unwrapped with it, and nothing changes between
//! the check and the switch.
//!
//! DEKs, MAC keys, volume data and the block map are not touched.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::audit::AuditEvent;
use crate::config::{PoolConfig, RootKeyConfig};
use crate::keys::approval::{Approval, Authorized, Operation, Target};
use crate::keys::passphrase::Passphrase;
use crate::keys::pkcs11::{Pin, Pkcs11Provider};
use crate::keys::root::RootKeyProvider;
use crate::keys::root_rotation::{RootPair, RootRotationState, UnsealedRoot, root_id, root_label};
use crate::keys::sealed::{KdfParams, SealedFileProvider};
use crate::keys::zone_keys::ZoneKeyFile;
use crate::keys::{KeyError, RootKey};
use crate::pool::{Pool, PoolError, RootSecret, ZoneEntry, write_atomic};

type Result<T, E = PoolError> = std::result::Result<T, E>;

/// What the new root key of [`Pool::rotate_root`] is to be.
#[derive(Debug)]
pub enum NewRoot<'a> {
    /// Sealed-file pools: a new random root key, sealed under `passphrase`
    /// into a new file beside the old one. The passphrase may be left out
    /// only when the rotation has already switched pool.toml (then nothing
    /// is sealed any more).
    SealedFile {
        /// The passphrase of the new sealed file.
        passphrase: Option<&'a Passphrase>,
        /// Its Argon2id cost; `None` keeps the cost of the current file.
        kdf: Option<KdfParams>,
    },
    /// PKCS#11 pools: a new AES-256 key generated in the same token.
    Pkcs11 {
        /// Its label; `None` resumes the rotation in progress.
        key_label: Option<String>,
    },
}

/// Where a root key rotation recorded in `keys/root-rotation.json` stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RootRotationPhase {
    /// pool.toml names the old root key; KEKs are being re-wrapped. The old
    /// root key's secret opens the pool (both root keys).
    Rewrap,
    /// pool.toml names the new root key; only the old one's destruction is
    /// left. The new root key's secret opens the pool.
    Retire,
}

/// What [`Pool::rotate_root`] did.
#[derive(Debug, Serialize)]
pub struct RootRotationReport {
    /// The retired root key's id (see [`root_id`]).
    pub old_root: String,
    /// The new root key's id.
    pub new_root: String,
    /// Zones whose KEKs were checked under the new root key.
    pub zones: usize,
    /// KEKs re-wrapped in this run.
    pub rewrapped: usize,
    /// KEKs that unwrap under the new root key alone, checked before the
    /// old one was destroyed.
    pub checked: usize,
    /// Whether this run destroyed the old root key (`false`: a previous run
    /// had already, and crashed before removing the record).
    pub old_destroyed: bool,
    /// Whether an interrupted rotation was resumed.
    pub resumed: bool,
    /// Wall time.
    pub elapsed: Duration,
}

/// The steps a rotation reports to its hook, so tests can stop it as a
/// crash would: once the rotation is recorded (nothing re-wrapped yet),
/// after the n-th atomic save of a zone key file, after the check (before
/// pool.toml switches), after the switch, after the old root key is
/// destroyed (before the record is removed).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Step {
    Begun,
    Saved(usize),
    Checked,
    Switched,
    Retired,
}

/// The phase of `state` against the root key pool.toml names.
fn phase_of(state: &RootRotationState, configured: &RootKeyConfig) -> Result<RootRotationPhase> {
    let current = root_id(configured);
    if current == state.old_id() {
        Ok(RootRotationPhase::Rewrap)
    } else if current == state.new_id() {
        Ok(RootRotationPhase::Retire)
    } else {
        Err(PoolError::Layout(format!(
            "{} records a root key rotation from {} to {}, but pool.toml names {current}; \
             restore pool.toml's [root_key] to one of the two",
            crate::keys::root_rotation::ROTATION_FILE,
            state.old_id(),
            state.new_id()
        )))
    }
}

/// The token PIN a PKCS#11 root key needs.
fn pin_of(secret: RootSecret<'_>) -> Result<&Pin> {
    match secret {
        RootSecret::Pin(p) => Ok(p),
        RootSecret::Passphrase(_) | RootSecret::Kms => Err(crate::pool::wrong_secret(true)),
    }
}

/// A root key rotation of a KMIP root key is not built: the refusal.
fn kmip_rotation_unsupported() -> PoolError {
    PoolError::Invalid(
        "this pool's root key is in a KMIP server: keyturn does not rotate it yet \
         (KEK rotations work as usual; re-keying the KMS object is the KMS's own operation)"
            .into(),
    )
}

fn unix_now() -> u64 {
    crate::clock::unix_now()
}

impl Pool {
    /// The root key rotation recorded in the pool in `dir`, and its phase;
    /// `None` when none is in progress. Reads two small files: no secret is
    /// needed (the CLI asks it before it asks for passphrases).
    pub fn root_rotation(dir: &Path) -> Result<Option<(RootRotationState, RootRotationPhase)>> {
        let Some(state) = RootRotationState::load(dir)? else {
            return Ok(None);
        };
        let phase = phase_of(&state, &Self::root_key_config(dir)?)?;
        Ok(Some((state, phase)))
    }

    /// The root key provider the pool in `dir` unlocks with: the configured
    /// root key, or during the re-wrap phase of a root key rotation a
    /// [`RootPair`] of the old and the new.
    pub(crate) fn open_roots(
        dir: &Path,
        configured: &RootKeyConfig,
        secret: RootSecret<'_>,
    ) -> Result<Box<dyn RootKeyProvider>> {
        let current = Self::open_provider(dir, configured, secret)?;
        let Some(state) = RootRotationState::load(dir)? else {
            return Ok(current);
        };
        match phase_of(&state, configured)? {
            RootRotationPhase::Retire => {
                tracing::warn!(
                    old = %state.old_id(),
                    "a root key rotation switched to the new root key but has not destroyed \
                     the old one; run `keyturn keys rotate-root` again to finish it"
                );
                Ok(current)
            }
            RootRotationPhase::Rewrap => {
                tracing::warn!(
                    old = %state.old_id(),
                    new = %state.new_id(),
                    "a root key rotation is unfinished: KEKs are unwrapped under either root key; \
                     run `keyturn keys rotate-root` again to finish it"
                );
                match Self::open_new_root(dir, &state, current.as_ref(), secret)? {
                    Some(new) => Ok(Box::new(RootPair::new(
                        state.old_id(),
                        Arc::from(current),
                        state.new_id(),
                        Arc::from(new),
                    ))),
                    // A PKCS#11 rotation that crashed before generating its
                    // key: nothing is wrapped by it yet.
                    None => Ok(current),
                }
            }
        }
    }

    /// The new root key of a rotation in its re-wrap phase: unwrapped from
    /// the record by the old root key (sealed file), or opened in the token
    /// (`None` when the token does not hold it yet).
    fn open_new_root(
        dir: &Path,
        state: &RootRotationState,
        old: &dyn RootKeyProvider,
        secret: RootSecret<'_>,
    ) -> Result<Option<Box<dyn RootKeyProvider>>> {
        match &state.new {
            RootKeyConfig::SealedFile { path } => {
                let root = state.new_root(old)?.ok_or_else(|| KeyError::Corrupt {
                    what: "root key rotation record",
                    path: RootRotationState::path(dir),
                    reason: "a sealed-file rotation without its new root key".into(),
                })?;
                let what = format!(
                    "new root key for {} (until the rotation seals it there)",
                    Self::resolve(dir, path).display()
                );
                Ok(Some(Box::new(UnsealedRoot::new(root, what))))
            }
            RootKeyConfig::Pkcs11 { .. } => {
                let pin = pin_of(secret)?;
                let config = state.new.pkcs11().expect("pkcs11");
                if !Pkcs11Provider::key_exists(&config, pin)? {
                    return Ok(None);
                }
                Ok(Some(Box::new(Pkcs11Provider::open(&config, pin)?)))
            }
            RootKeyConfig::Kmip { .. } => Err(kmip_rotation_unsupported()),
        }
    }

    /// Rotates the root key: re-wraps every zone's KEKs from the current
    /// root key to a new one (`new`), `batch` KEKs per atomic save of a zone
    /// key file with `pause` between saves, switches pool.toml to the new
    /// root key, and destroys the old one. `secret` unlocks the root key
    /// pool.toml names now (the old passphrase or the PIN; the new
    /// passphrase once a crashed rotation has switched). Resumes a rotation a
    /// crash interrupted. Recorded as `root.rotate` (and `key.destroy` for
    /// the old root key) in the audit log with its approvers.
    ///
    /// `auth` must approve a root key rotation (`rotate-root`, no zone, no
    /// key) when the pool requires dual control. The pool keeps working
    /// throughout (it may be serving): it unwraps with both root keys while
    /// KEKs are re-wrapped, and with the new one alone afterwards. Refused
    /// while another root key operation runs in this process.
    pub fn rotate_root(
        &self,
        secret: RootSecret<'_>,
        new: NewRoot<'_>,
        batch: usize,
        pause: Duration,
        auth: Option<Authorized>,
    ) -> Result<RootRotationReport> {
        let _op = self.root_op_guard()?;
        self.rotate_root_with(secret, new, batch, pause, auth, &|_| Ok(()))
    }

    /// The guard of [`Pool::root_op`]: one root key rotation or passphrase
    /// change at a time.
    pub(crate) fn root_op_guard(&self) -> Result<parking_lot::MutexGuard<'_, ()>> {
        self.root_op.try_lock().ok_or_else(|| {
            PoolError::Conflict(
                "a root key rotation or passphrase change is already running on this pool; \
                 wait for it to finish"
                    .into(),
            )
        })
    }

    /// [`Pool::rotate_root`] with the root operation guard already held by
    /// the caller, and a hook called at each step (tests stop it there).
    pub(crate) fn rotate_root_with(
        &self,
        secret: RootSecret<'_>,
        new: NewRoot<'_>,
        batch: usize,
        pause: Duration,
        auth: Option<Authorized>,
        hook: &dyn Fn(Step) -> Result<()>,
    ) -> Result<RootRotationReport> {
        let approvers = self.check_root_approval("root.rotate", auth)?;
        self.audit()?;
        let started = Instant::now();
        let r = self.rotate_root_unaudited(secret, new, batch, pause, hook);
        let events = match &r {
            // `key.destroy` of the old root key was recorded when it happened.
            Ok(report) => vec![
                AuditEvent::ok("root.rotate")
                    .key(&root_label(&report.new_root))
                    .approvers(approvers.iter())
                    .count(report.rewrapped as u64)
                    .duration(started.elapsed()),
            ],
            Err(e) => vec![
                AuditEvent::failed("root.rotate", e)
                    .approvers(approvers.iter())
                    .duration(started.elapsed()),
            ],
        };
        Self::record_outcome(self.audit()?, events, "the root key was rotated", r)
    }

    /// Checks approval token files for a root key operation (`rotate-root`,
    /// no zone, no key) under the pool's policy and spends their nonce:
    /// `None` when the pool does not require dual control and none were
    /// given. A refusal is recorded as `action` (`root.rotate` or
    /// `root.reseal`), refused, with the operators the tokens name.
    pub fn authorize_root(
        &self,
        action: &'static str,
        token_files: &[PathBuf],
    ) -> Result<Option<Authorized>> {
        self.authorize_root_from(
            action,
            token_files.is_empty(),
            |policy, target, now| {
                crate::keys::approval::authorize(&self.dir, policy, target, token_files, now)
            },
            || {
                token_files
                    .iter()
                    .filter_map(|f| Approval::load(f).ok())
                    .map(|a| a.operator)
                    .collect()
            },
        )
    }

    /// [`Pool::authorize_root`] for approvals given as their JSON text (the
    /// admin API's), refused and recorded alike.
    pub fn authorize_root_json(
        &self,
        action: &'static str,
        texts: &[String],
    ) -> Result<Option<Authorized>> {
        self.authorize_root_from(
            action,
            texts.is_empty(),
            |policy, target, now| {
                crate::keys::approval::authorize_json(&self.dir, policy, target, texts, now)
            },
            || {
                texts
                    .iter()
                    .filter_map(|t| Approval::from_json("approval", t).ok())
                    .map(|a| a.operator)
                    .collect()
            },
        )
    }

    fn authorize_root_from(
        &self,
        action: &'static str,
        none_given: bool,
        authorize: impl FnOnce(
            &crate::config::DualControlSection,
            &Target,
            u64,
        )
            -> std::result::Result<Authorized, crate::keys::approval::ApprovalError>,
        claimed: impl FnOnce() -> Vec<String>,
    ) -> Result<Option<Authorized>> {
        let config = self.config();
        let policy = &config.dual_control;
        if !policy.required && none_given {
            return Ok(None);
        }
        let target = Target::new(Operation::RotateRoot, None, None);
        authorize(policy, &target, unix_now())
            .map(Some)
            .map_err(|e| {
                // Unverified: the ids as the tokens claim them.
                let _ = self.record(AuditEvent::refused(action, &e).approvers(claimed()));
                e.into()
            })
    }

    /// Dual control for the root key commands: the approvers, or the refusal
    /// (recorded as `action`, refused).
    fn check_root_approval(
        &self,
        action: &'static str,
        auth: Option<Authorized>,
    ) -> Result<Vec<String>> {
        let expected = Target::new(Operation::RotateRoot, None, None);
        let approvers =
            self.check_approval(&expected, auth.as_ref(), |e| AuditEvent::refused(action, e))?;
        if let Some(a) = &auth {
            tracing::info!(action, approvers = ?a.approvers(), nonce = a.nonce(), "root key operation approved");
        }
        Ok(approvers)
    }

    fn rotate_root_unaudited(
        &self,
        secret: RootSecret<'_>,
        new: NewRoot<'_>,
        batch: usize,
        pause: Duration,
        hook: &dyn Fn(Step) -> Result<()>,
    ) -> Result<RootRotationReport> {
        let started = Instant::now();
        let dir = self.dir.clone();
        let recorded = RootRotationState::load(&dir)?;
        let resumed = recorded.is_some();
        let phase = match &recorded {
            Some(s) => phase_of(s, &self.config().root_key)?,
            None => RootRotationPhase::Rewrap,
        };
        let mut rewrapped = 0;
        let state = match phase {
            RootRotationPhase::Rewrap => {
                let (state, done) =
                    self.rewrap_and_switch(recorded, secret, &new, batch, pause, hook)?;
                rewrapped = done;
                state
            }
            RootRotationPhase::Retire => recorded.expect("a recorded rotation"),
        };
        // Retire: nothing may depend on the old root key any more.
        let (zones, checked) = self.check_keks(self.root().as_ref())?;
        let old_destroyed = match &state.old {
            RootKeyConfig::SealedFile { path } => {
                let path = Self::resolve(&dir, path);
                let existed = path.exists();
                crate::keys::fsutil::destroy_file("old root key file", &path)?;
                existed
            }
            RootKeyConfig::Pkcs11 { .. } => {
                let pin = pin_of(secret)?;
                Pkcs11Provider::destroy_key(&state.old.pkcs11().expect("pkcs11"), pin)?
            }
            RootKeyConfig::Kmip { .. } => return Err(kmip_rotation_unsupported()),
        };
        if old_destroyed {
            // Recorded now: a crash before the end must not leave it unrecorded.
            self.record(AuditEvent::ok("key.destroy").key(&root_label(&state.old_id())))
                .map_err(|e| {
                    PoolError::Audit(format!(
                        "the old root key was destroyed, but not recorded: {e}"
                    ))
                })?;
        }
        hook(Step::Retired)?;
        RootRotationState::destroy(&dir)?;
        tracing::info!(
            old = %state.old_id(),
            new = %state.new_id(),
            zones,
            rewrapped,
            checked,
            resumed,
            "root key rotated"
        );
        Ok(RootRotationReport {
            old_root: state.old_id(),
            new_root: state.new_id(),
            zones,
            rewrapped,
            checked,
            old_destroyed,
            resumed,
            elapsed: started.elapsed(),
        })
    }

    /// Steps 1 to 4 (see the module documentation): begins the rotation
    /// unless `recorded` is one to resume, re-wraps, seals, checks and
    /// switches pool.toml. Returns the record and the KEKs re-wrapped.
    fn rewrap_and_switch(
        &self,
        recorded: Option<RootRotationState>,
        secret: RootSecret<'_>,
        new: &NewRoot<'_>,
        batch: usize,
        pause: Duration,
        hook: &dyn Fn(Step) -> Result<()>,
    ) -> Result<(RootRotationState, usize)> {
        let dir = self.dir.clone();
        let configured = self.config().root_key.clone();
        Self::check_kind(&configured, new)?;
        // The old root key on its own (the pool may hold a pair already).
        let (old, old_kdf): (Arc<dyn RootKeyProvider>, Option<KdfParams>) = match &configured {
            RootKeyConfig::SealedFile { path } => {
                let RootSecret::Passphrase(pass) = secret else {
                    return Err(crate::pool::wrong_secret(false));
                };
                let p = SealedFileProvider::open(&Self::resolve(&dir, path), pass)?;
                let kdf = p.params();
                (Arc::new(p), Some(kdf))
            }
            RootKeyConfig::Pkcs11 { .. } => (
                Arc::from(Self::open_provider(&dir, &configured, secret)?),
                None,
            ),
            RootKeyConfig::Kmip { .. } => return Err(kmip_rotation_unsupported()),
        };
        let state = match recorded {
            Some(s) => {
                Self::check_resume(&s, new)?;
                s
            }
            None => {
                let s = self.begin_root_rotation(old.as_ref(), secret, new)?;
                hook(Step::Begun)?;
                s
            }
        };
        let new_id = state.new_id();
        let new_root: Arc<dyn RootKeyProvider> =
            match Self::open_new_root(&dir, &state, old.as_ref(), secret)? {
                Some(p) => Arc::from(p),
                None => {
                    // PKCS#11: the record exists, the key not yet. Generate it,
                    // unless KEKs claim to be wrapped by a key that vanished.
                    let claimed = self.keks_claiming(&new_id)?;
                    if claimed > 0 {
                        return Err(KeyError::RootKeyMissing {
                            key: format!("{new_id} (which already wraps {claimed} KEKs)"),
                            token: state.new.pkcs11().expect("pkcs11").token_label,
                        }
                        .into());
                    }
                    let pin = pin_of(secret)?;
                    Arc::new(Pkcs11Provider::create_key(
                        &state.new.pkcs11().expect("pkcs11"),
                        pin,
                    )?)
                }
            };
        let pair = Arc::new(RootPair::new(state.old_id(), old, new_id.clone(), new_root));
        // Before the first KEK moves: from here on every key-file writer
        // unwraps a moved KEK with the new root key, and wraps new KEKs under
        // it. (A resumed rotation may find an equal pair in place already.)
        self.with_key_files_frozen(|_| {
            self.set_root_frozen(pair.clone());
            Ok(())
        })?;
        let rewrapped = self.rewrap_keks(&pair, batch, pause, hook)?;

        // The new root key on its own, as it will be opened from now on.
        let final_root: Arc<dyn RootKeyProvider> = match &state.new {
            RootKeyConfig::SealedFile { path } => {
                let NewRoot::SealedFile {
                    passphrase: Some(pass),
                    kdf,
                } = new
                else {
                    return Err(PoolError::Invalid(
                        "the new root key file needs a new passphrase".into(),
                    ));
                };
                let root: RootKey = state
                    .new_root(pair.as_ref())?
                    .expect("sealed-file rotation");
                let path = Self::resolve(&dir, path);
                let kdf = kdf.or(old_kdf).unwrap_or_default();
                drop(SealedFileProvider::seal_root(&path, pass, kdf, root)?);
                // Opened from the file, as every later open will.
                Arc::new(SealedFileProvider::open(&path, pass)?)
            }
            RootKeyConfig::Pkcs11 { .. } => pair.new_root(),
            RootKeyConfig::Kmip { .. } => return Err(kmip_rotation_unsupported()),
        };
        // Check and switch with every key file frozen: no KEK is made or
        // changed between the check and the switch, and every key-file
        // writer after it uses the new root key alone.
        self.with_key_files_frozen(|zones| {
            self.check_keks_in(zones, final_root.as_ref())?;
            hook(Step::Checked)?;
            // pool.toml as it is on disk (an operator may have edited another
            // section since this process read it), with the new root key.
            let toml = dir.join("pool.toml");
            let mut on_disk = PoolConfig::load(&toml)?;
            on_disk.root_key = state.new.clone();
            write_atomic(&toml, on_disk.to_toml().as_bytes())?;
            let mut config = (*self.config()).clone();
            config.root_key = state.new.clone();
            self.set_config(config);
            self.set_root_frozen(final_root.clone());
            Ok(())
        })?;
        tracing::info!(root_key = %final_root.describe(), "pool.toml names the new root key");
        hook(Step::Switched)?;
        Ok((state, rewrapped))
    }

    /// Checks that `new` may resume the recorded rotation `state`.
    fn check_resume(state: &RootRotationState, new: &NewRoot<'_>) -> Result<()> {
        Self::check_kind(&state.new, new)?;
        match (&state.new, new) {
            (
                RootKeyConfig::Pkcs11 { key_label, .. },
                NewRoot::Pkcs11 {
                    key_label: Some(given),
                },
            ) if given != key_label => Err(PoolError::Conflict(format!(
                "a root key rotation to key {key_label:?} is in progress; \
                 finish it first (run again with --new-key-label {key_label} or without it)"
            ))),
            _ => Ok(()),
        }
    }

    /// Checks that `new` is the kind of root key `root` is (a rotation
    /// keeps the provider: a sealed file stays a sealed file).
    fn check_kind(root: &RootKeyConfig, new: &NewRoot<'_>) -> Result<()> {
        match (root, new) {
            (RootKeyConfig::Kmip { .. }, _) => Err(kmip_rotation_unsupported()),
            (RootKeyConfig::SealedFile { .. }, NewRoot::SealedFile { .. })
            | (RootKeyConfig::Pkcs11 { .. }, NewRoot::Pkcs11 { .. }) => Ok(()),
            (RootKeyConfig::SealedFile { .. }, NewRoot::Pkcs11 { .. }) => Err(PoolError::Invalid(
                "this pool's root key is a sealed file: rotate it with a new passphrase, not a key label"
                    .into(),
            )),
            (RootKeyConfig::Pkcs11 { .. }, NewRoot::SealedFile { .. }) => Err(PoolError::Invalid(
                "this pool's root key is in a PKCS#11 token: rotate it with --new-key-label".into(),
            )),
        }
    }

    /// Step 1: chooses the new root key and writes the rotation record.
    fn begin_root_rotation(
        &self,
        old: &dyn RootKeyProvider,
        secret: RootSecret<'_>,
        new: &NewRoot<'_>,
    ) -> Result<RootRotationState> {
        let configured = self.config().root_key.clone();
        let state = match (&configured, new) {
            (RootKeyConfig::SealedFile { path }, NewRoot::SealedFile { passphrase, .. }) => {
                if passphrase.is_none() {
                    return Err(PoolError::Invalid(
                        "the new root key file needs a new passphrase".into(),
                    ));
                }
                let new_path = self.fresh_sealed_path(path);
                let root = RootKey::generate();
                RootRotationState::new(
                    configured.clone(),
                    RootKeyConfig::SealedFile { path: new_path },
                    unix_now(),
                    Some((&root, old)),
                )?
            }
            (
                RootKeyConfig::Pkcs11 {
                    module,
                    token_label,
                    key_label,
                },
                NewRoot::Pkcs11 {
                    key_label: Some(new_label),
                },
            ) => {
                if new_label == key_label {
                    return Err(PoolError::Invalid(format!(
                        "the new root key needs a label other than the current one ({key_label:?})"
                    )));
                }
                let new_config = RootKeyConfig::Pkcs11 {
                    module: module.clone(),
                    token_label: token_label.clone(),
                    key_label: new_label.clone(),
                };
                let pin = pin_of(secret)?;
                // An existing key may wrap someone else's keys: never adopt it.
                if Pkcs11Provider::key_exists(&new_config.pkcs11().expect("pkcs11"), pin)? {
                    return Err(KeyError::RootKeyExists {
                        key: new_label.clone(),
                        token: token_label.clone(),
                    }
                    .into());
                }
                RootRotationState::new(configured.clone(), new_config, unix_now(), None)?
            }
            (RootKeyConfig::Pkcs11 { .. }, NewRoot::Pkcs11 { key_label: None }) => {
                return Err(PoolError::Invalid(
                    "no root key rotation is in progress: name the new key with --new-key-label"
                        .into(),
                ));
            }
            (root, new) => {
                Self::check_kind(root, new)?;
                return Err(PoolError::Invalid(
                    "the new root key is not of the pool's kind".into(),
                ));
            }
        };
        state.create(&self.dir)?;
        tracing::info!(old = %state.old_id(), new = %state.new_id(), "root key rotation begun");
        Ok(state)
    }

    /// A path for the new sealed file beside `old` (as pool.toml spells
    /// it) that names no existing file.
    fn fresh_sealed_path(&self, old: &Path) -> PathBuf {
        let parent = old.parent().unwrap_or(Path::new(""));
        let stamp = unix_now();
        (0u32..)
            .map(|n| match n {
                0 => parent.join(format!("root-{stamp}.sealed")),
                n => parent.join(format!("root-{stamp}-{n}.sealed")),
            })
            .find(|p| p != old && !Self::resolve(&self.dir, p).exists())
            .expect("some name is free")
    }

    /// Step 2: re-wraps every zone's KEKs under the pair's new root key,
    /// which the pool already uses. Each batch takes the zone's
    /// `key_file_lock` and loads, re-wraps and saves the file under it, so a
    /// KEK or DEK rotation of the zone runs between two batches, never inside
    /// one; what it wraps meanwhile is under the new root key already.
    /// Returns how many KEKs were re-wrapped.
    fn rewrap_keks(
        &self,
        pair: &RootPair,
        batch: usize,
        pause: Duration,
        hook: &dyn Fn(Step) -> Result<()>,
    ) -> Result<usize> {
        let new_id = pair
            .root_id()
            .expect("a pair names its new root")
            .to_string();
        // Read after the pair is in place: a zone created later has its KEK
        // under the new root key already.
        let zones = self.catalog().zones;
        let mut left: usize = 0;
        for z in &zones {
            left += ZoneKeyFile::load(&Self::zone_key_path(&self.dir, z.id))?
                .root_rewrap_remaining(&new_id);
        }
        tracing::info!(
            kek = left,
            zones = zones.len(),
            "re-wrapping KEKs under the new root key"
        );
        let (mut rewrapped, mut saves) = (0, 0);
        for z in &zones {
            let path = Self::zone_key_path(&self.dir, z.id);
            loop {
                let moved = {
                    let zone = self.zones.read().get(&z.id).cloned();
                    let _k = zone.as_ref().map(|z| z.key_file_lock.lock());
                    let mut file = ZoneKeyFile::load(&path)?;
                    let remaining = file.root_rewrap_remaining(&new_id);
                    if remaining == 0 {
                        break;
                    }
                    let after = file.rewrap_root_batch(pair, batch.max(1))?;
                    file.save(&path)?;
                    remaining - after
                };
                rewrapped += moved;
                // A KEK rotation may have destroyed a KEK counted here.
                left = left.saturating_sub(moved);
                saves += 1;
                tracing::debug!(zone = %z.name, left, "KEKs re-wrapped and saved");
                hook(Step::Saved(saves))?;
                if left > 0 && !pause.is_zero() {
                    std::thread::sleep(pause);
                }
            }
        }
        // The audit signing key is wrapped under the root key too.
        crate::audit::sign::rewrap(&self.dir, pair).map_err(|e| match e {
            crate::audit::sign::SignError::Key(k) => PoolError::Key(k),
            other => PoolError::Audit(other.to_string()),
        })?;
        Ok(rewrapped)
    }

    /// KEKs of every zone that name root key `id`.
    fn keks_claiming(&self, id: &str) -> Result<usize> {
        let mut n = 0;
        for (_, file) in self.key_files()? {
            n += file
                .records()
                .iter()
                .filter(|r| r.wrapped_by_root.as_deref() == Some(id) && r.state.has_material())
                .count();
        }
        Ok(n)
    }

    /// Unwraps every KEK of every zone under `provider` alone. Returns the
    /// zones and KEKs checked.
    fn check_keks(&self, provider: &dyn RootKeyProvider) -> Result<(usize, usize)> {
        self.check_keks_in(&self.catalog().zones, provider)
    }

    /// [`Pool::check_keks`] for the zones `zones` (the caller may hold the
    /// catalog lock).
    fn check_keks_in(
        &self,
        zones: &[ZoneEntry],
        provider: &dyn RootKeyProvider,
    ) -> Result<(usize, usize)> {
        let mut keks = 0;
        for z in zones {
            keks += ZoneKeyFile::load(&Self::zone_key_path(&self.dir, z.id))?
                .check_keks_unwrap(provider)?;
        }
        Ok((zones.len(), keks))
    }

    /// Seals the same root key under a new passphrase (and KDF cost, `None`:
    /// unchanged), atomically replacing the sealed file. No KEK is re-wrapped:
    /// cheap, but whoever copied the old file and knows the old passphrase
    /// still has the root key; [`Pool::rotate_root`] replaces the key itself.
    /// Sealed-file pools only, not during a root key rotation; dual control
    /// as for a root key rotation. Recorded as `root.reseal`.
    pub fn change_passphrase(
        &self,
        old: &Passphrase,
        new: &Passphrase,
        kdf: Option<KdfParams>,
        auth: Option<Authorized>,
    ) -> Result<()> {
        let _op = self.root_op_guard()?;
        self.change_passphrase_locked(old, new, kdf, auth)
    }

    /// [`Pool::change_passphrase`] with the root operation guard held by the
    /// caller.
    pub(crate) fn change_passphrase_locked(
        &self,
        old: &Passphrase,
        new: &Passphrase,
        kdf: Option<KdfParams>,
        auth: Option<Authorized>,
    ) -> Result<()> {
        let approvers = self.check_root_approval("root.reseal", auth)?;
        let audit = self.audit()?;
        let started = Instant::now();
        let config = self.config();
        let id = root_id(&config.root_key);
        let r = (|| {
            let RootKeyConfig::SealedFile { path } = &config.root_key else {
                return Err(PoolError::Invalid(
                    "this pool's root key is in a PKCS#11 token; its PIN is the token's \
                     (change it with the token's own tools)"
                        .into(),
                ));
            };
            if RootRotationState::load(&self.dir)?.is_some() {
                return Err(PoolError::Conflict(
                    "a root key rotation is in progress; finish it with `keyturn keys rotate-root` first"
                        .into(),
                ));
            }
            let path = Self::resolve(&self.dir, path);
            let mut sealed = SealedFileProvider::open(&path, old)?;
            let kdf = kdf.unwrap_or(sealed.params());
            sealed.reseal(new, kdf)?;
            SealedFileProvider::open(&path, new)?;
            tracing::info!(file = %path.display(), "root key sealed under a new passphrase");
            Ok(())
        })();
        let event = match &r {
            Ok(()) => AuditEvent::ok("root.reseal"),
            Err(e) => AuditEvent::failed("root.reseal", e),
        }
        .key(&root_label(&id))
        .approvers(approvers.iter())
        .duration(started.elapsed());
        Self::record_outcome(audit, vec![event], "the passphrase was changed", r)
    }
}

#[cfg(test)]
mod tests {
    //! Root key rotation of a real pool in one process: a crash (an error
    //! from the step hook) at every batch boundary and every later step,
    //! then reopen, read, resume and check.

    use std::collections::BTreeMap;

    use super::*;
    use crate::config::{DualControlSection, Profile, ServerSection};
    use crate::ids::{BLOCK_SIZE, ZoneId};
    use crate::keys::wrap::Purpose;
    use crate::nbd::export::{Export, ExportCatalog};
    use crate::pool::{InitOptions, RootKeyChoice};

    const OLD: &str = "old passphrase for the root";
    const NEW: &str = "new passphrase for the root";

    fn pass(s: &str) -> Passphrase {
        Passphrase::new(s.into()).unwrap()
    }

    fn profile() -> Profile {
        Profile::load("ci-2core").unwrap()
    }

    fn block(i: u64) -> Vec<u8> {
        let mut b = vec![0u8; BLOCK_SIZE];
        for (j, x) in b.chunks_mut(8).enumerate() {
            x.copy_from_slice(&(i * 7919 + j as u64 + 1).to_le_bytes());
        }
        b
    }

    /// Every DEK and MAC key of every zone, by zone, as `provider` unlocks them.
    type Keys = BTreeMap<u32, (Vec<(u32, Vec<u8>)>, Vec<u8>)>;

    fn keys_of(pool: &Pool, provider: &dyn RootKeyProvider) -> Result<Keys, KeyError> {
        let mut out = BTreeMap::new();
        for z in pool.catalog().zones {
            let ring =
                ZoneKeyFile::load(&Pool::zone_key_path(pool.dir(), z.id))?.unlock(provider)?;
            let deks = ring
                .versions()
                .map(|v| (v.0, ring.dek(v).unwrap().expose().to_vec()))
                .collect();
            out.insert(z.id.0, (deks, ring.mac_key().expose().to_vec()));
        }
        Ok(out)
    }

    struct Fixture {
        _tmp: tempfile::TempDir,
        dir: PathBuf,
        keys: Keys,
        /// A copy of the old sealed file, as a backup would keep it.
        old_copy: PathBuf,
    }

    /// A pool with three zones and four KEKs that have material: z1 (one
    /// KEK, a volume with data), z2 (an unfinished KEK rotation: two), z3 (a
    /// finished one: KEK v1 destroyed, v2 live).
    fn fixture(dual_control: bool) -> Fixture {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("pool");
        Pool::init(
            &dir,
            &InitOptions {
                data: None,
                staging: None,
                kdf: KdfParams::INSECURE_FAST,
                root_key: RootKeyChoice::SealedFile,
                server: ServerSection::default(),
                dual_control: DualControlSection {
                    required: dual_control,
                    ..DualControlSection::default()
                },
            },
            &pass(OLD),
        )
        .unwrap();
        let pool = Pool::open(&dir, &pass(OLD), &profile()).unwrap();
        for z in ["z1", "z2", "z3"] {
            pool.create_zone(z).unwrap();
        }
        pool.create_volume("v", "z1", 8 << 20).unwrap();
        let path = Pool::zone_key_path(&dir, ZoneId(2));
        let mut f = ZoneKeyFile::load(&path).unwrap();
        f.begin_kek_rotation(pool.root().as_ref()).unwrap();
        f.save(&path).unwrap();
        if !dual_control {
            pool.rotate_kek("z3", 64, Duration::ZERO).unwrap();
        }
        let vol = pool.open("v").unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            for i in 0..16u64 {
                vol.write(i * 4096, &block(i), false).await.unwrap();
            }
            vol.flush().await.unwrap();
        });
        drop(vol);
        let keys = keys_of(&pool, pool.root().as_ref()).unwrap();
        drop(pool);
        let old_copy = tmp.path().join("root.sealed.backup");
        std::fs::copy(dir.join("keys/root.sealed"), &old_copy).unwrap();
        Fixture {
            _tmp: tmp,
            dir,
            keys,
            old_copy,
        }
    }

    fn read_back(pool: &Pool) {
        let vol = pool.open("v").unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            for i in 0..16u64 {
                let mut got = vec![0u8; BLOCK_SIZE];
                vol.read(i * 4096, &mut got).await.unwrap();
                assert!(got == block(i), "block {i} reads wrong data");
            }
        });
    }

    fn sealed_new(p: &Passphrase) -> NewRoot<'_> {
        NewRoot::SealedFile {
            passphrase: Some(p),
            kdf: None,
        }
    }

    /// A root key rotation of `pool` to a sealed file under `new`.
    fn rotate(
        pool: &Pool,
        current: &str,
        new: &Passphrase,
        batch: usize,
    ) -> Result<RootRotationReport> {
        pool.rotate_root(
            RootSecret::Passphrase(&pass(current)),
            sealed_new(new),
            batch,
            Duration::ZERO,
            None,
        )
    }

    /// [`rotate`], one KEK per batch, crashing at `at`.
    fn crash(pool: &Pool, current: &str, new: &Passphrase, at: Step) -> PoolError {
        let e = pool
            .rotate_root_with(
                RootSecret::Passphrase(&pass(current)),
                sealed_new(new),
                1,
                Duration::ZERO,
                None,
                &crash_at(at),
            )
            .unwrap_err();
        assert!(e.to_string().contains("simulated crash"), "{at:?}: {e}");
        e
    }

    fn crash_at(at: Step) -> impl Fn(Step) -> Result<()> {
        move |s| {
            if s == at {
                Err(PoolError::Conflict(format!("simulated crash at {s:?}")))
            } else {
                Ok(())
            }
        }
    }

    fn is_wrong_passphrase(r: Result<Pool>) -> bool {
        matches!(r, Err(PoolError::Key(KeyError::WrongPassphrase { .. })))
    }

    fn kek_roots(dir: &Path) -> Vec<Option<String>> {
        (1..=3)
            .flat_map(|z| {
                ZoneKeyFile::load(&Pool::zone_key_path(dir, ZoneId(z)))
                    .unwrap()
                    .records()
                    .iter()
                    .filter(|r| r.purpose == Purpose::Kek && r.state.has_material())
                    .map(|r| r.wrapped_by_root.clone())
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// After the rotation: the new passphrase opens the pool and reads the
    /// data, the old one is refused, the old file and the record are gone,
    /// and the old root key (from a backup copy) unwraps nothing.
    fn check_finished(fx: &Fixture) {
        let pool = Pool::open(&fx.dir, &pass(NEW), &profile()).unwrap();
        assert_eq!(keys_of(&pool, pool.root().as_ref()).unwrap(), fx.keys);
        read_back(&pool);
        let RootKeyConfig::SealedFile { path } = &pool.config().root_key else {
            panic!("sealed");
        };
        assert_ne!(path, Path::new("keys/root.sealed"));
        assert!(path.starts_with("keys"), "beside the old file: {path:?}");
        drop(pool);
        assert!(is_wrong_passphrase(Pool::open(
            &fx.dir,
            &pass(OLD),
            &profile()
        )));
        assert!(
            !fx.dir.join("keys/root.sealed").exists(),
            "old file destroyed"
        );
        assert!(!RootRotationState::path(&fx.dir).exists(), "record removed");
        let old = SealedFileProvider::open(&fx.old_copy, &pass(OLD)).unwrap();
        for z in 1..=3 {
            let f = ZoneKeyFile::load(&Pool::zone_key_path(&fx.dir, ZoneId(z))).unwrap();
            let e = f.check_keks_unwrap(&old).unwrap_err();
            assert!(matches!(e, KeyError::Unwrap { .. }), "zone {z}: {e}");
            assert!(f.unlock(&old).is_err(), "zone {z}");
        }
        let new_id = root_id(&Pool::root_key_config(&fx.dir).unwrap());
        assert!(
            kek_roots(&fx.dir)
                .iter()
                .all(|r| r.as_deref() == Some(new_id.as_str())),
            "{:?}",
            kek_roots(&fx.dir)
        );
        let log = std::fs::read_to_string(fx.dir.join("audit.log")).unwrap();
        let ok = log
            .lines()
            .filter(|l| l.contains("\"root.rotate\"") && l.contains("\"ok\""))
            .count();
        assert_eq!(ok, 1, "{log}");
        assert!(
            log.lines().any(
                |l| l.contains("\"key.destroy\"") && l.contains("sealed-file:keys/root.sealed")
            ),
            "{log}"
        );
        crate::audit::verify(&fx.dir).unwrap();
    }

    #[test]
    fn rotation_without_a_crash() {
        let fx = fixture(false);
        let pool = Pool::open(&fx.dir, &pass(OLD), &profile()).unwrap();
        let new = pass(NEW);
        let report = rotate(&pool, OLD, &new, 64).unwrap();
        assert_eq!(
            (report.rewrapped, report.checked, report.zones),
            (4, 4, 3),
            "{report:?}"
        );
        assert!(report.old_destroyed && !report.resumed);
        // The open pool now works with the new root key: a new zone's keys
        // are wrapped by it.
        pool.create_zone("z4").unwrap();
        drop(pool);
        let mut fx = fx;
        let pool = Pool::open(&fx.dir, &pass(NEW), &profile()).unwrap();
        fx.keys
            .insert(4, keys_of(&pool, pool.root().as_ref()).unwrap()[&4].clone());
        drop(pool);
        check_finished(&fx);
        // The new file keeps the old file's KDF cost.
        let path = Pool::resolve(
            &fx.dir,
            match &Pool::root_key_config(&fx.dir).unwrap() {
                RootKeyConfig::SealedFile { path } => path,
                _ => unreachable!(),
            },
        );
        let sealed = SealedFileProvider::open(&path, &pass(NEW)).unwrap();
        assert_eq!(sealed.params(), KdfParams::INSECURE_FAST);
    }

    /// A crash after every batch (one KEK each) and after every later step:
    /// the pool opens with the passphrase pool.toml calls for, every key
    /// unwraps, the data reads back, the other passphrase is refused, and
    /// running again finishes.
    #[test]
    fn crash_at_every_step_then_resume() {
        let steps = [
            Step::Begun,
            Step::Saved(1),
            Step::Saved(2),
            Step::Saved(3),
            Step::Saved(4),
            Step::Checked,
            Step::Switched,
            Step::Retired,
        ];
        for at in steps {
            let fx = fixture(false);
            let new = pass(NEW);
            {
                let pool = Pool::open(&fx.dir, &pass(OLD), &profile()).unwrap();
                crash(&pool, OLD, &new, at);
            }
            let switched = matches!(at, Step::Switched | Step::Retired);
            let (right, wrong) = if switched { (NEW, OLD) } else { (OLD, NEW) };
            assert!(
                is_wrong_passphrase(Pool::open(&fx.dir, &pass(wrong), &profile())),
                "{at:?}: {wrong} must be refused"
            );
            let pool = Pool::open(&fx.dir, &pass(right), &profile()).unwrap();
            assert_eq!(
                keys_of(&pool, pool.root().as_ref()).unwrap(),
                fx.keys,
                "{at:?}: every key unwraps"
            );
            read_back(&pool);
            let state = RootRotationState::load(&fx.dir).unwrap().expect("recorded");
            let new_id = state.new_id();
            let moved = kek_roots(&fx.dir)
                .iter()
                .filter(|r| r.as_deref() == Some(new_id.as_str()))
                .count();
            let expect_moved = match at {
                Step::Begun => 0,
                Step::Saved(k) => k,
                _ => 4,
            };
            assert_eq!(moved, expect_moved, "{at:?}");
            if let Step::Saved(_) = at {
                assert!(
                    pool.root().describe().contains("rotation in progress"),
                    "{at:?}"
                );
                // The old root alone no longer unlocks every zone.
                assert!(
                    keys_of(
                        &pool,
                        &SealedFileProvider::open(&fx.old_copy, &pass(OLD)).unwrap()
                    )
                    .is_err()
                );
            }
            let report = rotate(&pool, right, &new, 1).unwrap();
            assert!(report.resumed, "{at:?}");
            assert_eq!(report.rewrapped, 4 - expect_moved, "{at:?}");
            assert_eq!(report.old_destroyed, at != Step::Retired, "{at:?}");
            assert_eq!(report.new_root, new_id);
            drop(pool);
            check_finished(&fx);
            let log = std::fs::read_to_string(fx.dir.join("audit.log")).unwrap();
            assert!(
                log.lines()
                    .any(|l| l.contains("\"root.rotate\"") && l.contains("\"failed\"")),
                "{at:?}: the crashed run is recorded"
            );
        }
    }

    /// The rotation on a shared pool, as the server runs it, while other
    /// threads rotate KEKs, open and abort DEK rotation windows and create
    /// zones on the same key files: each of them succeeds every time, the
    /// pool reads its data throughout, every KEK ends under the new root key
    /// alone, and the pool reopens with the new passphrase.
    #[test]
    fn online_rotation_beside_kek_and_dek_rotations_and_new_zones() {
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
        let fx = fixture(false);
        let pool = Pool::open(&fx.dir, &pass(OLD), &profile()).unwrap();
        let new = pass(NEW);
        let done = AtomicBool::new(false);
        let (keks, windows, zones) = (
            AtomicUsize::new(0),
            AtomicUsize::new(0),
            AtomicUsize::new(0),
        );
        let report = std::thread::scope(|s| {
            s.spawn(|| {
                while !done.load(Ordering::Acquire) {
                    for z in ["z2", "z3"] {
                        pool.rotate_kek(z, 1, Duration::ZERO).unwrap();
                        keks.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
            s.spawn(|| {
                while !done.load(Ordering::Acquire) {
                    pool.rotation_prepare("z1", None).unwrap();
                    read_back(&pool);
                    pool.rotation_abort("z1").unwrap();
                    windows.fetch_add(1, Ordering::Relaxed);
                }
            });
            s.spawn(|| {
                while !done.load(Ordering::Acquire) {
                    let n = zones.fetch_add(1, Ordering::Relaxed);
                    pool.create_zone(&format!("n{n}")).unwrap();
                    std::thread::sleep(Duration::from_millis(5));
                }
            });
            // One KEK per batch and a pause: the others run between batches.
            let r = pool.rotate_root(
                RootSecret::Passphrase(&pass(OLD)),
                sealed_new(&new),
                1,
                Duration::from_millis(40),
                None,
            );
            done.store(true, Ordering::Release);
            r
        })
        .unwrap();
        assert!(report.rewrapped >= 1 && !report.resumed, "{report:?}");
        for (what, n) in [
            ("KEK rotations", &keks),
            ("windows", &windows),
            ("zones", &zones),
        ] {
            assert!(n.load(Ordering::Relaxed) >= 1, "no {what} ran beside it");
        }
        // The pool goes on: new keys come from the new root key.
        pool.rotate_kek("z1", 64, Duration::ZERO).unwrap();
        pool.rotation_prepare("z1", None).unwrap();
        read_back(&pool);
        pool.rotation_abort("z1").unwrap();
        pool.create_zone("after").unwrap();
        let all = keys_of(&pool, pool.root().as_ref()).unwrap();
        drop(pool);
        let new_root = SealedFileProvider::open(
            &Pool::resolve(
                &fx.dir,
                match &Pool::root_key_config(&fx.dir).unwrap() {
                    RootKeyConfig::SealedFile { path } => path,
                    _ => unreachable!(),
                },
            ),
            &new,
        )
        .unwrap();
        let zones_now = Pool::open(&fx.dir, &new, &profile())
            .map(|p| p.catalog().zones.len())
            .unwrap();
        assert_eq!(zones_now, all.len());
        for z in 1..=all.len() as u32 {
            let f = ZoneKeyFile::load(&Pool::zone_key_path(&fx.dir, ZoneId(z))).unwrap();
            assert!(f.check_keks_unwrap(&new_root).unwrap() >= 1, "zone {z}");
        }
        assert!(is_wrong_passphrase(Pool::open(
            &fx.dir,
            &pass(OLD),
            &profile()
        )));
        let pool = Pool::open(&fx.dir, &new, &profile()).unwrap();
        read_back(&pool);
        assert_eq!(keys_of(&pool, pool.root().as_ref()).unwrap(), all);
    }

    #[test]
    fn one_root_operation_at_a_time() {
        let fx = fixture(false);
        let pool = Pool::open(&fx.dir, &pass(OLD), &profile()).unwrap();
        let guard = pool.root_op_guard().unwrap();
        let e = pool
            .change_passphrase(&pass(OLD), &pass(NEW), None, None)
            .unwrap_err();
        assert!(matches!(e, PoolError::Conflict(_)), "{e}");
        let e = rotate(&pool, OLD, &pass(NEW), 64).unwrap_err();
        assert!(e.to_string().contains("already running"), "{e}");
        drop(guard);
        assert!(RootRotationState::load(&fx.dir).unwrap().is_none());
        pool.change_passphrase(&pass(OLD), &pass(NEW), None, None)
            .unwrap();
    }

    /// A zone created while a rotation is unfinished gets a KEK under the
    /// new root key, and the resumed rotation has nothing to do for it.
    #[test]
    fn zone_made_mid_rotation_is_under_the_new_root() {
        let fx = fixture(false);
        let new = pass(NEW);
        {
            let pool = Pool::open(&fx.dir, &pass(OLD), &profile()).unwrap();
            crash(&pool, OLD, &new, Step::Saved(2));
        }
        let pool = Pool::open(&fx.dir, &pass(OLD), &profile()).unwrap();
        pool.create_zone("z4").unwrap();
        let new_id = RootRotationState::load(&fx.dir).unwrap().unwrap().new_id();
        let f = ZoneKeyFile::load(&Pool::zone_key_path(&fx.dir, ZoneId(4))).unwrap();
        assert_eq!(
            f.records()[0].wrapped_by_root.as_deref(),
            Some(new_id.as_str())
        );
        let report = rotate(&pool, OLD, &new, 64).unwrap();
        assert_eq!((report.rewrapped, report.checked, report.zones), (2, 5, 4));
        drop(pool);
        let pool = Pool::open(&fx.dir, &pass(NEW), &profile()).unwrap();
        assert_eq!(keys_of(&pool, pool.root().as_ref()).unwrap().len(), 4);
    }

    #[test]
    fn wrong_old_passphrase_and_missing_approvals_change_nothing() {
        let fx = fixture(true);
        let before = std::fs::read(Pool::zone_key_path(&fx.dir, ZoneId(1))).unwrap();
        let pool = Pool::open(&fx.dir, &pass(OLD), &profile()).unwrap();
        let new = pass(NEW);
        // Dual control: no approvals, refused and recorded.
        let e = rotate(&pool, OLD, &new, 64).unwrap_err();
        assert!(
            matches!(
                e,
                PoolError::Approval(crate::keys::approval::ApprovalError::NotEnough { got: 0, .. })
            ),
            "{e}"
        );
        let log = std::fs::read_to_string(fx.dir.join("audit.log")).unwrap();
        assert!(
            log.lines()
                .any(|l| l.contains("\"root.rotate\"") && l.contains("\"refused\"")),
            "{log}"
        );
        // Without dual control, a wrong old passphrase is refused before
        // anything is written.
        let mut config = (*pool.config()).clone();
        config.dual_control.required = false;
        pool.set_config(config);
        let e = rotate(&pool, "not the passphrase", &new, 64).unwrap_err();
        assert!(
            matches!(e, PoolError::Key(KeyError::WrongPassphrase { .. })),
            "{e}"
        );
        let e = pool
            .rotate_root(
                RootSecret::Passphrase(&pass(OLD)),
                NewRoot::SealedFile {
                    passphrase: None,
                    kdf: None,
                },
                64,
                Duration::ZERO,
                None,
            )
            .unwrap_err();
        assert!(e.to_string().contains("needs a new passphrase"), "{e}");
        let e = pool
            .rotate_root(
                RootSecret::Passphrase(&pass(OLD)),
                NewRoot::Pkcs11 {
                    key_label: Some("k".into()),
                },
                64,
                Duration::ZERO,
                None,
            )
            .unwrap_err();
        assert!(e.to_string().contains("sealed file"), "{e}");
        assert!(RootRotationState::load(&fx.dir).unwrap().is_none());
        assert_eq!(
            std::fs::read(Pool::zone_key_path(&fx.dir, ZoneId(1))).unwrap(),
            before
        );
        assert!(fx.dir.join("keys/root.sealed").exists());
        drop(pool);
        assert!(Pool::open(&fx.dir, &pass(OLD), &profile()).is_ok());
    }

    #[test]
    fn change_passphrase_reseals_the_same_root_key() {
        let fx = fixture(false);
        let zone_files: Vec<Vec<u8>> = (1..=3)
            .map(|z| std::fs::read(Pool::zone_key_path(&fx.dir, ZoneId(z))).unwrap())
            .collect();
        let pool = Pool::open(&fx.dir, &pass(OLD), &profile()).unwrap();
        let e = pool
            .change_passphrase(&pass("wrong"), &pass(NEW), None, None)
            .unwrap_err();
        assert!(
            matches!(e, PoolError::Key(KeyError::WrongPassphrase { .. })),
            "{e}"
        );
        pool.change_passphrase(&pass(OLD), &pass(NEW), None, None)
            .unwrap();
        drop(pool);
        assert!(is_wrong_passphrase(Pool::open(
            &fx.dir,
            &pass(OLD),
            &profile()
        )));
        let pool = Pool::open(&fx.dir, &pass(NEW), &profile()).unwrap();
        assert_eq!(keys_of(&pool, pool.root().as_ref()).unwrap(), fx.keys);
        read_back(&pool);
        drop(pool);
        // No KEK was re-wrapped: the zone key files are byte for byte the same,
        // and a copy of the old file still opens them with the old passphrase
        // (which is what rotate-root is for).
        for (z, before) in (1..=3).zip(&zone_files) {
            assert_eq!(
                &std::fs::read(Pool::zone_key_path(&fx.dir, ZoneId(z))).unwrap(),
                before
            );
        }
        let old = SealedFileProvider::open(&fx.old_copy, &pass(OLD)).unwrap();
        assert!(
            ZoneKeyFile::load(&Pool::zone_key_path(&fx.dir, ZoneId(1)))
                .unwrap()
                .unlock(&old)
                .is_ok()
        );
        let log = std::fs::read_to_string(fx.dir.join("audit.log")).unwrap();
        assert!(log.contains("\"root.reseal\""), "{log}");
        // Not during a root key rotation.
        let pool = Pool::open(&fx.dir, &pass(NEW), &profile()).unwrap();
        let third = pass("third");
        crash(&pool, NEW, &third, Step::Saved(1));
        let e = pool
            .change_passphrase(&pass(NEW), &pass("fourth"), None, None)
            .unwrap_err();
        assert!(e.to_string().contains("in progress"), "{e}");
    }

    /// Every file under `dir`, by path.
    fn all_files(dir: &Path) -> Vec<(String, Vec<u8>)> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(all_files(&p));
            } else {
                out.push((p.display().to_string(), std::fs::read(&p).unwrap()));
            }
        }
        out
    }

    /// DESIGN invariant 8 through a root key rotation: neither root key's
    /// bytes nor either passphrase reach a pool file, an error or a Debug
    /// string, at a crash mid-way or at the end.
    #[test]
    fn no_root_key_or_passphrase_in_files_errors_or_debug() {
        let fx = fixture(false);
        let old_root = SealedFileProvider::open(&fx.old_copy, &pass(OLD))
            .unwrap()
            .root_for_tests()
            .expose()
            .to_vec();
        let new = pass(NEW);
        let mut texts: Vec<(String, Vec<u8>)> = Vec::new();
        let pool = Pool::open(&fx.dir, &pass(OLD), &profile()).unwrap();
        let e = crash(&pool, OLD, &new, Step::Saved(2));
        texts.push(("crash error".into(), format!("{e} {e:?}").into_bytes()));
        texts.push((
            "pair".into(),
            format!("{:?} {}", pool.root().describe(), pool.root().describe()).into_bytes(),
        ));
        drop(pool);
        let state = RootRotationState::load(&fx.dir).unwrap().unwrap();
        texts.push(("state".into(), format!("{state:?}").into_bytes()));
        texts.extend(all_files(&fx.dir));
        let pool = Pool::open(&fx.dir, &pass(OLD), &profile()).unwrap();
        texts.push(("reopened pair".into(), pool.root().describe().into_bytes()));
        // The new root key, as the record holds it.
        let new_root = state.new_root(pool.root().as_ref()).unwrap().unwrap();
        let new_root = new_root.expose().to_vec();
        let e = state
            .new_root(&crate::keys::root::test_support::MemoryProvider::new())
            .unwrap_err();
        texts.push(("unwrap error".into(), format!("{e} {e:?}").into_bytes()));
        rotate(&pool, OLD, &new, 1).unwrap();
        texts.push(("final provider".into(), pool.root().describe().into_bytes()));
        drop(pool);
        let e = Pool::open(&fx.dir, &pass(OLD), &profile()).err().unwrap();
        texts.push((
            "old passphrase refused".into(),
            format!("{e} {e:?}").into_bytes(),
        ));
        texts.extend(all_files(&fx.dir));

        let mut needles: Vec<(String, Vec<u8>)> = vec![
            ("old passphrase".into(), OLD.as_bytes().to_vec()),
            ("new passphrase".into(), NEW.as_bytes().to_vec()),
        ];
        for (what, k) in [("old root", &old_root), ("new root", &new_root)] {
            use base64ct::{Base64, Encoding};
            let hex: String = k.iter().map(|b| format!("{b:02x}")).collect();
            needles.push((format!("{what} raw"), k.to_vec()));
            needles.push((format!("{what} hex"), hex.as_bytes()[..16].to_vec()));
            needles.push((format!("{what} HEX"), hex[..16].to_uppercase().into_bytes()));
            needles.push((
                format!("{what} base64"),
                Base64::encode_string(k).as_bytes()[..12].to_vec(),
            ));
        }
        assert_ne!(old_root, new_root);
        // The scan can fail: each needle is found where it is known to be.
        let ac = aho_corasick::AhoCorasick::new(needles.iter().map(|(_, n)| n)).unwrap();
        for (_, n) in &needles {
            assert!(ac.is_match(&[b"x".as_slice(), n, b"y"].concat()));
        }
        let mut hits = Vec::new();
        for (what, hay) in &texts {
            for m in ac.find_overlapping_iter(hay.as_slice()) {
                hits.push(format!(
                    "{} found in {what}",
                    needles[m.pattern().as_usize()].0
                ));
            }
        }
        assert!(hits.is_empty(), "secrets leaked:\n{}", hits.join("\n"));
        assert!(
            texts.len() > 20,
            "files and messages to scan: {}",
            texts.len()
        );
    }
}
