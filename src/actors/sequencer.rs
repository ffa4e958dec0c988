//! The sequencer actor: numbers each source's envelopes (stream and number, written into the
//! `metron` tag by the signer) and splits each batch by connection slot, so a source's envelopes
//! stay in order on one connection. A panic while numbering loses that batch (counted
//! `actor_panic`); numbering then starts over under a new stream ([`super::guard`]).

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;

use super::guard::{self, catch, Chaos};
use super::messages::{
    DumpState, LaneSplit, Part, Pick, Retire, SequencedBatch, SetBudget, SetDrainTable, SetOutlets,
    TaggedBatch,
};
use crate::envelope::outbox::Outlet;
use crate::envelope::queue::EgressQueue;
use crate::envelope::sequence::{slot_of, Sequencer};
use crate::envelope::{Batch, Kinds, Routed};
use crate::limits::fair::FairShed;
use crate::limits::lanes::{Lane, Lanes};
use crate::syslog::apps::{AppRouter, DrainSpec};
use crate::telemetry::{Account, ActorName, DropReason, Ledger};

const ME: ActorName = ActorName::Sequencer;

pub struct SequencerActor {
    sequencer: Sequencer,
    /// `sequencing.enabled`: without it, batches are only split by slot, never numbered.
    numbering: bool,
    /// One queue per Doppler connection slot, for the share check before stamping (none without
    /// a Doppler pool).
    queues: Vec<Arc<EgressQueue>>,
    /// What the Doppler pool takes (`dopplers.disable_logs` leaves logs out).
    doppler_kinds: Kinds,
    /// The destinations beside the Doppler pool: `syslog.aggregate_drains`, then the binding
    /// cache's aggregate drains.
    outlets: Vec<Outlet>,
    /// `syslog.aggregate_drains` alone.
    config_outlets: Vec<Outlet>,
    /// App drains, with a binding cache.
    apps: Option<Apps>,
    /// See [`Routing::fair`].
    fair: Option<Arc<parking_lot::Mutex<FairShed>>>,
    /// Each slot's lanes: which of its queue's lanes each source's envelopes go to.
    lanes: Vec<Lanes>,
    /// Each destination's egress when it last changed (by account), for [`Self::draining`].
    progress: HashMap<usize, (u64, Instant)>,
    /// Guaranteed shares of the budget: every slot's, then every outlet's, then the app drains'
    /// together (see [`may_route`]).
    shares: Vec<usize>,
    /// The whole budget.
    budget: usize,
    next: Recipient<SequencedBatch>,
    ledger: Arc<Ledger>,
    chaos: Chaos,
}

/// How the sequencer is set up.
pub struct Routing {
    pub queues: Vec<Arc<EgressQueue>>,
    pub doppler_kinds: Kinds,
    pub outlets: Vec<Outlet>,
    pub budget: usize,
    /// With `syslog.binding_cache`.
    pub apps: Option<AppSetup>,
    /// Fair shedding's table, to tell the light sources of a destination over its share.
    pub fair: Option<Arc<parking_lot::Mutex<FairShed>>>,
}

/// Starts a drain from the binding cache: its spec, and the app drains' total its outbox counts
/// in (`None` for the cache's aggregate drains, which have a share of their own).
pub type Starter =
    Arc<dyn Fn(&Arc<DrainSpec>, Option<Arc<Routed>>) -> Option<AppHandle> + Send + Sync>;

/// How app drains are run.
pub struct AppSetup {
    pub starter: Starter,
    /// `syslog.idle_drain_timeout_ms`.
    pub idle: Duration,
    /// `syslog.max_app_drains`.
    pub max: usize,
    /// What a closed drain has to deliver what it holds (`shutdown.grace_period_ms`).
    pub grace: Duration,
}

/// A drain from the binding cache, started: what the pipeline routes to, and how to retire it.
#[derive(Clone)]
pub struct AppHandle {
    pub outlet: Outlet,
    pub retire: Recipient<Retire>,
}

/// The app drains' state in the sequencer.
struct Apps {
    router: AppRouter<AppHandle>,
    starter: Starter,
    /// What all app drains hold together (checked against their share).
    group: Arc<Routed>,
    grace: Duration,
}

/// A slot's lanes start recording sources once more than this fraction of its guaranteed
/// share waits in its queue (decision 32).
const BACKLOG_DIVISOR: usize = 16;

