//! Key material types. Every one zeroizes on drop and redacts in Debug;
//! none implements Display, Serialize or Clone-by-accident into logs.

use zeroize::{Zeroize, ZeroizeOnDrop};

macro_rules! secret_key {
    ($(#[$m:meta])* $name:ident, $len:expr) => {
        $(#[$m])*
        #[derive(Clone, Zeroize, ZeroizeOnDrop)]
        pub struct $name(Box<[u8; $len]>);

        impl $name {
            /// Length of the key in bytes.
            pub const LEN: usize = $len;

            /// Wraps raw bytes (the caller zeroizes its own copy).
            pub fn from_bytes(bytes: [u8; $len]) -> Self {
                let mut b = Box::new([0u8; $len]);
                b.copy_from_slice(&bytes);
                let mut bytes = bytes;
                bytes.zeroize();
                Self(b)
            }

            /// Copies from a slice of exactly `LEN` bytes.
            pub fn from_slice(bytes: &[u8]) -> Option<Self> {
                if bytes.len() != $len {
                    return None;
                }
                let mut b = Box::new([0u8; $len]);
                b.copy_from_slice(bytes);
                Some(Self(b))
            }

            /// The raw bytes; only crypto code should call this.
            pub fn expose(&self) -> &[u8; $len] {
                &self.0
            }
        }

        impl std::fmt::Debug for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, concat!(stringify!($name), "(<redacted>)"))
            }
        }
    };
}

secret_key!(
    /// A data encryption key: AES-256-XTS, two independent 256-bit halves.
    DataKey,
    64
);
secret_key!(
    /// A zone's MAC key: keys BLAKE3 for content tags and dedup.
    MacKey,
    32
);
secret_key!(
    /// A key-encryption key (AES-256), wraps a zone's DEKs and MAC key.
    Kek,
    32
);
secret_key!(
    /// The root key (AES-256) that wraps KEKs.
    RootKey,
    32
);

impl DataKey {
    /// A fresh random XTS key whose two halves differ (DESIGN invariant 2).
    pub fn generate() -> Self {
        use rand::RngCore;
        let mut b = Box::new([0u8; 64]);
        loop {
            rand::rngs::OsRng.fill_bytes(&mut b[..]);
            if b[..32] != b[32..] {
                return Self(b);
            }
        }
    }
}

macro_rules! generate_plain {
    ($name:ident) => {
        impl $name {
            /// A fresh random key from the OS generator.
            pub fn generate() -> Self {
                use rand::RngCore;
                let mut b = Box::new([0u8; Self::LEN]);
                rand::rngs::OsRng.fill_bytes(&mut b[..]);
                Self(b)
            }
        }
    };
}
generate_plain!(MacKey);
generate_plain!(Kek);
generate_plain!(RootKey);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_redacts() {
        let k = DataKey::from_bytes([0xab; 64]);
        let s = format!("{k:?}");
        assert_eq!(s, "DataKey(<redacted>)");
        assert!(!s.contains("ab"));
    }

    #[test]
    fn xts_halves_differ() {
        for _ in 0..16 {
            let k = DataKey::generate();
            assert_ne!(k.expose()[..32], k.expose()[32..]);
        }
    }
}
