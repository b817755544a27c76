//! Write coalescing for gRPC connections.
//!
//! HTTP/2 (the `h2` crate under tonic) writes a DATA frame of 256 bytes or
//! more straight from the message buffer instead of copying it into its
//! frame buffer, and it flushes before it takes the next frame. Every 1 KiB
//! Encrypt request and response therefore became a `writev` system call of
//! its own (about 1.5 on each side per call, measured with `perf stat`),
//! while 64 concurrent Health checks shared a handful. The socket, not the
//! crypto, set Encrypt's cost.
//!
//! [`CoalescingStream`] gives a TCP connection a write queue in user space:
//! a write copies its bytes into the queue and returns at once, and a
//! writer task, one per connection, empties the whole queue with one system
//! call whenever it runs. Under load the frames of many calls share a
//! system call; an idle connection writes as soon as the writer task runs
//! (it is woken onto the same worker thread, right after the connection's
//! task). The queue is the user-space half of the socket's send buffer:
//!
//! - `flush` returns once the bytes are queued, as a plain `TcpStream`'s
//!   flush returns once they are in the kernel's buffer;
//! - a write waits while the queue holds [`QUEUE_LIMIT`] bytes
//!   (backpressure, as a full socket buffer);
//! - a write error is kept and returned to every later write and flush;
//! - `shutdown` returns after everything queued has been written and the
//!   socket's write side closed; a stream dropped without shutdown still
//!   has its queue written, each write given at most [`DRAIN_AFTER_DROP`].
//!
//! Reads are buffered the same way: h2 reads into an 8 KiB buffer, so 64
//! Encrypt responses arriving at once took some twenty `recvfrom` calls;
//! [`CoalescingStream`] reads up to [`READ_CHUNK`] per system call and hands
//! it out from memory (a read that asks for more goes straight to the
//! socket).
//!
//! The server wraps every accepted connection ([`crate::app`]); clients in
//! Rust get the same with [`connect_channel`] (`keyward bench` uses it, so
//! the client's writes do not decide what the benchmark measures either).

use std::{
    io,
    pin::Pin,
    sync::{Arc, Mutex, MutexGuard},
    task::{ready, Context, Poll, Waker},
    time::Duration,
};

use bytes::{Buf, BytesMut};
use tokio::{
    io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf},
    net::{
        tcp::{OwnedReadHalf, OwnedWriteHalf},
        TcpStream,
    },
    sync::Notify,
};
use tonic::transport::{
    server::{Connected, TcpConnectInfo},
    Channel, Endpoint,
};

/// Bytes a connection may have queued before writes wait for the writer.
pub const QUEUE_LIMIT: usize = 512 * 1024;

/// Bytes read from the socket per system call, at most.
pub const READ_CHUNK: usize = 64 * 1024;

/// How long the writer keeps writing the queue of a stream that was dropped
/// without `shutdown` (a peer that stopped reading cannot hold it forever).
pub const DRAIN_AFTER_DROP: Duration = Duration::from_secs(5);

/// A TCP connection whose writes are queued and written by a task of its
/// own, many at a time. See the module documentation.
#[derive(Debug)]
pub struct CoalescingStream {
    read: OwnedReadHalf,
    /// Bytes read from the socket and not yet handed out.
    read_ahead: BytesMut,
    queue: Arc<WriteQueue>,
    info: TcpConnectInfo,
    /// A server connection's place among the watched ones (`crate::idle`).
    _registration: Option<crate::idle::Registration>,
}

impl CoalescingStream {
    /// Takes over `stream` and spawns its writer task on the current Tokio
    /// runtime.
    pub fn new(stream: TcpStream) -> Self {
        let info = TcpConnectInfo {
            local_addr: stream.local_addr().ok(),
            remote_addr: stream.peer_addr().ok(),
        };
        let (read, write) = stream.into_split();
        let queue = Arc::new(WriteQueue::default());
        tokio::spawn(write_queued(Arc::clone(&queue), write));
        Self {
            read,
            read_ahead: BytesMut::new(),
            queue,
            info,
            _registration: None,
        }
    }

    /// An accepted connection, watched by `connections` under `limits`
    /// (closed when it does nothing; see [`crate::idle`]).
    pub fn accepted(
        stream: TcpStream,
        connections: &Arc<crate::idle::Connections>,
        limits: crate::idle::IdleLimits,
    ) -> Self {
        let registration = connections.accept(&stream, limits);
        let mut accepted = Self::new(stream);
        accepted._registration = Some(registration);
        accepted
    }

    /// Connects to `addr` with `TCP_NODELAY` (the queue already batches
    /// small writes; Nagle would only delay them).
    pub async fn connect(addr: impl tokio::net::ToSocketAddrs) -> io::Result<Self> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(Self::new(stream))
    }
}