/// An app drain may hold at most this fraction of the app drains' guaranteed share (decision 29).
const APP_DRAIN_SHARE_DIVISOR: usize = 4;

impl SequencerActor {
    pub fn new(
        sequencer: Sequencer,
        numbering: bool,
        routing: Routing,
        next: Recipient<SequencedBatch>,
        ledger: Arc<Ledger>,
    ) -> Self {
        let mut actor = Self {
            lanes: routing.queues.iter().map(|_| Lanes::default()).collect(),
            sequencer,
            numbering,
            queues: routing.queues,
            doppler_kinds: routing.doppler_kinds,
            outlets: routing.outlets.clone(),
            config_outlets: routing.outlets,
            apps: routing.apps.map(|a| Apps {
                router: AppRouter::new(a.idle, a.max),
                starter: a.starter,
                group: Arc::default(),
                grace: a.grace,
            }),
            fair: routing.fair,
            progress: HashMap::new(),
            shares: Vec::new(),
            budget: 0,
            next,
            ledger,
            chaos: Chaos::default(),
        };
        actor.set_budget(routing.budget);
        actor
    }

    /// Shares the budget (decision 27): half of it is guaranteed, split equally between the
    /// destinations (the Doppler pool, each outlet), the pool's part equally between its slots;
    /// the other half is borrowed by whoever needs it while nobody else is owed it. A stream
    /// carries at most half its slot's share unacknowledged, so a slot always has room to send
    /// on while it waits for an answer.
    fn set_budget(&mut self, budget: usize) {
        self.budget = budget;
        let groups = self.outlets.len() + usize::from(self.apps.is_some());
        self.shares = shares(budget, self.queues.len(), groups);
        for (q, share) in self.queues.iter().zip(&self.shares) {
            q.set_window(share / 2);
        }
    }
}

/// Every destination's guaranteed share: `slots` Doppler slots (the pool counts as one
/// destination when it has slots), then `outlets` outlets.
pub fn shares(budget: usize, slots: usize, outlets: usize) -> Vec<usize> {
    let destinations = usize::from(slots > 0) + outlets;
    let unit = budget / (2 * destinations.max(1));
    let slot = unit / slots.max(1);
    std::iter::repeat_n(slot, slots)
        .chain(std::iter::repeat_n(unit, outlets))
        .collect()
}

impl Actor for SequencerActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        if self.apps.is_some() {
            ctx.run_interval(Duration::from_secs(1), |act, _| act.sweep_apps());
        }
    }
}

impl SequencerActor {
    /// The outlets from now on: the configured ones, then the binding cache's aggregate drains.
    fn refresh_outlets(&mut self) {
        let mut outlets = self.config_outlets.clone();
        if let Some(apps) = &self.apps {
            outlets.extend(apps.router.aggregate().map(|h| h.outlet.clone()));
        }
        // Forget the progress of destinations that are gone.
        let live: Vec<usize> = std::iter::once(&**self.ledger.doppler())
            .chain(outlets.iter().map(|o| &*o.account))
            .map(|a| std::ptr::from_ref(a) as usize)
            .collect();
        self.progress.retain(|k, _| live.contains(k));
        self.outlets = outlets;
        self.set_budget(self.budget);
    }

    /// Sends `handles` their retirement behind every batch routed to them so far.
    fn retire(&self, handles: Vec<AppHandle>, grace: Duration) {
        if handles.is_empty() {
            return;
        }
        // Control message: must arrive whatever the signer's mailbox holds.
        self.next.do_send(SequencedBatch {
            parts: Vec::new(),
            retire: handles.into_iter().map(|h| (h.retire, grace)).collect(),
        });
    }

    /// Closes idle app drains, opens those the cap held back, and updates the gauges.
    fn sweep_apps(&mut self) {
        let Some(apps) = &mut self.apps else { return };
        let (starter, group) = (&apps.starter, &apps.group);
        let retired = apps
            .router
            .sweep(Instant::now(), &mut |s| starter(s, Some(group.clone())));
        let grace = apps.grace;
        self.publish_app_gauges();
        self.retire(retired, grace);
    }

    fn publish_app_gauges(&self) {
        if let Some(apps) = &self.apps {
            let m = self.ledger.metrics();
            m.app_drains_open
                .store(apps.router.open() as i64, Ordering::Relaxed);
            m.app_drains_refused
                .store(apps.router.refused(), Ordering::Relaxed);
        }
    }
}

