//! Traffic between pods: `ping` (iputils) and a UDP sequence stream that reports lost,
//! duplicated and reordered packets, for the hitless rotation and restart scenarios.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::Netns;

/// What `ping` reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PingResult {
    pub transmitted: u32,
    pub received: u32,
}

impl PingResult {
    pub fn all_answered(&self) -> bool {
        self.transmitted > 0 && self.received == self.transmitted
    }
}

/// Sends `count` echo requests from inside `from` to `to` (either family), 0.2 s apart,
/// waiting at most one second per reply.
pub fn ping(from: &Netns, to: impl Into<IpAddr>, count: u32) -> Result<PingResult> {
    let to = to.into();
    let out = from
        .command("ping")
        .args(["-n", "-q", "-i", "0.2", "-W", "1", "-c", &count.to_string()])
        .arg(to.to_string())
        .output()
        .context("running ping (package iputils-ping)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    // "3 packets transmitted, 3 received, 0% packet loss, time 402ms"
    let line = text
        .lines()
        .find(|l| l.contains("packets transmitted"))
        .with_context(|| format!("ping printed no statistics: {text}"))?;
    let number_before = |label: &str| -> Result<u32> {
        let idx = line
            .find(label)
            .with_context(|| format!("no {label:?} in {line:?}"))?;
        let n = line[..idx]
            .trim_end()
            .rsplit([' ', ','])
            .next()
            .unwrap_or_default();
        n.parse()
            .with_context(|| format!("parsing {label:?} in {line:?}"))
    };
    Ok(PingResult {
        transmitted: number_before(" packets transmitted")?,
        received: number_before(" received")?,
    })
}

/// Loss, duplication and reordering of a finished stream.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StreamReport {
    pub sent: u64,
    pub received: u64,
    pub lost: u64,
    pub duplicated: u64,
    pub reordered: u64,
}

impl StreamReport {
    pub fn is_perfect(&self) -> bool {
        self.sent > 0 && self.lost == 0 && self.duplicated == 0
    }
}

/// A UDP stream of sequence-numbered datagrams from one namespace to another.
pub struct UdpStream {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    sender: Option<JoinHandle<Result<()>>>,
    receiver: Option<JoinHandle<Result<Vec<u64>>>>,
    receiver_stop: Arc<AtomicBool>,
    /// When the receiver last got a datagram: nanoseconds after `started`, plus one (0: never).
    last_arrival: Arc<AtomicU64>,
    started: Instant,
}

/// Payload: an 8-byte sequence number, then padding to a realistic size.
const DATAGRAM_LEN: usize = 200;

impl UdpStream {
    /// Starts a receiver on `dst` (either family) inside `receiver_ns` and a sender inside
    /// `sender_ns` sending `rate_pps` datagrams per second, for at most `max_duration`.
    pub fn start(
        sender_ns: &Netns,
        receiver_ns: &Netns,
        dst: impl Into<SocketAddr>,
        rate_pps: u32,
        max_duration: Duration,
    ) -> Result<Self> {
        let dst = dst.into();
        if rate_pps == 0 {
            bail!("rate must be positive");
        }
        let receiver_stop = Arc::new(AtomicBool::new(false));
        let started = Instant::now();
        let last_arrival = Arc::new(AtomicU64::new(0));
        let arrival = Arc::clone(&last_arrival);
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<()>>();
        let rstop = Arc::clone(&receiver_stop);
        let receiver = receiver_ns.spawn_thread("udp-receiver", move || {
            let socket = match bind_receiver(dst) {
                Ok(s) => {
                    let _ = ready_tx.send(Ok(()));
                    s
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(anyhow::anyhow!("{e:#}")));
                    return Err(e);
                }
            };
            receive(&socket, &rstop, |at| {
                let nanos =
                    u64::try_from(at.duration_since(started).as_nanos()).unwrap_or(u64::MAX);
                arrival.store(nanos.saturating_add(1), Ordering::Relaxed);
            })
        })?;
        ready_rx
            .recv_timeout(Duration::from_secs(10))
            .context("receiver did not start")??;

        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let (sstop, ssent) = (Arc::clone(&stop), Arc::clone(&sent));
        let sender = sender_ns.spawn_thread("udp-sender", move || {
            send(dst, rate_pps, max_duration, &sstop, &ssent)
        })?;
        Ok(Self {
            stop,
            sent,
            sender: Some(sender),
            receiver: Some(receiver),
            receiver_stop,
            last_arrival,
            started,
        })
    }

    /// When the receiver last got a datagram, if ever.
    pub fn last_arrival(&self) -> Option<Instant> {
        match self.last_arrival.load(Ordering::Relaxed) {
            0 => None,
            n => Some(self.started + Duration::from_nanos(n - 1)),
        }
    }

    /// Datagrams sent so far.
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    /// Stops sending, waits `drain` for datagrams in flight, and reports.
    pub fn finish(mut self, drain: Duration) -> Result<StreamReport> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(s) = self.sender.take() {
            s.join().map_err(|_| anyhow::anyhow!("sender panicked"))??;
        }
        std::thread::sleep(drain);
        self.receiver_stop.store(true, Ordering::Relaxed);
        let seqs = match self.receiver.take() {
            Some(r) => r
                .join()
                .map_err(|_| anyhow::anyhow!("receiver panicked"))??,
            None => Vec::new(),
        };
        Ok(analyse(self.sent(), &seqs))
    }
}

