//! What to do with an export's answer (plain logic, unit-tested): the OTLP specification's
//! retryable codes, `RESOURCE_EXHAUSTED` only with a `RetryInfo` (its delay honoured), a signal
//! answered `UNIMPLEMENTED` paused for [`PAUSE`], anything else refused for good.

use std::time::{Duration, Instant};

use prost::Message;
use tonic::Code;

/// How long a signal answered `UNIMPLEMENTED` is not exported (its envelopes are counted
/// `signal_unimplemented` meanwhile).
pub const PAUSE: Duration = Duration::from_secs(300);

/// An export's failure, classified.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Try again: after the collector's own delay when it gave one, else the backoff's.
    Retry(Option<Duration>),
    /// The collector has no pipeline for this signal.
    Unimplemented,
    /// Not retryable: the batch is dropped.
    Refused,
}

/// Classifies a failed export (OTLP/gRPC "Failures": CANCELLED, DEADLINE_EXCEEDED, ABORTED,
/// OUT_OF_RANGE, UNAVAILABLE and DATA_LOSS are retryable; RESOURCE_EXHAUSTED only with
/// `RetryInfo`). A request over a message size limit (tonic's and grpc-go's words) is refused,
/// whatever its code: the same bytes can never succeed.
pub fn classify(status: &tonic::Status) -> Verdict {
    let message = status.message();
    if message.contains("message length too large") || message.contains("larger than max") {
        return Verdict::Refused;
    }
    match status.code() {
        Code::Cancelled
        | Code::DeadlineExceeded
        | Code::Aborted
        | Code::OutOfRange
        | Code::Unavailable
        | Code::DataLoss => Verdict::Retry(retry_delay(status.details())),
        Code::ResourceExhausted => match retry_delay(status.details()) {
            Some(d) => Verdict::Retry(Some(d)),
            None => Verdict::Refused,
        },
        Code::Unimplemented => Verdict::Unimplemented,
        _ => Verdict::Refused,
    }
}

/// `google.rpc.Status`, as gRPC carries it in `grpc-status-details-bin`.
#[derive(Clone, PartialEq, Message)]
struct RpcStatus {
    #[prost(int32, tag = "1")]
    code: i32,
    #[prost(string, tag = "2")]
    message: String,
    #[prost(message, repeated, tag = "3")]
    details: Vec<Any>,
}

#[derive(Clone, PartialEq, Message)]
struct Any {
    #[prost(string, tag = "1")]
    type_url: String,
    #[prost(bytes = "vec", tag = "2")]
    value: Vec<u8>,
}

/// `google.rpc.RetryInfo`.
#[derive(Clone, PartialEq, Message)]
struct RetryInfo {
    #[prost(message, optional, tag = "1")]
    retry_delay: Option<ProtoDuration>,
}

/// `google.protobuf.Duration`.
#[derive(Clone, PartialEq, Message)]
struct ProtoDuration {
    #[prost(int64, tag = "1")]
    seconds: i64,
    #[prost(int32, tag = "2")]
    nanos: i32,
}

const RETRY_INFO: &str = "type.googleapis.com/google.rpc.RetryInfo";

/// The delay of a `RetryInfo` in a status's details, if there is one (at most an hour).
pub fn retry_delay(details: &[u8]) -> Option<Duration> {
    let status = RpcStatus::decode(details).ok()?;
    let info = status.details.iter().find(|a| a.type_url == RETRY_INFO)?;
    let d = RetryInfo::decode(info.value.as_slice()).ok()?.retry_delay?;
    let secs = u64::try_from(d.seconds).ok()?;
    let nanos = u32::try_from(d.nanos).ok()?;
    Some(Duration::new(secs, nanos.min(999_999_999)).min(Duration::from_secs(3600)))
}