impl Handler<SetDrainTable> for SequencerActor {
    type Result = ();

    fn handle(&mut self, SetDrainTable(table): SetDrainTable, _: &mut Context<Self>) {
        let Some(apps) = &mut self.apps else { return };
        let (starter, group) = (&apps.starter, &apps.group);
        let retired = apps.router.set_table(table, &mut |s| {
            starter(s, (!s.app_id.is_empty()).then(|| group.clone()))
        });
        let grace = apps.grace;
        self.refresh_outlets();
        self.publish_app_gauges();
        self.retire(retired, grace);
    }
}

impl Handler<SetBudget> for SequencerActor {
    type Result = ();

    fn handle(&mut self, SetBudget(budget): SetBudget, _: &mut Context<Self>) {
        self.set_budget(budget);
    }
}

impl Handler<SetOutlets> for SequencerActor {
    type Result = ();

    fn handle(&mut self, SetOutlets { outlets, retire }: SetOutlets, _: &mut Context<Self>) {
        self.config_outlets = outlets;
        self.refresh_outlets();
        if !retire.is_empty() {
            // Control message, behind every batch routed to the removed drains: must arrive
            // whatever the signer's mailbox holds.
            self.next.do_send(SequencedBatch {
                parts: Vec::new(),
                retire,
            });
        }
    }
}

impl Handler<DumpState> for SequencerActor {
    type Result = ();

    fn handle(&mut self, _: DumpState, _: &mut Context<Self>) {
        let routed: Vec<usize> = self.queues.iter().map(|q| q.routed()).collect();
        let outlets: Vec<(String, usize)> = self
            .outlets
            .iter()
            .map(|o| (o.account.destination().name(), o.outbox.routed()))
            .collect();
        tracing::info!(
            target: "metron::state",
            actor = "sequencer",
            numbering = self.numbering,
            stream = %crate::envelope::signing::encode_hex(&self.sequencer.stream_id()),
            sources = self.sequencer.sources(),
            rotations = self.sequencer.rotations(),
            budget_bytes = self.budget,
            shares_bytes = ?self.shares,
            routed_bytes_by_slot = ?routed,
            // Per slot: whether its lanes are on (a backlog), and the sources they follow.
            lanes_by_slot = ?self
                .lanes
                .iter()
                .map(|l| (l.active(), l.recorded()))
                .collect::<Vec<_>>(),
            routed_bytes_by_outlet = ?outlets,
            binding_cache_answered = self.apps.as_ref().map(|a| a.router.answered()),
            apps_with_open_drains = self.apps.as_ref().map_or(0, |a| a.router.groups()),
            app_drains_open = self.apps.as_ref().map_or(0, |a| a.router.open()),
            app_drains_routed_bytes = self.apps.as_ref().map_or(0, |a| a.group.get()),
            "state"
        );
    }
}

/// The app drains a part's envelopes are offered to.
#[derive(Default)]
struct AppOffers {
    /// Every app drain offered something of the part.
    drains: Vec<Outlet>,
    /// Envelope `i`'s drains: `flat[ranges[i].0..ranges[i].1]`, indexes into `drains`.
    ranges: Vec<(usize, usize)>,
    flat: Vec<usize>,
}

impl AppOffers {
    fn of(&self, i: usize) -> &[usize] {
        self.ranges
            .get(i)
            .map_or(&[], |&(from, to)| &self.flat[from..to])
    }
}

/// What routing did with a batch so far, for a panic's accounting: envelopes (and their priced
/// bytes) whose pipeline obligation is settled (offered to destinations, filtered, or dropped
/// by every destination offered them).
#[derive(Default)]
struct Settled {
    n: usize,
    bytes: usize,
}

impl SequencerActor {
    /// Splits `batch` by slot, offers each part to every destination whose filter takes some of
    /// it (a destination over its share drops its pick, counted in its account), and numbers what
    /// some destination took. Parts go to `parts` as they are routed.
    fn route_and_number(&mut self, batch: &Batch, parts: &mut Vec<Part>, settled: &mut Settled) {
        let slots = self.queues.len();
        // Split by slot first, so a destination over its share refuses before anything is
        // numbered: the drop leaves no gap in the sequence and costs no signing.
        let mut per_slot: Vec<Batch> = (0..slots.max(1)).map(|_| batch.part()).collect();
        for item in batch.items() {
            per_slot[slot_of(batch.bytes_of(item.source), slots.max(1))].push(*item);
        }
        for (slot, part) in per_slot.into_iter().enumerate() {
            if part.is_empty() {
                continue;
            }
            let (n, bytes) = (part.len(), part.bytes());
            if let Some(p) = self.route(slot, part) {
                parts.push(p);
            }
            settled.n += n;
            settled.bytes += bytes;
        }
        // The chaos hook strikes where a panic costs the most: with parts already routed.
        self.chaos.strike(ME);
        if self.numbering {
            for p in parts {
                self.sequencer.stamp(&mut p.batch);
            }
        }
    }

