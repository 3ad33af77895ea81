//! ferry's NBD client: a remote export as a [`BlockDev`] (structured replies,
//! `base:allocation` block status, WRITE_ZEROES, TRIM, FUA, FLUSH), used to mirror into
//! another host's export. Requests are pipelined over one connection: a reader task
//! matches replies to requests by cookie. A lost connection fails every request in
//! flight, unless the client was made with [`NbdClient::reconnect_for`]: then each such
//! request waits while the client connects again (for at most that long, to an export of
//! the same size) and is sent again — as QEMU's `reconnect-delay` does. Requests in
//! flight together carry no order, so sending them again in any order is allowed. Every
//! connection names the client's session ([`OPT_FERRY_SESSION`]): ferry's server then
//! replaces the lost connection before it accepts the new one, so a first copy still in
//! flight there can never land after the copy sent again, or after a later write. (A
//! server without the option, such as qemu-nbd, gives no such barrier.)

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use diskfmt::{BlockDev, Extent, ExtentKind, IoFuture, Provisioning, WriteFlags};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::oneshot;

use crate::proto::*;

type Writer = Box<dyn AsyncWrite + Unpin + Send>;

/// What a finished request carries back.
#[derive(Debug, Default)]
struct Outcome {
    data: Vec<u8>,
    extents: Vec<(u32, u32)>,
    error: Option<(u32, String)>,
}

#[derive(Debug)]
struct Pending {
    /// For reads: where the data goes (offset of the request, the buffer).
    offset: u64,
    read_len: u32,
    out: Outcome,
    tx: Option<oneshot::Sender<std::io::Result<Outcome>>>,
}

/// Where the export is.
#[derive(Debug, Clone)]
enum Endpoint {
    Unix(PathBuf),
    Tcp(String),
}

/// One connection's transmission state.
struct Conn {
    writer: tokio::sync::Mutex<Writer>,
    pending: Arc<Mutex<Option<HashMap<u64, Pending>>>>,
    /// The socket (alive as long as `writer` is), to shut down under a stuck write.
    fd: std::os::fd::RawFd,
    /// A request's bytes are being written; still set when the next writer comes, the
    /// writing future was dropped part-way and the stream is torn.
    mid_write: std::sync::atomic::AtomicBool,
}

/// What the handshake learnt.
#[derive(Debug, Clone, Copy)]
struct Info {
    size: u64,
    tflags: u16,
    structured: bool,
    meta: Option<u32>,
    min_block: u32,
    pref_block: u32,
    max_request: u32,
}

/// A request failed because the connection went away, or the server answered an error.
enum Failure {
    Connection(std::io::Error),
    Other(diskfmt::Error),
}

/// A connection to one export.
pub struct NbdClient {
    name: PathBuf,
    endpoint: Endpoint,
    export: String,
    size: u64,
    tflags: u16,
    structured: bool,
    meta: Option<u32>,
    min_block: u32,
    pref_block: u32,
    max_request: u32,
    conn: Mutex<Arc<Conn>>,
    cookie: AtomicU64,
    reconnect: std::time::Duration,
    reconnecting: tokio::sync::Mutex<()>,
    /// Set by [`NbdClient::close`]: no request and no reconnection from then on.
    closed: std::sync::atomic::AtomicBool,
    /// Named to the server on every connection ([`OPT_FERRY_SESSION`]).
    session: u128,
}

impl std::fmt::Debug for NbdClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdClient")
            .field("name", &self.name)
            .field("size", &self.size)
            .finish()
    }
}

fn bad(msg: impl Into<String>) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, msg.into())
}

async fn send_option<W: AsyncWrite + Unpin>(
    w: &mut W,
    opt: u32,
    data: &[u8],
) -> std::io::Result<()> {
    let mut m = IHAVEOPT.to_be_bytes().to_vec();
    m.extend_from_slice(&opt.to_be_bytes());
    m.extend_from_slice(&(data.len() as u32).to_be_bytes());
    m.extend_from_slice(data);
    w.write_all(&m).await
}

