//! A pool whose root key is inside a real SoftHSM2 token, end to end with
//! the `keyturn` binary: init, zone, volume, serve, write with qemu-io,
//! restart, read back; and a wrong PIN refusing to serve.
//!
//! SoftHSM2 finds its tokens through `SOFTHSM2_CONF`; it is set in each
//! child's environment only, so tests running in parallel never share one.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::*;

const MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";
const TOKEN: &str = "keyturn-test";

/// A SoftHSM2 token in a temporary directory and a pool whose root key is
/// on it.
struct HsmPool {
    dir: tempfile::TempDir,
    conf: PathBuf,
    pin_file: PathBuf,
}

impl HsmPool {
    /// Makes the token (user PIN 1234) and runs `keyturn init --root-key pkcs11`.
    fn new() -> Self {
        require_tool("softhsm2-util");
        require_tool("qemu-io");
        assert!(
            Path::new(MODULE).exists(),
            "{MODULE} missing; tools/test.sh installs softhsm2"
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
            .args(["--pin", "1234", "--so-pin", "5678"])
            .env("SOFTHSM2_CONF", &conf)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let pin_file = write_file(dir.path(), "pin", b"1234\n");
        let p = Self {
            dir,
            conf,
            pin_file,
        };
        p.keyturn_ok(
            &[
                "init",
                "--root-key",
                "pkcs11",
                "--pkcs11-module",
                MODULE,
                "--token-label",
                TOKEN,
            ],
            None,
        );
        p
    }

    fn pool(&self) -> PathBuf {
        self.dir.path().join("pool")
    }

    /// `keyturn ARGS --pool DIR --pin-file F` with this token; no passphrase
    /// anywhere, so a pkcs11 pool that asked for one would fail.
    fn cmd(&self, args: &[&str], pin_file: Option<&Path>) -> Command {
        let mut c = Command::new(keyturn_bin());
        c.args(args)
            .arg("--pool")
            .arg(self.pool())
            .arg("--pin-file")
            .arg(pin_file.unwrap_or(&self.pin_file))
            .env("SOFTHSM2_CONF", &self.conf)
            .env_remove("KEYTURN_PASSPHRASE")
            .env_remove("KEYTURN_PKCS11_PIN")
            .stdin(Stdio::null());
        c
    }

    fn keyturn(&self, args: &[&str], pin_file: Option<&Path>) -> Output {
        self.cmd(args, pin_file).output().unwrap()
    }

    fn keyturn_ok(&self, args: &[&str], pin_file: Option<&Path>) -> String {
        let out = self.keyturn(args, pin_file);
        assert!(
            out.status.success(),
            "keyturn {args:?} failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Starts `keyturn serve` on a free port; returns it once ready.
    fn serve(&self) -> Served {
        let log = self.dir.path().join("serve.log");
        let mut child = self
            .cmd(&["serve", "--listen", "127.0.0.1:0"], None)
            .env("KEYTURN_LOG", "debug")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        loop {
            match rx.recv_timeout(Duration::from_secs(60)) {
                Ok(line) => {
                    if let Some(rest) = line.strip_prefix("ready: nbd://") {
                        return Served {
                            child,
                            base: format!("nbd://{}", rest.trim_end_matches('/')),
                        };
                    }
                }
                Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!(
                        "keyturn serve did not become ready:\n{}",
                        std::fs::read_to_string(&log).unwrap_or_default()
                    );
                }
            }
        }
    }
}

/// A running `keyturn serve`, killed on drop.
struct Served {
    child: Child,
    base: String,
}

impl Served {
    /// SIGTERM, then waits for a clean exit.
    fn stop(&mut self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let st = self.child.wait().unwrap();
        assert!(st.success(), "serve exited with {st}");
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn pkcs11_pool_serves_and_keeps_data_across_restarts() {
    let p = HsmPool::new();
    let toml = std::fs::read_to_string(p.pool().join("pool.toml")).unwrap();
    assert!(toml.contains("provider = \"pkcs11\""), "{toml}");
    assert!(
        !p.pool().join("keys/root.sealed").exists(),
        "a pkcs11 pool has no sealed root key file"
    );
    p.keyturn_ok(&["zone", "create", "z1"], None);
    p.keyturn_ok(
        &["volume", "create", "--zone", "z1", "--size", "16M", "vol0"],
        None,
    );

    let mut s = p.serve();
    let uri = format!("{}/vol0", s.base);
    qio_ok(&uri, &["write -P 0x5a 0 1M", "write -P 0xa5 4M 1M"]);
    s.stop();

    let mut s = p.serve();
    let uri = format!("{}/vol0", s.base);
    qio_ok(
        &uri,
        &["read -P 0x5a 0 1M", "read -P 0xa5 4M 1M", "read -P 0 1M 1M"],
    );
    s.stop();

    // The plaintext never reached the data file.
    let data = std::fs::read(p.pool().join("data")).unwrap();
    assert!(find_bytes(&data, &[0x5a; 4096]).is_empty());
}

#[test]
fn pkcs11_pool_refuses_to_serve_with_a_wrong_pin_or_no_token() {
    let p = HsmPool::new();
    p.keyturn_ok(&["zone", "create", "z1"], None);
    p.keyturn_ok(
        &["volume", "create", "--zone", "z1", "--size", "4M", "vol0"],
        None,
    );

    let bad = write_file(p.dir.path(), "bad-pin", b"9999\n");
    let out = p
        .cmd(&["serve", "--listen", "127.0.0.1:0"], Some(&bad))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        out.stdout.is_empty(),
        "printed a ready line with a wrong PIN"
    );
    assert!(
        err.contains("wrong user PIN for PKCS#11 token \"keyturn-test\""),
        "{err}"
    );
    assert!(!err.contains("9999"), "the PIN leaked: {err}");

    // No PIN at all: says how to give one (and asks for no passphrase).
    let out = Command::new(keyturn_bin())
        .args(["serve", "--listen", "127.0.0.1:0", "--pool"])
        .arg(p.pool())
        .env("SOFTHSM2_CONF", &p.conf)
        .env_remove("KEYTURN_PASSPHRASE")
        .env_remove("KEYTURN_PKCS11_PIN")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && out.stdout.is_empty());
    assert!(err.contains("KEYTURN_PKCS11_PIN"), "{err}");

    // The PIN from the environment works like the file.
    let out = Command::new(keyturn_bin())
        .args(["zone", "list", "--pool"])
        .arg(p.pool())
        .env("SOFTHSM2_CONF", &p.conf)
        .env("KEYTURN_PKCS11_PIN", "1234")
        .env_remove("KEYTURN_PASSPHRASE")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The token gone (its store emptied): serve refuses, naming it.
    std::fs::remove_dir_all(p.dir.path().join("tokens")).unwrap();
    std::fs::create_dir(p.dir.path().join("tokens")).unwrap();
    let out = p
        .cmd(&["serve", "--listen", "127.0.0.1:0"], None)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && out.stdout.is_empty());
    assert!(
        err.contains("no PKCS#11 token labelled \"keyturn-test\""),
        "{err}"
    );
}

/// Set in the environment of the child that lists the token's keys.
const LIST_ENV: &str = "KEYTURN_TEST_LIST_TOKEN_KEYS";

/// Labels of the AES keys on the token, sorted, read with the `cryptoki`
/// crate (not keyturn's own code) in a child process of this test binary:
/// SoftHSM2 reads `SOFTHSM2_CONF` once per process.
fn token_key_labels(p: &HsmPool) -> Vec<String> {
    let listing = child_listing(p, "list_token_keys_child", LIST_ENV, "token keys: ");
    serde_json::from_value(listing).unwrap()
}

/// A logged-in read-only session on the test token, opened with the
/// `cryptoki` crate directly (not keyturn's code), for the child tests.
fn test_token_session() -> cryptoki::session::Session {
    use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
    use cryptoki::session::UserType;
    use cryptoki::types::AuthPin;
    let ctx = Pkcs11::new(MODULE).unwrap();
    ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        .unwrap();
    let slot = ctx
        .get_slots_with_token()
        .unwrap()
        .into_iter()
        .find(|s| ctx.get_token_info(*s).unwrap().label().trim_end() == TOKEN)
        .expect("the test token");
    let session = ctx.open_ro_session(slot).unwrap();
    session
        .login(UserType::User, Some(&AuthPin::new("1234".into())))
        .unwrap();
    session
}

/// Runs the ignored test `child` of this binary with `env` set and the
/// pool's SoftHSM2 configuration, and returns the JSON it printed after
/// `prefix`.
fn child_listing(p: &HsmPool, child: &str, env: &str, prefix: &str) -> serde_json::Value {
    let out = Command::new(std::env::current_exe().unwrap())
        .args([child, "--exact", "--ignored", "--nocapture"])
        .env("SOFTHSM2_CONF", &p.conf)
        .env(env, "1")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && text.contains(&format!("{child} ... ok")),
        "listing the token failed:\n{text}"
    );
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix(prefix))
        .unwrap_or_else(|| panic!("no listing in:\n{text}"));
    serde_json::from_str(line).unwrap()
}

