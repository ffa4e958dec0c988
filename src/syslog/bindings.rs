//! The binding cache's answers, read as upstream's syslog-agent reads them (reference
//! `destinations.md` §1.3): `GET /v2/bindings` lists every drain URL with the credentials and
//! the applications bound to it; `GET /v2/aggregate` the aggregate drains (no application, the
//! first credentials entry used). Per application, drains are sorted by URL and only the first
//! `per_app_limit` kept; a URL that cannot serve as a drain is left out and reported (without
//! its credentials). Plain logic: the poller that fetches these is elsewhere.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::Deserialize;

use super::drain::{redact_unparsed, DrainUrl};

/// One binding as the cache lists it.
#[derive(Debug, Deserialize)]
struct RawBinding {
    url: String,
    #[serde(default)]
    credentials: Vec<RawCredentials>,
}

#[derive(Debug, Deserialize)]
struct RawCredentials {
    #[serde(default)]
    cert: String,
    #[serde(default)]
    key: String,
    #[serde(default)]
    ca: String,
    #[serde(default)]
    apps: Vec<RawApp>,
}

#[derive(Debug, Deserialize)]
struct RawApp {
    #[serde(default)]
    hostname: String,
    #[serde(default)]
    app_id: String,
}

/// A drain's TLS material from the cache, PEM (empty: none).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Credentials {
    pub cert: String,
    pub key: String,
    pub ca: String,
}

/// Never prints the key.
impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("cert", &!self.cert.is_empty())
            .field("key", &!self.key.is_empty())
            .field("ca", &!self.ca.is_empty())
            .finish()
    }
}

/// One application's drain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppDrain {
    pub app_id: String,
    /// HOSTNAME of its messages (the formatter prefers `org.space.app` from the tags).
    pub hostname: String,
    pub url: DrainUrl,
    pub credentials: Credentials,
}

/// A drain URL the answer listed that cannot serve: its anonymized URL and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub url: String,
    pub problem: String,
}

/// Every application's drains, by application id.
pub type AppBindings = BTreeMap<String, Vec<AppDrain>>;

/// The aggregate drains, each with its credentials.
pub type AggregateBindings = Vec<(DrainUrl, Credentials)>;

/// Why an answer could not be read at all (the last good one stays in force).
#[derive(Debug, thiserror::Error)]
#[error("the binding cache's answer is not the expected JSON: {0}")]
pub struct BadAnswer(#[from] serde_json::Error);

/// `GET /v2/bindings`: every application's drains, at most `per_app_limit` each (the first by
/// URL), keyed by application id.
///
/// # Errors
/// [`BadAnswer`] when the body is not the cache's JSON.
pub fn read_bindings(
    body: &[u8],
    default_metadata: bool,
    per_app_limit: usize,
) -> Result<(AppBindings, Vec<Refused>), BadAnswer> {
    let raw: Vec<RawBinding> = serde_json::from_slice(body)?;
    let mut by_app: BTreeMap<String, Vec<(String, AppDrain)>> = BTreeMap::new();
    let mut refused = Vec::new();
    for b in raw {
        let url = match DrainUrl::parse(&b.url, default_metadata) {
            Ok(u) => u,
            Err(e) => {
                refused.push(Refused {
                    url: redact_unparsed(&b.url),
                    problem: e.to_string(),
                });
                continue;
            }
        };
        for c in &b.credentials {
            let credentials = Credentials {
                cert: c.cert.clone(),
                key: c.key.clone(),
                ca: c.ca.clone(),
            };
            for app in c.apps.iter().filter(|a| !a.app_id.is_empty()) {
                by_app.entry(app.app_id.clone()).or_default().push((
                    b.url.clone(),
                    AppDrain {
                        app_id: app.app_id.clone(),
                        hostname: app.hostname.clone(),
                        url: url.clone(),
                        credentials: credentials.clone(),
                    },
                ));
            }
        }
    }
    let by_app = by_app
        .into_iter()
        .map(|(app, mut drains)| {
            // Upstream sorts the URLs as strings and keeps the first ones.
            drains.sort_by(|a, b| a.0.cmp(&b.0));
            drains.dedup_by(|a, b| a.0 == b.0);
            drains.truncate(per_app_limit);
            (app, drains.into_iter().map(|(_, d)| d).collect())
        })
        .collect();
    Ok((by_app, refused))
}

/// `GET /v2/aggregate`: the aggregate drains, each with its first credentials entry.
///
/// # Errors
/// [`BadAnswer`] when the body is not the cache's JSON.
pub fn read_aggregate(
    body: &[u8],
    default_metadata: bool,
) -> Result<(AggregateBindings, Vec<Refused>), BadAnswer> {
    let raw: Vec<RawBinding> = serde_json::from_slice(body)?;
    let mut drains: Vec<(DrainUrl, Credentials)> = Vec::new();
    let mut refused = Vec::new();
    for b in raw {
        match DrainUrl::parse(&b.url, default_metadata) {
            Ok(url) => {
                let credentials = b
                    .credentials
                    .first()
                    .map(|c| Credentials {
                        cert: c.cert.clone(),
                        key: c.key.clone(),
                        ca: c.ca.clone(),
                    })
                    .unwrap_or_default();
                if !drains.iter().any(|(u, _)| *u == url) {
                    drains.push((url, credentials));
                }
            }
            Err(e) => refused.push(Refused {
                url: redact_unparsed(&b.url),
                problem: e.to_string(),
            }),
        }
    }
    Ok((drains, refused))
}

/// Upstream's `blacklisted_syslog_ranges`: drains whose address falls in one of these inclusive
/// ranges are refused.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BlockedRanges(Vec<(IpAddr, IpAddr)>);

/// Why a range is not one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RangeError {
    #[error("{0:?} is not an IP address")]
    NotAnAddress(String),
    #[error("{0} is after {1}")]
    Reversed(IpAddr, IpAddr),
    #[error("{0} and {1} are not of the same family")]
    Mixed(IpAddr, IpAddr),
}

