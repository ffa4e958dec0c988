//! Fair shedding (decision 30): when the budget is under pressure, the edge refuses new
//! envelopes from the sources sending more than their fair share of what the pipeline drains,
//! before any work is spent on them, and admits the others. Plain logic: the edge feeds it what
//! it read of each batch (source ids in place) and the ledger's readings.
//!
//! - Each tracked source has two rates, exponentially weighted over [`TAU`]: what it *offered*
//!   (every envelope the edge read) and what was *admitted*.
//! - The pipeline's capacity is the rate at which the Doppler pool delivers budget bytes (the
//!   pressure it answers leaves the drains out too; drops are no capacity).
//!   Below [`MIN_CAPACITY`] of the budget a second nothing drains (a stalled or absent
//!   destination): no share of nothing is fair, so nobody is shed by this policy, and the whole
//!   budget serves to ride the outage out.
//! - The fair share `f` is the max-min water level, `Σ min(offered_i, f) = capacity`, and never
//!   less than the mean of what the sources offer (the capacity is measured from bursty
//!   acknowledgements; a dip must not make the quiet sources heavy).
//! - While the budget holds at least [`SHED_FROM`] of itself, an envelope whose source offers
//!   no more than `f` is always admitted (by this policy: the budget may still be full); one
//!   whose source offers more is admitted only while the source's admitted rate is below its
//!   allowance: `f` scaled down as the budget fills from [`SHED_FROM`] to [`SHED_ALL`], so what
//!   heavy sources are admitted never fills the budget and there is always room for the light
//!   ones.
//!
//! Below [`TRACK_FROM`] nothing is read or tracked (no cost while the pipeline is easy).
//! The table holds at most `max_sources` sources; when full, the ones offering least are
//! forgotten first (a forgotten source starts again from nothing, which only favours it).

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Rates are averaged over this long.
pub const TAU: Duration = Duration::from_secs(1);
/// From this share of the budget held, sources are tracked.
pub const TRACK_FROM: f64 = 0.25;
/// From this share, sources above their fair share are shed.
pub const SHED_FROM: f64 = 0.5;
/// At this share, sources above their fair share get nothing.
pub const SHED_ALL: f64 = 0.9;
/// The least capacity, as a share of the budget a second, at which sources are shed.
pub const MIN_CAPACITY: f64 = 0.01;
/// How often the fair share is computed again.
const LEVEL_EVERY: Duration = Duration::from_millis(50);

/// An exponentially weighted rate, bytes per second.
#[derive(Debug, Clone, Copy)]
struct Rate {
    value: f64,
    at: Instant,
}

impl Rate {
    fn new(at: Instant) -> Self {
        Self { value: 0.0, at }
    }

    /// The rate decayed to `now`.
    fn at(&self, now: Instant) -> f64 {
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        self.value * (-dt / TAU.as_secs_f64()).exp()
    }

    fn add(&mut self, now: Instant, bytes: usize) {
        self.value = self.at(now) + bytes as f64 / TAU.as_secs_f64();
        self.at = now;
    }
}

#[derive(Debug, Clone, Copy)]
struct Source {
    /// Bytes/s offered and admitted (what the policy works on).
    offered: Rate,
    admitted: Rate,
    /// Envelopes/s offered, refused by fair shedding, refused by the source's rate limit: for
    /// the heaviest sources' report.
    envelopes: Rate,
    shed: Rate,
    limited: Rate,
}

/// One of the heaviest sources, as [`FairShed::heaviest`] reports it (rates over about 1 s).
#[derive(Debug, Clone, PartialEq)]
pub struct Heavy {
    pub source_id: String,
    pub envelopes_per_second: f64,
    pub bytes_per_second: f64,
    /// Refused by fair shedding (`fair_share`), envelopes/s.
    pub fair_share_per_second: f64,
    /// Refused by the source's rate limit (`source_rate_limited`), envelopes/s.
    pub rate_limited_per_second: f64,
}

/// One envelope of a batch as the policy sees it.
pub struct Offer<'a> {
    pub source: &'a [u8],
    pub bytes: usize,
}

/// The fair shedding table. See the module docs.
pub struct FairShed {
    sources: HashMap<Box<[u8]>, Source>,
    max_sources: usize,
    /// The pipeline's capacity, bytes/s, and the `freed` reading it was last updated from.
    capacity: Rate,
    freed: Option<(u64, Instant)>,
    /// The fair share in force (bytes/s; infinite: nobody is shed), what a source above it may
    /// have admitted, and when they were computed.
    level: f64,
    allowance: f64,
    level_at: Option<Instant>,
    /// The mean offer (bytes/s) at the last computation: a destination over its share tells
    /// light sources by it ([`FairShed::is_light`]).
    mean: f64,
    /// Until when the edge should track every batch's sources although the pipeline is easy
    /// (a destination is over its share: [`FairShed::want_tracking`]).
    track_until: Option<Instant>,
    /// When sources were last recorded.
    observed_at: Option<Instant>,
}