/// Connects a tonic channel (plain HTTP/2) whose connection is a
/// [`CoalescingStream`]. The endpoint's settings apply except its TCP ones:
/// the connection always has `TCP_NODELAY`.
pub async fn connect_channel(endpoint: Endpoint) -> Result<Channel, tonic::transport::Error> {
    endpoint
        .connect_with_connector(tower::service_fn(|uri: http::Uri| async move {
            let host = uri.host().unwrap_or_default().trim_matches(['[', ']']);
            let port = uri.port_u16().unwrap_or(80);
            CoalescingStream::connect((host, port))
                .await
                .map(hyper_util::rt::TokioIo::new)
        }))
        .await
}

#[derive(Debug, Default)]
struct WriteQueue {
    state: Mutex<QueueState>,
    /// Wakes the writer task: bytes were queued, or the stream closed.
    wake_writer: Notify,
    /// Tells a writer blocked on a slow peer that the stream was dropped.
    stream_dropped: Notify,
}

#[derive(Debug, Default)]
struct QueueState {
    bytes: BytesMut,
    /// The error that ended the writer, returned to every later call.
    failed: Option<(io::ErrorKind, String)>,
    /// `shutdown` was called or the stream dropped: no more writes.
    closing: bool,
    /// The stream was dropped: the writer's drain is bounded.
    dropped: bool,
    /// The writer wrote everything and closed the socket's write side.
    closed: bool,
    /// A write waiting for room, or a shutdown waiting for the drain.
    waiting: Option<Waker>,
}

impl QueueState {
    fn error(&self) -> Option<io::Error> {
        self.failed
            .as_ref()
            .map(|(kind, message)| io::Error::new(*kind, message.clone()))
    }

    fn wait(&mut self, cx: &Context<'_>) {
        match &mut self.waiting {
            Some(waker) if waker.will_wake(cx.waker()) => {}
            slot => *slot = Some(cx.waker().clone()),
        }
    }

    fn wake_waiting(&mut self) {
        if let Some(waker) = self.waiting.take() {
            waker.wake();
        }
    }
}

