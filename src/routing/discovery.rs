//! Finds the Dopplers by DNS, as the Go agent does: one name for every Doppler
//! (`dopplers.router_addr`) and an optional one for those in the agent's own AZ
//! (`dopplers.router_addr_with_az`).
//!
//! The resolver is injected ([`Resolver`]) so the policy (which address counts as local, what to do
//! when one name fails) is tested without DNS, and an embedder can plug in its own lookup.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

use super::balancer::Endpoint;
use crate::telemetry::ratelimit::RateLimit;

/// What went wrong finding the Dopplers.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DiscoveryError {
    /// The address is not `host:port` (or `[v6]:port`).
    #[error("{addr:?} is not a host:port address: {problem}")]
    BadAddress { addr: String, problem: &'static str },
    /// A host label too long for punycode's arithmetic (thousands of characters; DNS allows 63
    /// bytes, so such a name could never resolve anyway).
    #[error("cannot punycode-encode the host label {label:?}: it is too long")]
    Punycode { label: String },
    /// A configured address is unusable. `key` names the config key so the operator knows which
    /// line to fix; `error` says what is wrong with the value.
    #[error("{key}: {error}")]
    Config {
        key: &'static str,
        error: Box<DiscoveryError>,
    },
    /// No name resolved to any address. The caller keeps the endpoints it had: DNS trouble must
    /// never retire working connections.
    #[error("no doppler address from DNS: {detail}")]
    NoDopplers {
        /// One `name: why` per name looked up, `; `-separated.
        detail: String,
    },
}

/// Config key of the name that lists every Doppler.
const ROUTER_ADDR_KEY: &str = "dopplers.router_addr";
/// Config key of the name that lists the Dopplers in the agent's AZ.
const ROUTER_ADDR_WITH_AZ_KEY: &str = "dopplers.router_addr_with_az";

/// Splits `host:port` or `[v6]:port` into the host (without brackets) and the port.
///
/// # Errors
/// [`DiscoveryError::BadAddress`] saying what is missing or malformed. Port 0 is refused: nothing
/// can be dialled there.
pub fn split_host_port(addr: &str) -> Result<(String, u16), DiscoveryError> {
    let (host, port) = split_raw(addr)?;
    let bad = |problem| DiscoveryError::BadAddress {
        addr: addr.to_owned(),
        problem,
    };
    let port = match port.parse::<u16>() {
        Ok(0) | Err(_) => return Err(bad("the port is not a number from 1 to 65535")),
        Ok(p) => p,
    };
    Ok((host.to_owned(), port))
}

/// The host and port text of `addr`, unchecked beyond their presence.
fn split_raw(addr: &str) -> Result<(&str, &str), DiscoveryError> {
    let bad = |problem| DiscoveryError::BadAddress {
        addr: addr.to_owned(),
        problem,
    };
    if addr.is_empty() {
        return Err(bad("it is empty"));
    }
    let (host, port) = if let Some(rest) = addr.strip_prefix('[') {
        let (host, after) = rest
            .split_once(']')
            .ok_or_else(|| bad("missing ']' after the IPv6 address"))?;
        let port = after
            .strip_prefix(':')
            .ok_or_else(|| bad("expected ':port' after ']'"))?;
        (host, port)
    } else {
        let (host, port) = addr
            .rsplit_once(':')
            .ok_or_else(|| bad("missing ':port'"))?;
        if host.contains(':') {
            return Err(bad("too many colons (write an IPv6 address as [v6]:port)"));
        }
        (host, port)
    };
    if host.is_empty() {
        return Err(bad("missing host"));
    }
    if port.is_empty() {
        return Err(bad("missing port"));
    }
    Ok((host, port))
}

