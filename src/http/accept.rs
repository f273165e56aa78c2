//! Accepting connections on a listening port, so that sockets cannot
//! exhaust the process: at most `max_connections` open at once (one more
//! is closed as soon as it is accepted, counted and logged), a deadline
//! for the handshake and one for idleness, and a backoff with a WARN log
//! when `accept` itself fails (EMFILE, ENFILE: out of file descriptors),
//! instead of retrying in a busy loop.
//!
//! [`Acceptor`] wraps a bound `TcpListener`. It serves tonic as a stream of
//! connections (`Acceptor::into_stream`, for `serve_with_incoming`) and
//! axum as a `Listener`. Each accepted socket is a [`Conn`], which holds
//! its slot under the cap until it is dropped and enforces the deadlines
//! itself: while a read is pending it also waits on a timer, and when the
//! timer finds a deadline passed the read fails, which makes the server
//! close the connection.
//!
//! What counts as activity depends on the port ([`Activity`]):
//!
//! - [`Activity::Calls`] (gRPC): the [`TrackCalls`] layer counts the calls
//!   in progress on each connection. A connection must start its first
//!   call within `handshake_timeout` (which covers the TLS handshake, the
//!   HTTP/2 preface and settings, and the first request's headers; tonic's
//!   own TLS timeout is set to the same value), and is closed after
//!   `idle_timeout` without a call in progress. Bytes alone cannot tell an
//!   idle connection: every live HTTP/2 client answers keepalive pings.
//! - [`Activity::Reads`] (HTTP/1): a connection must send its first byte
//!   within `handshake_timeout`, and is closed after `idle_timeout`
//!   without sending anything.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Sleep;
use tonic::transport::server::{Connected, TcpConnectInfo};
use tracing::{debug, warn};

use crate::metrics::ConnMetrics;

/// What counts as a connection's activity (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activity {
    /// Calls (gRPC; needs the [`TrackCalls`] layer).
    Calls,
    /// Bytes read (HTTP/1).
    Reads,
}

/// What an [`Acceptor`] enforces.
#[derive(Clone, Debug)]
pub struct AcceptLimits {
    pub max_connections: usize,
    pub handshake_timeout: Duration,
    pub idle_timeout: Duration,
    pub activity: Activity,
}

/// First and longest wait after a failed `accept`.
const BACKOFF_MIN: Duration = Duration::from_millis(10);
const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// At most one log line per this period for each kind of event.
const LOG_EVERY: Duration = Duration::from_secs(10);

/// Accepts connections under [`AcceptLimits`]; see the module docs.
pub struct Acceptor {
    listener: TcpListener,
    limits: Arc<AcceptLimits>,
    metrics: ConnMetrics,
    port: &'static str,
    open: Arc<AtomicUsize>,
    backoff: Duration,
    refused_log: RateLimited,
    error_log: RateLimited,
    closing: tokio::sync::watch::Sender<bool>,
}

/// Closes every connection of an [`Acceptor`] (at the end of a graceful
/// shutdown, when some calls did not finish).
#[derive(Clone, Debug)]
pub struct Closer(tokio::sync::watch::Sender<bool>);

impl Closer {
    pub fn close_all(&self) {
        self.0.send_replace(true);
    }
}

impl Acceptor {
    /// `port` names the port in logs (`grpc`, `http`).
    pub fn new(
        listener: TcpListener,
        limits: AcceptLimits,
        metrics: ConnMetrics,
        port: &'static str,
    ) -> Self {
        Self {
            listener,
            limits: Arc::new(limits),
            metrics,
            port,
            open: Arc::new(AtomicUsize::new(0)),
            backoff: Duration::ZERO,
            refused_log: RateLimited::default(),
            error_log: RateLimited::default(),
            closing: tokio::sync::watch::channel(false).0,
        }
    }

