//! The HTTP side of the worker: a pool of threads that perform step requests with `ureq`.
//! No code here touches Postgres: jobs come in over a channel, outcomes go back over
//! another, and each outcome writes a byte to a pipe the main thread waits on.
//!
//! Every request is bounded: its step's timeout (connect to last byte), the response size
//! limit, at most [`MAX_REDIRECTS`] redirects, each checked against the allowed hosts, and
//! every resolved address checked too (a DNS answer cannot lead to a refused address).

use dispatched_core::engine::{OutRequest, Outcome};
use dispatched_core::hosts::{self, HostRules};
use dispatched_core::rules::Failure;
use std::io::Read;
use std::os::fd::RawFd;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use ureq::unversioned::resolver::{DefaultResolver, ResolvedSocketAddrs, Resolver};
use ureq::unversioned::transport::{DefaultConnector, NextTimeout};

pub const MAX_REDIRECTS: u32 = 5;

/// Settings the threads read; the main thread replaces them on SIGHUP.
#[derive(Debug, Clone)]
pub struct Limits {
    pub rules: HostRules,
    pub max_response_bytes: u64,
}

pub struct Job {
    pub req: OutRequest,
    pub claims: i32,
}

pub struct Done {
    pub req: OutRequest,
    pub claims: i32,
    pub outcome: Outcome,
    /// how long the request took, first byte out to last byte in (redirects included)
    pub duration: Duration,
}

pub struct Pool {
    jobs: Sender<Job>,
    pub done: Receiver<Done>,
    pub limits: Arc<RwLock<Limits>>,
    pub threads: usize,
}

/// Resolves with the system resolver, then refuses the answer if any address is not allowed.
#[derive(Debug)]
struct CheckedResolver {
    limits: Arc<RwLock<Limits>>,
}

impl Resolver for CheckedResolver {
    fn resolve(
        &self,
        uri: &ureq::http::Uri,
        config: &ureq::config::Config,
        timeout: NextTimeout,
    ) -> Result<ResolvedSocketAddrs, ureq::Error> {
        let host = uri.host().unwrap_or_default();
        // An address needs no lookup (the default resolver starts a thread for each lookup
        // that has a timeout).
        let literal = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>();
        let addrs = match literal {
            Ok(ip) => {
                let port = uri.port_u16().unwrap_or(match uri.scheme_str() {
                    Some("https") => 443,
                    _ => 80,
                });
                let mut addrs = self.empty();
                addrs.push(std::net::SocketAddr::new(ip, port));
                addrs
            }
            Err(_) => DefaultResolver::default().resolve(uri, config, timeout)?,
        };
        let rules = match self.limits.read() {
            Ok(l) => l.rules.clone(),
            Err(_) => HostRules::default(),
        };
        for a in addrs.iter() {
            if let Err(why) = rules.check_addr(host, &a.ip()) {
                return Err(ureq::Error::Io(std::io::Error::new(
                    std::io::ErrorKind::PermissionDenied,
                    why,
                )));
            }
        }
        Ok(addrs)
    }
}

impl Pool {
    pub fn start(threads: usize, limits: Limits, wake_fd: RawFd) -> Pool {
        let limits = Arc::new(RwLock::new(limits));
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .max_redirects(0)
            // every thread may hold a connection to the same host: keep them all for reuse
            .max_idle_connections(threads.max(1000))
            .max_idle_connections_per_host(threads.max(16))
            .user_agent("dispatched/0.1")
            .build();
        let agent = ureq::Agent::with_parts(
            config,
            DefaultConnector::default(),
            CheckedResolver {
                limits: limits.clone(),
            },
        );
        let (jobs_tx, jobs_rx) = channel::<Job>();
        let (done_tx, done_rx) = channel::<Done>();
        let jobs_rx = Arc::new(Mutex::new(jobs_rx));
        crate::bgw::with_signals_blocked(|| {
            for n in 0..threads {
                let rx = jobs_rx.clone();
                let tx = done_tx.clone();
                let agent = agent.clone();
                let limits = limits.clone();
                let _ = std::thread::Builder::new()
                    .name(format!("dispatched-http-{n}"))
                    .stack_size(256 * 1024)
                    .spawn(move || loop {
                        let job = match rx.lock() {
                            Ok(guard) => match guard.recv() {
                                Ok(j) => j,
                                Err(_) => return,
                            },
                            Err(_) => return,
                        };
                        let lim = match limits.read() {
                            Ok(l) => l.clone(),
                            Err(_) => return,
                        };
                        let started = Instant::now();
                        let outcome = perform(&agent, &job.req, &lim);
                        let done = Done {
                            req: job.req,
                            claims: job.claims,
                            outcome,
                            duration: started.elapsed(),
                        };
                        if tx.send(done).is_err() {
                            return;
                        }
                        crate::bgw::poke(wake_fd);
                    });
            }
        });
        Pool {
            jobs: jobs_tx,
            done: done_rx,
            limits,
            threads,
        }
    }

