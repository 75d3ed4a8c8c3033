//! The tags of a write: under the zone's active MAC key, and during a MAC
//! rotation also under each retired key still held, so that dedup finds
//! content whose tag the re-tag pass has not moved yet (a match it had
//! before the rotation is never missed; tags of different versions are
//! never compared).

use super::ZoneCrypto;
use crate::crypto::tag::Tag;
use crate::ids::BLOCK_SIZE;

/// Tags of the blocks of one write.
pub struct WriteTags {
    /// The MAC key version of `tags`.
    pub mac: u32,
    /// Per block: its tag, or `None` for an all-zero block (unmapped).
    pub tags: Vec<Option<Tag>>,
    /// Per retired MAC key still held: its version and the blocks' tags
    /// under it (empty outside a MAC rotation).
    pub old: Vec<(u32, Vec<Option<Tag>>)>,
}

impl WriteTags {
    /// Tags the whole blocks of `plain`; each run of non-zero blocks in
    /// one batch per key.
    pub fn of(crypto: &ZoneCrypto, plain: &[u8]) -> Self {
        let n = plain.len() / BLOCK_SIZE;
        let nonzero: Vec<bool> = plain
            .chunks_exact(BLOCK_SIZE)
            .map(|b| b.iter().any(|&x| x != 0))
            .collect();
        let under = |tagger: &crate::crypto::tag::Tagger| {
            let mut all = vec![Tag::default(); n];
            let mut i = 0;
            while i < n {
                if !nonzero[i] {
                    i += 1;
                    continue;
                }
                let start = i;
                while i < n && nonzero[i] {
                    i += 1;
                }
                tagger.tag_blocks(
                    &plain[start * BLOCK_SIZE..i * BLOCK_SIZE],
                    &mut all[start..i],
                );
            }
            all.into_iter()
                .zip(&nonzero)
                .map(|(t, &nz)| nz.then_some(t))
                .collect::<Vec<_>>()
        };
        Self {
            mac: crypto.mac_version(),
            tags: under(crypto.tagger()),
            old: crypto.old_taggers().map(|(v, t)| (v, under(t))).collect(),
        }
    }
}
