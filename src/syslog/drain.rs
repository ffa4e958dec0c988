//! A drain's URL, read as upstream's syslog-agent reads it (reference `destinations.md` §1.3):
//! the scheme picks the transport, the query picks what the drain takes and how, the userinfo is
//! HTTPS basic auth, and everything logged or put in a metric label is the URL without
//! credentials and query ([`DrainUrl::anonymized`]).

use hyper::http::Uri;

use crate::envelope::{Kind, Kinds};
use crate::proto::envelope::Message;

/// How messages travel to the drain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// `syslog://`: octet-counted RFC 5424 over TCP.
    Syslog,
    /// `syslog-tls://`: the same over TLS.
    SyslogTls,
    /// `https://`: one message per POST.
    Https,
    /// `https-batch://`: newline-terminated messages batched into POSTs.
    HttpsBatch,
}

impl Scheme {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "syslog" => Scheme::Syslog,
            "syslog-tls" => Scheme::SyslogTls,
            "https" => Scheme::Https,
            "https-batch" => Scheme::HttpsBatch,
            _ => return None,
        })
    }

    fn default_port(self) -> Option<u16> {
        match self {
            Scheme::Syslog | Scheme::SyslogTls => None,
            Scheme::Https | Scheme::HttpsBatch => Some(443),
        }
    }
}

/// Which envelopes a drain takes (upstream's `DrainData`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrainData {
    /// No parameter, or `drain-data=logs`: logs and events.
    Logs,
    /// `drain-type=logs`: logs only.
    LogsNoEvents,
    /// `drain-type=metrics` or `drain-data=metrics`: counters and gauges.
    Metrics,
    /// `drain-type=all`: logs, counters and gauges.
    LogsAndMetrics,
    /// `drain-data=traces`: timers.
    Traces,
    /// `drain-data=all`, or `include-metrics-deprecated` (Log Cache's aggregate drain): all.
    All,
}

impl DrainData {
    /// Whether the drain takes an envelope carrying `message`.
    pub fn takes(self, message: &Message) -> bool {
        let kind = match message {
            Message::Log(_) => Kind::Log,
            Message::Event(_) => Kind::Event,
            Message::Counter(_) => Kind::Counter,
            Message::Gauge(_) => Kind::Gauge,
            Message::Timer(_) => Kind::Timer,
        };
        self.kinds().takes(kind)
    }

    /// The kinds of envelope the drain takes (an envelope without a message only with `All`).
    pub fn kinds(self) -> Kinds {
        use Kind::*;
        match self {
            DrainData::Logs => Kinds::of(&[Log, Event]),
            DrainData::LogsNoEvents => Kinds::of(&[Log]),
            DrainData::Metrics => Kinds::of(&[Counter, Gauge]),
            DrainData::LogsAndMetrics => Kinds::of(&[Log, Counter, Gauge]),
            DrainData::Traces => Kinds::of(&[Timer]),
            DrainData::All => Kinds::ALL,
        }
    }
}

/// A drain, as its URL configures it. Its `Debug` leaves the credentials out.
#[derive(Clone, PartialEq, Eq)]
pub struct DrainUrl {
    pub scheme: Scheme,
    pub host: String,
    pub port: u16,
    /// For HTTPS: the path and query the POSTs go to (the query included, as upstream posts to
    /// the whole URL).
    pub target: String,
    /// For HTTPS: the URL's userinfo, `user:password`, percent-decoded.
    pub basic_auth: Option<(String, String)>,
    pub data: DrainData,
    /// `tags@47450` left out (`disable-metadata` / `omit-metadata`, against
    /// `default_drain_metadata`).
    pub omit_metadata: bool,
    /// `ssl-strict-internal=true`: the internal TLS profile.
    pub internal_tls: bool,
    /// The URL without credentials and query: what logs and metric labels show.
    pub anonymized: String,
}

