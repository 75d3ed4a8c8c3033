//! Content tags: keyed BLAKE3 of a content block's plaintext under the
//! zone's MAC key. Used to verify reads and, later, to find duplicates.

#![deny(unsafe_code)] // only the kernels and their shared tree walk allow it

use crate::ids::BLOCK_SIZE;
use crate::keys::secret::MacKey;

#[cfg(target_arch = "x86_64")]
mod tree;
#[cfg(target_arch = "x86_64")]
mod x16;
#[cfg(target_arch = "x86_64")]
mod x8;

/// A 256-bit content tag.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Tag(pub [u8; 32]);

impl std::fmt::Debug for Tag {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // A tag is not secret, but it is derived from plaintext: show a prefix only.
        write!(
            f,
            "Tag({:02x}{:02x}{:02x}{:02x}…)",
            self.0[0], self.0[1], self.0[2], self.0[3]
        )
    }
}

/// Computes tags under one MAC key.
pub struct Tagger {
    key: MacKey,
}

impl Tagger {
    /// A tagger for `key`.
    pub fn new(key: &MacKey) -> Self {
        Self { key: key.clone() }
    }

    /// The tag of `data`.
    pub fn tag(&self, data: &[u8]) -> Tag {
        Tag(*blake3::keyed_hash(self.key.expose(), data).as_bytes())
    }

    /// Whether `data` has tag `expected`, compared in constant time.
    pub fn verify(&self, data: &[u8], expected: &Tag) -> bool {
        blake3::keyed_hash(self.key.expose(), data) == blake3::Hash::from(expected.0)
    }

    /// The tags of consecutive whole blocks: `out[i]` gets the tag of
    /// `data[i * BLOCK_SIZE..(i + 1) * BLOCK_SIZE]`, the same as
    /// [`tag`](Self::tag) of it. Batches of blocks are hashed many lanes at a
    /// time where the CPU allows (see [`batch_kernel`](Self::batch_kernel)).
    pub fn tag_blocks(&self, data: &[u8], out: &mut [Tag]) {
        assert_eq!(
            data.len(),
            out.len() * BLOCK_SIZE,
            "whole blocks, one tag each"
        );
        #[cfg(target_arch = "x86_64")]
        match *BATCH {
            Batch::X16(k) if out.len() >= X16_MIN_BLOCKS => {
                return k.keyed_hash_blocks(self.key.expose(), data, out);
            }
            Batch::X8(k) if out.len() >= X8_MIN_BLOCKS => {
                return k.keyed_hash_blocks(self.key.expose(), data, out);
            }
            _ => {}
        }
        for (t, b) in out.iter_mut().zip(data.chunks_exact(BLOCK_SIZE)) {
            *t = self.tag(b);
        }
    }

    /// Which kernel [`tag_blocks`](Self::tag_blocks) uses on this CPU, and
    /// from how many blocks: for logs and benchmark output.
    pub fn batch_kernel() -> &'static str {
        #[cfg(target_arch = "x86_64")]
        match *BATCH {
            Batch::X16(_) => return "x16 (AVX-512F, 16 lanes) from 4 blocks",
            Batch::X8(_) => return "x8 (AVX2, 8 lanes) from 2 blocks",
            Batch::None => {}
        }
        "none (the blake3 crate, one block at a time)"
    }
}

impl Tag {
    /// Whether two tags are equal, compared in constant time.
    pub fn ct_eq(&self, other: &Tag) -> bool {
        blake3::Hash::from(self.0) == blake3::Hash::from(other.0)
    }
}

/// The widest many-lane kernel this CPU has. Each proves its CPU features,
/// so holding one is what allows the call.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy, Debug)]
enum Batch {
    X16(x16::X16),
    X8(x8::X8),
    None,
}

#[cfg(target_arch = "x86_64")]
static BATCH: std::sync::LazyLock<Batch> = std::sync::LazyLock::new(|| {
    if let Some(k) = x16::X16::detect() {
        Batch::X16(k)
    } else if let Some(k) = x8::X8::detect() {
        Batch::X8(k)
    } else {
        Batch::None
    }
});

/// Fewest blocks worth the 16-lane kernel: below this its idle lanes cost
/// more than the crate's one-input path (`cargo bench --bench tag`).
#[cfg(target_arch = "x86_64")]
const X16_MIN_BLOCKS: usize = 4;

