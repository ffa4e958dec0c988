//! The fuzz targets' checked-in corpus (`fuzz/corpus/`, decisions.md 24) replayed through the
//! same differential checks the fuzzer runs: every input the fuzzer kept for the coverage it
//! reached stays a regression test, without nightly or cargo-fuzz.

use std::path::Path;

/// Every file of `fuzz/corpus/<target>`, each run through `check`; returns how many ran.
fn replay(target: &str, check: fn(&[u8])) -> usize {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut ran = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.expect("a directory entry").path();
        let bytes = std::fs::read(&path).expect("a corpus file");
        if let Err(panic) = std::panic::catch_unwind(|| check(&bytes)) {
            panic!(
                "{} fails its check: {}",
                path.display(),
                metron::telemetry::logging::panic_message(&*panic)
            );
        }
        ran += 1;
    }
    ran
}

#[test]
fn every_v2_batch_the_fuzzer_kept_reads_as_prost_and_the_model_read_it() {
    let ran = replay("v2_batch", metron::fuzzing::v2_batch);
    assert!(
        ran >= 100,
        "only {ran} corpus inputs: is fuzz/corpus checked in?"
    );
}

#[test]
fn every_v1_datagram_the_fuzzer_kept_decodes_round_trips_and_converts() {
    let ran = replay("v1_datagram", metron::fuzzing::v1_datagram);
    assert!(
        ran >= 100,
        "only {ran} corpus inputs: is fuzz/corpus checked in?"
    );
}
