//! x86_64 XTS with AES-NI (8 blocks interleaved) and with VAES+AVX2 (16
//! blocks, two per ymm register). This is the crypto module's only `unsafe`:
//! loads and stores through raw pointers (so that one buffer can be input and
//! output), and calls into `#[target_feature]` functions, which
//! [`Keys::new`] only allows after the CPU was seen to have the features.
//!
//! Shape of both paths, per group of blocks:
//! `x = P ^ T ^ rk[0]`, 13 rounds, then `aesenclast(x, rk[14] ^ T)`: the
//! final XOR with the tweak is folded into the last round key, so XTS costs
//! one extra XOR per block beyond plain ECB. Tweaks advance in SIMD registers:
//! by α per block on the AES-NI path; by α^16 per ymm register on the VAES
//! path (one carry-less multiply reduces the 16 bits shifted out), which keeps
//! the eight tweak chains independent of each other.
//!
//! The schedules in [`Keys`] are zeroized on drop, and the kernels overwrite
//! their own stack arrays of round keys and tweaks before returning. Register
//! spills the compiler makes on its own are not scrubbed (no AES-NI code in a
//! compiled language can promise that).

#![allow(unsafe_code)]

use core::arch::x86_64::*;
use core::hint::black_box;
use core::ptr::{read_unaligned, write_unaligned};

use zeroize::{Zeroize, ZeroizeOnDrop};

use super::{BLOCK, tweak_block};

/// Which instruction set a [`Keys`] was built for.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Isa {
    /// AES-NI on xmm registers.
    AesNi,
    /// VAES + VPCLMULQDQ + AVX2 on ymm registers (AES-NI for the odd block).
    Vaes,
}

impl Isa {
    /// Whether the running CPU supports `self`.
    pub(super) fn detected(self) -> bool {
        let aesni = is_x86_feature_detected!("aes") && is_x86_feature_detected!("sse2");
        match self {
            Isa::AesNi => aesni,
            Isa::Vaes => {
                aesni
                    && is_x86_feature_detected!("avx2")
                    && is_x86_feature_detected!("vaes")
                    && is_x86_feature_detected!("vpclmulqdq")
            }
        }
    }
}

/// Round keys: K1 forward, K1 for the equivalent inverse cipher (`aesdec`),
/// and K2 forward (the tweak is only ever encrypted). Zeroed on drop. The
/// `isa` field is the proof that the CPU features were detected.
#[derive(Zeroize, ZeroizeOnDrop)]
pub(super) struct Keys {
    enc: [[u8; 16]; 15],
    dec: [[u8; 16]; 15],
    twk: [[u8; 16]; 15],
    #[zeroize(skip)]
    isa: Isa,
}

impl Keys {
    /// Expands `key` = K1 || K2 for `isa`, or `None` if the CPU lacks it.
    /// The schedules are written straight into the heap allocation, so no
    /// stack copy of them outlives this call.
    pub(super) fn new(key: &[u8; 64], isa: Isa) -> Option<Box<Self>> {
        if !isa.detected() {
            return None;
        }
        let mut k = Box::new(Keys {
            enc: [[0; 16]; 15],
            dec: [[0; 16]; 15],
            twk: [[0; 16]; 15],
            isa,
        });
        let k1: &[u8; 32] = key[..32].try_into().expect("32 bytes");
        let k2: &[u8; 32] = key[32..].try_into().expect("32 bytes");
        // SAFETY: `isa.detected()` above saw AES-NI (and SSE2).
        unsafe {
            expand(k1, &mut k.enc);
            expand(k2, &mut k.twk);
            invert(&k.enc, &mut k.dec);
        }
        Some(k)
    }

    /// The instruction set this was built for.
    pub(super) fn isa(&self) -> Isa {
        self.isa
    }