impl Drop for UdpStream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.receiver_stop.store(true, Ordering::Relaxed);
        if let Some(s) = self.sender.take() {
            let _ = s.join();
        }
        if let Some(r) = self.receiver.take() {
            let _ = r.join();
        }
    }
}

/// The unspecified address of `addr`'s family, port 0.
fn unspecified_like(addr: SocketAddr) -> SocketAddr {
    let any: IpAddr = match addr {
        SocketAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
        SocketAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
    };
    SocketAddr::new(any, 0)
}

fn bind_receiver(dst: SocketAddr) -> Result<UdpSocket> {
    let mut local = unspecified_like(dst);
    local.set_port(dst.port());
    let socket = UdpSocket::bind(local).with_context(|| format!("binding UDP {local}"))?;
    socket.set_read_timeout(Some(Duration::from_millis(50)))?;
    // A receiver starved of CPU (a busy emulated VM) must not drop datagrams in its own socket
    // buffer: the stream measures the network, so give it room for seconds of traffic.
    let size: libc::c_int = 16 << 20;
    // SAFETY: setsockopt on a valid socket with a pointer to a live c_int of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&socket),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&raw const size).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        anyhow::bail!("SO_RCVBUFFORCE: {}", std::io::Error::last_os_error());
    }
    Ok(socket)
}

fn receive(
    socket: &UdpSocket,
    stop: &AtomicBool,
    mut arrived: impl FnMut(Instant),
) -> Result<Vec<u64>> {
    let mut seqs = Vec::new();
    let mut buf = [0u8; 2048];
    while !stop.load(Ordering::Relaxed) {
        match socket.recv(&mut buf) {
            Ok(n) if n >= 8 => {
                let mut seq = [0u8; 8];
                seq.copy_from_slice(&buf[..8]);
                seqs.push(u64::from_be_bytes(seq));
                arrived(Instant::now());
            }
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(e).context("receiving"),
        }
    }
    Ok(seqs)
}

fn send(
    dst: SocketAddr,
    rate_pps: u32,
    max_duration: Duration,
    stop: &AtomicBool,
    sent: &AtomicU64,
) -> Result<()> {
    let socket = UdpSocket::bind(unspecified_like(dst))?;
    let interval = Duration::from_secs(1) / rate_pps;
    let start = Instant::now();
    let mut payload = [0u8; DATAGRAM_LEN];
    let mut seq: u64 = 0;
    let mut due = start;
    while !stop.load(Ordering::Relaxed) && start.elapsed() < max_duration {
        match due.checked_duration_since(Instant::now()) {
            Some(wait) => std::thread::sleep(wait),
            // A sender that was descheduled does not catch up in a burst (which would measure
            // queue overflows in a starved VM, not the datapath): it resumes the pace from now.
            None if Instant::now() - due > interval * 4 => due = Instant::now(),
            None => {}
        }
        due += interval;
        payload[..8].copy_from_slice(&seq.to_be_bytes());
        // A send error (no route for a moment, EPERM from a policy) is a lost packet, which is
        // exactly what the report must show; keep going.
        let _ = socket.send_to(&payload, dst);
        seq += 1;
        sent.store(seq, Ordering::Relaxed);
    }
    Ok(())
}

/// Counts from the received sequence numbers, in arrival order.
pub fn analyse(sent: u64, received: &[u64]) -> StreamReport {
    let mut seen = HashSet::with_capacity(received.len());
    let mut duplicated = 0;
    let mut reordered = 0;
    let mut highest: Option<u64> = None;
    for &seq in received {
        if !seen.insert(seq) {
            duplicated += 1;
            continue;
        }
        if highest.is_some_and(|h| seq < h) {
            reordered += 1;
        }
        highest = Some(highest.map_or(seq, |h| h.max(seq)));
    }
    let unique = seen.iter().filter(|&&s| s < sent).count() as u64;
    StreamReport {
        sent,
        received: received.len() as u64,
        lost: sent.saturating_sub(unique),
        duplicated,
        reordered,
    }
}

