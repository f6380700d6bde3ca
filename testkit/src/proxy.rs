//! A man in the middle: a TCP proxy between a destination and a source that
//! parses the frames the source sends and can tamper with one of them, the
//! way an attacker on the path could without the key.
//!
//! Every connection the proxy accepts gets its own connection to the
//! source. Destination-to-source bytes go through unchanged (the proxy reads
//! the `Hello` to learn the lane). Source-to-destination bytes are cut into
//! frames: the bare `Challenge`, then sealed frames (header, body, pad and
//! payload of `Pages` of kind `Data`, then `tag_len` bytes of tag). One
//! [`Attack`] fires once per proxy, on the first frame it applies to, and is
//! recorded as a [`Tampering`] (which lane, which sequence number the
//! destination expected there, which pages).
//!
//! Bulk lanes can be slowed down ([`Proxy::slow_bulk`]) so that an attack
//! lands while the migration is still running.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ringfault_engine::PeerAddr;
use ringfault_proto::{
    FrameHeader, Lane, Message, MsgKind, PageKind, PagesHeader, FRAME_HEADER_LEN,
};

/// What the man in the middle does to the source's frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attack {
    /// Nothing: every byte goes through.
    Relay,
    /// Flips one bit of the page contents of the `nth` (from 1) `Pages`
    /// frame of kind `Data` on bulk lane 1.
    FlipPayloadBit {
        /// Which data frame.
        nth: u64,
    },
    /// Inserts a `CompleteAck` on the demand lane after `after` sealed
    /// frames (the `Welcome` counts), with a made-up tag.
    ForgeCompleteAck {
        /// Frames let through first.
        after: u64,
    },
    /// Rewrites the layout in the `Welcome` of `lane` (`Demand`, or bulk
    /// lane 1): every region becomes `size` bytes. The frame keeps its
    /// length and its tag.
    RewriteWelcome {
        /// Which lane's `Welcome`.
        lane: Lane,
        /// The region size announced instead.
        size: u64,
    },
    /// Sends the `nth` (from 1) `Pages` frame of kind `Data` on bulk lane 1
    /// again, verbatim, after `later` more frames went through.
    Replay {
        /// Which data frame.
        nth: u64,
        /// Frames between the original and the copy.
        later: u64,
    },
}

/// What the proxy did, once its attack fired.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tampering {
    /// The lane of the connection.
    pub lane: Lane,
    /// Its channel (0 for the demand lane).
    pub channel: u16,
    /// The sequence number the destination expected for the frame that
    /// arrived instead (sealed frames count from 0, the `Welcome`).
    pub seq: u64,
    /// The kind of the frame the destination received there.
    pub kind: MsgKind,
    /// For a page frame: its region, first page and page count.
    pub pages: Option<(u32, u64, u32)>,
}

#[derive(Debug)]
struct Shared {
    upstream: String,
    attack: Attack,
    tag_len: usize,
    slow_bulk: Mutex<Duration>,
    fired: AtomicBool,
    record: Mutex<Option<Tampering>>,
    stop: AtomicBool,
    sockets: Mutex<Vec<TcpStream>>,
}

/// A tampering TCP proxy, stopped (and every connection through it closed)
/// when dropped.
#[derive(Debug)]
pub struct Proxy {
    addr: PeerAddr,
    local: std::net::SocketAddr,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

impl Proxy {
    /// Listens on loopback and relays every connection to `upstream` (a
    /// `tcp:` address), applying `attack`; `tag_len` is the bytes of tag
    /// after each sealed frame (16, or 0 with `--integrity none`).
    pub fn start(upstream: &PeerAddr, attack: Attack, tag_len: usize) -> Proxy {
        let PeerAddr::Tcp(up) = upstream else {
            panic!("the proxy relays TCP only, not {upstream}");
        };
        let listener =
            TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("proxy listen: {e}"));
        let local = listener
            .local_addr()
            .unwrap_or_else(|e| panic!("proxy address: {e}"));
        let addr = PeerAddr::parse(&format!("tcp:{local}"))
            .unwrap_or_else(|e| panic!("proxy address: {e}"));
        let shared = Arc::new(Shared {
            upstream: up.clone(),
            attack,
            tag_len,
            slow_bulk: Mutex::new(Duration::ZERO),
            fired: AtomicBool::new(false),
            record: Mutex::new(None),
            stop: AtomicBool::new(false),
            sockets: Mutex::new(Vec::new()),
        });
        let sh = shared.clone();
        let acceptor = std::thread::Builder::new()
            .name("proxy-accept".into())
            .spawn(move || accept_loop(&listener, &sh))
            .unwrap_or_else(|e| panic!("proxy thread: {e}"));
        Proxy {
            addr,
            local,
            shared,
            acceptor: Some(acceptor),
        }
    }

