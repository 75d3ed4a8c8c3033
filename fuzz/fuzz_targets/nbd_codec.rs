//! The sans-I/O NBD parsers on their own: client flags, option headers and
//! payloads, request headers and their validation.
#![no_main]
use keyturn::nbd::proto::{
    ClientFlags, ClientOption, OptionHeader, REQUEST_HEADER_LEN, RequestHeader, SessionParams,
};
use keyturn_fuzz as _;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    match which % 3 {
        0 => {
            if let Some(flags) = rest.first_chunk::<4>() {
                let _ = ClientFlags::parse(*flags);
            }
            if let Some(head) = rest.first_chunk::<16>() {
                let _ = OptionHeader::parse(head);
            }
        }
        1 => {
            if let Some((code, payload)) = rest.split_first_chunk::<4>() {
                let _ = ClientOption::parse(u32::from_be_bytes(*code), payload);
            }
        }
        _ => {
            // [session: size u64, max_payload u32, flags u8][request header]
            let Some((s, rest)) = rest.split_first_chunk::<13>() else {
                return;
            };
            let Some(raw) = rest.first_chunk::<REQUEST_HEADER_LEN>() else {
                return;
            };
            let session = SessionParams {
                size: u64::from_le_bytes(s[..8].try_into().unwrap()),
                max_payload: u32::from_le_bytes(s[8..12].try_into().unwrap()),
                structured: s[12] & 1 != 0,
                meta_context: (s[12] & 2 != 0).then_some(1),
                read_only: s[12] & 4 != 0,
            };
            if let Ok(header) = RequestHeader::parse(raw) {
                let _ = header.payload_len();
                if let Ok(req) = header.validate(&session) {
                    // What validation promises the inner layers.
                    use keyturn::nbd::proto::Command::*;
                    match req.command {
                        Read { offset, length } | Write { offset, length, .. } => {
                            assert!(length <= session.max_payload);
                            assert!(offset + u64::from(length) <= session.size);
                        }
                        Trim { offset, length, .. }
                        | Cache { offset, length }
                        | WriteZeroes { offset, length, .. }
                        | BlockStatus { offset, length, .. } => {
                            assert!(offset + u64::from(length) <= session.size);
                        }
                        Flush | Disc => {}
                    }
                }
            }
        }
    }
});
