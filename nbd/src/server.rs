//! ferry's NBD server: any [`BlockDev`] served to QEMU and to other hosts.
//!
//! Fixed newstyle handshake only; options EXPORT_NAME, GO, INFO, LIST, ABORT,
//! STRUCTURED_REPLY, SET_META_CONTEXT and LIST_META_CONTEXT (`base:allocation`), and
//! ferry's own [`OPT_FERRY_SESSION`], others answered ERR_UNSUP. A client that names
//! its session and connects again (after it lost sight of a connection) gets a barrier:
//! before the new connection is accepted, every earlier one of the session is replaced
//! — nothing it reads from then on is carried out, and whatever it was carrying out has
//! finished — so a request sent again can never be overtaken by its stale first copy. Commands READ, WRITE (FUA), FLUSH, TRIM, WRITE_ZEROES (NO_HOLE,
//! FAST_ZERO), BLOCK_STATUS, DISC. Requests are pipelined: each runs as its own task and
//! hands its whole reply to the connection's writer task, which batches queued replies
//! into few system calls; replies of different requests never interleave mid-chunk. Memory is bounded per connection by a byte budget
//! for payloads in flight; a request larger than [`MAX_REQUEST`] or any stream that is out
//! of step (bad magic, a huge option) ends that connection only.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use diskfmt::{BlockDev, ErrorKind, ExtentKind, Provisioning, WriteFlags};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::Semaphore;

use crate::proto::*;

/// One export: a name clients ask for, and the device behind it.
#[derive(Debug)]
pub struct Export {
    pub name: String,
    pub description: String,
    pub dev: Arc<dyn BlockDev>,
    pub read_only: bool,
}

/// Exports by name; connections look their export up at handshake time.
#[derive(Debug)]
pub struct Server {
    exports: RwLock<HashMap<String, Arc<Export>>>,
    /// LIST is refused (a TCP server whose export names carry a secret).
    private: bool,
    /// One permit per connection being served ([`MAX_CONNECTIONS`]).
    connections: Arc<Semaphore>,
    /// The connections of each named client session ([`OPT_FERRY_SESSION`]).
    sessions: std::sync::Mutex<HashMap<u128, Vec<std::sync::Weak<Replaceable>>>>,
}

/// One connection of a named session: replaced by the session's next connection.
#[derive(Debug, Default)]
struct Replaceable {
    /// Set when a newer connection of the session arrived: nothing more is carried out.
    replaced: std::sync::atomic::AtomicBool,
    /// Held shared by every request being carried out; the replacing connection takes it
    /// exclusively once, to wait for them.
    running: Arc<tokio::sync::RwLock<()>>,
}

impl Default for Server {
    fn default() -> Server {
        Server {
            exports: RwLock::default(),
            private: false,
            connections: Arc::new(Semaphore::new(MAX_CONNECTIONS)),
            sessions: Default::default(),
        }
    }
}

/// Connections served at once per listener kind; more are closed at once.
pub const MAX_CONNECTIONS: usize = 256;
/// A client must finish the handshake within this, or it is disconnected.
pub const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Bytes of payload a connection may have in flight (reads and writes together).
const BUDGET: u32 = 256 << 20;
/// Budget unit: 4 KiB.
const UNIT: u32 = 4096;

fn errno(e: &diskfmt::Error) -> u32 {
    match e.kind() {
        ErrorKind::NoSpace => ENOSPC,
        ErrorKind::InvalidInput => EINVAL,
        ErrorKind::Unsupported => ENOTSUP,
        _ => EIO,
    }
}

impl Server {
    pub fn new() -> Arc<Server> {
        Arc::new(Server::default())
    }

    /// A server that never lists its exports: a client must know an export's name,
    /// which for the agent's TCP exports carries the cluster secret.
    pub fn new_private() -> Arc<Server> {
        Arc::new(Server {
            connections: Arc::new(Semaphore::new(MAX_CONNECTIONS)),
            exports: RwLock::default(),
            private: true,
            sessions: Default::default(),
        })
    }

    /// Adds (or replaces) an export.
    pub fn add(&self, e: Export) {
        self.exports
            .write()
            .expect("exports lock")
            .insert(e.name.clone(), Arc::new(e));
    }