    /// Encrypts (or with `DEC`, decrypts) one data unit from `src` to `dst`.
    /// The caller has checked `src.len() == dst.len()`, a non-zero multiple of 16.
    pub(super) fn crypt<const DEC: bool>(&self, tweak: u64, src: &[u8], dst: &mut [u8]) {
        debug_assert!(src.len() == dst.len() && src.len().is_multiple_of(BLOCK));
        let n = src.len() / BLOCK;
        // SAFETY: `src` is readable and `dst` writable for `n` blocks, and two
        // live borrows cannot overlap; `self.isa` was detected in `new`.
        unsafe { self.dispatch::<DEC>(tweak, src.as_ptr(), dst.as_mut_ptr(), n) }
    }

    /// In-place form of [`Self::crypt`].
    pub(super) fn crypt_in_place<const DEC: bool>(&self, tweak: u64, buf: &mut [u8]) {
        debug_assert!(buf.len().is_multiple_of(BLOCK));
        let n = buf.len() / BLOCK;
        let p = buf.as_mut_ptr();
        // SAFETY: `buf` is readable and writable for `n` blocks; the kernels
        // read every block of a group before writing it, so `src == dst` is
        // allowed; `self.isa` was detected in `new`.
        unsafe { self.dispatch::<DEC>(tweak, p, p, n) }
    }

    /// # Safety
    /// `src` readable and `dst` writable for `n * 16` bytes; the two ranges
    /// are either the same or disjoint.
    unsafe fn dispatch<const DEC: bool>(&self, tweak: u64, src: *const u8, dst: *mut u8, n: usize) {
        // SAFETY: the caller upholds the pointer contract, and `self.isa`
        // (hence the target features of the kernel) was detected in `new`.
        unsafe {
            match self.isa {
                Isa::AesNi => xts_aesni::<DEC>(self, tweak, src, dst, n),
                Isa::Vaes => xts_vaes::<DEC>(self, tweak, src, dst, n),
            }
        }
    }
}

/// Reads 16 bytes at `p`.
///
/// # Safety
/// `p` readable for 16 bytes.
#[inline(always)]
unsafe fn ld(p: *const u8) -> __m128i {
    // SAFETY: per the contract; `read_unaligned` has no alignment need.
    unsafe { read_unaligned(p.cast::<__m128i>()) }
}

/// Writes 16 bytes at `p`.
///
/// # Safety
/// `p` writable for 16 bytes.
#[inline(always)]
unsafe fn st(p: *mut u8, v: __m128i) {
    // SAFETY: per the contract.
    unsafe { write_unaligned(p.cast::<__m128i>(), v) }
}

/// Reads 32 bytes at `p`.
///
/// # Safety
/// `p` readable for 32 bytes.
#[inline(always)]
unsafe fn ld2(p: *const u8) -> __m256i {
    // SAFETY: per the contract.
    unsafe { read_unaligned(p.cast::<__m256i>()) }
}

/// Writes 32 bytes at `p`.
///
/// # Safety
/// `p` writable for 32 bytes.
#[inline(always)]
unsafe fn st2(p: *mut u8, v: __m256i) {
    // SAFETY: per the contract.
    unsafe { write_unaligned(p.cast::<__m256i>(), v) }
}

/// Overwrites a stack array of key-derived values before a kernel returns;
/// `black_box` keeps the compiler from dropping the dead stores. Copies that
/// the register allocator spilled elsewhere are not covered (module docs).
#[inline(always)]
fn wipe<T: Copy, const N: usize>(v: &mut [T; N], zero: T) {
    *v = [zero; N];
    black_box(v);
}

/// Loads a schedule into registers.
#[inline(always)]
fn load_keys(rk: &[[u8; 16]; 15]) -> [__m128i; 15] {
    // SAFETY: each element is 16 readable bytes.
    core::array::from_fn(|i| unsafe { ld(rk[i].as_ptr()) })
}

/// One step of the AES-256 key schedule: `k ^ (k << 32) ^ (k << 64) ^
/// (k << 96) ^ t`, where `t` is the broadcast `aeskeygenassist` word.
#[target_feature(enable = "sse2")]
fn mix(k: __m128i, t: __m128i) -> __m128i {
    let k = _mm_xor_si128(k, _mm_slli_si128::<4>(k));
    let k = _mm_xor_si128(k, _mm_slli_si128::<4>(k));
    let k = _mm_xor_si128(k, _mm_slli_si128::<4>(k));
    _mm_xor_si128(k, t)
}

