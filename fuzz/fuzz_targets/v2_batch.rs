//! An `EnvelopeBatch` body as an emitter sends it: see `metron::fuzzing::v2_batch`.
#![no_main]

libfuzzer_sys::fuzz_target!(|bytes: &[u8]| metron::fuzzing::v2_batch(bytes));
