//! What a journal frame holds: metadata changes ([`Entry`]) and their
//! byte encoding. Pure data: no I/O.

use crate::crypto::tag::Tag;
use crate::ids::{Cbid, KeyVersion, Lba, Slot, VolumeId, ZoneId};

use super::JournalError;

/// A content block's copy on the staging device, under the next DEK.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct StagedCopy {
    /// Slot on the staging device.
    pub slot: Slot,
    /// Version of the DEK that encrypted this copy.
    pub key_version: KeyVersion,
}

/// Which device a copy lives on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Place {
    /// The data device.
    Data,
    /// The staging device.
    Staging,
}

/// The copy of a content block that reads are served from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LiveCopy {
    /// Device.
    pub place: Place,
    /// Slot on that device.
    pub slot: Slot,
    /// DEK version of that copy.
    pub key_version: KeyVersion,
}

/// One content block's record: where it lives and how to check it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CbRecord {
    /// Slot on the data device.
    pub slot: Slot,
    /// Version of the DEK that encrypted the data-device copy.
    pub key_version: KeyVersion,
    /// Number of logical blocks mapped to it (0 = free).
    pub refcount: u32,
    /// Keyed BLAKE3 of the plaintext.
    pub tag: Tag,
    /// Version of the MAC key that made `tag` (1 in pools from before MAC
    /// rotation). Tags of different versions are never compared.
    pub mac: u32,
    /// A copy under a newer DEK on the staging device, if staged.
    pub staged: Option<StagedCopy>,
}

impl CbRecord {
    /// The copy that holds the block's live ciphertext, given the zone's
    /// active DEK version. A staged copy becomes live when the flip makes
    /// its key active (or older than active): the flip itself touches no
    /// record. Staged copies of an aborted window are cleared before any
    /// later flip, so a version above the active one never turns live by
    /// accident.
    pub fn live(&self, active: KeyVersion) -> LiveCopy {
        match self.staged {
            Some(s) if s.key_version <= active => LiveCopy {
                place: Place::Staging,
                slot: s.slot,
                key_version: s.key_version,
            },
            _ => LiveCopy {
                place: Place::Data,
                slot: self.slot,
                key_version: self.key_version,
            },
        }
    }
}

/// One metadata change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Entry {
    /// Logical block `lba` of `volume` now maps to `cbid` (`None`: unmapped).
    Map {
        /// Volume.
        volume: VolumeId,
        /// Block.
        lba: Lba,
        /// Content block, or none.
        cbid: Option<Cbid>,
    },
    /// Content block `cbid` of `zone` is now `record`.
    Cb {
        /// Zone.
        zone: ZoneId,
        /// Content block.
        cbid: Cbid,
        /// Its record.
        record: CbRecord,
    },
    /// Content block `cbid` of `zone` is free (its slots too).
    CbFree {
        /// Zone.
        zone: ZoneId,
        /// Content block.
        cbid: Cbid,
    },
    /// The flip: DEK `to` becomes the active key of `zone`. One record, so
    /// recovery sees the zone either before or after it.
    Flip {
        /// Zone.
        zone: ZoneId,
        /// The newly active DEK version.
        to: KeyVersion,
    },
    /// A rollback: DEK `to`, the key the last flip moved away from, is the
    /// active key of `zone` again (the flip's new key stays for decryption).
    /// Unlike a flip it may lower the active version, so replay applies it
    /// as it stands, in journal order. One record, like the flip.
    Rollback {
        /// Zone.
        zone: ZoneId,
        /// The DEK version active again.
        to: KeyVersion,
    },
    /// A replica zone has applied the source's stream through record `seq`;
    /// in the same frame as the data that record carried, so the two are
    /// durable together.
    Applied {
        /// Replica zone.
        zone: ZoneId,
        /// Source stream sequence.
        seq: u64,
    },
}

const E_MAP: u8 = 1;
const E_CB: u8 = 2;
const E_CB_FREE: u8 = 3;
const E_FLIP: u8 = 4;
const E_APPLIED: u8 = 5;
/// `[zone u32][to u32]`. Added after the others: an older keyturn meets it
/// as an unknown entry type and refuses the journal, never misreads it.
const E_ROLLBACK: u8 = 6;
/// `E_CB`'s 72 bytes, then `[mac u32]`: a record whose tag is under a MAC
/// key other than v1. Records under v1 keep the old entry, so a journal
/// without MAC rotations stays readable by an older keyturn.
const E_CB_MAC: u8 = 7;

impl Entry {
    /// The zone the entry changes, if it names one (a mapping names its
    /// volume only).
    pub fn zone(&self) -> Option<ZoneId> {
        match self {
            Entry::Map { .. } => None,
            Entry::Cb { zone, .. }
            | Entry::CbFree { zone, .. }
            | Entry::Flip { zone, .. }
            | Entry::Rollback { zone, .. }
            | Entry::Applied { zone, .. } => Some(*zone),
        }
    }

