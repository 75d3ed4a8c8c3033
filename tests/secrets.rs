//! No key bytes and no passphrase in any log line, error message, command
//! output or pool file, across the key life cycle at trace-level logging.

mod common;

use base64ct::{Base64, Encoding};
use common::*;
use keyturn::keys::passphrase::Passphrase;
use keyturn::keys::root::RootKeyProvider;
use keyturn::keys::sealed::SealedFileProvider;
use keyturn::keys::zone_keys::ZoneKeyFile;

/// Every key of every zone that still has material, unwrapped the way the
/// server does it (the test knows the passphrase).
fn raw_keys(pool: &TestPool, zones: u32) -> Vec<(String, Vec<u8>)> {
    let pass = Passphrase::new(pool.passphrase.clone()).unwrap();
    let root = SealedFileProvider::open(&pool.path().join("keys/root.sealed"), &pass).unwrap();
    let mut out = Vec::new();
    for z in 1..=zones {
        let file = ZoneKeyFile::load(&pool.path().join(format!("keys/zone-{z}.json"))).unwrap();
        for r in file.records() {
            let Some(wrapped) = &r.wrapped else { continue };
            let bytes = match r.wrapped_by_kek {
                None => root.unwrap_key(&r.label(), wrapped).unwrap().to_vec(),
                Some(_) => {
                    let ring = file.unlock(&root).unwrap();
                    match r.purpose.as_str() {
                        "dek" => ring
                            .dek(keyturn::ids::KeyVersion(r.version))
                            .unwrap()
                            .expose()
                            .to_vec(),
                        _ => ring.mac_key().expose().to_vec(),
                    }
                }
            };
            out.push((r.id.clone(), bytes));
        }
    }
    out
}

fn needles(keys: &[(String, Vec<u8>)], passphrase: &str) -> Vec<(String, Vec<u8>)> {
    let mut n = vec![("passphrase".to_string(), passphrase.as_bytes().to_vec())];
    for (id, k) in keys {
        let hex: String = k.iter().map(|b| format!("{b:02x}")).collect();
        n.push((format!("{id} hex"), hex.as_bytes().to_vec()));
        n.push((format!("{id} HEX"), hex.to_uppercase().into_bytes()));
        n.push((
            format!("{id} base64"),
            Base64::encode_string(k).into_bytes(),
        ));
        // Halves and windows too: an XTS half or a prefix printed alone.
        for w in k.chunks(16) {
            let hex: String = w.iter().map(|b| format!("{b:02x}")).collect();
            n.push((format!("{id} 16-byte window hex"), hex.into_bytes()));
        }
        n.push((format!("{id} raw"), k.clone()));
    }
    n
}

