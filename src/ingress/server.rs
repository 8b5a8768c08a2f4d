//! The network side of the HTTP ingress: a listener thread and one thread per connection.
//! No code here touches Postgres. A connection thread reads one request within the bounds
//! (header size, body size, read timeouts), hands it to the main thread over a channel,
//! writes a byte to the pipe the main thread waits on, and writes the answer back when it
//! comes. One request per connection (`Connection: close`).
//!
//! The dashboard page (`GET /`) is static and served here without the main thread.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The largest request head (request line and headers).
pub const MAX_HEAD_BYTES: usize = 16 * 1024;
/// How long writing an answer may take.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone)]
pub struct Limits {
    pub max_connections: usize,
    pub read_timeout: Duration,
    pub max_body: usize,
}

#[derive(Debug)]
pub struct Request {
    pub method: String,
    /// The path, percent-decoded segment by segment.
    pub segments: Vec<String>,
    pub path: String,
    pub query: Vec<(String, String)>,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn query(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn json(status: u16, value: &serde_json::Value) -> Response {
        Response {
            status,
            headers: vec![("Content-Type".into(), "application/json".into())],
            body: value.to_string().into_bytes(),
        }
    }

    /// The error shape of the contract: `{"error":"<code>","message":".."}`.
    pub fn error(status: u16, code: &str, message: impl Into<String>) -> Response {
        Response::json(
            status,
            &serde_json::json!({"error": code, "message": message.into()}),
        )
    }

    pub fn with_header(mut self, name: &str, value: impl Into<String>) -> Response {
        self.headers.push((name.into(), value.into()));
        self
    }
}

pub struct Job {
    pub req: Request,
    pub reply: Sender<Response>,
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Content Too Large",
        422 => "Unprocessable Content",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Status",
    }
}

fn write_response(s: &mut TcpStream, r: &Response) {
    let _ = s.set_write_timeout(Some(WRITE_TIMEOUT));
    let mut head = format!("HTTP/1.1 {} {}\r\n", r.status, reason(r.status));
    for (k, v) in &r.headers {
        // header values come from our own code; never let a line break through
        let v: String = v.chars().filter(|c| *c != '\r' && *c != '\n').collect();
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str(&format!(
        "Content-Length: {}\r\nConnection: close\r\nCache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\n\r\n",
        r.body.len()
    ));
    let _ = s.write_all(head.as_bytes());
    let _ = s.write_all(&r.body);
    let _ = s.flush();
    let _ = s.shutdown(Shutdown::Write);
}

pub fn percent_decode(s: &str, plus_is_space: bool) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                let hex = |c: u8| (c as char).to_digit(16);
                match (hex(b[i + 1]), hex(b[i + 2])) {
                    (Some(h), Some(l)) => {
                        out.push((h * 16 + l) as u8);
                        i += 3;
                        continue;
                    }
                    _ => out.push(b'%'),
                }
            }
            b'+' if plus_is_space => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

enum ReadError {
    Timeout,
    TooLarge,
    Closed,
}

/// Reads until the end of the head (`\r\n\r\n`), within the deadline and the size limit.
/// Returns the head and whatever body bytes came with it.
fn read_head(s: &mut TcpStream, deadline: Instant) -> Result<(Vec<u8>, Vec<u8>), ReadError> {
    let mut buf = Vec::with_capacity(2048);
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            if end + 4 > MAX_HEAD_BYTES {
                return Err(ReadError::TooLarge);
            }
            let rest = buf.split_off(end + 4);
            return Ok((buf, rest));
        }
        if buf.len() > MAX_HEAD_BYTES {
            return Err(ReadError::TooLarge);
        }
        let n = read_some(s, &mut chunk, deadline)?;
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn read_some(s: &mut TcpStream, chunk: &mut [u8], deadline: Instant) -> Result<usize, ReadError> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(ReadError::Timeout);
    }
    let _ = s.set_read_timeout(Some(left));
    match s.read(chunk) {
        Ok(0) => Err(ReadError::Closed),
        Ok(n) => Ok(n),
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
            Err(ReadError::Timeout)
        }
        Err(e) if e.kind() == ErrorKind::Interrupted => Ok(0),
        Err(_) => Err(ReadError::Closed),
    }
}

