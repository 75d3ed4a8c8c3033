//! Frames written ahead: a flip made durable while other zones' frames
//! wait for their data sync, what a crash at that moment leaves, and the
//! cases where it must wait instead.

use std::sync::mpsc;
use std::time::Duration;

use super::*;
use crate::ids::{Cbid, KeyVersion, Slot};

/// Hooks whose data sync waits at a gate the test opens, and says when it
/// has started waiting.
struct GatedHooks {
    open: Mutex<bool>,
    opened: Condvar,
    entered: Mutex<Option<mpsc::Sender<()>>>,
}

impl GatedHooks {
    fn new() -> (Arc<Self>, mpsc::Receiver<()>) {
        let (tx, rx) = mpsc::channel();
        let hooks = Self {
            open: Mutex::new(false),
            opened: Condvar::new(),
            entered: Mutex::new(Some(tx)),
        };
        (Arc::new(hooks), rx)
    }

    fn open(&self) {
        *self.open.lock() = true;
        self.opened.notify_all();
    }
}

impl CommitHooks for GatedHooks {
    fn sync_data(&self) -> Result<(), std::io::Error> {
        if let Some(tx) = self.entered.lock().as_ref() {
            let _ = tx.send(());
        }
        let mut open = self.open.lock();
        while !*open {
            self.opened.wait(&mut open);
        }
        Ok(())
    }
    fn durable(&self, _: JournalSeq) {}
    fn checkpoint(&self, journal: &mut dyn CheckpointJournal) -> Result<JournalSeq, JournalError> {
        let seq = journal.last_appended();
        journal.flush_through(seq)?;
        Ok(seq)
    }
}

/// Hooks with nothing to sync.
struct NoHooks;

impl CommitHooks for NoHooks {
    fn sync_data(&self) -> Result<(), std::io::Error> {
        Ok(())
    }
    fn durable(&self, _: JournalSeq) {}
    fn checkpoint(&self, journal: &mut dyn CheckpointJournal) -> Result<JournalSeq, JournalError> {
        let seq = journal.last_appended();
        journal.flush_through(seq)?;
        Ok(seq)
    }
}

fn config() -> JournalConfig {
    JournalConfig {
        commit_interval: Duration::from_secs(3600),
        commit_bytes: 1 << 20,
        checkpoint_bytes: 1 << 30,
    }
}

fn write(zone: u32, i: u64) -> Entry {
    Entry::Cb {
        zone: ZoneId(zone),
        cbid: Cbid(i),
        record: CbRecord {
            slot: Slot(i),
            key_version: KeyVersion(1),
            refcount: 1,
            tag: crate::crypto::tag::Tag([i as u8; 32]),
            mac: 1,
            staged: None,
        },
    }
}

fn flip(zone: u32, to: u32) -> Entry {
    Entry::Flip {
        zone: ZoneId(zone),
        to: KeyVersion(to),
    }
}

/// Starts a commit of what is pending on another thread and returns once
/// the committer waits in its data sync.
fn commit_in_background(
    j: &Arc<Journal>,
    seq: JournalSeq,
    entered: &mpsc::Receiver<()>,
) -> std::thread::JoinHandle<Result<(), JournalError>> {
    let waiter = j.clone();
    let t = std::thread::spawn(move || waiter.commit_blocking(seq));
    entered
        .recv_timeout(Duration::from_secs(10))
        .expect("the committer never started its data sync");
    t
}

/// Runs `f` on another thread; its result if it returns within `secs`.
fn within<T: Send + 'static>(secs: u64, f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(secs)).ok()
}

/// Zone 2's write waits for its data sync; zone 1's flip is durable
/// meanwhile. Read at that moment (a crash), the journal holds the flip
/// alone, with nothing in order after the checkpoint; once the sync ends,
/// the write follows and the durable sequence covers both.
#[test]
fn a_flip_is_durable_while_another_zones_write_waits_for_its_data() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("j");
    Journal::create(&p).unwrap();
    let (hooks, entered) = GatedHooks::new();
    let j = Arc::new(Journal::start(&p, JournalSeq(0), config(), hooks.clone()).unwrap());
    let w = j.append(ZoneId(2), &[write(2, 1)]);
    let background = commit_in_background(&j, w, &entered);

    let frame = j.append_ahead(ZoneId(1), &[flip(1, 2)]);
    let seq = frame.seq();
    assert_eq!(seq, JournalSeq(2));
    let flipper = j.clone();
    let committed = within(10, move || flipper.commit_ahead(frame))
        .expect("the flip waited for another zone's data sync")
        .unwrap();
    assert_eq!(committed, Committed::Ahead);
    assert_eq!(
        j.durable().seq,
        JournalSeq(0),
        "the write is not durable yet"
    );

    // A crash now: the copy is what the disk holds.
    let crashed = dir.path().join("crashed");
    std::fs::copy(&p, &crashed).unwrap();
    let r = Journal::read(&crashed).unwrap();
    assert_eq!(r.frames, vec![(seq, vec![flip(1, 2)])]);
    assert_eq!(r.in_order_through, JournalSeq(0), "frame 1 was lost");
    assert_eq!(r.last, seq);
    assert_eq!(r.damaged_frames_after, 0);
    // Recovery goes on after the highest sequence: none is used twice.
    let hooks2 = Arc::new(NoHooks);
    let after = Journal::start(&crashed, r.last, config(), hooks2).unwrap();
    let s = after.append(ZoneId(2), &[write(2, 9)]);
    assert_eq!(s, JournalSeq(3));
    after.commit_blocking(s).unwrap();
    drop(after);
    let r = Journal::read(&crashed).unwrap();
    assert_eq!(r.checkpoint_seq, JournalSeq(2));
    assert_eq!(r.frames, vec![(s, vec![write(2, 9)])]);

    hooks.open();
    background.join().unwrap().unwrap();
    // The durable sequence passes the flip once the write below it is in.
    let waiter = j.clone();
    within(10, move || waiter.commit_blocking(seq))
        .expect("the durable sequence never passed the flip")
        .unwrap();
    assert_eq!(j.durable().seq, seq);
    drop(Arc::into_inner(j).expect("only reference"));
    let r = Journal::read(&p).unwrap();
    assert_eq!(
        r.frames,
        vec![(seq, vec![flip(1, 2)]), (w, vec![write(2, 1)])],
        "the flip is written first, the write after it"
    );
    assert_eq!((r.in_order_through, r.last), (seq, seq));
}

