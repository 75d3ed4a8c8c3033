//! Keyed BLAKE3 of whole 4 KiB blocks, eight compressions at a time with
//! AVX2, for CPUs without AVX-512F. A 4 KiB input has only four 1 KiB
//! chunks, so the blake3 crate, which hashes one input at a time, runs its
//! chunks at most four wide and its two parents and root mostly idle. Here
//! each lane of a pass is one chunk (or one parent node) of some block in a
//! batch, as in `x16`: two blocks fill the eight chunk lanes, and a group of
//! eight blocks is 32 chunks in four passes, 16 parents in two and 8 roots
//! in one (the walk is `tree`'s, shared with `x16`). The result is exactly
//! `blake3::keyed_hash` of each block (the tests compare them on random data
//! and keys).
//!
//! AVX2 has no rotate: 16 and 8 are byte shuffles, 12 and 7 two shifts and
//! an or. Message words are not gathered: each lane's 64-byte block is two
//! 32-byte loads, and an 8×8 transpose turns eight lanes' words into one
//! register per word, as the blake3 crate's own AVX2 kernel does.
//!
//! `unsafe` here is the same as in `x16`: calls into `#[target_feature]`
//! functions, which [`X8::detect`] only allows after the CPU was seen to
//! have AVX2, and loads through raw pointers whose offsets the tree walk
//! keeps inside its slices.

#![allow(unsafe_code)]

use core::arch::x86_64::*;

use super::Tag;
use super::tree::{self, IV, Lanes, Pass, SCHEDULE};

const LANES: usize = 8;

/// Proof that the running CPU has AVX2.
#[derive(Clone, Copy, Debug)]
pub struct X8(());

impl X8 {
    /// `Some` when the CPU supports this path.
    pub fn detect() -> Option<Self> {
        std::is_x86_feature_detected!("avx2").then_some(Self(()))
    }

    /// Keyed BLAKE3 of each 4 KiB block of `data` into `out`
    /// (`data.len() == out.len() * 4096`).
    pub fn keyed_hash_blocks(self, key: &[u8; 32], data: &[u8], out: &mut [Tag]) {
        tree::keyed_hash_blocks(self, key, data, out);
    }
}

// SAFETY: an `X8` exists only after `detect` saw AVX2, the one feature
// `pass` is compiled for.
unsafe impl Lanes<LANES> for X8 {
    unsafe fn pass(self, p: &Pass<'_, LANES>) -> [[u32; 8]; LANES] {
        // SAFETY: the CPU has AVX2 (`self`); the caller keeps every lane's
        // bytes readable.
        unsafe { pass(p) }
    }
}

/// One pass of eight lanes (see [`Pass`]); returns each lane's chaining
/// value.
///
/// # Safety
/// The CPU has AVX2, and for every lane, `blocks * 64` bytes from
/// `base + offsets[l]` are readable.
#[target_feature(enable = "avx2")]
unsafe fn pass(p: &Pass<'_, LANES>) -> [[u32; 8]; LANES] {
    let mut lanes = [p.base; LANES];
    for (l, o) in lanes.iter_mut().zip(p.offsets) {
        // SAFETY: offsets are not negative, and each lane's bytes are
        // readable (the caller's promise).
        *l = unsafe { p.base.add(o as usize) };
    }
    // SAFETY: `counters` is 32 readable bytes.
    let counter = unsafe { _mm256_loadu_si256(p.counters.as_ptr().cast()) };
    let mut cv = p.key.map(|w| _mm256_set1_epi32(w as i32));
    let iv = IV.map(|w| _mm256_set1_epi32(w as i32));
    for b in 0..p.blocks {
        let mut f = p.flags;
        if b == 0 {
            f |= p.flags_start;
        }
        if b + 1 == p.blocks {
            f |= p.flags_end;
        }
        // SAFETY: block `b` of each lane is inside its readable range.
        let m = unsafe { message(&lanes, b * 64) };
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
            _mm256_setzero_si256(),
            _mm256_set1_epi32(64),
            _mm256_set1_epi32(f as i32),
        ];
        // Unrolled, so that each round's message order is a constant.
        round::<0>(&mut v, &m);
        round::<1>(&mut v, &m);
        round::<2>(&mut v, &m);
        round::<3>(&mut v, &m);
        round::<4>(&mut v, &m);
        round::<5>(&mut v, &m);
        round::<6>(&mut v, &m);
        for i in 0..8 {
            cv[i] = _mm256_xor_si256(v[i], v[i + 8]);
        }
    }
    // Word `i` of every lane, to every word of lane `l`.
    transpose(&mut cv);
    let mut out = [[0u32; 8]; LANES];
    for (o, v) in out.iter_mut().zip(cv) {
        // SAFETY: `o` is 32 writable bytes.
        unsafe { _mm256_storeu_si256(o.as_mut_ptr().cast(), v) };
    }
    out
}

