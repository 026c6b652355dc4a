//! HTTP/1.1 to endpoints: our own client side of the protocol.
//!
//! Why not hyper's client connection: memory per connection. HTTP/1.1
//! needs a connection per request in flight, so a sidecar whose
//! application speaks HTTP/1.1 keeps as many connections to it as the
//! requests it carries at once (128 in the HTTP/2 benchmark). heaptrack
//! put hyper's client connection at about 44 KiB each under that load:
//! an 8 KiB read buffer, a second one whenever the previous response's
//! headers or body still pointed into the first, an 8 KiB write buffer,
//! 8.5 KiB of dispatch channel and a task of its own. Here a connection is
//! its socket, a 4 KiB read buffer and a small write buffer, and the
//! request using it drives it (no task, no channel): a response's head and
//! small body are copied out of the read buffer, so the buffer is reused,
//! and large bodies are read into buffers of their own. An idle connection
//! is checked for a close by the server when it is taken from the pool.
//!
//! Upgrades (WebSocket) still go through hyper (`super::send_upgrade`): a
//! connection of their own, no pooling.
//!
//! Message framing follows RFC 9112 section 6: the response to HEAD, and
//! 1xx, 204 and 304 responses have no body; `Transfer-Encoding` ending in
//! `chunked` is chunked, any other transfer coding reads to the close;
//! then `Content-Length`; else the body ends with the connection.

use std::future::poll_fn;
use std::io::{self, IoSlice, Write as _};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::header::{CONNECTION, CONTENT_LENGTH, TRANSFER_ENCODING};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Version};
use http_body::{Body as HttpBody, Frame, SizeHint};
use tokio::io::AsyncWrite;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_util::either::Either;
use tokio_util::io::poll_read_buf;

use super::{Body, BoxError, PoolInner};

/// The read buffer a connection starts with: a typical response head and
/// small body in one read. It grows for larger heads.
const READ_BUF: usize = 4 << 10;
/// A read buffer grown past this is replaced when its connection goes
/// back to the pool, so one large head does not stay with it.
const KEEP_READ_BUF: usize = 16 << 10;
/// The largest response head (or trailer section) accepted; Envoy's
/// default limit for headers is 60 KiB.
const MAX_HEAD: usize = 64 << 10;
/// Header fields accepted in a response head (hyper's default).
const MAX_HEADERS: usize = 100;
/// Body bytes already in the read buffer up to this size are copied out,
/// so the buffer is not shared with the body and can be reused.
const COPY_OUT: usize = 4 << 10;
/// The most read into a body buffer of its own at once.
const BODY_READ: usize = 64 << 10;
/// A body buffer with less room left than this is replaced.
const BODY_READ_MIN: usize = 4 << 10;
/// A write buffer grown past this (a large request head) is not kept.
const KEEP_WRITE_BUF: usize = 8 << 10;

/// A connection to an endpoint: plaintext (the local application, or an
/// endpoint without a sidecar), or mTLS to a sidecar (boxed: the session is
/// large, the plaintext case common).
pub(super) type Io = Either<TcpStream, Box<TlsStream<TcpStream>>>;

/// An HTTP/1.1 connection between exchanges: idle in the pool, or
/// carrying one request and its response.
pub(super) struct Connection {
    io: Io,
    /// Bytes read and not yet consumed.
    read: BytesMut,
    /// Room for a large body's next reads; empty between exchanges.
    body_read: BytesMut,
    /// The request head and chunk framing being written.
    write: Vec<u8>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("buffered", &self.read.len())
            .finish_non_exhaustive()
    }
}

/// Why an exchange failed.
#[derive(Debug)]
pub(super) enum Failure {
    /// A kept-alive connection the server had already closed: nothing of
    /// the request was processed (its head could not be written, or the
    /// connection closed before any response to a request that is
    /// idempotent and has no body, RFC 9112 section 9.3.1.1). The request
    /// is handed back to be sent on another connection.
    Stale(Box<Request<Body>>),
    /// The exchange failed; the connection is closed.
    Error(Error),
}

