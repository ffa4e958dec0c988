//! The differential checks behind the fuzz targets (`fuzz/`) and the replay of their corpus in
//! the test suite (`tests/fuzz_corpus.rs`). Each takes bytes as they would arrive from the
//! network and panics when metron and an independent reading disagree. Only with the `fuzzing`
//! feature.

use prost::bytes::Bytes;
use prost::Message as _;

use crate::envelope::testing::{as_sent, default_tags as defaults, Model, Stages};
use crate::envelope::{encode_batch, read_batch};
use crate::proto::EnvelopeBatch;
use crate::v1::{self, V1Identity};

/// An `EnvelopeBatch` body as a gRPC emitter sends it. The edge's reader refuses it exactly when
/// prost does; when it reads, the whole pipeline (tags, counter totals, numbers, signature)
/// gives each envelope exactly what the plain model gives the envelope prost decoded, every
/// envelope's admission price covers what leaves, and every signature verifies.
///
/// # Panics
/// On any disagreement: that is the finding.
pub fn v2_batch(bytes: &[u8]) {
    let prost = EnvelopeBatch::decode(bytes);
    let read = read_batch(Bytes::copy_from_slice(bytes), 300, usize::MAX);
    assert_eq!(
        prost.is_ok(),
        read.is_ok(),
        "prost: {:?}, reader: {:?}",
        prost.as_ref().err(),
        read.as_ref().err()
    );
    let Ok(decoded) = prost else {
        return;
    };
    let (got, _) = Stages::new(&defaults())
        .run_body(Bytes::copy_from_slice(bytes))
        .expect("read once, reads again");
    assert_eq!(got.len(), decoded.batch.len());
    let mut model = Model::new(&defaults());
    for (mut want, got) in decoded.batch.into_iter().zip(got) {
        model.process(&mut want);
        assert_eq!(as_sent(&got), as_sent(&want), "{got:?}");
        crate::verify(&got, "k", b"key").expect("the signature verifies");
    }
}

/// A v1 (dropsonde) datagram as the UDP edge reads it: decoding never panics; what decodes
/// re-encodes to itself, and what the agent makes of it goes through the v2 pipeline as
/// [`v2_batch`] checks.
///
/// # Panics
/// On any disagreement.
pub fn v1_datagram(bytes: &[u8]) {
    let Ok(e) = v1::decode(bytes) else {
        return;
    };
    // Compared encoded: a NaN value is not equal to itself.
    let encoded = e.encode_to_vec();
    let again = v1::decode(&encoded).expect("what decoded re-encodes to something that decodes");
    assert_eq!(again.encode_to_vec(), encoded);
    let identity = V1Identity {
        deployment: "cf".into(),
        job: "diego".into(),
        index: "0".into(),
        ip: "10.0.0.1".into(),
    };
    let v2 = v1::agent_to_v2(e, &identity);
    v2_batch(&encode_batch(vec![v2]));
}