    /// Offers one slot's part to the destinations; the part as taken, if any destination took
    /// some of it. Every ledger change for the part happens here, after the decisions.
    fn route(&mut self, slot: usize, part: Batch) -> Option<Part> {
        let layouts = part.layouts();
        let has_doppler = !self.queues.is_empty();
        // Who is offered each envelope: bit 0 the Doppler slot, bit 1 + j outlet j.
        let offered: Vec<u64> = part
            .items()
            .iter()
            .map(|item| {
                let kind = layouts.kind(item.layout);
                let mut bits = u64::from(has_doppler && self.doppler_kinds.takes(kind));
                for (j, o) in self.outlets.iter().enumerate() {
                    bits |= u64::from(o.kinds.takes(kind)) << (1 + j);
                }
                bits
            })
            .collect();
        // The app drains each envelope is offered to (indexes into `app.drains`).
        let app = self.app_offers(&part);
        // Each destination's offer, and whether its share has room for it.
        let destinations = 1 + self.outlets.len();
        let mut offer = vec![(0usize, 0usize); destinations];
        let mut app_offer = vec![(0usize, 0usize); app.drains.len()];
        for (i, (item, bits)) in part.items().iter().zip(&offered).enumerate() {
            for (d, o) in offer.iter_mut().enumerate() {
                if bits & (1 << d) != 0 {
                    o.0 += 1;
                    o.1 += item.cost as usize;
                }
            }
            for &j in app.of(i) {
                app_offer[j].0 += 1;
                app_offer[j].1 += item.cost as usize;
            }
        }
        let mut routed: Vec<usize> = self
            .queues
            .iter()
            .map(|q| q.routed())
            .chain(self.outlets.iter().map(|o| o.outbox.routed()))
            .chain(self.apps.as_ref().map(|a| a.group.get()))
            .collect();
        // Index of destination d in `routed` / `shares`.
        let slots = self.queues.len();
        let index = move |d: usize| if d == 0 { slot } else { slots + d - 1 };
        let mut accepted = vec![false; destinations];
        for d in 0..destinations {
            let (i, bytes) = (index(d), offer[d].1);
            // Beyond its share an outlet borrows only while it delivers: a dead collector or a
            // drain that is down keeps to its own share, and the free half of the budget stays
            // for the destinations that take envelopes.
            let stuck_outlet = || d > 0 && routed[i] > 0 && routed[i] + bytes > self.shares[i];
            accepted[d] = offer[d].0 > 0
                && may_route(&routed, &self.shares, i, bytes, self.budget)
                && (!stuck_outlet() || self.draining(d));
        }
        // A destination over its share still takes the envelopes of the sources within their
        // fair share, within one more share of its own: a flood sharing a slot with quiet
        // sources loses its own envelopes, not theirs (decision 30).
        // Only a destination that is taking envelopes (see `draining`): a stuck or blackholed
        // one would only hold the light ones longer.
        let refused: u64 = (0..destinations)
            .filter(|d| offer[*d].0 > 0 && !accepted[*d])
            .filter(|d| self.draining(*d))
            .fold(0, |m, d| m | 1 << d);
        let light = self.light_items(&part, refused, &offered);
        let mut light_offer = vec![(0usize, 0usize); destinations];
        if let Some(light) = &light {
            for ((item, bits), l) in part.items().iter().zip(&offered).zip(light) {
                for (d, o) in light_offer.iter_mut().enumerate() {
                    if *l && bits & refused & (1 << d) != 0 {
                        o.0 += 1;
                        o.1 += item.cost as usize;
                    }
                }
            }
        }
        let light_accepted: Vec<bool> = (0..destinations)
            .map(|d| {
                let i = index(d);
                light_offer[d].0 > 0
                    && may_route(
                        &routed,
                        &self.shares,
                        i,
                        light_offer[d].1,
                        self.budget + self.shares[i],
                    )
            })
            .collect();
        let light_mask: u64 = (0..destinations)
            .filter(|d| light_accepted[*d])
            .fold(0, |m, d| m | 1 << d);
        // The app drains together against their share, each against its cap.
        let group = self.queues.len() + self.outlets.len();
        let app_accepted: Vec<bool> = app
            .drains
            .iter()
            .zip(&app_offer)
            .map(|(o, &(n, bytes))| {
                let own = o.outbox.routed();
                let cap = self.shares[group] / APP_DRAIN_SHARE_DIVISOR;
                let ok = n > 0
                    && (own == 0 || own + bytes <= cap)
                    && may_route(&routed, &self.shares, group, bytes, self.budget);
                if ok {
                    routed[group] += bytes;
                }
                ok
            })
            .collect();

        // What goes on (computed first: the ledger changes below cannot panic, so a panic here
        // leaves the ledger untouched): the envelopes some destination took, and each destination's pick.
        let mask: u64 = (0..destinations)
            .filter(|d| accepted[*d])
            .fold(0, |m, d| m | 1 << d);
        let mut taken = part.part();
        let mut picks: Vec<Vec<u32>> = vec![Vec::new(); destinations];
        let mut app_picks: Vec<Vec<u32>> = vec![Vec::new(); app.drains.len()];
        let is_light = |i: usize| light.as_ref().is_some_and(|l| l[i]);
        for (i, (item, bits)) in part.items().iter().zip(&offered).enumerate() {
            let bits = bits & (mask | if is_light(i) { light_mask } else { 0 });
            let apps = app.of(i);
            if bits == 0 && !apps.iter().any(|&j| app_accepted[j]) {
                continue;
            }
            let at = taken.len() as u32;
            for (d, pick) in picks.iter_mut().enumerate() {
                if bits & (1 << d) != 0 {
                    pick.push(at);
                }
            }
            for &j in apps.iter().filter(|&&j| app_accepted[j]) {
                app_picks[j].push(at);
            }
            taken.push(*item);
        }
        // The ledger: one obligation per destination offered an envelope.
        let (mut copies, mut copy_bytes, mut unwanted, mut unwanted_bytes) = (0, 0, 0, 0);
        for (i, (item, bits)) in part.items().iter().zip(&offered).enumerate() {
            match bits.count_ones() as usize + app.of(i).len() {
                0 => {
                    unwanted += 1;
                    unwanted_bytes += item.cost as usize;
                }
                k => {
                    copies += k - 1;
                    copy_bytes += (k - 1) * item.cost as usize;
                }
            }
        }
        self.ledger.filtered(unwanted, unwanted_bytes);
        self.ledger.fan_out(copies, copy_bytes);
        for d in 0..destinations {
            let (n, bytes) = offer[d];
            if n == 0 {
                continue;
            }
            let account = if d == 0 {
                self.ledger.doppler()
            } else {
                &self.outlets[d - 1].account
            };
            self.ledger.offer(account, n, bytes);
            // What goes to the destination: all of it, or (over its share) its light part.
            let (taken_n, taken_bytes) = if accepted[d] {
                (n, bytes)
            } else if light_accepted[d] {
                light_offer[d]
            } else {
                (0, 0)
            };
            if taken_n < n {
                let reason = if d == 0 {
                    DropReason::SlotQueueFull
                } else {
                    DropReason::DrainQueueFull
                };
                self.ledger
                    .dropped_at(account, reason, n - taken_n, bytes - taken_bytes);
            }
            if taken_n == 0 {
                continue;
            }
            if d == 0 {
                self.queues[slot].route(taken_bytes);
            } else {
                self.outlets[d - 1].outbox.route(taken_bytes);
            }
        }
        for ((o, &(n, bytes)), ok) in app.drains.iter().zip(&app_offer).zip(&app_accepted) {
            if n == 0 {
                continue;
            }
            self.ledger.offer(&o.account, n, bytes);
            if *ok {
                o.outbox.route(bytes);
            } else {
                self.ledger
                    .dropped_at(&o.account, DropReason::DrainQueueFull, n, bytes);
            }
        }

        if taken.is_empty() {
            return None;
        }
        let whole = taken.len();
        let pick = |idx: Vec<u32>| {
            if idx.len() == whole {
                Pick::All
            } else {
                Pick::Some(idx)
            }
        };
        let lanes = if picks[0].is_empty() {
            None
        } else {
            self.lanes_of(slot, &taken, &picks[0])
        };
        let mut picks = picks.into_iter();
        let doppler = picks.next().filter(|p| !p.is_empty()).map(pick);
        let outlets = self
            .outlets
            .iter()
            .zip(picks)
            .chain(app.drains.iter().zip(app_picks))
            .filter(|(_, p)| !p.is_empty())
            .map(|(o, p)| (o.clone(), pick(p)))
            .collect();
        Some(Part {
            slot,
            batch: taken,
            doppler,
            lanes,
            outlets,
        })
    }