/// Expands a 256-bit AES key into 15 round keys (FIPS-197 §5.2).
#[target_feature(enable = "aes,sse2")]
fn expand(key: &[u8; 32], out: &mut [[u8; 16]; 15]) {
    // SAFETY: `key` has 32 readable bytes.
    let (mut a, mut b) = unsafe { (ld(key.as_ptr()), ld(key.as_ptr().add(16))) };
    let mut rk = [_mm_setzero_si128(); 15];
    rk[0] = a;
    rk[1] = b;
    // Round keys 2i and 2i + 1 from the previous two; rk[14] needs only
    // the first half of a step.
    macro_rules! step {
        ($i:expr, $rcon:expr) => {
            a = mix(
                a,
                _mm_shuffle_epi32::<0xff>(_mm_aeskeygenassist_si128::<$rcon>(b)),
            );
            rk[$i] = a;
            b = mix(
                b,
                _mm_shuffle_epi32::<0xaa>(_mm_aeskeygenassist_si128::<0>(a)),
            );
            rk[$i + 1] = b;
        };
    }
    step!(2, 0x01);
    step!(4, 0x02);
    step!(6, 0x04);
    step!(8, 0x08);
    step!(10, 0x10);
    step!(12, 0x20);
    rk[14] = mix(
        a,
        _mm_shuffle_epi32::<0xff>(_mm_aeskeygenassist_si128::<0x40>(b)),
    );
    for (o, r) in out.iter_mut().zip(rk.iter()) {
        // SAFETY: `o` has 16 writable bytes.
        unsafe { st(o.as_mut_ptr(), *r) };
    }
}

/// The decryption schedule for `aesdec`: forward keys in reverse order, with
/// InvMixColumns applied to all but the first and last.
#[target_feature(enable = "aes,sse2")]
fn invert(enc: &[[u8; 16]; 15], dec: &mut [[u8; 16]; 15]) {
    let e = load_keys(enc);
    for (i, d) in dec.iter_mut().enumerate() {
        let k = e[14 - i];
        let k = if i == 0 || i == 14 {
            k
        } else {
            _mm_aesimc_si128(k)
        };
        // SAFETY: `d` has 16 writable bytes.
        unsafe { st(d.as_mut_ptr(), k) };
    }
}

/// Multiplies a tweak by α in GF(2^128) (IEEE 1619 little-endian order):
/// each 32-bit lane is doubled, and the bit shifted out of a lane enters the
/// next one; the bit shifted out of the top lane comes back as 0x87.
#[target_feature(enable = "sse2")]
fn mul_alpha(t: __m128i) -> __m128i {
    let carries = _mm_shuffle_epi32::<0x93>(_mm_srai_epi32::<31>(t));
    let carries = _mm_and_si128(carries, _mm_set_epi32(1, 1, 1, 0x87));
    _mm_xor_si128(_mm_add_epi32(t, t), carries)
}

/// Multiplies both 128-bit tweaks in `t` by α^16: a 16-bit shift of each
/// lane, with the 16 bits shifted out of the top reduced by one carry-less
/// multiply by 0x87 (the product has at most 23 bits, so it needs no further
/// reduction).
#[target_feature(enable = "avx2,vpclmulqdq")]
fn mul_alpha16(t: __m256i) -> __m256i {
    let shifted = _mm256_slli_epi64::<16>(t);
    // Per lane: qword 0 = bits shifted out of the top, qword 1 = bits that
    // cross from the low qword into the high one.
    let out = _mm256_shuffle_epi32::<0x4e>(_mm256_srli_epi64::<48>(t));
    let poly = _mm256_set_epi64x(0, 0x87, 0, 0x87);
    let reduced = _mm256_clmulepi64_epi128::<0x00>(out, poly);
    let cross = _mm256_and_si256(out, _mm256_set_epi64x(-1, 0, -1, 0));
    _mm256_xor_si256(shifted, _mm256_xor_si256(reduced, cross))
}

