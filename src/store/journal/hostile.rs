//! Journals written by someone else: cases the `journal` fuzz target found
//! or aimed at (see docs/fuzzing.md).

use std::os::unix::fs::FileExt;

use super::*;

fn journal_with(dir: &Path, generation: u64, checkpoint: u64, frame_head: &[u8]) -> PathBuf {
    let p = dir.join("j");
    let f = File::create(&p).unwrap();
    f.write_all_at(
        &encode_header(Header {
            generation,
            checkpoint,
            region: 0,
            continues: true,
        }),
        (generation % 2) * HEADER_SLOT,
    )
    .unwrap();
    f.write_all_at(frame_head, FRAMES_START).unwrap();
    p
}

/// A frame header that claims 200 MiB of payload in a file that holds a
/// few bytes is a torn frame: replay stops there without allocating for
/// it (the fuzz target's allocator aborts on such an allocation).
#[test]
fn a_frame_longer_than_the_file_is_torn() {
    let dir = tempfile::tempdir().unwrap();
    let mut head = Vec::new();
    head.extend_from_slice(&(200u32 << 20).to_le_bytes());
    head.extend_from_slice(&0u32.to_le_bytes());
    head.extend_from_slice(&1u64.to_le_bytes());
    head.extend_from_slice(&1u64.to_le_bytes());
    head.extend_from_slice(b"short");
    let r = Journal::read(&journal_with(dir.path(), 1, 0, &head)).unwrap();
    assert!(r.frames.is_empty());
}

/// A header whose checkpoint is u64::MAX (its checksum intact) is refused,
/// not an overflow.
#[test]
fn a_checkpoint_at_the_last_sequence_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = journal_with(dir.path(), 1, u64::MAX, &[]);
    assert!(matches!(
        Journal::read(&p),
        Err(JournalError::Format { .. })
    ));
}

/// One frame's bytes: `field` is the sequence field as written (bit 63:
/// written ahead), the payload a flip of zone 1.
fn frame(generation: u64, field: u64) -> Vec<u8> {
    let mut payload = Vec::new();
    Entry::Flip {
        zone: crate::ids::ZoneId(1),
        to: crate::ids::KeyVersion(field as u32 & 0xffff),
    }
    .encode(&mut payload);
    let mut out = Vec::new();
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&frame_crc(generation, field, &payload).to_le_bytes());
    out.extend_from_slice(&generation.to_le_bytes());
    out.extend_from_slice(&field.to_le_bytes());
    out.extend_from_slice(&payload);
    out
}

/// Replays frames whose sequence fields are `fields` (after checkpoint 0)
/// and returns the sequences replayed, with `in_order_through` and `last`.
fn replay(fields: &[u64]) -> (Vec<u64>, u64, u64) {
    let dir = tempfile::tempdir().unwrap();
    let bytes: Vec<u8> = fields.iter().flat_map(|&f| frame(1, f)).collect();
    let r = Journal::read(&journal_with(dir.path(), 1, 0, &bytes)).unwrap();
    let seqs = r.frames.iter().map(|(s, _)| s.0).collect();
    (seqs, r.in_order_through.0, r.last.0)
}

/// A frame written ahead may come before lower sequences, which then fill
/// in; replay stops at a frame that is neither the lowest sequence not
/// yet seen nor an unseen one marked ahead.
#[test]
fn frames_written_ahead_replay_only_where_they_could_have_been_written() {
    assert_eq!(replay(&[1, 3 | AHEAD, 2, 4]), (vec![1, 3, 2, 4], 4, 4));
    assert_eq!(
        replay(&[3 | AHEAD, 1]),
        (vec![3, 1], 1, 3),
        "2 never written: lost, and 3 kept"
    );
    assert_eq!(
        replay(&[3 | AHEAD, 1, 3]),
        (vec![3, 1], 1, 3),
        "3 again, in order, is out of sequence"
    );
    assert_eq!(
        replay(&[3 | AHEAD, 3 | AHEAD, 1]),
        (vec![3], 0, 3),
        "3 ahead twice"
    );
    assert_eq!(
        replay(&[1, 2, 1 | AHEAD]),
        (vec![1, 2], 2, 2),
        "ahead of nothing: below the lowest unseen"
    );
    assert_eq!(
        replay(&[2 | AHEAD, 4]),
        (vec![2], 0, 2),
        "in order, 4 skips 1"
    );
    // A frame without the flag, after a gap, is what a v2 journal would
    // have stopped at too.
    assert_eq!(replay(&[1, 3]), (vec![1], 1, 1));
}