/// A flip never goes ahead of its own zone's frames: it waits for their
/// data sync and is written after them.
#[test]
fn a_flip_waits_for_its_own_zones_earlier_frames() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("j");
    Journal::create(&p).unwrap();
    let (hooks, entered) = GatedHooks::new();
    let j = Arc::new(Journal::start(&p, JournalSeq(0), config(), hooks.clone()).unwrap());
    let w = j.append(ZoneId(1), &[write(1, 1)]);
    let background = commit_in_background(&j, w, &entered);
    assert_eq!(j.last_pending_of(ZoneId(1)), Some(w), "in flight");
    assert_eq!(j.last_pending_of(ZoneId(2)), None);

    let frame = j.append_ahead(ZoneId(1), &[flip(1, 2)]);
    let seq = frame.seq();
    let (tx, rx) = mpsc::channel();
    let flipper = j.clone();
    let flipping = std::thread::spawn(move || {
        let _ = tx.send(flipper.commit_ahead(frame));
    });
    assert!(
        rx.recv_timeout(Duration::from_millis(300)).is_err(),
        "the flip went ahead of its own zone's write"
    );
    hooks.open();
    background.join().unwrap().unwrap();
    let committed = rx.recv_timeout(Duration::from_secs(10)).unwrap().unwrap();
    assert_eq!(committed, Committed::InOrder);
    assert!(j.durable().seq >= seq);
    flipping.join().unwrap();
    drop(Arc::into_inner(j).expect("only reference"));
    let r = Journal::read(&p).unwrap();
    assert_eq!(
        r.frames,
        vec![(w, vec![write(1, 1)]), (seq, vec![flip(1, 2)])]
    );
}

/// What decides whether a queued frame may go ahead.
#[test]
fn only_a_dataless_frame_behind_other_zones_outside_a_checkpoint_goes_ahead() {
    let frame = |seq, zone, points_to_data| PendingFrame {
        seq,
        payload: vec![0; 8],
        points_to_data,
        zone: ZoneId(zone),
    };
    let pending = |frames: Vec<PendingFrame>, in_flight: Vec<(u64, ZoneId)>| Pending {
        bytes: frames.len() * 8,
        frames,
        next_seq: 10,
        requested: false,
        closing: false,
        in_flight,
        checkpointing: false,
        durable_through: 0,
        ahead_done: BTreeSet::new(),
    };
    let p = || pending(vec![frame(4, 2, true), frame(5, 1, false)], vec![]);
    assert!(p().take_ahead(5, ZoneId(1)).is_some());
    let mut q = p();
    q.take_ahead(5, ZoneId(1)).unwrap();
    assert_eq!(q.frames.len(), 1);
    assert_eq!(q.bytes, 8);
    assert!(q.take_ahead(5, ZoneId(1)).is_none(), "taken already");

    let mut q = p();
    q.checkpointing = true;
    assert!(q.take_ahead(5, ZoneId(1)).is_none(), "during a checkpoint");
    let mut q = pending(vec![frame(4, 1, true), frame(5, 1, false)], vec![]);
    assert!(
        q.take_ahead(5, ZoneId(1)).is_none(),
        "its zone queued first"
    );
    let mut q = pending(vec![frame(5, 1, false)], vec![(3, ZoneId(1))]);
    assert!(q.take_ahead(5, ZoneId(1)).is_none(), "its zone in flight");
    let mut q = pending(vec![frame(5, 1, false)], vec![(3, ZoneId(2))]);
    assert!(
        q.take_ahead(5, ZoneId(1)).is_some(),
        "another zone in flight"
    );
    let mut q = pending(vec![frame(4, 2, true), frame(5, 1, true)], vec![]);
    assert!(
        q.take_ahead(5, ZoneId(1)).is_none(),
        "it points to data itself"
    );
    let mut q = pending(vec![frame(5, 1, false), frame(6, 1, true)], vec![]);
    assert!(
        q.take_ahead(5, ZoneId(1)).is_some(),
        "later frames of its zone do not hold it back"
    );
}

/// The durable sequence moves over frames written ahead once the frames
/// below them are in, and never past a gap.
#[test]
fn the_durable_sequence_passes_frames_written_ahead_only_without_a_gap() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("j");
    Journal::create(&p).unwrap();
    let j = Journal::start(&p, JournalSeq(0), config(), Arc::new(NoHooks)).unwrap();
    let s = &j.shared;
    assert_eq!(s.note_durable(None, Some(3)), 0);
    assert_eq!(s.note_durable(None, Some(5)), 0);
    assert_eq!(s.note_durable(Some(2), None), 3, "1..2 in order, 3 ahead");
    assert_eq!(s.note_durable(Some(4), None), 5);
    assert!(s.pending.lock().ahead_done.is_empty());
    assert_eq!(s.note_durable(None, Some(6)), 6, "nothing below it pending");
}
