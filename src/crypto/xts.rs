//! AES-256-XTS (IEEE 1619) over whole data units. The tweak is the content
//! block id (DESIGN invariant 1), encoded as a 128-bit little-endian data
//! unit sequence number, as dm-crypt's `plain64` does.
//!
//! Contract: a data unit is a non-zero multiple of 16 bytes (4096 in the
//! store, 512 in some benchmarks), and input and output have the same length.
//! There is no ciphertext stealing, because keyturn never has a partial
//! block. The lengths come from our own code, never from the network, so a
//! violation is a bug and panics.
//!
//! Backends, picked once in [`Xts::new`] by runtime CPU detection, so one
//! portable build runs everywhere and still gets the fast path:
//! - [`Backend::Vaes`]: x86_64 with VAES, VPCLMULQDQ and AVX2 (Zen 3+, Ice
//!   Lake+): 16 blocks per iteration in 8 ymm registers.
//! - [`Backend::AesNi`]: x86_64 with AES-NI: 8 blocks interleaved.
//! - [`Backend::Portable`]: the `aes` crate, one `encrypt_blocks` call per
//!   512 bytes with the tweaks applied by hand; also the test reference.
//!
//! All three give identical output; the tests check each against the IEEE
//! vectors and against each other.
//!
//! Speed on the Zen 3 dev box, one core, 4 KiB units (`tools/bench-xts.sh`,
//! `cargo bench --bench xts`): VAES about 9.1 GB/s, AES-NI 5.2, portable
//! 3.0, against 5.7 for OpenSSL 3.0; 512-byte units: 6.0 / 4.5 / 2.6 vs 4.5.

#![deny(unsafe_code)] // only the `x86` submodule allows it

mod portable;
#[cfg(test)]
mod vectors;
#[cfg(target_arch = "x86_64")]
mod x86;

use crate::keys::secret::DataKey;

/// AES block size in bytes.
const BLOCK: usize = 16;

/// The data unit number `tweak` as the 16-byte little-endian block that is
/// encrypted under K2.
fn tweak_block(tweak: u64) -> [u8; BLOCK] {
    let mut b = [0u8; BLOCK];
    b[..8].copy_from_slice(&tweak.to_le_bytes());
    b
}

/// An XTS implementation, chosen at run time.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Backend {
    /// x86_64 VAES + VPCLMULQDQ + AVX2.
    Vaes,
    /// x86_64 AES-NI.
    AesNi,
    /// The `aes` crate (any CPU).
    Portable,
}

impl Backend {
    /// A short name for logs and benchmark output.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Vaes => "vaes-avx2",
            Backend::AesNi => "aes-ni",
            Backend::Portable => "portable",
        }
    }

    /// Whether the running CPU can use this backend.
    pub fn available(self) -> bool {
        match self {
            #[cfg(target_arch = "x86_64")]
            Backend::Vaes => x86::Isa::Vaes.detected(),
            #[cfg(target_arch = "x86_64")]
            Backend::AesNi => x86::Isa::AesNi.detected(),
            #[cfg(not(target_arch = "x86_64"))]
            Backend::Vaes | Backend::AesNi => false,
            Backend::Portable => true,
        }
    }
}

/// Expanded key schedules. Each variant owns its schedules on the heap, so
/// moving an `Xts` never leaves a copy behind, and wipes them on drop.
enum Imp {
    #[cfg(target_arch = "x86_64")]
    X86(Box<x86::Keys>),
    Portable(Box<portable::Keys>),
}

/// An expanded XTS key pair, ready to encrypt and decrypt data units.
///
/// The round keys are zeroized on drop and never shown by `Debug`.
pub struct Xts {
    imp: Imp,
}

impl std::fmt::Debug for Xts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Xts")
            .field("backend", &self.backend())
            .finish_non_exhaustive()
    }
}

