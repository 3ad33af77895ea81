//! Long-running work the agent does on a caller's behalf (creating and zeroing a large
//! file now; mirrors and relocations later): an id, progress in bytes, a state, and a
//! cancel request the work checks at its own safe points.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde_json::{json, Value};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TaskState {
    Running,
    Done,
    Failed(String),
    Cancelled,
    /// The work ended without knowing its outcome (a relocation whose destination
    /// cannot be asked); `resolve` settles it.
    Unknown(String),
}

/// One task.
#[derive(Debug)]
pub struct Task {
    pub id: u64,
    pub kind: String,
    pub object: String,
    pub cancellable: bool,
    started: Instant,
    finished: Mutex<Option<Instant>>,
    state: Mutex<TaskState>,
    done: AtomicU64,
    total: AtomicU64,
    cancel: AtomicBool,
    result: Mutex<Value>,
    /// What the task does now, in a few words (e.g. "copying disks").
    stage: Mutex<String>,
}

impl Task {
    pub fn progress(&self, done: u64, total: u64) {
        self.total.store(total, Ordering::Relaxed);
        self.done.store(done, Ordering::Relaxed);
    }

    /// Names the step the task is at now.
    pub fn stage(&self, what: &str) {
        *self.stage.lock().expect("task") = what.to_string();
    }

    /// Whether a cancel was asked for.
    pub fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::SeqCst)
    }

    pub fn state(&self) -> TaskState {
        self.state.lock().expect("task").clone()
    }

    /// Ends the task with its outcome and, on success, a result to report.
    pub fn finish(&self, outcome: Result<Value, String>) {
        let mut st = self.state.lock().expect("task");
        *st = match outcome {
            Ok(v) => {
                *self.result.lock().expect("task") = v;
                TaskState::Done
            }
            Err(_) if self.cancelled() => TaskState::Cancelled,
            Err(e) => TaskState::Failed(e),
        };
        *self.finished.lock().expect("task") = Some(Instant::now());
    }

    /// Ends the task (for now) with its outcome unknown; [`Task::finish`] settles it.
    pub fn unknown(&self, why: String) {
        *self.state.lock().expect("task") = TaskState::Unknown(why);
        *self.finished.lock().expect("task") = Some(Instant::now());
    }

    /// Whether the task ended with its outcome unknown.
    pub fn is_unknown(&self) -> bool {
        matches!(self.state(), TaskState::Unknown(_))
    }

    pub fn to_json(&self) -> Value {
        let done = self.done.load(Ordering::Relaxed);
        let total = self.total.load(Ordering::Relaxed);
        let end = self
            .finished
            .lock()
            .expect("task")
            .unwrap_or_else(Instant::now);
        let elapsed = end.duration_since(self.started).as_secs_f64();
        let rate = if elapsed > 0.0 {
            done as f64 / elapsed
        } else {
            0.0
        };
        let eta = (rate > 0.0 && total > done).then(|| (total - done) as f64 / rate);
        let (state, error) = match self.state() {
            TaskState::Running => ("running", None),
            TaskState::Done => ("done", None),
            TaskState::Failed(e) => ("failed", Some(e)),
            TaskState::Cancelled => ("cancelled", None),
            TaskState::Unknown(e) => ("unknown", Some(e)),
        };
        json!({
            "id": self.id,
            "kind": self.kind,
            "object": self.object,
            "state": state,
            "stage": self.stage.lock().expect("task").clone(),
            "error": error,
            "cancellable": self.cancellable,
            "progress": {"done_bytes": done, "total_bytes": total, "rate_bytes_per_s": rate, "eta_s": eta},
            "elapsed_s": elapsed,
            "result": self.result.lock().expect("task").clone(),
        })
    }
}

/// Every task of this agent process (finished ones too, the last 100).
#[derive(Debug, Default)]
pub struct Tasks {
    next: AtomicU64,
    all: Mutex<BTreeMap<u64, Arc<Task>>>,
}

impl Tasks {
    pub fn start(&self, kind: &str, object: &str, cancellable: bool) -> Arc<Task> {
        let id = self.next.fetch_add(1, Ordering::SeqCst) + 1;
        let t = Arc::new(Task {
            id,
            kind: kind.to_string(),
            object: object.to_string(),
            cancellable,
            started: Instant::now(),
            finished: Mutex::new(None),
            state: Mutex::new(TaskState::Running),
            done: AtomicU64::new(0),
            total: AtomicU64::new(0),
            cancel: AtomicBool::new(false),
            result: Mutex::new(Value::Null),
            stage: Mutex::new(String::new()),
        });
        let mut all = self.all.lock().expect("tasks");
        all.insert(id, Arc::clone(&t));
        while all.len() > 100 {
            let oldest_done = all
                .iter()
                .find(|(_, t)| !matches!(t.state(), TaskState::Running | TaskState::Unknown(_)))
                .map(|(id, _)| *id);
            match oldest_done {
                Some(id) => {
                    all.remove(&id);
                }
                None => break,
            }
        }
        t
    }

    pub fn get(&self, id: u64) -> Option<Arc<Task>> {
        self.all.lock().expect("tasks").get(&id).cloned()
    }

    pub fn list(&self) -> Vec<Arc<Task>> {
        self.all.lock().expect("tasks").values().cloned().collect()
    }

    /// Asks a task to stop; Err if it cannot be cancelled or is over.
    pub fn cancel(&self, id: u64) -> Result<Arc<Task>, String> {
        let t = self.get(id).ok_or_else(|| format!("no task {id}"))?;
        if t.state() != TaskState::Running {
            return Err(format!("task {id} has already ended"));
        }
        if !t.cancellable {
            return Err(format!("task {id} ({}) cannot be cancelled", t.kind));
        }
        t.cancel.store(true, Ordering::SeqCst);
        Ok(t)
    }
}
