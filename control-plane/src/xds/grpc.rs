//! The ADS gRPC service as the servers mount it. Delta streams go through
//! tonic's generated service; state-of-the-world streams are framed here.
//!
//! Why by hand: a SotW response is mostly resources that every client of a
//! view is sent byte for byte. They are encoded once per snapshot
//! ([`crate::translate::Resource::encoded`]) and each stream's body hands
//! the same buffers to HTTP/2, so a push to N clients costs N small headers
//! instead of N copies of the configuration. tonic's generated server would
//! copy each response into a per-stream buffer that keeps the capacity of
//! the largest message after it is sent: about one whole configuration per
//! idle client (2.6 MiB each with 1,000 services; docs/benchmarks.md).
//! Requests are read here for the same reason: an EDS request names every
//! cluster, and its buffer is dropped once the request is decoded.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use futures::future::BoxFuture;
use http::{HeaderMap, HeaderValue};
use http_body::{Body as HttpBody, Frame};
use http_body_util::BodyExt;
use prost::Message;
use remora_xds_proto::pb::envoy::service::discovery::v3::DiscoveryRequest;
use remora_xds_proto::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::AggregatedDiscoveryServiceServer;
use tokio::sync::mpsc;
use tonic::Status;
use tonic::body::Body;
use tonic::server::NamedService;

use super::AdsServer;
use super::sotw::SotwResponse;

/// The SotW method's path.
pub const SOTW_PATH: &str =
    "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources";
/// The largest request accepted, as tonic's server is configured for
/// delta.
pub const MAX_REQUEST_BYTES: usize = 16 << 20;
/// gRPC's length-prefixed message header: a compression flag and a
/// big-endian length.
const HEADER_BYTES: usize = 5;

/// The ADS service: SotW framed here, delta by tonic.
#[derive(Clone)]
pub struct AdsService {
    server: AdsServer,
    generated: AggregatedDiscoveryServiceServer<AdsServer>,
}

impl AdsService {
    /// Serves `server`'s streams.
    pub fn new(server: AdsServer) -> AdsService {
        AdsService {
            generated: AggregatedDiscoveryServiceServer::new(server.clone())
                .max_decoding_message_size(MAX_REQUEST_BYTES),
            server,
        }
    }
}

impl NamedService for AdsService {
    const NAME: &'static str = <AggregatedDiscoveryServiceServer<AdsServer> as NamedService>::NAME;
}

impl tower::Service<http::Request<Body>> for AdsService {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<http::Response<Body>, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        if request.uri().path() != SOTW_PATH {
            return tower::Service::call(&mut self.generated, request);
        }
        let server = self.server.clone();
        Box::pin(async move { Ok(server.sotw(request)) })
    }
}

impl AdsServer {
    /// Starts a SotW stream: its task reads `request`'s messages, and the
    /// response body frames what the task sends.
    fn sotw(&self, request: http::Request<Body>) -> http::Response<Body> {
        let transport = match self.transport(request.extensions()) {
            Ok(transport) => transport,
            Err(status) => return status.into_http(),
        };
        let (tx, rx) = mpsc::channel(super::STREAM_BUFFER);
        let cx = self.stream_context();
        let machine = super::sotw::SotwStream::new(self.core(transport));
        let requests = Requests::new(request.into_body());
        tokio::spawn(cx.run(requests.into_stream(), tx, machine));
        let mut response = http::Response::new(Body::new(SotwBody {
            responses: rx,
            frames: VecDeque::new(),
            done: false,
        }));
        response.headers_mut().insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        response
    }
}

/// Length-prefixed `DiscoveryRequest`s from a request body.
struct Requests {
    body: Body,
    buf: BytesMut,
    failed: bool,
}

impl Requests {
    fn new(body: Body) -> Requests {
        Requests {
            body,
            buf: BytesMut::new(),
            failed: false,
        }
    }

    fn into_stream(self) -> impl futures::Stream<Item = Result<DiscoveryRequest, Status>> + Send {
        futures::stream::unfold(self, |mut requests| async move {
            if requests.failed {
                return None;
            }
            let next = requests.next().await?;
            requests.failed = next.is_err();
            Some((next, requests))
        })
    }