/// What the Go agent does to `router_addr_with_az` before looking it up: `idna.ToASCII` with the
/// plain Punycode profile (each non-ASCII label becomes `xn--` + RFC 3492 punycode; ASCII labels,
/// case included, are left alone), then every `@` becomes `-`. Matching it byte for byte matters:
/// operators name the AZ record after what the Go agent looked up.
///
/// Only the host is encoded; the port is kept (normalised to its number). Unlike Go, an ASCII
/// label that already starts with `xn--` is passed through without checking that it decodes.
///
/// # Errors
/// [`DiscoveryError::BadAddress`] if `addr` is not `host:port`; [`DiscoveryError::Punycode`] for
/// an absurdly long label.
pub fn encode_az_addr(addr: &str) -> Result<String, DiscoveryError> {
    let (host, port) = split_host_port(addr)?;
    let mut labels = Vec::new();
    for label in host.split('.') {
        if label.is_ascii() {
            labels.push(label.to_owned());
        } else {
            let encoded = punycode_encode(label).ok_or_else(|| DiscoveryError::Punycode {
                label: label.to_owned(),
            })?;
            labels.push(format!("xn--{encoded}"));
        }
    }
    Ok(join_host_port(&labels.join(".").replace('@', "-"), port))
}

/// The inverse of [`split_host_port`]: brackets an IPv6 host.
fn join_host_port(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// RFC 3492 section 6.3 encoding of one label (without the `xn--` prefix). `None` on arithmetic
/// overflow, which only labels thousands of characters long can reach.
fn punycode_encode(input: &str) -> Option<String> {
    const BASE: u32 = 36;
    const TMIN: u32 = 1;
    const TMAX: u32 = 26;
    const INITIAL_BIAS: u32 = 72;
    const INITIAL_N: u32 = 128;

    let chars: Vec<u32> = input.chars().map(u32::from).collect();
    let mut output: String = input.chars().filter(char::is_ascii).collect();
    let basic = u32::try_from(output.len()).ok()?;
    if basic > 0 {
        output.push('-');
    }
    let total = u32::try_from(chars.len()).ok()?;
    let (mut n, mut delta, mut bias, mut handled) = (INITIAL_N, 0u32, INITIAL_BIAS, basic);
    while handled < total {
        // The smallest code point not yet handled; one exists because handled < total.
        let m = chars.iter().copied().filter(|&c| c >= n).min()?;
        delta = delta.checked_add((m - n).checked_mul(handled + 1)?)?;
        n = m;
        for &c in &chars {
            if c < n {
                delta = delta.checked_add(1)?;
            }
            if c == n {
                let mut q = delta;
                let mut k = BASE;
                loop {
                    let t = if k <= bias {
                        TMIN
                    } else if k >= bias + TMAX {
                        TMAX
                    } else {
                        k - bias
                    };
                    if q < t {
                        break;
                    }
                    output.push(punycode_digit(t + (q - t) % (BASE - t)));
                    q = (q - t) / (BASE - t);
                    k += BASE;
                }
                output.push(punycode_digit(q));
                bias = punycode_adapt(delta, handled + 1, handled == basic);
                delta = 0;
                handled += 1;
            }
        }
        delta = delta.checked_add(1)?;
        n = n.checked_add(1)?;
    }
    Some(output)
}

/// RFC 3492 section 6.1.
fn punycode_adapt(delta: u32, num_points: u32, first_time: bool) -> u32 {
    const BASE: u32 = 36;
    const TMIN: u32 = 1;
    const TMAX: u32 = 26;
    const SKEW: u32 = 38;
    const DAMP: u32 = 700;
    let mut delta = if first_time { delta / DAMP } else { delta / 2 };
    delta += delta / num_points;
    let mut k = 0;
    while delta > ((BASE - TMIN) * TMAX) / 2 {
        delta /= BASE - TMIN;
        k += BASE;
    }
    k + ((BASE - TMIN + 1) * delta) / (delta + SKEW)
}

/// 0..=25 → `a`..=`z`, 26..=35 → `0`..=`9` (lower case, as Go and the RFC samples write them).
fn punycode_digit(d: u32) -> char {
    debug_assert!(d < 36, "punycode digit out of range");
    // Both arms stay in ASCII for d < 36, so the casts cannot wrap.
    if d < 26 {
        char::from(b'a' + d as u8)
    } else {
        char::from(b'0' + (d - 26) as u8)
    }
}

/// A boxed lookup, so [`Resolver`] stays object-safe.
pub type ResolveFuture = Pin<Box<dyn Future<Output = io::Result<Vec<SocketAddr>>> + Send>>;

/// Turns a name into addresses. Injected so tests (and embedders) control what DNS says.
pub trait Resolver: Send + Sync + 'static {
    /// All addresses for `host` (A and AAAA), each with `port`.
    fn resolve(&self, host: &str, port: u16) -> ResolveFuture;
}

