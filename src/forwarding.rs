//! The forwarder-agent's fan-out (issue 23): downstream agents announce themselves in
//! `ingress_port.yml` files (`{ingress: PORT, protocol: "" | "otelcol"}`), found with a glob
//! (`forwarding.ingress_port_glob`, upstream's default `/var/vcap/jobs/*/config/ingress_port.yml`)
//! at start and on every reload. Plain logic: where the files are and what they say.

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// How a downstream agent takes envelopes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    /// Loggregator v2 (`protocol: ""` or absent): a syslog-agent, a classic agent.
    V2,
    /// OTLP/gRPC (`protocol: otelcol`): an OpenTelemetry collector.
    Otelcol,
}

impl Protocol {
    /// Upstream's `protocol` label.
    pub fn name(self) -> &'static str {
        match self {
            Protocol::V2 => "",
            Protocol::Otelcol => "otelcol",
        }
    }
}

/// One announced downstream: `127.0.0.1:port`, as upstream forces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Downstream {
    pub port: u16,
    pub protocol: Protocol,
}

impl Downstream {
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

#[derive(Debug, Deserialize)]
struct PortFile {
    #[serde(default)]
    ingress: Option<serde_yaml::Value>,
    #[serde(default)]
    protocol: Option<String>,
}

/// What one `ingress_port.yml` says: `None` for a file without `ingress` (upstream ignores it).
///
/// # Errors
/// The file cannot be read, is not YAML, or names a port or protocol that is not one.
pub fn read_port_file(path: &Path) -> Result<Option<Downstream>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
    let file: PortFile = serde_yaml::from_str(&text).map_err(|e| e.to_string())?;
    let Some(ingress) = file.ingress else {
        return Ok(None);
    };
    // Upstream reads it as a string or a number.
    let port = match &ingress {
        serde_yaml::Value::Number(n) => n.as_u64().and_then(|p| u16::try_from(p).ok()),
        serde_yaml::Value::String(s) => s.trim().parse::<u16>().ok(),
        _ => None,
    }
    .filter(|p| *p > 0)
    .ok_or_else(|| format!("ingress {ingress:?} is not a port"))?;
    let protocol = match file.protocol.as_deref().unwrap_or("") {
        "" => Protocol::V2,
        "otelcol" => Protocol::Otelcol,
        other => return Err(format!("unknown protocol {other:?} (\"\" or \"otelcol\")")),
    };
    Ok(Some(Downstream { port, protocol }))
}

/// The downstreams the files matching `pattern` announce, sorted, without duplicates and
/// without `own_port` (metron's own ingress: no loops). A file that cannot be read is
/// reported in the second list (its path and why) and skipped.
pub fn discover(pattern: &str, own_port: u16) -> (Vec<Downstream>, Unreadable) {
    let (found, bad) = discover_paths(pattern, own_port);
    (downstreams(found.iter().map(|(_, d)| *d)), bad)
}

/// Each downstream with the file it came from.
pub type Readings = Vec<(PathBuf, Downstream)>;
/// Each file that could not be read, and why.
pub type Unreadable = Vec<(PathBuf, String)>;

/// As [`discover`], with the file each downstream came from (unsorted, duplicates kept).
pub fn discover_paths(pattern: &str, own_port: u16) -> (Readings, Unreadable) {
    let mut found = Vec::new();
    let mut bad = Vec::new();
    for path in glob(pattern) {
        match read_port_file(&path) {
            Ok(Some(d)) if d.port != own_port => found.push((path, d)),
            Ok(_) => {}
            Err(e) => bad.push((path, e)),
        }
    }
    (found, bad)
}

/// Sorted, without duplicates.
pub fn downstreams(d: impl Iterator<Item = Downstream>) -> Vec<Downstream> {
    let mut v: Vec<Downstream> = d.collect();
    v.sort();
    v.dedup();
    v
}

