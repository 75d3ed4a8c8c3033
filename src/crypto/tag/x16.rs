//! Keyed BLAKE3 of whole 4 KiB blocks, sixteen compressions at a time with
//! AVX-512. The blake3 crate hashes one input at a time, and a 4 KiB input
//! has only four 1 KiB chunks, so its 16-lane kernel runs a quarter full on
//! our blocks. Here each lane of a pass is one chunk (or one parent node) of
//! some block in a batch, so a batch of four or more blocks fills every lane.
//! The result is exactly `blake3::keyed_hash` of each block (the tests
//! compare them on random data and keys).
//!
//! The tree of a 4096-byte input is fixed: four chunks of sixteen 64-byte
//! blocks (counter = chunk index), two parents over chunk pairs, and a root
//! parent over those two with the ROOT flag, all keyed.
//!
//! `unsafe` here is the same as in `xts::x86`: calls into
//! `#[target_feature]` functions, which [`X16::detect`] only allows after the
//! CPU was seen to have AVX-512F, and gathers through raw pointers whose
//! offsets the callers keep inside their slices.

#![allow(unsafe_code)]

use core::arch::x86_64::*;

use zeroize::Zeroizing;

use super::Tag;

/// Bytes in one content block: the tree below is the tree of this size.
const BLOCK: usize = 4096;
const _: () = assert!(BLOCK == crate::ids::BLOCK_SIZE);
const CHUNK: usize = 1024;
const LANES: usize = 16;
/// Blocks hashed together: their 64 chunks take four chunk passes, their 32
/// parents two passes and their 16 roots one.
const GROUP: usize = 16;

