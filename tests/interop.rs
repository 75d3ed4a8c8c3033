//! Interoperability with real NBD clients: nbdinfo, qemu-io, qemu-img,
//! nbdcopy and fio's nbd engine, all against the real `keyturn serve`.

mod common;

use common::*;
use serde_json::Value;

const MIB: u64 = 1 << 20;
const SIZE: u64 = 64 * MIB;

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}):\n{text}"))
}

/// The one export in an `nbdinfo --json` document, by name.
fn export<'a>(doc: &'a Value, name: &str) -> &'a Value {
    doc["exports"]
        .as_array()
        .expect("exports array")
        .iter()
        .find(|e| e["export-name"] == name)
        .unwrap_or_else(|| panic!("export {name} not listed:\n{doc:#}"))
}

#[test]
fn nbdinfo_reports_size_block_sizes_and_flags() {
    require_tool("nbdinfo");
    let pool = TestPool::with_volume("64M");
    pool.keyturn_ok(&["volume", "create", "--zone", "z1", "--size", "12M", "small"]);
    let server = pool.serve();

    let doc = json(&run_ok("nbdinfo", &["--json", &server.uri("vol0")]));
    assert_eq!(doc["protocol"], "newstyle-fixed", "{doc:#}");
    assert_eq!(
        doc["structured"], true,
        "structured replies not negotiated: {doc:#}"
    );
    let e = export(&doc, "vol0");
    assert_eq!(e["export-size"].as_u64(), Some(SIZE), "{e:#}");
    assert_eq!(e["block_size_minimum"].as_u64(), Some(1), "{e:#}");
    assert_eq!(e["block_size_preferred"].as_u64(), Some(4096), "{e:#}");
    assert_eq!(e["block_size_maximum"].as_u64(), Some(32 * MIB), "{e:#}");
    for flag in [
        "can_flush",
        "can_fua",
        "can_trim",
        "can_zero",
        "can_multi_conn",
    ] {
        assert_eq!(e[flag], true, "{flag} not advertised: {e:#}");
    }
    assert_eq!(e["is_read_only"], false, "{e:#}");
    let contexts: Vec<&str> = e["contexts"]
        .as_array()
        .expect("contexts")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        contexts.contains(&"base:allocation"),
        "base:allocation missing: {contexts:?}"
    );

    // The listing names every volume, with its own size.
    let list = json(&run_ok(
        "nbdinfo",
        &["--list", "--json", &format!("{}/", server.base)],
    ));
    let names: Vec<&str> = list["exports"]
        .as_array()
        .expect("exports")
        .iter()
        .filter_map(|e| e["export-name"].as_str())
        .collect();
    assert_eq!(names.len(), 2, "expected exactly vol0 and small: {names:?}");
    assert_eq!(export(&list, "vol0")["export-size"].as_u64(), Some(SIZE));
    assert_eq!(
        export(&list, "small")["export-size"].as_u64(),
        Some(12 * MIB)
    );

    // Size through a second client agrees.
    let size = run_ok("nbdinfo", &["--size", &server.uri("small")]);
    assert_eq!(size.trim(), (12 * MIB).to_string());
}

/// One write and the checks around it.
struct Spot {
    offset: u64,
    len: u64,
    pattern: u8,
}