impl WriteQueue {
    fn lock(&self) -> MutexGuard<'_, QueueState> {
        // The lock guards plain data and no code under it can panic midway
        // through an update, so a poisoned lock's state is still whole.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Queues as much of `bufs` as fits, or registers the waker.
    fn poll_queue(&self, cx: &Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        let mut state = self.lock();
        if let Some(err) = state.error() {
            return Poll::Ready(Err(err));
        }
        if state.closing {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        let room = QUEUE_LIMIT.saturating_sub(state.bytes.len());
        if room == 0 {
            state.wait(cx);
            return Poll::Pending;
        }
        let mut queued = 0;
        for buf in bufs {
            let take = buf.len().min(room - queued);
            state.bytes.extend_from_slice(&buf[..take]);
            queued += take;
            if queued == room {
                break;
            }
        }
        drop(state);
        if queued > 0 {
            self.wake_writer.notify_one();
        }
        Poll::Ready(Ok(queued))
    }
}

/// The writer task: takes the whole queue and writes it, until the stream
/// closes or the socket fails.
async fn write_queued(queue: Arc<WriteQueue>, mut socket: OwnedWriteHalf) {
    let mut batch = BytesMut::new();
    loop {
        let dropped = {
            let mut state = queue.lock();
            std::mem::swap(&mut state.bytes, &mut batch);
            if !batch.is_empty() {
                // Room again for a write that waited.
                state.wake_waiting();
            }
            if batch.is_empty() && state.closing {
                break;
            }
            state.dropped
        };
        if batch.is_empty() {
            queue.wake_writer.notified().await;
            continue;
        }
        let written = {
            let write = socket.write_all(&batch);
            tokio::pin!(write);
            if dropped {
                bounded(write).await
            } else {
                tokio::select! {
                    result = &mut write => result,
                    () = queue.stream_dropped.notified() => bounded(write).await,
                }
            }
        };
        batch.clear();
        if let Err(err) = written {
            let mut state = queue.lock();
            state.failed = Some((err.kind(), err.to_string()));
            state.bytes.clear();
            state.wake_waiting();
            return;
        }
    }
    let result = socket.shutdown().await;
    let mut state = queue.lock();
    if let Err(err) = result {
        state.failed = Some((err.kind(), err.to_string()));
    }
    state.closed = true;
    state.wake_waiting();
}

/// A write of a dropped stream's queue, given [`DRAIN_AFTER_DROP`].
async fn bounded(write: impl std::future::Future<Output = io::Result<()>>) -> io::Result<()> {
    tokio::time::timeout(DRAIN_AFTER_DROP, write)
        .await
        .unwrap_or_else(|_| Err(io::ErrorKind::TimedOut.into()))
}

impl AsyncRead for CoalescingStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.read_ahead.is_empty() {
            if buf.remaining() >= READ_CHUNK {
                return Pin::new(&mut this.read).poll_read(cx, buf);
            }
            this.read_ahead.reserve(READ_CHUNK);
            let n = ready!(tokio_util::io::poll_read_buf(
                Pin::new(&mut this.read),
                cx,
                &mut this.read_ahead
            ))?;
            if n == 0 {
                return Poll::Ready(Ok(())); // end of stream
            }
        }
        let n = buf.remaining().min(this.read_ahead.len());
        buf.put_slice(&this.read_ahead[..n]);
        this.read_ahead.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for CoalescingStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.queue.poll_queue(cx, &[io::IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.queue.poll_queue(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Queued bytes are the writer's: they are on their way, as bytes in
        // a socket's kernel buffer are after a plain TcpStream's flush.
        match self.queue.lock().error() {
            Some(err) => Poll::Ready(Err(err)),
            None => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut state = self.queue.lock();
        if state.closed || state.failed.is_some() {
            return Poll::Ready(state.error().map_or(Ok(()), Err));
        }
        state.wait(cx);
        if !state.closing {
            state.closing = true;
            drop(state);
            self.queue.wake_writer.notify_one();
        }
        Poll::Pending
    }
}

impl Drop for CoalescingStream {
    fn drop(&mut self) {
        let mut state = self.queue.lock();
        state.closing = true;
        state.dropped = true;
        drop(state);
        self.queue.wake_writer.notify_one();
        self.queue.stream_dropped.notify_one();
    }
}

impl Connected for CoalescingStream {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.info.clone()
    }
}

#[cfg(test)]
mod tests {
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpListener,
    };

    use super::*;

    async fn pair() -> (CoalescingStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (client, server) = tokio::join!(CoalescingStream::connect(addr), listener.accept());
        (client.unwrap(), server.unwrap().0)
    }

    #[tokio::test]
    async fn writes_arrive_in_order_and_shutdown_waits_for_them() {
        let (mut coalescing, mut peer) = pair().await;
        let reader = tokio::spawn(async move {
            let mut all = Vec::new();
            peer.read_to_end(&mut all).await.map(|_| all)
        });
        let mut sent = Vec::new();
        // More than the queue holds, so some writes wait for room.
        for i in 0..2_000u32 {
            let chunk = vec![(i % 251) as u8; 700 + (i as usize % 300)];
            coalescing.write_all(&chunk).await.unwrap();
            coalescing.flush().await.unwrap();
            sent.extend_from_slice(&chunk);
        }
        coalescing.shutdown().await.unwrap();
        let received = reader.await.unwrap().unwrap();
        assert_eq!(received.len(), sent.len());
        assert!(received == sent, "bytes arrived out of order");
    }

    #[tokio::test]
    async fn small_reads_of_a_large_burst_get_every_byte_in_order() {
        let (mut coalescing, mut peer) = pair().await;
        let burst: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
        let writer = tokio::spawn({
            let burst = burst.clone();
            async move { peer.write_all(&burst).await.map(|()| peer) }
        });
        let mut received = Vec::new();
        let mut buf = [0; 1000];
        while received.len() < burst.len() {
            let n = coalescing.read(&mut buf).await.unwrap();
            assert!(n > 0, "early end of stream");
            received.extend_from_slice(&buf[..n]);
        }
        assert!(received == burst, "bytes arrived out of order");
        let peer = writer.await.unwrap().unwrap();
        assert_eq!(
            coalescing.connect_info().remote_addr,
            peer.local_addr().ok()
        );
        drop(peer);
        assert_eq!(coalescing.read(&mut buf).await.unwrap(), 0, "end of stream");
    }

    #[tokio::test]
    async fn a_dropped_stream_still_delivers_what_it_queued() {
        let (mut coalescing, mut peer) = pair().await;
        coalescing.write_all(b"last words").await.unwrap();
        drop(coalescing);
        let mut all = Vec::new();
        peer.read_to_end(&mut all).await.unwrap();
        assert_eq!(all, b"last words");
    }

    #[tokio::test]
    async fn a_failed_socket_fails_later_writes() {
        let (mut coalescing, peer) = pair().await;
        // Closing with unread data makes the peer answer with a reset.
        drop(peer);
        let mut failed = None;
        for _ in 0..200 {
            match coalescing.write_all(&[0; 64 * 1024]).await {
                Ok(()) => tokio::time::sleep(Duration::from_millis(5)).await,
                Err(err) => {
                    failed = Some(err);
                    break;
                }
            }
        }
        let err = failed.expect("writes to a closed peer must fail");
        assert!(
            matches!(
                err.kind(),
                io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
            ),
            "{err}"
        );
        assert!(coalescing.flush().await.is_err());
    }
}