/// The system resolver (getaddrinfo, through tokio's blocking pool, so a slow DNS server never
/// stalls an arbiter): A and AAAA records, deduplicated (getaddrinfo may repeat an address) and
/// sorted so two answers compare equal when DNS did not change.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemResolver;

impl Resolver for SystemResolver {
    fn resolve(&self, host: &str, port: u16) -> ResolveFuture {
        let host = host.to_owned();
        Box::pin(async move {
            let mut addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), port))
                .await?
                .collect();
            addrs.sort_unstable();
            addrs.dedup();
            Ok(addrs)
        })
    }
}

/// For tests and embedders: a name → addresses table you change at run time.
///
/// Names match exactly (no case folding). The addresses of a name are returned as given,
/// whatever port is asked for, so a test can give each fake Doppler its own loopback port.
#[derive(Debug, Default)]
pub struct StaticResolver {
    table: Mutex<StaticTable>,
}

#[derive(Debug, Default)]
struct StaticTable {
    names: HashMap<String, Vec<SocketAddr>>,
    /// Names whose lookup fails whatever `names` says, to script a DNS outage.
    failing: HashSet<String>,
    /// Calls to `resolve`, so a test can wait for the next re-resolution instead of sleeping.
    lookups: u64,
}

impl StaticResolver {
    pub fn new() -> Arc<Self> {
        Arc::default()
    }

    /// From now on `host` resolves to `addrs` (an empty list is an empty answer, not an error).
    pub fn set(&self, host: &str, addrs: Vec<SocketAddr>) {
        self.table.lock().names.insert(host.to_owned(), addrs);
    }

    /// From now on `host` is unknown (lookups fail with [`io::ErrorKind::NotFound`]).
    pub fn remove(&self, host: &str) {
        self.table.lock().names.remove(host);
    }

    /// While `failing`, lookups of `host` fail with an I/O error, as during a DNS outage.
    pub fn set_failing(&self, host: &str, failing: bool) {
        let mut table = self.table.lock();
        if failing {
            table.failing.insert(host.to_owned());
        } else {
            table.failing.remove(host);
        }
    }

    /// How many lookups have been made so far (failed ones included).
    pub fn lookups(&self) -> u64 {
        self.table.lock().lookups
    }
}

impl Resolver for StaticResolver {
    fn resolve(&self, host: &str, _port: u16) -> ResolveFuture {
        let answer = {
            let mut table = self.table.lock();
            table.lookups += 1;
            if table.failing.contains(host) {
                Err(io::Error::other(format!(
                    "static resolver: lookup of {host} set to fail"
                )))
            } else {
                table.names.get(host).cloned().ok_or_else(|| {
                    io::Error::new(
                        io::ErrorKind::NotFound,
                        format!("static resolver: no entry for {host}"),
                    )
                })
            }
        };
        Box::pin(std::future::ready(answer))
    }
}