impl Xts {
    /// Expands `key` (64 bytes: data key half, then tweak key half), with the
    /// fastest backend this CPU supports.
    pub fn new(key: &DataKey) -> Self {
        [Backend::Vaes, Backend::AesNi]
            .into_iter()
            .find_map(|b| Self::with_backend(key, b))
            .unwrap_or_else(|| Self::portable(key))
    }

    /// Expands `key` for one given backend, or `None` if this CPU lacks it.
    /// For tests and benchmarks; the store should use [`Xts::new`].
    pub fn with_backend(key: &DataKey, backend: Backend) -> Option<Self> {
        match backend {
            #[cfg(target_arch = "x86_64")]
            Backend::Vaes => x86::Keys::new(key.expose(), x86::Isa::Vaes).map(Imp::X86),
            #[cfg(target_arch = "x86_64")]
            Backend::AesNi => x86::Keys::new(key.expose(), x86::Isa::AesNi).map(Imp::X86),
            #[cfg(not(target_arch = "x86_64"))]
            Backend::Vaes | Backend::AesNi => None,
            Backend::Portable => return Some(Self::portable(key)),
        }
        .map(|imp| Self { imp })
    }

    fn portable(key: &DataKey) -> Self {
        Self {
            imp: Imp::Portable(portable::Keys::new(key.expose())),
        }
    }

    /// The backend in use.
    pub fn backend(&self) -> Backend {
        match &self.imp {
            #[cfg(target_arch = "x86_64")]
            Imp::X86(k) => match k.isa() {
                x86::Isa::Vaes => Backend::Vaes,
                x86::Isa::AesNi => Backend::AesNi,
            },
            Imp::Portable(_) => Backend::Portable,
        }
    }

    /// Encrypts one data unit `src` into `dst` (same length, a multiple of 16, at least 16).
    pub fn encrypt(&self, tweak: u64, src: &[u8], dst: &mut [u8]) {
        self.crypt::<false>(tweak, src, dst);
    }

    /// Decrypts one data unit `src` into `dst`.
    pub fn decrypt(&self, tweak: u64, src: &[u8], dst: &mut [u8]) {
        self.crypt::<true>(tweak, src, dst);
    }

    /// Encrypts one data unit in place.
    pub fn encrypt_in_place(&self, tweak: u64, buf: &mut [u8]) {
        self.crypt_in_place::<false>(tweak, buf);
    }

    /// Decrypts one data unit in place.
    pub fn decrypt_in_place(&self, tweak: u64, buf: &mut [u8]) {
        self.crypt_in_place::<true>(tweak, buf);
    }

    /// Encrypts `tweaks.len()` consecutive data units of `unit` bytes each in
    /// place; unit `i` is `buf[i * unit..][..unit]` under `tweaks[i]`.
    pub fn encrypt_units_in_place(&self, unit: usize, tweaks: &[u64], buf: &mut [u8]) {
        self.units_in_place::<false>(unit, tweaks, buf);
    }

    /// Decrypts what [`Xts::encrypt_units_in_place`] produced.
    pub fn decrypt_units_in_place(&self, unit: usize, tweaks: &[u64], buf: &mut [u8]) {
        self.units_in_place::<true>(unit, tweaks, buf);
    }

    fn units_in_place<const DEC: bool>(&self, unit: usize, tweaks: &[u64], buf: &mut [u8]) {
        assert!(
            unit.checked_mul(tweaks.len()) == Some(buf.len()),
            "XTS batch: buffer is not tweaks.len() units"
        );
        if unit == 0 {
            // Zero units: nothing to do. (A zero-length unit with tweaks is
            // caught by the per-unit check below.)
            assert!(
                tweaks.is_empty(),
                "XTS data unit must be a non-zero multiple of 16 bytes"
            );
            return;
        }
        for (&t, u) in tweaks.iter().zip(buf.chunks_exact_mut(unit)) {
            self.crypt_in_place::<DEC>(t, u);
        }
    }