    /// Removes an export; open connections keep serving it until they end.
    pub fn remove(&self, name: &str) -> Option<Arc<Export>> {
        self.exports.write().expect("exports lock").remove(name)
    }

    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<_> = self
            .exports
            .read()
            .expect("exports lock")
            .keys()
            .cloned()
            .collect();
        v.sort();
        v
    }

    fn get(&self, name: &str) -> Option<Arc<Export>> {
        self.exports
            .read()
            .expect("exports lock")
            .get(name)
            .cloned()
    }

    /// Registers a new connection of `session` and replaces every earlier one: returns
    /// once none of them carries anything out any more.
    async fn replace_earlier(&self, session: u128) -> Arc<Replaceable> {
        let me = Arc::new(Replaceable::default());
        let earlier: Vec<Arc<Replaceable>> = {
            let mut all = self.sessions.lock().expect("sessions");
            all.retain(|_, conns| {
                conns.retain(|c| c.strong_count() > 0);
                !conns.is_empty()
            });
            let conns = all.entry(session).or_default();
            let earlier = conns.iter().filter_map(|c| c.upgrade()).collect();
            conns.push(Arc::downgrade(&me));
            earlier
        };
        for c in earlier {
            c.replaced.store(true, std::sync::atomic::Ordering::SeqCst);
            drop(c.running.write().await);
        }
        me
    }

    /// Accepts connections on a unix socket until the listener fails.
    pub async fn serve_unix(self: Arc<Self>, l: tokio::net::UnixListener) -> std::io::Result<()> {
        loop {
            let (s, _) = l.accept().await?;
            let Some(slot) = self.admit("unix socket") else {
                continue;
            };
            let me = Arc::clone(&self);
            tokio::spawn(async move {
                let (rd, wr) = s.into_split();
                if let Err(e) = me.handle_split(rd, wr).await {
                    tracing::debug!("nbd connection ended: {e}");
                }
                drop(slot);
            });
        }
    }

    /// A connection slot, or None (the connection is dropped) when all are taken.
    fn admit(&self, what: &str) -> Option<tokio::sync::OwnedSemaphorePermit> {
        let slot = Arc::clone(&self.connections).try_acquire_owned().ok();
        if slot.is_none() {
            tracing::warn!(
                "nbd: {MAX_CONNECTIONS} connections on the {what} already; closing a new one"
            );
        }
        slot
    }

    /// Accepts connections on TCP until the listener fails.
    pub async fn serve_tcp(self: Arc<Self>, l: tokio::net::TcpListener) -> std::io::Result<()> {
        loop {
            let (s, peer) = l.accept().await?;
            let Some(slot) = self.admit("TCP listener") else {
                continue;
            };
            let _ = s.set_nodelay(true);
            let me = Arc::clone(&self);
            tokio::spawn(async move {
                let (rd, wr) = s.into_split();
                if let Err(e) = me.handle_split(rd, wr).await {
                    tracing::debug!("nbd connection from {peer} ended: {e}");
                }
                drop(slot);
            });
        }
    }

    /// Serves one connection: handshake, then transmission until DISC or EOF.
    pub async fn handle<S>(self: Arc<Self>, stream: S) -> std::io::Result<()>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (rd, wr) = tokio::io::split(stream);
        self.handle_split(rd, wr).await
    }

    /// Serves one connection given as separate read and write halves.
    pub async fn handle_split<R, W>(self: Arc<Self>, rd: R, mut wr: W) -> std::io::Result<()>
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let mut rd = tokio::io::BufReader::with_capacity(256 << 10, rd);
        let negotiated = tokio::time::timeout(HANDSHAKE_TIMEOUT, self.negotiate(&mut rd, &mut wr))
            .await
            .map_err(|_| invalid("the client did not finish the handshake in time"))?;
        let Some(neg) = negotiated? else {
            return Ok(());
        };
        transmit(neg, rd, wr).await
    }

    fn tflags(e: &Export, structured: bool) -> u16 {
        let mut f = TF_HAS_FLAGS
            | TF_SEND_FLUSH
            | TF_SEND_FUA
            | TF_SEND_TRIM
            | TF_SEND_WRITE_ZEROES
            | TF_SEND_FAST_ZERO
            | TF_CAN_MULTI_CONN;
        if structured {
            f |= TF_SEND_DF;
        }
        if e.read_only {
            f |= TF_READ_ONLY;
        }
        f
    }

    /// The option haggling. None: the client went away or aborted.
    async fn negotiate<R, W>(&self, rd: &mut R, wr: &mut W) -> std::io::Result<Option<Negotiated>>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let mut hello = Vec::with_capacity(18);
        hello.extend_from_slice(&NBDMAGIC.to_be_bytes());
        hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
        hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
        wr.write_all(&hello).await?;
        let cflags = rd.read_u32().await?;
        if cflags & CLIENT_FIXED_NEWSTYLE == 0
            || cflags & !(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES) != 0
        {
            return Err(invalid(
                "client does not speak fixed newstyle, or sent unknown flags",
            ));
        }
        let no_zeroes = cflags & CLIENT_NO_ZEROES != 0;
        let mut structured = false;
        let mut meta = false;
        let mut session = None;
        loop {
            let mut h = [0u8; OptionHeader::LEN];
            rd.read_exact(&mut h).await?;
            let Some(h) = OptionHeader::parse(&h) else {
                return Err(invalid("option without IHAVEOPT"));
            };
            if h.length > MAX_OPTION_LEN {
                return Err(invalid("option payload too large"));
            }
            let mut data = vec![0u8; h.length as usize];
            rd.read_exact(&mut data).await?;
            let reply = |kind: u32, d: &[u8]| option_reply(h.option, kind, d);
            match h.option {
                OPT_EXPORT_NAME => {
                    let name = String::from_utf8_lossy(&data).into_owned();
                    let Some(e) = self.get(&name) else {
                        return Err(invalid("EXPORT_NAME of an unknown export"));
                    };
                    let mut out = Vec::with_capacity(134);
                    out.extend_from_slice(&e.dev.size().to_be_bytes());
                    out.extend_from_slice(&Self::tflags(&e, structured).to_be_bytes());
                    if !no_zeroes {
                        out.extend_from_slice(&[0u8; 124]);
                    }
                    wr.write_all(&out).await?;
                    return Ok(Some(Negotiated {
                        export: e,
                        structured,
                        meta,
                        session,
                    }));
                }
                OPT_ABORT => {
                    let _ = wr.write_all(&reply(REP_ACK, &[])).await;
                    return Ok(None);
                }
                OPT_LIST => {
                    if !data.is_empty() {
                        wr.write_all(&reply(REP_ERR_INVALID, &[])).await?;
                        continue;
                    }
                    if self.private {
                        wr.write_all(&reply(REP_ERR_POLICY, b"exports are not listed here"))
                            .await?;
                        continue;
                    }
                    for n in self.names() {
                        let mut d = (n.len() as u32).to_be_bytes().to_vec();
                        d.extend_from_slice(n.as_bytes());
                        wr.write_all(&reply(REP_SERVER, &d)).await?;
                    }
                    wr.write_all(&reply(REP_ACK, &[])).await?;
                }
                OPT_STRUCTURED_REPLY => {
                    if !data.is_empty() {
                        wr.write_all(&reply(REP_ERR_INVALID, &[])).await?;
                        continue;
                    }
                    structured = true;
                    wr.write_all(&reply(REP_ACK, &[])).await?;
                }
                OPT_INFO | OPT_GO => {
                    let Some(req) = InfoRequest::parse(&data) else {
                        wr.write_all(&reply(REP_ERR_INVALID, &[])).await?;
                        continue;
                    };
                    let Some(e) = self.get(&req.name) else {
                        let msg = format!("no export named {:?}", req.name);
                        wr.write_all(&reply(REP_ERR_UNKNOWN, msg.as_bytes()))
                            .await?;
                        continue;
                    };
                    let mut info = INFO_EXPORT.to_be_bytes().to_vec();
                    info.extend_from_slice(&e.dev.size().to_be_bytes());
                    info.extend_from_slice(&Self::tflags(&e, structured).to_be_bytes());
                    wr.write_all(&reply(REP_INFO, &info)).await?;
                    if req.infos.contains(&INFO_NAME) {
                        let mut d = INFO_NAME.to_be_bytes().to_vec();
                        d.extend_from_slice(e.name.as_bytes());
                        wr.write_all(&reply(REP_INFO, &d)).await?;
                    }
                    if req.infos.contains(&INFO_DESCRIPTION) && !e.description.is_empty() {
                        let mut d = INFO_DESCRIPTION.to_be_bytes().to_vec();
                        d.extend_from_slice(e.description.as_bytes());
                        wr.write_all(&reply(REP_INFO, &d)).await?;
                    }
                    let mut d = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
                    d.extend_from_slice(&e.dev.logical_block_size().to_be_bytes());
                    d.extend_from_slice(&e.dev.physical_block_size().max(4096).to_be_bytes());
                    d.extend_from_slice(&MAX_REQUEST.to_be_bytes());
                    wr.write_all(&reply(REP_INFO, &d)).await?;
                    wr.write_all(&reply(REP_ACK, &[])).await?;
                    if h.option == OPT_GO {
                        return Ok(Some(Negotiated {
                            export: e,
                            structured,
                            meta,
                            session,
                        }));
                    }
                }
                OPT_SET_META_CONTEXT | OPT_LIST_META_CONTEXT => {
                    let set = h.option == OPT_SET_META_CONTEXT;
                    if !structured {
                        wr.write_all(&reply(
                            REP_ERR_INVALID,
                            b"negotiate structured replies first",
                        ))
                        .await?;
                        continue;
                    }
                    let Some(req) = MetaRequest::parse(&data) else {
                        wr.write_all(&reply(REP_ERR_INVALID, &[])).await?;
                        continue;
                    };
                    if self.get(&req.export).is_none() {
                        wr.write_all(&reply(REP_ERR_UNKNOWN, &[])).await?;
                        continue;
                    }
                    let wanted = (!set && req.queries.is_empty())
                        || req
                            .queries
                            .iter()
                            .any(|q| q == BASE_ALLOCATION || (!set && q == "base:"));
                    if set {
                        meta = wanted;
                    }
                    if wanted {
                        let mut d = BASE_ALLOCATION_ID.to_be_bytes().to_vec();
                        d.extend_from_slice(BASE_ALLOCATION.as_bytes());
                        wr.write_all(&reply(REP_META_CONTEXT, &d)).await?;
                    }
                    wr.write_all(&reply(REP_ACK, &[])).await?;
                }
                OPT_FERRY_SESSION => {
                    let Ok(id) = <[u8; 16]>::try_from(&data[..]) else {
                        wr.write_all(&reply(REP_ERR_INVALID, &[])).await?;
                        continue;
                    };
                    if session.is_none() {
                        session = Some(self.replace_earlier(u128::from_be_bytes(id)).await);
                    }
                    wr.write_all(&reply(REP_ACK, &[])).await?;
                }
                _ => {
                    wr.write_all(&reply(REP_ERR_UNSUP, &[])).await?;
                }
            }
        }
    }
}

