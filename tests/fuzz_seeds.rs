//! The fuzz targets' seed corpora (`fuzz/corpus/TARGET/seed-*`), made by
//! keyturn's own encoders: a real journal, real checkpoint tables, a real
//! audit log, policies and configs as keyturn writes them, and NBD client
//! transcripts built from the protocol's constants.
//!
//! The test fails when a checked-in seed differs from what the encoders
//! make today (an on-disk format changed: the seeds would no longer reach
//! the decoders' happy paths). `KEYTURN_WRITE_SEEDS=1` rewrites them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use keyturn::audit::{AuditEvent, AuditLog, Clock};
use keyturn::config::PoolConfig;
use keyturn::crypto::tag::Tag;
use keyturn::ids::{Cbid, JournalSeq, KeyVersion, Lba, Slot, VolumeId, ZoneId};
use keyturn::nbd::proto::*;
use keyturn::schedule::policy::{Policies, Policy};
use keyturn::store::journal::{
    CbRecord, CheckpointJournal, CommitHooks, Entry, Journal, JournalConfig, JournalError,
    StagedCopy,
};
use keyturn::zone::{VolumeMap, ZoneMeta};

type Seeds = BTreeMap<(&'static str, String), Vec<u8>>;

fn record(i: u64, mac: u32, staged: bool) -> CbRecord {
    CbRecord {
        slot: Slot(i * 3),
        key_version: KeyVersion(1),
        refcount: 1 + (i % 2) as u32,
        tag: Tag([i as u8; 32]),
        mac,
        staged: staged.then_some(StagedCopy {
            slot: Slot(i),
            key_version: KeyVersion(2),
        }),
    }
}

fn entries(i: u64) -> Vec<Entry> {
    vec![
        Entry::Cb {
            zone: ZoneId(1),
            cbid: Cbid(i),
            record: record(i, 1 + (i % 2) as u32, i.is_multiple_of(3)),
        },
        Entry::Map {
            volume: VolumeId(1),
            lba: Lba(i),
            cbid: Some(Cbid(i)),
        },
        Entry::Map {
            volume: VolumeId(1),
            lba: Lba(i + 100),
            cbid: None,
        },
        Entry::CbFree {
            zone: ZoneId(1),
            cbid: Cbid(i + 50),
        },
        Entry::Flip {
            zone: ZoneId(1),
            to: KeyVersion(2),
        },
        Entry::Rollback {
            zone: ZoneId(1),
            to: KeyVersion(1),
        },
        Entry::Applied {
            zone: ZoneId(1),
            seq: i,
        },
    ]
}

struct Hooks;

impl CommitHooks for Hooks {
    fn sync_data(&self) -> Result<(), std::io::Error> {
        Ok(())
    }
    fn durable(&self, _: JournalSeq) {}
    fn checkpoint(&self, j: &mut dyn CheckpointJournal) -> Result<JournalSeq, JournalError> {
        let seq = j.last_appended();
        j.flush_through(seq)?;
        Ok(seq)
    }
}

fn journal_seeds(dir: &Path, out: &mut Seeds) {
    let path = dir.join("journal");
    Journal::create(&path).unwrap();
    out.insert(("journal", "empty".into()), std::fs::read(&path).unwrap());
    let config = JournalConfig {
        commit_interval: Duration::from_millis(1),
        commit_bytes: 1 << 20,
        checkpoint_bytes: 1 << 30,
    };
    let j = Journal::start(&path, JournalSeq(0), config, Arc::new(Hooks)).unwrap();
    let mut last = JournalSeq(0);
    for i in 1..=4 {
        last = j.append(ZoneId(1), &entries(i));
    }
    j.commit_blocking(last).unwrap();
    // A frame written ahead (bit 63 of its sequence field).
    let flip = j.append_ahead(
        ZoneId(2),
        &[Entry::Flip {
            zone: ZoneId(2),
            to: KeyVersion(3),
        }],
    );
    j.commit_ahead(flip).unwrap();
    j.close();
    drop(j);
    let mut bytes = std::fs::read(&path).unwrap();
    assert_eq!(Journal::read(&path).unwrap().frames.len(), 5);
    // The journal is grown megabytes ahead with zeros; a seed needs none
    // of them: it ends after its five frames (8 KiB of header slots, then
    // each frame's 24-byte header and payload).
    let mut end = 8192;
    for _ in 0..5 {
        let len = u32::from_le_bytes(bytes[end..end + 4].try_into().unwrap()) as usize;
        end += 24 + len;
    }
    bytes.truncate(end);
    out.insert(("journal", "frames".into()), bytes);
    let mut payload = Vec::new();
    for e in entries(9) {
        e.encode(&mut payload);
    }
    out.insert(("journal", "payload".into()), payload);
}

fn table_seeds(dir: &Path, out: &mut Seeds) {
    let cb_path = dir.join("cb.tbl");
    let map_path = dir.join("map.tbl");
    let mut meta = ZoneMeta::open(&cb_path, true).unwrap();
    let mut map = VolumeMap::open(&map_path, 64, true).unwrap();
    for i in 1..6 {
        meta.set_cb(
            Cbid(i),
            Some(record(i, 1 + (i % 2) as u32, i % 2 == 0)),
            JournalSeq(i),
        );
        map.set(Lba(i * 7), Some(Cbid(i)), JournalSeq(i));
    }
    meta.volumes.insert(VolumeId(1), map);
    // The pool's checkpoint, step by step.
    let run = meta.begin_checkpoint(JournalSeq(9));
    assert!(meta.copy_checkpoint(usize::MAX).unwrap());
    for t in meta.finish_checkpoint(run) {
        t.sync().unwrap();
    }
    drop(meta);
    // The content-block table is sparse to 1024 records: the seed keeps
    // the part that holds data.
    let cb = std::fs::read(&cb_path).unwrap();
    out.insert(("table", "cb".into()), cb[..4096 + 64 * 8].to_vec());
    out.insert(("table", "map".into()), std::fs::read(&map_path).unwrap());
}

struct FixedClock;

impl Clock for FixedClock {
    fn now(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(1_700_000_000_123)
    }
}

fn audit_seeds(dir: &Path, out: &mut Seeds) {
    let pool = dir.join("pool");
    std::fs::create_dir(&pool).unwrap();
    AuditLog::create_or_open(&pool).unwrap();
    let log = AuditLog::open_with_clock(&pool, Arc::new(FixedClock)).unwrap();
    log.append(AuditEvent::ok("zone.create").zone("z1").count(3))
        .unwrap();
    log.append(AuditEvent::refused("kek.rotate", &"one approval of two").zone("z1"))
        .unwrap();
    log.append(AuditEvent::ok("volume.create").zone("z1").volume("v0"))
        .unwrap();
    drop(log);
    let mut seed = std::fs::read(pool.join("audit.log")).unwrap();
    seed.push(0);
    seed.extend(std::fs::read(pool.join("audit.head")).unwrap());
    out.insert(("audit_log", "chain".into()), seed);
}

fn config_seeds(out: &mut Seeds) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let mut base = String::from(
        "format = 2\ndata = \"data\"\nstaging = \"staging\"\n\n[root_key]\nprovider = \"sealed-file\"\npath = \"keys/root.sealed\"\n",
    );
    let config: PoolConfig = toml::from_str(&base).unwrap();
    out.insert(
        ("pool_config", "written".into()),
        config.to_toml().into_bytes(),
    );
    // README's [tls] and [[access]] example, after the minimal pool.
    let at = readme.find("[tls]\n").expect("README documents [tls]");
    let end = at + readme[at..].find("```").unwrap();
    base.push('\n');
    base.push_str(&readme[at..end]);
    toml::from_str::<PoolConfig>(&base).expect("README's example parses");
    out.insert(("pool_config", "tls-access".into()), base.into_bytes());
    for p in ["ci-2core", "nvme-server"] {
        let text = std::fs::read(root.join("hw-profiles").join(format!("{p}.toml"))).unwrap();
        out.insert(("pool_config", format!("profile-{p}")), text);
    }
}