/// What went wrong on a connection.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading or writing the connection failed.
    #[error("{0}")]
    Io(#[from] io::Error),
    /// The server closed the connection before the response ended.
    #[error("connection closed before the response {0} ended")]
    Closed(&'static str),
    /// The response is not valid HTTP/1.1.
    #[error("invalid response: {0}")]
    Invalid(String),
    /// The response head or trailers exceed [`MAX_HEAD`].
    #[error("response head larger than {MAX_HEAD} bytes")]
    HeadTooLarge,
    /// The request body failed (the caller went away, or its stream broke).
    #[error("request body: {0}")]
    RequestBody(BoxError),
    /// The request body did not match its `Content-Length`.
    #[error("request body of {sent} bytes, content-length {declared}")]
    RequestLength {
        /// Bytes the body had.
        sent: u64,
        /// Bytes announced.
        declared: u64,
    },
}

impl Connection {
    /// A connection over `io`, before its first exchange.
    pub(super) fn new(io: Io) -> Connection {
        Connection {
            io,
            read: BytesMut::with_capacity(READ_BUF),
            body_read: BytesMut::new(),
            write: Vec::new(),
        }
    }

    /// False if the server closed the idle connection (or sent something
    /// unasked). Costs no system call while the socket has not become
    /// readable: tokio knows its readiness from the last poll of events.
    pub(super) fn is_open(&mut self) -> bool {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        // Ready means the end of the stream, data nobody asked for (a 408
        // before the close), or an error: not usable.
        poll_read_buf(Pin::new(&mut self.io), &mut cx, &mut self.read).is_pending()
    }

    /// Reads more into the read buffer: the number of bytes, 0 at the end
    /// of the stream.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.read.capacity() - self.read.len() < 1024 {
            self.read.reserve(self.read.len().max(READ_BUF));
        }
        poll_read_buf(Pin::new(&mut self.io), cx, &mut self.read)
    }

    /// Reads up to `max` body bytes: what is buffered, else a read into a
    /// body buffer. Empty at the end of the stream.
    fn poll_body(&mut self, cx: &mut Context<'_>, max: u64) -> Poll<io::Result<Bytes>> {
        let max = usize::try_from(max).unwrap_or(usize::MAX);
        if !self.read.is_empty() {
            let n = self.read.len().min(max);
            if n <= COPY_OUT {
                let data = Bytes::copy_from_slice(&self.read[..n]);
                self.read.advance(n);
                return Poll::Ready(Ok(data));
            }
            // A large part of a body came with the head: hand it over
            // without a copy, and read on into a fresh buffer.
            let data = self.read.split_to(n).freeze();
            if self.read.is_empty() {
                self.read = BytesMut::with_capacity(READ_BUF);
            }
            return Poll::Ready(Ok(data));
        }
        let want = max.min(BODY_READ);
        if self.body_read.capacity() < want.min(BODY_READ_MIN) {
            self.body_read = BytesMut::with_capacity(BODY_READ);
        }
        let room = self.body_read.capacity().min(want);
        ready!(poll_read_buf(
            Pin::new(&mut self.io),
            cx,
            &mut (&mut self.body_read).limit(room)
        ))?;
        Poll::Ready(Ok(self.body_read.split().freeze()))
    }

    /// Ready for the pool: buffers of a large exchange dropped.
    fn reset(&mut self) {
        self.body_read = BytesMut::new();
        if self.read.capacity() > KEEP_READ_BUF && self.read.is_empty() {
            self.read = BytesMut::with_capacity(READ_BUF);
        }
        self.write.clear();
        if self.write.capacity() > KEEP_WRITE_BUF {
            self.write = Vec::new();
        }
    }
}

