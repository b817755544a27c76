//! The blob parser on arbitrary bytes: never panics, and whatever it
//! accepts encodes back to bytes that parse to the same envelope.
#![no_main]

use keyward::crypto::blob;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(envelope) = blob::parse(data) {
        let encoded = blob::encode(&envelope).expect("a parsed envelope encodes");
        assert_eq!(blob::parse(&encoded).expect("re-parses"), envelope);
    }
});
