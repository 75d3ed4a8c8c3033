//! Committed changes as a zone hands them to its stream.
//!
//! The zone knows only this trait; `stream` implements it, so the data
//! path does not depend on the stream's keys, log or transports.

use crate::crypto::wipe::Wiped;

use crate::crypto::tag::Tag;
use crate::ids::{JournalSeq, Lba, VolumeId};

/// One committed change of a zone's volumes.
#[derive(Clone)]
pub enum ZoneChange {
    /// Whole blocks written from `first`: the plaintext of every block
    /// (zero blocks included) and the tag of each non-zero one.
    Write {
        /// Volume.
        volume: VolumeId,
        /// First block.
        first: Lba,
        /// Per block: its tag, or `None` for an all-zero block.
        tags: Vec<Option<Tag>>,
        /// The blocks' plaintext.
        plain: Wiped,
    },
    /// Runs of blocks unmapped by a trim or a write-zeroes.
    Unmap {
        /// Volume.
        volume: VolumeId,
        /// Runs `(first, blocks)`.
        runs: Vec<(Lba, u32)>,
        /// WRITE_ZEROES rather than TRIM.
        zero: bool,
    },
}

impl std::fmt::Debug for ZoneChange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the plaintext.
        match self {
            ZoneChange::Write {
                volume,
                first,
                tags,
                ..
            } => f
                .debug_struct("Write")
                .field("volume", volume)
                .field("first", first)
                .field("blocks", &tags.len())
                .finish_non_exhaustive(),
            ZoneChange::Unmap { volume, runs, zero } => f
                .debug_struct("Unmap")
                .field("volume", volume)
                .field("runs", &runs.len())
                .field("zero", zero)
                .finish(),
        }
    }
}

/// Receives a zone's committed changes, in commit order.
pub trait ChangeSink: Send + Sync {
    /// Called while the journal's append lock is held, right after frame
    /// `jseq` got its sequence, so the change is queued before any commit
    /// can make that frame durable: keep it to a queue push.
    fn committed(&self, jseq: JournalSeq, change: ZoneChange);
    /// Whether the sink can take more now (false: its backlog is full and
    /// writers should wait a moment before they write).
    fn has_room(&self) -> bool;
}