/// Sends `request` on `conn` and returns the response once its head is
/// read; the body reads on from the connection, which goes back to
/// `pool` when the body has ended (if both sides keep it alive).
pub(super) async fn send(
    mut conn: Connection,
    request: Request<Body>,
    reused: bool,
    pool: &Arc<PoolInner>,
) -> Result<Response<ResponseBody>, Failure> {
    let (parts, body) = request.into_parts();
    let no_body = body.is_end_stream();
    let framing = match encode_head(&parts, &body, &mut conn.write) {
        Ok(framing) => framing,
        Err(e) => return Err(Failure::Error(e)),
    };
    let mut writer = Writer {
        prefix: std::mem::take(&mut conn.write),
        written: 0,
        data: Bytes::new(),
        body,
        framing,
        sent: 0,
        open_chunk: false,
        started: false,
        done: no_body,
    };
    let is_head = parts.method == Method::HEAD;
    let mut sending = Sending::Writing;
    let mut received = false;

    // The request body is written while the response is awaited: a server
    // may answer before reading all of it.
    let head = poll_fn(|cx| {
        if let Sending::Writing = sending {
            match writer.poll_write(cx, &mut conn.io) {
                Poll::Ready(Ok(())) => sending = Sending::Done,
                // The server may have answered and closed: read the
                // answer, if any, before reporting the error.
                Poll::Ready(Err(WriteError::Io(e))) => {
                    sending = Sending::Failed(e, !writer.started);
                }
                // Our side of the request broke: the server would wait
                // for the rest forever.
                Poll::Ready(Err(WriteError::Request(e))) => return Poll::Ready(Err(e)),
                Poll::Pending => {}
            }
        }
        loop {
            match parse_head(&mut conn.read) {
                Ok(Some(head)) => return Poll::Ready(Ok(head)),
                Ok(None) => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
            if conn.read.len() >= MAX_HEAD {
                return Poll::Ready(Err(Error::HeadTooLarge));
            }
            match ready!(conn.poll_fill(cx)) {
                Ok(0) => return Poll::Ready(Err(Error::Closed("head"))),
                Ok(_) => received = true,
                Err(e) => return Poll::Ready(Err(Error::Io(e))),
            }
        }
    })
    .await;

    let head = match head {
        Ok(head) => head,
        Err(e) => {
            // Nothing came back on a connection that had idled: if the
            // request cannot have been acted on, send it elsewhere.
            let unsent = matches!(sending, Sending::Failed(_, true));
            let safe = unsent || (no_body && is_idempotent(&parts.method));
            if reused && !received && safe && !matches!(e, Error::RequestBody(_)) {
                return Err(Failure::Stale(Box::new(Request::from_parts(
                    parts,
                    crate::errors::empty(),
                ))));
            }
            return Err(Failure::Error(match sending {
                Sending::Failed(e, _) if !received => Error::Io(e),
                _ => e,
            }));
        }
    };

    let status = head.status;
    let mut keep_alive = matches!(sending, Sending::Done) && head.keep_alive;
    if keep_alive {
        conn.write = std::mem::take(&mut writer.prefix);
    }
    let framing = if is_head
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        Framing::Length(0)
    } else if let Some(te) = head.headers.get(TRANSFER_ENCODING) {
        // With a Content-Length as well the message is suspect (RFC 9112
        // section 6.3): read it, but do not reuse the connection.
        keep_alive &= !head.headers.contains_key(CONTENT_LENGTH);
        if last_coding_is_chunked(te) {
            Framing::Chunked(Chunk::Size)
        } else {
            keep_alive = false;
            Framing::Eof
        }
    } else {
        match content_length(&head.headers) {
            Ok(Some(n)) => Framing::Length(n),
            Ok(None) => {
                keep_alive = false;
                Framing::Eof
            }
            Err(e) => return Err(Failure::Error(e)),
        }
    };
    // An early answer left the request body unsent: the connection is
    // done, and dropping the writer lets the caller's body be drained.
    drop(writer);

    let mut response = Response::new(ResponseBody {
        conn: Some(conn),
        framing,
        pool: keep_alive.then(|| Arc::clone(pool)),
    });
    *response.status_mut() = status;
    *response.version_mut() = Version::HTTP_11;
    *response.headers_mut() = head.headers;
    response.body_mut().finish_if_empty();
    Ok(response)
}