    /// Where destinations connect.
    pub fn addr(&self) -> &PeerAddr {
        &self.addr
    }

    /// Holds every `Pages` frame of kind `Data` on a bulk lane for `delay`
    /// before passing it on (a slow link, so that attacks land mid-transfer).
    pub fn slow_bulk(&self, delay: Duration) {
        *lock(&self.shared.slow_bulk) = delay;
    }

    /// What the attack did, if it fired.
    pub fn tampering(&self) -> Option<Tampering> {
        lock(&self.shared.record).clone()
    }

    /// Waits up to `limit` for the attack to fire; panics if it does not.
    pub fn wait_tampering(&self, limit: Duration) -> Tampering {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(t) = self.tampering() {
                return t;
            }
            assert!(
                Instant::now() < deadline,
                "the proxy's attack {:?} never fired within {limit:?}",
                self.shared.attack
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // Wake the acceptor.
        let _ = TcpStream::connect(self.local);
        if let Some(h) = self.acceptor.take() {
            let _ = h.join();
        }
        for s in lock(&self.shared.sockets).drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn accept_loop(listener: &TcpListener, sh: &Arc<Shared>) {
    for down in listener.incoming() {
        if sh.stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(down) = down else { continue };
        let Ok(up) = TcpStream::connect(&sh.upstream) else {
            let _ = down.shutdown(Shutdown::Both);
            continue;
        };
        let _ = up.set_nodelay(true);
        let _ = down.set_nodelay(true);
        let clones = (
            down.try_clone(),
            up.try_clone(),
            down.try_clone(),
            up.try_clone(),
        );
        let (Ok(d2), Ok(u2), Ok(d3), Ok(u3)) = clones else {
            continue;
        };
        lock(&sh.sockets).extend([d3, u3]);
        let (tx, rx) = mpsc::channel();
        let s2 = sh.clone();
        let _ = std::thread::Builder::new()
            .name("proxy-d2s".into())
            .spawn(move || to_source(down, up, &tx));
        let _ = std::thread::Builder::new()
            .name("proxy-s2d".into())
            .spawn(move || to_destination(u2, d2, &rx, &s2));
    }
}

/// Destination to source: reads the `Hello` (to learn the lane), then relays.
fn to_source(mut down: TcpStream, mut up: TcpStream, lane: &mpsc::Sender<(Lane, u16)>) {
    let mut hello = vec![0u8; FRAME_HEADER_LEN + ringfault_proto::HELLO_BODY_LEN];
    if down.read_exact(&mut hello).is_ok() {
        if let Some((Message::Hello(h), _)) = ringfault_proto::decode_frame(&hello).ok().flatten() {
            let _ = lane.send((h.lane, h.channel));
        }
        if up.write_all(&hello).is_ok() {
            let _ = std::io::copy(&mut down, &mut up);
        }
    }
    let _ = up.shutdown(Shutdown::Both);
    let _ = down.shutdown(Shutdown::Both);
}

/// Reads exactly `n` more bytes onto `buf`; false (with what did arrive
/// appended) at the end of the stream.
fn read_more(r: &mut TcpStream, buf: &mut Vec<u8>, n: usize) -> bool {
    let start = buf.len();
    buf.resize(start + n, 0);
    let mut got = 0;
    while got < n {
        match r.read(&mut buf[start + got..]) {
            Ok(0) | Err(_) => {
                buf.truncate(start + got);
                return false;
            }
            Ok(k) => got += k,
        }
    }
    true
}

/// One frame from the source: its bytes, where its payload starts and ends,
/// and what it is.
struct Frame {
    bytes: Vec<u8>,
    payload: std::ops::Range<usize>,
    msg: Option<Message>,
}

/// Reads one frame (`tag_len` bytes of tag after it). `Err` carries the bytes
/// read before the stream ended or stopped making sense.
fn read_frame(up: &mut TcpStream, tag_len: usize) -> Result<Frame, Vec<u8>> {
    let mut bytes = Vec::with_capacity(64);
    if !read_more(up, &mut bytes, FRAME_HEADER_LEN) {
        return Err(bytes);
    }
    let mut head = [0u8; FRAME_HEADER_LEN];
    head.copy_from_slice(&bytes);
    let Ok(header) = FrameHeader::parse(&head) else {
        return Err(bytes);
    };
    if !read_more(up, &mut bytes, header.body_len_usize()) {
        return Err(bytes);
    }
    let Ok(msg) = Message::decode(&header, &bytes[FRAME_HEADER_LEN..]) else {
        return Err(bytes);
    };
    let (pad, payload) = match &msg {
        Message::Pages(h) if h.kind == PageKind::Data => (
            usize::from(h.pad_len),
            usize::try_from(h.payload_len).unwrap_or(usize::MAX),
        ),
        _ => (0, 0),
    };
    let start = bytes.len() + pad;
    if !read_more(up, &mut bytes, pad + payload + tag_len) {
        return Err(bytes);
    }
    Ok(Frame {
        bytes,
        payload: start..start + payload,
        msg: Some(msg),
    })
}

/// Source to destination: frame by frame, with the attack applied.
fn to_destination(
    mut up: TcpStream,
    mut down: TcpStream,
    lane: &mpsc::Receiver<(Lane, u16)>,
    sh: &Shared,
) {
    let ok = (|| {
        let (lane, channel) = lane.recv_timeout(Duration::from_secs(30)).ok()?;
        // The bare Challenge (or the bare Error that refuses a stranger).
        let challenge = read_frame(&mut up, 0)
            .map_err(|b| down.write_all(&b))
            .ok()?;
        down.write_all(&challenge.bytes).ok()?;
        let mut seq = 0u64;
        let mut data_frames = 0u64;
        let mut replay: Option<(Vec<u8>, u64)> = None;
        loop {
            let mut frame = match read_frame(&mut up, sh.tag_len) {
                Ok(f) => f,
                Err(rest) => {
                    let _ = down.write_all(&rest);
                    return None;
                }
            };
            let pages = match &frame.msg {
                Some(Message::Pages(h)) => Some(*h),
                _ => None,
            };
            let is_data = pages.is_some_and(|h| h.kind == PageKind::Data);
            if is_data {
                data_frames += 1;
            }
            let bulk1 = lane == Lane::Bulk && channel == 1;
            let delay = *lock(&sh.slow_bulk);
            if lane == Lane::Bulk && is_data && !delay.is_zero() {
                std::thread::sleep(delay);
            }
            let mut extra_before: Option<(Vec<u8>, MsgKind)> = None;
            let record = |kind: MsgKind, at: u64, p: Option<PagesHeader>| {
                *lock(&sh.record) = Some(Tampering {
                    lane,
                    channel,
                    seq: at,
                    kind,
                    pages: p.map(|h| (h.region, h.first_page, h.count)),
                });
            };
            match sh.attack {
                Attack::Relay => {}
                Attack::FlipPayloadBit { nth } => {
                    if bulk1 && is_data && data_frames == nth && fire(sh) {
                        let at = frame.payload.start + 100;
                        frame.bytes[at] ^= 0x08;
                        record(MsgKind::Pages, seq, pages);
                    }
                }
                Attack::ForgeCompleteAck { after } => {
                    if lane == Lane::Demand && seq == after && fire(sh) {
                        let mut forged = Message::CompleteAck.to_vec();
                        forged.extend(std::iter::repeat_n(0x5a, sh.tag_len));
                        extra_before = Some((forged, MsgKind::CompleteAck));
                    }
                }
                Attack::RewriteWelcome { lane: which, size } => {
                    let here = match which {
                        Lane::Demand => lane == Lane::Demand,
                        _ => bulk1,
                    };
                    if let Some(Message::Welcome(w)) = &frame.msg {
                        if here && fire(sh) {
                            let mut w = w.clone();
                            for r in &mut w.layout.regions {
                                r.size = size;
                            }
                            let head = Message::Welcome(w).to_vec();
                            assert_eq!(
                                head.len(),
                                frame.bytes.len() - sh.tag_len,
                                "a rewritten Welcome keeps its length"
                            );
                            frame.bytes[..head.len()].copy_from_slice(&head);
                            record(MsgKind::Welcome, seq, None);
                        }
                    }
                }
                Attack::Replay { nth, later } => {
                    if bulk1 && is_data && data_frames == nth && replay.is_none() && fire(sh) {
                        replay = Some((frame.bytes.clone(), seq + later + 1));
                    }
                }
            }
            if let Some((forged, kind)) = extra_before.take() {
                down.write_all(&forged).ok()?;
                record(kind, seq, None);
            }
            down.write_all(&frame.bytes).ok()?;
            seq += 1;
            if let Some((copy, at)) = replay.as_ref() {
                if seq == *at {
                    down.write_all(copy).ok()?;
                    let h = ringfault_proto::decode_frame(copy).ok().flatten().and_then(
                        |(m, _)| match m {
                            Message::Pages(h) => Some(h),
                            _ => None,
                        },
                    );
                    record(MsgKind::Pages, seq, h);
                    replay = None;
                }
            }
        }
    })();
    let _: Option<()> = ok;
    let _ = down.shutdown(Shutdown::Both);
    let _ = up.shutdown(Shutdown::Both);
}

/// Whether the proxy's one attack may fire now (it fires once).
fn fire(sh: &Shared) -> bool {
    !sh.fired.swap(true, Ordering::SeqCst)
}