/// The paths matching `pattern`, sorted: `*` and `?` within one path segment (as Go's
/// `filepath.Glob`, without character classes; like it, a wildcard matches a leading dot).
pub fn glob(pattern: &str) -> Vec<PathBuf> {
    let absolute = pattern.starts_with('/');
    let mut paths = vec![if absolute {
        PathBuf::from("/")
    } else {
        PathBuf::from(".")
    }];
    let segments: Vec<&str> = pattern.split('/').filter(|s| !s.is_empty()).collect();
    for (i, seg) in segments.iter().enumerate() {
        let last = i + 1 == segments.len();
        let mut next = Vec::new();
        for base in &paths {
            if !seg.contains(['*', '?']) {
                let p = base.join(seg);
                if p.exists() {
                    next.push(p);
                }
                continue;
            }
            let Ok(entries) = std::fs::read_dir(base) else {
                continue;
            };
            for e in entries.flatten() {
                let name = e.file_name();
                let Some(name) = name.to_str() else { continue };
                if matches(seg.as_bytes(), name.as_bytes())
                    && (last || e.file_type().is_ok_and(|t| t.is_dir() || t.is_symlink()))
                {
                    next.push(e.path());
                }
            }
        }
        paths = next;
    }
    let mut out: Vec<PathBuf> = paths
        .into_iter()
        .map(|p| {
            if absolute {
                p
            } else {
                p.strip_prefix(".").map(Path::to_path_buf).unwrap_or(p)
            }
        })
        .collect();
    out.sort();
    out
}

/// Whether `name` matches `pattern` (`*`: any run of bytes, `?`: one byte).
fn matches(pattern: &[u8], name: &[u8]) -> bool {
    match (pattern.first(), name.first()) {
        (None, None) => true,
        (Some(b'*'), _) => {
            matches(&pattern[1..], name) || (!name.is_empty() && matches(pattern, &name[1..]))
        }
        (Some(b'?'), Some(_)) => matches(&pattern[1..], &name[1..]),
        (Some(p), Some(n)) if p == n => matches(&pattern[1..], &name[1..]),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree() -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "metron-forwarding-{}-{}",
            std::process::id(),
            crate::entropy::random_u64()
        ));
        for (job, body) in [
            ("syslog-agent", "ingress: 3460\n"),
            ("loggr-udp", "---\n"),
            ("otel-collector", "ingress: \"9100\"\nprotocol: otelcol\n"),
            ("classic-agent", "ingress: 3459\nprotocol: \"\"\n"),
            ("metron", "ingress: 3458\n"),
            ("broken", "ingress: [nope\n"),
        ] {
            let d = dir.join("jobs").join(job).join("config");
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("ingress_port.yml"), body).unwrap();
        }
        dir
    }

    #[test]
    fn the_files_announce_their_agents_and_our_own_port_is_left_out() {
        let dir = tree();
        let pattern = format!("{}/jobs/*/config/ingress_port.yml", dir.display());
        assert_eq!(glob(&pattern).len(), 6);
        let (found, bad) = discover(&pattern, 3458);
        assert_eq!(
            found,
            [
                Downstream {
                    port: 3459,
                    protocol: Protocol::V2
                },
                Downstream {
                    port: 3460,
                    protocol: Protocol::V2
                },
                Downstream {
                    port: 9100,
                    protocol: Protocol::Otelcol
                },
            ]
        );
        assert_eq!(bad.len(), 1);
        assert!(
            bad[0].0.ends_with("broken/config/ingress_port.yml"),
            "{bad:?}"
        );
        assert_eq!(found[2].addr(), "127.0.0.1:9100");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_port_or_protocol_that_is_not_one_is_an_error() {
        let dir = std::env::temp_dir().join(format!("metron-portfile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for (body, ok) in [
            ("ingress: 0\n", false),
            ("ingress: 70000\n", false),
            ("ingress: 80\nprotocol: zipkin\n", false),
            ("ingress: 80\n", true),
            ("protocol: otelcol\n", true),
        ] {
            let p = dir.join("ingress_port.yml");
            std::fs::write(&p, body).unwrap();
            assert_eq!(read_port_file(&p).is_ok(), ok, "{body}");
        }
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn wildcards_match_within_a_segment() {
        assert!(matches(b"*", b"syslog-agent"));
        assert!(matches(b"loggr-*", b"loggr-syslog"));
        assert!(matches(b"a?c", b"abc"));
        assert!(!matches(b"a?c", b"ac"));
        assert!(!matches(b"loggr-*", b"syslog"));
        assert!(matches(b"*.yml", b"ingress_port.yml"));
    }
}