/// Fewest blocks worth the 8-lane kernel, used only without AVX-512F: two
/// blocks fill its chunk lanes (`cargo bench --bench tag`).
#[cfg(target_arch = "x86_64")]
const X8_MIN_BLOCKS: usize = 2;

#[cfg(test)]
mod tests {
    use super::*;

    fn data() -> Vec<u8> {
        (0..4096u32).map(|i| (i * 13 + 5) as u8).collect()
    }

    #[test]
    fn verify_accepts_its_own_tag() {
        let t = Tagger::new(&MacKey::generate());
        let d = data();
        let tag = t.tag(&d);
        assert!(t.verify(&d, &tag));
        assert_eq!(tag, t.tag(&d), "tags are deterministic");
    }

    #[test]
    fn verify_rejects_any_flipped_bit() {
        let t = Tagger::new(&MacKey::generate());
        let d = data();
        let tag = t.tag(&d);
        for (byte, bit) in [(0, 0), (1, 7), (2048, 3), (4095, 7)] {
            let mut bad = d.clone();
            bad[byte] ^= 1 << bit;
            assert!(!t.verify(&bad, &tag), "data bit {byte}:{bit}");
        }
        for (byte, bit) in [(0, 0), (31, 7)] {
            let mut bad = tag;
            bad.0[byte] ^= 1 << bit;
            assert!(!t.verify(&d, &bad), "tag bit {byte}:{bit}");
        }
        // A block one byte shorter or longer is different data.
        assert!(!t.verify(&d[..4095], &tag));
    }

    #[test]
    fn different_keys_give_different_tags() {
        let d = data();
        let a = Tagger::new(&MacKey::generate());
        let b = Tagger::new(&MacKey::generate());
        assert_ne!(a.tag(&d), b.tag(&d));
        assert!(!b.verify(&d, &a.tag(&d)));
    }

    #[test]
    fn keyed_blake3_known_answer() {
        // Pins the construction to BLAKE3 keyed_hash (not a plain hash of
        // key || data), so a silent change of scheme shows up here. The value
        // is from the BLAKE3 reference test vectors (input_len 0, key
        // "whats the Elvish word for friend").
        let key = MacKey::from_bytes(*b"whats the Elvish word for friend");
        let want = "92b2b75604ed3c761f9d6f62392c8a9227ad0ea3f09573e783f1498a4ed60d26";
        let got = Tagger::new(&key).tag(&[]);
        let got: String = got.0.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(got, want);
    }

    #[test]
    fn tag_blocks_matches_tag_at_every_batch_size() {
        use rand::RngCore;
        let t = Tagger::new(&MacKey::generate());
        let mut data = vec![0u8; 70 * BLOCK_SIZE];
        rand::thread_rng().fill_bytes(&mut data);
        for n in 0..=70 {
            let d = &data[..n * BLOCK_SIZE];
            let mut out = vec![Tag::default(); n];
            t.tag_blocks(d, &mut out);
            for (i, tag) in out.iter().enumerate() {
                let b = &d[i * BLOCK_SIZE..(i + 1) * BLOCK_SIZE];
                assert_eq!(*tag, t.tag(b), "batch of {n}, block {i}");
                assert!(t.verify(b, tag) && tag.ct_eq(&t.tag(b)));
            }
        }
        let mut other = Tag::default();
        other.0[0] = 1;
        assert!(!Tag::default().ct_eq(&other));
    }

    #[test]
    fn batches_take_the_widest_kernel_the_cpu_has() {
        let name = Tagger::batch_kernel();
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx512f") {
            assert!(name.starts_with("x16"), "{name}");
        } else if std::is_x86_feature_detected!("avx2") {
            // On AVX2 without AVX-512F (the Zen 3 dev box), the batch sizes
            // of `tag_blocks_matches_tag_at_every_batch_size` run `x8`.
            assert!(name.starts_with("x8"), "{name}");
        } else {
            assert!(name.starts_with("none"), "{name}");
        }
        eprintln!("batch kernel: {name}");
    }

    #[test]
    fn debug_shows_a_prefix_only() {
        let s = format!("{:?}", Tag([0xab; 32]));
        assert_eq!(s, "Tag(abababab…)");
    }
}
