//! Connections that do nothing are closed, and a request body must arrive.
//!
//! A silent TCP connection, or one that sent the HTTP/2 preface and
//! nothing more, used to stay open for good (29–96 KB each, against a file
//! descriptor limit), and a request body that never ended had no timeout.
//! [`IdleLimits`] bounds them:
//!
//! - a connection that starts no request within `first_request` (10 s) is
//!   closed;
//! - a connection with no request open for `idle` (5 min) is closed;
//! - a request's body must have arrived within `request_body` (30 s) of the
//!   request's start, or the request fails (the caller's fault, counted as
//!   such by the observe layer).
//!
//! A server-streaming call (WatchRotation, over gRPC or gRPC-Web) is a
//! request open for as long as it streams, so none of these cut it, however
//! quiet it is. HTTP/2 keepalive pings (tonic's, `app`) find peers that are
//! gone.
//!
//! How: every accepted connection is registered in [`Connections`] with
//! its [`Activity`], and a watchdog task shuts its socket down when a
//! limit is passed ([`verdict`], a pure function). The HTTP layer
//! ([`IdleLayer`], outermost) finds each request's connection by its peer
//! address and counts the request open until its response body ends or is
//! dropped.

use std::{
    collections::HashMap,
    future::Future as _,
    net::SocketAddr,
    pin::Pin,
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex, PoisonError, Weak,
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http_body::{Body, Frame};
use http_body_util::BodyExt as _;
use tokio::time::Instant;
use tonic::transport::server::TcpConnectInfo;
use tower::{Layer, Service};

/// How long a connection, or a request's body, may do nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdleLimits {
    /// A connection that starts no request within this is closed.
    pub first_request: Duration,
    /// A connection with no request open for this long is closed.
    pub idle: Duration,
    /// A request's body must have arrived within this of its start.
    pub request_body: Duration,
}

impl Default for IdleLimits {
    fn default() -> Self {
        Self {
            first_request: Duration::from_secs(10),
            idle: Duration::from_secs(300),
            request_body: Duration::from_secs(30),
        }
    }
}

/// Why a connection is closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closing {
    NoRequest,
    Idle,
}

/// Whether a connection is to be closed now: `started` requests so far,
/// `open` of them still open, `age` since it was accepted, `quiet` since
/// its last request ended (or since it was accepted).
pub fn verdict(
    started: u64,
    open: usize,
    age: Duration,
    quiet: Duration,
    limits: &IdleLimits,
) -> Option<Closing> {
    if open > 0 {
        None
    } else if started == 0 && age >= limits.first_request {
        Some(Closing::NoRequest)
    } else if started > 0 && quiet >= limits.idle {
        Some(Closing::Idle)
    } else {
        None
    }
}

/// What one connection has done.
#[derive(Debug)]
pub struct Activity {
    accepted: Instant,
    started: AtomicU64,
    open: AtomicUsize,
    /// When the last open request ended.
    quiet_since: Mutex<Instant>,
}

impl Activity {
    fn new() -> Self {
        let now = Instant::now();
        Self {
            accepted: now,
            started: AtomicU64::new(0),
            open: AtomicUsize::new(0),
            quiet_since: Mutex::new(now),
        }
    }

    fn request_started(self: &Arc<Self>) -> OpenRequest {
        self.started.fetch_add(1, Ordering::Relaxed);
        self.open.fetch_add(1, Ordering::AcqRel);
        OpenRequest(Arc::clone(self))
    }

    fn closing(&self, limits: &IdleLimits) -> Option<Closing> {
        let quiet = *self
            .quiet_since
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        verdict(
            self.started.load(Ordering::Relaxed),
            self.open.load(Ordering::Acquire),
            self.accepted.elapsed(),
            quiet.elapsed(),
            limits,
        )
    }
}

/// A request counted open until dropped.
struct OpenRequest(Arc<Activity>);

impl Drop for OpenRequest {
    fn drop(&mut self) {
        let mut quiet = self
            .0
            .quiet_since
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if self.0.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            *quiet = Instant::now();
        }
    }
}

/// A server's live connections, by peer address.
#[derive(Debug, Default)]
pub struct Connections {
    live: Mutex<HashMap<SocketAddr, Weak<Activity>>>,
}

/// Holds a connection's registration; dropped with the connection.
#[derive(Debug)]
pub struct Registration {
    connections: Arc<Connections>,
    peer: Option<SocketAddr>,
    _activity: Arc<Activity>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Some(peer) = self.peer {
            self.connections
                .live
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&peer);
        }
    }
}