/// AES-256(K2, data unit number): the tweak of block 0.
#[target_feature(enable = "aes,sse2")]
fn first_tweak(keys: &Keys, tweak: u64) -> __m128i {
    let tk = load_keys(&keys.twk);
    let b = tweak_block(tweak);
    // SAFETY: `b` has 16 readable bytes.
    let mut x = _mm_xor_si128(unsafe { ld(b.as_ptr()) }, tk[0]);
    for k in &tk[1..14] {
        x = _mm_aesenc_si128(x, *k);
    }
    _mm_aesenclast_si128(x, tk[14])
}

/// One block, with the xmm schedule `k` and tweak `t`.
#[target_feature(enable = "aes,sse2")]
fn one_block<const DEC: bool>(k: &[__m128i; 15], t: __m128i, p: __m128i) -> __m128i {
    let mut x = _mm_xor_si128(p, _mm_xor_si128(t, k[0]));
    for rk in &k[1..14] {
        x = if DEC {
            _mm_aesdec_si128(x, *rk)
        } else {
            _mm_aesenc_si128(x, *rk)
        };
    }
    let last = _mm_xor_si128(k[14], t);
    if DEC {
        _mm_aesdeclast_si128(x, last)
    } else {
        _mm_aesenclast_si128(x, last)
    }
}

/// AES-NI kernel: 8 independent blocks in flight hide the 4-cycle `aesenc`
/// latency at its 2-per-cycle throughput.
///
/// # Safety
/// The CPU has AES-NI; `src` readable and `dst` writable for `n` blocks,
/// the same range or disjoint.
#[target_feature(enable = "aes,sse2")]
unsafe fn xts_aesni<const DEC: bool>(
    keys: &Keys,
    tweak: u64,
    src: *const u8,
    dst: *mut u8,
    n: usize,
) {
    const W: usize = 8;
    let mut k = load_keys(if DEC { &keys.dec } else { &keys.enc });
    let mut t = first_tweak(keys, tweak);
    // `last[j]` = rk[14] ^ T_j, the key of the fused final round.
    let mut last = [_mm_setzero_si128(); W];
    let mut i = 0;
    while i + W <= n {
        let mut x = [_mm_setzero_si128(); W];
        for j in 0..W {
            // SAFETY: block i + j < n is in range.
            let p = unsafe { ld(src.add((i + j) * BLOCK)) };
            x[j] = _mm_xor_si128(p, _mm_xor_si128(t, k[0]));
            last[j] = _mm_xor_si128(t, k[14]);
            t = mul_alpha(t);
        }
        // 8 blocks + 8 final-round keys + a round key are more than the 16
        // registers. Left alone, LLVM then serialises the eight independent
        // AES chains to save registers, which exposes the `aesenc` latency;
        // parking `last` in memory here keeps the rounds interleaved.
        black_box(&mut last);
        black_box(&mut k);
        for rk in &k[1..14] {
            for xj in &mut x {
                *xj = if DEC {
                    _mm_aesdec_si128(*xj, *rk)
                } else {
                    _mm_aesenc_si128(*xj, *rk)
                };
            }
        }
        for j in 0..W {
            let c = if DEC {
                _mm_aesdeclast_si128(x[j], last[j])
            } else {
                _mm_aesenclast_si128(x[j], last[j])
            };
            // SAFETY: block i + j < n is in range; all of this group was read above.
            unsafe { st(dst.add((i + j) * BLOCK), c) };
        }
        i += W;
    }
    while i < n {
        // SAFETY: block i < n is in range; read before written.
        unsafe {
            let c = one_block::<DEC>(&k, t, ld(src.add(i * BLOCK)));
            st(dst.add(i * BLOCK), c);
        }
        t = mul_alpha(t);
        i += 1;
    }
    wipe(&mut k, _mm_setzero_si128());
    wipe(&mut last, _mm_setzero_si128());
}

