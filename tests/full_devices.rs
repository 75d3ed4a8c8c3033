//! Full devices, for real: the data device, the staging device and the
//! metadata directory each live on their own size-limited tmpfs, which the
//! test fills and then grows (`mount -o remount,size=`), so every ENOSPC
//! comes from the kernel, as it would on a full disk. The server must
//! answer writes with NBD_ENOSPC (or EIO), keep serving reads, lose no
//! acknowledged write, pause a rotation with a status that says why and
//! resume it when space returns, and never exit.
//!
//! Mounting needs root (or passwordless sudo), as CI has: without it these
//! tests fail, saying so, rather than pass without testing anything.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const MIB: u64 = 1 << 20;

/// A tmpfs of a given size mounted on a directory; unmounted on drop.
struct Tmpfs {
    dir: PathBuf,
}

fn mount(args: &[&str]) -> std::process::Output {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0\n"));
    let mut c = if root {
        Command::new("mount")
    } else {
        let mut c = Command::new("sudo");
        c.args(["-n", "mount"]);
        c
    };
    c.args(args).output().expect("run mount")
}

impl Tmpfs {
    fn new(dir: &Path, kib: u64) -> Tmpfs {
        std::fs::create_dir_all(dir).unwrap();
        let opts = format!("size={kib}k,mode=0700");
        let d = dir.to_str().unwrap();
        let o = mount(&["-t", "tmpfs", "-o", &opts, "keyturn-full", d]);
        assert!(
            o.status.success(),
            "cannot mount a {kib} KiB tmpfs on {d} (these tests need root or passwordless sudo): {}",
            String::from_utf8_lossy(&o.stderr)
        );
        Tmpfs { dir: dir.into() }
    }

    /// Sets the size: grows it (space returns) or shrinks it to what is
    /// in use plus `kib` (the device fills).
    fn resize(&self, kib: u64) {
        let opts = format!("remount,size={kib}k");
        let o = mount(&["-o", &opts, self.dir.to_str().unwrap()]);
        assert!(
            o.status.success(),
            "remount {}: {}",
            self.dir.display(),
            String::from_utf8_lossy(&o.stderr)
        );
    }

    /// KiB in use.
    fn used_kib(&self) -> u64 {
        let out = run_ok("df", &["-k", "--output=used", self.dir.to_str().unwrap()]);
        out.lines().nth(1).unwrap().trim().parse().unwrap()
    }

    /// Leaves `kib` free beyond what is in use now.
    fn fill_to(&self, kib: u64) {
        self.resize(self.used_kib() + kib);
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let d = self.dir.to_str().unwrap().to_string();
        let root = Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| o.stdout.starts_with(b"0\n"));
        let _ = if root {
            Command::new("umount").args(["-l", &d]).status()
        } else {
            Command::new("sudo")
                .args(["-n", "umount", "-l", &d])
                .status()
        };
    }
}

/// Points the pool's data or staging device (`key`) at `path` (created
/// empty: the pool grows it).
fn set_device(pool: &TestPool, key: &str, path: &Path) {
    std::fs::File::create(path).unwrap();
    let file = pool.path().join("pool.toml");
    let mut doc: toml::Table = std::fs::read_to_string(&file).unwrap().parse().unwrap();
    doc.insert(key.into(), toml::Value::String(path.display().to_string()));
    std::fs::write(&file, toml::to_string(&doc).unwrap()).unwrap();
}

fn status(pool: &TestPool) -> Value {
    let out = pool.keyturn_ok(&["rotate", "status", "--zone", "z1", "--json"]);
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("status JSON: {e}: {out}"))
}

