//! What the many-lane tag kernels (`x16`, `x8`) share: BLAKE3's constants
//! and message schedule, the key as words, and the walk over the tree of a
//! batch of 4 KiB blocks, one pass of lanes at a time. A kernel brings only
//! its pass: `L` compressions side by side in its own SIMD registers.
//!
//! The tree of a 4096-byte input is fixed: four chunks of sixteen 64-byte
//! blocks (counter = chunk index), two parents over chunk pairs, and a root
//! parent over those two with the ROOT flag, all keyed. A kernel `L` lanes
//! wide hashes `L` blocks as a group: their `4L` chunks take four passes,
//! their `2L` parents two passes and their `L` roots one.
//!
//! `unsafe` here is the call into a kernel's pass: the [`Lanes`] contract
//! says a kernel value exists only on a CPU that has its features, and the
//! walk keeps every lane's reads inside the slice or array it hands over.

#![allow(unsafe_code)]

use zeroize::Zeroizing;

use super::Tag;

/// Bytes in one content block: the tree walked here is the tree of this size.
pub(super) const BLOCK: usize = 4096;
const _: () = assert!(BLOCK == crate::ids::BLOCK_SIZE);
const CHUNK: usize = 1024;
/// Widest kernel the walk's stack arrays are sized for.
const MAX_LANES: usize = 16;

pub(super) const IV: [u32; 8] = [
    0x6A09_E667,
    0xBB67_AE85,
    0x3C6E_F372,
    0xA54F_F53A,
    0x510E_527F,
    0x9B05_688C,
    0x1F83_D9AB,
    0x5BE0_CD19,
];
const CHUNK_START: u32 = 1;
const CHUNK_END: u32 = 2;
const PARENT: u32 = 4;
const ROOT: u32 = 8;
const KEYED_HASH: u32 = 16;

/// Message word order per round: the BLAKE3 permutation applied 0..7 times.
pub(super) const SCHEDULE: [[usize; 16]; 7] = schedule();

const fn schedule() -> [[usize; 16]; 7] {
    const PERMUTATION: [usize; 16] = [2, 6, 3, 10, 7, 0, 4, 13, 1, 11, 12, 5, 9, 14, 15, 8];
    let mut s = [[0usize; 16]; 7];
    let mut i = 0;
    while i < 16 {
        s[0][i] = i;
        i += 1;
    }
    let mut r = 1;
    while r < 7 {
        let mut i = 0;
        while i < 16 {
            s[r][i] = s[r - 1][PERMUTATION[i]];
            i += 1;
        }
        r += 1;
    }
    s
}

/// One pass of an `L`-lane kernel: lane `l` compresses `blocks`
/// consecutive 64-byte blocks at `base + offsets[l]`, chaining from `key`,
/// with block counter `counters[l]`; `flags_start` and `flags_end` are
/// added on the first and last block.
#[derive(Clone, Copy)]
pub(super) struct Pass<'a, const L: usize> {
    pub base: *const u8,
    /// Byte offsets from `base`, never negative.
    pub offsets: [i32; L],
    /// 64-byte blocks per lane: 16 for a chunk, 1 for a parent node.
    pub blocks: usize,
    pub key: &'a [u32; 8],
    pub counters: [u32; L],
    pub flags: u32,
    pub flags_start: u32,
    pub flags_end: u32,
}

