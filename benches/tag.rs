//! Content-tag throughput, one core: keyed BLAKE3 of 4 KiB blocks, one
//! block at a time (`Tagger::tag`, the blake3 crate) against batches
//! (`Tagger::tag_blocks`). The batched column is whichever kernel the CPU
//! gets, printed first: `x16` (sixteen AVX-512F lanes, from 4 blocks) where
//! the CPU has AVX-512F, else `x8` (eight AVX2 lanes, from 2 blocks), else
//! the crate; below a kernel's minimum batch it is the crate too. A 256 KiB
//! buffer (L2-resident) is tagged in batches of N blocks, several timed
//! reps; median MB/s (10^6 bytes per second of wall time) and the ratio to
//! one-at-a-time measured in the same rep. First, for scale, the crate on
//! the whole buffer as one input, where its own kernel runs full width.
//!
//! `cargo bench --bench tag` (options after `--`: `--reps N`, `--secs S`).

use std::hint::black_box;
use std::time::{Duration, Instant};

use keyturn::crypto::tag::{Tag, Tagger};
use keyturn::ids::BLOCK_SIZE;
use keyturn::keys::secret::MacKey;
use rand::RngCore;

const BUF: usize = 256 * 1024;

fn rate(secs: f64, mut f: impl FnMut()) -> f64 {
    let (mut bytes, t) = (0usize, Instant::now());
    while t.elapsed() < Duration::from_secs_f64(secs) {
        f();
        bytes += BUF;
    }
    bytes as f64 / t.elapsed().as_secs_f64() / 1e6
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let (mut reps, mut secs) = (7usize, 0.3f64);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--reps" => reps = args.next().and_then(|v| v.parse().ok()).expect("--reps N"),
            "--secs" => secs = args.next().and_then(|v| v.parse().ok()).expect("--secs S"),
            _ => {} // cargo bench passes --bench
        }
    }
    let tagger = Tagger::new(&MacKey::generate());
    let mut data = vec![0u8; BUF];
    rand::thread_rng().fill_bytes(&mut data);
    let blocks = BUF / BLOCK_SIZE;
    let mut tags = vec![Tag::default(); blocks];
    println!("batch kernel: {}", Tagger::batch_kernel());
    // The ceiling for a kernel of the crate's width: one long input, whose
    // chunks fill every lane of the crate's own kernel.
    let whole = median(
        (0..reps)
            .map(|_| {
                rate(secs, || {
                    black_box(tagger.tag(black_box(&data)));
                })
            })
            .collect(),
    );
    println!(
        "one {} KiB input through the crate: {whole:.0} MB/s",
        BUF / 1024
    );
    println!("RESULT tag whole_buffer_mbps={whole:.0}");
    println!("batch  one-at-a-time MB/s  batched MB/s  ratio (median of {reps})");
    for batch in [1usize, 2, 4, 8, 16, 64] {
        let (mut single, mut many, mut ratio) = (vec![], vec![], vec![]);
        for _ in 0..reps {
            let s = rate(secs, || {
                for (t, b) in tags.iter_mut().zip(data.chunks_exact(BLOCK_SIZE)) {
                    *t = tagger.tag(black_box(b));
                }
                black_box(&tags);
            });
            let m = rate(secs, || {
                for (t, d) in tags.chunks_mut(batch).zip(data.chunks(batch * BLOCK_SIZE)) {
                    tagger.tag_blocks(black_box(d), t);
                }
                black_box(&tags);
            });
            single.push(s);
            many.push(m);
            ratio.push(m / s);
        }
        let (s, m, r) = (median(single), median(many), median(ratio));
        println!("{batch:>5}  {s:>18.0}  {m:>12.0}  {r:>5.2}x");
        println!("RESULT tag batch={batch} single_mbps={s:.0} batched_mbps={m:.0} ratio={r:.3}");
    }
}