async fn read_option_reply<R: AsyncRead + Unpin>(
    r: &mut R,
    opt: u32,
) -> std::io::Result<(u32, Vec<u8>)> {
    let mut h = [0u8; 20];
    r.read_exact(&mut h).await?;
    if u64::from_be_bytes(h[0..8].try_into().expect("8")) != REPLY_MAGIC
        || u32::from_be_bytes(h[8..12].try_into().expect("4")) != opt
    {
        return Err(bad("option reply out of step"));
    }
    let kind = u32::from_be_bytes(h[12..16].try_into().expect("4"));
    let len = u32::from_be_bytes(h[16..20].try_into().expect("4"));
    if len > MAX_OPTION_LEN {
        return Err(bad("option reply too large"));
    }
    let mut d = vec![0u8; len as usize];
    r.read_exact(&mut d).await?;
    Ok((kind, d))
}

impl NbdClient {
    /// Connects to `export` over the unix socket `path`.
    pub async fn connect_unix(path: &Path, export: &str) -> std::io::Result<NbdClient> {
        let name = PathBuf::from(format!("nbd+unix:///{export}?socket={}", path.display()));
        Self::connect(name, Endpoint::Unix(path.to_path_buf()), export).await
    }

    /// Connects to `export` at a TCP address.
    pub async fn connect_tcp(addr: &str, export: &str) -> std::io::Result<NbdClient> {
        let name = PathBuf::from(format!("nbd://{addr}/{export}"));
        Self::connect(name, Endpoint::Tcp(addr.to_string()), export).await
    }

    async fn connect(
        name: PathBuf,
        endpoint: Endpoint,
        export: &str,
    ) -> std::io::Result<NbdClient> {
        let session = uuid::Uuid::new_v4().as_u128();
        let (conn, info) = Self::open(&name, &endpoint, export, session).await?;
        Ok(NbdClient {
            name,
            endpoint,
            export: export.to_string(),
            size: info.size,
            tflags: info.tflags,
            structured: info.structured,
            meta: info.meta,
            min_block: info.min_block,
            pref_block: info.pref_block,
            max_request: info.max_request,
            conn: Mutex::new(Arc::new(conn)),
            cookie: AtomicU64::new(1),
            reconnect: std::time::Duration::ZERO,
            reconnecting: tokio::sync::Mutex::new(()),
            closed: std::sync::atomic::AtomicBool::new(false),
            session,
        })
    }

    /// Makes requests that lose their connection wait up to `bound` for a new one and
    /// then go again (zero, the default: they fail at once).
    pub fn reconnect_for(mut self, bound: std::time::Duration) -> NbdClient {
        self.reconnect = bound;
        self
    }

    async fn open(
        name: &Path,
        endpoint: &Endpoint,
        export: &str,
        session: u128,
    ) -> std::io::Result<(Conn, Info)> {
        match endpoint {
            Endpoint::Unix(path) => {
                let s = tokio::net::UnixStream::connect(path).await?;
                let fd = std::os::fd::AsRawFd::as_raw_fd(&s);
                let (r, w) = s.into_split();
                Self::handshake(name, r, Box::new(w), export, fd, session).await
            }
            Endpoint::Tcp(addr) => {
                let s = tokio::net::TcpStream::connect(addr).await?;
                let _ = s.set_nodelay(true);
                let fd = std::os::fd::AsRawFd::as_raw_fd(&s);
                let (r, w) = s.into_split();
                Self::handshake(name, r, Box::new(w), export, fd, session).await
            }
        }
    }