impl BlockedRanges {
    /// Reads `(start, end)` pairs, both inclusive.
    ///
    /// # Errors
    /// The first pair that is not a range.
    pub fn new<'a>(
        ranges: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<Self, RangeError> {
        let mut out = Vec::new();
        for (start, end) in ranges {
            let parse = |s: &str| {
                s.trim()
                    .parse::<IpAddr>()
                    .map_err(|_| RangeError::NotAnAddress(s.to_string()))
            };
            let (a, b) = (parse(start)?, parse(end)?);
            if a.is_ipv4() != b.is_ipv4() {
                return Err(RangeError::Mixed(a, b));
            }
            if a > b {
                return Err(RangeError::Reversed(a, b));
            }
            out.push((a, b));
        }
        Ok(Self(out))
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        self.0
            .iter()
            .any(|(a, b)| a.is_ipv4() == ip.is_ipv4() && *a <= ip && ip <= *b)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BINDINGS: &str = r#"[
      {"url": "syslog://b.example:514", "credentials": [
        {"cert": "", "key": "", "ca": "", "apps": [
          {"hostname": "org.space.web", "app_id": "app-1"},
          {"hostname": "org.space.worker", "app_id": "app-2"}]}]},
      {"url": "syslog-tls://a.example:6514?drain-type=all", "credentials": [
        {"cert": "CERT", "key": "KEY", "ca": "CA", "apps": [
          {"hostname": "org.space.web", "app_id": "app-1"}]}]},
      {"url": "ftp://nope.example/x", "credentials": [
        {"apps": [{"hostname": "h", "app_id": "app-1"}]}]},
      {"url": "https://user:secret@c.example/drain?token=t", "credentials": [
        {"apps": [{"hostname": "org.space.web", "app_id": "app-1"}]}]}
    ]"#;

    #[test]
    fn bindings_are_grouped_per_app_sorted_by_url_and_limited() {
        let (by_app, refused) = read_bindings(BINDINGS.as_bytes(), true, 2).unwrap();
        assert_eq!(by_app.len(), 2);
        let app1: Vec<&str> = by_app["app-1"]
            .iter()
            .map(|d| d.url.anonymized.as_str())
            .collect();
        // Sorted as the URLs are written ("https" < "syslog-tls" < "syslog:"); the first two kept.
        assert_eq!(
            app1,
            ["https://c.example/drain", "syslog-tls://a.example:6514"]
        );
        assert_eq!(by_app["app-1"][1].credentials.key, "KEY");
        assert_eq!(by_app["app-1"][0].hostname, "org.space.web");
        assert_eq!(by_app["app-2"][0].url.anonymized, "syslog://b.example:514");
        assert_eq!(refused.len(), 1);
        assert_eq!(refused[0].url, "ftp://(the rest hidden)");
        let shown = format!("{by_app:?} {refused:?}");
        assert!(
            !shown.contains("secret") && !shown.contains("KEY"),
            "{shown}"
        );
    }

    #[test]
    fn aggregate_drains_take_their_first_credentials() {
        let body = r#"[{"url": "syslog-tls://lc.example:6067?include-metrics-deprecated=true",
                        "credentials": [{"cert": "C1", "key": "K1", "ca": "A1", "apps": []},
                                        {"cert": "C2", "key": "K2", "ca": "A2", "apps": []}]},
                       {"url": "syslog://plain.example:514"}]"#;
        let (drains, refused) = read_aggregate(body.as_bytes(), true).unwrap();
        assert!(refused.is_empty());
        assert_eq!(drains.len(), 2);
        assert_eq!(drains[0].1.cert, "C1");
        assert_eq!(drains[1].1, Credentials::default());
        assert!(read_aggregate(b"{\"not\": \"a list\"}", true).is_err());
    }

    #[test]
    fn blocked_ranges_are_inclusive_and_refuse_nonsense() {
        let r = BlockedRanges::new([("10.0.0.5", "10.0.0.9"), ("fd00::1", "fd00::ff")]).unwrap();
        for (ip, blocked) in [
            ("10.0.0.4", false),
            ("10.0.0.5", true),
            ("10.0.0.9", true),
            ("10.0.0.10", false),
            ("::ffff:10.0.0.7", true),
            ("fd00::2", true),
            ("fd01::2", false),
        ] {
            assert_eq!(r.contains(ip.parse().unwrap()), blocked, "{ip}");
        }
        assert_eq!(
            BlockedRanges::new([("10.0.0.9", "10.0.0.5")]),
            Err(RangeError::Reversed(
                "10.0.0.9".parse().unwrap(),
                "10.0.0.5".parse().unwrap()
            ))
        );
        assert!(BlockedRanges::new([("10.0.0.1", "fd00::1")]).is_err());
        assert!(BlockedRanges::new([("ten", "10.0.0.1")]).is_err());
    }
}
