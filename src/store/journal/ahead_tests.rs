//! Frames written ahead: a flip made durable while other zones' frames
//! wait for their data sync, what a crash at that moment leaves, and the
//! cases where it must wait instead.

use std::sync::mpsc;
use std::time::Duration;

use super::tests::Hooks;
use super::*;
use crate::ids::{Cbid, KeyVersion, Slot};

/// Hooks whose data syncs each wait for a permit the test grants, and
/// say when one has started waiting.
struct GatedHooks {
    permits: Mutex<u32>,
    granted: Condvar,
    entered: Mutex<Option<mpsc::Sender<()>>>,
}

impl GatedHooks {
    fn new() -> (Arc<Self>, mpsc::Receiver<()>) {
        let (tx, rx) = mpsc::channel();
        let hooks = Self {
            permits: Mutex::new(0),
            granted: Condvar::new(),
            entered: Mutex::new(Some(tx)),
        };
        (Arc::new(hooks), rx)
    }

    /// Lets one data sync through.
    fn grant(&self) {
        *self.permits.lock() += 1;
        self.granted.notify_all();
    }
}

/// Lets every data sync through when dropped, so that a failed assertion
/// ends its test instead of leaving the committer waiting (and the
/// journal's drop, which joins it).
struct OpenOnDrop(Arc<GatedHooks>);

impl Drop for OpenOnDrop {
    fn drop(&mut self) {
        *self.0.permits.lock() = u32::MAX;
        self.0.granted.notify_all();
    }
}

impl CommitHooks for GatedHooks {
    fn sync_data(&self) -> Result<(), std::io::Error> {
        if let Some(tx) = self.entered.lock().as_ref() {
            let _ = tx.send(());
        }
        let mut permits = self.permits.lock();
        while *permits == 0 {
            self.granted.wait(&mut permits);
        }
        *permits -= 1;
        Ok(())
    }
    fn durable(&self, _: JournalSeq) {}
    fn checkpoint(&self, journal: &mut dyn CheckpointJournal) -> Result<JournalSeq, JournalError> {
        let seq = journal.last_appended();
        journal.flush_through(seq)?;
        Ok(seq)
    }
}

/// A new journal at `path` whose data syncs wait for permits: the
/// journal, its hooks, the channel that says a sync started waiting, and
/// the guard that lets every sync through when the test ends.
fn gated_journal(
    path: &Path,
) -> (
    Arc<Journal>,
    Arc<GatedHooks>,
    mpsc::Receiver<()>,
    OpenOnDrop,
) {
    Journal::create(path).unwrap();
    let (hooks, entered) = GatedHooks::new();
    let j = Arc::new(Journal::start(path, JournalSeq(0), config(), hooks.clone()).unwrap());
    (j, hooks.clone(), entered, OpenOnDrop(hooks))
}

fn config() -> JournalConfig {
    JournalConfig {
        commit_interval: Duration::from_secs(3600),
        commit_bytes: 1 << 20,
        checkpoint_bytes: 1 << 30,
    }
}