    /// How the slot's `pick` of `part` splits between its queue's lanes (decision 32): the
    /// envelopes of the sources within their fair share go to express while the slot has a
    /// backlog, or are parked until bulk has handed over the barrier ([`Lanes`]). `None`: all
    /// of it to bulk.
    fn lanes_of(&mut self, slot: usize, part: &Batch, pick: &[u32]) -> Option<LaneSplit> {
        let queue = &self.queues[slot];
        let lanes = &mut self.lanes[slot];
        let backlog = queue.queued_bytes();
        if backlog > self.shares[slot] / BACKLOG_DIVISOR && self.fair.is_some() {
            lanes.activate();
        } else if backlog == 0 {
            lanes.deactivate();
        }
        if !lanes.active() && lanes.recorded() > 0 {
            // Parked sources released since: forgotten, so the fast path comes back (a parked
            // source that never sends again would otherwise keep the lanes looking).
            lanes.prune(queue.taken());
        }
        if lanes.idle() {
            lanes.skip(pick.len());
            return None;
        }
        let now = Instant::now();
        let fair = self.fair.as_ref().filter(|_| lanes.active()).map(|f| {
            let mut f = f.lock();
            // A backlog: the edge should record who sends what, to tell the light sources.
            f.want_tracking(now);
            f
        });
        let fair = fair.filter(|f| f.fresh(now));
        let taken = queue.taken();
        let items = part.items();
        let (mut express, mut bulk, mut parked) = (Vec::new(), Vec::new(), Vec::new());
        let mut run = 0;
        while run < pick.len() {
            let source = part.bytes_of(items[pick[run] as usize].source);
            let end = run
                + pick[run..]
                    .iter()
                    .take_while(|&&i| part.bytes_of(items[i as usize].source) == source)
                    .count();
            let want = match &fair {
                Some(f) if f.is_quiet(source, now) => Lane::Express,
                _ => Lane::Bulk,
            };
            match lanes.place(source, want, end - run, taken) {
                Lane::Express => express.extend_from_slice(&pick[run..end]),
                Lane::Parked => parked.extend_from_slice(&pick[run..end]),
                Lane::Bulk => bulk.extend_from_slice(&pick[run..end]),
            }
            run = end;
        }
        let barrier = lanes.end_part();
        (!express.is_empty() || !parked.is_empty()).then_some(LaneSplit {
            express: Pick::Some(express),
            bulk: Pick::Some(bulk),
            parked: Pick::Some(parked),
            barrier,
        })
    }