/// How far the request has been written.
enum Sending {
    Writing,
    Done,
    /// Writing failed; true if nothing of the request was written.
    Failed(io::Error, bool),
}

/// Why writing the request stopped.
enum WriteError {
    /// The connection.
    Io(io::Error),
    /// The request itself (its body failed or broke its length).
    Request(Error),
}

/// RFC 9110 section 9.2.2.
fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

// === The request ===

/// How the request body is framed.
#[derive(Debug, Clone, Copy)]
enum ReqFraming {
    Length(u64),
    Chunked,
}

/// Writes the request line and header fields into `out`, adding the
/// framing header the body needs (the caller's own `Content-Length` is
/// kept; `Transfer-Encoding` is a hop-by-hop header, already removed).
fn encode_head(
    parts: &http::request::Parts,
    body: &Body,
    out: &mut Vec<u8>,
) -> Result<ReqFraming, Error> {
    out.clear();
    let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    out.extend_from_slice(parts.method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    write_fields(
        out,
        parts
            .headers
            .iter()
            .filter(|(name, _)| *name != TRANSFER_ENCODING),
    );
    let framing = match content_length(&parts.headers) {
        Ok(Some(n)) => ReqFraming::Length(n),
        Err(_) => {
            return Err(Error::RequestBody(
                "invalid content-length in the request".into(),
            ));
        }
        Ok(None) if body.is_end_stream() => {
            // RFC 9110 section 8.6: methods that define a meaning for
            // content say when there is none (nginx answers 411 otherwise).
            if matches!(parts.method, Method::POST | Method::PUT | Method::PATCH) {
                out.extend_from_slice(b"content-length: 0\r\n");
            }
            ReqFraming::Length(0)
        }
        Ok(None) => match body.size_hint().exact() {
            Some(n) => {
                // Infallible: writing to a Vec.
                let _ = write!(out, "content-length: {n}\r\n");
                ReqFraming::Length(n)
            }
            None => {
                out.extend_from_slice(b"transfer-encoding: chunked\r\n");
                ReqFraming::Chunked
            }
        },
    };
    out.extend_from_slice(b"\r\n");
    Ok(framing)
}

/// Writes header (or trailer) fields, one `name: value` line each.
fn write_fields<'a>(
    out: &mut Vec<u8>,
    fields: impl IntoIterator<Item = (&'a HeaderName, &'a HeaderValue)>,
) {
    for (name, value) in fields {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
}

/// Writes the request head, then the body as it arrives.
struct Writer {
    /// The head, then chunk framing; written before `data`.
    prefix: Vec<u8>,
    written: usize,
    data: Bytes,
    body: Body,
    framing: ReqFraming,
    /// Body bytes taken so far.
    sent: u64,
    /// A chunk's data was queued and its closing CRLF was not.
    open_chunk: bool,
    /// Some of the request has been written.
    started: bool,
    /// The body has ended (its end is in `prefix` if chunked).
    done: bool,
}

impl Writer {
    /// Ready when everything is written and flushed.
    fn poll_write(&mut self, cx: &mut Context<'_>, io: &mut Io) -> Poll<Result<(), WriteError>> {
        loop {
            // Take the next frame first, so a body that is already there
            // goes out with the head in one write.
            if self.data.is_empty() && !self.done {
                match Pin::new(&mut self.body).poll_frame(cx) {
                    Poll::Ready(Some(Ok(frame))) => {
                        self.take(frame).map_err(WriteError::Request)?;
                    }
                    Poll::Ready(Some(Err(e))) => {
                        return Poll::Ready(Err(WriteError::Request(Error::RequestBody(e))));
                    }
                    Poll::Ready(None) => self.end().map_err(WriteError::Request)?,
                    Poll::Pending if self.written == self.prefix.len() => {
                        ready!(Pin::new(&mut *io).poll_flush(cx)).map_err(WriteError::Io)?;
                        return Poll::Pending;
                    }
                    Poll::Pending => {}
                }
            }
            if self.written < self.prefix.len() || !self.data.is_empty() {
                let slices = [
                    IoSlice::new(&self.prefix[self.written..]),
                    IoSlice::new(&self.data),
                ];
                let n = ready!(Pin::new(&mut *io).poll_write_vectored(cx, &slices))
                    .map_err(WriteError::Io)?;
                if n == 0 {
                    return Poll::Ready(Err(WriteError::Io(io::ErrorKind::WriteZero.into())));
                }
                self.started = true;
                let from_prefix = n.min(self.prefix.len() - self.written);
                self.written += from_prefix;
                self.data.advance(n - from_prefix);
                continue;
            }
            self.prefix.clear();
            self.written = 0;
            if self.done {
                return Pin::new(&mut *io).poll_flush(cx).map_err(WriteError::Io);
            }
        }
    }

    /// Queues a frame of the body.
    fn take(&mut self, frame: Frame<Bytes>) -> Result<(), Error> {
        let data = match frame.into_data() {
            Ok(data) => data,
            Err(frame) => {
                // Trailers: sent in a chunked body, dropped otherwise
                // (HTTP/1.1 has nowhere else to put them).
                if let (Ok(trailers), ReqFraming::Chunked) = (frame.into_trailers(), self.framing) {
                    self.close_chunk();
                    self.prefix.extend_from_slice(b"0\r\n");
                    write_fields(&mut self.prefix, &trailers);
                    self.prefix.extend_from_slice(b"\r\n");
                    self.done = true;
                }
                return Ok(());
            }
        };
        if data.is_empty() {
            return Ok(());
        }
        let len = data.len() as u64;
        match self.framing {
            ReqFraming::Length(declared) => {
                if self.sent + len > declared {
                    return Err(Error::RequestLength {
                        sent: self.sent + len,
                        declared,
                    });
                }
            }
            ReqFraming::Chunked => {
                self.close_chunk();
                let _ = write!(self.prefix, "{len:X}\r\n");
                self.open_chunk = true;
            }
        }
        self.sent += len;
        self.data = data;
        Ok(())
    }

    /// Queues the end of the body.
    fn end(&mut self) -> Result<(), Error> {
        self.done = true;
        match self.framing {
            ReqFraming::Length(declared) if self.sent != declared => Err(Error::RequestLength {
                sent: self.sent,
                declared,
            }),
            ReqFraming::Length(_) => Ok(()),
            ReqFraming::Chunked => {
                self.close_chunk();
                self.prefix.extend_from_slice(b"0\r\n\r\n");
                Ok(())
            }
        }
    }

    /// Ends the previous chunk's data, if there was one.
    fn close_chunk(&mut self) {
        if self.open_chunk {
            self.prefix.extend_from_slice(b"\r\n");
            self.open_chunk = false;
        }
    }
}

// === The response ===

struct Head {
    status: StatusCode,
    headers: HeaderMap,
    keep_alive: bool,
}

/// Parses a response head at the start of `buf` and consumes it; 1xx
/// responses before it (100 Continue, 103 Early Hints) are skipped, as
/// the caller's HTTP/1.1 or HTTP/2 connection has no use for them here.
/// `None` until the head is complete.
fn parse_head(buf: &mut BytesMut) -> Result<Option<Head>, Error> {
    loop {
        let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut response = httparse::Response::new(&mut fields);
        let len = match response.parse(buf) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(e) => return Err(Error::Invalid(e.to_string())),
        };
        let code = response.code.unwrap_or(0);
        let status =
            StatusCode::from_u16(code).map_err(|_| Error::Invalid(format!("status {code}")))?;
        if status == StatusCode::SWITCHING_PROTOCOLS {
            return Err(Error::Invalid(
                "101 to a request that asked for no upgrade".into(),
            ));
        }
        if status.is_informational() {
            buf.advance(len);
            continue;
        }
        let http10 = response.version == Some(0);
        // Field values are slices of one copy of the head, not of the
        // read buffer, which then stays free for the next response.
        let copy = Bytes::copy_from_slice(&buf[..len]);
        let base = buf.as_ptr() as usize;
        let mut headers = HeaderMap::with_capacity(response.headers.len());
        for field in response.headers.iter() {
            let name = HeaderName::from_bytes(field.name.as_bytes())
                .map_err(|_| Error::Invalid(format!("header name {:?}", field.name)))?;
            let start = field.value.as_ptr() as usize - base;
            let value =
                HeaderValue::from_maybe_shared(copy.slice(start..start + field.value.len()))
                    .map_err(|_| Error::Invalid(format!("value of header {name}")))?;
            headers.append(name, value);
        }
        buf.advance(len);
        let keep_alive = if http10 {
            has_token(&headers, "keep-alive")
        } else {
            !has_token(&headers, "close")
        };
        return Ok(Some(Head {
            status,
            headers,
            keep_alive,
        }));
    }
}