    pub fn submit(&self, job: Job) -> bool {
        self.jobs.send(job).is_ok()
    }
}

fn failed(failure: Failure, message: String) -> Outcome {
    Outcome::Failed { failure, message }
}

fn describe(e: &ureq::Error, timeout: Duration, url: &str, max: u64) -> Outcome {
    use ureq::Error as E;
    let t = dispatched_core::duration::format_ms(timeout.as_millis() as u64);
    match e {
        E::Timeout(_) => failed(Failure::Timeout, format!("timed out after {t} ({url})")),
        E::Io(io) if io.kind() == std::io::ErrorKind::PermissionDenied => {
            failed(Failure::Permanent, io.to_string())
        }
        E::Io(io) if io.kind() == std::io::ErrorKind::TimedOut => {
            failed(Failure::Timeout, format!("timed out after {t} ({url})"))
        }
        E::BodyExceedsLimit(_) => failed(
            Failure::Permanent,
            format!("response body is larger than dispatched.max_response_bytes ({max} bytes)"),
        ),
        // a certificate that is not trusted (or any other TLS failure) will not get better by
        // retrying: permanent, and said to be TLS (ureq reports it as an I/O error)
        E::Io(io)
            if io
                .get_ref()
                .is_some_and(|inner| inner.downcast_ref::<rustls::Error>().is_some()) =>
        {
            failed(Failure::Permanent, format!("TLS error: {io} ({url})"))
        }
        E::HostNotFound => failed(Failure::Network, format!("host not found ({url})")),
        E::ConnectionFailed => failed(Failure::Network, format!("connection failed ({url})")),
        E::Io(io) => failed(Failure::Network, format!("network error: {io} ({url})")),
        E::Protocol(p) => failed(Failure::Network, format!("protocol error: {p} ({url})")),
        E::BadUri(u) => failed(Failure::Permanent, format!("bad URL: {u}")),
        E::Tls(m) => failed(Failure::Permanent, format!("TLS error: {m} ({url})")),
        other => failed(
            Failure::Permanent,
            format!("request failed: {other} ({url})"),
        ),
    }
}

fn join_location(base: &str, loc: &str) -> String {
    if loc.starts_with("http://") || loc.starts_with("https://") {
        return loc.to_string();
    }
    let scheme_end = base.find("://").map(|i| i + 3).unwrap_or(0);
    if let Some(rest) = loc.strip_prefix("//") {
        return format!("{}{}", &base[..scheme_end], rest);
    }
    let path_start = base[scheme_end..]
        .find('/')
        .map(|i| i + scheme_end)
        .unwrap_or(base.len());
    if loc.starts_with('/') {
        return format!("{}{}", &base[..path_start], loc);
    }
    let path = &base[path_start..];
    let path = path.split(['?', '#']).next().unwrap_or("");
    let dir = match path.rfind('/') {
        Some(i) => &path[..=i],
        None => "/",
    };
    format!("{}{}{}", &base[..path_start], dir, loc)
}

fn is_json(content_type: Option<&str>) -> bool {
    match content_type {
        Some(ct) => {
            let mime = ct
                .split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase();
            mime == "application/json" || mime.ends_with("+json")
        }
        None => false,
    }
}