impl FairShed {
    pub fn new(max_sources: usize) -> Self {
        Self {
            sources: HashMap::new(),
            max_sources: max_sources.max(1),
            capacity: Rate::new(Instant::now()),
            freed: None,
            level: f64::INFINITY,
            allowance: f64::INFINITY,
            level_at: None,
            mean: f64::INFINITY,
            track_until: None,
            observed_at: None,
        }
    }

    /// Decides for each of `offers` (in order) whether it is admitted, given the budget's
    /// `occupancy` (0.0-1.0) and the ledger's `freed` bytes so far, at `now`. `keep[i]` says
    /// whether offer `i` is; the count refused is returned.
    /// `observed`: the offers were already recorded by [`FairShed::observe`] (the rate limits
    /// read them first).
    pub fn decide(
        &mut self,
        offers: &[Offer],
        (occupancy, budget): (f64, usize),
        freed: u64,
        now: Instant,
        keep: &mut Vec<bool>,
        observed: bool,
    ) -> usize {
        keep.clear();
        self.measure(freed, now);
        if occupancy < TRACK_FROM {
            keep.resize(offers.len(), true);
            return 0;
        }
        if !observed {
            self.observe(offers, now);
        }
        self.refresh(now);
        let scale = ((SHED_ALL - occupancy) / (SHED_ALL - SHED_FROM)).clamp(0.0, 1.0);
        self.allowance = self.level * scale;
        let shedding =
            occupancy >= SHED_FROM && self.capacity.at(now) >= MIN_CAPACITY * budget as f64;
        let mut refused = 0;
        for o in offers {
            let (level, allowance) = (self.level, self.allowance);
            let s = self.entry(o.source, now);
            let admit = !shedding || s.offered.at(now) <= level || s.admitted.at(now) < allowance;
            if admit {
                s.admitted.add(now, o.bytes);
            } else {
                s.shed.add(now, 1);
                refused += 1;
            }
            keep.push(admit);
        }
        refused
    }

    /// Computes the level and the mean again if they are older than 50 ms.
    fn refresh(&mut self, now: Instant) {
        if self
            .level_at
            .is_some_and(|at| now.saturating_duration_since(at) < LEVEL_EVERY)
        {
            return;
        }
        // Sources that went quiet are forgotten here, so the mean is over the active ones.
        self.sources.retain(|_, s| {
            s.offered.at(now) >= 1.0 || s.limited.at(now) >= 0.01 || s.shed.at(now) >= 0.01
        });
        let mut demands: Vec<f64> = self.sources.values().map(|s| s.offered.at(now)).collect();
        self.mean = demands.iter().sum::<f64>() / demands.len().max(1) as f64;
        // Never below the mean demand: the capacity is measured from acknowledgements, which
        // come in bursts and stop for a while when a connection is replaced; a dip must not
        // turn the quiet sources into heavy ones.
        self.level = water_level(&mut demands, self.capacity.at(now)).max(self.mean);
        self.level_at = Some(now);
    }

    /// A destination is over its share: the edge should record every batch's sources for the
    /// next 2 s, so the sequencer can tell the light ones.
    pub fn want_tracking(&mut self, now: Instant) {
        self.track_until = Some(now + Duration::from_secs(2));
    }

    /// Whether the edge should record sources although the pipeline is easy.
    pub fn tracking_wanted(&self, now: Instant) -> bool {
        self.track_until.is_some_and(|until| now < until)
    }

    /// Whether sources were recorded in the last second, so light ones can be told apart.
    pub fn fresh(&self, now: Instant) -> bool {
        self.mean.is_finite()
            && self
                .observed_at
                .is_some_and(|at| now.saturating_duration_since(at) < TAU)
    }

    /// Whether `source` offers less than the mean of the active sources recorded (see
    /// [`FairShed::fresh`]; a source not recorded yet, its first envelope, is). A draining
    /// destination over its share still takes a light source's envelopes, within one more share
    /// of its own (decision 30).
    pub fn is_light(&self, source: &[u8], now: Instant) -> bool {
        self.sources
            .get(source)
            .is_none_or(|s| s.offered.at(now) < self.mean)
    }

