//! Key material types. Every one zeroizes on drop and redacts in Debug;
//! none implements Display, Serialize or Clone-by-accident into logs.
//!
//! Each key lives in its own heap box that is `mlock`ed where the system
//! allows, so it is never written to swap. A refused lock (RLIMIT_MEMLOCK,
//! no privilege) is tolerated: it is counted in [`mlock_failures`] and
//! warned about once.

use std::sync::atomic::{AtomicU64, Ordering};

use zeroize::{Zeroize, ZeroizeOnDrop};

static MLOCK_FAILURES: AtomicU64 = AtomicU64::new(0);

/// How many key buffers the OS refused to lock into memory since start.
/// Non-zero means some key bytes could reach swap.
pub fn mlock_failures() -> u64 {
    MLOCK_FAILURES.load(Ordering::Relaxed)
}

/// A zeroed box for key bytes, locked into RAM before any key is put in it.
///
/// The pages are never unlocked: mlock does not nest, so munlocking one key's
/// page would silently unlock any other key that shares it. Keys are few and
/// long-lived, so the pages that stay locked are few.
fn locked_box<const N: usize>() -> Box<[u8; N]> {
    let b = Box::new([0u8; N]);
    // SAFETY: mlock reads and writes no memory; it only pins the pages that
    // span this live allocation, whose pointer and length come from a valid
    // reference. Failure leaves memory unchanged and is handled below.
    let rc = unsafe { libc::mlock(b.as_ptr().cast(), N) };
    if rc != 0 && MLOCK_FAILURES.fetch_add(1, Ordering::Relaxed) == 0 {
        tracing::warn!(
            error = %std::io::Error::last_os_error(),
            "cannot mlock key memory; keys may be swapped to disk (raise RLIMIT_MEMLOCK)"
        );
    }
    b
}

macro_rules! secret_key {
    ($(#[$m:meta])* $name:ident, $len:expr) => {
        $(#[$m])*
        #[derive(Zeroize, ZeroizeOnDrop)]
        pub struct $name(Box<[u8; $len]>);

        impl Clone for $name {
            // By hand, so the copy gets a locked box too.
            fn clone(&self) -> Self {
                let mut b = locked_box::<$len>();
                b.copy_from_slice(&self.0[..]);
                Self(b)
            }
        }

        impl $name {
            /// Length of the key in bytes.
            pub const LEN: usize = $len;

            /// Wraps raw bytes (the caller zeroizes its own copy).
            pub fn from_bytes(bytes: [u8; $len]) -> Self {
                let mut b = locked_box::<$len>();
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
                let mut b = locked_box::<$len>();
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
    /// A stream window key (AES-256-GCM): seals one window's change records.
    StreamKey,
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
        let mut b = locked_box::<64>();
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
                let mut b = locked_box::<{ Self::LEN }>();
                rand::rngs::OsRng.fill_bytes(&mut b[..]);
                Self(b)
            }
        }
    };
}
generate_plain!(MacKey);
generate_plain!(StreamKey);
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
    fn clone_copies_into_a_new_box() {
        let k = Kek::generate();
        let c = k.clone();
        assert_eq!(k.expose(), c.expose());
        assert_ne!(k.expose().as_ptr(), c.expose().as_ptr());
        // Locking may be refused here (RLIMIT_MEMLOCK); it must not fail.
        let _ = mlock_failures();
    }

    #[test]
    fn xts_halves_differ() {
        for _ in 0..16 {
            let k = DataKey::generate();
            assert_ne!(k.expose()[..32], k.expose()[32..]);
        }
    }
}
