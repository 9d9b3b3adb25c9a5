//! Protocol v1's client-frame decoder on arbitrary input.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    wschat_protocol::fuzzing::v1_decode(data);
});
