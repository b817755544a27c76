//! Per-RPC observation, as the outermost tower layer: one `rpc` tracing
//! span per call (method, principal, key id, code — never payloads), a
//! completion event, and the call's code and latency in the metrics.
//!
//! A gRPC call's code arrives in the response headers (trailers-only
//! responses: errors) or in the trailers after the last message, so the
//! response body is wrapped and the call is finished when its trailers
//! pass, when the body ends without them, or when it is dropped early (the
//! client went away: CANCELLED).
//!
//! Who called and which key the call used are noted as the call runs
//! ([`note_principal`], [`note_key_id`]) and written into the span with the
//! code when the completion event is written. A successful call's event is
//! at DEBUG, so at the default level a successful Encrypt formats no span
//! field at all (writing a field into a span formats it at once, about a
//! microsecond each). Handlers that log events of their own first call
//! [`write_notes`], so those events carry the principal and key too.

use std::{
    collections::HashMap,
    pin::Pin,
    sync::{Arc, Mutex, OnceLock, PoisonError},
    task::{Context, Poll},
    time::Instant,
};

use bytes::Bytes;
use http_body::{Body, Frame};
use prost::Message as _;
use tower::{Layer, Service};
use tracing::{field::Empty, Instrument as _, Level, Span};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{
        counter::Counter,
        family::Family,
        histogram::{exponential_buckets, Histogram},
    },
    registry::Registry,
};

use crate::service::foreground::ForegroundLatency;

use super::{
    proto::FILE_DESCRIPTOR_SET,
    status::{code_label, INTERNAL_MESSAGE},
};

/// A gRPC method this server knows, with the names metrics label it by.
/// Paths outside the descriptors are all `unknown`, so a caller cannot
/// grow the metrics' label sets.
#[derive(Debug, Clone, Copy)]
pub struct Method {
    pub service: &'static str,
    pub name: &'static str,
}

const UNKNOWN: Method = Method {
    service: "unknown",
    name: "unknown",
};

/// Every method of every service keyward serves, by request path.
fn known_methods() -> &'static HashMap<String, Method> {
    static METHODS: OnceLock<HashMap<String, Method>> = OnceLock::new();
    METHODS.get_or_init(|| {
        let mut methods = HashMap::new();
        for set in [
            FILE_DESCRIPTOR_SET,
            tonic_health::pb::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
        ] {
            let Ok(set) = prost_types::FileDescriptorSet::decode(set) else {
                continue;
            };
            for file in set.file {
                for service in &file.service {
                    let full = format!("{}.{}", file.package(), service.name());
                    // Built once per process: the names live as long as it.
                    let service_name: &'static str = Box::leak(full.clone().into_boxed_str());
                    for method in &service.method {
                        let name: &'static str =
                            Box::leak(method.name().to_owned().into_boxed_str());
                        methods.insert(
                            format!("/{full}/{name}"),
                            Method {
                                service: service_name,
                                name,
                            },
                        );
                    }
                }
            }
        }
        methods
    })
}

/// The method a request path names, or `unknown`.
pub fn method_of(path: &str) -> Method {
    known_methods().get(path).copied().unwrap_or(UNKNOWN)
}

/// What the code handling a call noted about it, for its span.
#[derive(Debug, Default)]
struct Notes {
    principal: Option<String>,
    key_id: Option<String>,
    /// Already written into the span ([`write_notes`]).
    written: bool,
}

type SharedNotes = Arc<Mutex<Notes>>;

tokio::task_local! {
    /// The notes of the call the current task is serving.
    static NOTES: SharedNotes;
}

fn lock(notes: &SharedNotes) -> std::sync::MutexGuard<'_, Notes> {
    // Plain data, and nothing under the lock can panic midway.
    notes.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Notes the key (or keys, joined by `,`) a call used. Outside an observed
/// call it is written into the current span at once.
pub fn note_key_id(key_id: &str) {
    note(key_id, |notes| &mut notes.key_id, "key_id");
}

/// Notes the authenticated principal of a call.
pub fn note_principal(name: &str) {
    note(name, |notes| &mut notes.principal, "principal");
}

fn note(value: &str, slot: fn(&mut Notes) -> &mut Option<String>, field: &'static str) {
    let written = NOTES.try_with(|notes| {
        let mut notes = lock(notes);
        *slot(&mut notes) = Some(value.to_owned());
        notes.written
    });
    // Outside an observed call, or its notes are written already.
    if written.unwrap_or(true) {
        Span::current().record(field, value);
    }
}