#[test]
fn qemu_io_patterns_at_awkward_offsets_leave_neighbours_untouched() {
    require_tool("qemu-io");
    let pool = TestPool::with_volume("64M");
    let server = pool.serve();
    let uri = server.uri("vol0");
    const BG: u8 = 0x5a;
    let last = SIZE;

    // Background in the two areas used, so neighbours have known content.
    qio_ok(
        &uri,
        &[
            "write -P 0x5a 0 1M",
            &format!("write -P 0x5a {} 1M", last - MIB),
        ],
    );

    let spots = [
        Spot {
            offset: 64 << 10,
            len: 4096,
            pattern: 0x11,
        }, // aligned block
        Spot {
            offset: (128 << 10) + 1536,
            len: 1024,
            pattern: 0x12,
        }, // 512-byte aligned
        Spot {
            offset: 200_007,
            len: 3001,
            pattern: 0x13,
        }, // odd offset and length
        Spot {
            offset: 300_001,
            len: 1,
            pattern: 0x14,
        }, // one byte
        Spot {
            offset: 100 * 4096 - 10,
            len: 20,
            pattern: 0x15,
        }, // spans a 4 KiB boundary
        Spot {
            offset: 8 * 65536 - 3000,
            len: 6000,
            pattern: 0x16,
        }, // spans a 64 KiB boundary
        Spot {
            offset: 700_000,
            len: 3 * 4096 + 77,
            pattern: 0x1b,
        }, // several blocks, unaligned
    ];
    let mut writes: Vec<String> = spots
        .iter()
        .map(|s| format!("write -P {:#x} {} {}", s.pattern, s.offset, s.len))
        .collect();
    // First block then first byte; last block then last byte.
    writes.push("write -P 0x18 0 4096".into());
    writes.push("write -P 0x17 0 1".into());
    writes.push(format!("write -P 0x19 {} 4096", last - 4096));
    writes.push(format!("write -P 0x1a {} 1", last - 1));
    writes.push("flush".into());
    let w: Vec<&str> = writes.iter().map(String::as_str).collect();
    qio_ok(&uri, &w);

    // Read back on a new connection.
    let mut reads = Vec::new();
    for s in &spots {
        reads.push(format!("read -P {:#x} {} {}", s.pattern, s.offset, s.len));
        reads.push(format!("read -P {BG:#x} {} 4096", s.offset - 4096));
        reads.push(format!("read -P {BG:#x} {} 4096", s.offset + s.len));
    }
    reads.push("read -P 0x17 0 1".into());
    reads.push("read -P 0x18 1 4095".into());
    reads.push("read -P 0x5a 4096 4096".into());
    reads.push(format!("read -P 0x1a {} 1", last - 1));
    reads.push(format!("read -P 0x19 {} 4095", last - 4096));
    reads.push(format!("read -P 0x5a {} 4096", last - 8192));
    // Outside the two background areas nothing was written.
    reads.push(format!("read -P 0 {} {}", MIB, last - 2 * MIB));
    let r: Vec<&str> = reads.iter().map(String::as_str).collect();
    let out = qio_ok(&uri, &r);
    assert_eq!(
        out.matches("read ").count(),
        reads.len(),
        "not every read ran:\n{out}"
    );

    // The checks can fail: a wrong pattern is reported.
    let bad = qio_run(&uri, &[&format!("read -P 0x12 {} 1", spots[0].offset)]);
    assert!(
        !bad.status.success(),
        "qemu-io did not report a pattern mismatch"
    );
}

#[test]
fn write_zeroes_and_discard_read_back_as_zeros() {
    require_tool("qemu-io");
    let pool = TestPool::with_volume("64M");
    let server = pool.serve();
    let uri = server.uri("vol0");
    qio_ok(&uri, &["write -P 0x77 0 2M", "flush"]);
    // (command, offset, length)
    let ops: [(&str, u64, u64); 4] = [
        ("write -z", 64 << 10, 64 << 10), // aligned
        ("write -z", 200_001, 10_000),    // unaligned both ends
        ("discard", 512 << 10, 64 << 10), // aligned
        ("discard", 900_003, 9_000),      // unaligned both ends
    ];
    let cmds: Vec<String> = ops
        .iter()
        .map(|(c, o, l)| format!("{c} {o} {l}"))
        .chain(["flush".to_string()])
        .collect();
    qio_ok(&uri, &cmds.iter().map(String::as_str).collect::<Vec<_>>());

    let mut reads = Vec::new();
    for (_, o, l) in ops {
        reads.push(format!("read -P 0 {o} {l}"));
        reads.push(format!("read -P 0x77 {} 4096", o - 4096));
        reads.push(format!("read -P 0x77 {} 4096", o + l));
        // The bytes right at the edges, alone.
        reads.push(format!("read -P 0x77 {} 1", o - 1));
        reads.push(format!("read -P 0x77 {} 1", o + l));
    }
    qio_ok(&uri, &reads.iter().map(String::as_str).collect::<Vec<_>>());
}