/// A TCP service inside a namespace that answers every connection with `banner` and closes it,
/// like the deathstar of Cilium's demo. Stops when dropped.
pub struct TcpService {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// Poll period of the service's non-blocking accept.
const ACCEPT_POLL: Duration = Duration::from_millis(20);

impl TcpService {
    /// Listens on `0.0.0.0:port` inside `ns`.
    pub fn start(ns: &Netns, port: u16, banner: &'static str) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<()>>();
        let thread_stop = Arc::clone(&stop);
        let thread = ns.spawn_thread("tcp-service", move || {
            let listener = match std::net::TcpListener::bind((Ipv4Addr::UNSPECIFIED, port))
                .and_then(|l| l.set_nonblocking(true).map(|()| l))
            {
                Ok(l) => {
                    let _ = ready_tx.send(Ok(()));
                    l
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(anyhow::anyhow!("binding port {port}: {e}")));
                    return;
                }
            };
            while !thread_stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut stream, _)) => {
                        use std::io::Write as _;
                        let _ = stream.set_nonblocking(false);
                        let _ = stream.write_all(banner.as_bytes());
                    }
                    Err(_) => std::thread::sleep(ACCEPT_POLL),
                }
            }
        })?;
        ready_rx
            .recv_timeout(Duration::from_secs(10))
            .context("TCP service did not start")??;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for TcpService {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Connects from inside `from` to `to` and reads the service's banner: `Some(banner)` when a
/// connection was made and answered within `timeout` (connect and read each), `None` when it
/// timed out or was refused.
pub fn tcp_banner(from: &Netns, to: impl Into<SocketAddr>, timeout: Duration) -> Option<String> {
    let to = to.into();
    from.run(move || {
        use std::io::Read as _;
        let mut stream = std::net::TcpStream::connect_timeout(&to, timeout).ok()?;
        stream.set_read_timeout(Some(timeout)).ok()?;
        let mut banner = String::new();
        stream.read_to_string(&mut banner).ok()?;
        Some(banner)
    })
}

/// What a [`tcp_transfer`] moved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transfer {
    /// Bytes written.
    pub sent: usize,
    /// Bytes read at the other end.
    pub received: usize,
    /// SHA-256 of what was written and of what was read are the same.
    pub intact: bool,
    /// From the connection to the last byte read.
    pub elapsed: Duration,
}

/// Sends `len` pseudo-random bytes over one TCP connection from inside `from` to a listener on
/// `to` inside `to_ns`, and compares their SHA-256 at both ends. Each step (accept, connect,
/// every read and write) is bounded by `timeout`.
pub fn tcp_transfer(
    from: &Netns,
    to_ns: &Netns,
    to: impl Into<SocketAddr>,
    len: usize,
    timeout: Duration,
) -> Result<Transfer> {
    use std::io::{Read as _, Write as _};

    let to = to.into();
    let data = pseudo_random(len);
    let sent_hash = ring::digest::digest(&ring::digest::SHA256, &data);
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<()>>();
    let receiver = to_ns.spawn_thread("tcp-receiver", move || -> Result<(usize, Vec<u8>)> {
        let listener = match std::net::TcpListener::bind(to) {
            Ok(l) => {
                let _ = ready_tx.send(Ok(()));
                l
            }
            Err(e) => {
                let _ = ready_tx.send(Err(anyhow::anyhow!("binding {to}: {e}")));
                bail!("binding {to}: {e}");
            }
        };
        listener.set_nonblocking(true)?;
        let deadline = Instant::now() + timeout;
        let mut stream = loop {
            match listener.accept() {
                Ok((stream, _)) => break stream,
                Err(_) if Instant::now() < deadline => std::thread::sleep(ACCEPT_POLL),
                Err(e) => bail!("no connection to {to} within {timeout:?}: {e}"),
            }
        };
        stream.set_nonblocking(false)?;
        stream.set_read_timeout(Some(timeout))?;
        let mut context = ring::digest::Context::new(&ring::digest::SHA256);
        let (mut received, mut buf) = (0, vec![0u8; 64 * 1024]);
        loop {
            let n = stream.read(&mut buf).context("reading")?;
            if n == 0 {
                break;
            }
            context.update(&buf[..n]);
            received += n;
        }
        Ok((received, context.finish().as_ref().to_vec()))
    })?;
    ready_rx
        .recv_timeout(Duration::from_secs(10))
        .context("TCP receiver did not start")??;
    let started = Instant::now();
    from.run(move || -> Result<()> {
        let mut stream = std::net::TcpStream::connect_timeout(&to, timeout)
            .with_context(|| format!("connecting to {to}"))?;
        stream.set_write_timeout(Some(timeout))?;
        stream.write_all(&data).context("writing")?;
        stream.shutdown(std::net::Shutdown::Write)?;
        Ok(())
    })?;
    let (received, received_hash) = receiver
        .join()
        .map_err(|_| anyhow::anyhow!("TCP receiver panicked"))??;
    Ok(Transfer {
        sent: len,
        received,
        intact: received_hash == sent_hash.as_ref(),
        elapsed: started.elapsed(),
    })
}

/// `len` bytes of xorshift64 output: incompressible, and the same for every run.
fn pseudo_random(len: usize) -> Vec<u8> {
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn analyse_counts_loss_duplicates_and_reordering() {
        let r = analyse(6, &[0, 2, 1, 2, 5]);
        assert_eq!(
            r,
            StreamReport {
                sent: 6,
                received: 5,
                lost: 2,
                duplicated: 1,
                reordered: 1
            }
        );
        assert!(!r.is_perfect());
        assert!(analyse(3, &[0, 1, 2]).is_perfect());
    }
}