/// True if a `Connection` field lists `token`.
fn has_token(headers: &HeaderMap, token: &str) -> bool {
    headers.get_all(CONNECTION).iter().any(|v| {
        v.as_bytes()
            .split(|b| *b == b',')
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
    })
}

fn last_coding_is_chunked(te: &HeaderValue) -> bool {
    te.as_bytes()
        .rsplit(|b| *b == b',')
        .next()
        .is_some_and(|c| c.trim_ascii().eq_ignore_ascii_case(b"chunked"))
}

/// The `Content-Length`: every value (and list element) must agree.
fn content_length(headers: &HeaderMap) -> Result<Option<u64>, Error> {
    let mut found = None;
    for value in headers.get_all(CONTENT_LENGTH) {
        for part in value.as_bytes().split(|b| *b == b',') {
            let part = part.trim_ascii();
            let n = std::str::from_utf8(part)
                .ok()
                .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|s| s.parse::<u64>().ok())
                .ok_or_else(|| Error::Invalid("content-length is not a number".into()))?;
            if found.is_some_and(|f| f != n) {
                return Err(Error::Invalid("conflicting content-length values".into()));
            }
            found = Some(n);
        }
    }
    Ok(found)
}

/// How the response body is framed, and how far it has been read.
#[derive(Debug)]
enum Framing {
    /// Bytes still to come.
    Length(u64),
    Chunked(Chunk),
    /// Until the server closes the connection.
    Eof,
}

