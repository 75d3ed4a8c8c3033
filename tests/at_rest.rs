//! Data at rest: nothing a client wrote, and not the passphrase, appears in
//! any pool file or log; tampered ciphertext is refused, not returned.

mod common;

use std::path::PathBuf;

use common::*;

const MIB: usize = 1 << 20;

/// A 64-byte ASCII marker, distinctive enough never to occur by chance.
const MARKER: &[u8; 64] = b"<<KEYTURN-AT-REST-MARKER: this must never be stored in clear!!>>";

/// Every file a pool and its server leave behind: the whole pool directory
/// (data, staging, journal, tables, keys, catalog, config) and the logs.
fn files_at_rest(pool: &TestPool) -> Vec<PathBuf> {
    let mut files = all_files(&pool.path());
    for e in std::fs::read_dir(pool.dir.path()).unwrap().flatten() {
        let p = e.path();
        if p.file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("server-")
        {
            files.push(p);
        }
    }
    files
}

/// (file, needle name, offset) for every hit.
fn scan(files: &[PathBuf], needles: &[(String, Vec<u8>)]) -> Vec<(PathBuf, String, usize)> {
    let mut hits = Vec::new();
    for f in files {
        let mut data =
            std::fs::read(f).unwrap_or_else(|e| panic!("cannot read {}: {e}", f.display()));
        // Sparse device files end in zeros; no needle is all zeros, so the
        // scan can stop a needle's length after the last non-zero byte.
        let end = data.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
        data.truncate((end + 4096).min(data.len()));
        for (name, n) in needles {
            for at in find_bytes(&data, n) {
                hits.push((f.clone(), name.clone(), at));
            }
        }
    }
    hits
}

fn nonzero_blocks(data: &[u8]) -> Vec<usize> {
    static ZERO: [u8; 4096] = [0; 4096];
    data.chunks(4096)
        .enumerate()
        .filter(|(_, c)| *c != &ZERO[..c.len()])
        .map(|(i, _)| i)
        .collect()
}

#[test]
fn no_plaintext_and_no_passphrase_at_rest() {
    require_tool("qemu-io");
    require_tool("qemu-img");
    let pool = TestPool::with_volume("64M");
    let tmp = tempfile::tempdir().unwrap();
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    let marker_data: Vec<u8> = MARKER.iter().copied().cycle().take(8 * MIB).collect();
    let random = pattern_bytes(seed, MIB);
    let mfile = write_file(tmp.path(), "marker.bin", &marker_data);
    let rfile = write_file(tmp.path(), "random.bin", &random);

    let mut server = pool.serve();
    let uri = server.uri("vol0");
    let (m, r) = (mfile.display(), rfile.display());
    qio_ok(
        &uri,
        &[
            &format!("write -s {m} 0 8M"),
            &format!("write -s {r} 8M 1M"),
            // Unaligned writes go through read-modify-write.
            &format!("write -s {m} {} 10000", 20 * MIB + 123),
            &format!("write -s {r} {} 5000", 30 * MIB + 4000),
            // FUA as well as FLUSH.
            &format!("write -f -s {r} {} 4096", 40 * MIB),
            "flush",
        ],
    );
    assert!(server.stop(), "serve did not exit cleanly");

    // Read back through a fresh server: the data is there (so a pass below
    // is not because nothing was stored).
    let server = pool.serve();
    let out = tmp.path().join("back.bin");
    run_ok(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &server.uri("vol0"),
            out.to_str().unwrap(),
        ],
    );
    drop(server);
    let back = std::fs::read(&out).unwrap();
    assert!(
        back[..8 * MIB] == marker_data[..],
        "marker region reads back wrong"
    );
    assert!(
        back[8 * MIB..9 * MIB] == random[..],
        "random region reads back wrong"
    );
    assert!(back[20 * MIB + 123..20 * MIB + 10123] == marker_data[..10000]);
    assert!(back[30 * MIB + 4000..30 * MIB + 9000] == random[..5000]);
    assert!(back[40 * MIB..40 * MIB + 4096] == random[..4096]);

    let mut needles: Vec<(String, Vec<u8>)> = vec![
        ("marker".into(), MARKER.to_vec()),
        ("marker 16-byte piece".into(), MARKER[16..32].to_vec()),
        ("passphrase".into(), pool.passphrase.as_bytes().to_vec()),
    ];
    for i in 0..8 {
        let at = i * (MIB / 8) + 1000 + i * 37;
        needles.push((
            format!("random window at {at}"),
            random[at..at + 32].to_vec(),
        ));
    }
    assert!(
        needles.iter().all(|(_, n)| n.iter().any(|&b| b != 0)),
        "a needle is all zeros"
    );

    // The scanner works: it finds each needle in the files written in clear.
    let pass_file = vec![pool.pass_file.clone()];
    assert!(
        scan(&pass_file, &needles[2..3]).len() == 1,
        "scanner misses the passphrase in its own file"
    );
    let clear = scan(&[mfile.clone(), rfile.clone()], &needles);
    for (name, _) in needles.iter().filter(|(n, _)| n != "passphrase") {
        assert!(
            clear.iter().any(|h| &h.1 == name),
            "scanner misses {name} in the clear files"
        );
    }

    let files = files_at_rest(&pool);
    let names: Vec<String> = files
        .iter()
        .map(|f| {
            f.strip_prefix(pool.dir.path())
                .unwrap()
                .display()
                .to_string()
        })
        .collect();
    for must in [
        "pool/data",
        "pool/journal",
        "pool/catalog.json",
        "pool/keys/root.sealed",
        "pool/pool.toml",
    ] {
        assert!(
            names.iter().any(|n| n == must),
            "{must} not scanned: {names:?}"
        );
    }
    assert!(
        names.iter().any(|n| n.starts_with("pool/tables/")),
        "no tables scanned: {names:?}"
    );
    assert!(
        names.iter().filter(|n| n.starts_with("server-")).count() >= 2,
        "server logs not scanned: {names:?}"
    );
    // Ciphertext really is on the data device: the 1 MiB of random data at
    // least (256 distinct blocks) plus the marker block(s).
    let data = std::fs::read(pool.path().join("data")).unwrap();
    let used = nonzero_blocks(&data).len();
    assert!(used > 256, "only {used} non-zero blocks on the data device");

    let hits = scan(&files, &needles);
    assert!(
        hits.is_empty(),
        "plaintext or passphrase found at rest: {hits:?}"
    );
}