fn invalid(msg: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, msg.to_string())
}

/// What the handshake settled.
#[derive(Debug)]
struct Negotiated {
    export: Arc<Export>,
    structured: bool,
    meta: bool,
    /// Set when the client named its session.
    session: Option<Arc<Replaceable>>,
}

/// Large buffers a connection reuses for write payloads and read replies, so a 1 MiB
/// request does not map, fault in and unmap fresh memory each time. Holds at most
/// [`Bufs::KEEP`] bytes.
#[derive(Debug, Default)]
struct Bufs(std::sync::Mutex<(Vec<Vec<u8>>, usize)>);

impl Bufs {
    const KEEP: usize = 64 << 20;
    const MIN: usize = 64 << 10;

    /// A zero-filled buffer of `len` bytes.
    fn take(&self, len: usize) -> Vec<u8> {
        let reused = if len >= Self::MIN {
            let mut g = self.0.lock().expect("bufs");
            let i = g.0.iter().position(|b| b.capacity() >= len);
            i.map(|i| {
                let b = g.0.swap_remove(i);
                g.1 -= b.capacity();
                b
            })
        } else {
            None
        };
        let mut v = reused.unwrap_or_default();
        v.clear();
        v.resize(len, 0);
        v
    }

    /// Keeps a buffer for later, if it is large and there is room.
    fn give(&self, v: Vec<u8>) {
        if v.capacity() < Self::MIN {
            return;
        }
        let mut g = self.0.lock().expect("bufs");
        if g.1 + v.capacity() <= Self::KEEP {
            g.1 += v.capacity();
            g.0.push(v);
        }
    }
}