impl std::fmt::Debug for DrainUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DrainUrl")
            .field("anonymized", &self.anonymized)
            .field("scheme", &self.scheme)
            .field("data", &self.data)
            .field("omit_metadata", &self.omit_metadata)
            .field("internal_tls", &self.internal_tls)
            .field(
                "basic_auth",
                &self.basic_auth.as_ref().map(|_| "<redacted>"),
            )
            .finish_non_exhaustive()
    }
}

/// Why a drain URL is refused. Never carries the URL's credentials.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DrainUrlError {
    #[error("not a URL")]
    Unparsable,
    #[error("scheme {0:?} is not syslog, syslog-tls, https or https-batch")]
    Scheme(String),
    #[error("no host")]
    NoHost,
    #[error("no port (a syslog drain needs one)")]
    NoPort,
    #[error(
        "the port is not a number (a '/', '?' or '#' in a credential must be percent-encoded)"
    )]
    BadPort,
    #[error("an '@' after the host (a '/', '?' or '#' in a credential must be percent-encoded)")]
    AtAfterHost,
}

impl DrainUrl {
    /// Reads `url`; `default_metadata` is the agent's `default_drain_metadata`.
    ///
    /// # Errors
    /// When the URL cannot serve as a drain.
    pub fn parse(url: &str, default_metadata: bool) -> Result<Self, DrainUrlError> {
        let uri: Uri = url.parse().map_err(|_| DrainUrlError::Unparsable)?;
        let scheme_str = uri.scheme_str().ok_or(DrainUrlError::Unparsable)?;
        let scheme = Scheme::parse(scheme_str)
            .ok_or_else(|| DrainUrlError::Scheme(scheme_str.to_string()))?;
        let authority = uri.authority().ok_or(DrainUrlError::NoHost)?;
        // A credential with a raw '/', '?' or '#' ends the authority early: what looks like the
        // port or the path is then part of a password. Refused (as upstream's url.Parse does),
        // so that it never reaches a log line or a label as "the URL without credentials".
        let host_port = authority
            .as_str()
            .rsplit_once('@')
            .map_or(authority.as_str(), |(_, hp)| hp);
        let port_text = match host_port.rsplit_once(']') {
            Some((_, after)) => after.strip_prefix(':'),
            None => host_port.split_once(':').map(|(_, p)| p),
        };
        if port_text.is_some_and(|p| p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit())) {
            return Err(DrainUrlError::BadPort);
        }
        if uri.path().contains('@') {
            return Err(DrainUrlError::AtAfterHost);
        }
        let host = uri
            .host()
            .filter(|h| !h.is_empty())
            .ok_or(DrainUrlError::NoHost)?;
        let port = uri
            .port_u16()
            .or(scheme.default_port())
            .ok_or(DrainUrlError::NoPort)?;
        let basic_auth = authority.as_str().rsplit_once('@').map(|(userinfo, _)| {
            let (user, password) = userinfo.split_once(':').unwrap_or((userinfo, ""));
            (percent_decode(user), percent_decode(password))
        });
        let query: Vec<(String, String)> = uri
            .query()
            .map(|q| {
                q.split('&')
                    .filter(|kv| !kv.is_empty())
                    .map(|kv| {
                        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                        (form_decode(k), form_decode(v))
                    })
                    .collect()
            })
            .unwrap_or_default();
        // Go's `url.Values.Get`: the first value of a key, "" when absent.
        let get = |key: &str| {
            query
                .iter()
                .find(|(k, _)| k == key)
                .map_or("", |(_, v)| v.as_str())
        };
        let mut data = match get("drain-type") {
            "logs" => DrainData::LogsNoEvents,
            "metrics" => DrainData::Metrics,
            "all" => DrainData::LogsAndMetrics,
            _ => DrainData::Logs,
        };
        data = match get("drain-data") {
            "logs" => DrainData::Logs,
            "metrics" => DrainData::Metrics,
            "traces" => DrainData::Traces,
            "all" => DrainData::All,
            _ => data,
        };
        if !get("include-metrics-deprecated").is_empty() {
            data = DrainData::All;
        }
        let remove = match get("disable-metadata") {
            "" => get("omit-metadata"),
            v => v,
        };
        let omit_metadata = match (default_metadata, remove) {
            (true, "true") => true,
            (false, "false") => false,
            (default, _) => !default,
        };
        Ok(DrainUrl {
            scheme,
            host: host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string(),
            port,
            target: uri
                .path_and_query()
                .map_or_else(|| "/".to_string(), |pq| pq.as_str().to_string()),
            basic_auth,
            data,
            omit_metadata,
            internal_tls: get("ssl-strict-internal") == "true",
            anonymized: anonymize(url),
        })
    }
}

