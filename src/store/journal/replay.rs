//! Reading a journal back: the frames recovery replays, and how far they
//! can be trusted.

use std::collections::BTreeSet;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::ids::JournalSeq;

use super::{
    AHEAD, Entry, FRAME_HEADER, FRAMES_START, HEADER_SLOT, Header, Journal, JournalError,
    MAX_PAYLOAD, Writer, decode_header, frame_crc, region_path,
};

/// The outcome of opening a journal: the frames to replay, in order.
pub struct Replay {
    /// Sequence the tables already hold.
    pub checkpoint_seq: JournalSeq,
    /// Frames after the checkpoint, `(seq, entries)`, in the order they
    /// were written: a frame written ahead may come before lower sequences
    /// (it commutes with them; see the module comment).
    pub frames: Vec<(JournalSeq, Vec<Entry>)>,
    /// Every frame up to this sequence was replayed. Above it only frames
    /// written ahead were: the frames in between were lost with the crash
    /// (never acknowledged durable), and what they recorded elsewhere (a
    /// stream record) must go too.
    pub in_order_through: JournalSeq,
    /// The highest sequence replayed (or the checkpoint's): the journal
    /// goes on after it, so no sequence is used twice.
    pub last: JournalSeq,
    /// Intact frames found beyond the first damaged one (dropped). Zero for
    /// a clean journal or a torn tail.
    pub damaged_frames_after: u64,
}

/// Where replay is: what a frame must carry to be taken next.
struct Cursor {
    frames: Vec<(JournalSeq, Vec<Entry>)>,
    /// The lowest sequence not yet seen: the one a frame in order must carry.
    expect: u64,
    /// Frames seen above `expect` (written ahead).
    ahead: BTreeSet<u64>,
    last: u64,
}

impl Cursor {
    /// Takes the frames of `generation` in `file` from the start of its
    /// frames; returns where it stopped.
    fn read_region(&mut self, file: &File, generation: u64) -> Result<u64, JournalError> {
        let file_len = file.metadata().map_err(Writer::io("stat"))?.len();
        let mut pos = FRAMES_START;
        let mut head = [0u8; FRAME_HEADER];
        loop {
            if file.read_exact_at(&mut head, pos).is_err() {
                break;
            }
            let len = u32::from_le_bytes(head[0..4].try_into().expect("4"));
            let crc = u32::from_le_bytes(head[4..8].try_into().expect("4"));
            let frame_gen = u64::from_le_bytes(head[8..16].try_into().expect("8"));
            let field = u64::from_le_bytes(head[16..24].try_into().expect("8"));
            let seq = field & !AHEAD;
            let placed = if field & AHEAD != 0 {
                seq >= self.expect && !self.ahead.contains(&seq)
            } else {
                seq == self.expect
            };
            if len > MAX_PAYLOAD || frame_gen != generation || !placed {
                break;
            }
            // A frame longer than the rest of the file is torn: stop before
            // allocating for a length field nothing backs.
            if pos + (FRAME_HEADER as u64) + u64::from(len) > file_len {
                break;
            }
            let mut payload = vec![0u8; len as usize];
            if file
                .read_exact_at(&mut payload, pos + FRAME_HEADER as u64)
                .is_err()
                || frame_crc(generation, field, &payload) != crc
            {
                break;
            }
            self.frames
                .push((JournalSeq(seq), Entry::decode_all(seq, &payload)?));
            pos += (FRAME_HEADER + payload.len()) as u64;
            self.last = self.last.max(seq);
            // `seq` < 2^63 (bit 63 is the flag), so `expect` never wraps.
            self.ahead.insert(seq);
            while self.ahead.remove(&self.expect) {
                self.expect += 1;
            }
        }
        Ok(pos)
    }
}

