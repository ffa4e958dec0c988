//! A v1 (dropsonde) UDP datagram: see `metron::fuzzing::v1_datagram`.
#![no_main]

libfuzzer_sys::fuzz_target!(|bytes: &[u8]| metron::fuzzing::v1_datagram(bytes));