/// The Doppler names and how to resolve them into balancer endpoints.
pub struct Discovery {
    /// The name listing every Doppler, in every AZ.
    router_addr: (String, u16),
    /// The name listing the Dopplers of the agent's AZ, already encoded as the Go agent does.
    /// `None`: no AZ preference from DNS, every Doppler counts as non-local.
    with_az: Option<(String, u16)>,
    /// The `az` given to endpoints found under `with_az`, so the balancer prefers them.
    local_az: String,
    resolver: Arc<dyn Resolver>,
    /// The last non-empty answer for each name (router_addr, with-AZ name): a name that fails or
    /// comes back empty keeps it, so a DNS blip on one name never reclassifies or retires
    /// Dopplers (a Doppler that is really gone fails its connection and is left by backoff).
    last: Mutex<[Option<BTreeSet<SocketAddr>>; 2]>,
    /// Warnings about one name failing while the other answers.
    partial_failures: RateLimit,
}

impl std::fmt::Debug for Discovery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Discovery")
            .field("router_addr", &self.router_addr)
            .field("with_az", &self.with_az)
            .field("local_az", &self.local_az)
            .finish_non_exhaustive()
    }
}

impl Discovery {
    /// `router_addr_with_az` is encoded with [`encode_az_addr`] first, as the Go agent does.
    ///
    /// `local_az` should be the agent's non-empty AZ: endpoints outside it get the empty `az`, so
    /// an empty `local_az` would make every endpoint local (no preference at all).
    ///
    /// # Errors
    /// [`DiscoveryError::Config`] naming the key whose value is not a usable `host:port`.
    pub fn new(
        router_addr: &str,
        router_addr_with_az: Option<&str>,
        local_az: &str,
        resolver: Arc<dyn Resolver>,
    ) -> Result<Self, DiscoveryError> {
        let config = |key| {
            move |e| DiscoveryError::Config {
                key,
                error: Box::new(e),
            }
        };
        let router_addr = split_host_port(router_addr).map_err(config(ROUTER_ADDR_KEY))?;
        let with_az = router_addr_with_az
            .map(|a| encode_az_addr(a).and_then(|a| split_host_port(&a)))
            .transpose()
            .map_err(config(ROUTER_ADDR_WITH_AZ_KEY))?;
        Ok(Self {
            router_addr,
            with_az,
            local_az: local_az.to_owned(),
            resolver,
            last: Mutex::default(),
            partial_failures: RateLimit::new(Duration::from_secs(60)),
        })
    }

    /// Looks both names up (concurrently) and returns the endpoints: those under the with-AZ name
    /// with `az` = the local AZ, the others with the empty `az`, which means "not the local AZ"
    /// (DNS does not say which other AZ a Doppler is in, and the balancer needs only local or not).
    ///
    /// A name that fails or has no address keeps its last answer (a rate-limited warning says
    /// so); one that never answered is left out, and the other name is used alone. The result is
    /// sorted (local first, then by address) and deduplicated, so comparing two results tells
    /// whether anything changed.
    ///
    /// # Errors
    /// [`DiscoveryError::NoDopplers`] when no name gave an address. The caller keeps its previous
    /// endpoints: DNS trouble must never retire working connections.
    pub async fn resolve(&self) -> Result<Vec<Endpoint>, DiscoveryError> {
        let all = self.lookup(&self.router_addr);
        let local = async {
            match &self.with_az {
                Some(name) => Some(self.lookup(name).await),
                None => None,
            }
        };
        let (all, local) = tokio::join!(all, local);

        let mut problems = Vec::new();
        let mut last = self.last.lock();
        let mut usable =
            |which: usize, name: &(String, u16), answer: io::Result<Vec<SocketAddr>>| {
                let name = join_host_port(&name.0, name.1);
                let problem = match answer {
                    Ok(addrs) if !addrs.is_empty() => {
                        let set: BTreeSet<SocketAddr> = addrs.into_iter().collect();
                        last[which] = Some(set.clone());
                        return set;
                    }
                    Ok(_) => format!("{name}: no addresses"),
                    Err(e) => format!("{name}: {e}"),
                };
                let kept = last[which].clone();
                problems.push(if kept.is_some() {
                    format!("{problem} (keeping its last answer)")
                } else {
                    problem
                });
                kept.unwrap_or_default()
            };
        let all: BTreeSet<SocketAddr> = usable(0, &self.router_addr, all);
        let local: BTreeSet<SocketAddr> = match (&self.with_az, local) {
            (Some(name), Some(answer)) => usable(1, name, answer),
            _ => BTreeSet::new(),
        };
        drop(last);
        if all.is_empty() && local.is_empty() {
            return Err(DiscoveryError::NoDopplers {
                detail: problems.join("; "),
            });
        }
        if !problems.is_empty() {
            if let Some(times) = self.partial_failures.check() {
                tracing::warn!(problems = %problems.join("; "), times, "doppler DNS lookup failed");
            }
        }
        // BTreeSet order is numeric address order; local ones first.
        let endpoint = |addr: &SocketAddr, az: &str| Endpoint {
            addr: addr.to_string(),
            az: az.to_owned(),
        };
        let mut endpoints: Vec<Endpoint> =
            local.iter().map(|a| endpoint(a, &self.local_az)).collect();
        endpoints.extend(all.difference(&local).map(|a| endpoint(a, "")));
        Ok(endpoints)
    }

