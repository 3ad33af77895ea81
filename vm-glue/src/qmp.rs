//! ferry's QMP client: one QEMU's monitor over its unix socket.
//!
//! [`Qmp::connect`] reads the greeting and enters command mode (`qmp_capabilities`).
//! Commands carry an id and are matched to their reply by it, so several may be in
//! flight; each waits at most the client's timeout. Asynchronous events (STOP, RESUME,
//! MIGRATION, SHUTDOWN, …) go to every [`Qmp::events`] subscriber, with QEMU's
//! timestamp. When QEMU goes away every waiting command, and every later one, fails with
//! [`QmpError::Closed`] — never a hang.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::{broadcast, oneshot};

/// What can go wrong talking to QEMU.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// QEMU answered the command with an error.
    #[error("{socket}: QEMU refused {command}: {desc} ({class})")]
    Command {
        socket: PathBuf,
        command: String,
        class: String,
        desc: String,
    },
    /// The connection is gone (QEMU exited or closed the monitor).
    #[error("{socket}: QMP connection closed ({why}); did QEMU exit? Its log may say why")]
    Closed { socket: PathBuf, why: String },
    /// No reply within the timeout.
    #[error("{socket}: no reply to {command} within {secs:.1}s (is QEMU stuck or stopped?)")]
    Timeout {
        socket: PathBuf,
        command: String,
        secs: f64,
    },
    /// QEMU said something that is not QMP.
    #[error("{socket}: not QMP: {detail}")]
    Protocol { socket: PathBuf, detail: String },
    /// Connecting failed.
    #[error("{socket}: cannot connect to QMP: {err}")]
    Connect {
        socket: PathBuf,
        err: std::io::Error,
    },
}

/// One asynchronous event.
#[derive(Debug, Clone)]
pub struct Event {
    pub name: String,
    pub data: Value,
    /// QEMU's timestamp (wall clock of the QEMU host), in microseconds since the epoch.
    pub timestamp_us: u64,
}

type Waiters = HashMap<u64, oneshot::Sender<Result<Value, (String, String)>>>;

struct Shared {
    /// None once the connection is closed: the reason.
    waiters: Mutex<Result<Waiters, String>>,
}

/// A QMP connection.
pub struct Qmp {
    socket: PathBuf,
    writer: tokio::sync::Mutex<tokio::net::unix::OwnedWriteHalf>,
    shared: Arc<Shared>,
    next_id: AtomicU64,
    events: broadcast::Sender<Event>,
    version: (u64, u64, u64),
    timeout: Duration,
}

impl std::fmt::Debug for Qmp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qmp")
            .field("socket", &self.socket)
            .field("version", &self.version)
            .finish()
    }
}

impl Qmp {
    /// Connects to QEMU's QMP socket, reads the greeting and negotiates capabilities.
    /// Every command then waits at most `timeout` for its reply.
    pub async fn connect(socket: &Path, timeout: Duration) -> Result<Qmp, QmpError> {
        let s = tokio::net::UnixStream::connect(socket)
            .await
            .map_err(|err| QmpError::Connect {
                socket: socket.to_path_buf(),
                err,
            })?;
        let (rd, wr) = s.into_split();
        let mut rd = BufReader::new(rd);
        let proto = |detail: String| QmpError::Protocol {
            socket: socket.to_path_buf(),
            detail,
        };
        let mut line = String::new();
        let n = tokio::time::timeout(timeout, rd.read_line(&mut line))
            .await
            .map_err(|_| QmpError::Timeout {
                socket: socket.to_path_buf(),
                command: "the greeting".into(),
                secs: timeout.as_secs_f64(),
            })?
            .map_err(|e| proto(e.to_string()))?;
        if n == 0 {
            return Err(QmpError::Closed {
                socket: socket.to_path_buf(),
                why: "closed before the greeting".into(),
            });
        }
        let greeting: Value =
            serde_json::from_str(&line).map_err(|e| proto(format!("greeting: {e}")))?;
        let v = &greeting["QMP"]["version"]["qemu"];
        let version = match (
            v["major"].as_u64(),
            v["minor"].as_u64(),
            v["micro"].as_u64(),
        ) {
            (Some(a), Some(b), Some(c)) => (a, b, c),
            _ => return Err(proto(format!("greeting without a version: {line}"))),
        };
        let shared = Arc::new(Shared {
            waiters: Mutex::new(Ok(HashMap::new())),
        });
        let (events, _) = broadcast::channel(256);
        let qmp = Qmp {
            socket: socket.to_path_buf(),
            writer: tokio::sync::Mutex::new(wr),
            shared: Arc::clone(&shared),
            next_id: AtomicU64::new(1),
            events: events.clone(),
            version,
            timeout,
        };
        tokio::spawn(read_loop(rd, shared, events));
        qmp.execute("qmp_capabilities", None).await?;
        Ok(qmp)
    }

    /// QEMU's version (major, minor, micro).
    pub fn version(&self) -> (u64, u64, u64) {
        self.version
    }