/// Status details carrying a `RetryInfo` of `delay` (for tests and the test collector).
pub fn retry_info_details(code: Code, delay: Duration) -> Vec<u8> {
    let info = RetryInfo {
        retry_delay: Some(ProtoDuration {
            seconds: delay.as_secs() as i64,
            nanos: delay.subsec_nanos() as i32,
        }),
    };
    RpcStatus {
        code: code as i32,
        message: String::new(),
        details: vec![Any {
            type_url: RETRY_INFO.into(),
            value: info.encode_to_vec(),
        }],
    }
    .encode_to_vec()
}

/// A signal's pause after `UNIMPLEMENTED`.
#[derive(Debug, Default, Clone, Copy)]
pub struct Pause {
    until: Option<Instant>,
}

impl Pause {
    /// Whether the signal is paused at `now`.
    pub fn paused(&self, now: Instant) -> bool {
        self.until.is_some_and(|u| now < u)
    }

    /// Starts a pause; returns whether one was not already running (then warn, once per pause).
    pub fn start(&mut self, now: Instant) -> bool {
        let fresh = !self.paused(now);
        if fresh {
            self.until = Some(now + PAUSE);
        }
        fresh
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retryable_codes_as_the_otlp_specification_lists_them() {
        for code in [
            Code::Cancelled,
            Code::DeadlineExceeded,
            Code::Aborted,
            Code::OutOfRange,
            Code::Unavailable,
            Code::DataLoss,
        ] {
            assert_eq!(
                classify(&tonic::Status::new(code, "")),
                Verdict::Retry(None),
                "{code:?}"
            );
        }
        for code in [
            Code::InvalidArgument,
            Code::PermissionDenied,
            Code::Unauthenticated,
            Code::Internal,
            Code::Unknown,
            Code::ResourceExhausted,
        ] {
            assert_eq!(
                classify(&tonic::Status::new(code, "")),
                Verdict::Refused,
                "{code:?}"
            );
        }
        assert_eq!(
            classify(&tonic::Status::new(Code::Unimplemented, "no logs pipeline")),
            Verdict::Unimplemented
        );
    }

    #[test]
    fn resource_exhausted_is_retried_only_with_retry_info_and_after_its_delay() {
        let delay = Duration::from_millis(2_500);
        let details = retry_info_details(Code::ResourceExhausted, delay);
        let status = tonic::Status::with_details(
            Code::ResourceExhausted,
            "slow down",
            details.clone().into(),
        );
        assert_eq!(classify(&status), Verdict::Retry(Some(delay)));
        let status = tonic::Status::with_details(Code::Unavailable, "", details.into());
        assert_eq!(classify(&status), Verdict::Retry(Some(delay)));
        assert_eq!(retry_delay(b"\xff\xff"), None);
    }

    #[test]
    fn a_request_over_a_size_limit_is_refused_whatever_its_code() {
        // tonic's encoder and decoder, and grpc-go's receiver, in their own words.
        for status in [
            tonic::Status::out_of_range(
                "Error, encoded message length too large: found 5562715 bytes, the limit is: \
                 4194304 bytes",
            ),
            tonic::Status::out_of_range("Error, decoded message length too large: found 5 bytes"),
            tonic::Status::resource_exhausted(
                "grpc: received message larger than max (5562715 vs. 4194304)",
            ),
        ] {
            assert_eq!(classify(&status), Verdict::Refused, "{status:?}");
        }
        assert!(matches!(
            classify(&tonic::Status::out_of_range("something else")),
            Verdict::Retry(None)
        ));
    }

    #[test]
    fn a_pause_warns_once_and_ends_after_five_minutes() {
        let t = Instant::now();
        let mut p = Pause::default();
        assert!(!p.paused(t));
        assert!(p.start(t));
        assert!(
            !p.start(t + Duration::from_secs(10)),
            "one warning per pause"
        );
        assert!(p.paused(t + Duration::from_secs(299)));
        assert!(!p.paused(t + PAUSE));
        assert!(p.start(t + PAUSE));
    }
}