/// A content block record of `zone` (shared with the checkpoint tests).
pub(super) fn write(zone: u32, i: u64) -> Entry {
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

/// A flip of `zone` to `to` (shared with the checkpoint tests).
pub(super) fn flip(zone: u32, to: u32) -> Entry {
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

/// Starts `commit_ahead(frame)` on another thread: its handle, and where
/// its result arrives.
fn commit_ahead_in_background(
    j: &Arc<Journal>,
    frame: AheadFrame,
) -> (
    std::thread::JoinHandle<()>,
    mpsc::Receiver<Result<Committed, JournalError>>,
) {
    let (tx, rx) = mpsc::channel();
    let flipper = j.clone();
    let t = std::thread::spawn(move || {
        let _ = tx.send(flipper.commit_ahead(frame));
    });
    (t, rx)
}

/// Zone 2's write is queued, the committer idle; zone 1's flip is written
/// at once, ahead of it. Read at that moment (a crash), the journal holds
/// the flip alone, nothing in order after the checkpoint; recovery goes on
/// after the flip's sequence. Then the write follows it.
#[test]
fn a_flip_is_written_at_once_ahead_of_another_zones_queued_write() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("j");
    Journal::create(&p).unwrap();
    let j = Journal::start(&p, JournalSeq(0), config(), Arc::new(Hooks::default())).unwrap();
    let w = j.append(ZoneId(2), &[write(2, 1)]);
    let frame = j.append_ahead(ZoneId(1), &[flip(1, 2)]);
    let seq = frame.seq();
    assert_eq!(seq, JournalSeq(2));
    assert_eq!(j.commit_ahead(frame).unwrap(), Committed::Ahead);
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
    let after = Journal::start(&crashed, r.last, config(), Arc::new(Hooks::default())).unwrap();
    let s = after.append(ZoneId(2), &[write(2, 9)]);
    assert_eq!(s, JournalSeq(3));
    after.commit_blocking(s).unwrap();
    drop(after);
    let r = Journal::read(&crashed).unwrap();
    assert_eq!(r.checkpoint_seq, JournalSeq(2));
    assert_eq!(r.frames, vec![(s, vec![write(2, 9)])]);

    // The durable sequence passes the flip once the write below it is in.
    j.commit_blocking(w).unwrap();
    assert_eq!(j.durable().seq, seq);
    drop(j);
    let r = Journal::read(&p).unwrap();
    assert_eq!(
        r.frames,
        vec![(seq, vec![flip(1, 2)]), (w, vec![write(2, 1)])],
        "the flip is written first, the write after it"
    );
    assert_eq!((r.in_order_through, r.last), (seq, seq));
}

/// While the committer syncs a group's data, a flip is handed to it: it
/// waits for that group, then is written ahead of the next group (zone 2's
/// later write) while that group's data sync is still under way.
#[test]
fn a_flip_during_a_data_sync_goes_ahead_of_the_next_group() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("j");
    let (j, hooks, entered, _open) = gated_journal(&p);
    let w1 = j.append(ZoneId(2), &[write(2, 1)]);
    let first = commit_in_background(&j, w1, &entered);

    let frame = j.append_ahead(ZoneId(1), &[flip(1, 2)]);
    let seq = frame.seq();
    let w2 = j.append(ZoneId(2), &[write(2, 2)]);
    let (flipping, rx) = commit_ahead_in_background(&j, frame);
    assert!(
        rx.recv_timeout(Duration::from_millis(300)).is_err(),
        "the flip was written during another group's data sync"
    );
    hooks.grant();
    first.join().unwrap().unwrap();
    let committed = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the flip waited for the next group's data sync")
        .unwrap();
    assert_eq!(committed, Committed::Handed);
    entered
        .recv_timeout(Duration::from_secs(10))
        .expect("the next group's data sync never started");
    assert_eq!(j.durable().seq, seq, "w1 and the flip, not w2");

    let crashed = dir.path().join("crashed");
    std::fs::copy(&p, &crashed).unwrap();
    let r = Journal::read(&crashed).unwrap();
    assert_eq!(
        r.frames,
        vec![(w1, vec![write(2, 1)]), (seq, vec![flip(1, 2)])]
    );
    assert_eq!((r.in_order_through, r.last), (seq, seq));

    hooks.grant();
    j.commit_blocking(w2).unwrap();
    flipping.join().unwrap();
    drop(Arc::into_inner(j).expect("only reference"));
    let r = Journal::read(&p).unwrap();
    assert_eq!(r.frames.last(), Some(&(w2, vec![write(2, 2)])));
    assert_eq!(r.last, w2);
}

/// A flip never goes ahead of its own zone's frames: queued, it is
/// committed in order with them; in flight, it waits for their data sync.
#[test]
fn a_flip_waits_for_its_own_zones_earlier_frames() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("j");
    Journal::create(&p).unwrap();
    let j = Journal::start(&p, JournalSeq(0), config(), Arc::new(Hooks::default())).unwrap();
    let w = j.append(ZoneId(1), &[write(1, 1)]);
    let other = j.append(ZoneId(2), &[write(2, 2)]);
    assert_eq!(j.last_pending_of(ZoneId(1)), Some(w), "queued");
    let frame = j.append_ahead(ZoneId(1), &[flip(1, 2)]);
    let seq = frame.seq();
    assert_eq!(j.commit_ahead(frame).unwrap(), Committed::InOrder);
    drop(j);
    let r = Journal::read(&p).unwrap();
    assert_eq!(
        r.frames,
        vec![
            (w, vec![write(1, 1)]),
            (other, vec![write(2, 2)]),
            (seq, vec![flip(1, 2)])
        ]
    );

    let p = dir.path().join("j2");
    let (j, hooks, entered, _open) = gated_journal(&p);
    let w = j.append(ZoneId(1), &[write(1, 1)]);
    let background = commit_in_background(&j, w, &entered);
    assert_eq!(j.last_pending_of(ZoneId(1)), Some(w), "in flight");
    assert_eq!(j.last_pending_of(ZoneId(2)), None);
    let frame = j.append_ahead(ZoneId(1), &[flip(1, 2)]);
    let seq = frame.seq();
    let (flipping, rx) = commit_ahead_in_background(&j, frame);
    assert!(
        rx.recv_timeout(Duration::from_millis(300)).is_err(),
        "the flip went ahead of its own zone's write"
    );
    hooks.grant();
    background.join().unwrap().unwrap();
    rx.recv_timeout(Duration::from_secs(10)).unwrap().unwrap();
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
        switch_at: None,
        durable_through: 0,
        ahead_done: BTreeSet::new(),
        handed: BTreeSet::new(),
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
    let j = Journal::start(&p, JournalSeq(0), config(), Arc::new(Hooks::default())).unwrap();
    let s = &j.shared;
    assert_eq!(s.note_durable(None, Some(3)), 0);
    assert_eq!(s.note_durable(None, Some(5)), 0);
    assert_eq!(s.note_durable(Some(2), None), 3, "1..2 in order, 3 ahead");
    assert_eq!(s.note_durable(Some(4), None), 5);
    assert!(s.pending.lock().ahead_done.is_empty());
    assert_eq!(s.note_durable(None, Some(6)), 6, "nothing below it pending");
}