/// Performs one request with redirects, all bounds applied.
pub fn perform(agent: &ureq::Agent, req: &OutRequest, lim: &Limits) -> Outcome {
    let timeout = Duration::from_millis(req.timeout_ms.max(1));
    let deadline = Instant::now() + timeout;
    let mut url = req.url.clone();
    let mut method = req.method.clone();
    let mut body = req.body.clone();
    let mut headers = req.headers.clone();
    let first_host = req.host.to_ascii_lowercase();
    for hop in 0..=MAX_REDIRECTS {
        let parts = match hosts::parse_url(&url) {
            Ok(p) => p,
            Err(e) => return failed(Failure::Permanent, format!("bad URL: {e}")),
        };
        if let Err(why) = lim.rules.check_host(&parts.host) {
            return failed(Failure::Permanent, why);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return failed(
                Failure::Timeout,
                format!(
                    "timed out after {}",
                    dispatched_core::duration::format_ms(req.timeout_ms)
                ),
            );
        }
        let mut builder = ureq::http::Request::builder()
            .method(method.as_str())
            .uri(&url);
        for (k, v) in &headers {
            builder = builder.header(k.as_str(), v.as_str());
        }
        let request = match builder.body(body.clone().unwrap_or_default()) {
            Ok(r) => r,
            Err(e) => return failed(Failure::Permanent, format!("bad request: {e}")),
        };
        let request = agent
            .configure_request(request)
            .timeout_global(Some(left))
            .build();
        let mut resp = match agent.run(request) {
            Ok(r) => r,
            Err(e) => return describe(&e, timeout, &url, lim.max_response_bytes),
        };
        let status = resp.status().as_u16();
        if matches!(status, 301 | 302 | 303 | 307 | 308) {
            let location = resp
                .headers()
                .get("location")
                .and_then(|v| v.to_str().ok())
                .map(|s| s.to_string());
            if let Some(loc) = location {
                if hop == MAX_REDIRECTS {
                    return failed(
                        Failure::Permanent,
                        format!("more than {MAX_REDIRECTS} redirects (last to {loc})"),
                    );
                }
                url = join_location(&url, &loc);
                if status == 303 || ((status == 301 || status == 302) && method == "POST") {
                    method = "GET".into();
                    body = None;
                    headers.retain(|(k, _)| !k.eq_ignore_ascii_case("content-type"));
                }
                let new_host = hosts::parse_url(&url)
                    .map(|p| p.host.to_ascii_lowercase())
                    .unwrap_or_default();
                if new_host != first_host {
                    headers.retain(|(k, _)| {
                        !k.eq_ignore_ascii_case("authorization")
                            && !k.eq_ignore_ascii_case("cookie")
                    });
                }
                continue;
            }
        }
        let mut out_headers: Vec<(String, String)> = Vec::new();
        for (name, value) in resp.headers().iter() {
            out_headers.push((
                name.as_str().to_ascii_lowercase(),
                String::from_utf8_lossy(value.as_bytes()).into_owned(),
            ));
        }
        let content_type = out_headers
            .iter()
            .find(|(n, _)| n == "content-type")
            .map(|(_, v)| v.clone());
        let mut bytes = Vec::new();
        let read = resp
            .body_mut()
            .with_config()
            .limit(lim.max_response_bytes)
            .reader()
            .read_to_end(&mut bytes);
        if let Err(e) = read {
            let text = e.to_string();
            if text.contains("limit") || text.contains("exceeds") {
                return failed(
                    Failure::Permanent,
                    format!(
                        "response body is larger than dispatched.max_response_bytes ({} bytes)",
                        lim.max_response_bytes
                    ),
                );
            }
            if e.kind() == std::io::ErrorKind::TimedOut || text.contains("timeout") {
                return failed(
                    Failure::Timeout,
                    format!(
                        "timed out after {} ({url})",
                        dispatched_core::duration::format_ms(req.timeout_ms)
                    ),
                );
            }
            return failed(
                Failure::Network,
                format!("reading the response failed: {text} ({url})"),
            );
        }
        let body = if bytes.is_empty() {
            serde_json::Value::Null
        } else if is_json(content_type.as_deref()) {
            match serde_json::from_slice(&bytes) {
                Ok(v) => v,
                Err(e) => {
                    return failed(
                        Failure::Permanent,
                        format!(
                        "HTTP {status} with a JSON content type but a body that is not JSON: {e}"
                    ),
                    )
                }
            }
        } else {
            serde_json::Value::String(String::from_utf8_lossy(&bytes).into_owned())
        };
        return Outcome::Response {
            status,
            headers: out_headers,
            body,
        };
    }
    failed(
        Failure::Permanent,
        format!("more than {MAX_REDIRECTS} redirects"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations() {
        assert_eq!(join_location("http://a:1/x/y?q", "/z"), "http://a:1/z");
        assert_eq!(join_location("http://a/x/y", "z"), "http://a/x/z");
        assert_eq!(join_location("http://a", "z"), "http://a/z");
        assert_eq!(join_location("https://a/x", "//b/c"), "https://b/c");
        assert_eq!(join_location("http://a/x", "https://b/"), "https://b/");
    }
}