/// Writes the call's notes into its span now, and what is noted later at
/// once: for handlers that log events inside the call (Admin changes).
pub fn write_notes() {
    let _ = NOTES.try_with(|notes| {
        let mut notes = lock(notes);
        record_notes(&Span::current(), &notes);
        notes.written = true;
    });
}

fn record_notes(span: &Span, notes: &Notes) {
    if let Some(principal) = &notes.principal {
        span.record("principal", principal.as_str());
    }
    if let Some(key_id) = &notes.key_id {
        span.record("key_id", key_id.as_str());
    }
}

#[derive(Clone, Default)]
pub struct ObserveLayer {
    metrics: Option<Arc<RpcMetrics>>,
    foreground: Option<Arc<ForegroundLatency>>,
}

impl ObserveLayer {
    /// Spans and logs always; metrics when `metrics` is given; successful
    /// Encrypt and Decrypt latencies into `foreground` when given (the
    /// rotation latency budget's measure).
    pub fn new(
        metrics: Option<Arc<RpcMetrics>>,
        foreground: Option<Arc<ForegroundLatency>>,
    ) -> Self {
        Self {
            metrics,
            foreground,
        }
    }
}

/// The calls a rotation's latency budget protects.
fn is_foreground(method: Method) -> bool {
    method.service == "keyward.v1.Crypto" && matches!(method.name, "Encrypt" | "Decrypt")
}

impl<S> Layer<S> for ObserveLayer {
    type Service = ObserveService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ObserveService {
            inner,
            metrics: self.metrics.clone(),
            foreground: self.foreground.clone(),
        }
    }
}

#[derive(Clone)]
pub struct ObserveService<S> {
    inner: S,
    metrics: Option<Arc<RpcMetrics>>,
    foreground: Option<Arc<ForegroundLatency>>,
}

impl<S, B> Service<http::Request<B>> for ObserveService<S>
where
    S: super::HttpService<B>,
    B: Send + 'static,
{
    super::middleware_head!();

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let mut inner = super::take_ready(&mut self.inner);
        if !is_grpc(&request) {
            // Dashboard files: not RPCs.
            return Box::pin(inner.call(request));
        }
        let method = method_of(request.uri().path());
        let span = tracing::info_span!(
            "rpc",
            service = method.service,
            method = method.name,
            principal = Empty,
            key_id = Empty,
            code = Empty,
        );
        let notes = SharedNotes::default();
        let call = Call {
            method,
            span: span.clone(),
            started: Instant::now(),
            metrics: self.metrics.clone(),
            foreground: is_foreground(method)
                .then(|| self.foreground.clone())
                .flatten(),
            notes: Arc::clone(&notes),
            finished: false,
        };
        let response = NOTES.scope(notes, inner.call(request).instrument(span));
        Box::pin(async move {
            let response = response.await?;
            let (mut parts, body) = response.into_parts();
            // Trailers-only (every error reply): the code is in the headers.
            if let Some(status) = tonic::Status::from_header_map(&parts.headers) {
                let outcome = classify(status.code(), status.message());
                if let Outcome::Undecodable(code) = outcome {
                    // tonic's text names the decoder's complaint only.
                    let said = tonic::Status::new(
                        code,
                        format!("the request could not be decoded: {}", status.message()),
                    );
                    let _ = said.add_header(&mut parts.headers);
                }
                call.finish(outcome);
                return Ok(http::Response::from_parts(parts, body));
            }
            let body = ObservedBody {
                inner: body,
                call: Some(call),
            };
            Ok(http::Response::from_parts(
                parts,
                tonic::body::Body::new(body),
            ))
        })
    }
}

/// A gRPC call (gRPC-Web is translated to gRPC before this layer).
pub fn is_grpc<B>(request: &http::Request<B>) -> bool {
    request
        .headers()
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// What became of a call, as it is logged and counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The code the call was answered with.
    Answered(tonic::Code),
    /// The request could not be decoded (unparsable protobuf, invalid
    /// UTF-8, a truncated frame, a compressed flag without an encoding): the
    /// caller's fault. Answered with the code gRPC assigns (INTERNAL, or
    /// UNIMPLEMENTED for compression), logged at INFO and counted as
    /// `UNDECODABLE_REQUEST`, so alerts on server faults do not fire.
    Undecodable(tonic::Code),
    /// The client went away (cancelled the call, reset the stream, closed
    /// its connection) before the answer: CANCELLED, at INFO.
    Cancelled,
}