#[derive(Debug)]
enum Chunk {
    /// Expecting a chunk-size line.
    Size,
    /// Bytes left in the current chunk.
    Data(u64),
    /// Expecting the CRLF after a chunk's data.
    DataEnd,
    /// Expecting the trailer section (after the last, empty chunk).
    Trailers,
}

/// A response body read from its connection.
#[derive(Debug)]
pub struct ResponseBody {
    /// `None` once the body has ended.
    conn: Option<Connection>,
    framing: Framing,
    /// Where the connection goes when the body ends; `None` if it is not
    /// reusable.
    pool: Option<Arc<PoolInner>>,
}

impl ResponseBody {
    fn finish_if_empty(&mut self) {
        if matches!(self.framing, Framing::Length(0)) {
            self.finish();
        }
    }

    /// The body ended with the connection, or failed (the server closed
    /// early, or broke the framing): the connection is closed.
    fn close(&mut self) {
        self.conn = None;
        self.framing = Framing::Length(0);
    }

    /// The body has ended: the connection goes back to the pool, or is
    /// closed.
    fn finish(&mut self) {
        self.framing = Framing::Length(0);
        if let (Some(mut conn), Some(pool)) = (self.conn.take(), self.pool.take())
            // Bytes after the response: the server broke the framing.
            && conn.read.is_empty()
        {
            conn.reset();
            pool.recycle_h1(conn);
        }
    }
}

/// What the next step of a chunked body gave.
enum Step {
    Data(Bytes),
    /// The body ended, with or without trailers.
    End(Option<HeaderMap>),
}