/// `nbdinfo --map --json`: (offset, length, type) with type bit 0 = hole, bit 1 = zero.
fn block_map(uri: &str) -> Vec<(u64, u64, u64)> {
    let doc = json(&run_ok("nbdinfo", &["--map", "--json", uri]));
    doc.as_array()
        .expect("map array")
        .iter()
        .map(|e| {
            (
                e["offset"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
                e["type"].as_u64().unwrap(),
            )
        })
        .fold(Vec::new(), |mut acc: Vec<(u64, u64, u64)>, e| {
            // Merge neighbours of the same type (the server may answer in pieces).
            match acc.last_mut() {
                Some(last) if last.2 == e.2 && last.0 + last.1 == e.0 => last.1 += e.1,
                _ => acc.push(e),
            }
            acc
        })
}

#[test]
fn block_status_map_matches_data() {
    require_tool("nbdinfo");
    require_tool("qemu-io");
    let pool = TestPool::with_volume("64M");
    let server = pool.serve();
    let uri = server.uri("vol0");

    // Fresh volume: one hole covering everything.
    assert_eq!(block_map(&uri), vec![(0, SIZE, 3)]);

    let data: [(u64, u64); 4] = [
        (MIB, 4096),
        (10 * MIB + 5, 100),
        (33 * MIB - 2048, 8192),
        (SIZE - 4096, 4096),
    ];
    let mut cmds: Vec<String> = data
        .iter()
        .map(|(o, l)| format!("write -P 0xc3 {o} {l}"))
        .collect();
    // Data written then zeroed must not count as data.
    cmds.push(format!("write -P 0xc3 {} 1M", 20 * MIB));
    cmds.push(format!("write -z {} 1M", 20 * MIB));
    cmds.push(format!("write -P 0xc3 {} 64K", 40 * MIB));
    cmds.push(format!("discard {} 64K", 40 * MIB));
    qio_ok(&uri, &cmds.iter().map(String::as_str).collect::<Vec<_>>());

    let map = block_map(&uri);
    // Contiguous and covering the export.
    let mut at = 0;
    for &(o, l, _) in &map {
        assert_eq!(o, at, "map not contiguous: {map:?}");
        assert!(l > 0);
        at += l;
    }
    assert_eq!(at, SIZE, "map does not cover the export: {map:?}");

    // Every byte of a written range lies in a data (non-hole) extent.
    let covered = |o: u64, l: u64| {
        let mut pos = o;
        while pos < o + l {
            match map
                .iter()
                .find(|&&(mo, ml, t)| t & 1 == 0 && mo <= pos && pos < mo + ml)
            {
                Some(&(mo, ml, _)) => pos = mo + ml,
                None => return false,
            }
        }
        true
    };
    for (o, l) in data {
        assert!(
            covered(o, l),
            "written range {o}+{l} reported as a hole: {map:?}"
        );
    }
    // The map is precise at 4 KiB granularity: zeroed and discarded ranges are holes.
    let data_bytes: u64 = map.iter().filter(|e| e.2 & 1 == 0).map(|e| e.1).sum();
    assert_eq!(
        data_bytes,
        4096 + 4096 + 3 * 4096 + 4096,
        "unexpected amount of data in the map: {map:?}"
    );

    // Every range reported zero really reads as zero (a new connection).
    let mut reads = Vec::new();
    for &(o, l, t) in &map {
        if t & 2 != 0 {
            reads.push(format!("read -P 0 {o} {l}"));
        }
    }
    assert!(reads.len() >= 4, "expected several zero extents: {map:?}");
    qio_ok(&uri, &reads.iter().map(String::as_str).collect::<Vec<_>>());
    // And the data ranges hold the data.
    let reads: Vec<String> = data
        .iter()
        .map(|(o, l)| format!("read -P 0xc3 {o} {l}"))
        .collect();
    qio_ok(&uri, &reads.iter().map(String::as_str).collect::<Vec<_>>());
}

#[test]
fn copy_64mib_round_trip_with_nbdcopy_and_qemu_img() {
    require_tool("nbdcopy");
    require_tool("qemu-img");
    require_tool("qemu-io");
    let pool = TestPool::with_volume("64M");
    let server = pool.serve();
    let uri = server.uri("vol0");
    let tmp = tempfile::tempdir().unwrap();

    let mut data = pattern_bytes(0x5eed, SIZE as usize);
    // Zero runs: whole blocks, unaligned ones, and the tail.
    for (o, l) in [
        (8 * MIB, MIB),
        (20 * MIB + 333, 10_000),
        (30 * MIB, 4096),
        (SIZE - 2 * MIB, 2 * MIB),
    ] {
        data[o as usize..(o + l) as usize].fill(0);
    }
    let src = write_file(tmp.path(), "src.bin", &data);
    // Non-zero junk first, so the zero runs must really be written as zeros.
    qio_ok(&uri, &["write -P 0xee 0 64M"]);

    run_ok("nbdcopy", &[src.to_str().unwrap(), &uri]);
    let out1 = tmp.path().join("out-nbdcopy.bin");
    let out2 = tmp.path().join("out-qemu-img.bin");
    run_ok("nbdcopy", &[&uri, out1.to_str().unwrap()]);
    run_ok(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &uri,
            out2.to_str().unwrap(),
        ],
    );
    for out in [&out1, &out2] {
        let got = std::fs::read(out).unwrap();
        assert_eq!(
            got.len(),
            data.len(),
            "{} has the wrong size",
            out.display()
        );
        if let Some(i) = got.iter().zip(&data).position(|(a, b)| a != b) {
            panic!(
                "{} differs from the source first at byte {i}",
                out.display()
            );
        }
    }
    let sums = run_ok(
        "sha256sum",
        &[
            src.to_str().unwrap(),
            out1.to_str().unwrap(),
            out2.to_str().unwrap(),
        ],
    );
    let hashes: Vec<&str> = sums
        .lines()
        .map(|l| l.split_whitespace().next().unwrap())
        .collect();
    assert_eq!(hashes.len(), 3);
    assert!(
        hashes.iter().all(|h| *h == hashes[0]),
        "sha256 differ:\n{sums}"
    );
}