    /// Whether `account`'s destination is taking envelopes: it delivered some within the last
    /// 3 s (a Doppler stream is acknowledged every `ack_interval_ms`, 1 s by default), or it
    /// has a connection open and has delivered nothing yet (its first acknowledgement is due).
    /// `d` as in [`Self::route`]: 0 the Doppler pool, `1 + j` outlet `j`.
    fn draining(&mut self, d: usize) -> bool {
        let now = Instant::now();
        let account: &Account = if d == 0 {
            self.ledger.doppler()
        } else {
            &self.outlets[d - 1].account
        };
        let egress = account.egress();
        let key = std::ptr::from_ref(account) as usize;
        let seen = self.progress.entry(key).or_insert((egress, now));
        if seen.0 != egress {
            *seen = (egress, now);
        }
        if egress == 0 {
            let open = if account.is_doppler() {
                self.ledger
                    .metrics()
                    .doppler_v2_streams
                    .load(Ordering::Relaxed)
            } else {
                account.connections()
            };
            return open > 0;
        }
        now.saturating_duration_since(seen.1) < Duration::from_secs(3)
    }

    /// For each envelope of `part`, whether its source is within its fair share, when some
    /// destination (bits `refused`) is over its share and the fair table says so; `None` when
    /// there is nothing to tell.
    fn light_items(&self, part: &Batch, refused: u64, offered: &[u64]) -> Option<Vec<bool>> {
        if refused == 0 {
            return None;
        }
        let fair = self.fair.as_ref()?;
        let mut fair = fair.lock();
        let now = Instant::now();
        fair.want_tracking(now);
        if !fair.fresh(now) {
            return None;
        }
        let mut last: Option<(&[u8], bool)> = None;
        Some(
            part.items()
                .iter()
                .zip(offered)
                .map(|(item, bits)| {
                    if bits & refused == 0 {
                        return false;
                    }
                    let source = part.bytes_of(item.source);
                    match last {
                        Some((s, l)) if s == source => l,
                        _ => {
                            let l = fair.is_light(source, now);
                            last = Some((source, l));
                            l
                        }
                    }
                })
                .collect(),
        )
    }

