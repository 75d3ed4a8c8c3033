//! AES-256-XTS (IEEE 1619) over whole data units. The tweak is the content
//! block id (DESIGN invariant 1), encoded as a 128-bit little-endian number.

use crate::keys::secret::DataKey;

/// An expanded XTS key pair, ready to encrypt and decrypt data units.
pub struct Xts {
    _todo: (),
}

impl Xts {
    /// Expands `key` (64 bytes: data key half, then tweak key half).
    pub fn new(key: &DataKey) -> Self {
        let _ = key;
        todo!()
    }

    /// Encrypts one data unit `src` into `dst` (same length, a multiple of 16, at least 16).
    pub fn encrypt(&self, tweak: u64, src: &[u8], dst: &mut [u8]) {
        let _ = (tweak, src, dst);
        todo!()
    }

    /// Decrypts one data unit `src` into `dst`.
    pub fn decrypt(&self, tweak: u64, src: &[u8], dst: &mut [u8]) {
        let _ = (tweak, src, dst);
        todo!()
    }

    /// Encrypts one data unit in place.
    pub fn encrypt_in_place(&self, tweak: u64, buf: &mut [u8]) {
        let _ = (tweak, buf);
        todo!()
    }

    /// Decrypts one data unit in place.
    pub fn decrypt_in_place(&self, tweak: u64, buf: &mut [u8]) {
        let _ = (tweak, buf);
        todo!()
    }
}