    fn lookup(&self, name: &(String, u16)) -> ResolveFuture {
        self.resolver.resolve(&name.0, name.1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn ep(addr: &str, az: &str) -> Endpoint {
        Endpoint {
            addr: addr.into(),
            az: az.into(),
        }
    }

    #[test]
    fn punycode_matches_rfc_3492_samples() {
        // RFC 3492 section 7.1, given as code points so the test does not depend on how an
        // editor normalises the text.
        let samples: [(&str, &[u32], &str); 5] = [
            (
                "(A) Arabic (Egyptian)",
                &[
                    0x0644, 0x064A, 0x0647, 0x0645, 0x0627, 0x0628, 0x062A, 0x0643, 0x0644, 0x0645,
                    0x0648, 0x0634, 0x0639, 0x0631, 0x0628, 0x064A, 0x061F,
                ],
                "egbpdaj6bu4bxfgehfvwxn",
            ),
            (
                "(B) Chinese (simplified)",
                &[
                    0x4ED6, 0x4EEC, 0x4E3A, 0x4EC0, 0x4E48, 0x4E0D, 0x8BF4, 0x4E2D, 0x6587,
                ],
                "ihqwcrb4cv8a8dqg056pqjye",
            ),
            (
                "(L) 3<nen>B<gumi><kinpachi><sensei>",
                &[
                    0x0033, 0x5E74, 0x0042, 0x7D44, 0x91D1, 0x516B, 0x5148, 0x751F,
                ],
                "3B-ww4c5e180e575a65lsy2b",
            ),
            (
                "(J) Spanish",
                &[
                    0x50, 0x6F, 0x72, 0x71, 0x75, 0xE9, 0x6E, 0x6F, 0x70, 0x75, 0x65, 0x64, 0x65,
                    0x6E, 0x73, 0x69, 0x6D, 0x70, 0x6C, 0x65, 0x6D, 0x65, 0x6E, 0x74, 0x65, 0x68,
                    0x61, 0x62, 0x6C, 0x61, 0x72, 0x65, 0x6E, 0x45, 0x73, 0x70, 0x61, 0xF1, 0x6F,
                    0x6C,
                ],
                "PorqunopuedensimplementehablarenEspaol-fmd56a",
            ),
            (
                "(S) -> $1.00 <-",
                &[
                    0x2D, 0x3E, 0x20, 0x24, 0x31, 0x2E, 0x30, 0x30, 0x20, 0x3C, 0x2D,
                ],
                "-> $1.00 <--",
            ),
        ];
        for (name, points, want) in samples {
            let input: String = points.iter().map(|&p| char::from_u32(p).unwrap()).collect();
            assert_eq!(punycode_encode(&input).as_deref(), Some(want), "{name}");
        }
        assert_eq!(punycode_encode("bücher").as_deref(), Some("bcher-kva"));
        assert_eq!(punycode_encode("").as_deref(), Some(""));
    }

    #[test]
    fn az_addr_is_encoded_as_the_go_agent_does() {
        assert_eq!(
            encode_az_addr("z1@zone.doppler:8082").unwrap(),
            "z1-zone.doppler:8082"
        );
        assert_eq!(
            encode_az_addr("zürich.doppler.service.cf.internal:8082").unwrap(),
            "xn--zrich-kva.doppler.service.cf.internal:8082"
        );
        // ASCII labels are left alone: no case mapping
        assert_eq!(
            encode_az_addr("Z1.Doppler.service.cf.internal:8082").unwrap(),
            "Z1.Doppler.service.cf.internal:8082"
        );
        // `@` survives punycode as a basic code point and is replaced afterwards
        assert_eq!(
            encode_az_addr("zürich@a.doppler:8082").unwrap(),
            "xn--zrich-a-n2a.doppler:8082"
        );
        assert_eq!(encode_az_addr("[::1]:8082").unwrap(), "[::1]:8082");
        assert!(matches!(
            encode_az_addr("zürich.doppler"),
            Err(DiscoveryError::BadAddress { .. })
        ));
    }

    #[test]
    fn splits_host_and_port() {
        assert_eq!(
            split_host_port("doppler.service.cf.internal:8082").unwrap(),
            ("doppler.service.cf.internal".to_owned(), 8082)
        );
        assert_eq!(
            split_host_port("[fd00::1]:8082").unwrap(),
            ("fd00::1".to_owned(), 8082)
        );
        let problem = |addr| match split_host_port(addr) {
            Err(DiscoveryError::BadAddress { problem, .. }) => problem,
            other => panic!("{addr:?}: {other:?}"),
        };
        assert_eq!(problem(""), "it is empty");
        assert_eq!(problem("doppler"), "missing ':port'");
        assert_eq!(problem(":8082"), "missing host");
        assert_eq!(problem("doppler:"), "missing port");
        assert_eq!(problem("[::1"), "missing ']' after the IPv6 address");
        assert_eq!(problem("[::1]8082"), "expected ':port' after ']'");
        assert_eq!(
            problem("fd00::1:8082"),
            "too many colons (write an IPv6 address as [v6]:port)"
        );
        assert_eq!(
            problem("doppler:0"),
            "the port is not a number from 1 to 65535"
        );
        assert_eq!(
            problem("doppler:http"),
            "the port is not a number from 1 to 65535"
        );
        assert_eq!(
            split_host_port("doppler:99999").unwrap_err().to_string(),
            "\"doppler:99999\" is not a host:port address: the port is not a number from 1 to 65535"
        );
    }

    #[test]
    fn config_errors_name_the_key() {
        let r = StaticResolver::new();
        let e = Discovery::new("doppler", None, "z1", r.clone()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "dopplers.router_addr: \"doppler\" is not a host:port address: missing ':port'"
        );
        let e = Discovery::new("doppler:8082", Some("z1.doppler"), "z1", r).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("dopplers.router_addr_with_az: \"z1.doppler\""),
            "{e}"
        );
    }

    const ALL: &str = "doppler.service.cf.internal";
    const LOCAL: &str = "z1.doppler.service.cf.internal";

    fn discovery(r: &Arc<StaticResolver>) -> Discovery {
        Discovery::new(
            &format!("{ALL}:8082"),
            Some(&format!("{LOCAL}:8082")),
            "z1",
            r.clone(),
        )
        .unwrap()
    }

    #[tokio::test]
    async fn local_name_marks_local_endpoints_and_the_rest_are_non_local() {
        let r = StaticResolver::new();
        r.set(
            ALL,
            vec![
                sa("10.0.0.10:8082"),
                sa("10.0.0.9:8082"),
                sa("10.0.1.1:8082"),
                sa("10.0.0.9:8082"),
            ],
        );
        r.set(LOCAL, vec![sa("10.0.0.10:8082"), sa("10.0.0.9:8082")]);
        let d = discovery(&r);
        assert_eq!(
            d.resolve().await.unwrap(),
            vec![
                ep("10.0.0.9:8082", "z1"),
                ep("10.0.0.10:8082", "z1"),
                ep("10.0.1.1:8082", ""),
            ]
        );
        assert_eq!(r.lookups(), 2);
    }

    #[tokio::test]
    async fn a_failing_or_empty_local_name_falls_back_to_all_non_local() {
        let r = StaticResolver::new();
        r.set(ALL, vec![sa("10.0.1.1:8082"), sa("10.0.0.9:8082")]);
        let d = discovery(&r);
        let want = vec![ep("10.0.0.9:8082", ""), ep("10.0.1.1:8082", "")];
        // unknown name
        assert_eq!(d.resolve().await.unwrap(), want);
        // empty answer
        r.set(LOCAL, vec![]);
        assert_eq!(d.resolve().await.unwrap(), want);
        // lookup error
        r.set(LOCAL, vec![sa("10.0.0.9:8082")]);
        r.set_failing(LOCAL, true);
        assert_eq!(d.resolve().await.unwrap(), want);
        r.set_failing(LOCAL, false);
        assert_eq!(
            d.resolve().await.unwrap(),
            vec![ep("10.0.0.9:8082", "z1"), ep("10.0.1.1:8082", "")]
        );
        assert_eq!(r.lookups(), 8);
    }

    #[tokio::test]
    async fn a_failing_router_name_falls_back_to_the_local_name() {
        let r = StaticResolver::new();
        r.set(LOCAL, vec![sa("10.0.0.9:8082")]);
        r.set_failing(ALL, true);
        let d = discovery(&r);
        assert_eq!(d.resolve().await.unwrap(), vec![ep("10.0.0.9:8082", "z1")]);
    }

    #[tokio::test]
    async fn nothing_resolving_is_an_error_naming_both_names() {
        let r = StaticResolver::new();
        r.set(ALL, vec![]);
        r.set_failing(LOCAL, true);
        let d = discovery(&r);
        let e = d.resolve().await.unwrap_err();
        let DiscoveryError::NoDopplers { detail } = &e else {
            panic!("{e:?}")
        };
        assert!(detail.contains(&format!("{ALL}:8082: no addresses")), "{e}");
        assert!(
            detail.contains(&format!("{LOCAL}:8082: static resolver")),
            "{e}"
        );
        assert!(e.to_string().starts_with("no doppler address from DNS: "));

        // without a local name, the router name alone decides
        let d = Discovery::new(&format!("{ALL}:8082"), None, "z1", r.clone()).unwrap();
        assert!(d.resolve().await.is_err());
        r.set(ALL, vec![sa("[fd00::2]:8082"), sa("10.0.0.9:8082")]);
        assert_eq!(
            d.resolve().await.unwrap(),
            vec![ep("10.0.0.9:8082", ""), ep("[fd00::2]:8082", "")]
        );
    }

    #[tokio::test]
    async fn the_local_name_is_looked_up_encoded() {
        let r = StaticResolver::new();
        r.set(ALL, vec![sa("10.0.1.1:8082")]);
        r.set("xn--zrich-kva.doppler", vec![sa("10.0.0.9:8082")]);
        let d = Discovery::new(
            &format!("{ALL}:8082"),
            Some("zürich.doppler:8082"),
            "zürich",
            r.clone(),
        )
        .unwrap();
        assert_eq!(
            d.resolve().await.unwrap(),
            vec![ep("10.0.0.9:8082", "zürich"), ep("10.0.1.1:8082", "")]
        );
    }

    #[tokio::test]
    async fn system_resolver_returns_ip_literals_without_dns() {
        let got = SystemResolver.resolve("127.0.0.1", 8082).await.unwrap();
        assert_eq!(got, vec![sa("127.0.0.1:8082")]);
        let got = SystemResolver.resolve("::1", 8082).await.unwrap();
        assert_eq!(got, vec![sa("[::1]:8082")]);
    }
}