/// The sixteen message words of the 64-byte block at `lanes[l] + at`, one
/// register per word with lane `l`'s word in element `l`.
///
/// # Safety
/// The CPU has AVX2, and 64 bytes from each `lanes[l] + at` are readable.
#[target_feature(enable = "avx2")]
unsafe fn message(lanes: &[*const u8; LANES], at: usize) -> [__m256i; 16] {
    let mut lo = [_mm256_setzero_si256(); 8];
    let mut hi = [_mm256_setzero_si256(); 8];
    for l in 0..LANES {
        // SAFETY: the two halves of lane `l`'s block, readable by the
        // caller's promise.
        unsafe {
            lo[l] = _mm256_loadu_si256(lanes[l].add(at).cast());
            hi[l] = _mm256_loadu_si256(lanes[l].add(at + 32).cast());
        }
    }
    transpose(&mut lo);
    transpose(&mut hi);
    [
        lo[0], lo[1], lo[2], lo[3], lo[4], lo[5], lo[6], lo[7], hi[0], hi[1], hi[2], hi[3], hi[4],
        hi[5], hi[6], hi[7],
    ]
}

/// Transposes the 8×8 matrix of 32-bit words whose rows are `r`.
#[target_feature(enable = "avx2")]
fn transpose(r: &mut [__m256i; 8]) {
    // Pairs of rows, word by word, within each 128-bit half:
    // ab_0145 = a0 b0 a1 b1 | a4 b4 a5 b5, ab_2367 = a2 b2 a3 b3 | a6 b6 a7 b7.
    let ab_0145 = _mm256_unpacklo_epi32(r[0], r[1]);
    let ab_2367 = _mm256_unpackhi_epi32(r[0], r[1]);
    let cd_0145 = _mm256_unpacklo_epi32(r[2], r[3]);
    let cd_2367 = _mm256_unpackhi_epi32(r[2], r[3]);
    let ef_0145 = _mm256_unpacklo_epi32(r[4], r[5]);
    let ef_2367 = _mm256_unpackhi_epi32(r[4], r[5]);
    let gh_0145 = _mm256_unpacklo_epi32(r[6], r[7]);
    let gh_2367 = _mm256_unpackhi_epi32(r[6], r[7]);
    // Then pairs of pairs: abcd_04 = a0 b0 c0 d0 | a4 b4 c4 d4, and so on.
    let abcd_04 = _mm256_unpacklo_epi64(ab_0145, cd_0145);
    let abcd_15 = _mm256_unpackhi_epi64(ab_0145, cd_0145);
    let abcd_26 = _mm256_unpacklo_epi64(ab_2367, cd_2367);
    let abcd_37 = _mm256_unpackhi_epi64(ab_2367, cd_2367);
    let efgh_04 = _mm256_unpacklo_epi64(ef_0145, gh_0145);
    let efgh_15 = _mm256_unpackhi_epi64(ef_0145, gh_0145);
    let efgh_26 = _mm256_unpacklo_epi64(ef_2367, gh_2367);
    let efgh_37 = _mm256_unpackhi_epi64(ef_2367, gh_2367);
    // Then the halves: word 0 is the low halves of abcd_04 and efgh_04,
    // word 4 their high halves.
    r[0] = _mm256_permute2x128_si256::<0x20>(abcd_04, efgh_04);
    r[1] = _mm256_permute2x128_si256::<0x20>(abcd_15, efgh_15);
    r[2] = _mm256_permute2x128_si256::<0x20>(abcd_26, efgh_26);
    r[3] = _mm256_permute2x128_si256::<0x20>(abcd_37, efgh_37);
    r[4] = _mm256_permute2x128_si256::<0x31>(abcd_04, efgh_04);
    r[5] = _mm256_permute2x128_si256::<0x31>(abcd_15, efgh_15);
    r[6] = _mm256_permute2x128_si256::<0x31>(abcd_26, efgh_26);
    r[7] = _mm256_permute2x128_si256::<0x31>(abcd_37, efgh_37);
}

