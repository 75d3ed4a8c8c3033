//! Checkpoints beside the committer: commits and flips go on while a
//! checkpoint copies and syncs its tables, and a crash in the middle
//! replays the old generation and the next one after it.

use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::ahead_tests::{flip, write};
use super::tests::Hooks;
use super::*;
use crate::ids::{Cbid, Lba, VolumeId};

/// Hooks whose checkpoints, once armed, stop after their cut (where the
/// pool's copy the changes into the tables) until the test opens them.
#[derive(Default)]
struct GatedCheckpoint {
    inner: Hooks,
    armed: AtomicBool,
    entered: Mutex<Option<mpsc::Sender<JournalSeq>>>,
    open: Mutex<bool>,
    opened: Condvar,
}

impl GatedCheckpoint {
    fn open(&self) {
        *self.open.lock() = true;
        self.opened.notify_all();
    }
}

impl CommitHooks for GatedCheckpoint {
    fn sync_data(&self) -> Result<(), std::io::Error> {
        self.inner.sync_data()
    }
    fn durable(&self, seq: JournalSeq) {
        self.inner.durable(seq)
    }
    fn checkpoint(&self, journal: &mut dyn CheckpointJournal) -> Result<JournalSeq, JournalError> {
        let seq = journal.last_appended();
        journal.flush_through(seq)?;
        if self.armed.load(std::sync::atomic::Ordering::SeqCst) {
            if let Some(tx) = self.entered.lock().as_ref() {
                let _ = tx.send(seq);
            }
            // Bounded, so that a failed assertion ends its test rather
            // than leaving the journal's drop waiting for this thread.
            let deadline = Instant::now() + Duration::from_secs(20);
            let mut open = self.open.lock();
            while !*open && Instant::now() < deadline {
                self.opened.wait_for(&mut open, Duration::from_millis(100));
            }
        }
        Ok(seq)
    }
}

fn config() -> JournalConfig {
    JournalConfig {
        // Commits only when asked: a frame the test leaves queued stays so.
        commit_interval: Duration::from_secs(3600),
        commit_bytes: 1 << 20,
        checkpoint_bytes: 10_000,
    }
}

fn map(i: u64) -> Entry {
    Entry::Map {
        volume: VolumeId(1),
        lba: Lba(i),
        cbid: Some(Cbid(i)),
    }
}

/// What the disk holds at this instant: both regions' files.
fn crash_copy(p: &Path, to: &Path) {
    std::fs::copy(p, to).unwrap();
    std::fs::copy(region_path(p, 1), region_path(to, 1)).unwrap();
}

/// Commits `seq` on another thread; `None` if it did not finish in time.
fn commit_within(j: &Arc<Journal>, seq: JournalSeq, limit: Duration) -> Option<()> {
    let (tx, rx) = mpsc::channel();
    let waiter = j.clone();
    std::thread::spawn(move || {
        let _ = tx.send(waiter.commit_blocking(seq));
    });
    rx.recv_timeout(limit).ok().map(|r| r.unwrap())
}