/// Parses qemu-io output: (reads that succeeded, I/O errors, pattern mismatches).
fn read_outcomes(out: &std::process::Output) -> (usize, usize, usize) {
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let ok = text
        .lines()
        .filter(|l| l.starts_with("read ") && l.contains(" bytes at offset "))
        .count();
    let eio = text
        .lines()
        .filter(|l| l.contains("read failed") && l.contains("Input/output error"))
        .count();
    let bad = text
        .lines()
        .filter(|l| l.contains("Pattern verification failed"))
        .count();
    (ok, eio, bad)
}

fn pattern_reads(blocks: usize) -> Vec<String> {
    (0..blocks)
        .map(|i| format!("read -P {:#x} {} 4096", i + 1, i * 4096))
        .collect()
}

#[test]
fn tampered_ciphertext_is_an_io_error_not_wrong_data() {
    require_tool("qemu-io");
    require_tool("nbdcopy");
    let pool = TestPool::with_volume("64M");
    const BLOCKS: usize = 64;
    let mut server = pool.serve();
    let uri = server.uri("vol0");
    // Block i holds the byte i+1: every block distinct (no sharing), and
    // each can be checked with read -P.
    let writes: Vec<String> = (0..BLOCKS)
        .map(|i| format!("write -P {:#x} {} 4096", i + 1, i * 4096))
        .collect();
    let mut cmds: Vec<&str> = writes.iter().map(String::as_str).collect();
    cmds.push("flush");
    qio_ok(&uri, &cmds);
    assert!(server.stop());

    let data_path = pool.path().join("data");
    let mut data = std::fs::read(&data_path).unwrap();
    let used = nonzero_blocks(&data);
    assert_eq!(
        used.len(),
        BLOCKS,
        "expected one data slot per distinct block"
    );
    let slot = used[used.len() / 2];
    data[slot * 4096 + 1000] ^= 0x01;
    std::fs::write(&data_path, &data).unwrap();

    let server = pool.serve();
    let uri = server.uri("vol0");
    let reads = pattern_reads(BLOCKS);
    let out = qio_run(&uri, &reads.iter().map(String::as_str).collect::<Vec<_>>());
    let (ok, eio, bad) = read_outcomes(&out);
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        bad, 0,
        "tampered ciphertext was returned as (wrong) data:\n{text}"
    );
    assert_eq!(
        eio, 1,
        "expected exactly one block to fail with an I/O error:\n{text}"
    );
    assert_eq!(
        ok,
        BLOCKS - 1,
        "every other block must read correctly:\n{text}"
    );
    assert!(!out.status.success());

    // Which block: it fails again on a new connection, and a bulk copy fails too.
    let good: Vec<usize> = text
        .lines()
        .filter_map(|l| l.strip_prefix("read 4096/4096 bytes at offset "))
        .map(|o| o.trim().parse::<usize>().unwrap() / 4096)
        .collect();
    let bad_lba = (0..BLOCKS)
        .find(|i| !good.contains(i))
        .expect("no failed block");
    let again = qio_run(
        &uri,
        &[&format!(
            "read -P {:#x} {} 4096",
            bad_lba + 1,
            bad_lba * 4096
        )],
    );
    assert_eq!(
        read_outcomes(&again),
        (0, 1, 0),
        "block {bad_lba} does not fail again"
    );
    let one = qio_run(&uri, &[&format!("read {} 1", bad_lba * 4096 + 4095)]);
    assert!(
        !one.status.success(),
        "a 1-byte read of the tampered block succeeded"
    );
    let tmp = tempfile::tempdir().unwrap();
    let copy = run(
        "nbdcopy",
        &[&uri, tmp.path().join("copy.bin").to_str().unwrap()],
    );
    assert!(
        !copy.status.success(),
        "nbdcopy read the whole volume without an error"
    );

    // The server stays up and logs the failure without data.
    let mut server = server;
    assert!(server.is_running());
    let log = strip_ansi_codes(&server.log_text());
    assert!(
        log.lines().any(|l| l.contains("ERROR")),
        "no error logged for the integrity failure:\n{log}"
    );

    // Writing the same content elsewhere must not share the damaged copy
    // (dedup), and rewriting the block with its own content repairs it.
    let pat = bad_lba + 1;
    let elsewhere = 32 << 20;
    qio_ok(
        &uri,
        &[
            &format!("write -P {pat:#x} {elsewhere} 4096"),
            &format!("read -P {pat:#x} {elsewhere} 4096"),
        ],
    );
    qio_ok(
        &uri,
        &[&format!("write -P {pat:#x} {} 4096", bad_lba * 4096)],
    );
    let reads = pattern_reads(BLOCKS);
    qio_ok(&uri, &reads.iter().map(String::as_str).collect::<Vec<_>>());
}
