//! Protocol detection: what an intercepted connection speaks, told from its
//! first bytes without consuming them (`peek`), within a bounded wait.
//!
//! HTTP/2 with prior knowledge starts with its preface; HTTP/1.x with a
//! method token and a space; TLS with a handshake record carrying a
//! ClientHello, whose SNI is read for metrics. Anything else, or nothing
//! within the wait, is opaque TCP. Ports where the server speaks first
//! (SMTP, MySQL, PostgreSQL, Redis...) are never detected: the client is
//! waiting for the server, so a wait would only add its full length to
//! every connection.

use std::time::Duration;

use tokio::net::TcpStream;

/// How long detection waits for the client's first bytes. Clients of
/// client-first protocols send at once; a connection that stays silent this
/// long is treated as opaque TCP.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(500);

/// Ports whose protocol has the server speak first, or that are opaque
/// anyway: never detected, so a connection never waits.
pub const SERVER_FIRST_PORTS: &[u16] = &[
    21,    // FTP
    22,    // SSH
    25,    // SMTP
    110,   // POP3
    143,   // IMAP
    587,   // SMTP submission
    3306,  // MySQL
    4222,  // NATS
    5432,  // PostgreSQL (listed, as by Istio and Linkerd: opaque, never worth a wait)
    6379,  // Redis (likewise)
    11211, // memcached
    27017, // MongoDB
];

/// The bytes peeked at most: enough for a ClientHello with its SNI.
const PEEK_BYTES: usize = 2048;
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// What a connection speaks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Protocol {
    /// HTTP/1.0 or HTTP/1.1.
    Http1,
    /// HTTP/2 with prior knowledge.
    Http2,
    /// TLS from the application: passed through untouched.
    Tls {
        /// The server name it asked for, if any.
        sni: Option<String>,
    },
    /// Anything else.
    Opaque,
}

impl Protocol {
    /// The metric label.
    pub fn as_str(&self) -> &'static str {
        match self {
            Protocol::Http1 => "http1",
            Protocol::Http2 => "http2",
            Protocol::Tls { .. } => "tls",
            Protocol::Opaque => "tcp",
        }
    }
}

/// Whether a destination port skips detection.
pub fn server_speaks_first(port: u16) -> bool {
    SERVER_FIRST_PORTS.contains(&port)
}

/// Peeks at `stream` until its protocol is known or `timeout` passes.
/// Reads nothing: the bytes are still there for whoever handles it.
pub async fn detect(stream: &TcpStream, timeout: Duration) -> Protocol {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut buf = vec![0u8; PEEK_BYTES];
    let mut last_len = usize::MAX;
    loop {
        let peeked = tokio::time::timeout_at(deadline, stream.peek(&mut buf)).await;
        let n = match peeked {
            Ok(Ok(n)) => n,
            // Closed or failed: nothing to tell; the handler sees why.
            Ok(Err(_)) => return Protocol::Opaque,
            Err(_) => return classify(&buf[..last_len.min(buf.len())], true),
        };
        if n == 0 {
            return Protocol::Opaque;
        }
        match classify_partial(&buf[..n]) {
            Some(protocol) => return protocol,
            None if n == buf.len() => return classify(&buf[..n], true),
            None => {}
        }
        if n == last_len {
            // Nothing new since the last peek: wait a little for more
            // instead of spinning on the same bytes.
            if tokio::time::timeout_at(deadline, tokio::time::sleep(Duration::from_millis(1)))
                .await
                .is_err()
            {
                return classify(&buf[..n], true);
            }
        }
        last_len = n;
    }
}

/// The HTTP version of a connection known to carry HTTP, from the bytes
/// received so far, as hyper-util tells them apart: HTTP/2 when they start
/// with its preface, HTTP/1 as soon as they differ from it, `None` while
/// they are still a part of it.
pub fn http_version(bytes: &[u8]) -> Option<Protocol> {
    if bytes.starts_with(H2_PREFACE) {
        Some(Protocol::Http2)
    } else if H2_PREFACE.starts_with(bytes) {
        None
    } else {
        Some(Protocol::Http1)
    }
}

