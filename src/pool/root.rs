//! Root key rotation of a pool, and changing the passphrase of its sealed
//! root key file: offline (the CLI opens the pool; its lock keeps a server
//! out) or online (the server runs them for the admin API, see
//! [`crate::pool::admin`], while it serves volumes). Both go through the same
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
mod tests;