impl Outcome {
    /// The `grpc_code` label of the metrics and the `code` of the log.
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Answered(code) => code_label(code),
            Outcome::Undecodable(_) => "UNDECODABLE_REQUEST",
            Outcome::Cancelled => "CANCELLED",
        }
    }

    fn level(self) -> Level {
        // Successes at DEBUG (an access log at keyward's rates would drown
        // everything else), the caller's doing at INFO, server-side
        // failures at WARN.
        match self {
            Outcome::Answered(tonic::Code::Ok) => Level::DEBUG,
            Outcome::Answered(
                tonic::Code::Internal
                | tonic::Code::Unknown
                | tonic::Code::DataLoss
                | tonic::Code::Unavailable,
            ) => Level::WARN,
            _ => Level::INFO,
        }
    }
}

/// Reads a status keyward may not have written itself: every INTERNAL
/// keyward answers carries [`INTERNAL_MESSAGE`]; any other INTERNAL or
/// UNKNOWN, and UNIMPLEMENTED for compression, came from the transport
/// (the client went away: tonic's `h2 protocol error`, `error reading a
/// body`) or from decoding the request.
pub fn classify(code: tonic::Code, message: &str) -> Outcome {
    let transport =
        message.starts_with("h2 protocol error") || message.starts_with("error reading a body");
    // tonic failing to encode or compress keyward's own response.
    let ours = message == INTERNAL_MESSAGE || message.starts_with("Error ");
    match code {
        tonic::Code::Cancelled => Outcome::Cancelled,
        tonic::Code::Internal | tonic::Code::Unknown if ours => Outcome::Answered(code),
        tonic::Code::Internal | tonic::Code::Unknown if transport => Outcome::Cancelled,
        tonic::Code::Internal | tonic::Code::Unknown => Outcome::Undecodable(code),
        tonic::Code::Unimplemented if message.contains("compress") => Outcome::Undecodable(code),
        code => Outcome::Answered(code),
    }
}

/// The outcome trailers (or an error frame) tell.
fn outcome_of(headers: &http::HeaderMap) -> Outcome {
    tonic::Status::from_header_map(headers)
        .map_or(Outcome::Answered(tonic::Code::Unknown), |status| {
            classify(status.code(), status.message())
        })
}

/// One call being observed until its code is known.
struct Call {
    method: Method,
    span: Span,
    started: Instant,
    metrics: Option<Arc<RpcMetrics>>,
    /// Set for the calls the latency budget counts.
    foreground: Option<Arc<ForegroundLatency>>,
    notes: SharedNotes,
    finished: bool,
}

/// A call dropped before its outcome was known: the client went away (the
/// handler's future, or the response body, was dropped).
impl Drop for Call {
    fn drop(&mut self) {
        if !self.finished {
            self.record(Outcome::Cancelled);
        }
    }
}

impl Call {
    fn finish(mut self, outcome: Outcome) {
        self.finished = true;
        self.record(outcome);
    }

    fn record(&self, outcome: Outcome) {
        let elapsed = self.started.elapsed();
        if let Some(metrics) = &self.metrics {
            metrics.observe(self.method, outcome.label(), elapsed);
        }
        if let Some(foreground) = &self.foreground {
            if outcome == Outcome::Answered(tonic::Code::Ok) {
                foreground.record(elapsed);
            }
        }
        let level = outcome.level();
        // Entered first: a filter may enable events inside `rpc` spans.
        let _entered = self.span.enter();
        let enabled = match level {
            Level::DEBUG => tracing::enabled!(Level::DEBUG),
            Level::WARN => tracing::enabled!(Level::WARN),
            _ => tracing::enabled!(Level::INFO),
        };
        if !enabled {
            return;
        }
        {
            let notes = lock(&self.notes);
            if !notes.written {
                record_notes(&self.span, &notes);
            }
        }
        self.span.record("code", outcome.label());
        let elapsed_ms = elapsed.as_secs_f64() * 1000.0;
        match level {
            Level::DEBUG => tracing::debug!(elapsed_ms, "rpc finished"),
            Level::WARN => tracing::warn!(elapsed_ms, "rpc finished"),
            _ => tracing::info!(elapsed_ms, "rpc finished"),
        }
    }
}