/// Parses the head into a request without a body. Err: a 400 message.
fn parse_head(head: &[u8]) -> Result<Request, String> {
    let text = String::from_utf8_lossy(head);
    let mut lines = text.split("\r\n");
    let line = lines.next().unwrap_or("");
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version)) = (parts.next(), parts.next(), parts.next())
    else {
        return Err(format!("malformed request line {line:?}"));
    };
    if !version.starts_with("HTTP/1.") || method.is_empty() || !target.starts_with('/') {
        return Err(format!("malformed request line {line:?}"));
    }
    let mut headers = Vec::new();
    for l in lines {
        if l.is_empty() {
            continue;
        }
        let Some((k, v)) = l.split_once(':') else {
            return Err(format!("malformed header line {l:?}"));
        };
        headers.push((k.trim().to_string(), v.trim().to_string()));
    }
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, q),
        None => (target, ""),
    };
    let query = query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (percent_decode(k, true), percent_decode(v, true)),
            None => (percent_decode(p, true), String::new()),
        })
        .collect();
    let segments = path
        .split('/')
        .filter(|s| !s.is_empty())
        .map(|s| percent_decode(s, false))
        .collect();
    Ok(Request {
        method: method.to_string(),
        segments,
        path: path.to_string(),
        query,
        headers,
        body: Vec::new(),
    })
}

struct Shared {
    limits: Limits,
    jobs: Sender<Job>,
    wake_fd: RawFd,
    active: AtomicUsize,
    page: &'static str,
}

/// Starts the listener thread. Call with every signal blocked (threads inherit the mask).
pub fn start(
    listener: TcpListener,
    limits: Limits,
    jobs: Sender<Job>,
    wake_fd: RawFd,
    page: &'static str,
) -> std::io::Result<()> {
    let shared = Arc::new(Shared {
        limits,
        jobs,
        wake_fd,
        active: AtomicUsize::new(0),
        page,
    });
    std::thread::Builder::new()
        .name("dispatched-ingress-listen".into())
        .stack_size(256 * 1024)
        .spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut s) = stream else { continue };
                if shared.active.load(Ordering::SeqCst) >= shared.limits.max_connections {
                    write_response(
                        &mut s,
                        &Response::error(
                            503,
                            "too_many_connections",
                            format!(
                                "the ingress serves at most {} connections at once (dispatched.http_max_connections)",
                                shared.limits.max_connections
                            ),
                        )
                        .with_header("Retry-After", "1"),
                    );
                    continue;
                }
                shared.active.fetch_add(1, Ordering::SeqCst);
                let sh = shared.clone();
                let spawned = std::thread::Builder::new()
                    .name("dispatched-ingress-conn".into())
                    .stack_size(256 * 1024)
                    .spawn(move || {
                        serve(s, &sh);
                        sh.active.fetch_sub(1, Ordering::SeqCst);
                    });
                if spawned.is_err() {
                    shared.active.fetch_sub(1, Ordering::SeqCst);
                }
            }
        })?;
    Ok(())
}

