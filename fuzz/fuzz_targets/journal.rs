//! The journal as recovery reads it: a whole journal file, and a frame's
//! payload on its own.
#![no_main]
use std::collections::BTreeSet;

use keyturn::store::journal::{Entry, Journal};
use keyturn_fuzz::file;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = Entry::decode_all(1, data);
    let path = file("journal", data);
    if let Ok(replay) = Journal::read(&path) {
        // Replay hands recovery distinct sequences after the checkpoint:
        // every one up to `in_order_through`, and above it only frames
        // written ahead, up to `last`.
        let checkpoint = replay.checkpoint_seq.0;
        let mut seen = BTreeSet::new();
        for (seq, entries) in &replay.frames {
            assert!(
                seq.0 > checkpoint,
                "frame {} at or below the checkpoint",
                seq.0
            );
            assert!(seen.insert(seq.0), "frame {} twice", seq.0);
            let mut again = Vec::new();
            for e in entries {
                e.encode(&mut again);
            }
            assert_eq!(&Entry::decode_all(seq.0, &again).unwrap(), entries);
        }
        let in_order = replay.in_order_through.0;
        assert!(checkpoint <= in_order && in_order <= replay.last.0);
        assert_eq!(replay.last.0, seen.last().copied().unwrap_or(checkpoint));
        assert!((checkpoint + 1..=in_order).all(|s| seen.contains(&s)));
    }
});