    /// Ends the client for good: requests in flight fail, later ones fail at once, and
    /// it never reconnects (a request held somewhere cannot reach the export later).
    pub fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        let conn = Arc::clone(&self.conn.lock().expect("conn"));
        // Dropping the waiters fails every request in flight; shutting the socket down
        // ends a write stuck on a dead link (without waiting for the writer's lock).
        conn.pending.lock().expect("pending").take();
        // (`conn` holds the write half, so the descriptor is still this socket.)
        let _ = nix::sys::socket::shutdown(conn.fd, nix::sys::socket::Shutdown::Both);
    }

    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    /// Connects again after the connection was lost (once for all requests that saw
    /// `failed` go), for at most the reconnect bound.
    async fn reconnect(&self, failed: &Arc<Conn>) -> std::io::Result<()> {
        let _g = self.reconnecting.lock().await;
        if !Arc::ptr_eq(&self.conn.lock().expect("conn"), failed) {
            return Ok(());
        }
        let deadline = tokio::time::Instant::now() + self.reconnect;
        let mut last;
        loop {
            if self.is_closed() {
                return Err(bad("the client was closed"));
            }
            match Self::open(&self.name, &self.endpoint, &self.export, self.session).await {
                Ok((conn, info)) if info.size == self.size => {
                    tracing::info!("{}: reconnected", self.name.display());
                    *self.conn.lock().expect("conn") = Arc::new(conn);
                    return Ok(());
                }
                Ok((_, info)) => {
                    return Err(bad(format!(
                        "the export came back with size {} instead of {}",
                        info.size, self.size
                    )))
                }
                Err(e) => last = e,
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(std::io::Error::new(
                    last.kind(),
                    format!(
                        "no reconnection within {:.1}s: {last}",
                        self.reconnect.as_secs_f64()
                    ),
                ));
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }

    async fn handshake<R>(
        name: &Path,
        r: R,
        mut w: Writer,
        export: &str,
        fd: std::os::fd::RawFd,
        session: u128,
    ) -> std::io::Result<(Conn, Info)>
    where
        R: AsyncRead + Unpin + Send + 'static,
    {
        let mut r = tokio::io::BufReader::new(r);
        let mut hello = [0u8; 18];
        r.read_exact(&mut hello).await?;
        if u64::from_be_bytes(hello[0..8].try_into().expect("8")) != NBDMAGIC
            || u64::from_be_bytes(hello[8..16].try_into().expect("8")) != IHAVEOPT
        {
            return Err(bad("not a newstyle NBD server"));
        }
        let hflags = u16::from_be_bytes(hello[16..18].try_into().expect("2"));
        if hflags & FLAG_FIXED_NEWSTYLE == 0 {
            return Err(bad("the server does not speak fixed newstyle"));
        }
        let mut cflags = CLIENT_FIXED_NEWSTYLE;
        if hflags & FLAG_NO_ZEROES != 0 {
            cflags |= CLIENT_NO_ZEROES;
        }
        w.write_all(&cflags.to_be_bytes()).await?;
        send_option(&mut w, OPT_STRUCTURED_REPLY, &[]).await?;
        let structured = read_option_reply(&mut r, OPT_STRUCTURED_REPLY).await?.0 == REP_ACK;
        let mut meta = None;
        if structured {
            let mut d = (export.len() as u32).to_be_bytes().to_vec();
            d.extend_from_slice(export.as_bytes());
            d.extend_from_slice(&1u32.to_be_bytes());
            d.extend_from_slice(&(BASE_ALLOCATION.len() as u32).to_be_bytes());
            d.extend_from_slice(BASE_ALLOCATION.as_bytes());
            send_option(&mut w, OPT_SET_META_CONTEXT, &d).await?;
            loop {
                let (kind, d) = read_option_reply(&mut r, OPT_SET_META_CONTEXT).await?;
                match kind {
                    REP_META_CONTEXT if d.len() >= 4 && &d[4..] == BASE_ALLOCATION.as_bytes() => {
                        meta = Some(u32::from_be_bytes(d[0..4].try_into().expect("4")));
                    }
                    REP_META_CONTEXT => {}
                    _ => break,
                }
            }
        }
        // Before GO: ferry's server answers once every earlier connection of this
        // session is replaced.
        send_option(&mut w, OPT_FERRY_SESSION, &session.to_be_bytes()).await?;
        match read_option_reply(&mut r, OPT_FERRY_SESSION).await? {
            (REP_ACK | REP_ERR_UNSUP, _) => {}
            (_, d) => {
                return Err(bad(format!(
                    "the server refused the session: {}",
                    String::from_utf8_lossy(&d)
                )))
            }
        }
        let mut d = (export.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(export.as_bytes());
        d.extend_from_slice(&1u16.to_be_bytes());
        d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        send_option(&mut w, OPT_GO, &d).await?;
        let (mut size, mut tflags) = (None, 0u16);
        let (mut min_block, mut pref_block, mut max_request) = (512u32, 4096u32, MAX_REQUEST);
        loop {
            let (kind, d) = read_option_reply(&mut r, OPT_GO).await?;
            match kind {
                REP_ACK => break,
                REP_INFO if d.len() >= 12 && u16::from_be_bytes([d[0], d[1]]) == INFO_EXPORT => {
                    size = Some(u64::from_be_bytes(d[2..10].try_into().expect("8")));
                    tflags = u16::from_be_bytes([d[10], d[11]]);
                }
                REP_INFO
                    if d.len() >= 14 && u16::from_be_bytes([d[0], d[1]]) == INFO_BLOCK_SIZE =>
                {
                    min_block = u32::from_be_bytes(d[2..6].try_into().expect("4")).max(1);
                    pref_block = u32::from_be_bytes(d[6..10].try_into().expect("4")).max(min_block);
                    max_request = u32::from_be_bytes(d[10..14].try_into().expect("4"))
                        .clamp(min_block, MAX_REQUEST);
                }
                REP_INFO => {}
                e if e >= REP_ERR_UNSUP => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        format!(
                            "{}: the server refused export {export:?}: {}",
                            name.display(),
                            String::from_utf8_lossy(&d)
                        ),
                    ))
                }
                _ => return Err(bad("unexpected reply to GO")),
            }
        }
        let size = size.ok_or_else(|| bad("the server sent no export size"))?;
        let pending: Arc<Mutex<Option<HashMap<u64, Pending>>>> =
            Arc::new(Mutex::new(Some(HashMap::new())));
        let p2 = Arc::clone(&pending);
        tokio::spawn(async move {
            let err = read_replies(&mut r, &p2)
                .await
                .err()
                .unwrap_or_else(|| bad("connection closed"));
            // Fail everything in flight, and everything later.
            if let Some(map) = p2.lock().expect("pending").take() {
                for (_, mut p) in map {
                    if let Some(tx) = p.tx.take() {
                        let _ = tx.send(Err(std::io::Error::new(err.kind(), err.to_string())));
                    }
                }
            }
        });
        Ok((
            Conn {
                writer: tokio::sync::Mutex::new(w),
                pending,
                fd,
                mid_write: std::sync::atomic::AtomicBool::new(false),
            },
            Info {
                size,
                tflags,
                structured,
                meta,
                min_block,
                pref_block,
                max_request,
            },
        ))
    }

    /// Sends one request and waits for its reply, reconnecting (within the bound) when
    /// the connection goes away.
    async fn request(
        &self,
        kind: u16,
        flags: u16,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) -> diskfmt::Result<Outcome> {
        loop {
            if self.is_closed() {
                return Err(self.io_err("request", offset, bad("the client was closed")));
            }
            let conn = Arc::clone(&self.conn.lock().expect("conn"));
            match self
                .request_on(&conn, kind, flags, offset, length, payload)
                .await
            {
                Ok(out) => return Ok(out),
                Err(Failure::Other(e)) => return Err(e),
                Err(Failure::Connection(e)) if self.reconnect.is_zero() => {
                    return Err(self.io_err("request", offset, e))
                }
                Err(Failure::Connection(e)) => {
                    tracing::warn!(
                        "{}: connection lost ({e}); reconnecting",
                        self.name.display()
                    );
                    self.reconnect(&conn)
                        .await
                        .map_err(|e| self.io_err("reconnect", offset, e))?;
                }
            }
        }
    }

    /// One request on one connection.
    async fn request_on(
        &self,
        conn: &Conn,
        kind: u16,
        flags: u16,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) -> Result<Outcome, Failure> {
        let cookie = self.cookie.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        let read_len = if kind == CMD_READ { length } else { 0 };
        {
            let mut g = conn.pending.lock().expect("pending");
            let Some(map) = g.as_mut() else {
                return Err(Failure::Connection(bad("the connection is closed")));
            };
            map.insert(
                cookie,
                Pending {
                    offset,
                    read_len,
                    out: Outcome::default(),
                    tx: Some(tx),
                },
            );
        }
        let hdr = Request {
            flags,
            kind,
            cookie,
            offset,
            length,
        }
        .encode();
        {
            let mut w = conn.writer.lock().await;
            // A request dropped part-way (its caller gave up) left part of it on the wire:
            // whatever came next would be read as the rest of it, guest data as requests.
            // That connection is dead; its requests are sent again on a new one.
            if conn.mid_write.swap(true, Ordering::SeqCst) {
                let _ = nix::sys::socket::shutdown(conn.fd, nix::sys::socket::Shutdown::Both);
                if let Some(m) = conn.pending.lock().expect("pending").as_mut() {
                    m.remove(&cookie);
                }
                return Err(Failure::Connection(bad(
                    "an earlier request was abandoned part-way through its write",
                )));
            }
            let sent = async {
                w.write_all(&hdr).await?;
                if !payload.is_empty() {
                    w.write_all(payload).await?;
                }
                w.flush().await
            }
            .await;
            if sent.is_ok() {
                conn.mid_write.store(false, Ordering::SeqCst);
            }
            if let Err(e) = sent {
                if let Some(m) = conn.pending.lock().expect("pending").as_mut() {
                    m.remove(&cookie);
                }
                return Err(Failure::Connection(e));
            }
        }
        let out = rx
            .await
            .map_err(|_| Failure::Connection(bad("the connection is closed")))?
            .map_err(Failure::Connection)?;
        if let Some((errno, msg)) = &out.error {
            return Err(Failure::Other(self.io_err(
                "request",
                offset,
                std::io::Error::new(
                    std::io::Error::from_raw_os_error(*errno as i32).kind(),
                    format!(
                        "{} (server: {msg})",
                        std::io::Error::from_raw_os_error(*errno as i32)
                    ),
                ),
            )));
        }
        Ok(out)
    }

    fn io_err(&self, op: &'static str, offset: u64, err: std::io::Error) -> diskfmt::Error {
        diskfmt::Error::Io {
            object: self.name.clone(),
            op,
            offset,
            err,
        }
    }

    fn check(&self, offset: u64, len: u64) -> diskfmt::Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(diskfmt::Error::Invalid {
                object: self.name.clone(),
                detail: format!(
                    "request at offset {offset} of {len} bytes is beyond the end ({} bytes)",
                    self.size
                ),
            }),
        }
    }

    /// Splits `offset..offset+len` into requests of at most `max`.
    fn pieces(offset: u64, len: u64, max: u64) -> impl Iterator<Item = (u64, u64)> {
        let end = offset + len;
        (0..)
            .map(move |i| offset + i * max)
            .take_while(move |&o| o < end)
            .map(move |o| (o, max.min(end - o)))
    }
}

