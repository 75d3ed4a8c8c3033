//! The journal as recovery reads it: a whole journal file, and a frame's
//! payload on its own.
#![no_main]
use keyturn::store::journal::{Entry, Journal};
use keyturn_fuzz::file;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = Entry::decode_all(1, data);
    let path = file("journal", data);
    if let Ok(replay) = Journal::read(&path) {
        // Replay hands recovery consecutive frames after the checkpoint.
        let mut expect = replay.checkpoint_seq.0;
        for (seq, entries) in &replay.frames {
            expect = expect.wrapping_add(1);
            assert_eq!(seq.0, expect);
            let mut again = Vec::new();
            for e in entries {
                e.encode(&mut again);
            }
            assert_eq!(&Entry::decode_all(seq.0, &again).unwrap(), entries);
        }
    }
});