#[test]
fn commits_and_flips_go_on_while_a_checkpoint_copies_and_a_crash_replays_both_generations() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("j");
    Journal::create(&p).unwrap();
    let hooks = Arc::new(GatedCheckpoint::default());
    let j = Arc::new(Journal::start(&p, JournalSeq(0), config(), hooks.clone()).unwrap());
    let (tx, entered) = mpsc::channel();
    *hooks.entered.lock() = Some(tx);
    hooks.armed.store(true, std::sync::atomic::Ordering::SeqCst);
    struct OpenOnDrop(Arc<GatedCheckpoint>);
    impl Drop for OpenOnDrop {
        fn drop(&mut self) {
            self.0.open();
        }
    }
    let _open = OpenOnDrop(hooks.clone());

    // Fill the journal past its checkpoint threshold.
    let mut i = 0;
    let cut = loop {
        i += 1;
        assert!(i < 10_000, "no checkpoint began");
        let s = j.append(ZoneId(1), &[write(1, i), map(i)]);
        j.commit_blocking(s).unwrap();
        if let Ok(cut) = entered.try_recv() {
            break cut;
        }
    };
    // The loop may have appended a frame after the cut before it heard.
    assert!(
        cut.0 >= i - 1 && cut.0 <= i,
        "cut {} after frame {i}",
        cut.0
    );

    // The checkpoint is stuck in its copy. A write commits all the same,
    // into the next generation.
    let s = j.append(ZoneId(1), &[write(1, 9000), map(9000)]);
    commit_within(&j, s, Duration::from_secs(10))
        .expect("a commit waited for the checkpoint's copy");
    // A flip goes ahead of another zone's queued write.
    let w = j.append(ZoneId(2), &[write(2, 9001)]);
    let f = j.append_ahead(ZoneId(3), &[flip(3, 7)]);
    let flip_seq = f.seq();
    assert_eq!(j.commit_ahead(f).unwrap(), Committed::Ahead);

    // A crash now: the old header rules, and replay reads the old
    // generation and then the next one, in the other region.
    let crashed = dir.path().join("crashed");
    crash_copy(&p, &crashed);
    let r = Journal::read(&crashed).unwrap();
    assert!(r.checkpoint_seq < cut, "the new header is not written yet");
    let seqs: Vec<u64> = r.frames.iter().map(|f| f.0.0).collect();
    let mut want: Vec<u64> = (r.checkpoint_seq.0 + 1..=s.0).collect();
    want.push(flip_seq.0);
    assert_eq!(seqs, want, "every durable frame, the flip last");
    assert_eq!(r.frames.last().unwrap().1, vec![flip(3, 7)]);
    assert_eq!(r.in_order_through, s, "the queued write was lost");
    assert_eq!(r.last, flip_seq);
    assert_eq!(r.damaged_frames_after, 0);

    // Recovery of that crash goes on after the flip, and what it writes
    // is all a later replay finds: nothing of the generations before.
    let after = Journal::start(&crashed, r.last, config(), Arc::new(Hooks::default())).unwrap();
    let n = after.append(ZoneId(2), &[write(2, 9002)]);
    assert_eq!(n, JournalSeq(flip_seq.0 + 1));
    after.commit_blocking(n).unwrap();
    drop(after);
    let r = Journal::read(&crashed).unwrap();
    assert_eq!(r.checkpoint_seq, flip_seq);
    assert_eq!(r.frames, vec![(n, vec![write(2, 9002)])]);

    // The checkpoint finishes: its header moves replay's start to the cut.
    hooks.open();
    let deadline = Instant::now() + Duration::from_secs(10);
    while Journal::read(&p).unwrap().checkpoint_seq != cut {
        assert!(
            Instant::now() < deadline,
            "the new header was never written"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    j.commit_blocking(w).unwrap();
    let last = j.last_appended();
    drop(Arc::into_inner(j).expect("only reference"));
    let r = Journal::read(&p).unwrap();
    let seqs: Vec<u64> = r.frames.iter().map(|f| f.0.0).collect();
    let want: Vec<u64> = (cut.0 + 1..=s.0).chain([flip_seq.0, w.0]).collect();
    assert_eq!(seqs, want, "after the cut: the writes, the flip, then w");
    assert_eq!(r.in_order_through, last);
}

/// A journal written before checkpoints went beside the committer (magic
/// KTJRNL03: every generation in the journal file, no side file) replays,
/// and starting it writes the new header and creates the side file.
#[test]
fn a_journal_of_the_previous_format_replays_and_starts() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("j");
    // Generation 5 in slot 1, checkpointed through 3, frames 4 and 5.
    let mut h = [0u8; 64];
    h[..8].copy_from_slice(b"KTJRNL03");
    h[8..16].copy_from_slice(&5u64.to_le_bytes());
    h[16..24].copy_from_slice(&3u64.to_le_bytes());
    let crc = crc32c::crc32c(&h[..24]);
    h[24..28].copy_from_slice(&crc.to_le_bytes());
    let f = File::create(&p).unwrap();
    f.write_all_at(&h, HEADER_SLOT).unwrap();
    let mut frames = Vec::new();
    for seq in [4u64, 5] {
        let mut payload = Vec::new();
        write(1, seq).encode(&mut payload);
        frames.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        frames.extend_from_slice(&frame_crc(5, seq, &payload).to_le_bytes());
        frames.extend_from_slice(&5u64.to_le_bytes());
        frames.extend_from_slice(&seq.to_le_bytes());
        frames.extend_from_slice(&payload);
    }
    f.write_all_at(&frames, FRAMES_START).unwrap();
    drop(f);
    assert!(!region_path(&p, 1).exists());

    let r = Journal::read(&p).unwrap();
    assert_eq!(r.checkpoint_seq, JournalSeq(3));
    assert_eq!(
        r.frames,
        vec![
            (JournalSeq(4), vec![write(1, 4)]),
            (JournalSeq(5), vec![write(1, 5)])
        ]
    );
    let j = Journal::start(&p, r.last, config(), Arc::new(Hooks::default())).unwrap();
    let s = j.append(ZoneId(1), &[write(1, 6)]);
    j.commit_blocking(s).unwrap();
    drop(j);
    assert!(region_path(&p, 1).exists(), "the side file was created");
    let r = Journal::read(&p).unwrap();
    assert_eq!(r.checkpoint_seq, JournalSeq(5));
    assert_eq!(r.frames, vec![(s, vec![write(1, 6)])]);
}

/// A header naming region 1 when the side file is gone is an error, not
/// an empty journal: the frames it names are missing.
#[test]
fn a_header_naming_a_missing_side_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("j");
    let f = File::create(&p).unwrap();
    let h = encode_header(Header {
        generation: 3,
        checkpoint: 0,
        region: 1,
        continues: true,
    });
    f.write_all_at(&h, 0).unwrap();
    drop(f);
    assert!(matches!(
        Journal::read(&p),
        Err(JournalError::Format { .. })
    ));
}