/// What an error may show of a URL that did not parse: its scheme only (the rest may hold a
/// credential that was not where a valid URL keeps it).
pub fn redact_unparsed(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, _))
            if scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c)) =>
        {
            format!("{scheme}://(the rest hidden)")
        }
        _ => "(a URL, hidden)".to_string(),
    }
}

/// `url` without userinfo, query and fragment, otherwise as written (upstream's `anonymizedURL`).
/// Meant for a URL [`DrainUrl::parse`] accepted; see [`redact_unparsed`] for one it refused.
pub fn anonymize(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return String::new();
    };
    let rest = &rest[..rest.find(['?', '#']).unwrap_or(rest.len())];
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, hp)| hp);
    format!("{scheme}://{host_port}{path}")
}

/// `%XX` decoded (invalid escapes kept as they are, as lossy UTF-8).
fn percent_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

/// A query's key or value as Go's `url.ParseQuery` decodes it: `+` is a space.
fn form_decode(s: &str) -> String {
    percent_decode(&s.replace('+', " "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{Counter, Event, Gauge, Log, Timer};

    fn data(url: &str) -> DrainData {
        DrainUrl::parse(url, true).expect("a drain").data
    }

    /// One row per line of upstream's table (reference §1.3, `binding_config.go`).
    #[test]
    fn drain_type_and_drain_data() {
        for (query, want) in [
            ("", DrainData::Logs),
            ("?drain-type=logs", DrainData::LogsNoEvents),
            ("?drain-type=metrics", DrainData::Metrics),
            ("?drain-type=all", DrainData::LogsAndMetrics),
            ("?drain-type=bogus", DrainData::Logs),
            ("?drain-data=logs", DrainData::Logs),
            ("?drain-data=metrics", DrainData::Metrics),
            ("?drain-data=traces", DrainData::Traces),
            ("?drain-data=all", DrainData::All),
            ("?drain-type=logs&drain-data=metrics", DrainData::Metrics),
            ("?drain-type=metrics&drain-data=bogus", DrainData::Metrics),
            ("?include-metrics-deprecated=true", DrainData::All),
            (
                "?drain-type=logs&include-metrics-deprecated=x",
                DrainData::All,
            ),
            ("?include-metrics-deprecated=", DrainData::Logs),
        ] {
            assert_eq!(
                data(&format!("syslog://d.example:514{query}")),
                want,
                "{query}"
            );
        }
    }

    #[test]
    fn what_each_drain_data_takes() {
        let log = Message::Log(Log::default());
        let event = Message::Event(Event::default());
        let counter = Message::Counter(Counter::default());
        let gauge = Message::Gauge(Gauge::default());
        let timer = Message::Timer(Timer::default());
        let takes = |d: DrainData| [&log, &event, &counter, &gauge, &timer].map(|m| d.takes(m));
        assert_eq!(takes(DrainData::Logs), [true, true, false, false, false]);
        assert_eq!(
            takes(DrainData::LogsNoEvents),
            [true, false, false, false, false]
        );
        assert_eq!(takes(DrainData::Metrics), [false, false, true, true, false]);
        assert_eq!(
            takes(DrainData::LogsAndMetrics),
            [true, false, true, true, false]
        );
        assert_eq!(takes(DrainData::Traces), [false, false, false, false, true]);
        assert_eq!(takes(DrainData::All), [true; 5]);
    }

    #[test]
    fn metadata_follows_the_default_unless_the_url_says_otherwise() {
        let omit = |url: &str, default: bool| DrainUrl::parse(url, default).unwrap().omit_metadata;
        let u = "syslog://d:514";
        assert!(!omit(u, true));
        assert!(omit(&format!("{u}?disable-metadata=true"), true));
        assert!(omit(&format!("{u}?omit-metadata=true"), true));
        assert!(!omit(&format!("{u}?disable-metadata=false"), true));
        assert!(omit(u, false));
        assert!(!omit(&format!("{u}?disable-metadata=false"), false));
        assert!(omit(&format!("{u}?disable-metadata=true"), false));
        // disable-metadata wins over its alias.
        assert!(!omit(
            &format!("{u}?disable-metadata=false&omit-metadata=true"),
            true
        ));
    }

    #[test]
    fn schemes_hosts_ports_and_credentials() {
        let d = DrainUrl::parse(
            "https://us%40r:p%3Ass+w@logs.example.com/in/put?drain-type=all&ssl-strict-internal=true",
            true,
        )
        .unwrap();
        assert_eq!(d.scheme, Scheme::Https);
        assert_eq!((d.host.as_str(), d.port), ("logs.example.com", 443));
        assert_eq!(
            d.basic_auth,
            Some(("us@r".to_string(), "p:ss+w".to_string()))
        );
        assert_eq!(d.target, "/in/put?drain-type=all&ssl-strict-internal=true");
        assert!(d.internal_tls);
        assert_eq!(d.anonymized, "https://logs.example.com/in/put");
        let d = DrainUrl::parse("syslog-tls://[::1]:6514", true).unwrap();
        assert_eq!(
            (d.scheme, d.host.as_str(), d.port),
            (Scheme::SyslogTls, "::1", 6514)
        );
        assert_eq!(d.anonymized, "syslog-tls://[::1]:6514");
        assert!(!d.internal_tls);
        let d = DrainUrl::parse("https-batch://h:8443/?a=b", true).unwrap();
        assert_eq!(
            (d.scheme, d.port, d.basic_auth),
            (Scheme::HttpsBatch, 8443, None)
        );
        assert_eq!(d.anonymized, "https-batch://h:8443/");
    }

    #[test]
    fn refused_urls_say_why_without_credentials() {
        for (url, want) in [
            ("http://h:80", DrainUrlError::Scheme("http".into())),
            ("syslog://h", DrainUrlError::NoPort),
            ("not a url", DrainUrlError::Unparsable),
            ("syslog:///path", DrainUrlError::Unparsable),
        ] {
            assert_eq!(DrainUrl::parse(url, true), Err(want), "{url}");
        }
        let e = DrainUrl::parse("ftp://user:secret@h:1", true).unwrap_err();
        assert!(!e.to_string().contains("secret"));
        // What logs and labels show, even of a URL that does not parse.
        assert_eq!(
            anonymize("syslog://u:p@ss@h:514/x?token=s#f"),
            "syslog://h:514/x"
        );
        assert_eq!(anonymize("garbage"), "");
        // A raw '/', '?' or '#' in a credential ends the authority early; such URLs are refused
        // rather than read with the password as a port or a path, and an error shows only the
        // scheme.
        for url in [
            "https://user:pa/ss@host/",
            "https://user:pa?ss@host/",
            "syslog-tls://user:pa#ss@host:6514",
            "https://user:pa/ss@host:8443/x",
            "https://user/ss@host/",
        ] {
            let e = DrainUrl::parse(url, true).unwrap_err();
            assert!(
                matches!(e, DrainUrlError::BadPort | DrainUrlError::AtAfterHost),
                "{url}: {e:?}"
            );
            assert!(
                !redact_unparsed(url).contains("ss"),
                "{}",
                redact_unparsed(url)
            );
        }
        assert_eq!(
            redact_unparsed("https://u:p/x@h"),
            "https://(the rest hidden)"
        );
        assert_eq!(redact_unparsed("no scheme at all"), "(a URL, hidden)");
    }
}
