//! A root key inside a PKCS#11 token (an HSM, or SoftHSM2 in tests).
//!
//! The root key is an AES-256 secret key object on the token, created with
//! `CKA_TOKEN`, `CKA_SENSITIVE` and `CKA_PRIVATE` true and `CKA_EXTRACTABLE`
//! false, so its value never leaves the token. Keys are wrapped and unwrapped
//! inside the token with `C_Encrypt` / `C_Decrypt` and `CKM_AES_GCM`:
//!
//! ```text
//! offset  size  field
//! 0       1     PKCS11_WRAP_VERSION (= 1)
//! 1       12    IV (96 bits from the OS generator, fresh per wrap)
//! 13      n     ciphertext of the key (n = key length)
//! 13+n    16    GCM tag (128 bits)
//! ```
//!
//! The associated data is [`KeyLabel::to_aad`], exactly as for the sealed
//! file provider, so a wrapped key presented under another label (another
//! zone, version or purpose) fails to unwrap.
//!
//! GCM rather than `CKM_AES_KEY_WRAP_PAD` because GCM takes associated data
//! natively, which binds the label without a second construction; SoftHSM2
//! (and every HSM we expect to meet) implements `CKM_AES_GCM` for `C_Encrypt`.
//! The IV comes from the host rather than the token because some tokens
//! refuse caller-chosen IVs only in FIPS mode, where they also return the IV
//! they chose; SoftHSM2 accepts ours. Random 96-bit IVs are safe for the few
//! thousand wraps a root key performs in its life.
//!
//! The PKCS#11 session is opened once and kept behind a mutex: a session is
//! not `Sync`, and one user login per process is what tokens expect.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::KeyError;
use super::fsutil;
use super::root::RootKeyProvider;
use super::wrap::{KeyLabel, MAX_WRAPPED_KEY_LEN, NONCE_LEN, TAG_LEN};

/// Version byte at the start of every key wrapped by this provider.
pub const PKCS11_WRAP_VERSION: u8 = 1;
/// Bytes a wrapped key adds to the key it wraps.
pub const PKCS11_WRAP_OVERHEAD: usize = 1 + NONCE_LEN + TAG_LEN;
/// The environment variable consulted for the user PIN.
pub const PIN_ENV: &str = "KEYTURN_PKCS11_PIN";
/// The key label used when none is configured.
pub const DEFAULT_KEY_LABEL: &str = "keyturn-root";

/// Largest PIN file read; anything bigger is surely the wrong file.
const MAX_PIN_FILE: u64 = 4096;
/// Length of the root key in bytes (AES-256).
const ROOT_KEY_LEN: u64 = 32;

/// Where the root key lives: which PKCS#11 module, token and key object.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pkcs11Config {
    /// Path of the PKCS#11 module (shared library), e.g.
    /// `/usr/lib/softhsm/libsofthsm2.so`.
    pub module: PathBuf,
    /// Label of the token holding the root key.
    pub token_label: String,
    /// Label (`CKA_LABEL`) of the root key object.
    pub key_label: String,
}

/// A token user PIN: zeroized on drop, redacted in `Debug`, never `Display`.
pub struct Pin(Zeroizing<String>);

impl std::fmt::Debug for Pin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Pin(<redacted>)")
    }
}

impl Pin {
    /// Takes ownership of `s`. An empty PIN is refused.
    pub fn new(s: String) -> Result<Self, KeyError> {
        Self::checked(Zeroizing::new(s), "the caller")
    }

    fn checked(s: Zeroizing<String>, origin: &str) -> Result<Self, KeyError> {
        if s.is_empty() {
            return Err(KeyError::BadPin {
                origin: origin.to_string(),
                reason: "it is empty",
            });
        }
        Ok(Self(s))
    }

    /// Finds the PIN: the file if given (one trailing newline stripped), else
    /// the environment variable [`PIN_ENV`]. Otherwise [`KeyError::NoPin`].
    pub fn resolve(file: Option<&Path>) -> Result<Self, KeyError> {
        Self::resolve_from(file, std::env::var_os(PIN_ENV))
    }

    /// [`resolve`](Self::resolve) with the environment passed in, so tests
    /// need not touch the process environment.
    fn resolve_from(
        file: Option<&Path>,
        env: Option<std::ffi::OsString>,
    ) -> Result<Self, KeyError> {
        let (bytes, origin) = if let Some(path) = file {
            let mut bytes = Zeroizing::new(fsutil::read_limited("PIN file", path, MAX_PIN_FILE)?);
            // Editors and `echo` add a newline that is not part of the PIN.
            let len = bytes.len();
            if bytes.ends_with(b"\r\n") {
                bytes.truncate(len - 2);
            } else if bytes.ends_with(b"\n") {
                bytes.truncate(len - 1);
            }
            (bytes, format!("file {}", path.display()))
        } else if let Some(v) = env {
            use std::os::unix::ffi::OsStringExt;
            (
                Zeroizing::new(v.into_vec()),
                format!("environment variable {PIN_ENV}"),
            )
        } else {
            return Err(KeyError::NoPin {
                env_var: PIN_ENV.to_string(),
            });
        };
        let Ok(s) = std::str::from_utf8(&bytes) else {
            return Err(KeyError::BadPin {
                origin,
                reason: "it is not valid UTF-8",
            });
        };
        Self::checked(Zeroizing::new(s.to_string()), &origin)
    }