/// A compression kernel `L` lanes wide.
///
/// # Safety
/// A value of the implementing type exists only once the running CPU was
/// seen to have every feature its [`pass`](Lanes::pass) is compiled for.
pub(super) unsafe trait Lanes<const L: usize>: Copy {
    /// Runs `p` and returns each lane's chaining value.
    ///
    /// # Safety
    /// For every lane `l`, `p.blocks * 64` bytes from
    /// `p.base + p.offsets[l]` are readable.
    unsafe fn pass(self, p: &Pass<'_, L>) -> [[u32; 8]; L];
}

/// The 32-byte key as little-endian words, wiped when dropped.
pub(super) fn key_words(key: &[u8; 32]) -> Zeroizing<[u32; 8]> {
    let mut words = Zeroizing::new([0u32; 8]);
    for (w, b) in words.iter_mut().zip(key.chunks_exact(4)) {
        *w = u32::from_le_bytes(b.try_into().expect("4 bytes"));
    }
    words
}

/// Keyed BLAKE3 of each 4 KiB block of `data` into `out`
/// (`data.len() == out.len() * BLOCK`), `L` blocks at a time on `kernel`.
pub(super) fn keyed_hash_blocks<const L: usize>(
    kernel: impl Lanes<L>,
    key: &[u8; 32],
    data: &[u8],
    out: &mut [Tag],
) {
    assert_eq!(
        data.len(),
        out.len() * BLOCK,
        "whole blocks, one output each"
    );
    let key = key_words(key);
    for (blocks, out) in data.chunks(L * BLOCK).zip(out.chunks_mut(L)) {
        group(kernel, &key, blocks, out);
    }
}

/// Hashes up to `L` blocks: every pass reads only lanes inside the slice or
/// stack array it is given (unused lanes repeat lane 0).
fn group<const L: usize>(kernel: impl Lanes<L>, key: &[u32; 8], data: &[u8], out: &mut [Tag]) {
    const { assert!(L > 0 && L <= MAX_LANES) };
    let n = out.len();
    assert!(n <= L && data.len() == n * BLOCK);
    let mut chunks = [[0u32; 8]; 4 * MAX_LANES];
    for p in 0..(4 * n).div_ceil(L) {
        let first = p * L;
        let live = (4 * n - first).min(L);
        let mut offsets = [0i32; L];
        let mut counters = [0u32; L];
        for l in 0..live {
            offsets[l] = (l * CHUNK) as i32;
            counters[l] = ((first + l) % 4) as u32;
        }
        let pass = Pass {
            base: data[first * CHUNK..].as_ptr(),
            offsets,
            blocks: CHUNK / 64,
            key,
            counters,
            flags: KEYED_HASH,
            flags_start: CHUNK_START,
            flags_end: CHUNK_END,
        };
        // SAFETY: `kernel` proves the CPU features (the `Lanes` contract);
        // lane `l < live` reads chunk `first + l`, inside `data`, and unused
        // lanes read chunk `first`.
        let cvs = unsafe { kernel.pass(&pass) };
        chunks[first..first + live].copy_from_slice(&cvs[..live]);
    }
    // Parents over chunk pairs: chunk CVs 2i and 2i+1 are one 64-byte block.
    let mut parents = [[0u32; 8]; 2 * MAX_LANES];
    nodes(
        kernel,
        key,
        &chunks,
        2 * n,
        KEYED_HASH | PARENT,
        &mut parents,
    );
    let mut roots = [[0u32; 8]; MAX_LANES];
    nodes(
        kernel,
        key,
        &parents,
        n,
        KEYED_HASH | PARENT | ROOT,
        &mut roots,
    );
    for (o, r) in out.iter_mut().zip(&roots) {
        for (b, w) in o.0.chunks_exact_mut(4).zip(r) {
            b.copy_from_slice(&w.to_le_bytes());
        }
    }
}

/// Compresses `count` parent nodes whose children are consecutive pairs of
/// `children` into `out`.
fn nodes<const L: usize>(
    kernel: impl Lanes<L>,
    key: &[u32; 8],
    children: &[[u32; 8]],
    count: usize,
    flags: u32,
    out: &mut [[u32; 8]],
) {
    assert!(children.len() >= 2 * count && out.len() >= count);
    for p in 0..count.div_ceil(L) {
        let first = p * L;
        let live = (count - first).min(L);
        let mut offsets = [0i32; L];
        for (l, o) in offsets.iter_mut().enumerate().take(live) {
            *o = (l * 64) as i32;
        }
        let pass = Pass {
            base: children[2 * first..].as_ptr().cast::<u8>(),
            offsets,
            blocks: 1,
            key,
            counters: [0; L],
            flags,
            flags_start: 0,
            flags_end: 0,
        };
        // SAFETY: `kernel` proves the CPU features; lane `l < live` reads
        // children `2(first + l)` and the next, inside `children`, and unused
        // lanes read the first pair.
        let cvs = unsafe { kernel.pass(&pass) };
        out[first..first + live].copy_from_slice(&cvs[..live]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{RngCore, SeedableRng, rngs::StdRng};

    /// A plain Rust kernel of any width: checks the walk itself, at the
    /// widths of both SIMD kernels, on any CPU.
    #[derive(Clone, Copy)]
    struct Portable;

    // SAFETY: `pass` needs no CPU feature.
    unsafe impl<const L: usize> Lanes<L> for Portable {
        unsafe fn pass(self, p: &Pass<'_, L>) -> [[u32; 8]; L] {
            core::array::from_fn(|l| {
                let mut cv = *p.key;
                for b in 0..p.blocks {
                    // SAFETY: the caller keeps these 64 bytes readable.
                    let bytes: [u8; 64] = unsafe {
                        p.base
                            .add(p.offsets[l] as usize + b * 64)
                            .cast::<[u8; 64]>()
                            .read_unaligned()
                    };
                    let m: [u32; 16] = core::array::from_fn(|w| {
                        u32::from_le_bytes(bytes[4 * w..4 * w + 4].try_into().expect("4"))
                    });
                    let mut f = p.flags;
                    if b == 0 {
                        f |= p.flags_start;
                    }
                    if b + 1 == p.blocks {
                        f |= p.flags_end;
                    }
                    cv = compress(&cv, &m, p.counters[l], f);
                }
                cv
            })
        }
    }

    fn compress(cv: &[u32; 8], m: &[u32; 16], counter: u32, flags: u32) -> [u32; 8] {
        let mut v = [
            cv[0], cv[1], cv[2], cv[3], cv[4], cv[5], cv[6], cv[7], IV[0], IV[1], IV[2], IV[3],
            counter, 0, 64, flags,
        ];
        let g = |v: &mut [u32; 16], a: usize, b: usize, c: usize, d: usize, x: u32, y: u32| {
            v[a] = v[a].wrapping_add(v[b]).wrapping_add(x);
            v[d] = (v[d] ^ v[a]).rotate_right(16);
            v[c] = v[c].wrapping_add(v[d]);
            v[b] = (v[b] ^ v[c]).rotate_right(12);
            v[a] = v[a].wrapping_add(v[b]).wrapping_add(y);
            v[d] = (v[d] ^ v[a]).rotate_right(8);
            v[c] = v[c].wrapping_add(v[d]);
            v[b] = (v[b] ^ v[c]).rotate_right(7);
        };
        for s in &SCHEDULE {
            g(&mut v, 0, 4, 8, 12, m[s[0]], m[s[1]]);
            g(&mut v, 1, 5, 9, 13, m[s[2]], m[s[3]]);
            g(&mut v, 2, 6, 10, 14, m[s[4]], m[s[5]]);
            g(&mut v, 3, 7, 11, 15, m[s[6]], m[s[7]]);
            g(&mut v, 0, 5, 10, 15, m[s[8]], m[s[9]]);
            g(&mut v, 1, 6, 11, 12, m[s[10]], m[s[11]]);
            g(&mut v, 2, 7, 8, 13, m[s[12]], m[s[13]]);
            g(&mut v, 3, 4, 9, 14, m[s[14]], m[s[15]]);
        }
        core::array::from_fn(|i| v[i] ^ v[i + 8])
    }

    fn check<const L: usize>(seed: u64) {
        let mut rng = StdRng::seed_from_u64(seed);
        for n in 0..=2 * L + 1 {
            let mut key = [0u8; 32];
            rng.fill_bytes(&mut key);
            let mut data = vec![0u8; n * BLOCK];
            rng.fill_bytes(&mut data);
            let mut out = vec![Tag::default(); n];
            keyed_hash_blocks::<L>(Portable, &key, &data, &mut out);
            for (i, o) in out.iter().enumerate() {
                let want = blake3::keyed_hash(&key, &data[i * BLOCK..(i + 1) * BLOCK]);
                assert_eq!(&o.0, want.as_bytes(), "{L} lanes, batch of {n}, block {i}");
            }
        }
    }

    #[test]
    fn the_walk_is_blake3_at_the_kernels_widths() {
        check::<8>(0x7b0);
        check::<16>(0x7b1);
    }

    #[test]
    fn key_words_are_little_endian() {
        let mut key = [0u8; 32];
        key[..4].copy_from_slice(&[1, 2, 3, 4]);
        key[28..].copy_from_slice(&[0xff, 0, 0, 0x80]);
        let w = key_words(&key);
        assert_eq!(w[0], 0x0403_0201);
        assert_eq!(w[7], 0x8000_00ff);
        assert!(w[1..7].iter().all(|&w| w == 0));
    }
}