fn find(hay: &[u8], needle: &[u8]) -> bool {
    needle.len() <= hay.len() && hay.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn no_key_bytes_or_passphrase_in_logs_errors_or_files() {
    require_tool("qemu-io");
    let pool = TestPool::new();
    let mut texts: Vec<(String, Vec<u8>)> = Vec::new();
    fn keep(texts: &mut Vec<(String, Vec<u8>)>, what: &str, out: &std::process::Output) {
        texts.push((format!("{what} stdout"), out.stdout.clone()));
        texts.push((format!("{what} stderr"), out.stderr.clone()));
    }
    let trace = |args: &[&str]| {
        let mut full = vec!["--log", "trace"];
        full.extend_from_slice(args);
        pool.keyturn(&full)
    };
    for args in [
        &["zone", "create", "z1"][..],
        &["zone", "create", "z2"],
        &["volume", "create", "--zone", "z1", "--size", "16M", "vol0"],
        &["keys", "list"],
        &["keys", "list", "--json"],
        &["keys", "show", "z1-dek-v1"],
    ] {
        let out = trace(args);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        keep(&mut texts, &args.join(" "), &out);
    }
    // Keys as they are before the KEK rotation destroys KEK v1.
    let mut keys = raw_keys(&pool, 2);

    let mut server = pool.serve_with(&["--log", "trace"]);
    qio_ok(
        &server.uri("vol0"),
        &["write -P 0x33 0 1M", "flush", "read -P 0x33 0 1M"],
    );
    assert!(server.stop());
    texts.push(("server log".into(), std::fs::read(&server.log).unwrap()));

    let out = trace(&["keys", "rotate-kek", "--zone", "z1"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    keep(&mut texts, "rotate-kek", &out);
    keys.extend(raw_keys(&pool, 2));

    // A root key rotation (it re-wraps the same KEKs: no new zone keys), at
    // trace level; from here the pool opens with the new passphrase, which
    // joins the secrets.
    let new_pass = format!("new-root-pass-{}", std::process::id());
    let new_pass_file = write_file(pool.dir.path(), "new-passphrase", new_pass.as_bytes());
    let out = trace(&[
        "keys",
        "rotate-root",
        "--new-passphrase-file",
        new_pass_file.to_str().unwrap(),
        "--batch",
        "1",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    keep(&mut texts, "rotate-root", &out);
    let out = trace(&["keys", "list"]);
    assert!(!out.status.success(), "the old passphrase is refused");
    keep(&mut texts, "old passphrase after rotate-root", &out);
    std::fs::write(&pool.pass_file, &new_pass).unwrap();
    let out = trace(&["keys", "list", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    keep(&mut texts, "keys list after rotate-root", &out);

    // Errors: a wrong passphrase, a bad key id, an illegal request.
    let wrong = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(wrong.path(), "not-the-passphrase").unwrap();
    let out = std::process::Command::new(keyturn_bin())
        .args(["--log", "trace", "keys", "list", "--pool"])
        .arg(pool.path())
        .arg("--passphrase-file")
        .arg(wrong.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("wrong passphrase"));
    keep(&mut texts, "wrong passphrase", &out);
    let out = trace(&["keys", "show", "z1-dek-v9"]);
    assert!(!out.status.success());
    keep(&mut texts, "unknown key", &out);

    // Through the running server at trace level: a passphrase change, whose
    // passphrases travel in the body of a request to the admin API.
    let third_pass = format!("third-root-pass-{}", std::process::id());
    let third_file = write_file(pool.dir.path(), "third-passphrase", third_pass.as_bytes());
    let mut server = pool.serve_with(&["--log", "trace"]);
    let out = trace(&[
        "keys",
        "change-passphrase",
        "--new-passphrase-file",
        third_file.to_str().unwrap(),
    ]);
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("through the server"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    keep(&mut texts, "change-passphrase through the server", &out);
    assert!(server.stop());
    let log = std::fs::read(&server.log).unwrap();
    assert!(
        String::from_utf8_lossy(&log).contains("/api/v1/root/passphrase"),
        "the request is in the trace"
    );
    texts.push(("server log, online passphrase change".into(), log));

    for f in all_files(&pool.path()) {
        texts.push((f.display().to_string(), std::fs::read(&f).unwrap()));
    }
    let mut needles = needles(&keys, &pool.passphrase);
    needles.push(("new passphrase".into(), new_pass.as_bytes().to_vec()));
    needles.push(("third passphrase".into(), third_pass.as_bytes().to_vec()));
    assert!(
        keys.len() >= 7,
        "KEKs v1 and v2, DEKs and MAC keys of two zones: {}",
        keys.len()
    );
    // The scan can fail: the needles are found where they are known to be.
    let probe = needles.iter().find(|(n, _)| n.ends_with("base64")).unwrap();
    assert!(find(
        format!("xx{}yy", String::from_utf8_lossy(&probe.1)).as_bytes(),
        &probe.1
    ));

    // One pass per text for all needles (the data file alone is hundreds of MiB).
    let searched: Vec<&(String, Vec<u8>)> = needles.iter().filter(|(_, n)| n.len() >= 16).collect();
    let ac = aho_corasick::AhoCorasick::new(searched.iter().map(|(_, n)| n)).unwrap();
    let mut hits = Vec::new();
    for (what, hay) in &texts {
        for m in ac.find_overlapping_iter(hay.as_slice()) {
            hits.push(format!(
                "{} found in {what}",
                searched[m.pattern().as_usize()].0
            ));
        }
    }
    assert!(hits.is_empty(), "secrets leaked:\n{}", hits.join("\n"));
    let trace_lines: usize = texts
        .iter()
        .map(|(_, t)| t.iter().filter(|&&b| b == b'\n').count())
        .sum();
    assert!(
        trace_lines > 100,
        "trace logging produced output to scan ({trace_lines} lines)"
    );
}