#[test]
#[ignore = "inner test: run by token_key_labels in a child process"]
fn list_token_keys_child() {
    use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass};
    if std::env::var_os(LIST_ENV).is_none() {
        return;
    }
    let session = test_token_session();
    let mut labels: Vec<String> = session
        .find_objects(&[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
        ])
        .unwrap()
        .into_iter()
        .flat_map(|h| session.get_attributes(h, &[AttributeType::Label]).unwrap())
        .filter_map(|a| match a {
            Attribute::Label(l) => Some(String::from_utf8(l).unwrap()),
            _ => None,
        })
        .collect();
    labels.sort();
    println!("token keys: {}", serde_json::to_string(&labels).unwrap());
}

#[test]
fn pkcs11_root_rotation_rewraps_in_the_token_and_destroys_the_old_key() {
    let p = HsmPool::new();
    p.keyturn_ok(&["zone", "create", "z1"], None);
    p.keyturn_ok(&["zone", "create", "z2"], None);
    p.keyturn_ok(
        &["volume", "create", "--zone", "z1", "--size", "16M", "vol0"],
        None,
    );
    let mut s = p.serve();
    qio_ok(
        &format!("{}/vol0", s.base),
        &["write -P 0x61 0 1M", "write -P 0x16 8M 1M"],
    );
    s.stop();
    assert_eq!(token_key_labels(&p), ["keyturn-root"]);

    // Refusals first: a passphrase for a token, the current label, a label
    // another key already has (made by a second pool's init).
    let refused = |args: &[&str], why: &str| {
        let out = p.keyturn(args, None);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(why),
            "{args:?}: {err}"
        );
    };
    let pass = write_file(p.dir.path(), "pass", b"a passphrase");
    refused(
        &[
            "keys",
            "rotate-root",
            "--new-passphrase-file",
            pass.to_str().unwrap(),
        ],
        "PKCS#11 token (use --new-key-label)",
    );
    refused(
        &["keys", "rotate-root", "--new-key-label", "keyturn-root"],
        "label other than the current one",
    );
    refused(
        &["keys", "rotate-root"],
        "name the new key with --new-key-label",
    );
    let out = Command::new(keyturn_bin())
        .args(["init", "--root-key", "pkcs11", "--pkcs11-module", MODULE])
        .args(["--token-label", TOKEN, "--key-label", "taken", "--pool"])
        .arg(p.dir.path().join("other-pool"))
        .arg("--pin-file")
        .arg(&p.pin_file)
        .env("SOFTHSM2_CONF", &p.conf)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    refused(
        &["keys", "rotate-root", "--new-key-label", "taken"],
        "already holds a key labelled \"taken\"",
    );
    assert_eq!(token_key_labels(&p), ["keyturn-root", "taken"]);
    assert!(!p.pool().join("keys/root-rotation.json").exists());

    let out = p.keyturn_ok(
        &[
            "keys",
            "rotate-root",
            "--new-key-label",
            "keyturn-root-2",
            "--batch",
            "1",
        ],
        None,
    );
    assert!(
        out.contains("pkcs11:keyturn-test/keyturn-root -> pkcs11:keyturn-test/keyturn-root-2")
            && out.contains("2 KEKs re-wrapped")
            && out.contains("old root key destroyed"),
        "{out}"
    );
    let toml = std::fs::read_to_string(p.pool().join("pool.toml")).unwrap();
    assert!(toml.contains("key_label = \"keyturn-root-2\""), "{toml}");
    assert_eq!(
        token_key_labels(&p),
        ["keyturn-root-2", "taken"],
        "the old key object is gone from the token"
    );
    let mut s = p.serve();
    qio_ok(
        &format!("{}/vol0", s.base),
        &["read -P 0x61 0 1M", "read -P 0x16 8M 1M"],
    );
    s.stop();

    // Again, killed after its first save: the pool serves on both token keys
    // meanwhile, and running without a label resumes.
    let mut child = p
        .cmd(
            &["keys", "rotate-root", "--new-key-label", "keyturn-root-3"],
            None,
        )
        .args(["--batch", "1", "--pause-ms", "5000"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    kill_when_file(&mut child, &p.pool().join("keys/zone-1.json"), |text| {
        text.contains("keyturn-root-3")
    });
    assert_eq!(
        token_key_labels(&p),
        ["keyturn-root-2", "keyturn-root-3", "taken"],
        "both root keys while the rotation is unfinished"
    );
    let mut s = p.serve();
    qio_ok(&format!("{}/vol0", s.base), &["read -P 0x61 0 1M"]);
    s.stop();
    let out = p.keyturn_ok(&["keys", "rotate-root"], None);
    assert!(
        out.contains("resuming") && out.contains("1 KEKs re-wrapped (resumed)"),
        "{out}"
    );
    assert_eq!(token_key_labels(&p), ["keyturn-root-3", "taken"]);
    let mut s = p.serve();
    qio_ok(
        &format!("{}/vol0", s.base),
        &["read -P 0x61 0 1M", "read -P 0x16 8M 1M"],
    );
    s.stop();

    let log = std::fs::read_to_string(p.pool().join("audit.log")).unwrap();
    let destroyed: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("\"key.destroy\""))
        .collect();
    assert!(
        destroyed
            .iter()
            .any(|l| l.contains("pkcs11:keyturn-test/keyturn-root\""))
            && destroyed
                .iter()
                .any(|l| l.contains("pkcs11:keyturn-test/keyturn-root-2\"")),
        "{log}"
    );
}