    /// The socket this client is connected to.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Subscribes to events from now on.
    pub fn events(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    /// Runs `command` with `arguments` and returns its `return` value.
    pub async fn execute(
        &self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, QmpError> {
        self.execute_within(command, arguments, self.timeout).await
    }

    /// [`Qmp::execute`] with its own timeout.
    pub async fn execute_within(
        &self,
        command: &str,
        arguments: Option<Value>,
        timeout: Duration,
    ) -> Result<Value, QmpError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut g = self.shared.waiters.lock().expect("waiters");
            match g.as_mut() {
                Ok(w) => {
                    w.insert(id, tx);
                }
                Err(why) => {
                    return Err(QmpError::Closed {
                        socket: self.socket.clone(),
                        why: why.clone(),
                    })
                }
            }
        }
        let mut msg = json!({"execute": command, "id": id});
        if let Some(a) = arguments {
            msg["arguments"] = a;
        }
        let mut line = serde_json::to_vec(&msg).expect("json");
        line.push(b'\n');
        let sent = {
            let mut w = self.writer.lock().await;
            w.write_all(&line).await
        };
        let forget = || {
            if let Ok(w) = self.shared.waiters.lock().expect("waiters").as_mut() {
                w.remove(&id);
            }
        };
        if let Err(e) = sent {
            forget();
            return Err(QmpError::Closed {
                socket: self.socket.clone(),
                why: e.to_string(),
            });
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(Ok(v))) => Ok(v),
            Ok(Ok(Err((class, desc)))) => Err(QmpError::Command {
                socket: self.socket.clone(),
                command: command.to_string(),
                class,
                desc,
            }),
            Ok(Err(_)) => Err(QmpError::Closed {
                socket: self.socket.clone(),
                why: self.closed_reason(),
            }),
            Err(_) => {
                forget();
                Err(QmpError::Timeout {
                    socket: self.socket.clone(),
                    command: command.to_string(),
                    secs: timeout.as_secs_f64(),
                })
            }
        }
    }

    fn closed_reason(&self) -> String {
        match &*self.shared.waiters.lock().expect("waiters") {
            Err(why) => why.clone(),
            Ok(_) => "connection lost".into(),
        }
    }

    /// Whether the connection has closed.
    pub fn is_closed(&self) -> bool {
        self.shared.waiters.lock().expect("waiters").is_err()
    }

    /// Waits for the next event named `name` on `rx` (subscribe *before* causing it),
    /// at most `timeout`.
    pub async fn wait_event(
        &self,
        rx: &mut broadcast::Receiver<Event>,
        name: &str,
        timeout: Duration,
    ) -> Result<Event, QmpError> {
        let wait = async {
            loop {
                match rx.recv().await {
                    Ok(e) if e.name == name => return Ok(e),
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => {
                        return Err(QmpError::Closed {
                            socket: self.socket.clone(),
                            why: self.closed_reason(),
                        })
                    }
                }
            }
        };
        tokio::time::timeout(timeout, wait)
            .await
            .map_err(|_| QmpError::Timeout {
                socket: self.socket.clone(),
                command: format!("event {name}"),
                secs: timeout.as_secs_f64(),
            })?
    }
}

/// Reads QEMU's messages: replies to their waiters, events to subscribers. On end of
/// stream, fails every waiter and refuses later commands.
async fn read_loop(
    mut rd: BufReader<tokio::net::unix::OwnedReadHalf>,
    shared: Arc<Shared>,
    events: broadcast::Sender<Event>,
) {
    let mut line = String::new();
    let why = loop {
        line.clear();
        match rd.read_line(&mut line).await {
            Ok(0) => break "QEMU closed the monitor".to_string(),
            Ok(_) => {}
            Err(e) => break e.to_string(),
        }
        let Ok(msg) = serde_json::from_str::<Value>(&line) else {
            break format!("unparsable message {:?}", line.trim());
        };
        if let Some(name) = msg["event"].as_str() {
            let ts = &msg["timestamp"];
            let _ = events.send(Event {
                name: name.to_string(),
                data: msg["data"].clone(),
                timestamp_us: ts["seconds"].as_u64().unwrap_or(0) * 1_000_000
                    + ts["microseconds"].as_u64().unwrap_or(0),
            });
            continue;
        }
        let Some(id) = msg["id"].as_u64() else {
            // A reply without our id (none of our commands lacks one): ignore it.
            continue;
        };
        let tx = match shared.waiters.lock().expect("waiters").as_mut() {
            Ok(w) => w.remove(&id),
            Err(_) => None,
        };
        let Some(tx) = tx else { continue };
        let out = if msg.get("return").is_some() {
            Ok(msg["return"].clone())
        } else {
            Err((
                msg["error"]["class"]
                    .as_str()
                    .unwrap_or("Unknown")
                    .to_string(),
                msg["error"]["desc"].as_str().unwrap_or("").to_string(),
            ))
        };
        let _ = tx.send(out);
    };
    let old = std::mem::replace(&mut *shared.waiters.lock().expect("waiters"), Err(why));
    // Dropping the senders wakes every waiter with "closed".
    drop(old);
}