fn policy_seeds(out: &mut Seeds) {
    let mut p = Policies::default();
    let mut hot = Policy::from_preset("30d").unwrap();
    hot.window.days.truncate(2);
    p.zones.insert("z1".into(), hot);
    out.insert(("policy", "zones".into()), serde_json::to_vec(&p).unwrap());
    out.insert(
        ("policy", "default".into()),
        serde_json::to_vec_pretty(&Policies::default()).unwrap(),
    );
}

/// One admin body per route, in `keyturn::fuzzing::admin_body`'s order.
fn admin_seeds(out: &mut Seeds) {
    let policy = serde_json::to_string(&Policy::from_preset("90d").unwrap()).unwrap();
    let bodies: [&str; 21] = [
        r#"{"approvals":["a1"]}"#,
        r#"{"zone":"z1","at_unix":1900000000}"#,
        r#"{"zone":"z1"}"#,
        r#"{"zone":"z1","reason":"leak","approvals":[]}"#,
        r#"{"zone":"z1","dry_run":true}"#,
        r#"{"approvals":[],"passphrase":"old secret","new_passphrase":"new secret"}"#,
        r#"{"passphrase":"old secret","new_passphrase":"new secret","kdf_memory_kib":65536}"#,
        r#"{"at_unix":1900000000,"window_secs":3600}"#,
        r#"{"reason":"compromise","approvals":["a1","a2"]}"#,
        r#"{"approvals":[]}"#,
        &policy,
        r#"{"zone":"z1","level":"elevated","reason":"advisory"}"#,
        r#"{"zone":"z1","approvals":["a","b"]}"#,
        r#"{"name":"r1","public_key":"00","from_unix":0,"to_unix":1900000000}"#,
        r#"{"name":"r1"}"#,
        r#"{"key_id":"k1","set":1,"window":2}"#,
        r#"{"name":"ops","role":"operator"}"#,
        r#"{"name":"z2","dedup":false}"#,
        r#"{"on":true}"#,
        r#"{"name":"v1","zone":"z1","size":1073741824}"#,
        "from=2030-01-01&to=2030-02-01",
    ];
    for (i, b) in bodies.iter().enumerate() {
        let mut seed = vec![i as u8];
        seed.extend_from_slice(b.as_bytes());
        out.insert(("admin_body", format!("route-{i:02}")), seed);
    }
}