    /// A handle that closes every connection this acceptor gave out.
    pub fn closer(&self) -> Closer {
        Closer(self.closing.clone())
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// The next connection under the cap. Never fails: accept errors are
    /// logged and retried after a backoff.
    pub async fn next(&mut self) -> (Conn, SocketAddr) {
        loop {
            match self.listener.accept().await {
                Ok((socket, addr)) => {
                    self.backoff = Duration::ZERO;
                    if self.open.load(Ordering::Relaxed) >= self.limits.max_connections {
                        // Closed at once: the peer sees the connection end
                        // instead of waiting on a socket nobody serves.
                        drop(socket);
                        self.metrics.refused.inc();
                        if let Some(suppressed) = self.refused_log.allow() {
                            warn!(
                                port = self.port,
                                peer = %addr,
                                max_connections = self.limits.max_connections,
                                suppressed,
                                "connection refused: max_connections are open"
                            );
                        }
                        continue;
                    }
                    let _ = socket.set_nodelay(true);
                    self.metrics.accepted.inc();
                    let mut closing = self.closing.subscribe();
                    let closing = Box::pin(async move {
                        let _ = closing.wait_for(|c| *c).await;
                    });
                    let conn = Conn::new(socket, self.limits.clone(), self.slot(), closing);
                    return (conn, addr);
                }
                // The peer gave up before we accepted: nothing to do.
                Err(e) if is_peer_error(&e) => continue,
                Err(e) => {
                    self.metrics.accept_errors.inc();
                    self.backoff = (self.backoff * 2).clamp(BACKOFF_MIN, BACKOFF_MAX);
                    if let Some(suppressed) = self.error_log.allow() {
                        warn!(
                            port = self.port,
                            error = %e,
                            open = self.open(),
                            retry_in_ms = self.backoff.as_millis() as u64,
                            suppressed,
                            "accept failed; backing off (out of file descriptors? \
                             raise the open-file limit or lower max_connections)"
                        );
                    }
                    tokio::time::sleep(self.backoff).await;
                }
            }
        }
    }

    fn slot(&self) -> Slot {
        self.open.fetch_add(1, Ordering::Relaxed);
        self.metrics.open.inc();
        Slot {
            open: self.open.clone(),
            metrics: self.metrics.clone(),
        }
    }

    /// The connections as a stream, for tonic's `serve_with_incoming`.
    pub fn into_stream(self) -> impl futures::Stream<Item = io::Result<Conn>> + Send + 'static {
        futures::stream::unfold(self, |mut a| async move {
            let (conn, _) = a.next().await;
            Some((Ok(conn), a))
        })
    }
}

impl axum::serve::Listener for Acceptor {
    type Io = Conn;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Conn, SocketAddr) {
        self.next().await
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }
}

/// Errors that concern one connection only, not the listener.
fn is_peer_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
    )
}

/// Lets one event through per [`LOG_EVERY`]; says how many it held back.
#[derive(Default)]
struct RateLimited {
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimited {
    fn allow(&mut self) -> Option<u64> {
        let now = Instant::now();
        if self.last.is_some_and(|t| now.duration_since(t) < LOG_EVERY) {
            self.suppressed += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.suppressed))
    }
}

/// A connection's place under the cap; freed when the connection drops.
struct Slot {
    open: Arc<AtomicUsize>,
    metrics: ConnMetrics,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::Relaxed);
        self.metrics.open.dec();
    }
}

/// What a connection's deadlines depend on; shared with [`TrackCalls`].
#[derive(Debug)]
struct ConnState {
    opened: Instant,
    bytes_read: AtomicU64,
    /// Whether a call has begun on this connection.
    called: AtomicBool,
    calls: AtomicUsize,
    /// Milliseconds after `opened` when the connection last became idle.
    idle_since_ms: AtomicU64,
}