#[derive(Debug)]
struct FioJob {
    error: i64,
    read_bytes: u64,
    write_bytes: u64,
}

fn fio_jobs(path: &std::path::Path) -> Vec<FioJob> {
    let text = std::fs::read_to_string(path).unwrap();
    // fio may put notes before the JSON document.
    let start = text
        .find('{')
        .unwrap_or_else(|| panic!("no JSON in fio output:\n{text}"));
    let doc = json(&text[start..]);
    doc["jobs"]
        .as_array()
        .expect("jobs")
        .iter()
        .map(|j| FioJob {
            error: j["error"].as_i64().unwrap(),
            read_bytes: j["read"]["io_bytes"].as_u64().unwrap(),
            write_bytes: j["write"]["io_bytes"].as_u64().unwrap(),
        })
        .collect()
}

#[test]
fn fio_parallel_randwrite_verifies_on_a_new_connection() {
    require_tool("fio");
    require_tool("nbdinfo");
    let pool = TestPool::with_volume("64M");
    let server = pool.serve();
    let uri = server.uri("vol0");
    let tmp = tempfile::tempdir().unwrap();
    const JOB: u64 = 8 * MIB;
    const STRIDE: u64 = 16 * MIB;
    let uri_arg = format!("--uri={uri}");
    let size_arg = format!("--size={JOB}");
    let inc_arg = format!("--offset_increment={STRIDE}");
    let fio = |extra: &[&str], out: &std::path::Path| {
        let out_arg = format!("--output={}", out.display());
        let mut args = vec![
            "--name=kt",
            "--ioengine=nbd",
            &uri_arg,
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=32",
            "--numjobs=3",
            &size_arg,
            &inc_arg,
            "--verify=crc32c",
            "--verify_state_save=0",
            "--randrepeat=1",
            "--output-format=json",
            &out_arg,
        ];
        args.extend_from_slice(extra);
        run("fio", &args)
    };

    let w = tmp.path().join("write.json");
    let o = fio(&[], &w);
    assert!(
        o.status.success(),
        "fio write pass failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let jobs = fio_jobs(&w);
    assert_eq!(jobs.len(), 3, "{jobs:?}");
    for j in &jobs {
        assert_eq!(j.error, 0, "{jobs:?}");
        assert_eq!(
            j.write_bytes, JOB,
            "each job writes its whole region: {jobs:?}"
        );
        assert_eq!(
            j.read_bytes, JOB,
            "each job verifies its whole region: {jobs:?}"
        );
    }

    // A second fio process: a new connection, verifying only.
    let v = tmp.path().join("verify.json");
    let o = fio(&["--verify_only=1"], &v);
    assert!(
        o.status.success(),
        "fio verify pass failed: {}\n{}",
        String::from_utf8_lossy(&o.stderr),
        std::fs::read_to_string(&v).unwrap_or_default()
    );
    let jobs = fio_jobs(&v);
    assert_eq!(jobs.len(), 3, "{jobs:?}");
    for j in &jobs {
        assert_eq!(j.error, 0, "{jobs:?}");
        assert_eq!(
            j.read_bytes, JOB,
            "verify pass read the whole region: {jobs:?}"
        );
    }

    // The jobs wrote exactly their regions: fully mapped there, holes elsewhere.
    let map = block_map(&uri);
    let data: Vec<(u64, u64)> = map
        .iter()
        .filter(|e| e.2 & 1 == 0)
        .map(|e| (e.0, e.1))
        .collect();
    let want: Vec<(u64, u64)> = (0..3).map(|i| (i * STRIDE, JOB)).collect();
    assert_eq!(data, want, "data extents after fio: {map:?}");
}

#[test]
fn unix_socket_serves_the_same_volume() {
    require_tool("qemu-io");
    let pool = TestPool::with_volume("64M");
    let sock = pool.dir.path().join("kt.sock");
    let server = pool.serve_with(&["--unix", sock.to_str().unwrap()]);
    let unix_uri = format!("nbd+unix:///vol0?socket={}", sock.display());
    assert_eq!(
        server.unix.as_deref(),
        Some(unix_uri.as_str()),
        "ready line for the Unix socket"
    );
    let tcp = server.uri("vol0");

    qio_ok(
        &unix_uri,
        &["write -P 0x31 4097 12345", "write -P 0x32 8M 1M", "flush"],
    );
    qio_ok(
        &tcp,
        &[
            "read -P 0x31 4097 12345",
            "read -P 0x32 8M 1M",
            "read -P 0 0 4097",
            "write -P 0x33 16M 4096",
        ],
    );
    qio_ok(
        &unix_uri,
        &[
            "read -P 0x33 16M 4096",
            "read -P 0x31 4097 12345",
            "read -P 0 16781312 4096",
        ],
    );
}

/// Two connections write interleaved 1536-byte pieces concurrently (each
/// 4 KiB block is shared by both, and pieces cross block boundaries), so
/// the server's read-modify-write must not lose either side's bytes.
#[test]
fn fio_interleaved_sub_block_writes_from_two_connections() {
    require_tool("fio");
    let pool = TestPool::with_volume("64M");
    let server = pool.serve();
    let uri = server.uri("vol0");
    let tmp = tempfile::tempdir().unwrap();
    const BASE: u64 = 8 * MIB;
    let job = |j: u64, verify_only: bool| {
        let out = tmp.path().join(format!("j{j}-{verify_only}.json"));
        let mut args = vec![
            format!("--name=j{j}"),
            "--ioengine=nbd".into(),
            format!("--uri={uri}"),
            "--rw=write:1536".into(),
            "--bs=1536".into(),
            "--iodepth=32".into(),
            "--size=3M".into(),
            format!("--offset={}", BASE + j * 1536),
            "--verify=crc32c".into(),
            "--verify_state_save=0".into(),
            "--output-format=json".into(),
            format!("--output={}", out.display()),
        ];
        if verify_only {
            args.push("--verify_only=1".into());
        }
        (args, out)
    };
    // Both writers at once.
    let (a0, o0) = job(0, false);
    let (a1, o1) = job(1, false);
    let spawn = |args: &[String]| {
        std::process::Command::new("timeout")
            .arg("120")
            .arg("fio")
            .args(args)
            .output()
            .expect("fio")
    };
    let (r0, r1) = std::thread::scope(|s| {
        let h0 = s.spawn(|| spawn(&a0));
        let h1 = s.spawn(|| spawn(&a1));
        (h0.join().unwrap(), h1.join().unwrap())
    });
    for (r, o) in [(&r0, &o0), (&r1, &o1)] {
        assert!(
            r.status.success(),
            "fio writer failed: {}",
            String::from_utf8_lossy(&r.stderr)
        );
        let jobs = fio_jobs(o);
        assert_eq!(jobs.len(), 1);
        assert_eq!(
            (jobs[0].error, jobs[0].write_bytes),
            (0, 3 * MIB / 2),
            "{jobs:?}"
        );
    }
    // Verify both on new connections, after both finished.
    for j in 0..2 {
        let (a, o) = job(j, true);
        let r = spawn(&a);
        assert!(
            r.status.success(),
            "fio verify of writer {j} failed: {}",
            String::from_utf8_lossy(&r.stderr)
        );
        let jobs = fio_jobs(&o);
        assert_eq!(
            (jobs[0].error, jobs[0].read_bytes),
            (0, 3 * MIB / 2),
            "{jobs:?}"
        );
    }
    // Nothing outside the interleaved area.
    qio_ok(
        &uri,
        &[
            &format!("read -P 0 0 {BASE}"),
            &format!("read -P 0 {} 1M", BASE + 3 * MIB + 1536),
        ],
    );
}

/// The O_DIRECT path (the `nvme-server` profile) stores what it is given:
/// fio writes and verifies through it, then a server on the buffered
/// default profile verifies the same data on a new connection.
#[test]
fn o_direct_profile_round_trips_with_buffered_profile() {
    require_tool("fio");
    let pool = TestPool::with_volume("64M");
    let tmp = tempfile::tempdir().unwrap();
    let fio = |uri: &str, extra: &[&str], out: &std::path::Path| {
        let uri_arg = format!("--uri={uri}");
        let out_arg = format!("--output={}", out.display());
        let mut args = vec![
            "--name=direct",
            "--ioengine=nbd",
            &uri_arg,
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=32",
            "--size=16M",
            "--verify=crc32c",
            "--verify_state_save=0",
            "--randrepeat=1",
            "--output-format=json",
            &out_arg,
        ];
        args.extend_from_slice(extra);
        let o = run("fio", &args);
        assert!(
            o.status.success(),
            "fio failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        fio_jobs(out)
    };

    let mut direct = pool.serve_with(&["--profile", "nvme-server"]);
    let jobs = fio(&direct.uri("vol0"), &[], &tmp.path().join("w.json"));
    assert_eq!(
        (jobs[0].error, jobs[0].write_bytes, jobs[0].read_bytes),
        (0, 16 * MIB, 16 * MIB),
        "{jobs:?}"
    );
    assert!(direct.stop(), "clean stop");
    let log = strip_ansi_codes(&direct.log_text());
    assert!(
        log.contains("data device open") && log.contains("direct=true"),
        "the nvme-server profile should open the data device with O_DIRECT here:\n{log}"
    );

    let buffered = pool.serve();
    let jobs = fio(
        &buffered.uri("vol0"),
        &["--verify_only=1"],
        &tmp.path().join("v.json"),
    );
    assert_eq!(
        (jobs[0].error, jobs[0].read_bytes),
        (0, 16 * MIB),
        "{jobs:?}"
    );
}