fn option(out: &mut Vec<u8>, code: u32, payload: &[u8]) {
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&code.to_be_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
}

fn string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn request(out: &mut Vec<u8>, flags: u16, kind: u16, cookie: u64, offset: u64, len: u32) {
    out.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
    out.extend_from_slice(&offset.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
}

fn nbd_seeds(out: &mut Seeds) {
    let flags = (FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes();
    // nbdinfo --list: LIST, then ABORT.
    let mut list = flags.to_vec();
    option(&mut list, OPT_LIST, &[]);
    option(&mut list, OPT_ABORT, &[]);
    out.insert(("nbd_session", "list".into()), list);
    // qemu-io style: structured replies, base:allocation, GO, then requests.
    let mut go = flags.to_vec();
    option(&mut go, OPT_STRUCTURED_REPLY, &[]);
    let mut meta = Vec::new();
    string(&mut meta, "vol0");
    meta.extend_from_slice(&1u32.to_be_bytes());
    string(&mut meta, "base:allocation");
    option(&mut go, OPT_SET_META_CONTEXT, &meta);
    let mut info = Vec::new();
    string(&mut info, "vol0");
    info.extend_from_slice(&2u16.to_be_bytes());
    info.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    info.extend_from_slice(&INFO_DESCRIPTION.to_be_bytes());
    option(&mut go, OPT_INFO, &info);
    option(&mut go, OPT_GO, &info);
    let mut session = go.clone();
    request(&mut session, CMD_FLAG_FUA, CMD_WRITE, 1, 4096, 4096);
    session.extend(std::iter::repeat_n(0xab, 4096));
    request(&mut session, CMD_FLAG_DF, CMD_READ, 2, 4096, 4096);
    request(&mut session, 0, CMD_BLOCK_STATUS, 3, 0, 65536);
    request(
        &mut session,
        CMD_FLAG_NO_HOLE,
        CMD_WRITE_ZEROES,
        4,
        8192,
        8192,
    );
    request(&mut session, 0, CMD_TRIM, 5, 0, 4096);
    request(&mut session, 0, CMD_CACHE, 6, 0, 4096);
    request(&mut session, 0, CMD_FLUSH, 7, 0, 0);
    request(&mut session, 0, CMD_DISC, 8, 0, 0);
    out.insert(("nbd_session", "go-io".into()), session);
    // The old style: EXPORT_NAME, then a read past the end.
    let mut old = FLAG_C_FIXED_NEWSTYLE.to_be_bytes().to_vec();
    option(&mut old, OPT_EXPORT_NAME, b"vol0");
    request(&mut old, 0, CMD_READ, 1, 0, 512);
    request(&mut old, 0, CMD_READ, 2, u64::MAX - 10, 512);
    out.insert(("nbd_session", "export-name".into()), old);
    out.insert(("nbd_session", "starttls".into()), {
        let mut s = flags.to_vec();
        option(&mut s, OPT_STARTTLS, &[]);
        option(&mut s, OPT_LIST_META_CONTEXT, &meta);
        s
    });
    // nbd_codec: [selector][input], see its target.
    let mut opt = vec![1u8];
    opt.extend_from_slice(&OPT_GO.to_be_bytes());
    opt.extend_from_slice(&info);
    out.insert(("nbd_codec", "option".into()), opt);
    let mut head = vec![0u8];
    head.extend_from_slice(&flags);
    option(&mut head, OPT_LIST, &[]);
    out.insert(("nbd_codec", "header".into()), head);
    let mut req = vec![2u8];
    req.extend_from_slice(&(1u64 << 20).to_le_bytes());
    req.extend_from_slice(&(1u32 << 16).to_le_bytes());
    req.push(3);
    request(&mut req, CMD_FLAG_REQ_ONE, CMD_BLOCK_STATUS, 9, 4096, 4096);
    out.insert(("nbd_codec", "request".into()), req);
}

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus")
}

#[test]
fn seed_corpora_match_the_encoders() {
    let dir = tempfile::tempdir().unwrap();
    let mut seeds = Seeds::new();
    journal_seeds(dir.path(), &mut seeds);
    table_seeds(dir.path(), &mut seeds);
    audit_seeds(dir.path(), &mut seeds);
    config_seeds(&mut seeds);
    policy_seeds(&mut seeds);
    admin_seeds(&mut seeds);
    nbd_seeds(&mut seeds);
    let write = std::env::var_os("KEYTURN_WRITE_SEEDS").is_some();
    let mut stale = Vec::new();
    for ((target, name), bytes) in &seeds {
        let path = corpus_dir().join(target).join(format!("seed-{name}"));
        if write {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, bytes).unwrap();
        } else if std::fs::read(&path).ok().as_ref() != Some(bytes) {
            stale.push(path.display().to_string());
        }
    }
    assert!(
        stale.is_empty(),
        "seeds differ from what keyturn's encoders make now (rerun with KEYTURN_WRITE_SEEDS=1): {stale:?}"
    );
    // Every target has seeds.
    for t in [
        "nbd_session",
        "nbd_codec",
        "journal",
        "table",
        "audit_log",
        "pool_config",
        "policy",
        "admin_body",
    ] {
        assert!(
            seeds.keys().any(|(target, _)| *target == t),
            "{t} has no seed"
        );
    }
}