    /// Which app drains each envelope of `part` is offered to: its source's drains (opened on
    /// its first envelope) whose filter takes it, but not the drain a notice is about. A notice
    /// opens no drain and does not keep one open (it is not the app's activity).
    fn app_offers(&mut self, part: &Batch) -> AppOffers {
        let mut offers = AppOffers::default();
        let Some(apps) = &mut self.apps else {
            return offers;
        };
        let (starter, group) = (&apps.starter, &apps.group);
        let mut start = |s: &Arc<DrainSpec>| starter(s, Some(group.clone()));
        let now = Instant::now();
        let layouts = part.layouts();
        let skip = part.notice_about();
        let mut index: HashMap<u64, usize> = HashMap::new();
        // Consecutive envelopes of one source (the usual case) look their drains up once.
        let mut last: Option<(&[u8], Vec<usize>)> = None;
        for item in part.items() {
            let source = part.bytes_of(item.source);
            if last.as_ref().is_none_or(|(s, _)| *s != source) {
                let drains = if skip.is_some() {
                    apps.router.open_for(source)
                } else {
                    apps.router.drains_for(source, now, &mut start)
                };
                let local = drains
                    .iter()
                    .filter(|d| Some(d.handle.outlet.outbox.id()) != skip)
                    .map(|d| {
                        let id = d.handle.outlet.outbox.id();
                        *index.entry(id).or_insert_with(|| {
                            offers.drains.push(d.handle.outlet.clone());
                            offers.drains.len() - 1
                        })
                    })
                    .collect();
                last = Some((source, local));
            }
            let kind = layouts.kind(item.layout);
            let from = offers.flat.len();
            let local = &last.as_ref().expect("set above").1;
            offers.flat.extend(
                local
                    .iter()
                    .filter(|&&j| offers.drains[j].kinds.takes(kind)),
            );
            offers.ranges.push((from, offers.flat.len()));
        }
        offers
    }

    /// Drops what `parts` hold at every destination they were routed to.
    fn drop_parts(&self, parts: Vec<Part>, reason: DropReason) {
        for p in parts {
            if let Some(pick) = &p.doppler {
                let (n, bytes) = pick.cost(&p.batch);
                self.queues[p.slot].unroute(bytes);
                self.ledger
                    .dropped_at(self.ledger.doppler(), reason, n, bytes);
            }
            for (o, pick) in &p.outlets {
                let (n, bytes) = pick.cost(&p.batch);
                o.outbox.unroute(bytes);
                self.ledger.dropped_at(&o.account, reason, n, bytes);
            }
        }
    }
}

impl Handler<TaggedBatch> for SequencerActor {
    type Result = ();

    fn handle(&mut self, TaggedBatch(batch): TaggedBatch, _: &mut Context<Self>) {
        let rotations = self.sequencer.rotations();
        // What a panic would leave behind: the parts routed, and what was settled.
        let mut parts = Vec::new();
        let mut settled = Settled::default();
        if let Err(panic) = catch(|| self.route_and_number(&batch, &mut parts, &mut settled)) {
            panic.report(ME, self.ledger.metrics());
            self.drop_parts(parts, DropReason::ActorPanic);
            let (n, bytes) = (batch.len() - settled.n, batch.bytes() - settled.bytes);
            self.ledger.dropped(DropReason::ActorPanic, n, bytes);
            self.sequencer.reset();
            return;
        }
        let rotated = self.sequencer.rotations() - rotations;
        if rotated > 0 {
            self.ledger
                .metrics()
                .sequence_rotations
                .fetch_add(rotated, Ordering::Relaxed);
        }
        if parts.is_empty() {
            return;
        }
        if let Err(e) = self.next.try_send(SequencedBatch {
            parts,
            retire: Vec::new(),
        }) {
            let (reason, msg) = guard::refused(e, DropReason::SignerQueueFull);
            self.drop_parts(msg.parts, reason);
        }
    }
}