    /// Whether `source` offers less than half the mean (see [`FairShed::is_light`]; a source not
    /// recorded yet is): a slot with a backlog puts its envelopes in express (decision 32).
    /// Half, so that a source near the mean does not flip between lanes as rates wobble, and a
    /// lone source is never quiet.
    pub fn is_quiet(&self, source: &[u8], now: Instant) -> bool {
        self.sources
            .get(source)
            .is_none_or(|s| s.offered.at(now) < self.mean / 2.0)
    }

    /// Records what `offers` offer (their sources' rates) without deciding anything: for the
    /// heaviest sources' report while only rate limits read the batches.
    pub fn observe(&mut self, offers: &[Offer], now: Instant) {
        for o in offers {
            let s = self.entry(o.source, now);
            s.offered.add(now, o.bytes);
            s.envelopes.add(now, 1);
        }
        self.observed_at = Some(now);
        self.refresh(now);
    }

    /// Records envelopes of `source` its rate limit refused.
    pub fn rate_limited(&mut self, source: &[u8], n: usize, now: Instant) {
        self.entry(source, now).limited.add(now, n);
    }

    /// The `n` sources offering the most bytes now, heaviest first (sources offering nothing
    /// any more left out).
    pub fn heaviest(&self, n: usize, now: Instant) -> Vec<Heavy> {
        // Ranked on the rates alone; names are made for the n kept only.
        let mut ranked: Vec<(f64, &[u8], &Source)> = self
            .sources
            .iter()
            .map(|(k, s)| (s.offered.at(now), &**k, s))
            .filter(|(bytes, _, s)| *bytes >= 1.0 || s.limited.at(now) >= 0.5)
            .collect();
        let n = n.min(ranked.len());
        if n < ranked.len() {
            ranked.select_nth_unstable_by(n, |a, b| b.0.total_cmp(&a.0));
            ranked.truncate(n);
        }
        ranked.sort_by(|a, b| b.0.total_cmp(&a.0));
        ranked
            .into_iter()
            .map(|(bytes, k, s)| Heavy {
                source_id: String::from_utf8_lossy(k).into_owned(),
                envelopes_per_second: s.envelopes.at(now),
                bytes_per_second: bytes,
                fair_share_per_second: s.shed.at(now),
                rate_limited_per_second: s.limited.at(now),
            })
            .collect()
    }

    /// Updates the capacity from the ledger's `freed` reading (cheap: at most one sample per
    /// 50 ms; the edge calls it for every batch, so the estimate is warm when pressure comes).
    pub fn measure(&mut self, freed: u64, now: Instant) {
        match self.freed {
            None => self.freed = Some((freed, now)),
            Some((before, at)) if now.saturating_duration_since(at) >= LEVEL_EVERY => {
                let bytes = freed.saturating_sub(before) as usize;
                self.capacity.add(now, bytes);
                self.freed = Some((freed, now));
            }
            Some(_) => {}
        }
    }

    fn entry(&mut self, source: &[u8], now: Instant) -> &mut Source {
        // A known source (the usual case) costs a lookup and no allocation.
        if !self.sources.contains_key(source) {
            if self.sources.len() >= self.max_sources {
                self.forget_lightest(now);
            }
            self.sources.insert(
                source.into(),
                Source {
                    offered: Rate::new(now),
                    admitted: Rate::new(now),
                    envelopes: Rate::new(now),
                    shed: Rate::new(now),
                    limited: Rate::new(now),
                },
            );
        }
        self.sources.get_mut(source).expect("inserted above")
    }

    /// Forgets the tenth of the sources offering least (at least one).
    fn forget_lightest(&mut self, now: Instant) {
        let mut rates: Vec<f64> = self.sources.values().map(|s| s.offered.at(now)).collect();
        let k = (rates.len() / 10).max(1).min(rates.len() - 1);
        let (_, cut, _) = rates.select_nth_unstable_by(k, f64::total_cmp);
        let cut = *cut;
        let mut left = k;
        self.sources.retain(|_, s| {
            if left > 0 && s.offered.at(now) <= cut {
                left -= 1;
                false
            } else {
                true
            }
        });
    }
}