fn serve(mut s: TcpStream, sh: &Shared) {
    let _ = s.set_nodelay(true);
    let deadline = Instant::now() + sh.limits.read_timeout;
    let (head, mut body) =
        match read_head(&mut s, deadline) {
            Ok(x) => x,
            Err(ReadError::Closed) => return,
            Err(ReadError::Timeout) => return write_response(
                &mut s,
                &Response::error(
                    408,
                    "request_timeout",
                    "the request's headers did not arrive in time (dispatched.http_read_timeout)",
                ),
            ),
            Err(ReadError::TooLarge) => {
                return write_response(
                    &mut s,
                    &Response::error(
                        431,
                        "headers_too_large",
                        format!("the request's headers are larger than {MAX_HEAD_BYTES} bytes"),
                    ),
                )
            }
        };
    let mut req = match parse_head(&head) {
        Ok(r) => r,
        Err(m) => return write_response(&mut s, &Response::error(400, "bad_request", m)),
    };
    if req.header("transfer-encoding").is_some() {
        return write_response(
            &mut s,
            &Response::error(
                411,
                "length_required",
                "send the body with a Content-Length (chunked bodies are not accepted)",
            ),
        );
    }
    let length = match req.header("content-length") {
        None => 0,
        Some(v) => match v.parse::<usize>() {
            Ok(n) => n,
            Err(_) => {
                return write_response(
                    &mut s,
                    &Response::error(400, "bad_request", format!("bad Content-Length {v:?}")),
                )
            }
        },
    };
    if length > sh.limits.max_body {
        return write_response(
            &mut s,
            &Response::error(
                413,
                "body_too_large",
                format!(
                    "the request body is {length} bytes; at most {} are accepted (dispatched.http_max_body_bytes)",
                    sh.limits.max_body
                ),
            ),
        );
    }
    if length > body.len()
        && req
            .header("expect")
            .is_some_and(|e| e.eq_ignore_ascii_case("100-continue"))
    {
        // curl and others wait for this before sending a larger body
        let _ = s.set_write_timeout(Some(WRITE_TIMEOUT));
        let _ = s.write_all(b"HTTP/1.1 100 Continue\r\n\r\n");
    }
    let deadline = Instant::now() + sh.limits.read_timeout;
    let mut chunk = [0u8; 8192];
    while body.len() < length {
        match read_some(&mut s, &mut chunk, deadline) {
            Ok(n) => body.extend_from_slice(&chunk[..n]),
            Err(ReadError::Timeout) => {
                return write_response(
                    &mut s,
                    &Response::error(
                        408,
                        "request_timeout",
                        "the request's body did not arrive in time (dispatched.http_read_timeout)",
                    ),
                )
            }
            Err(_) => return,
        }
    }
    body.truncate(length);
    req.body = body;

    if req.method == "GET" && (req.path == "/" || req.path == "/index.html") {
        let r = Response {
            status: 200,
            headers: vec![
                ("Content-Type".into(), "text/html; charset=utf-8".into()),
                (
                    "Content-Security-Policy".into(),
                    "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; frame-ancestors 'none'".into(),
                ),
            ],
            body: sh.page.as_bytes().to_vec(),
        };
        return write_response(&mut s, &r);
    }

    let (tx, rx) = channel();
    if sh.jobs.send(Job { req, reply: tx }).is_err() {
        return write_response(
            &mut s,
            &Response::error(503, "unavailable", "the ingress is stopping"),
        );
    }
    crate::bgw::poke(sh.wake_fd);
    let r = rx.recv().unwrap_or_else(|_| {
        Response::error(503, "unavailable", "the ingress stopped before answering")
    });
    write_response(&mut s, &r);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_head() {
        let r = parse_head(
            b"POST /api/runs/run_1/signal/report%2Dready?timeout=5s&q=a+b HTTP/1.1\r\nHost: x\r\nIdempotency-Key: k\r\n\r\n",
        )
        .expect("parses");
        assert_eq!(
            r.segments,
            ["api", "runs", "run_1", "signal", "report-ready"]
        );
        assert_eq!(r.query("timeout"), Some("5s"));
        assert_eq!(r.query("q"), Some("a b"));
        assert_eq!(r.header("idempotency-key"), Some("k"));
        assert!(parse_head(b"GET\r\n\r\n").is_err());
        assert_eq!(percent_decode("%zz%41", false), "%zzA");
        assert_eq!(percent_decode("a%2", false), "a%2");
    }
}