/// The bytes that [`http_version`] needs at most.
pub const HTTP_VERSION_BYTES: usize = H2_PREFACE.len();

/// A verdict when the bytes so far settle it, `None` when more are needed.
fn classify_partial(bytes: &[u8]) -> Option<Protocol> {
    // `PRI * HT...` would pass for an HTTP/1 request line.
    if bytes.len() < H2_PREFACE.len() && H2_PREFACE.starts_with(bytes) {
        return None;
    }
    let verdict = classify(bytes, false);
    (verdict != Protocol::Opaque || !could_grow(bytes)).then_some(verdict)
}

/// Whether more bytes could still turn `bytes` into a known protocol.
fn could_grow(bytes: &[u8]) -> bool {
    if H2_PREFACE.starts_with(bytes) {
        return true;
    }
    if bytes.first() == Some(&0x16) {
        return true;
    }
    // An HTTP/1 request line still being received: a method token so far.
    bytes.len() < 16 && bytes.iter().all(u8::is_ascii_uppercase)
}

/// The protocol `bytes` start with; `final_` when no more will come.
fn classify(bytes: &[u8], final_: bool) -> Protocol {
    if bytes.starts_with(H2_PREFACE) {
        return Protocol::Http2;
    }
    if is_http1_request_line(bytes) {
        return Protocol::Http1;
    }
    if bytes.first() == Some(&0x16) {
        match client_hello_sni(bytes) {
            Hello::Complete(sni) => return Protocol::Tls { sni },
            Hello::Incomplete if !final_ => return Protocol::Opaque,
            Hello::Incomplete => return Protocol::Tls { sni: None },
            Hello::NotTls => {}
        }
    }
    Protocol::Opaque
}

/// `METHOD SP` with an upper-case token method, as every HTTP/1 request
/// starts (RFC 9112 §3).
fn is_http1_request_line(bytes: &[u8]) -> bool {
    let Some(space) = bytes.iter().position(|b| *b == b' ') else {
        return false;
    };
    (3..=10).contains(&space) && bytes[..space].iter().all(u8::is_ascii_uppercase)
}

enum Hello {
    Complete(Option<String>),
    Incomplete,
    NotTls,
}