/// Round `R`: its message words in `SCHEDULE[R]`'s order.
#[target_feature(enable = "avx2")]
fn round<const R: usize>(v: &mut [__m256i; 16], m: &[__m256i; 16]) {
    let s = const { SCHEDULE[R] };
    g(v, 0, 4, 8, 12, m[s[0]], m[s[1]]);
    g(v, 1, 5, 9, 13, m[s[2]], m[s[3]]);
    g(v, 2, 6, 10, 14, m[s[4]], m[s[5]]);
    g(v, 3, 7, 11, 15, m[s[6]], m[s[7]]);
    g(v, 0, 5, 10, 15, m[s[8]], m[s[9]]);
    g(v, 1, 6, 11, 12, m[s[10]], m[s[11]]);
    g(v, 2, 7, 8, 13, m[s[12]], m[s[13]]);
    g(v, 3, 4, 9, 14, m[s[14]], m[s[15]]);
}

#[target_feature(enable = "avx2")]
fn g(v: &mut [__m256i; 16], a: usize, b: usize, c: usize, d: usize, x: __m256i, y: __m256i) {
    v[a] = _mm256_add_epi32(_mm256_add_epi32(v[a], v[b]), x);
    v[d] = rot16(_mm256_xor_si256(v[d], v[a]));
    v[c] = _mm256_add_epi32(v[c], v[d]);
    v[b] = rot12(_mm256_xor_si256(v[b], v[c]));
    v[a] = _mm256_add_epi32(_mm256_add_epi32(v[a], v[b]), y);
    v[d] = rot8(_mm256_xor_si256(v[d], v[a]));
    v[c] = _mm256_add_epi32(v[c], v[d]);
    v[b] = rot7(_mm256_xor_si256(v[b], v[c]));
}

/// Each word rotated right by 16: its bytes 2 3 0 1.
#[target_feature(enable = "avx2")]
fn rot16(x: __m256i) -> __m256i {
    let bytes = _mm256_setr_epi8(
        2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13, //
        2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13,
    );
    _mm256_shuffle_epi8(x, bytes)
}

#[target_feature(enable = "avx2")]
fn rot12(x: __m256i) -> __m256i {
    _mm256_or_si256(_mm256_srli_epi32::<12>(x), _mm256_slli_epi32::<20>(x))
}

/// Each word rotated right by 8: its bytes 1 2 3 0.
#[target_feature(enable = "avx2")]
fn rot8(x: __m256i) -> __m256i {
    let bytes = _mm256_setr_epi8(
        1, 2, 3, 0, 5, 6, 7, 4, 9, 10, 11, 8, 13, 14, 15, 12, //
        1, 2, 3, 0, 5, 6, 7, 4, 9, 10, 11, 8, 13, 14, 15, 12,
    );
    _mm256_shuffle_epi8(x, bytes)
}

#[target_feature(enable = "avx2")]
fn rot7(x: __m256i) -> __m256i {
    _mm256_or_si256(_mm256_srli_epi32::<7>(x), _mm256_slli_epi32::<25>(x))
}

#[cfg(test)]
mod tests {
    use super::tree::BLOCK;
    use super::*;
    use rand::{Rng, RngCore, SeedableRng, rngs::StdRng};

