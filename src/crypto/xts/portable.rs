//! Portable XTS over the `aes` crate: the fallback for CPUs without AES-NI
//! and for other architectures, and the reference the fast paths are tested
//! against.
//!
//! `xts-mode` calls the cipher once per 16-byte block, which costs about 4x
//! (shared/bench/README.md). Here the tweaks of up to [`CHUNK`] blocks are
//! computed first, and the cipher runs once over the whole chunk with
//! `encrypt_blocks`/`decrypt_blocks`, so its own multi-block pipelining (AES-NI
//! when the `aes` crate detects it) is used.

#![forbid(unsafe_code)]

use aes::Aes256;
use aes::cipher::generic_array::GenericArray;
use aes::cipher::{BlockDecrypt, BlockEncrypt, KeyInit};

use super::{BLOCK, tweak_block};

/// Blocks per call into the `aes` crate: 512 bytes, so a 512-byte unit is
/// one call and a 4 KiB unit eight, while the scratch stays small.
const CHUNK: usize = 32;

/// Expanded keys. `aes` is built with its `zeroize` feature, so both
/// schedules are wiped when this is dropped.
pub(super) struct Keys {
    data: Aes256,
    tweak: Aes256,
}

impl Keys {
    /// Expands `key` = K1 || K2.
    pub(super) fn new(key: &[u8; 64]) -> Box<Self> {
        Box::new(Self {
            data: Aes256::new(GenericArray::from_slice(&key[..32])),
            tweak: Aes256::new(GenericArray::from_slice(&key[32..])),
        })
    }

    /// Encrypts (or with `DEC`, decrypts) one data unit in place. The caller
    /// has checked the length. (The two-buffer form copies first: this path is
    /// the fallback, and one code path is easier to trust than two.)
    pub(super) fn crypt_in_place<const DEC: bool>(&self, tweak: u64, buf: &mut [u8]) {
        let mut t = self.first_tweak(tweak);
        for c in buf.chunks_mut(CHUNK * BLOCK) {
            let n = c.len() / BLOCK;
            let mut ts = [0u128; CHUNK];
            let mut blocks = [GenericArray::default(); CHUNK];
            for i in 0..n {
                ts[i] = t;
                blocks[i] = (load(&c[i * BLOCK..]) ^ t).to_le_bytes().into();
                t = mul_alpha(t);
            }
            if DEC {
                self.data.decrypt_blocks(&mut blocks[..n]);
            } else {
                self.data.encrypt_blocks(&mut blocks[..n]);
            }
            for i in 0..n {
                let x = u128::from_le_bytes(blocks[i].into()) ^ ts[i];
                c[i * BLOCK..(i + 1) * BLOCK].copy_from_slice(&x.to_le_bytes());
            }
        }
    }

    /// T = AES-256(K2, data unit number), as a little-endian u128.
    fn first_tweak(&self, tweak: u64) -> u128 {
        let mut b = GenericArray::from(tweak_block(tweak));
        self.tweak.encrypt_block(&mut b);
        u128::from_le_bytes(b.into())
    }
}

/// The first 16 bytes of `b` as a little-endian u128.
fn load(b: &[u8]) -> u128 {
    let mut a = [0u8; BLOCK];
    a.copy_from_slice(&b[..BLOCK]);
    u128::from_le_bytes(a)
}

/// Multiplies a tweak by α (x) in GF(2^128) mod x^128 + x^7 + x^2 + x + 1.
/// IEEE 1619 stores the tweak little-endian, so "times x" is a left shift of
/// the u128 with 0x87 folded back in; the mask keeps it free of branches.
pub(super) fn mul_alpha(t: u128) -> u128 {
    let mask = 0u128.wrapping_sub(t >> 127);
    (t << 1) ^ (0x87 & mask)
}