/// A reply queued for the writer, with the share of the connection's byte budget its
/// request took: released only once the reply is written, so a client that sends
/// requests but never reads replies stops being read instead of growing the queue.
type Queued = (Vec<u8>, tokio::sync::OwnedSemaphorePermit);

/// The connection's writer: sends the replies request tasks queue, batching whatever is
/// queued into as few system calls as it can, and hands large buffers back for reuse.
async fn writer<W: AsyncWrite + Unpin>(
    mut rx: tokio::sync::mpsc::UnboundedReceiver<Queued>,
    wr: W,
    bufs: Arc<Bufs>,
) -> std::io::Result<W> {
    let mut w = tokio::io::BufWriter::with_capacity(256 << 10, wr);
    while let Some((first, permit)) = rx.recv().await {
        w.write_all(&first).await?;
        bufs.give(first);
        drop(permit);
        while let Ok((more, permit)) = rx.try_recv() {
            w.write_all(&more).await?;
            bufs.give(more);
            drop(permit);
        }
        w.flush().await?;
    }
    Ok(w.into_inner())
}

/// The transmission phase: read requests, run each as a task, until DISC or EOF.
async fn transmit<R, W>(neg: Negotiated, mut rd: R, wr: W) -> std::io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let bufs = Arc::new(Bufs::default());
    let writer = tokio::spawn(writer(rx, wr, Arc::clone(&bufs)));
    let budget = Arc::new(Semaphore::new((BUDGET / UNIT) as usize));
    let neg = Arc::new(neg);
    let mut tasks = tokio::task::JoinSet::new();
    let result = loop {
        // Reap finished requests as we go.
        while tasks.try_join_next().is_some() {}
        let mut h = [0u8; Request::LEN];
        if let Err(e) = rd.read_exact(&mut h).await {
            break if e.kind() == std::io::ErrorKind::UnexpectedEof {
                Ok(())
            } else {
                Err(e)
            };
        }
        let req = match Request::parse(&h) {
            Ok(r) => r,
            Err(HeaderError::BadMagic(m)) => {
                break Err(invalid(&format!("bad request magic {m:#x}")))
            }
        };
        if req.kind == CMD_DISC {
            break Ok(());
        }
        let payload_len = if req.kind == CMD_WRITE { req.length } else { 0 };
        let too_large = req.length > MAX_REQUEST && matches!(req.kind, CMD_READ | CMD_WRITE);
        if too_large && req.kind == CMD_WRITE {
            // The payload cannot be skipped safely: end the connection.
            break Err(invalid("write larger than the advertised maximum"));
        }
        let units = if too_large {
            1
        } else {
            (req.length.div_ceil(UNIT)).max(1)
        };
        let permit = match Arc::clone(&budget)
            .acquire_many_owned(units.min(BUDGET / UNIT))
            .await
        {
            Ok(p) => p,
            Err(_) => break Ok(()),
        };
        if too_large {
            let reply = error_reply(&neg, req.cookie, EOVERFLOW, "request too large");
            let _ = tx.send((reply, permit));
            continue;
        }
        let mut payload = bufs.take(payload_len as usize);
        if let Err(e) = rd.read_exact(&mut payload).await {
            break Err(e);
        }
        let running = match &neg.session {
            Some(s) => {
                let g = Arc::clone(&s.running).read_owned().await;
                if s.replaced.load(std::sync::atomic::Ordering::SeqCst) {
                    break Err(invalid(
                        "a newer connection of this client replaced this one",
                    ));
                }
                Some(g)
            }
            None => None,
        };
        let (neg, tx, bufs) = (Arc::clone(&neg), tx.clone(), Arc::clone(&bufs));
        tasks.spawn(async move {
            let reply = run(&neg, req, payload, &bufs).await;
            drop(running);
            let _ = tx.send((reply, permit));
        });
    };
    // Finish what was asked before the client went away, then make it durable.
    while tasks.join_next().await.is_some() {}
    if !neg.export.read_only {
        let _ = neg.export.dev.flush().await;
    }
    drop(tx);
    if let Ok(Ok(mut w)) = writer.await {
        let _ = w.shutdown().await;
    }
    result
}