/// `keyturn ARGS --pool DIR` with this token but no PIN anywhere: what the
/// root key commands through the running server need.
fn keyturn_no_pin(p: &HsmPool, args: &[&str]) -> Output {
    Command::new(keyturn_bin())
        .args(args)
        .arg("--pool")
        .arg(p.pool())
        .env("SOFTHSM2_CONF", &p.conf)
        .env_remove("KEYTURN_PASSPHRASE")
        .env_remove("KEYTURN_PKCS11_PIN")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// A PKCS#11 root key rotation through the running server: it generates
/// the new key in the token with its own login (the command gives no PIN),
/// re-wraps while serving, and destroys the old key object; the server goes
/// on making keys under the new one, and a restart opens with it.
#[test]
fn pkcs11_root_rotation_through_the_running_server() {
    let p = HsmPool::new();
    p.keyturn_ok(&["zone", "create", "z1"], None);
    p.keyturn_ok(&["zone", "create", "z2"], None);
    p.keyturn_ok(
        &["volume", "create", "--zone", "z1", "--size", "16M", "vol0"],
        None,
    );
    p.keyturn_ok(
        &["volume", "create", "--zone", "z2", "--size", "16M", "vol1"],
        None,
    );
    let mut s = p.serve();
    let (vol0, vol1) = (format!("{}/vol0", s.base), format!("{}/vol1", s.base));
    qio_ok(&vol0, &["write -P 0x71 0 1M", "flush"]);
    qio_ok(&vol1, &["write -P 0x17 4M 1M", "flush"]);
    assert_eq!(token_key_labels(&p), ["keyturn-root"]);

    // A passphrase is refused for a token pool, and changes nothing.
    let pass = write_file(p.dir.path(), "pass", b"a passphrase");
    let out = keyturn_no_pin(
        &p,
        &[
            "keys",
            "change-passphrase",
            "--new-passphrase-file",
            pass.to_str().unwrap(),
        ],
    );
    assert!(!out.status.success());

    let out = keyturn_no_pin(
        &p,
        &[
            "keys",
            "rotate-root",
            "--new-key-label",
            "keyturn-root-2",
            "--batch",
            "1",
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success()
            && stdout.contains("through the server at")
            && stdout
                .contains("pkcs11:keyturn-test/keyturn-root -> pkcs11:keyturn-test/keyturn-root-2")
            && stdout.contains("2 KEKs re-wrapped")
            && stdout.contains("old root key destroyed"),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        token_key_labels(&p),
        ["keyturn-root-2"],
        "the old key object is gone from the token"
    );
    let toml = std::fs::read_to_string(p.pool().join("pool.toml")).unwrap();
    assert!(toml.contains("key_label = \"keyturn-root-2\""), "{toml}");
    let st = keyturn::admin::client::AdminClient::for_pool(&p.pool())
        .unwrap()
        .root_status()
        .unwrap();
    assert_eq!(
        (st.provider.as_str(), st.root_id.as_str()),
        ("pkcs11", "pkcs11:keyturn-test/keyturn-root-2")
    );
    assert!(st.rotation.is_none(), "{st:?}");

    // The server reads on, and makes new keys under the new root key: a
    // KEK rotation, a DEK rotation window and its flip.
    qio_ok(&vol0, &["read -P 0x71 0 1M"]);
    let out = keyturn_no_pin(&p, &["keys", "rotate-kek", "--zone", "z1"]);
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("KEK v2 active"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for action in ["prepare", "flip"] {
        let out = keyturn_no_pin(&p, &["rotate", action, "--zone", "z2"]);
        assert!(
            out.status.success(),
            "rotate {action}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    qio_ok(&vol1, &["write -P 0x18 8M 1M", "flush"]);
    qio_ok(&vol1, &["read -P 0x17 4M 1M", "read -P 0x18 8M 1M"]);
    s.stop();

    let mut s = p.serve();
    qio_ok(&format!("{}/vol0", s.base), &["read -P 0x71 0 1M"]);
    qio_ok(
        &format!("{}/vol1", s.base),
        &["read -P 0x17 4M 1M", "read -P 0x18 8M 1M", "read -P 0 0 1M"],
    );
    s.stop();
    let log = std::fs::read_to_string(p.pool().join("audit.log")).unwrap();
    assert!(
        log.lines()
            .any(|l| l.contains("\"key.destroy\"")
                && l.contains("pkcs11:keyturn-test/keyturn-root\"")),
        "{log}"
    );
    assert!(
        log.lines()
            .any(|l| l.contains("\"root.rotate\"") && l.contains("\"ok\"")),
        "{log}"
    );
}

/// Set in the environment of the child that lists the token's Ed25519 keys.
const LIST_ED_ENV: &str = "KEYTURN_TEST_LIST_TOKEN_ED_KEYS";

/// The Ed25519 objects on the token as the `cryptoki` crate (not keyturn's
/// code) sees them, in a child process as for [`token_key_labels`]: per
/// object its class, label, protection flags, whether `CKA_VALUE` could be
/// read, and (public keys) the hex `CKA_EC_POINT`.
fn token_ed_keys(p: &HsmPool) -> Vec<serde_json::Value> {
    let listing = child_listing(
        p,
        "list_token_ed_keys_child",
        LIST_ED_ENV,
        "token ed25519 objects: ",
    );
    serde_json::from_value(listing).unwrap()
}

#[test]
#[ignore = "inner test: run by token_ed_keys in a child process"]
fn list_token_ed_keys_child() {
    use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass};
    if std::env::var_os(LIST_ED_ENV).is_none() {
        return;
    }
    let session = test_token_session();
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    let mut objects = Vec::new();
    for (class, name) in [
        (ObjectClass::PRIVATE_KEY, "private"),
        (ObjectClass::PUBLIC_KEY, "public"),
    ] {
        let handles = session
            .find_objects(&[
                Attribute::Class(class),
                Attribute::KeyType(KeyType::EC_EDWARDS),
            ])
            .unwrap();
        for h in handles {
            let mut o = serde_json::json!({ "class": name });
            let types: &[AttributeType] = if name == "private" {
                &[
                    AttributeType::Label,
                    AttributeType::Token,
                    AttributeType::Private,
                    AttributeType::Sensitive,
                    AttributeType::Extractable,
                    AttributeType::Sign,
                    AttributeType::Decrypt,
                ]
            } else {
                &[AttributeType::Label, AttributeType::EcPoint]
            };
            for a in session.get_attributes(h, types).unwrap() {
                let (k, v) = match a {
                    Attribute::Label(l) => ("label", String::from_utf8(l).unwrap().into()),
                    Attribute::Token(b) => ("token", b.into()),
                    Attribute::Private(b) => ("private", b.into()),
                    Attribute::Sensitive(b) => ("sensitive", b.into()),
                    Attribute::Extractable(b) => ("extractable", b.into()),
                    Attribute::Sign(b) => ("sign", b.into()),
                    Attribute::Decrypt(b) => ("decrypt", b.into()),
                    Attribute::EcPoint(p) => ("ec_point", hex(&p).into()),
                    _ => continue,
                };
                o[k] = v;
            }
            if name == "private" {
                // A sensitive key's value is not given out (the attribute
                // is reported unavailable, or the call fails).
                let value = session.get_attributes(h, &[AttributeType::Value]);
                o["value_readable"] =
                    matches!(value, Ok(v) if v.iter().any(|a| matches!(a, Attribute::Value(_))))
                        .into();
            }
            objects.push(o);
        }
    }
    println!(
        "token ed25519 objects: {}",
        serde_json::to_string(&objects).unwrap()
    );
}

/// `keyturn audit verify --pool P --public-key K --json`: (ok, output).
fn audit_verify_json(p: &HsmPool, key: &Path) -> (bool, serde_json::Value) {
    let out = keyturn_no_pin(
        p,
        &[
            "audit",
            "verify",
            "--public-key",
            key.to_str().unwrap(),
            "--json",
        ],
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "no JSON ({e}): {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert_eq!(v["ok"].as_bool(), Some(out.status.success()), "{v}");
    (out.status.success(), v)
}

/// Recomputes `prev` and `hash` of every record by the documented rule
/// (the hash covers the line up to `,"hash":"`, closed with `}`; `prev` is
/// the last member before it), as someone who can write the log but has no
/// signing key would. Returns the last hash.
fn rechain(lines: &mut [String]) -> String {
    let mut prev = "0".repeat(64);
    for l in lines.iter_mut() {
        let mut body = l[..l.rfind(",\"hash\":\"").unwrap()].to_string();
        body.truncate(body.rfind(",\"prev\":\"").unwrap());
        body.push_str(&format!(",\"prev\":\"{prev}\"}}"));
        let hash = blake3::hash(body.as_bytes()).to_hex().to_string();
        body.pop();
        *l = format!("{body},\"hash\":\"{hash}\"}}");
        prev = hash;
    }
    prev
}

/// The audit signing key of a PKCS#11 pool is made in the token and signs
/// there: the private key is a sensitive, non-extractable token object, the
/// pool's files hold only its public key and label, the chain verifies with
/// the exported public key alone, a rewritten record is named, and after a
/// root key rotation the same key signs on and the whole chain verifies.
#[test]
fn pkcs11_audit_signing_key_lives_in_the_token() {
    let p = HsmPool::new();
    let key_file = p.pool().join("keys/audit-signing.json");
    let kf: serde_json::Value = serde_json::from_slice(&std::fs::read(&key_file).unwrap()).unwrap();
    let label = kf["token_key"]
        .as_str()
        .unwrap_or_else(|| panic!("no token_key in {kf}"))
        .to_string();
    assert!(label.starts_with("keyturn-audit-"), "{kf}");
    assert!(
        kf.get("wrapped").is_none(),
        "a wrapped key beside the token key: {kf}"
    );

    // Audited actions, offline and through the running server.
    p.keyturn_ok(&["zone", "create", "z1"], None);
    p.keyturn_ok(
        &["volume", "create", "--zone", "z1", "--size", "16M", "vol0"],
        None,
    );
    let mut s = p.serve();
    qio_ok(
        &format!("{}/vol0", s.base),
        &["write -P 0x42 0 1M", "flush"],
    );
    let out = keyturn_no_pin(&p, &["keys", "rotate-kek", "--zone", "z1"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    s.stop();
    let serve_log = std::fs::read_to_string(p.dir.path().join("serve.log")).unwrap();
    assert!(
        serve_log.contains("never leaves the token") && serve_log.contains(&label),
        "the server does not say where its signing key is:\n{serve_log}"
    );

    // (a) The key pair is in the token, with the protections asked for.
    let objects = token_ed_keys(&p);
    assert_eq!(objects.len(), 2, "one Ed25519 key pair: {objects:?}");
    let private = objects.iter().find(|o| o["class"] == "private").unwrap();
    let public = objects.iter().find(|o| o["class"] == "public").unwrap();
    assert_eq!(private["label"], label.as_str(), "{private}");
    assert_eq!(public["label"], label.as_str(), "{public}");
    for (attr, want) in [
        ("token", true),
        ("private", true),
        ("sensitive", true),
        ("extractable", false),
        ("sign", true),
        ("decrypt", false),
        ("value_readable", false),
    ] {
        assert_eq!(private[attr], want, "private key {attr}: {private}");
    }
    // The token's public key is the one the pool publishes.
    let pub_pem = p.dir.path().join("audit.pub");
    let out = keyturn_no_pin(
        &p,
        &["audit", "public-key", "--out", pub_pem.to_str().unwrap()],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("PKCS#11 token") && err.contains(&label),
        "public-key does not say where the key is: {err}"
    );
    let pem = std::fs::read_to_string(&pub_pem).unwrap();
    let der = base64_decode(
        pem.lines()
            .filter(|l| !l.starts_with("-----"))
            .collect::<String>()
            .as_str(),
    );
    let point = public["ec_point"].as_str().unwrap();
    let raw = point.strip_prefix("0420").unwrap_or(point);
    assert_eq!(
        hex(&der[der.len() - 32..]),
        raw,
        "exported public key vs CKA_EC_POINT"
    );
    // No private key material in the pool directory: the key file is only
    // the public key and the label.
    let kf: serde_json::Value = serde_json::from_slice(&std::fs::read(&key_file).unwrap()).unwrap();
    let mut members: Vec<&str> = kf.as_object().unwrap().keys().map(String::as_str).collect();
    members.sort_unstable();
    assert_eq!(
        members,
        [
            "created_unix",
            "format",
            "key_id",
            "public_key",
            "token_key",
            "version",
            "wrapped_by_root"
        ]
    );

    // (b) The chain verifies with the exported public key alone.
    let records = std::fs::read_to_string(p.pool().join("audit.log"))
        .unwrap()
        .lines()
        .count() as u64;
    let (ok, v) = audit_verify_json(&p, &pub_pem);
    assert!(ok, "{v}");
    assert_eq!(v["last_id"], records, "{v}");
    assert!(v["digests"].as_u64().unwrap() >= records / 2, "{v}");
    let key_id = v["key_id"].as_str().unwrap().to_string();
    assert_eq!(kf["key_id"], key_id.as_str());

    // (d) A root key rotation (a new AES key in the same token): the same
    // Ed25519 key signs on, and the whole chain verifies with the same
    // public key.
    let key_file_before = std::fs::read(&key_file).unwrap();
    p.keyturn_ok(
        &["keys", "rotate-root", "--new-key-label", "keyturn-root-2"],
        None,
    );
    assert_eq!(token_key_labels(&p), ["keyturn-root-2"]);
    let mut s = p.serve();
    qio_ok(&format!("{}/vol0", s.base), &["read -P 0x42 0 1M"]);
    let out = keyturn_no_pin(&p, &["keys", "rotate-kek", "--zone", "z1"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    s.stop();
    assert!(
        std::fs::read(&key_file).unwrap() == key_file_before,
        "the key file is unchanged by the rotation"
    );
    let after = token_ed_keys(&p);
    assert_eq!(after, objects, "the same key pair, nothing added");
    let log: Vec<String> = std::fs::read_to_string(p.pool().join("audit.log"))
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    let n = log.len() as u64;
    assert!(
        log.iter()
            .any(|l| l.contains("\"root.rotate\"") && l.contains("\"ok\"")),
        "no root.rotate record"
    );
    let (ok, v) = audit_verify_json(&p, &pub_pem);
    assert!(ok, "{v}");
    assert_eq!(
        (v["last_id"].as_u64(), v["key_id"].as_str()),
        (Some(n), Some(key_id.as_str())),
        "{v}"
    );
    assert!(
        n > records + 2,
        "records after the rotation: {n} vs {records}"
    );
    let out = keyturn_no_pin(
        &p,
        &["audit", "verify", "--public-key", pub_pem.to_str().unwrap()],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("kept in the root key's PKCS#11 token"),
        "{text}"
    );

    // (c) A record rewritten with recomputed hashes: the bare chain links,
    // the signatures name the record.
    // The first record past the first two that, like the one before it,
    // has its own digest, so the finding must name it exactly.
    let signed: Vec<u64> = std::fs::read_to_string(p.pool().join("audit.digests"))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["id"]
                .as_u64()
                .unwrap()
        })
        .collect();
    let k = (3..=n)
        .find(|&i| {
            signed.contains(&i)
                && signed.contains(&(i - 1))
                && log[i as usize - 1].contains("\"outcome\":\"ok\"")
        })
        .expect("two consecutive signed records") as usize;
    let mut forged = log.clone();
    forged[k - 1] = forged[k - 1].replacen("\"outcome\":\"ok\"", "\"outcome\":\"failed\"", 1);
    assert_ne!(
        forged[k - 1],
        log[k - 1],
        "record {k} has no ok outcome to change"
    );
    let last = rechain(&mut forged);
    std::fs::write(p.pool().join("audit.log"), forged.join("\n") + "\n").unwrap();
    std::fs::write(
        p.pool().join("audit.head"),
        format!("{{\"id\":{n},\"hash\":\"{last}\"}}\n"),
    )
    .unwrap();
    let out = keyturn_no_pin(&p, &["audit", "verify"]);
    assert!(
        out.status.success(),
        "the rechained log should link: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (ok, v) = audit_verify_json(&p, &pub_pem);
    assert!(!ok, "a rewritten record passed: {v}");
    assert_eq!(
        (v["kind"].as_str(), v["id"].as_u64()),
        (Some("altered"), Some(k as u64)),
        "{v}"
    );
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn base64_decode(s: &str) -> Vec<u8> {
    use base64ct::{Base64, Encoding};
    Base64::decode_vec(s).unwrap()
}
