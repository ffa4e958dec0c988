//! A real syslog server for the drain tests: rsyslog (Debian `rsyslog`, `rsyslog-openssl`;
//! `.ci/run` installs them), started as a child process on a loopback port with a config of its
//! own, writing every message it parses as one line of fields to a file. Stopped on drop.

use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::pki::{CertFiles, Pki};

/// The fields rsyslog writes per message, separated by this (not in any test value).
pub const SEP: &str = "\u{1f}";

pub struct Rsyslog {
    child: Child,
    pub addr: SocketAddr,
    out: PathBuf,
    dir: PathBuf,
}

impl Rsyslog {
    /// Plain TCP (`syslog://`).
    pub fn start(pki: &Pki) -> Rsyslog {
        Self::start_with(pki, None)
    }

    /// TLS with client certificates verified against the test CA (`syslog-tls://`, mTLS):
    /// rsyslog presents `server`.
    pub fn start_tls(pki: &Pki, server: &CertFiles) -> Rsyslog {
        Self::start_with(pki, Some(server))
    }

    fn start_with(pki: &Pki, tls: Option<&CertFiles>) -> Rsyslog {
        let port = super::agent::unserved_addr().port();
        let dir = pki.dir.join(format!("rsyslog-{port}"));
        std::fs::create_dir_all(&dir).expect("rsyslog dir");
        let out = dir.join("out.log");
        let (global_tls, module_tls) = match tls {
            None => (String::new(), String::new()),
            Some(c) => (
                format!(
                    "global(DefaultNetstreamDriver=\"ossl\" DefaultNetstreamDriverCAFile=\"{}\" \
                     DefaultNetstreamDriverCertFile=\"{}\" DefaultNetstreamDriverKeyFile=\"{}\")\n",
                    pki.ca_path.display(),
                    c.cert_path.display(),
                    c.key_path.display()
                ),
                " StreamDriver.Name=\"ossl\" StreamDriver.Mode=\"1\" \
                 StreamDriver.AuthMode=\"x509/certvalid\""
                    .to_string(),
            ),
        };
        let conf = format!(
            "global(workDirectory=\"{dir}\")\n{global_tls}\
             module(load=\"imtcp\"{module_tls})\n\
             template(name=\"fields\" type=\"string\" string=\"%PRI%{SEP}%TIMESTAMP:::date-rfc3339%{SEP}%HOSTNAME%{SEP}%APP-NAME%{SEP}%PROCID%{SEP}%MSGID%{SEP}%STRUCTURED-DATA%{SEP}%msg%\\n\")\n\
             ruleset(name=\"drain\") {{ action(type=\"omfile\" file=\"{out}\" template=\"fields\") }}\n\
             input(type=\"imtcp\" address=\"127.0.0.1\" port=\"{port}\" ruleset=\"drain\")\n",
            dir = dir.display(),
            out = out.display(),
        );
        let conf_path = dir.join("rsyslog.conf");
        std::fs::write(&conf_path, conf).expect("rsyslog conf");
        // Debian puts it in /usr/sbin, which a non-login PATH may lack.
        let bin = ["/usr/sbin/rsyslogd", "/sbin/rsyslogd"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .unwrap_or("rsyslogd");
        let child = Command::new(bin)
            .arg("-n")
            .arg("-f")
            .arg(&conf_path)
            .arg("-i")
            .arg(dir.join("rsyslog.pid"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("rsyslogd starts (apt-get install rsyslog rsyslog-openssl; .ci/run does)");
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let mut r = Rsyslog {
            child,
            addr,
            out,
            dir,
        };
        let listening = super::util::wait_until(Duration::from_secs(10), || {
            if let Ok(Some(status)) = r.child.try_wait() {
                panic!(
                    "rsyslogd exited at start-up: {status}; conf in {}",
                    r.dir.display()
                );
            }
            TcpStream::connect(addr).is_ok()
        });
        assert!(listening, "rsyslogd did not listen on {addr}");
        r
    }

    /// Every message written so far, as its fields.
    pub fn messages(&self) -> Vec<Vec<String>> {
        std::fs::read_to_string(&self.out)
            .unwrap_or_default()
            .lines()
            .map(|l| l.split(SEP).map(str::to_string).collect())
            .collect()
    }

    /// Waits until `n` messages were written; returns whether that happened within `timeout`.
    pub fn wait_for(&self, n: usize, timeout: Duration) -> bool {
        super::util::wait_until(timeout, || {
            std::fs::read_to_string(&self.out).map_or(0, |s| s.lines().count()) >= n
        })
    }
}

impl Drop for Rsyslog {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