/// The reader task: matches replies to requests until the stream ends or is out of step.
async fn read_replies<R: AsyncRead + Unpin>(
    r: &mut R,
    pending: &Mutex<Option<HashMap<u64, Pending>>>,
) -> std::io::Result<()> {
    let take = |cookie: u64| -> std::io::Result<Pending> {
        pending
            .lock()
            .expect("pending")
            .as_mut()
            .and_then(|m| m.remove(&cookie))
            .ok_or_else(|| bad(format!("reply for unknown cookie {cookie}")))
    };
    let put_back = |cookie: u64, p: Pending| {
        if let Some(m) = pending.lock().expect("pending").as_mut() {
            m.insert(cookie, p);
        }
    };
    loop {
        let magic = match r.read_u32().await {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        };
        match magic {
            SIMPLE_REPLY_MAGIC => {
                let errno = r.read_u32().await?;
                let cookie = r.read_u64().await?;
                let mut p = take(cookie)?;
                if errno != 0 {
                    p.out.error = Some((errno, String::new()));
                } else if p.read_len > 0 {
                    let mut d = vec![0u8; p.read_len as usize];
                    r.read_exact(&mut d).await?;
                    p.out.data = d;
                }
                if let Some(tx) = p.tx.take() {
                    let _ = tx.send(Ok(p.out));
                }
            }
            STRUCTURED_REPLY_MAGIC => {
                let flags = r.read_u16().await?;
                let kind = r.read_u16().await?;
                let cookie = r.read_u64().await?;
                let len = r.read_u32().await?;
                if len > MAX_REQUEST + 64 {
                    return Err(bad("reply chunk too large"));
                }
                let mut p = take(cookie)?;
                let mut body = vec![0u8; len as usize];
                r.read_exact(&mut body).await?;
                match kind {
                    REPLY_TYPE_NONE => {}
                    REPLY_TYPE_OFFSET_DATA | REPLY_TYPE_OFFSET_HOLE if body.len() >= 8 => {
                        let at = u64::from_be_bytes(body[0..8].try_into().expect("8"));
                        let rel = at
                            .checked_sub(p.offset)
                            .ok_or_else(|| bad("data chunk before the request"))?
                            as usize;
                        if p.out.data.is_empty() {
                            p.out.data = vec![0u8; p.read_len as usize];
                        }
                        if kind == REPLY_TYPE_OFFSET_DATA {
                            let d = &body[8..];
                            let dst = p
                                .out
                                .data
                                .get_mut(rel..rel + d.len())
                                .ok_or_else(|| bad("data chunk beyond the request"))?;
                            dst.copy_from_slice(d);
                        }
                        // A hole chunk: the buffer is zeros already.
                    }
                    REPLY_TYPE_BLOCK_STATUS if body.len() >= 4 => {
                        for d in body[4..].chunks_exact(8) {
                            p.out.extents.push((
                                u32::from_be_bytes(d[0..4].try_into().expect("4")),
                                u32::from_be_bytes(d[4..8].try_into().expect("4")),
                            ));
                        }
                    }
                    k if k & (1 << 15) != 0 && body.len() >= 6 => {
                        let errno = u32::from_be_bytes(body[0..4].try_into().expect("4"));
                        let n = u16::from_be_bytes([body[4], body[5]]) as usize;
                        let msg =
                            String::from_utf8_lossy(body.get(6..6 + n).unwrap_or(&[])).into_owned();
                        p.out.error = Some((errno.max(1), msg));
                    }
                    _ => return Err(bad(format!("unknown reply chunk type {kind}"))),
                }
                if flags & REPLY_FLAG_DONE != 0 {
                    if p.read_len > 0 && p.out.data.is_empty() && p.out.error.is_none() {
                        p.out.data = vec![0u8; p.read_len as usize];
                    }
                    if let Some(tx) = p.tx.take() {
                        let _ = tx.send(Ok(p.out));
                    }
                } else {
                    put_back(cookie, p);
                }
            }
            m => return Err(bad(format!("bad reply magic {m:#x}"))),
        }
    }
}