/// VAES kernel: 8 ymm registers of 2 blocks each (256 bytes) per iteration,
/// enough independent `vaesenc`s to keep both AES units busy on Zen 3.
///
/// # Safety
/// The CPU has AES-NI, AVX2, VAES and VPCLMULQDQ; `src` readable and `dst`
/// writable for `n` blocks, the same range or disjoint.
#[target_feature(enable = "aes,sse2,avx2,vaes,vpclmulqdq")]
unsafe fn xts_vaes<const DEC: bool>(
    keys: &Keys,
    tweak: u64,
    src: *const u8,
    dst: *mut u8,
    n: usize,
) {
    const R: usize = 8; // ymm registers per iteration
    const W: usize = 2 * R; // blocks per iteration
    let k = load_keys(if DEC { &keys.dec } else { &keys.enc });
    let mut ky: [__m256i; 15] = core::array::from_fn(|r| _mm256_broadcastsi128_si256(k[r]));

    // Tweaks of blocks 0..16, two per register: tw[j] = (T·α^2j, T·α^(2j+1)).
    let mut t = first_tweak(keys, tweak);
    let mut tw = [_mm256_setzero_si256(); R];
    for twj in &mut tw {
        let lo = t;
        let hi = mul_alpha(lo);
        t = mul_alpha(hi);
        *twj = _mm256_set_m128i(hi, lo);
    }

    let mut last = [_mm256_setzero_si256(); R];
    let mut i = 0;
    while i + W <= n {
        let mut x = [_mm256_setzero_si256(); R];
        for j in 0..R {
            // SAFETY: blocks i + 2j and i + 2j + 1 < n are in range.
            let p = unsafe { ld2(src.add((i + 2 * j) * BLOCK)) };
            x[j] = _mm256_xor_si256(p, _mm256_xor_si256(tw[j], ky[0]));
            last[j] = _mm256_xor_si256(tw[j], ky[14]);
            tw[j] = mul_alpha16(tw[j]);
        }
        // As in `xts_aesni`: keep the final-round keys and the tweak state
        // in memory while the 8 AES chains run, so that LLVM does not
        // serialise the chains for lack of registers.
        black_box(&mut last);
        black_box(&mut tw);
        black_box(&mut ky);
        for rk in &ky[1..14] {
            for xj in &mut x {
                *xj = if DEC {
                    _mm256_aesdec_epi128(*xj, *rk)
                } else {
                    _mm256_aesenc_epi128(*xj, *rk)
                };
            }
        }
        for j in 0..R {
            let c = if DEC {
                _mm256_aesdeclast_epi128(x[j], last[j])
            } else {
                _mm256_aesenclast_epi128(x[j], last[j])
            };
            // SAFETY: in range as above; the whole group was read first.
            unsafe { st2(dst.add((i + 2 * j) * BLOCK), c) };
        }
        i += W;
    }

    // Fewer than 16 blocks left: tw[j] already holds the tweaks of blocks
    // i + 2j and i + 2j + 1, so the tail needs no new tweak arithmetic.
    let mut j = 0;
    while i + 2 <= n {
        // SAFETY: blocks i and i + 1 < n are in range; read before written.
        unsafe {
            let mut x = _mm256_xor_si256(ld2(src.add(i * BLOCK)), _mm256_xor_si256(tw[j], ky[0]));
            for rk in &ky[1..14] {
                x = if DEC {
                    _mm256_aesdec_epi128(x, *rk)
                } else {
                    _mm256_aesenc_epi128(x, *rk)
                };
            }
            let last = _mm256_xor_si256(ky[14], tw[j]);
            let c = if DEC {
                _mm256_aesdeclast_epi128(x, last)
            } else {
                _mm256_aesenclast_epi128(x, last)
            };
            st2(dst.add(i * BLOCK), c);
        }
        j += 1;
        i += 2;
    }
    if i < n {
        let t = _mm256_castsi256_si128(tw[j]);
        // SAFETY: block i < n is in range; read before written.
        unsafe {
            let c = one_block::<DEC>(&k, t, ld(src.add(i * BLOCK)));
            st(dst.add(i * BLOCK), c);
        }
    }
    // `k` was never forced to memory, and `tw` alone (E_K2(tweak)·α^j, not a
    // key) is harmless once `last` (= rk[14] ^ T) is gone; so only these two.
    wipe(&mut ky, _mm256_setzero_si256());
    wipe(&mut last, _mm256_setzero_si256());
}