const IV: [u32; 8] = [
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
const SCHEDULE: [[usize; 16]; 7] = schedule();

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

/// Proof that the running CPU has AVX-512F.
#[derive(Clone, Copy, Debug)]
pub struct X16(());

impl X16 {
    /// `Some` when the CPU supports this path.
    pub fn detect() -> Option<Self> {
        std::is_x86_feature_detected!("avx512f").then_some(Self(()))
    }

    /// Keyed BLAKE3 of each 4 KiB block of `data` into `out`
    /// (`data.len() == out.len() * BLOCK`).
    pub fn keyed_hash_blocks(self, key: &[u8; 32], data: &[u8], out: &mut [Tag]) {
        assert_eq!(
            data.len(),
            out.len() * BLOCK,
            "whole blocks, one output each"
        );
        let mut words = Zeroizing::new([0u32; 8]);
        for (w, b) in words.iter_mut().zip(key.chunks_exact(4)) {
            *w = u32::from_le_bytes(b.try_into().expect("4 bytes"));
        }
        for (blocks, out) in data.chunks(GROUP * BLOCK).zip(out.chunks_mut(GROUP)) {
            // SAFETY: `detect` saw AVX-512F; `blocks` holds `out.len()` whole blocks.
            unsafe { group(&words, blocks, out) };
        }
    }
}

/// Hashes up to [`GROUP`] blocks: every pass reads only lanes inside the
/// slice or stack array it is given (unused lanes repeat lane 0).
///
/// # Safety
/// The CPU has AVX-512F, and `data.len() == out.len() * BLOCK <= GROUP * BLOCK`.
#[target_feature(enable = "avx512f")]
unsafe fn group(key: &[u32; 8], data: &[u8], out: &mut [Tag]) {
    let n = out.len();
    debug_assert!(n <= GROUP && data.len() == n * BLOCK);
    let mut chunks = [[0u32; 8]; 4 * GROUP];
    for (p, cvs) in chunks
        .chunks_mut(LANES)
        .enumerate()
        .take((4 * n).div_ceil(LANES))
    {
        let first = p * LANES;
        let live = (4 * n - first).min(LANES);
        let mut offsets = [0i32; LANES];
        let mut counters = [0u32; LANES];
        for l in 0..live {
            offsets[l] = (l * CHUNK) as i32;
            counters[l] = ((first + l) % 4) as u32;
        }
        // SAFETY: lane `l < live` reads chunk `first + l`, inside `data`;
        // unused lanes read chunk `first`.
        let r = unsafe {
            pass(
                data.as_ptr().add(first * CHUNK),
                &offsets,
                CHUNK / 64,
                key,
                &counters,
                KEYED_HASH,
                CHUNK_START,
                CHUNK_END,
            )
        };
        cvs.copy_from_slice(&r);
    }
    // Parents over chunk pairs: chunk CVs 2i and 2i+1 are one 64-byte block.
    let mut parents = [[0u32; 8]; 2 * GROUP];
    nodes(key, &chunks, 2 * n, KEYED_HASH | PARENT, &mut parents);
    let mut roots = [[0u32; 8]; GROUP];
    nodes(key, &parents, n, KEYED_HASH | PARENT | ROOT, &mut roots);
    for (o, r) in out.iter_mut().zip(&roots) {
        for (b, w) in o.0.chunks_exact_mut(4).zip(r) {
            b.copy_from_slice(&w.to_le_bytes());
        }
    }
}

/// Compresses `count` parent nodes whose children are consecutive pairs of
/// `children` into `out`.
#[target_feature(enable = "avx512f")]
fn nodes(key: &[u32; 8], children: &[[u32; 8]], count: usize, flags: u32, out: &mut [[u32; 8]]) {
    assert!(children.len() >= 2 * count && out.len() >= count);
    for p in 0..count.div_ceil(LANES) {
        let first = p * LANES;
        let live = (count - first).min(LANES);
        let mut offsets = [0i32; LANES];
        for (l, o) in offsets.iter_mut().enumerate().take(live) {
            *o = (l * 64) as i32;
        }
        // SAFETY: lane `l < live` reads children `2(first + l)` and the next,
        // inside `children`; unused lanes read the first pair.
        let r = unsafe {
            pass(
                children.as_ptr().add(2 * first).cast::<u8>(),
                &offsets,
                1,
                key,
                &[0; LANES],
                flags,
                0,
                0,
            )
        };
        out[first..first + live].copy_from_slice(&r[..live]);
    }
}

/// One pass of sixteen lanes: lane `l` compresses `blocks` consecutive
/// 64-byte blocks at `base + offsets[l]`, chaining from `key`, with block
/// counter `counters[l]`; `flags_start` and `flags_end` are added on the
/// first and last block. Returns each lane's chaining value.
///
/// # Safety
/// For every lane, `blocks * 64` bytes from `base + offsets[l]` are readable.
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)] // the shape of BLAKE3's own `hash_many`
unsafe fn pass(
    base: *const u8,
    offsets: &[i32; LANES],
    blocks: usize,
    key: &[u32; 8],
    counters: &[u32; LANES],
    flags: u32,
    flags_start: u32,
    flags_end: u32,
) -> [[u32; 8]; LANES] {
    // SAFETY: each array is 64 readable bytes.
    let (index, counter) = unsafe {
        (
            _mm512_loadu_epi32(offsets.as_ptr()),
            _mm512_loadu_epi32(counters.as_ptr().cast()),
        )
    };
    let mut cv = key.map(|w| _mm512_set1_epi32(w as i32));
    let iv = IV.map(|w| _mm512_set1_epi32(w as i32));
    for b in 0..blocks {
        let mut f = flags;
        if b == 0 {
            f |= flags_start;
        }
        if b + 1 == blocks {
            f |= flags_end;
        }
        let mut m = [_mm512_setzero_si512(); 16];
        for (w, m) in m.iter_mut().enumerate() {
            // SAFETY: word `w` of block `b` of each lane, in its readable range.
            *m = unsafe { _mm512_i32gather_epi32::<1>(index, base.add(b * 64 + w * 4).cast()) };
        }
        let mut v = [
            cv[0],
            cv[1],
            cv[2],
            cv[3],
            cv[4],
            cv[5],
            cv[6],
            cv[7],
            iv[0],
            iv[1],
            iv[2],
            iv[3],
            counter,
            _mm512_setzero_si512(),
            _mm512_set1_epi32(64),
            _mm512_set1_epi32(f as i32),
        ];
        for s in &SCHEDULE {
            round(&mut v, &m, s);
        }
        for i in 0..8 {
            cv[i] = _mm512_xor_si512(v[i], v[i + 8]);
        }
    }
    let mut words = [[0u32; LANES]; 8];
    for (w, v) in words.iter_mut().zip(cv) {
        // SAFETY: `w` is 64 writable bytes.
        unsafe { _mm512_storeu_epi32(w.as_mut_ptr().cast(), v) };
    }
    let mut out = [[0u32; 8]; LANES];
    for (l, o) in out.iter_mut().enumerate() {
        for (i, w) in o.iter_mut().enumerate() {
            *w = words[i][l];
        }
    }
    out
}

