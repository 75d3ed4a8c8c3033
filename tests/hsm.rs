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