    fn crypt<const DEC: bool>(&self, tweak: u64, src: &[u8], dst: &mut [u8]) {
        check_unit(src.len());
        assert_eq!(src.len(), dst.len(), "XTS src and dst lengths differ");
        match &self.imp {
            #[cfg(target_arch = "x86_64")]
            Imp::X86(k) => k.crypt::<DEC>(tweak, src, dst),
            Imp::Portable(k) => {
                dst.copy_from_slice(src);
                k.crypt_in_place::<DEC>(tweak, dst);
            }
        }
    }

    fn crypt_in_place<const DEC: bool>(&self, tweak: u64, buf: &mut [u8]) {
        check_unit(buf.len());
        match &self.imp {
            #[cfg(target_arch = "x86_64")]
            Imp::X86(k) => k.crypt_in_place::<DEC>(tweak, buf),
            Imp::Portable(k) => k.crypt_in_place::<DEC>(tweak, buf),
        }
    }
}

/// The internal contract on a data unit's length (see the module docs).
fn check_unit(len: usize) {
    assert!(
        len >= BLOCK && len.is_multiple_of(BLOCK),
        "XTS data unit must be a non-zero multiple of 16 bytes, got {len}"
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, RngCore, SeedableRng};

    fn hex(s: &str) -> Vec<u8> {
        assert!(s.len().is_multiple_of(2));
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn key_from_hex(s: &str) -> DataKey {
        DataKey::from_slice(&hex(s)).unwrap()
    }

    /// Every backend this CPU can run, portable first.
    fn backends(key: &DataKey) -> Vec<Xts> {
        [Backend::Portable, Backend::AesNi, Backend::Vaes]
            .into_iter()
            .filter_map(|b| Xts::with_backend(key, b))
            .collect()
    }

    #[test]
    fn ieee1619_vectors_10_to_14() {
        let key = key_from_hex(vectors::IEEE_KEY);
        let pt: Vec<u8> = (0..512).map(|i| i as u8).collect();
        for x in backends(&key) {
            for (tweak, ct_hex) in vectors::IEEE_CT {
                let ct = hex(ct_hex);
                let mut out = vec![0u8; 512];
                x.encrypt(tweak, &pt, &mut out);
                assert!(out == ct, "{:?} encrypt, tweak {tweak:#x}", x.backend());
                x.decrypt(tweak, &ct, &mut out);
                assert!(out == pt, "{:?} decrypt, tweak {tweak:#x}", x.backend());
                let mut buf = pt.clone();
                x.encrypt_in_place(tweak, &mut buf);
                assert!(buf == ct, "{:?} encrypt_in_place", x.backend());
                x.decrypt_in_place(tweak, &mut buf);
                assert!(buf == pt, "{:?} decrypt_in_place", x.backend());
            }
        }
    }

    #[test]
    fn openssl_4k_unit() {
        let key: Vec<u8> = (0..64u32).map(|i| (i * 37 + 11) as u8).collect();
        let key = DataKey::from_slice(&key).unwrap();
        let pt: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 3) as u8).collect();
        let ct = hex(vectors::OPENSSL_4K_CT);
        for x in backends(&key) {
            let mut out = vec![0u8; 4096];
            x.encrypt(vectors::OPENSSL_4K_TWEAK, &pt, &mut out);
            assert!(out == ct, "{:?} encrypt", x.backend());
            x.decrypt_in_place(vectors::OPENSSL_4K_TWEAK, &mut out);
            assert!(out == pt, "{:?} decrypt", x.backend());
        }
    }

    /// Every fast path against the portable one, on random keys, tweaks and
    /// lengths (including the 1..15-block tails around the 8- and 16-block
    /// groups), and both in place and out of place.
    #[test]
    fn fast_paths_match_portable() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed_1619);
        let mut lens: Vec<usize> = (1..=40).map(|b| b * BLOCK).collect();
        lens.extend([512, 4096, 4096 + 16, 8192 - 16]);
        for round in 0..20 {
            let key = DataKey::generate();
            let all = backends(&key);
            let reference = &all[0];
            assert_eq!(reference.backend(), Backend::Portable);
            for &len in &lens {
                let tweak = match round {
                    0 => 0,
                    1 => u64::MAX,
                    _ => rng.r#gen(),
                };
                let mut pt = vec![0u8; len];
                rng.fill_bytes(&mut pt);
                let mut want = vec![0u8; len];
                reference.encrypt(tweak, &pt, &mut want);
                for x in &all[1..] {
                    let mut got = vec![0u8; len];
                    x.encrypt(tweak, &pt, &mut got);
                    assert!(got == want, "{:?} encrypt len {len}", x.backend());
                    let mut back = vec![0u8; len];
                    x.decrypt(tweak, &got, &mut back);
                    assert!(back == pt, "{:?} decrypt len {len}", x.backend());
                    let mut buf = pt.clone();
                    x.encrypt_in_place(tweak, &mut buf);
                    assert!(buf == want, "{:?} encrypt_in_place len {len}", x.backend());
                    x.decrypt_in_place(tweak, &mut buf);
                    assert!(buf == pt, "{:?} decrypt_in_place len {len}", x.backend());
                }
            }
        }
    }

    #[test]
    fn new_picks_the_fastest_available() {
        let x = Xts::new(&DataKey::generate());
        let want = [Backend::Vaes, Backend::AesNi, Backend::Portable]
            .into_iter()
            .find(|b| b.available())
            .unwrap();
        assert_eq!(x.backend(), want);
    }

    #[test]
    fn tweak_and_key_matter() {
        let key = DataKey::generate();
        let x = Xts::new(&key);
        let pt = [0u8; 4096];
        let (mut a, mut b) = ([0u8; 4096], [0u8; 4096]);
        x.encrypt(1, &pt, &mut a);
        x.encrypt(2, &pt, &mut b);
        assert_ne!(a, b);
        // Within a unit, equal plaintext blocks encrypt differently.
        assert_ne!(a[..16], a[16..32]);
        Xts::new(&DataKey::generate()).encrypt(1, &pt, &mut b);
        assert_ne!(a, b);
    }

    #[test]
    fn units_batch_matches_single_units() {
        let x = Xts::new(&DataKey::generate());
        let tweaks = [7u64, 3, 1 << 40];
        let mut buf = vec![0u8; 3 * 4096];
        rand::thread_rng().fill_bytes(&mut buf);
        let orig = buf.clone();
        x.encrypt_units_in_place(4096, &tweaks, &mut buf);
        for (i, &t) in tweaks.iter().enumerate() {
            let mut one = vec![0u8; 4096];
            x.encrypt(t, &orig[i * 4096..][..4096], &mut one);
            assert!(one == buf[i * 4096..][..4096]);
        }
        x.decrypt_units_in_place(4096, &tweaks, &mut buf);
        assert!(buf == orig);
    }

    #[test]
    fn debug_shows_backend_only() {
        let key = DataKey::from_bytes([0xab; 64]);
        for x in backends(&key) {
            let s = format!("{x:?}");
            assert!(s.starts_with("Xts { backend: "), "{s}");
            assert!(
                !s.to_lowercase().contains("ab, ") && !s.contains("171"),
                "{s}"
            );
        }
    }

    #[test]
    #[should_panic(expected = "non-zero multiple of 16")]
    fn rejects_partial_block() {
        Xts::new(&DataKey::generate()).encrypt_in_place(0, &mut [0u8; 100]);
    }

    #[test]
    #[should_panic(expected = "non-zero multiple of 16")]
    fn rejects_empty_unit() {
        Xts::new(&DataKey::generate()).encrypt_in_place(0, &mut []);
    }

    #[test]
    #[should_panic(expected = "lengths differ")]
    fn rejects_length_mismatch() {
        Xts::new(&DataKey::generate()).encrypt(0, &[0u8; 32], &mut [0u8; 48]);
    }

    #[test]
    fn portable_mul_alpha_carries() {
        assert_eq!(portable::mul_alpha(1), 2);
        assert_eq!(portable::mul_alpha(1 << 127), 0x87);
        assert_eq!(portable::mul_alpha((1 << 127) | 1), 0x85);
    }
}