impl ConnState {
    fn ms(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.opened).as_millis() as u64
    }

    fn call_started(&self) {
        self.calls.fetch_add(1, Ordering::AcqRel);
        self.called.store(true, Ordering::Release);
    }

    fn call_ended(&self) {
        if self.calls.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.idle_since_ms
                .store(self.ms(Instant::now()), Ordering::Release);
        }
    }

    /// The deadline in force, or why the connection is over.
    fn verdict(&self, now: Instant, l: &AcceptLimits) -> Result<Instant, Expired> {
        let shook = match l.activity {
            Activity::Calls => self.called.load(Ordering::Acquire),
            Activity::Reads => self.bytes_read.load(Ordering::Acquire) > 0,
        };
        if !shook {
            let at = self.opened + l.handshake_timeout;
            return if now >= at {
                Err(Expired::Handshake)
            } else {
                Ok(at)
            };
        }
        if l.activity == Activity::Calls && self.calls.load(Ordering::Acquire) > 0 {
            // Busy: look again later (a call ending does not wake us).
            return Ok(now + l.idle_timeout);
        }
        let since = self.opened + Duration::from_millis(self.idle_since_ms.load(Ordering::Acquire));
        let at = since + l.idle_timeout;
        if now >= at {
            Err(Expired::Idle)
        } else {
            Ok(at)
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum Expired {
    Handshake,
    Idle,
}

/// An accepted socket under its [`Acceptor`]'s deadlines and cap.
pub struct Conn {
    io: TcpStream,
    state: Arc<ConnState>,
    limits: Arc<AcceptLimits>,
    timer: Pin<Box<Sleep>>,
    slot: Slot,
    /// Resolves when [`Closer::close_all`] is called.
    closing: Pin<Box<dyn Future<Output = ()> + Send>>,
}

impl Conn {
    fn new(
        io: TcpStream,
        limits: Arc<AcceptLimits>,
        slot: Slot,
        closing: Pin<Box<dyn Future<Output = ()> + Send>>,
    ) -> Self {
        let opened = Instant::now();
        Self {
            io,
            state: Arc::new(ConnState {
                opened,
                bytes_read: AtomicU64::new(0),
                called: AtomicBool::new(false),
                calls: AtomicUsize::new(0),
                idle_since_ms: AtomicU64::new(0),
            }),
            timer: Box::pin(tokio::time::sleep_until(
                (opened + limits.handshake_timeout).into(),
            )),
            limits,
            slot,
            closing,
        }
    }

    /// Checks the deadlines, arming the timer for the next one; an error
    /// once one has passed.
    fn check_deadlines(&mut self, cx: &mut Context<'_>) -> Option<io::Error> {
        loop {
            let now = Instant::now();
            match self.state.verdict(now, &self.limits) {
                Err(why) => return Some(self.expire(why)),
                Ok(at) => {
                    let at = tokio::time::Instant::from_std(at);
                    if self.timer.deadline() != at {
                        self.timer.as_mut().reset(at);
                    }
                    if self.timer.as_mut().poll(cx).is_pending() {
                        return None;
                    }
                }
            }
        }
    }

    fn expire(&self, why: Expired) -> io::Error {
        let peer = self.io.peer_addr().ok();
        let what = match why {
            Expired::Handshake => {
                self.slot.metrics.handshake_timeouts.inc();
                "no handshake (first call or byte) within handshake_timeout_s"
            }
            Expired::Idle => {
                self.slot.metrics.idle_timeouts.inc();
                "no call within idle_timeout_s"
            }
        };
        debug!(?peer, reason = what, "connection closed");
        io::Error::new(io::ErrorKind::TimedOut, what)
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut me.io).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let n = (buf.filled().len() - before) as u64;
                if n > 0 {
                    me.state.bytes_read.fetch_add(n, Ordering::AcqRel);
                    if me.limits.activity == Activity::Reads {
                        let ms = me.state.ms(Instant::now());
                        me.state.idle_since_ms.store(ms, Ordering::Release);
                    }
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending if me.closing.as_mut().poll(cx).is_ready() => Poll::Ready(Err(
                io::Error::new(io::ErrorKind::ConnectionAborted, "the server is stopping"),
            )),
            Poll::Pending => match me.check_deadlines(cx) {
                Some(e) => Poll::Ready(Err(e)),
                None => Poll::Pending,
            },
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// A [`Conn`]'s identity in tonic's request extensions: the usual TCP
/// addresses, and what [`TrackCalls`] needs.
#[derive(Clone, Debug)]
pub struct ConnInfo {
    pub tcp: TcpConnectInfo,
    state: Arc<ConnState>,
}

impl Connected for Conn {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        ConnInfo {
            tcp: self.io.connect_info(),
            state: self.state.clone(),
        }
    }
}

mod track;
pub use track::{CallBody, TrackCalls, Tracked};

/// The soft limit on open files, after raising it to the hard limit
/// (capped at 2^20); `None` where it cannot be read.
pub fn raise_open_file_limit() -> Option<u64> {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass and nothing else.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) } != 0 {
        return None;
    }
    let want = l.rlim_max.min(1 << 20);
    if want > l.rlim_cur {
        let raised = libc::rlimit {
            rlim_cur: want,
            rlim_max: l.rlim_max,
        };
        // SAFETY: setrlimit only reads the struct we pass.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            debug!(from = l.rlim_cur, to = want, "raised the open-file limit");
            return Some(want);
        }
    }
    Some(l.rlim_cur)
}

/// The default cap on connections under an open-file limit: the limit
/// less a reserve for everything else the process opens.
pub fn connections_for_file_limit(limit: u64) -> usize {
    let reserve = (limit / 8).max(64);
    limit.saturating_sub(reserve).max(16) as usize
}
