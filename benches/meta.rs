//! The zone metadata a write changes, one core, no I/O: per block, the
//! lookups and updates `volume::record` makes under the zone lock (the dedup
//! lookup of the new tag, the old mapping and its record, the new record,
//! the old record freed, the map moved), with a checkpoint copying the
//! overlays into the tables every `--checkpoint` blocks as the journal's
//! would (ci-2core's 32 MiB of frames is about 280k overwritten blocks).
//!
//! Patterns, on a zone with dedup on and one volume of `--blocks` blocks
//! written once and checkpointed first:
//! - `seq256`: 1 MiB writes (256 blocks) in LBA order, over and over;
//! - `rand1`: 4 KiB writes at random LBAs.
//!
//! Each rep overwrites `--ops` blocks; the figure is the median of the
//! reps' nanoseconds per block. `cargo bench --bench meta` (options after
//! `--`: `--reps N`, `--blocks N`, `--ops N`, `--checkpoint N`, and
//! `--per-block` to apply a frame's record changes one at a time, as
//! before `ZoneMeta::replace_cbs`).

use std::time::Instant;

use keyturn::crypto::tag::Tag;
use keyturn::ids::{Cbid, JournalSeq, KeyVersion, Lba, Slot, VolumeId};
use keyturn::store::journal::CbRecord;
use keyturn::zone::{VolumeMap, ZoneMeta};
use rand::{Rng, SeedableRng};

struct Bench {
    meta: ZoneMeta,
    vol: VolumeId,
    next_cbid: u64,
    seq: u64,
    since_checkpoint: u64,
    checkpoint_every: u64,
    /// Each change on its own (`replace_cb`), not the frame's together.
    per_block: bool,
    rng: rand::rngs::StdRng,
}

impl Bench {
    fn record(&mut self, cbid: u64) -> CbRecord {
        let mut tag = [0u8; 32];
        self.rng.fill(&mut tag[..]);
        CbRecord {
            slot: Slot(cbid),
            key_version: KeyVersion(1),
            refcount: 1,
            tag: Tag(tag),
            mac: 1,
            staged: None,
        }
    }

    /// One write's metadata: `lbas` remapped to fresh content blocks, in
    /// the steps `volume` takes (the dedup lookups when the write is
    /// planned, the old mappings and records when it is recorded, then
    /// the frame's changes).
    fn write(&mut self, lbas: &[u64]) {
        self.seq += 1;
        let seq = JournalSeq(self.seq);
        let first = self.next_cbid;
        self.next_cbid += lbas.len() as u64;
        let news: Vec<CbRecord> = (0..lbas.len() as u64)
            .map(|i| self.record(first + i))
            .collect();
        for rec in &news {
            assert!(self.meta.find_by_tag(&rec.tag, 1).is_none());
        }
        let map = &self.meta.volumes[&self.vol];
        let mut changes: Vec<(Cbid, Option<CbRecord>, Option<CbRecord>)> = news
            .iter()
            .enumerate()
            .map(|(i, r)| (Cbid(first + i as u64), None, Some(*r)))
            .collect();
        for &lba in lbas {
            if let Some(old) = map.get(Lba(lba)) {
                changes.push((old, self.meta.cb(old), None));
            }
        }
        if self.per_block {
            for &(cbid, old, new) in &changes {
                self.meta.replace_cb(cbid, old, new, seq);
            }
        } else {
            self.meta.replace_cbs(changes.iter().copied(), seq);
        }
        let map = self.meta.volumes.get_mut(&self.vol).expect("the volume");
        for (i, &lba) in lbas.iter().enumerate() {
            map.set(Lba(lba), Some(Cbid(first + i as u64)), seq);
        }
        self.since_checkpoint += lbas.len() as u64;
        if self.since_checkpoint >= self.checkpoint_every {
            self.checkpoint();
        }
    }

    fn checkpoint(&mut self) {
        let run = self.meta.begin_checkpoint(JournalSeq(self.seq));
        while !self.meta.copy_checkpoint(4096).expect("copy") {}
        // The tables' syncs are I/O, not metadata work: left out.
        drop(self.meta.finish_checkpoint(run));
        self.since_checkpoint = 0;
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let (mut reps, mut blocks, mut ops, mut every) = (5usize, 262_144u64, 1_000_000u64, 280_000u64);
    let mut per_block = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut num = || args.next().and_then(|v| v.parse::<u64>().ok());
        match a.as_str() {
            "--reps" => reps = num().expect("--reps N") as usize,
            "--blocks" => blocks = num().expect("--blocks N"),
            "--ops" => ops = num().expect("--ops N"),
            "--checkpoint" => every = num().expect("--checkpoint N"),
            "--per-block" => per_block = true,
            "--bench" => {}
            other => panic!("unknown option {other}"),
        }
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let mut meta = ZoneMeta::open(&dir.path().join("cb"), true).expect("cb table");
    meta.set_dedup(true);
    let vol = VolumeId(1);
    meta.volumes.insert(
        vol,
        VolumeMap::open(&dir.path().join("map"), blocks, true).expect("map table"),
    );
    let mut b = Bench {
        meta,
        vol,
        next_cbid: 0,
        seq: 0,
        since_checkpoint: 0,
        checkpoint_every: every,
        per_block,
        rng: rand::rngs::StdRng::seed_from_u64(7),
    };
    let all: Vec<u64> = (0..blocks).collect();
    for run in all.chunks(256) {
        b.write(run);
    }
    b.checkpoint();
    println!(
        "zone metadata per overwritten block, {blocks} blocks, checkpoint every {every}, median of {reps} reps of {ops} blocks"
    );
    let mut lba = 0u64;
    let mut seq256 = Vec::new();
    let mut rand1 = Vec::new();
    for _ in 0..reps {
        let t = Instant::now();
        let mut done = 0;
        while done < ops {
            let run: Vec<u64> = (lba..lba + 256).map(|l| l % blocks).collect();
            b.write(&run);
            lba = (lba + 256) % blocks;
            done += 256;
        }
        seq256.push(t.elapsed().as_nanos() as f64 / done as f64);
        let t = Instant::now();
        for _ in 0..ops {
            let l = b.rng.gen_range(0..blocks);
            b.write(&[l]);
        }
        rand1.push(t.elapsed().as_nanos() as f64 / ops as f64);
    }
    println!("seq256  {:7.1} ns/block", median(seq256));
    println!("rand1   {:7.1} ns/block", median(rand1));
}