impl Journal {
    /// Reads the journal at `path` and returns what must be replayed. Call
    /// [`Journal::start`] after the replayed state is in memory.
    pub fn read(path: &Path) -> Result<Replay, JournalError> {
        let file = File::open(path).map_err(Writer::io("open"))?;
        let (header, _) = Self::read_header(&file, path)?;
        let checkpoint = header.checkpoint;
        // A checkpoint at u64::MAX leaves no sequence for a frame.
        let expect = checkpoint
            .checked_add(1)
            .ok_or_else(|| JournalError::Format {
                path: path.to_path_buf(),
            })?;
        let mut cursor = Cursor {
            frames: Vec::new(),
            expect,
            ahead: BTreeSet::new(),
            last: checkpoint,
        };
        let open = |region: usize| -> Result<Option<File>, JournalError> {
            if region == 0 {
                return file.try_clone().map(Some).map_err(Writer::io("open"));
            }
            match File::open(region_path(path, region)) {
                Ok(f) => Ok(Some(f)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(Writer::io("open side file")(e)),
            }
        };
        // The header's generation, then the next one in the other region
        // if a checkpoint was under way.
        let mut regions = vec![(header.region, header.generation)];
        if header.continues {
            regions.push((header.region ^ 1, header.generation + 1));
        }
        let mut damaged = 0;
        for (k, (region, generation)) in regions.into_iter().enumerate() {
            let Some(file) = open(region)? else {
                if k == 0 {
                    // The header names a region whose file is gone.
                    return Err(JournalError::Format {
                        path: region_path(path, region),
                    });
                }
                break;
            };
            let pos = cursor.read_region(&file, generation)?;
            let beyond = Self::valid_frames_after(&file, pos, generation, cursor.expect);
            if beyond > 0 {
                // A torn tail has nothing valid after it. Valid frames beyond a bad
                // one mean damage inside the journal (or a torn multi-frame write
                // that was never acknowledged): say so loudly, with what is dropped.
                tracing::error!(
                    journal = %region_path(path, region).display(), offset = pos,
                    frame = cursor.expect, later_valid_frames = beyond,
                    "journal frame is damaged but later frames are intact; replay stops at the \
                     damage and the later frames are dropped"
                );
            }
            damaged += beyond;
        }
        Ok(Replay {
            checkpoint_seq: JournalSeq(checkpoint),
            frames: cursor.frames,
            in_order_through: JournalSeq(cursor.expect - 1),
            last: JournalSeq(cursor.last),
            damaged_frames_after: damaged,
        })
    }

    /// Counts valid frames of `generation` with a sequence at or past
    /// `expect` anywhere after `pos`: a damaged frame followed by intact ones.
    fn valid_frames_after(file: &File, pos: u64, generation: u64, expect: u64) -> u64 {
        let Ok(len) = file.metadata().map(|m| m.len()) else {
            return 0;
        };
        let Some(tail_len) = len.checked_sub(pos).filter(|&n| n > FRAME_HEADER as u64) else {
            return 0;
        };
        // Bounded: the journal is checkpointed long before this size.
        let mut tail = vec![0u8; tail_len.min(1 << 30) as usize];
        if file.read_exact_at(&mut tail, pos).is_err() {
            return 0;
        }
        let gen_bytes = generation.to_le_bytes();
        let mut found = 0;
        let mut at = 1;
        while at + FRAME_HEADER <= tail.len() {
            let head = &tail[at..at + FRAME_HEADER];
            if head[8..16] == gen_bytes {
                let len = u32::from_le_bytes(head[0..4].try_into().expect("4")) as usize;
                let crc = u32::from_le_bytes(head[4..8].try_into().expect("4"));
                let field = u64::from_le_bytes(head[16..24].try_into().expect("8"));
                let end = at.saturating_add(FRAME_HEADER).saturating_add(len);
                if field & !AHEAD >= expect
                    && end <= tail.len()
                    && frame_crc(generation, field, &tail[at + FRAME_HEADER..end]) == crc
                {
                    found += 1;
                    at = end;
                    continue;
                }
            }
            at += 1;
        }
        found
    }

    /// The current header and its slot.
    pub(super) fn read_header(file: &File, path: &Path) -> Result<(Header, u64), JournalError> {
        let mut best: Option<(Header, u64)> = None;
        for slot in 0..2 {
            let mut h = [0u8; 64];
            if file.read_exact_at(&mut h, slot * HEADER_SLOT).is_ok()
                && let Some(header) = decode_header(&h)
                && best.is_none_or(|b| header.generation > b.0.generation)
            {
                best = Some((header, slot));
            }
        }
        best.ok_or_else(|| JournalError::Format {
            path: path.to_path_buf(),
        })
    }
}