    /// A second copy (zeroized on drop like the first), for a pool that
    /// keeps the PIN it was opened with.
    pub(crate) fn duplicate(&self) -> Self {
        Self(self.0.clone())
    }

    fn auth_pin(&self) -> AuthPin {
        // secrecy's SecretString zeroizes its copy on drop.
        AuthPin::new(self.0.as_str().into())
    }
}

/// A [`RootKeyProvider`] whose root key never leaves a PKCS#11 token.
pub struct Pkcs11Provider {
    config: Pkcs11Config,
    session: Mutex<Session>,
    key: ObjectHandle,
}

impl std::fmt::Debug for Pkcs11Provider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pkcs11Provider")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// A cryptoki failure in a form fit for an error message: the function and
/// the return value's name, never data.
pub(super) fn ck(e: &CkError) -> String {
    match e {
        CkError::Pkcs11(rv, func) => format!("{func} returned {rv:?}"),
        other => other.to_string(),
    }
}

/// One initialised context per module path, for the life of the process.
///
/// `C_Initialize` may be called once per process and module; a second call
/// fails with `CKR_CRYPTOKI_ALREADY_INITIALIZED`, and `C_Finalize` would pull
/// the library out from under every other session. So contexts are shared
/// and never finalised (the OS reclaims them at exit).
pub(super) fn context(module: &Path) -> Result<Pkcs11, KeyError> {
    static CONTEXTS: OnceLock<Mutex<HashMap<PathBuf, Pkcs11>>> = OnceLock::new();
    let mut map = CONTEXTS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    if let Some(ctx) = map.get(module) {
        return Ok(ctx.clone());
    }
    let err = |reason: String| KeyError::Pkcs11Module {
        module: module.to_path_buf(),
        reason,
    };
    if !module.exists() {
        return Err(err("no such file".into()));
    }
    let ctx = Pkcs11::new(module).map_err(|e| err(ck(&e)))?;
    match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(e) => return Err(err(ck(&e))),
    }
    map.insert(module.to_path_buf(), ctx.clone());
    Ok(ctx)
}

/// The slot whose token carries `label`; exactly one must.
pub(super) fn find_token(ctx: &Pkcs11, config: &Pkcs11Config) -> Result<Slot, KeyError> {
    let op_err = |op: &'static str, e: CkError| KeyError::Pkcs11 {
        op,
        token: config.token_label.clone(),
        reason: ck(&e),
    };
    let slots = ctx
        .get_slots_with_token()
        .map_err(|e| op_err("list the slots of", e))?;
    let mut found = Vec::new();
    let mut others = Vec::new();
    for slot in slots {
        let info = ctx
            .get_token_info(slot)
            .map_err(|e| op_err("read the token info of", e))?;
        let label = info.label().trim_end();
        if label == config.token_label {
            found.push(slot);
        } else if info.token_initialized() {
            others.push(format!("{label:?}"));
        }
    }
    match found.as_slice() {
        [slot] => Ok(*slot),
        [] => Err(KeyError::TokenNotFound {
            token: config.token_label.clone(),
            module: config.module.clone(),
            available: if others.is_empty() {
                "none".into()
            } else {
                others.join(", ")
            },
        }),
        _ => Err(KeyError::Pkcs11 {
            op: "choose",
            token: config.token_label.clone(),
            reason: format!(
                "{} tokens carry this label; labels must be unique",
                found.len()
            ),
        }),
    }
}

/// Opens a session on the token and logs the user in.
fn login(config: &Pkcs11Config, pin: &Pin, read_write: bool) -> Result<Session, KeyError> {
    let ctx = context(&config.module)?;
    let slot = find_token(&ctx, config)?;
    let session = if read_write {
        ctx.open_rw_session(slot)
    } else {
        ctx.open_ro_session(slot)
    }
    .map_err(|e| KeyError::Pkcs11 {
        op: "open a session on",
        token: config.token_label.clone(),
        reason: ck(&e),
    })?;
    match session.login(UserType::User, Some(&pin.auth_pin())) {
        Ok(()) => Ok(session),
        // Login state is per process and token: another provider in this
        // process already proved the PIN, and this session shares its login.
        Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => Ok(session),
        Err(CkError::Pkcs11(
            RvError::PinIncorrect | RvError::PinInvalid | RvError::PinLenRange,
            _,
        )) => Err(KeyError::WrongPin {
            token: config.token_label.clone(),
        }),
        Err(CkError::Pkcs11(RvError::PinLocked, _)) => Err(KeyError::Pkcs11 {
            op: "log in to",
            token: config.token_label.clone(),
            reason:
                "the user PIN is locked (too many wrong PINs); the security officer must reset it"
                    .into(),
        }),
        Err(e) => Err(KeyError::Pkcs11 {
            op: "log in to",
            token: config.token_label.clone(),
            reason: ck(&e),
        }),
    }
}