    /// Whether a frame holding this entry may point to data that must be
    /// durable before it: a content block's slots on the data or staging
    /// device, or the stream record of the change it maps. A flip or a
    /// rollback only names a key version; the staged copies a flip makes
    /// live were recorded (and their data synced) by earlier frames of its
    /// zone, which are durable first: frames of one zone become durable in
    /// order (a frame goes ahead only of other zones').
    pub fn points_to_data(&self) -> bool {
        !matches!(self, Entry::Flip { .. } | Entry::Rollback { .. })
    }

    /// Appends the encoding of `self` to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Entry::Map { volume, lba, cbid } => {
                out.push(E_MAP);
                out.extend_from_slice(&volume.0.to_le_bytes());
                out.extend_from_slice(&lba.0.to_le_bytes());
                out.extend_from_slice(&cbid.map_or(0, |c| c.0 + 1).to_le_bytes());
            }
            Entry::Cb { zone, cbid, record } => {
                out.push(if record.mac == 1 { E_CB } else { E_CB_MAC });
                out.extend_from_slice(&zone.0.to_le_bytes());
                out.extend_from_slice(&cbid.0.to_le_bytes());
                out.extend_from_slice(&record.slot.0.to_le_bytes());
                out.extend_from_slice(&record.key_version.0.to_le_bytes());
                out.extend_from_slice(&record.refcount.to_le_bytes());
                out.extend_from_slice(&record.tag.0);
                let (slot, kv) = record
                    .staged
                    .map_or((0, 0), |s| (s.slot.0 + 1, s.key_version.0));
                out.extend_from_slice(&slot.to_le_bytes());
                out.extend_from_slice(&kv.to_le_bytes());
                if record.mac != 1 {
                    out.extend_from_slice(&record.mac.to_le_bytes());
                }
            }
            Entry::CbFree { zone, cbid } => {
                out.push(E_CB_FREE);
                out.extend_from_slice(&zone.0.to_le_bytes());
                out.extend_from_slice(&cbid.0.to_le_bytes());
            }
            Entry::Flip { zone, to } => {
                out.push(E_FLIP);
                out.extend_from_slice(&zone.0.to_le_bytes());
                out.extend_from_slice(&to.0.to_le_bytes());
            }
            Entry::Rollback { zone, to } => {
                out.push(E_ROLLBACK);
                out.extend_from_slice(&zone.0.to_le_bytes());
                out.extend_from_slice(&to.0.to_le_bytes());
            }
            Entry::Applied { zone, seq } => {
                out.push(E_APPLIED);
                out.extend_from_slice(&zone.0.to_le_bytes());
                out.extend_from_slice(&seq.to_le_bytes());
            }
        }
    }

    /// Decodes every entry of a frame's payload.
    pub fn decode_all(seq: u64, mut p: &[u8]) -> Result<Vec<Entry>, JournalError> {
        let mut out = Vec::new();
        while let Some((&kind, rest)) = p.split_first() {
            let need = match kind {
                E_MAP => 20,
                E_CB => 72,
                E_CB_MAC => 76,
                E_CB_FREE => 12,
                E_FLIP | E_ROLLBACK => 8,
                E_APPLIED => 12,
                _ => return Err(JournalError::UnknownEntry { seq, kind }),
            };
            if rest.len() < need {
                return Err(JournalError::UnknownEntry { seq, kind });
            }
            let (b, tail) = rest.split_at(need);
            let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"));
            let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
            out.push(match kind {
                E_MAP => Entry::Map {
                    volume: VolumeId(u32_at(0)),
                    lba: Lba(u64_at(4)),
                    cbid: u64_at(12).checked_sub(1).map(Cbid),
                },
                E_CB | E_CB_MAC => Entry::Cb {
                    zone: ZoneId(u32_at(0)),
                    cbid: Cbid(u64_at(4)),
                    record: CbRecord {
                        slot: Slot(u64_at(12)),
                        key_version: KeyVersion(u32_at(20)),
                        refcount: u32_at(24),
                        tag: Tag(b[28..60].try_into().expect("32 bytes")),
                        mac: if kind == E_CB_MAC { u32_at(72) } else { 1 },
                        staged: u64_at(60).checked_sub(1).map(|slot| StagedCopy {
                            slot: Slot(slot),
                            key_version: KeyVersion(u32_at(68)),
                        }),
                    },
                },
                E_FLIP => Entry::Flip {
                    zone: ZoneId(u32_at(0)),
                    to: KeyVersion(u32_at(4)),
                },
                E_ROLLBACK => Entry::Rollback {
                    zone: ZoneId(u32_at(0)),
                    to: KeyVersion(u32_at(4)),
                },
                E_APPLIED => Entry::Applied {
                    zone: ZoneId(u32_at(0)),
                    seq: u64_at(4),
                },
                _ => Entry::CbFree {
                    zone: ZoneId(u32_at(0)),
                    cbid: Cbid(u64_at(4)),
                },
            });
            p = tail;
        }
        Ok(out)
    }
}