fn error_reply(neg: &Negotiated, cookie: u64, errno: u32, msg: &str) -> Vec<u8> {
    if neg.structured {
        error_chunk(cookie, errno, msg)
    } else {
        simple_reply(cookie, errno).to_vec()
    }
}

fn ok_reply(neg: &Negotiated, cookie: u64) -> Vec<u8> {
    if neg.structured {
        chunk_header(cookie, REPLY_FLAG_DONE, REPLY_TYPE_NONE, 0).to_vec()
    } else {
        simple_reply(cookie, 0).to_vec()
    }
}

fn finish(neg: &Negotiated, cookie: u64, r: diskfmt::Result<()>) -> Vec<u8> {
    match r {
        Ok(()) => ok_reply(neg, cookie),
        Err(err) => error_reply(neg, cookie, errno(&err), &err.to_string()),
    }
}

/// Runs one request; returns its whole reply.
async fn run(neg: &Negotiated, req: Request, payload: Vec<u8>, bufs: &Bufs) -> Vec<u8> {
    let e = &neg.export;
    let dev = &*e.dev;
    let writes = matches!(req.kind, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
    if writes && e.read_only {
        return error_reply(neg, req.cookie, EPERM, "the export is read-only");
    }
    let ranged = matches!(
        req.kind,
        CMD_READ | CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES | CMD_BLOCK_STATUS
    );
    if ranged && !req.in_range(dev.size()) {
        return error_reply(
            neg,
            req.cookie,
            EINVAL,
            "request beyond the end of the export",
        );
    }
    let fua = req.flags & CMD_FLAG_FUA != 0;
    match req.kind {
        CMD_READ => {
            // The reply header and the data in one buffer: the data is read in place.
            let head = if neg.structured { 28 } else { 16 };
            let mut v = bufs.take(head + req.length as usize);
            match dev.read(req.offset, &mut v[head..]).await {
                Ok(()) => {
                    if neg.structured {
                        v[..20].copy_from_slice(&chunk_header(
                            req.cookie,
                            REPLY_FLAG_DONE,
                            REPLY_TYPE_OFFSET_DATA,
                            8 + req.length,
                        ));
                        v[20..28].copy_from_slice(&req.offset.to_be_bytes());
                    } else {
                        v[..16].copy_from_slice(&simple_reply(req.cookie, 0));
                    }
                    v
                }
                Err(err) => error_reply(neg, req.cookie, errno(&err), &err.to_string()),
            }
        }
        CMD_WRITE => {
            let flags = if fua {
                WriteFlags::FUA
            } else {
                WriteFlags::NONE
            };
            let r = dev.write(req.offset, &payload, flags).await;
            bufs.give(payload);
            finish(neg, req.cookie, r)
        }
        CMD_FLUSH => finish(neg, req.cookie, dev.flush().await),
        CMD_TRIM => {
            let mut r = dev.discard(req.offset, req.length as u64).await;
            if r.is_ok() && fua {
                r = dev.flush().await;
            }
            finish(neg, req.cookie, r)
        }
        CMD_WRITE_ZEROES => {
            if req.flags & CMD_FLAG_FAST_ZERO != 0 && dev.provisioning() == Provisioning::EagerThick
            {
                // Zeroing eager-thick space writes zeros: not faster than the client's own.
                return error_reply(neg, req.cookie, ENOTSUP, "zeroing is not fast here");
            }
            let unmap = req.flags & CMD_FLAG_NO_HOLE == 0;
            let mut r = dev.write_zeroes(req.offset, req.length as u64, unmap).await;
            if r.is_ok() && fua {
                r = dev.flush().await;
            }
            finish(neg, req.cookie, r)
        }
        CMD_BLOCK_STATUS => {
            if !neg.structured || !neg.meta {
                return error_reply(neg, req.cookie, EINVAL, "no meta context was negotiated");
            }
            if req.length == 0 {
                return error_reply(neg, req.cookie, EINVAL, "empty block status request");
            }
            match dev.block_status(req.offset, req.length as u64).await {
                Ok(ext) => {
                    let end = req.offset + req.length as u64;
                    let mut d = BASE_ALLOCATION_ID.to_be_bytes().to_vec();
                    for x in ext.iter().filter(|x| x.offset < end) {
                        let len = (x.end().min(end) - x.offset) as u32;
                        let flags = match x.kind {
                            ExtentKind::Data => 0,
                            ExtentKind::Zero => STATE_ZERO,
                            ExtentKind::Hole => STATE_HOLE | STATE_ZERO,
                        };
                        d.extend_from_slice(&len.to_be_bytes());
                        d.extend_from_slice(&flags.to_be_bytes());
                        if req.flags & CMD_FLAG_REQ_ONE != 0 {
                            break;
                        }
                    }
                    let mut v = chunk_header(
                        req.cookie,
                        REPLY_FLAG_DONE,
                        REPLY_TYPE_BLOCK_STATUS,
                        d.len() as u32,
                    )
                    .to_vec();
                    v.extend_from_slice(&d);
                    v
                }
                Err(err) => error_reply(neg, req.cookie, errno(&err), &err.to_string()),
            }
        }
        _ => error_reply(neg, req.cookie, EINVAL, "unknown command"),
    }
}