    #[test]
    fn matches_the_blake3_crate_for_every_batch_size() {
        let Some(x8) = X8::detect() else {
            eprintln!("no AVX2 here; nothing to compare");
            return;
        };
        let mut rng = StdRng::seed_from_u64(0x7a8);
        // 1..=33 crosses every pass boundary (2 blocks) and the group
        // boundaries (8, 16, 24, 32 blocks).
        for n in 1..=33 {
            let mut key = [0u8; 32];
            rng.fill_bytes(&mut key);
            let mut data = vec![0u8; n * BLOCK];
            rng.fill_bytes(&mut data);
            let mut out = vec![Tag::default(); n];
            x8.keyed_hash_blocks(&key, &data, &mut out);
            for (i, o) in out.iter().map(|t| &t.0).enumerate() {
                let want = blake3::keyed_hash(&key, &data[i * BLOCK..(i + 1) * BLOCK]);
                assert_eq!(o, want.as_bytes(), "batch of {n}, block {i}");
            }
        }
    }

    #[test]
    fn every_input_bit_and_key_bit_matters() {
        let Some(x8) = X8::detect() else {
            return;
        };
        let mut rng = StdRng::seed_from_u64(0x7ab);
        let key: [u8; 32] = rng.r#gen();
        let mut data = vec![0u8; 5 * BLOCK];
        rng.fill_bytes(&mut data);
        let mut base = vec![Tag::default(); 5];
        x8.keyed_hash_blocks(&key, &data, &mut base);
        for _ in 0..64 {
            let bit = rng.gen_range(0..data.len() * 8);
            let mut d = data.clone();
            d[bit / 8] ^= 1 << (bit % 8);
            let mut out = vec![Tag::default(); 5];
            x8.keyed_hash_blocks(&key, &d, &mut out);
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
        // Every key bit: each one changes every block's tag.
        for bit in 0..256 {
            let mut k2 = key;
            k2[bit / 8] ^= 1 << (bit % 8);
            let mut out = vec![Tag::default(); 5];
            x8.keyed_hash_blocks(&k2, &data, &mut out);
            for i in 0..5 {
                let want = blake3::keyed_hash(&k2, &data[i * BLOCK..(i + 1) * BLOCK]);
                assert_eq!(&out[i].0, want.as_bytes(), "key bit {bit}, block {i}");
                assert_ne!(out[i], base[i], "key bit {bit}, block {i}");
            }
        }
    }

    #[test]
    fn rotations_and_transpose() {
        if X8::detect().is_none() {
            return;
        }
        // SAFETY: `detect` saw AVX2.
        unsafe { check_rotations_and_transpose() };
    }

    /// # Safety
    /// The CPU has AVX2.
    #[target_feature(enable = "avx2")]
    unsafe fn check_rotations_and_transpose() {
        let load = |w: &[u32; 8]| {
            // SAFETY: `w` is 32 readable bytes.
            unsafe { _mm256_loadu_si256(w.as_ptr().cast()) }
        };
        let store = |v: __m256i| {
            let mut w = [0u32; 8];
            // SAFETY: `w` is 32 writable bytes.
            unsafe { _mm256_storeu_si256(w.as_mut_ptr().cast(), v) };
            w
        };
        let words: [u32; 8] = core::array::from_fn(|i| 0x8123_4567u32.rotate_left(5 * i as u32));
        let x = load(&words);
        assert_eq!(store(rot16(x)), words.map(|w| w.rotate_right(16)));
        assert_eq!(store(rot12(x)), words.map(|w| w.rotate_right(12)));
        assert_eq!(store(rot8(x)), words.map(|w| w.rotate_right(8)));
        assert_eq!(store(rot7(x)), words.map(|w| w.rotate_right(7)));
        let rows: [[u32; 8]; 8] =
            core::array::from_fn(|r| core::array::from_fn(|c| (r * 8 + c) as u32));
        let mut m = rows.map(|r| load(&r));
        transpose(&mut m);
        for (c, v) in m.into_iter().enumerate() {
            let column: [u32; 8] = core::array::from_fn(|r| rows[r][c]);
            assert_eq!(store(v), column, "column {c}");
        }
    }
}