/// Every AES secret key object on the token with the configured label.
fn find_keys(session: &Session, config: &Pkcs11Config) -> Result<Vec<ObjectHandle>, KeyError> {
    session
        .find_objects(&[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
            Attribute::Token(true),
            Attribute::Label(config.key_label.as_bytes().to_vec()),
        ])
        .map_err(|e| KeyError::Pkcs11 {
            op: "search for the root key on",
            token: config.token_label.clone(),
            reason: ck(&e),
        })
}

/// The one AES key on the token with the configured label, if any; several
/// are refused (as `op`): which one is the root key would be a guess.
fn find_key(
    session: &Session,
    config: &Pkcs11Config,
    op: &'static str,
) -> Result<Option<ObjectHandle>, KeyError> {
    match find_keys(session, config)?.as_slice() {
        [] => Ok(None),
        [k] => Ok(Some(*k)),
        many => Err(KeyError::Pkcs11 {
            op,
            token: config.token_label.clone(),
            reason: format!(
                "{} AES keys are labelled {:?}; the root key label must be unique",
                many.len(),
                config.key_label
            ),
        }),
    }
}

impl Pkcs11Provider {
    /// Opens the root key: loads the module, finds the token by label, logs
    /// in as the user, and finds the key by label. Each of these failing is a
    /// distinct, clear error; so is a key that could leave the token
    /// (extractable or not sensitive) or is not AES-256.
    pub fn open(config: &Pkcs11Config, pin: &Pin) -> Result<Self, KeyError> {
        let session = login(config, pin, false)?;
        let key = find_key(&session, config, "use")?.ok_or_else(|| KeyError::RootKeyMissing {
            key: config.key_label.clone(),
            token: config.token_label.clone(),
        })?;
        check_key(&session, key, config)?;
        tracing::info!(
            token = %config.token_label,
            key = %config.key_label,
            "PKCS#11 root key opened"
        );
        Ok(Self {
            config: config.clone(),
            session: Mutex::new(session),
            key,
        })
    }

    /// Generates the root key inside the token (`C_GenerateKey`,
    /// `CKM_AES_KEY_GEN`, 256 bits, sensitive and non-extractable) and opens
    /// it. Refuses if a key with that label already exists: replacing a root
    /// key would orphan everything wrapped under it.
    pub fn create_key(config: &Pkcs11Config, pin: &Pin) -> Result<Self, KeyError> {
        {
            let session = login(config, pin, true)?;
            if !find_keys(&session, config)?.is_empty() {
                return Err(KeyError::RootKeyExists {
                    key: config.key_label.clone(),
                    token: config.token_label.clone(),
                });
            }
            let template = [
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::KeyType(KeyType::AES),
                Attribute::ValueLen(ROOT_KEY_LEN.into()),
                Attribute::Token(true),
                Attribute::Private(true),
                Attribute::Sensitive(true),
                Attribute::Extractable(false),
                Attribute::Encrypt(true),
                Attribute::Decrypt(true),
                // Only C_Encrypt/C_Decrypt: no C_WrapKey of other token keys,
                // no derivation of keys whose value could be read.
                Attribute::Wrap(false),
                Attribute::Unwrap(false),
                Attribute::Derive(false),
                Attribute::Sign(false),
                Attribute::Verify(false),
                Attribute::Label(config.key_label.as_bytes().to_vec()),
            ];
            session
                .generate_key(&Mechanism::AesKeyGen, &template)
                .map_err(|e| KeyError::Pkcs11 {
                    op: "generate the root key on",
                    token: config.token_label.clone(),
                    reason: ck(&e),
                })?;
            tracing::info!(
                token = %config.token_label,
                key = %config.key_label,
                "generated a PKCS#11 root key"
            );
        }
        Self::open(config, pin)
    }

    /// Whether the token holds an AES key with the configured label.
    pub fn key_exists(config: &Pkcs11Config, pin: &Pin) -> Result<bool, KeyError> {
        let session = login(config, pin, false)?;
        Ok(!find_keys(&session, config)?.is_empty())
    }