/// Reads the SNI of a TLS ClientHello (RFC 8446 §4.1.2, RFC 6066 §3).
/// Written here because it runs on peeked bytes, before any TLS library
/// owns the connection, and only reads a few length-prefixed fields.
fn client_hello_sni(bytes: &[u8]) -> Hello {
    // Record header: type 22, version 3.x, length.
    if bytes.len() < 5 {
        return Hello::Incomplete;
    }
    if bytes[0] != 0x16 || bytes[1] != 3 {
        return Hello::NotTls;
    }
    let record_len = usize::from(u16::from_be_bytes([bytes[3], bytes[4]]));
    let Some(record) = bytes.get(5..5 + record_len) else {
        return Hello::Incomplete;
    };
    let mut r = Reader(record);
    let mut parse = || -> Option<Option<String>> {
        if r.u8()? != 1 {
            return None; // not a ClientHello
        }
        let len = r.u24()?;
        let body = r.take(len)?;
        let mut h = Reader(body);
        h.take(2 + 32)?; // legacy_version, random
        let session = usize::from(h.u8()?);
        h.take(session)?;
        let suites = h.u16()?;
        h.take(suites)?;
        let compression = usize::from(h.u8()?);
        h.take(compression)?;
        if h.0.is_empty() {
            return Some(None);
        }
        let extensions = h.u16()?;
        let mut e = Reader(h.take(extensions)?);
        while !e.0.is_empty() {
            let kind = e.u16()?;
            let len = e.u16()?;
            let data = e.take(len)?;
            if kind == 0 {
                // server_name: list length, then (type, name) entries.
                let mut s = Reader(data);
                let len = s.u16()?;
                let mut list = Reader(s.take(len)?);
                while !list.0.is_empty() {
                    let name_type = list.u8()?;
                    let len = list.u16()?;
                    let name = list.take(len)?;
                    if name_type == 0 {
                        return Some(std::str::from_utf8(name).ok().map(str::to_owned));
                    }
                }
            }
        }
        Some(None)
    };
    match parse() {
        Some(sni) => Hello::Complete(sni),
        None => Hello::NotTls,
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u16(&mut self) -> Option<usize> {
        self.take(2)
            .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
    }
    fn u24(&mut self) -> Option<usize> {
        self.take(3)
            .map(|b| usize::from(b[0]) << 16 | usize::from(b[1]) << 8 | usize::from(b[2]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_requests_and_the_h2_preface_are_recognised() {
        assert_eq!(classify(b"GET / HTTP/1.1\r\n", false), Protocol::Http1);
        assert_eq!(classify(b"OPTIONS * HTTP/1.1\r\n", false), Protocol::Http1);
        assert_eq!(classify(H2_PREFACE, false), Protocol::Http2);
        assert_eq!(classify(b"get / HTTP/1.1", false), Protocol::Opaque);
        assert_eq!(classify(b"*2\r\n$4\r\nPING\r\n", false), Protocol::Opaque);
        // Partial input waits for more only while it could still be HTTP.
        assert_eq!(classify_partial(b"PRI * HT"), None);
        assert_eq!(classify_partial(b"GE"), None);
        assert_eq!(classify_partial(b"\x00\x01"), Some(Protocol::Opaque));
    }

    #[test]
    fn the_http_version_is_told_by_the_preface() {
        assert_eq!(http_version(b"GET / HTTP/1.1\r\n"), Some(Protocol::Http1));
        // POST shares its first byte with the preface.
        assert_eq!(http_version(b"POST /"), Some(Protocol::Http1));
        assert_eq!(http_version(b"P"), None);
        assert_eq!(http_version(b""), None);
        assert_eq!(http_version(&H2_PREFACE[..10]), None);
        assert_eq!(http_version(H2_PREFACE), Some(Protocol::Http2));
    }

    #[test]
    fn a_client_hello_gives_its_sni() {
        let hello = client_hello("api.example.test");
        assert_eq!(
            classify(&hello, false),
            Protocol::Tls {
                sni: Some("api.example.test".to_string())
            }
        );
        // Cut short: undecided until the wait is over.
        assert_eq!(classify_partial(&hello[..20]), None);
        assert_eq!(classify(&hello[..20], true), Protocol::Tls { sni: None });
    }

    /// A minimal ClientHello with one extension, server_name.
    fn client_hello(name: &str) -> Vec<u8> {
        let mut sni = Vec::new();
        let entry_len = 3 + name.len();
        sni.extend_from_slice(&(entry_len as u16).to_be_bytes());
        sni.push(0);
        sni.extend_from_slice(&(name.len() as u16).to_be_bytes());
        sni.extend_from_slice(name.as_bytes());
        let mut extensions = vec![0, 0];
        extensions.extend_from_slice(&(sni.len() as u16).to_be_bytes());
        extensions.extend_from_slice(&sni);
        let mut body = vec![3, 3];
        body.extend_from_slice(&[0u8; 32]);
        body.push(0); // session id
        body.extend_from_slice(&[0, 2, 0x13, 0x01]); // one suite
        body.extend_from_slice(&[1, 0]); // null compression
        body.extend_from_slice(&(extensions.len() as u16).to_be_bytes());
        body.extend_from_slice(&extensions);
        let mut handshake = vec![1];
        let len = body.len() as u32;
        handshake.extend_from_slice(&len.to_be_bytes()[1..]);
        handshake.extend_from_slice(&body);
        let mut record = vec![0x16, 3, 1];
        record.extend_from_slice(&(handshake.len() as u16).to_be_bytes());
        record.extend_from_slice(&handshake);
        record
    }
}