/// Polls `status` until `f` holds; fails after `secs` with the last status.
fn wait_status(pool: &TestPool, what: &str, secs: u64, f: impl Fn(&Value) -> bool) -> Value {
    let start = Instant::now();
    loop {
        let st = status(pool);
        if f(&st) {
            return st;
        }
        assert!(
            start.elapsed() < Duration::from_secs(secs),
            "timed out after {secs} s waiting for {what}: {st}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn waiting(st: &Value) -> String {
    st["waiting_for_space"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// Writes `len` bytes of pattern `seed` at `offset` and flushes.
fn write_random(uri: &str, dir: &Path, seed: u64, offset: u64, len: usize) -> Vec<u8> {
    let data = pattern_bytes(seed, len);
    let file = write_file(dir, &format!("in-{seed}"), &data);
    qio_ok(
        uri,
        &[
            &format!("write -s {} {offset} {len}", file.display()),
            "flush",
        ],
    );
    data
}

/// The whole volume, read by nbdcopy.
fn read_all(uri: &str, dir: &Path, name: &str) -> Vec<u8> {
    let out = dir.join(name);
    run_ok("nbdcopy", &[uri, out.to_str().unwrap()]);
    let data = std::fs::read(&out).unwrap();
    std::fs::remove_file(&out).unwrap();
    data
}

/// qemu-io output of a write expected to fail for want of space.
fn write_refused(uri: &str, cmd: &str) -> String {
    let o = qio_run(uri, &[cmd]);
    let text =
        String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() || text.contains("failed"),
        "{cmd} succeeded on a full device:\n{text}"
    );
    text
}

/// The data device fills: a write gets ENOSPC (qemu-io shows "No space
/// left on device"), what was written before still reads back, FLUSH still
/// works, and once space returns the same write succeeds; the server never
/// exits. (Random data: a pattern would dedup into one block.)
#[test]
fn a_full_data_device_answers_enospc_and_recovers() {
    require_tool("qemu-io");
    require_tool("nbdcopy");
    let pool = TestPool::with_volume("64M");
    let mnt = pool.dir.path().join("data-fs");
    let fs = Tmpfs::new(&mnt, 12 * 1024);
    set_device(&pool, "data", &mnt.join("data"));
    let mut server = pool.serve();
    let uri = server.uri("vol0");
    let tmp = tempfile::tempdir().unwrap();
    let a = write_random(&uri, tmp.path(), 1, 0, 8 * MIB as usize);
    let b = pattern_bytes(2, 16 * MIB as usize);
    let b_file = write_file(tmp.path(), "b", &b);
    let write_b = format!("write -s {} {} {}", b_file.display(), 8 * MIB, b.len());
    let err = write_refused(&uri, &write_b);
    assert!(
        err.contains("No space left on device"),
        "a write to a full data device is not ENOSPC:\n{err}"
    );
    // Reads go on, and FLUSH is answered.
    let all = read_all(&uri, tmp.path(), "full");
    assert!(all[..a.len()] == a[..], "data on a full device");
    qio_ok(&uri, &["flush"]);
    assert!(server.is_running(), "server exited:\n{}", server.log_text());
    // Space returns: the same write succeeds, and everything reads back.
    fs.resize(128 * 1024);
    qio_ok(&uri, &[&write_b, "flush"]);
    let check = |uri: &str, what: &str| {
        let all = read_all(uri, tmp.path(), what);
        assert!(all[..a.len()] == a[..], "{what}: first write");
        assert!(
            all[a.len()..a.len() + b.len()] == b[..],
            "{what}: second write"
        );
    };
    check(&uri, "after space returned");
    // And after a restart, from the journal.
    assert!(server.stop(), "server did not stop cleanly");
    let server = pool.serve();
    check(&server.uri("vol0"), "after a restart");
}

/// A rotation meets a full staging device, then (after the flip) a full
/// data device: each time it waits, `rotate status` says which device is
/// full, foreground reads and writes go on, and it resumes by itself when
/// space returns, to the end (old key destroyed) with every byte intact.
#[test]
fn a_rotation_waits_for_space_on_staging_and_data_and_resumes() {
    require_tool("qemu-io");
    require_tool("nbdcopy");
    let pool = TestPool::with_volume("64M");
    set_toml(
        &pool,
        "rotation",
        &[("grace_secs", "0"), ("batch_blocks", "64")],
    );
    let staging_mnt = pool.dir.path().join("staging-fs");
    let data_mnt = pool.dir.path().join("data-fs");
    let staging_fs = Tmpfs::new(&staging_mnt, 2 * 1024);
    let data_fs = Tmpfs::new(&data_mnt, 64 * 1024);
    set_device(&pool, "staging", &staging_mnt.join("staging"));
    set_device(&pool, "data", &data_mnt.join("data"));
    let server = pool.serve();
    let uri = server.uri("vol0");
    let tmp = tempfile::tempdir().unwrap();
    let a = write_random(&uri, tmp.path(), 1, 0, 16 * MIB as usize);

    // 1. Staging fills up: the window stays open and says why.
    pool.keyturn_ok(&["rotate", "prepare", "--zone", "z1"]);
    let st = wait_status(&pool, "a wait for staging space", 30, |st| {
        waiting(st).contains("staging device is full")
    });
    assert_eq!(st["phase"], "window", "{st}");
    let text = pool.keyturn_ok(&["rotate", "status", "--zone", "z1"]);
    assert!(
        text.contains("waiting for space: the staging device is full"),
        "{text}"
    );
    // Foreground writes are acknowledged (unstaged) and read back.
    let b = write_random(&uri, tmp.path(), 2, 32 * MIB, MIB as usize);
    let all = read_all(&uri, tmp.path(), "while-staging-full");
    assert!(all[..a.len()] == a[..], "data while staging is full");
    assert!(all[32 * MIB as usize..33 * MIB as usize] == b[..]);

    // 2. Space returns: staging resumes and covers the zone.
    staging_fs.resize(64 * 1024);
    let st = wait_status(&pool, "staging to resume and finish", 60, |st| {
        st["staged_blocks"] == st["content_blocks"]
    });
    assert!(st["waiting_for_space"].is_null(), "{st}");

    // 3. The data device fills; after the flip the migrator waits for it.
    data_fs.fill_to(64);
    pool.keyturn_ok(&["rotate", "flip", "--zone", "z1"]);
    let st = wait_status(&pool, "a wait for data space", 30, |st| {
        waiting(st).contains("data device is full")
    });
    assert_eq!(st["phase"], "migrating", "{st}");
    let all = read_all(&uri, tmp.path(), "while-data-full");
    assert!(
        all[..a.len()] == a[..],
        "data while the data device is full"
    );
    assert!(all[32 * MIB as usize..33 * MIB as usize] == b[..]);

    // 4. Space returns: the migration finishes and the old key goes.
    data_fs.resize(128 * 1024);
    let st = wait_status(&pool, "the migration to finish", 60, |st| {
        st["phase"] == "idle"
            && st["keys"]
                .as_array()
                .unwrap()
                .iter()
                .any(|k| k["version"] == 1 && k["state"] == "destroyed")
    });
    assert!(st["waiting_for_space"].is_null(), "{st}");
    let all = read_all(&uri, tmp.path(), "after");
    assert!(all[..a.len()] == a[..], "data after the rotation");
    assert!(all[32 * MIB as usize..33 * MIB as usize] == b[..]);
}

/// The metadata directory (journal, tables, audit log, keys) fills up.
/// What keyturn does: writes go on while the journal's space written ahead
/// lasts; then the journal commit fails and the journal stops
/// (fail-stop: nothing after it could be called durable), so FLUSH and
/// every later write, FUA or not, get EIO, while reads go on and the server
/// stays up. Tables are never sparse, so a full filesystem cannot kill the
/// server with SIGBUS through their mapping (it did). Once space is back,
/// writes stay refused until a restart, which recovers from the journal:
/// every flushed write reads back, writes work again, the audit chain
/// verifies.
#[test]
fn a_full_metadata_directory_stops_writes_not_reads_and_recovers_on_restart() {
    require_tool("qemu-io");
    let dir = tempfile::tempdir().unwrap();
    let meta = Tmpfs::new(&dir.path().join("pool"), 32 * 1024);
    let pass_file = dir.path().join("passphrase");
    let passphrase = "full-metadata-test".to_string();
    std::fs::write(&pass_file, &passphrase).unwrap();
    let pool = TestPool {
        dir,
        pass_file,
        passphrase,
    };
    pool.keyturn_ok(&["init", "--kdf-memory-kib", "8192", "--kdf-iterations", "1"]);
    let devs = pool.dir.path().join("devices");
    std::fs::create_dir(&devs).unwrap();
    set_device(&pool, "data", &devs.join("data"));
    set_device(&pool, "staging", &devs.join("staging"));
    pool.keyturn_ok(&["zone", "create", "z1"]);
    pool.keyturn_ok(&["volume", "create", "--zone", "z1", "--size", "64M", "vol0"]);
    let mut server = pool.serve();
    let uri = server.uri("vol0");
    qio_ok(&uri, &["write -P 0xa1 0 8M", "flush"]);

    meta.fill_to(8);
    // The journal keeps a few MiB written ahead of its frames, so that
    // commits overwrite in place: writes go on until it must grow, and that
    // commit fails. Every write acknowledged until then reads back (FUA,
    // qemu-io's default: acknowledged means durable), here and after the
    // restart. (Random data: a pattern would dedup into one block and
    // hardly grow the journal.)
    let tmp = tempfile::tempdir().unwrap();
    let mut acked: std::collections::BTreeMap<u64, Vec<u8>> = Default::default();
    let mut tries = 0u64;
    let (err, failed) = loop {
        assert!(
            tries < 64,
            "64 writes of 16 MiB were acknowledged on a full metadata directory"
        );
        let data = pattern_bytes(100 + tries, 16 * MIB as usize);
        let file = write_file(tmp.path(), "chunk", &data);
        let at = 8 * MIB + (tries % 3) * 16 * MIB;
        tries += 1;
        let cmd = format!("write -s {} {at} {}", file.display(), data.len());
        let o = qio_run(&uri, &[&cmd]);
        let text =
            String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
        if !o.status.success() || text.contains("failed") {
            break (text, (at, data));
        }
        acked.insert(at, data);
    };
    assert!(err.contains("Input/output error"), "{err}");
    // The refused write's range may read as the last acknowledged data or
    // as the refused write (NBD leaves a failed write's range unspecified),
    // never as anything else; the other ranges read as acknowledged.
    let check_acked = |uri: &str, what: &str| {
        let all = read_all(uri, tmp.path(), what);
        for (&at, data) in &acked {
            let got = &all[at as usize..at as usize + data.len()];
            let ok = got == &data[..] || (at == failed.0 && got == &failed.1[..]);
            assert!(
                ok,
                "{what}: the write acknowledged at {at} does not read back"
            );
        }
    };
    check_acked(&uri, "after the journal failed");
    let o = run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-t",
            "writeback",
            "-c",
            "write -P 0xb3 16M 1M",
            &uri,
        ],
    );
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("write failed"),
        "a write was acknowledged after the journal failed:\n{text}"
    );
    qio_ok(&uri, &["read -P 0xa1 0 8M"]);
    let log = server.log_text();
    assert!(
        log.contains("No space left on device"),
        "the log does not say why:\n{log}"
    );

    // Space returns; writes stay refused (fail-stop) until a restart.
    meta.resize(64 * 1024);
    write_refused(&uri, "write -P 0xb4 16M 1M");
    qio_ok(&uri, &["read -P 0xa1 0 8M"]);
    assert!(server.is_running(), "server exited:\n{}", server.log_text());
    server.stop();

    let server = pool.serve();
    let uri = server.uri("vol0");
    qio_ok(&uri, &["read -P 0xa1 0 8M"]);
    check_acked(&uri, "after the restart");
    qio_ok(&uri, &["write -P 0xc5 8M 8M", "flush"]);
    qio_ok(&uri, &["read -P 0xa1 0 8M", "read -P 0xc5 8M 8M"]);
    let o = pool.keyturn_bare(&["audit", "verify"]);
    assert!(
        o.status.success(),
        "audit chain after a full metadata directory: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}
