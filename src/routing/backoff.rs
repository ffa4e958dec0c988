//! Capped, jittered exponential backoff.

use std::time::Duration;

/// Backoff after `failures` consecutive failures: `initial · 2^(failures-1)` capped at `max`, then
/// "equal jitter" (half fixed, half random) so a fleet of agents does not reconnect in lockstep.
/// `random` is any uniformly random `u64` (the caller's entropy). Zero failures: no wait.
pub fn delay(failures: u32, initial: Duration, max: Duration, random: u64) -> Duration {
    if failures == 0 {
        return Duration::ZERO;
    }
    let shift = (failures - 1).min(31);
    let full = initial.saturating_mul(1u32 << shift).min(max);
    let half = full / 2;
    let span = (full - half).as_nanos() as u64;
    let jitter = if span == 0 { 0 } else { random % (span + 1) };
    half + Duration::from_nanos(jitter)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn doubles_then_caps() {
        let ms = Duration::from_millis;
        // random = 0 gives the lower edge: half of the un-jittered value
        assert_eq!(delay(1, ms(100), ms(1000), 0), ms(50));
        assert_eq!(delay(2, ms(100), ms(1000), 0), ms(100));
        assert_eq!(delay(3, ms(100), ms(1000), 0), ms(200));
        assert_eq!(delay(10, ms(100), ms(1000), 0), ms(500));
        assert_eq!(delay(0, ms(100), ms(1000), 7), Duration::ZERO);
    }

    proptest! {
        #[test]
        fn bounded_and_monotone_at_the_edges(f in 1u32..200, init in 1u64..5_000, extra in 0u64..60_000,
                                            r in any::<u64>()) {
            let initial = Duration::from_millis(init);
            let max = Duration::from_millis(init + extra);
            let d = delay(f, initial, max, r);
            prop_assert!(d <= max);
            prop_assert!(d >= initial.min(max) / 2);
            // the lower edge never shrinks as failures grow
            prop_assert!(delay(f + 1, initial, max, 0) >= delay(f, initial, max, 0));
        }
    }
}