/// Reads a chunked body on: the next data, or its end.
fn poll_chunked(
    conn: &mut Connection,
    state: &mut Chunk,
    cx: &mut Context<'_>,
) -> Poll<Result<Step, Error>> {
    loop {
        match state {
            Chunk::Size => {
                let Some(eol) = conn.read.iter().position(|b| *b == b'\n') else {
                    if conn.read.len() > 1024 {
                        return Poll::Ready(Err(Error::Invalid("chunk size line too long".into())));
                    }
                    if ready!(conn.poll_fill(cx))? == 0 {
                        return Poll::Ready(Err(Error::Closed("body")));
                    }
                    continue;
                };
                let size = chunk_size(&conn.read[..eol])?;
                conn.read.advance(eol + 1);
                *state = if size == 0 {
                    Chunk::Trailers
                } else {
                    Chunk::Data(size)
                };
            }
            Chunk::Data(left) => {
                let data = ready!(conn.poll_body(cx, *left))?;
                if data.is_empty() {
                    return Poll::Ready(Err(Error::Closed("body")));
                }
                *left -= data.len() as u64;
                if *left == 0 {
                    *state = Chunk::DataEnd;
                }
                return Poll::Ready(Ok(Step::Data(data)));
            }
            Chunk::DataEnd => {
                if conn.read.len() < 2 {
                    if ready!(conn.poll_fill(cx))? == 0 {
                        return Poll::Ready(Err(Error::Closed("body")));
                    }
                    continue;
                }
                if &conn.read[..2] != b"\r\n" {
                    return Poll::Ready(Err(Error::Invalid(
                        "chunk data not followed by CRLF".into(),
                    )));
                }
                conn.read.advance(2);
                *state = Chunk::Size;
            }
            Chunk::Trailers => {
                if conn.read.starts_with(b"\r\n") {
                    conn.read.advance(2);
                    return Poll::Ready(Ok(Step::End(None)));
                }
                let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
                match httparse::parse_headers(&conn.read, &mut fields) {
                    Ok(httparse::Status::Complete((len, fields))) => {
                        let mut trailers = HeaderMap::with_capacity(fields.len());
                        for field in fields.iter() {
                            if let (Ok(name), Ok(value)) = (
                                HeaderName::from_bytes(field.name.as_bytes()),
                                HeaderValue::from_bytes(field.value),
                            ) {
                                trailers.append(name, value);
                            }
                        }
                        conn.read.advance(len);
                        return Poll::Ready(Ok(Step::End(Some(trailers))));
                    }
                    Ok(httparse::Status::Partial) => {
                        if conn.read.len() >= MAX_HEAD {
                            return Poll::Ready(Err(Error::HeadTooLarge));
                        }
                        if ready!(conn.poll_fill(cx))? == 0 {
                            return Poll::Ready(Err(Error::Closed("trailers")));
                        }
                    }
                    Err(e) => return Poll::Ready(Err(Error::Invalid(format!("trailers: {e}")))),
                }
            }
        }
    }
}

/// The size in a chunk-size line (hex digits, then optional extensions).
fn chunk_size(line: &[u8]) -> Result<u64, Error> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let digits = line
        .split(|b| *b == b';')
        .next()
        .unwrap_or_default()
        .trim_ascii();
    if digits.is_empty() || digits.len() > 16 || !digits.iter().all(u8::is_ascii_hexdigit) {
        return Err(Error::Invalid("bad chunk size".into()));
    }
    let digits =
        std::str::from_utf8(digits).map_err(|_| Error::Invalid("bad chunk size".into()))?;
    u64::from_str_radix(digits, 16).map_err(|_| Error::Invalid("bad chunk size".into()))
}

