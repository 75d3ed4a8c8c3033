//! Journals written by someone else: cases the `journal` fuzz target found
//! or aimed at (see docs/fuzzing.md).

use std::os::unix::fs::FileExt;

use super::*;

fn journal_with(dir: &Path, generation: u64, checkpoint: u64, frame_head: &[u8]) -> PathBuf {
    let p = dir.join("j");
    let f = File::create(&p).unwrap();
    f.write_all_at(
        &encode_header(generation, checkpoint),
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