impl BlockDev for NbdClient {
    fn name(&self) -> &Path {
        &self.name
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn logical_block_size(&self) -> u32 {
        self.min_block
    }

    fn physical_block_size(&self) -> u32 {
        self.pref_block
    }

    fn writable(&self) -> bool {
        self.tflags & TF_READ_ONLY == 0
    }

    fn provisioning(&self) -> Provisioning {
        // The protocol does not say; thin is what a remote export behaves like.
        Provisioning::Thin
    }

    fn read<'a>(&'a self, offset: u64, buf: &'a mut [u8]) -> IoFuture<'a, ()> {
        Box::pin(async move {
            self.check(offset, buf.len() as u64)?;
            for (o, l) in Self::pieces(offset, buf.len() as u64, self.max_request as u64) {
                let out = self.request(CMD_READ, 0, o, l as u32, &[]).await?;
                let at = (o - offset) as usize;
                buf[at..at + l as usize].copy_from_slice(&out.data[..l as usize]);
            }
            Ok(())
        })
    }

    fn write<'a>(&'a self, offset: u64, buf: &'a [u8], flags: WriteFlags) -> IoFuture<'a, ()> {
        Box::pin(async move {
            self.check(offset, buf.len() as u64)?;
            let fua = flags.fua && self.tflags & TF_SEND_FUA != 0;
            for (o, l) in Self::pieces(offset, buf.len() as u64, self.max_request as u64) {
                let at = (o - offset) as usize;
                let f = if fua { CMD_FLAG_FUA } else { 0 };
                self.request(CMD_WRITE, f, o, l as u32, &buf[at..at + l as usize])
                    .await?;
            }
            if flags.fua && !fua {
                self.flush().await?;
            }
            Ok(())
        })
    }

    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(async move {
            if self.tflags & TF_SEND_FLUSH != 0 {
                self.request(CMD_FLUSH, 0, 0, 0, &[]).await?;
            }
            Ok(())
        })
    }