    /// Destroys the root key with the configured label in the token
    /// (`C_DestroyObject`): the last step of a root key rotation, once no KEK
    /// is wrapped by it. Returns whether a key was destroyed (`false`: it was
    /// already gone). Refuses when several keys carry the label.
    pub fn destroy_key(config: &Pkcs11Config, pin: &Pin) -> Result<bool, KeyError> {
        let session = login(config, pin, true)?;
        let Some(key) = find_key(&session, config, "destroy the old root key on")? else {
            return Ok(false);
        };
        session.destroy_object(key).map_err(|e| KeyError::Pkcs11 {
            op: "destroy the old root key on",
            token: config.token_label.clone(),
            reason: ck(&e),
        })?;
        tracing::info!(
            token = %config.token_label,
            key = %config.key_label,
            "destroyed a PKCS#11 root key"
        );
        Ok(true)
    }

    /// The configuration this provider was opened with.
    pub fn config(&self) -> &Pkcs11Config {
        &self.config
    }

    fn session(&self) -> std::sync::MutexGuard<'_, Session> {
        // A panic while holding the session leaves no half-done state we
        // care about: each call is a single C_Encrypt or C_Decrypt.
        self.session.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Refuses a root key that could be read out of the token, or is not AES-256.
fn check_key(session: &Session, key: ObjectHandle, config: &Pkcs11Config) -> Result<(), KeyError> {
    let attrs = session
        .get_attributes(
            key,
            &[
                AttributeType::Sensitive,
                AttributeType::Extractable,
                AttributeType::ValueLen,
            ],
        )
        .map_err(|e| KeyError::Pkcs11 {
            op: "read the root key's attributes on",
            token: config.token_label.clone(),
            reason: ck(&e),
        })?;
    let (mut sensitive, mut extractable, mut len) = (None, None, None);
    for a in attrs {
        match a {
            Attribute::Sensitive(b) => sensitive = Some(b),
            Attribute::Extractable(b) => extractable = Some(b),
            Attribute::ValueLen(n) => len = Some(u64::from(n)),
            _ => {}
        }
    }
    let problem = if sensitive != Some(true) {
        Some("it is not CKA_SENSITIVE")
    } else if extractable != Some(false) {
        Some("it is CKA_EXTRACTABLE")
    } else if len != Some(ROOT_KEY_LEN) {
        Some("it is not a 256-bit AES key")
    } else {
        None
    };
    match problem {
        Some(p) => Err(KeyError::InvalidKey {
            label: format!(
                "PKCS#11 root key {:?} on token {:?}",
                config.key_label, config.token_label
            ),
            reason: format!("{p}; keyturn only uses root keys that cannot leave the token"),
        }),
        None => Ok(()),
    }
}

impl RootKeyProvider for Pkcs11Provider {
    fn wrap_key(&self, label: &KeyLabel, key: &[u8]) -> Result<Vec<u8>, KeyError> {
        if key.is_empty() || key.len() > MAX_WRAPPED_KEY_LEN {
            return Err(KeyError::InvalidKey {
                label: label.key_id.clone(),
                reason: format!("cannot wrap a key of {} bytes", key.len()),
            });
        }
        let mut iv = [0u8; NONCE_LEN];
        rand::rngs::OsRng.fill_bytes(&mut iv);
        let aad = label.to_aad();
        let ct = {
            let mut iv_param = iv;
            let params = GcmParams::new(&mut iv_param, &aad, (TAG_LEN as u64 * 8).into())
                .map_err(|e| self.op_error("set up AES-GCM on", &e))?;
            self.session()
                .encrypt(&Mechanism::AesGcm(params), self.key, key)
                .map_err(|e| self.op_error("wrap a key with", &e))?
        };
        if ct.len() != key.len() + TAG_LEN {
            return Err(KeyError::Pkcs11 {
                op: "wrap a key with",
                token: self.config.token_label.clone(),
                reason: format!(
                    "C_Encrypt returned {} bytes for a {}-byte key (expected ciphertext and a 16-byte tag)",
                    ct.len(),
                    key.len()
                ),
            });
        }
        let mut out = Vec::with_capacity(PKCS11_WRAP_OVERHEAD + key.len());
        out.push(PKCS11_WRAP_VERSION);
        out.extend_from_slice(&iv);
        out.extend_from_slice(&ct);
        Ok(out)
    }