/// The max-min fair share of `capacity` between `demands`: the level `f` with
/// `Σ min(d, f) == capacity`, infinite when every demand fits.
pub fn water_level(demands: &mut [f64], capacity: f64) -> f64 {
    demands.sort_by(f64::total_cmp);
    let mut left = capacity.max(0.0);
    let n = demands.len();
    for (i, d) in demands.iter().enumerate() {
        let share = left / (n - i) as f64;
        if *d > share {
            return share;
        }
        left -= d;
    }
    f64::INFINITY
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_water_level_serves_the_small_demands_whole() {
        assert_eq!(water_level(&mut [1.0, 2.0, 100.0], 13.0), 10.0);
        assert_eq!(water_level(&mut [1.0, 2.0, 3.0], 13.0), f64::INFINITY);
        assert_eq!(water_level(&mut [50.0, 50.0], 10.0), 5.0);
        assert_eq!(water_level(&mut [], 10.0), f64::INFINITY);
    }

    #[test]
    fn the_heaviest_are_ranked_by_what_they_offer() {
        let mut fair = FairShed::new(100);
        let now = Instant::now();
        let names = ["a", "b", "c", "d", "e"];
        let offers: Vec<Offer> = names
            .iter()
            .enumerate()
            .flat_map(|(i, s)| {
                (0..=i).map(move |_| Offer {
                    source: s.as_bytes(),
                    bytes: 100,
                })
            })
            .collect();
        fair.observe(&offers, now);
        let top: Vec<String> = fair
            .heaviest(2, now)
            .into_iter()
            .map(|h| h.source_id)
            .collect();
        assert_eq!(top, ["e", "d"]);
        assert_eq!(fair.heaviest(10, now).len(), 5);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// Max-min fairness: at the level, the demands served whole and the rest capped at it
        /// add up to the capacity exactly; no demand at or under the level is cut while one
        /// above it gets more than the level.
        #[test]
        fn the_level_is_max_min_fair(mut demands in prop::collection::vec(0.0f64..1e6, 1..50),
                                     capacity in 0.0f64..2e7) {
            let level = water_level(&mut demands.clone(), capacity);
            let served: f64 = demands.iter().map(|d| d.min(level)).sum();
            let total: f64 = demands.iter().sum();
            if level.is_finite() {
                prop_assert!((served - capacity).abs() <= 1e-6 * capacity.max(1.0), "{served} vs {capacity}");
                prop_assert!(demands.iter().any(|d| *d > level));
            } else {
                prop_assert!(total <= capacity * (1.0 + 1e-9) + 1e-9);
            }
            demands.sort_by(f64::total_cmp);
        }

        /// Under pressure, with a steady offer per source over several seconds, a source offering
        /// no more than its fair share loses nothing, and every refused envelope belongs to a
        /// source offering more than the level.
        #[test]
        fn sources_within_their_share_lose_nothing(
            heavy in prop::collection::vec(2_000usize..20_000, 1..4),
            light in prop::collection::vec(1usize..200, 1..30),
            occupancy in 0.5f64..0.85,
        ) {
            let mut fair = FairShed::new(1000);
            let t0 = Instant::now();
            // The pipeline drains 5,000 bytes every 10 ms (500 kB/s).
            let mut freed = 0u64;
            let mut keep = Vec::new();
            let mut lost = vec![0usize; heavy.len() + light.len()];
            let names: Vec<String> = (0..heavy.len() + light.len()).map(|i| format!("s{i}")).collect();
            // The lowest level in force while losses are counted (the capacity's estimate
            // saw-tooths between samples, and with it a level close to the demands).
            let mut lowest = f64::INFINITY;
            for step in 0..600u64 {
                let now = t0 + Duration::from_millis(10 * step);
                freed += 5_000;
                // Per 10 ms: each source offers its bytes/s / 100, in 100-byte envelopes.
                let per: Vec<usize> = heavy.iter().chain(&light).map(|b| (b / 100).max(1)).collect();
                let offers: Vec<Offer> = per.iter().enumerate().flat_map(|(i, n)| {
                    (0..*n).map(move |_| i)
                }).map(|i| Offer { source: names[i].as_bytes(), bytes: 100 }).collect();
                let level_before = fair.level;
                fair.decide(&offers, (occupancy, 1 << 20), freed, now, &mut keep, false);
                if step < 300 {
                    continue; // let the rates settle
                }
                lowest = lowest.min(fair.level).min(level_before);
                for (o, k) in offers.iter().zip(&keep) {
                    if !k {
                        let i: usize = std::str::from_utf8(&o.source[1..]).unwrap().parse().unwrap();
                        lost[i] += 1;
                        // Refused only above the level in force.
                        let offered = fair.sources[o.source].offered.at(now);
                        prop_assert!(offered > fair.level || offered > level_before);
                    }
                }
            }
            for (i, b) in heavy.iter().chain(&light).enumerate() {
                // A source offering at most 90% of the level, whenever it was computed, never
                // lost anything.
                if ((*b / 100).max(1) * 100 * 100) as f64 <= 0.9 * lowest {
                    prop_assert_eq!(lost[i], 0, "source {} offering {} B/s, lowest level {}", i, b, lowest);
                }
            }
        }
    }
}