    fn write_zeroes(&self, offset: u64, length: u64, may_unmap: bool) -> IoFuture<'_, ()> {
        Box::pin(async move {
            self.check(offset, length)?;
            for (o, l) in Self::pieces(offset, length, 1 << 30) {
                if self.tflags & TF_SEND_WRITE_ZEROES != 0 {
                    let f = if may_unmap { 0 } else { CMD_FLAG_NO_HOLE };
                    self.request(CMD_WRITE_ZEROES, f, o, l as u32, &[]).await?;
                } else {
                    for (p, n) in Self::pieces(o, l, self.max_request as u64) {
                        self.request(CMD_WRITE, 0, p, n as u32, &vec![0u8; n as usize])
                            .await?;
                    }
                }
            }
            Ok(())
        })
    }

    fn discard(&self, offset: u64, length: u64) -> IoFuture<'_, ()> {
        // Discarded ranges must read as zeros afterwards; TRIM does not promise that.
        self.write_zeroes(offset, length, true)
    }

    fn block_status(&self, offset: u64, length: u64) -> IoFuture<'_, Vec<Extent>> {
        Box::pin(async move {
            self.check(offset, length)?;
            let Some(_) = self.meta.filter(|_| self.structured) else {
                return Ok(vec![Extent {
                    offset,
                    length,
                    kind: ExtentKind::Data,
                }]);
            };
            let len = length.min(u32::MAX as u64 / 2) as u32;
            let out = self.request(CMD_BLOCK_STATUS, 0, offset, len, &[]).await?;
            let mut ext = Vec::new();
            let mut at = offset;
            for (l, f) in out.extents {
                if l == 0 || at >= offset + length {
                    break;
                }
                let kind = if f & STATE_HOLE != 0 {
                    ExtentKind::Hole
                } else if f & STATE_ZERO != 0 {
                    ExtentKind::Zero
                } else {
                    ExtentKind::Data
                };
                let l = (l as u64).min(offset + length - at);
                ext.push(Extent {
                    offset: at,
                    length: l,
                    kind,
                });
                at += l;
            }
            if ext.is_empty() {
                ext.push(Extent {
                    offset,
                    length: length.min(self.min_block as u64),
                    kind: ExtentKind::Data,
                });
            }
            Ok(ext)
        })
    }
}