    /// The next request; None when the client closed its side.
    async fn next(&mut self) -> Option<Result<DiscoveryRequest, Status>> {
        loop {
            if let Some(message) = self.message() {
                return Some(message);
            }
            match self.body.frame().await {
                None if self.buf.is_empty() => return None,
                None => {
                    return Some(Err(Status::invalid_argument(format!(
                        "the request stream ended inside a message ({} bytes of it received)",
                        self.buf.len()
                    ))));
                }
                Some(Err(status)) => return Some(Err(status)),
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.buf.extend_from_slice(&data);
                    }
                }
            }
        }
    }

    /// A whole message from the buffer, if one is there.
    fn message(&mut self) -> Option<Result<DiscoveryRequest, Status>> {
        if self.buf.len() < HEADER_BYTES {
            return None;
        }
        if self.buf[0] != 0 {
            return Some(Err(Status::unimplemented(
                "compressed requests are not accepted: send ADS requests without grpc-encoding",
            )));
        }
        let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]) as usize;
        if len > MAX_REQUEST_BYTES {
            return Some(Err(Status::resource_exhausted(format!(
                "a request of {len} bytes is over the limit of {MAX_REQUEST_BYTES}"
            ))));
        }
        if self.buf.len() < HEADER_BYTES + len {
            self.buf.reserve(HEADER_BYTES + len - self.buf.len());
            return None;
        }
        self.buf.advance(HEADER_BYTES);
        let message = self.buf.split_to(len);
        if self.buf.is_empty() {
            // Keep no capacity between requests.
            self.buf = BytesMut::new();
        }
        Some(DiscoveryRequest::decode(message).map_err(|e| {
            Status::invalid_argument(format!("a request is not a DiscoveryRequest: {e}"))
        }))
    }
}

/// A SotW response body: each response's buffers in turn, then the gRPC
/// status in trailers.
struct SotwBody {
    responses: mpsc::Receiver<Result<SotwResponse, Status>>,
    frames: VecDeque<Bytes>,
    done: bool,
}

impl HttpBody for SotwBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        loop {
            if let Some(bytes) = self.frames.pop_front() {
                return Poll::Ready(Some(Ok(Frame::data(bytes))));
            }
            if self.done {
                return Poll::Ready(None);
            }
            let status = match std::task::ready!(self.responses.poll_recv(cx)) {
                Some(Ok(response)) => {
                    self.frames.extend(response.into_grpc_frames());
                    continue;
                }
                Some(Err(status)) => status,
                None => Status::ok(""),
            };
            self.done = true;
            let mut trailers = HeaderMap::new();
            if let Err(e) = status.add_header(&mut trailers) {
                tracing::warn!("the status of an ADS stream cannot be sent: {e}");
            }
            return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done && self.frames.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;
    use http_body_util::StreamBody;

    fn framed(request: &DiscoveryRequest) -> Vec<u8> {
        let message = request.encode_to_vec();
        let mut wire = vec![0];
        wire.extend_from_slice(&u32::try_from(message.len()).expect("small").to_be_bytes());
        wire.extend_from_slice(&message);
        wire
    }

    /// A request body delivering `wire` in chunks of `chunk` bytes.
    fn body(wire: Vec<u8>, chunk: usize) -> Body {
        let frames: Vec<Result<Frame<Bytes>, Status>> = wire
            .chunks(chunk)
            .map(|c| Ok(Frame::data(Bytes::copy_from_slice(c))))
            .collect();
        Body::new(StreamBody::new(futures::stream::iter(frames)))
    }

    fn request(names: &[&str]) -> DiscoveryRequest {
        DiscoveryRequest {
            type_url: "t".into(),
            resource_names: names.iter().map(|n| n.to_string()).collect(),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn requests_split_anywhere_decode_in_order() {
        let (a, b) = (request(&["x"]), request(&["y", "z"]));
        let mut wire = framed(&a);
        wire.extend(framed(&b));
        for chunk in [1, 3, 5, 7, wire.len()] {
            let got: Vec<_> = Requests::new(body(wire.clone(), chunk))
                .into_stream()
                .collect()
                .await;
            let got: Vec<DiscoveryRequest> = got.into_iter().map(|r| r.expect("decodes")).collect();
            assert_eq!(got, [a.clone(), b.clone()], "chunks of {chunk}");
        }
    }

    #[tokio::test]
    async fn bad_requests_end_the_stream_with_a_status_that_says_why() {
        let cases: [(Vec<u8>, tonic::Code, &str); 4] = [
            (
                {
                    let mut w = framed(&request(&["x"]));
                    w[0] = 1;
                    w
                },
                tonic::Code::Unimplemented,
                "compressed",
            ),
            (
                vec![0, 0xff, 0xff, 0xff, 0xff],
                tonic::Code::ResourceExhausted,
                "over the limit",
            ),
            (
                framed(&request(&["x"]))[..8].to_vec(),
                tonic::Code::InvalidArgument,
                "ended inside a message",
            ),
            (
                vec![0, 0, 0, 0, 2, 0xff, 0xff],
                tonic::Code::InvalidArgument,
                "not a DiscoveryRequest",
            ),
        ];
        for (wire, code, message) in cases {
            let got: Vec<_> = Requests::new(body(wire, 3)).into_stream().collect().await;
            let [Err(status)] = got.as_slice() else {
                panic!("one error for {message:?}: {got:?}");
            };
            assert_eq!(status.code(), code, "{status:?}");
            assert!(status.message().contains(message), "{status:?}");
        }
    }
}
