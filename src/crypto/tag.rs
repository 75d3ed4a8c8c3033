//! Content tags: keyed BLAKE3 of a content block's plaintext under the
//! zone's MAC key. Used to verify reads and, later, to find duplicates.

use crate::keys::secret::MacKey;

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
}