    fn unwrap_key(&self, label: &KeyLabel, wrapped: &[u8]) -> Result<Zeroizing<Vec<u8>>, KeyError> {
        let fail = |reason: &str| KeyError::Unwrap {
            label: label.key_id.clone(),
            reason: reason.to_string(),
        };
        if wrapped.len() <= PKCS11_WRAP_OVERHEAD
            || wrapped.len() > PKCS11_WRAP_OVERHEAD + MAX_WRAPPED_KEY_LEN
        {
            return Err(fail("wrapped key has an impossible length"));
        }
        if wrapped[0] != PKCS11_WRAP_VERSION {
            return Err(fail("unknown PKCS#11 wrap format version"));
        }
        let mut iv = [0u8; NONCE_LEN];
        iv.copy_from_slice(&wrapped[1..1 + NONCE_LEN]);
        let aad = label.to_aad();
        let params = GcmParams::new(&mut iv, &aad, (TAG_LEN as u64 * 8).into())
            .map_err(|e| self.op_error("set up AES-GCM on", &e))?;
        match self.session().decrypt(
            &Mechanism::AesGcm(params),
            self.key,
            &wrapped[1 + NONCE_LEN..],
        ) {
            Ok(pt) => Ok(Zeroizing::new(pt)),
            // A failed tag check: wrong label, altered bytes, or another
            // root key; GCM cannot tell these apart. The spec says
            // CKR_ENCRYPTED_DATA_INVALID, but SoftHSM2 (OpenSSL backend)
            // reports a failed tag as CKR_GENERAL_ERROR, so that counts as a
            // failed unwrap too: either way nothing is returned, and the
            // return value stays in the message for the operator.
            Err(CkError::Pkcs11(
                rv @ (RvError::EncryptedDataInvalid
                | RvError::EncryptedDataLenRange
                | RvError::GeneralError),
                _,
            )) => Err(fail(&format!(
                "authentication failed in the token (wrong label, altered bytes, \
                 or another root key; C_Decrypt returned {rv:?})"
            ))),
            Err(e) => Err(self.op_error("unwrap a key with", &e)),
        }
    }

    fn audit_signer(
        &self,
        existing: Option<&str>,
    ) -> Result<Option<Box<dyn super::root::TokenSigner>>, KeyError> {
        Ok(
            super::pkcs11_sign::Pkcs11Signer::open(&self.config, existing)?
                .map(|s| Box::new(s) as Box<dyn super::root::TokenSigner>),
        )
    }

    fn describe(&self) -> String {
        format!(
            "PKCS#11 root key {:?} on token {:?} (module {})",
            self.config.key_label,
            self.config.token_label,
            self.config.module.display()
        )
    }
}

impl Pkcs11Provider {
    fn op_error(&self, op: &'static str, e: &CkError) -> KeyError {
        KeyError::Pkcs11 {
            op,
            token: self.config.token_label.clone(),
            reason: ck(e),
        }
    }
}

#[cfg(test)]
mod tests {
    //! These run against a real SoftHSM2 token. SoftHSM2 finds its tokens
    //! through `SOFTHSM2_CONF`, read once per process at `C_Initialize`, and
    //! setting an environment variable in a multi-threaded test process is
    //! unsound. So each outer test makes a token in a temporary directory and
    //! re-runs this test binary for one `#[ignore]`d inner test with
    //! `SOFTHSM2_CONF` set in the child's environment only.

    use std::process::Command;

    use super::*;
    use crate::ids::ZoneId;
    use crate::keys::wrap::Purpose;

    /// Where Debian's softhsm2 package installs the module.
    pub(crate) const SOFTHSM_MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";
    const TOKEN: &str = "keyturn-test";
    const USER_PIN: &str = "1234";
    const SO_PIN: &str = "5678";
    /// Set in the child's environment; inner tests do nothing without it.
    const CHILD_ENV: &str = "KEYTURN_TEST_SOFTHSM_CHILD";

    /// A SoftHSM2 configuration and token store in a temporary directory,
    /// with one initialised token labelled [`TOKEN`].
    fn softhsm_token() -> (tempfile::TempDir, PathBuf) {
        let ok = Command::new("sh")
            .args(["-c", "command -v softhsm2-util"])
            .output()
            .is_ok_and(|o| o.status.success());
        assert!(
            ok && Path::new(SOFTHSM_MODULE).exists(),
            "SoftHSM2 is not installed (apt-get install softhsm2); tools/test.sh installs it"
        );
        let dir = tempfile::tempdir().unwrap();
        let tokens = dir.path().join("tokens");
        std::fs::create_dir(&tokens).unwrap();
        let conf = dir.path().join("softhsm2.conf");
        std::fs::write(
            &conf,
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
                tokens.display()
            ),
        )
        .unwrap();
        let out = Command::new("softhsm2-util")
            .args(["--init-token", "--free", "--label", TOKEN])
            .args(["--pin", USER_PIN, "--so-pin", SO_PIN])
            .env("SOFTHSM2_CONF", &conf)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "softhsm2-util --init-token failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        (dir, conf)
    }