#[cfg(feature = "chaos-hooks")]
impl Handler<super::messages::ChaosPanic> for SequencerActor {
    type Result = ();

    fn handle(&mut self, msg: super::messages::ChaosPanic, _: &mut Context<Self>) {
        if msg.escape {
            super::guard::chaos_panic(ME);
        }
        self.chaos.arm();
    }
}

/// Whether `bytes` more may go to destination `i`, given what every destination holds
/// (`routed`) and is guaranteed (`shares`).
///
/// A destination may always fill up to its share (an idle one takes any batch, so one larger
/// than the share still passes). Beyond its share it may borrow, but only from what no other
/// destination could still claim: afterwards the free budget must still cover every other
/// destination's unused share. A burst on one can thus use the idle pool, while a stuck
/// Doppler or a blackholed drain can never take what the others are owed.
pub fn may_route(
    routed: &[usize],
    shares: &[usize],
    i: usize,
    bytes: usize,
    budget: usize,
) -> bool {
    let mine = routed[i];
    if mine == 0 || mine + bytes <= shares[i] {
        return true;
    }
    let total: usize = routed.iter().sum();
    let owed: usize = routed
        .iter()
        .zip(shares)
        .enumerate()
        .filter(|(j, _)| *j != i)
        .map(|(_, (r, share))| share.saturating_sub(*r))
        .sum();
    total + bytes + owed <= budget
}

#[cfg(test)]
mod tests {
    use super::{may_route, shares};
    use proptest::prelude::*;

    #[test]
    fn a_destination_borrows_only_what_nobody_else_is_owed() {
        // budget 300, three destinations, each guaranteed 50
        let s = [50, 50, 50];
        assert!(
            may_route(&[0, 0, 0], &s, 0, 500, 300),
            "an idle destination takes any batch"
        );
        assert!(may_route(&[30, 0, 0], &s, 0, 20, 300), "up to the share");
        assert!(
            may_route(&[50, 0, 0], &s, 0, 150, 300),
            "borrows the unowed budget"
        );
        assert!(
            !may_route(&[50, 0, 0], &s, 0, 151, 300),
            "but not what the others are owed"
        );
        assert!(!may_route(&[200, 0, 0], &s, 0, 1, 300));
        assert!(
            may_route(&[200, 0, 0], &s, 1, 50, 300),
            "destination 1 still gets its share"
        );
    }

    #[test]
    fn the_guarantee_is_split_between_destinations_then_slots() {
        assert_eq!(
            shares(1000, 5, 0),
            vec![100; 5],
            "the Doppler pool alone, as before"
        );
        assert_eq!(
            shares(1000, 2, 1),
            vec![125, 125, 250],
            "the pool is one destination"
        );
        assert_eq!(shares(1000, 0, 2), vec![250, 250], "no Doppler pool");
        for (slots, outlets) in [(1, 0), (5, 3), (0, 1), (3, 16)] {
            let total: usize = shares(1 << 20, slots, outlets).iter().sum();
            assert!(total <= 1 << 19, "half the budget at most is guaranteed");
        }
    }

    proptest! {
        /// Starting from any state where every destination's guarantee is available, routing
        /// whatever `may_route` allows keeps it available: none can eat another's share, the
        /// Doppler slots' small shares and the drains' larger ones alike. (Batches here fit a
        /// share; one larger than a share is let through an idle destination on purpose.)
        #[test]
        fn every_share_stays_available(slots in 1usize..6, outlets in 0usize..4,
                                       requests in prop::collection::vec((0usize..10, 1usize..=40), 1..300)) {
            let budget = 4000;
            let s = shares(budget, slots, outlets);
            let mut routed = vec![0usize; s.len()];
            for (i, bytes) in requests {
                let i = i % s.len();
                if bytes > s[i] {
                    continue;
                }
                if may_route(&routed, &s, i, bytes, budget) {
                    routed[i] += bytes;
                    let total: usize = routed.iter().sum();
                    let owed: usize = routed.iter().zip(&s).map(|(r, sh)| sh.saturating_sub(*r)).sum();
                    prop_assert!(total + owed <= budget, "{routed:?}");
                }
            }
        }
    }
}