#[target_feature(enable = "avx512f")]
fn round(v: &mut [__m512i; 16], m: &[__m512i; 16], s: &[usize; 16]) {
    g(v, 0, 4, 8, 12, m[s[0]], m[s[1]]);
    g(v, 1, 5, 9, 13, m[s[2]], m[s[3]]);
    g(v, 2, 6, 10, 14, m[s[4]], m[s[5]]);
    g(v, 3, 7, 11, 15, m[s[6]], m[s[7]]);
    g(v, 0, 5, 10, 15, m[s[8]], m[s[9]]);
    g(v, 1, 6, 11, 12, m[s[10]], m[s[11]]);
    g(v, 2, 7, 8, 13, m[s[12]], m[s[13]]);
    g(v, 3, 4, 9, 14, m[s[14]], m[s[15]]);
}

#[target_feature(enable = "avx512f")]
fn g(v: &mut [__m512i; 16], a: usize, b: usize, c: usize, d: usize, x: __m512i, y: __m512i) {
    v[a] = _mm512_add_epi32(_mm512_add_epi32(v[a], v[b]), x);
    v[d] = _mm512_ror_epi32::<16>(_mm512_xor_si512(v[d], v[a]));
    v[c] = _mm512_add_epi32(v[c], v[d]);
    v[b] = _mm512_ror_epi32::<12>(_mm512_xor_si512(v[b], v[c]));
    v[a] = _mm512_add_epi32(_mm512_add_epi32(v[a], v[b]), y);
    v[d] = _mm512_ror_epi32::<8>(_mm512_xor_si512(v[d], v[a]));
    v[c] = _mm512_add_epi32(v[c], v[d]);
    v[b] = _mm512_ror_epi32::<7>(_mm512_xor_si512(v[b], v[c]));
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, RngCore, SeedableRng, rngs::StdRng};

    #[test]
    fn matches_the_blake3_crate_for_every_batch_size() {
        let Some(x16) = X16::detect() else {
            eprintln!("no AVX-512F here; nothing to compare");
            return;
        };
        let mut rng = StdRng::seed_from_u64(0x7a9);
        // Sizes around the pass and group boundaries.
        for n in (1..=40).chain([63, 64, 65]) {
            let mut key = [0u8; 32];
            rng.fill_bytes(&mut key);
            let mut data = vec![0u8; n * BLOCK];
            rng.fill_bytes(&mut data);
            let mut out = vec![Tag::default(); n];
            x16.keyed_hash_blocks(&key, &data, &mut out);
            for (i, o) in out.iter().map(|t| &t.0).enumerate() {
                let want = blake3::keyed_hash(&key, &data[i * BLOCK..(i + 1) * BLOCK]);
                assert_eq!(o, want.as_bytes(), "batch of {n}, block {i}");
            }
        }
    }

    #[test]
    fn every_input_bit_and_key_bit_matters() {
        let Some(x16) = X16::detect() else {
            return;
        };
        let mut rng = StdRng::seed_from_u64(0x7aa);
        let key: [u8; 32] = rng.r#gen();
        let mut data = vec![0u8; 5 * BLOCK];
        rng.fill_bytes(&mut data);
        let mut base = vec![Tag::default(); 5];
        x16.keyed_hash_blocks(&key, &data, &mut base);
        for _ in 0..64 {
            let bit = rng.gen_range(0..data.len() * 8);
            let mut d = data.clone();
            d[bit / 8] ^= 1 << (bit % 8);
            let mut out = vec![Tag::default(); 5];
            x16.keyed_hash_blocks(&key, &d, &mut out);
            for i in 0..5 {
                let want = blake3::keyed_hash(&key, &d[i * BLOCK..(i + 1) * BLOCK]);
                assert_eq!(&out[i].0, want.as_bytes());
                assert_eq!(
                    out[i] != base[i],
                    i == bit / 8 / BLOCK,
                    "bit {bit}, block {i}"
                );
            }
        }
        let mut k2 = key;
        k2[31] ^= 0x80;
        let mut out = vec![Tag::default(); 5];
        x16.keyed_hash_blocks(&k2, &data, &mut out);
        assert!(out.iter().zip(&base).all(|(a, b)| a != b));
    }
}