impl Connections {
    /// Registers an accepted connection and starts its watchdog, which
    /// shuts the socket down when a limit of `limits` is passed.
    pub fn accept(
        self: &Arc<Self>,
        stream: &tokio::net::TcpStream,
        limits: IdleLimits,
    ) -> Registration {
        let activity = Arc::new(Activity::new());
        let peer = stream.peer_addr().ok();
        if let Some(peer) = peer {
            self.live
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(peer, Arc::downgrade(&activity));
        }
        // The watchdog's own handle on the socket, to shut it down: the
        // pending read then ends, and the connection with it.
        let socket = std::os::fd::AsFd::as_fd(stream)
            .try_clone_to_owned()
            .map(socket2::Socket::from);
        let watched = Arc::downgrade(&activity);
        tokio::spawn(async move {
            let every = limits
                .first_request
                .min(limits.idle)
                .clamp(Duration::from_millis(100), Duration::from_secs(1));
            loop {
                tokio::time::sleep(every).await;
                let Some(activity) = watched.upgrade() else {
                    return; // the connection is gone
                };
                if let Some(why) = activity.closing(&limits) {
                    tracing::debug!(?peer, ?why, "closing a connection that does nothing");
                    if let Ok(socket) = &socket {
                        let _ = socket.shutdown(std::net::Shutdown::Both);
                    }
                    return;
                }
            }
        });
        Registration {
            connections: Arc::clone(self),
            peer,
            _activity: activity,
        }
    }

    fn find(&self, peer: SocketAddr) -> Option<Arc<Activity>> {
        self.live
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&peer)
            .and_then(Weak::upgrade)
    }
}

/// The outermost layer: counts each request open on its connection until
/// its response body ends, and bounds the arrival of its body.
#[derive(Clone)]
pub struct IdleLayer {
    connections: Arc<Connections>,
    limits: IdleLimits,
}

impl IdleLayer {
    pub fn new(connections: Arc<Connections>, limits: IdleLimits) -> Self {
        Self {
            connections,
            limits,
        }
    }
}

impl<S> Layer<S> for IdleLayer {
    type Service = IdleService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        IdleService {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct IdleService<S> {
    inner: S,
    layer: IdleLayer,
}

type BoxFuture<T, E> = Pin<Box<dyn std::future::Future<Output = Result<T, E>> + Send>>;

impl<S, B> Service<http::Request<B>> for IdleService<S>
where
    S: Service<
            http::Request<tonic::body::Body>,
            Response = http::Response<tonic::body::Body>,
            Future: Send + 'static,
        > + Clone
        + Send
        + 'static,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let open = peer_of(&request)
            .and_then(|peer| self.layer.connections.find(peer))
            .map(|activity| activity.request_started());
        let deadline = Instant::now() + self.layer.limits.request_body;
        let request = request.map(|body| {
            tonic::body::Body::new(DeadlineBody {
                inner: body,
                deadline: Box::pin(tokio::time::sleep_until(deadline)),
                ended: false,
            })
        });
        let response = inner.call(request);
        Box::pin(async move {
            let response = response.await?;
            // The request stays open while its response body lives: the
            // closure holds it.
            Ok(response.map(|body| {
                tonic::body::Body::new(body.map_frame(move |frame| {
                    let _open = &open;
                    frame
                }))
            }))
        })
    }
}

/// The peer of the connection a request came on (over TLS or not).
pub fn peer_of<B>(request: &http::Request<B>) -> Option<SocketAddr> {
    let ext = request.extensions();
    #[cfg(feature = "tls")]
    if let Some(tls) = ext.get::<tonic::transport::server::TlsConnectInfo<TcpConnectInfo>>() {
        return tls.get_ref().remote_addr();
    }
    ext.get::<TcpConnectInfo>().and_then(|c| c.remote_addr())
}

pin_project_lite::pin_project! {
    /// A request body that fails once its deadline passes before its end.
    struct DeadlineBody<B> {
        #[pin]
        inner: B,
        deadline: Pin<Box<tokio::time::Sleep>>,
        ended: bool,
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl<B> Body for DeadlineBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    /// A [`tonic::Status`] (DEADLINE_EXCEEDED) once the deadline passed,
    /// which tonic then answers.
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        if let Poll::Ready(frame) = this.inner.poll_frame(cx) {
            *this.ended |= frame.is_none();
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        if !*this.ended && this.deadline.as_mut().poll(cx).is_ready() {
            let late = tonic::Status::deadline_exceeded("the request body did not arrive in time");
            return Poll::Ready(Some(Err(late.into())));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_connection_that_does_nothing_is_closed() {
        let limits = IdleLimits::default();
        let secs = Duration::from_secs;
        // Silent since it was accepted.
        assert_eq!(verdict(0, 0, secs(9), secs(9), &limits), None);
        assert_eq!(
            verdict(0, 0, secs(10), secs(10), &limits),
            Some(Closing::NoRequest)
        );
        // A quiet stream (WatchRotation) is a request open: never closed.
        assert_eq!(verdict(1, 1, secs(3600), secs(3600), &limits), None);
        // Requests done, then quiet.
        assert_eq!(verdict(5, 0, secs(3600), secs(299), &limits), None);
        assert_eq!(
            verdict(5, 0, secs(3600), secs(300), &limits),
            Some(Closing::Idle)
        );
    }
}