impl HttpBody for ResponseBody {
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        let this = self.get_mut();
        match this.framing {
            Framing::Length(0) => Poll::Ready(None),
            Framing::Length(left) => {
                let Some(conn) = this.conn.as_mut() else {
                    return Poll::Ready(None);
                };
                let data = ready!(conn.poll_body(cx, left))?;
                if data.is_empty() {
                    this.close();
                    return Poll::Ready(Some(Err(Error::Closed("body"))));
                }
                let left = left - data.len() as u64;
                this.framing = Framing::Length(left);
                if left == 0 {
                    this.finish();
                }
                Poll::Ready(Some(Ok(Frame::data(data))))
            }
            Framing::Eof => {
                let Some(conn) = this.conn.as_mut() else {
                    return Poll::Ready(None);
                };
                let data = ready!(conn.poll_body(cx, u64::MAX))?;
                if data.is_empty() {
                    this.close();
                    return Poll::Ready(None);
                }
                Poll::Ready(Some(Ok(Frame::data(data))))
            }
            Framing::Chunked(ref mut state) => {
                let Some(conn) = this.conn.as_mut() else {
                    return Poll::Ready(None);
                };
                match ready!(poll_chunked(conn, state, cx)) {
                    Ok(Step::Data(data)) => Poll::Ready(Some(Ok(Frame::data(data)))),
                    Ok(Step::End(trailers)) => {
                        this.finish();
                        Poll::Ready(trailers.map(|t| Ok(Frame::trailers(t))))
                    }
                    Err(e) => {
                        this.close();
                        Poll::Ready(Some(Err(e)))
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.framing, Framing::Length(0))
    }

    fn size_hint(&self) -> SizeHint {
        match self.framing {
            Framing::Length(n) => SizeHint::with_exact(n),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_head_is_parsed_and_the_buffer_keeps_what_follows() {
        let mut buf = BytesMut::from(
            &b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-A: b\r\n\r\nhi"[..],
        );
        let head = parse_head(&mut buf).ok().flatten().expect("complete head");
        assert_eq!(head.status, StatusCode::OK);
        assert_eq!(head.headers["x-a"], "b");
        assert!(head.keep_alive);
        assert_eq!(&buf[..], b"hi");
    }

    #[test]
    fn a_partial_head_waits_and_a_bad_one_is_refused() {
        let mut buf = BytesMut::from(&b"HTTP/1.1 200 OK\r\nContent-Le"[..]);
        assert!(matches!(parse_head(&mut buf), Ok(None)));
        let mut buf = BytesMut::from(&b"HTTP/1.1 2x0 OK\r\n\r\n"[..]);
        assert!(matches!(parse_head(&mut buf), Err(Error::Invalid(_))));
    }

    fn keeps_alive(head: &[u8]) -> bool {
        let mut buf = BytesMut::from(head);
        parse_head(&mut buf)
            .ok()
            .flatten()
            .expect("a complete head")
            .keep_alive
    }

    #[test]
    fn connection_close_and_http10_are_not_kept_alive() {
        assert!(!keeps_alive(
            b"HTTP/1.1 200 OK\r\nConnection: Close\r\n\r\n"
        ));
        assert!(!keeps_alive(b"HTTP/1.0 200 OK\r\n\r\n"));
        assert!(keeps_alive(
            b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\n\r\n"
        ));
        assert!(keeps_alive(b"HTTP/1.1 200 OK\r\n\r\n"));
    }

    #[test]
    fn content_lengths_must_agree() {
        let mut h = HeaderMap::new();
        h.append(CONTENT_LENGTH, HeaderValue::from_static("5, 5"));
        assert!(matches!(content_length(&h), Ok(Some(5))));
        h.append(CONTENT_LENGTH, HeaderValue::from_static("6"));
        assert!(content_length(&h).is_err());
        let mut h = HeaderMap::new();
        h.insert(CONTENT_LENGTH, HeaderValue::from_static("+5"));
        assert!(content_length(&h).is_err());
    }

    #[test]
    fn chunk_sizes_are_hex_with_optional_extensions() {
        assert!(matches!(chunk_size(b"1A\r"), Ok(26)));
        assert!(matches!(chunk_size(b"ff;name=value\r"), Ok(255)));
        assert!(chunk_size(b"\r").is_err());
        assert!(chunk_size(b"-1\r").is_err());
        assert!(chunk_size(b"11111111111111111\r").is_err());
    }
}
