//! The in-channel message parser: any bytes give a message or an error, never a panic; whatever
//! decodes re-encodes to a frame that decodes to the same message.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nodeseal_keymgr::protocol::{decode_frame, encode_frame};

fuzz_target!(|data: &[u8]| {
    if let Ok(msg) = decode_frame(data) {
        let frame = encode_frame(&msg).expect("a decoded message re-encodes");
        assert_eq!(decode_frame(&frame).expect("re-encoded frame decodes"), msg);
    }
});