    /// Runs the inner test `name` in a child process of this test binary,
    /// against a fresh token; returns its output.
    fn run_child(name: &str) -> String {
        let (_dir, conf) = softhsm_token();
        let full = format!("keys::pkcs11::tests::{name}");
        let out = Command::new(std::env::current_exe().unwrap())
            .args([full.as_str(), "--exact", "--ignored", "--nocapture"])
            .env("SOFTHSM2_CONF", &conf)
            .env(CHILD_ENV, "1")
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "{name} failed:\n{text}");
        // A filter that matched nothing would also exit 0.
        assert!(
            text.contains(&format!("{full} ... ok")),
            "{name} did not run:\n{text}"
        );
        text
    }

    fn in_child() -> bool {
        std::env::var_os(CHILD_ENV).is_some()
    }

    fn config(key_label: &str) -> Pkcs11Config {
        Pkcs11Config {
            module: SOFTHSM_MODULE.into(),
            token_label: TOKEN.into(),
            key_label: key_label.into(),
        }
    }

    fn pin(s: &str) -> Pin {
        Pin::new(s.into()).unwrap()
    }

    fn label(zone: u32, purpose: Purpose, version: u32) -> KeyLabel {
        KeyLabel::new(ZoneId(zone), purpose, version)
    }

    fn is_unwrap(r: Result<Zeroizing<Vec<u8>>, KeyError>) -> bool {
        match r {
            Err(KeyError::Unwrap { .. }) => true,
            Err(e) => {
                eprintln!("not an unwrap error: {e}");
                false
            }
            Ok(_) => false,
        }
    }

    #[test]
    fn provider_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Pkcs11Provider>();
    }

    #[test]
    fn pin_sources_and_redaction() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("pin");
        std::fs::write(&f, "4321\n").unwrap();
        let p = Pin::resolve_from(Some(&f), Some("env".into())).unwrap();
        assert_eq!(p.0.as_str(), "4321");
        assert_eq!(format!("{p:?}"), "Pin(<redacted>)");
        let p = Pin::resolve_from(None, Some("9876".into())).unwrap();
        assert_eq!(p.0.as_str(), "9876");
        let e = Pin::resolve_from(None, None).unwrap_err();
        assert!(e.to_string().contains(PIN_ENV), "{e}");
        std::fs::write(&f, "\n").unwrap();
        assert!(matches!(
            Pin::resolve_from(Some(&f), None),
            Err(KeyError::BadPin { .. })
        ));
        let e = Pin::resolve_from(Some(&dir.path().join("nope")), None).unwrap_err();
        assert!(matches!(e, KeyError::NotFound { .. }), "{e}");
    }

    #[test]
    fn softhsm_provider() {
        run_child("softhsm_provider_child");
    }

    /// Everything the provider promises, against one SoftHSM2 token.
    #[test]
    #[ignore = "inner test: run by softhsm_provider in a child process"]
    fn softhsm_provider_child() {
        if !in_child() {
            return;
        }
        let cfg = config(DEFAULT_KEY_LABEL);
        let good = pin(USER_PIN);

        // No key yet: open refuses, naming the key and token.
        let e = Pkcs11Provider::open(&cfg, &good).unwrap_err();
        assert!(matches!(e, KeyError::RootKeyMissing { .. }), "{e}");
        assert!(e.to_string().contains("keyturn-root"), "{e}");

        let p = Pkcs11Provider::create_key(&cfg, &good).unwrap();
        let e = Pkcs11Provider::create_key(&cfg, &good).unwrap_err();
        assert!(matches!(e, KeyError::RootKeyExists { .. }), "{e}");
        assert!(p.describe().contains("keyturn-test"));
        assert!(!format!("{p:?}").contains(USER_PIN));

        // Round trip, fresh IV per wrap, expected size.
        let kek = [0x42u8; 32];
        let l1 = label(1, Purpose::Kek, 1);
        let w1 = p.wrap_key(&l1, &kek).unwrap();
        assert_eq!(w1.len(), 32 + PKCS11_WRAP_OVERHEAD);
        assert_eq!(w1[0], PKCS11_WRAP_VERSION);
        assert_ne!(p.wrap_key(&l1, &kek).unwrap(), w1);
        assert_eq!(p.unwrap_key(&l1, &w1).unwrap().as_slice(), &kek);
        // The wrapped bytes do not contain the key.
        assert!(!w1.windows(8).any(|w| w == &kek[..8]));

        // Another label: version, zone, purpose, id.
        assert!(is_unwrap(p.unwrap_key(&label(1, Purpose::Kek, 2), &w1)));
        assert!(is_unwrap(p.unwrap_key(&label(2, Purpose::Kek, 1), &w1)));
        assert!(is_unwrap(p.unwrap_key(&label(1, Purpose::Dek, 1), &w1)));
        let mut other_id = l1.clone();
        other_id.key_id = "renamed".into();
        assert!(is_unwrap(p.unwrap_key(&other_id, &w1)));

        // Tampering anywhere: version byte, IV, ciphertext, tag; truncation.
        for i in [0, 1, 12, 13, 30, w1.len() - 16, w1.len() - 1] {
            let mut t = w1.clone();
            t[i] ^= 0x01;
            assert!(is_unwrap(p.unwrap_key(&l1, &t)), "flip at {i} accepted");
        }
        assert!(is_unwrap(p.unwrap_key(&l1, &w1[..w1.len() - 1])));
        assert!(is_unwrap(p.unwrap_key(&l1, &w1[..PKCS11_WRAP_OVERHEAD])));
        assert!(is_unwrap(p.unwrap_key(&l1, &[])));
        assert!(matches!(
            p.wrap_key(&l1, &[]),
            Err(KeyError::InvalidKey { .. })
        ));

        // The key's value cannot be read out of the token.
        {
            let s = p.session();
            let info = s
                .get_attribute_info(p.key, &[AttributeType::Value])
                .unwrap();
            assert!(
                matches!(
                    info.as_slice(),
                    [cryptoki::object::AttributeInfo::Sensitive]
                ),
                "CKA_VALUE readable: {info:?}"
            );
            let attrs = s
                .get_attributes(
                    p.key,
                    &[
                        AttributeType::Value,
                        AttributeType::Sensitive,
                        AttributeType::Extractable,
                        AttributeType::AlwaysSensitive,
                        AttributeType::NeverExtractable,
                        AttributeType::Token,
                    ],
                )
                .unwrap();
            assert!(!attrs.iter().any(|a| matches!(a, Attribute::Value(_))));
            for want in [
                Attribute::Sensitive(true),
                Attribute::Extractable(false),
                Attribute::AlwaysSensitive(true),
                Attribute::NeverExtractable(true),
                Attribute::Token(true),
            ] {
                assert!(attrs.contains(&want), "missing {want:?} in {attrs:?}");
            }
        }

        // A provider opened later (fresh session and login) unwraps it.
        drop(p);
        let p2 = Pkcs11Provider::open(&cfg, &good).unwrap();
        assert_eq!(p2.unwrap_key(&l1, &w1).unwrap().as_slice(), &kek);

        // Another root key on the same token does not.
        let other = Pkcs11Provider::create_key(&config("other-root"), &good).unwrap();
        assert!(is_unwrap(other.unwrap_key(&l1, &w1)));
        drop(other);

        // A key that could leave the token is refused.
        {
            let s = login(&cfg, &good, true).unwrap();
            s.generate_key(
                &Mechanism::AesKeyGen,
                &[
                    Attribute::Class(ObjectClass::SECRET_KEY),
                    Attribute::KeyType(KeyType::AES),
                    Attribute::ValueLen(32.into()),
                    Attribute::Token(true),
                    Attribute::Sensitive(false),
                    Attribute::Extractable(true),
                    Attribute::Encrypt(true),
                    Attribute::Decrypt(true),
                    Attribute::Label(b"weak".to_vec()),
                ],
            )
            .unwrap();
        }
        let e = Pkcs11Provider::open(&config("weak"), &good).unwrap_err();
        assert!(matches!(e, KeyError::InvalidKey { .. }), "{e}");

        // Missing token, missing module: clear errors.
        let mut absent = cfg.clone();
        absent.token_label = "absent".into();
        let e = Pkcs11Provider::open(&absent, &good).unwrap_err();
        assert!(matches!(e, KeyError::TokenNotFound { .. }), "{e}");
        assert!(e.to_string().contains("\"keyturn-test\""), "{e}");
        let mut no_module = cfg.clone();
        no_module.module = "/nonexistent/libpkcs11.so".into();
        let e = Pkcs11Provider::open(&no_module, &good).unwrap_err();
        assert!(matches!(e, KeyError::Pkcs11Module { .. }), "{e}");

        // Wrong PIN. Login state is per process and token, so only once no
        // session of ours is logged in can the token judge the PIN.
        drop(p2);
        let e = Pkcs11Provider::open(&cfg, &pin("0000")).unwrap_err();
        assert!(matches!(e, KeyError::WrongPin { .. }), "{e}");
        assert!(!e.to_string().contains("0000"));

        // The key destroyed in the token (as a root key rotation retires
        // it): gone for key_exists, and open refuses.
        assert!(Pkcs11Provider::key_exists(&cfg, &good).unwrap());
        assert!(Pkcs11Provider::destroy_key(&cfg, &good).unwrap());
        assert!(!Pkcs11Provider::key_exists(&cfg, &good).unwrap());
        assert!(
            !Pkcs11Provider::destroy_key(&cfg, &good).unwrap(),
            "already gone"
        );
        assert!(Pkcs11Provider::key_exists(&config("other-root"), &good).unwrap());
        let e = Pkcs11Provider::open(&cfg, &good).unwrap_err();
        assert!(matches!(e, KeyError::RootKeyMissing { .. }), "{e}");
    }

    #[test]
    fn softhsm_audit_signer() {
        run_child("softhsm_audit_signer_child");
    }

    /// The audit signing key in the token: made there, found again by its
    /// label through another provider, signing pure Ed25519 that an
    /// ordinary verifier accepts; an unknown label is an error, not a new key.
    #[test]
    #[ignore = "inner test: run by softhsm_audit_signer in a child process"]
    fn softhsm_audit_signer_child() {
        use ed25519_dalek::{Signature, VerifyingKey};
        if !in_child() {
            return;
        }
        let cfg = config(DEFAULT_KEY_LABEL);
        let p = Pkcs11Provider::create_key(&cfg, &pin(USER_PIN)).unwrap();
        let made = p
            .audit_signer(None)
            .unwrap()
            .expect("SoftHSM2 has CKM_EDDSA");
        let label = made.key_name().to_string();
        assert!(
            label.starts_with(super::super::pkcs11_sign::LABEL_PREFIX),
            "{label}"
        );
        let public = VerifyingKey::from_bytes(&made.public_key()).unwrap();
        let msg = b"{\"digest\":\"keyturn-audit-v1\",\"id\":1}";
        let sig = Signature::from_bytes(&made.sign(msg).unwrap());
        public.verify_strict(msg, &sig).unwrap();
        assert!(public.verify_strict(b"other", &sig).is_err());
        assert!(!format!("{made:?}").contains("public"), "{made:?}");

        // Found again through a provider opened later.
        drop(made);
        let p2 = Pkcs11Provider::open(&cfg, &pin(USER_PIN)).unwrap();
        let found = p2.audit_signer(Some(&label)).unwrap().unwrap();
        assert_eq!(found.public_key(), *public.as_bytes());
        let sig = Signature::from_bytes(&found.sign(b"again").unwrap());
        public.verify_strict(b"again", &sig).unwrap();
        // A second key gets a label of its own.
        let other = p2.audit_signer(None).unwrap().unwrap();
        assert_ne!(other.key_name(), label);
        assert_ne!(other.public_key(), found.public_key());
        // A label the token does not hold: an error, and nothing made.
        let e = p2.audit_signer(Some("keyturn-audit-nope")).unwrap_err();
        assert!(e.to_string().contains("0 private and 0 public"), "{e}");
    }

    #[test]
    #[ignore = "benchmark: cargo test --lib softhsm_bench -- --ignored --nocapture"]
    fn softhsm_bench() {
        for child in ["softhsm_bench_child", "softhsm_kek_rotation_child"] {
            let out = run_child(child);
            for line in out.lines().filter(|l| l.starts_with("bench:")) {
                println!("{line}");
            }
        }
    }

    /// A KEK rotation of a zone with 1,000 DEK versions under a SoftHSM2
    /// root key (the figure beside the sealed file's in
    /// `zone_keys::tests::kek_rotation_of_1000_deks`).
    #[test]
    #[ignore = "inner test: run by softhsm_bench in a child process"]
    fn softhsm_kek_rotation_child() {
        if !in_child() {
            return;
        }
        let p = Pkcs11Provider::create_key(&config(DEFAULT_KEY_LABEL), &pin(USER_PIN)).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let (median, min, max) =
            crate::keys::zone_keys::tests::time_kek_rotation_of_1000_deks(&p, dir.path());
        println!(
            "bench: KEK rotation of 1000 DEKs + MAC key under a SoftHSM2 root key, an atomic save per 64: median {median:.3} s (min {min:.3}, max {max:.3})"
        );
    }

    /// Wraps and unwraps 1,000 KEKs through SoftHSM2 and prints the time.
    #[test]
    #[ignore = "inner test: run by softhsm_bench in a child process"]
    fn softhsm_bench_child() {
        if !in_child() {
            return;
        }
        let cfg = config(DEFAULT_KEY_LABEL);
        let p = Pkcs11Provider::create_key(&cfg, &pin(USER_PIN)).unwrap();
        let key = [7u8; 32];
        let labels: Vec<KeyLabel> = (1..=1000).map(|v| label(1, Purpose::Dek, v)).collect();
        let t = std::time::Instant::now();
        let wrapped: Vec<Vec<u8>> = labels
            .iter()
            .map(|l| p.wrap_key(l, &key).unwrap())
            .collect();
        let wrap = t.elapsed();
        let t = std::time::Instant::now();
        for (l, w) in labels.iter().zip(&wrapped) {
            assert_eq!(p.unwrap_key(l, w).unwrap().as_slice(), &key);
        }
        let unwrap = t.elapsed();
        println!(
            "bench: 1000 wraps {:.1} ms, 1000 unwraps {:.1} ms, total {:.1} ms ({:.0} us per wrap+unwrap)",
            wrap.as_secs_f64() * 1e3,
            unwrap.as_secs_f64() * 1e3,
            (wrap + unwrap).as_secs_f64() * 1e3,
            (wrap + unwrap).as_secs_f64() * 1e6 / 1000.0
        );
    }
}
