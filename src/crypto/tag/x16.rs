//! Keyed BLAKE3 of whole 4 KiB blocks, sixteen compressions at a time with
//! AVX-512. The blake3 crate hashes one input at a time, and a 4 KiB input
//! has only four 1 KiB chunks, so its 16-lane kernel runs a quarter full on
//! our blocks. Here each lane of a pass is one chunk (or one parent node) of
//! some block in a batch, so a batch of four or more blocks fills every lane.
//! The result is exactly `blake3::keyed_hash` of each block (the tests
//! compare them on random data and keys). The tree walk, the constants and
//! the key words are shared with `x8` (`tree`); this file is the pass.
//!
//! `unsafe` here is the same as in `xts::x86`: calls into
//! `#[target_feature]` functions, which [`X16::detect`] only allows after the
//! CPU was seen to have AVX-512F, and gathers through raw pointers whose
//! offsets the tree walk keeps inside its slices.

#![allow(unsafe_code)]

use core::arch::x86_64::*;

use super::Tag;
use super::tree::{self, IV, Lanes, Pass, SCHEDULE};

const LANES: usize = 16;

/// Proof that the running CPU has AVX-512F.
#[derive(Clone, Copy, Debug)]
pub struct X16(());

impl X16 {
    /// `Some` when the CPU supports this path.
    pub fn detect() -> Option<Self> {
        std::is_x86_feature_detected!("avx512f").then_some(Self(()))
    }

    /// Keyed BLAKE3 of each 4 KiB block of `data` into `out`
    /// (`data.len() == out.len() * 4096`).
    pub fn keyed_hash_blocks(self, key: &[u8; 32], data: &[u8], out: &mut [Tag]) {
        tree::keyed_hash_blocks(self, key, data, out);
    }
}

// SAFETY: an `X16` exists only after `detect` saw AVX-512F, the one feature
// `pass` is compiled for.
unsafe impl Lanes<LANES> for X16 {
    unsafe fn pass(self, p: &Pass<'_, LANES>) -> [[u32; 8]; LANES] {
        // SAFETY: the CPU has AVX-512F (`self`); the caller keeps every
        // lane's bytes readable.
        unsafe { pass(p) }
    }
}

/// One pass of sixteen lanes (see [`Pass`]); returns each lane's chaining
/// value. Message words are gathered, one word of all sixteen lanes per
/// instruction.
///
/// # Safety
/// The CPU has AVX-512F, and for every lane, `blocks * 64` bytes from
/// `base + offsets[l]` are readable.
#[target_feature(enable = "avx512f")]
unsafe fn pass(p: &Pass<'_, LANES>) -> [[u32; 8]; LANES] {
    let Pass {
        base,
        offsets,
        blocks,
        key,
        counters,
        flags,
        flags_start,
        flags_end,
    } = *p;
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
    use super::tree::BLOCK;
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