pin_project_lite::pin_project! {
    /// A response body that finishes its [`Call`] when the trailers pass
    /// (dropped before: the client went away, and the call says so).
    struct ObservedBody {
        #[pin]
        inner: tonic::body::Body,
        call: Option<Call>,
    }
}

impl Body for ObservedBody {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let frame = std::task::ready!(this.inner.poll_frame(cx));
        match &frame {
            Some(Ok(frame)) => {
                if let Some(trailers) = frame.trailers_ref() {
                    if let Some(call) = this.call.take() {
                        call.finish(outcome_of(trailers));
                    }
                }
            }
            Some(Err(status)) => {
                if let Some(call) = this.call.take() {
                    call.finish(classify(status.code(), status.message()));
                }
            }
            None => {
                if let Some(call) = this.call.take() {
                    call.finish(Outcome::Answered(tonic::Code::Unknown));
                }
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RpcLabels {
    grpc_service: &'static str,
    grpc_method: &'static str,
    grpc_code: &'static str,
}

/// RPC counters and latency histograms: this layer owns them and feeds
/// them; the metrics endpoint registers and serves them.
#[derive(Debug)]
pub struct RpcMetrics {
    requests: Family<RpcLabels, Counter>,
    duration: Family<RpcLabels, Histogram>,
}

impl Default for RpcMetrics {
    fn default() -> Self {
        Self {
            requests: Family::default(),
            // 50 µs to about 3 s.
            duration: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.000_05, 2.0, 17))
            }),
        }
    }
}

impl RpcMetrics {
    /// Registers the families (`keyward_rpc_requests_total`,
    /// `keyward_rpc_duration_seconds`) with a server's registry.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "rpc_requests",
            "gRPC calls finished, by service, method and code",
            self.requests.clone(),
        );
        registry.register(
            "rpc_duration_seconds",
            "gRPC call latency, from request to the code, by service, method and code",
            self.duration.clone(),
        );
    }

    /// Counts one finished call.
    pub fn observe(&self, method: Method, code: &'static str, elapsed: std::time::Duration) {
        let labels = RpcLabels {
            grpc_service: method.service,
            grpc_method: method.name,
            grpc_code: code,
        };
        self.requests.get_or_create(&labels).inc();
        self.duration
            .get_or_create(&labels)
            .observe(elapsed.as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_the_caller_did_is_not_a_server_fault() {
        use tonic::Code::{Cancelled, Internal, Unimplemented, Unknown};
        let cases = [
            (Internal, INTERNAL_MESSAGE, Outcome::Answered(Internal)),
            (Internal, "Error encoding: x", Outcome::Answered(Internal)),
            (
                Internal,
                "failed to decode Protobuf message: invalid string value: data is not UTF-8 encoded",
                Outcome::Undecodable(Internal),
            ),
            (
                Internal,
                "protocol error: received message with compressed-flag but no grpc-encoding was specified",
                Outcome::Undecodable(Internal),
            ),
            (Internal, "Missing request message.", Outcome::Undecodable(Internal)),
            (
                Unimplemented,
                "Content is compressed with `br` which isn't supported",
                Outcome::Undecodable(Unimplemented),
            ),
            (Unimplemented, "", Outcome::Answered(Unimplemented)),
            (Internal, "h2 protocol error: stream error", Outcome::Cancelled),
            (Unknown, "error reading a body from connection", Outcome::Cancelled),
            (Cancelled, "", Outcome::Cancelled),
        ];
        for (code, message, outcome) in cases {
            assert_eq!(classify(code, message), outcome, "{message}");
        }
        assert_eq!(Outcome::Undecodable(Internal).level(), Level::INFO);
        assert_eq!(Outcome::Cancelled.level(), Level::INFO);
        assert_eq!(Outcome::Answered(Internal).level(), Level::WARN);
        assert_eq!(
            Outcome::Undecodable(Internal).label(),
            "UNDECODABLE_REQUEST"
        );
    }

    #[test]
    fn every_served_method_is_known_and_others_are_not() {
        let encrypt = method_of("/keyward.v1.Crypto/Encrypt");
        assert_eq!(
            (encrypt.service, encrypt.name),
            ("keyward.v1.Crypto", "Encrypt")
        );
        assert_eq!(method_of("/grpc.health.v1.Health/Check").name, "Check");
        assert_eq!(
            method_of("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo").name,
            "ServerReflectionInfo"
        );
        assert_eq!(method_of("/keyward.v1.Crypto/Nope").name, "unknown");
        assert_eq!(method_of("/anything/else").service, "unknown");
    }
}
