//! The control API: HTTP/JSON routes over the agent's unix socket (trusted by file
//! permissions) and TCP management address (every call needs `Authorization: Bearer
//! <cluster secret>`). Documented route by route in `docs/api.md`.

use std::sync::Arc;

use datastore::files::Stat;
use datastore::store::Liveness;
use diskfmt::Provisioning;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::error::{Error, Kind};
use crate::host::exports::{self, ExportSpec, Gate};
use crate::host::membership::Member;
use crate::host::{Agent, ExportEntry};
use crate::http::{self, Request, Response};

/// An API error: status, kind and message.
#[derive(Debug)]
struct ApiError(u16, Kind, String);

type ApiResult = Result<Response, ApiError>;

fn ok(body: Value) -> ApiResult {
    Ok(Response { status: 200, body })
}

/// An error the router itself finds (bad request, unknown route): its kind and status.
fn err(status: u16, msg: impl Into<String>) -> ApiError {
    let kind = match status {
        404 => Kind::NotFound,
        400 | 405 | 413 => Kind::Invalid,
        409 => Kind::Conflict,
        _ => Kind::Failed,
    };
    ApiError(status, kind, msg.into())
}

/// A datastore error, by its kind.
fn ds_err(e: datastore::Error) -> ApiError {
    any_err(Error::from(e))
}

/// An agent error, by its kind ([`Kind::status`]).
fn any_err(e: Error) -> ApiError {
    let kind = e.kind();
    ApiError(kind.status(), kind, e.to_string())
}

/// The error of an operation the object's state may not allow (a VM's routes, leaving,
/// settling a task): as [`any_err`], but a failure of no more specific kind answers 409.
fn state_err(e: Error) -> ApiError {
    match e.kind() {
        Kind::Failed => ApiError(409, Kind::Failed, e.to_string()),
        _ => any_err(e),
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn serve_one<S>(agent: Arc<Agent>, stream: S, tcp: bool)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (rd, wr) = tokio::io::split(stream);
    // Over TCP the secret is checked on the head: an unauthenticated client never gets
    // its body read (or buffered).
    let read = http::read_request_admitted(rd, |r| !tcp || authorized(&agent, r));
    let req = match tokio::time::timeout(http::REQUEST_TIMEOUT, read).await {
        Ok(Ok(Some(r))) => r,
        Ok(Ok(None)) => {
            let _ = http::write_response(
                wr,
                &Response {
                    status: 401,
                    body: json!({"error": UNAUTHORIZED}),
                },
            )
            .await;
            return;
        }
        Ok(Err(e)) => {
            let _ = http::write_response(
                wr,
                &Response {
                    status: 400,
                    body: json!({"error": format!("bad request: {e}")}),
                },
            )
            .await;
            return;
        }
        Err(_) => return,
    };
    let resp = match route(&agent, &req, tcp).await {
        Ok(r) => r,
        Err(ApiError(status, kind, msg)) => Response {
            status,
            body: json!({ "error": msg, "kind": kind }),
        },
    };
    if resp.status >= 400 {
        tracing::debug!("{} {}: {} {}", req.method, req.path, resp.status, resp.body);
    }
    let _ = http::write_response(wr, &resp).await;
}

/// Control connections served at once per listener; more are closed at once.
pub const MAX_CONNECTIONS: usize = 64;

/// Serves the control API on the unix socket.
pub async fn serve_unix(agent: Arc<Agent>, l: tokio::net::UnixListener) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let accepted = l.accept().await.map(|(s, _)| s);
        accept(&agent, accepted, false, "control socket", &slots).await;
    }
}

/// Serves the control API on TCP (cluster secret required).
pub async fn serve_tcp(agent: Arc<Agent>, l: tokio::net::TcpListener) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let accepted = l.accept().await.map(|(s, _)| s);
        accept(&agent, accepted, true, "management listener", &slots).await;
    }
}

/// Serves one accepted connection on its own task (if a slot is free; else it is
/// closed); backs off a little after an error.
async fn accept<S>(
    agent: &Arc<Agent>,
    accepted: std::io::Result<S>,
    tcp: bool,
    what: &str,
    slots: &Arc<tokio::sync::Semaphore>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    match accepted {
        Ok(s) => {
            let Ok(slot) = Arc::clone(slots).try_acquire_owned() else {
                tracing::warn!("{what}: {MAX_CONNECTIONS} connections already; closing a new one");
                return;
            };
            let agent = Arc::clone(agent);
            tokio::spawn(async move {
                serve_one(agent, s, tcp).await;
                drop(slot);
            });
        }
        Err(e) => {
            tracing::error!("{what}: {e}");
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }
}

fn body<T: for<'de> Deserialize<'de>>(req: &Request) -> Result<T, ApiError> {
    let b: &[u8] = if req.body.is_empty() {
        b"{}"
    } else {
        &req.body
    };
    serde_json::from_slice(b).map_err(|e| err(400, format!("request body: {e}")))
}

const UNAUTHORIZED: &str =
    "TCP control calls need the cluster secret (Authorization: Bearer SECRET)";

/// Whether a TCP request carries the cluster secret.
fn authorized(agent: &Agent, req: &Request) -> bool {
    let secret = agent.cfg.secret.as_deref().unwrap_or_default();
    let given = req
        .header("authorization")
        .and_then(|h| h.strip_prefix("Bearer "))
        .unwrap_or_default();
    !secret.is_empty() && constant_time_eq(given.as_bytes(), secret.as_bytes())
}

async fn route(agent: &Arc<Agent>, req: &Request, tcp: bool) -> ApiResult {
    if tcp && !authorized(agent, req) {
        return Err(err(401, UNAUTHORIZED));
    }
    let parts: Vec<&str> = req
        .path
        .trim_matches('/')
        .split('/')
        .filter(|s| !s.is_empty())
        .collect();
    let m = req.method.as_str();
    match (m, parts.as_slice()) {
        ("GET", ["v1", "host"]) => host(agent),
        ("GET", ["v1", "hosts"]) => ok(json!(crate::host::hosts::hosts(agent))),
        ("POST", ["v1", "host", "leave"]) => {
            crate::host::leave::leave(agent).await.map_err(state_err)?;
            ok(
                json!({"left": agent.members.iter().map(|m| m.label().to_string()).collect::<Vec<_>>()}),
            )
        }
        ("GET", ["v1", "datastores"]) => datastores(agent).await,
        ("GET", ["v1", "datastores", ds]) => {
            let m = member(agent, ds)?;
            ok(datastore_json(&m).await?)
        }
        ("GET", ["v1", "datastores", ds, "files"]) => list_files(agent, ds, req).await,
        ("GET", ["v1", "datastores", ds, "stat"]) => stat_file(agent, ds, req).await,
        ("POST", ["v1", "datastores", ds, "files"]) => create_file(agent, ds, req).await,
        ("DELETE", ["v1", "datastores", ds, "files"]) => delete_file(agent, ds, req).await,
        ("GET", ["v1", "exports"]) => {
            let table = agent.exports.lock().await;
            let mut out = Vec::new();
            for e in table.values() {
                out.push(export_json(agent, e).await);
            }
            ok(Value::Array(out))
        }
        ("POST", ["v1", "exports"]) => add_export(agent, req).await,
        ("GET", ["v1", "exports", name]) => {
            let table = agent.exports.lock().await;
            let e = table
                .get(*name)
                .ok_or_else(|| err(404, format!("no export named {name:?}")))?;
            ok(export_json(agent, e).await)
        }
        ("DELETE", ["v1", "exports", name]) => remove_export(agent, name).await,
        ("POST", ["v1", "exports", name, "activate"]) => activate(agent, name).await,
        ("POST", ["v1", "exports", name, "deactivate"]) => deactivate(agent, name, req).await,
        ("GET", ["v1", "vms"]) => ok(Value::Array(
            crate::vms::list(agent).await.map_err(any_err)?,
        )),
        ("POST", ["v1", "vms"]) => {
            let r: crate::vms::CreateReq = body(req)?;
            let spec = crate::vms::create(agent, r).await.map_err(state_err)?;
            Ok(Response {
                status: 201,
                body: serde_json::to_value(spec).expect("json"),
            })
        }
        ("GET", ["v1", "vms", name]) => {
            let all = crate::vms::list(agent).await.map_err(any_err)?;
            all.into_iter()
                .find(|v| v["name"] == *name)
                .map(|v| Response {
                    status: 200,
                    body: v,
                })
                .ok_or_else(|| err(404, format!("no VM named {name:?}")))
        }
        ("POST", ["v1", "vms", name, "start"]) => {
            ok(crate::vms::start(agent, name).await.map_err(state_err)?)
        }
        ("POST", ["v1", "vms", name, "stop"]) => {
            #[derive(Deserialize, Default)]
            #[serde(deny_unknown_fields)]
            struct StopReq {
                #[serde(default)]
                force: bool,
                timeout_s: Option<u64>,
            }
            let r: StopReq = body(req)?;
            let t = r.timeout_s.unwrap_or(30);
            if t > 3600 {
                return Err(err(
                    400,
                    format!("VM {name}: `timeout_s` = {t}: must be 0 to 3600 s"),
                ));
            }
            let t = std::time::Duration::from_secs(t);
            crate::vms::stop(agent, name, r.force, t)
                .await
                .map_err(state_err)?;
            ok(json!({"stopped": name}))
        }
        ("POST", ["v1", "vms", name, "relocate"]) => {
            let r: crate::relocation::RelocateReq = body(req)?;
            r.params()
                .check()
                .map_err(|e| err(400, format!("relocation of VM {name}: {e:#}")))?;
            let task = crate::relocation::start(agent, name, r)
                .await
                .map_err(state_err)?;
            Ok(Response {
                status: 202,
                body: task.to_json(),
            })
        }
        ("POST", ["v1", "vms", name, "incoming"]) => {
            let r: crate::wire::IncomingReq = body(req)?;
            let inc = crate::relocation::incoming::incoming(agent, name, r)
                .await
                .map_err(state_err)?;
            ok(serde_json::to_value(inc).expect("json"))
        }
        ("POST", ["v1", "vms", name, "incoming", "finish"]) => {
            let v = crate::relocation::incoming::finish(agent, name)
                .await
                .map_err(state_err)?;
            // Test hook: the guest resumed here, but the source never hears of it.
            if datastore::failpoint::fires("finish-reply-lost") {
                return Err(err(503, "failpoint finish-reply-lost: the reply is lost"));
            }
            ok(v)
        }
        ("POST", ["v1", "vms", name, "incoming", "abort"]) => {
            #[derive(Deserialize, Default)]
            #[serde(deny_unknown_fields)]
            struct AbortReq {
                #[serde(default)]
                handback: std::collections::BTreeMap<uuid::Uuid, datastore::Owner>,
                #[serde(default)]
                attempt: Option<String>,
            }
            let r: AbortReq = body(req)?;
            crate::relocation::incoming::abort(agent, name, r.handback, r.attempt.as_deref())
                .await
                .map_err(state_err)?;
            ok(json!({"aborted": name}))
        }
        ("POST", ["v1", "vms", _name, "check"]) => {
            let r: crate::wire::IncomingReq = body(req)?;
            crate::relocation::incoming::check(agent, &r).map_err(state_err)?;
            ok(json!({"ok": true}))
        }
        ("GET", ["v1", "vms", name, "console"]) => {
            let bytes = req
                .param("bytes")
                .and_then(|b| b.parse().ok())
                .unwrap_or(64 << 10);
            let text =
                crate::vms::console(agent, name, bytes).map_err(|e| err(404, format!("{e:#}")))?;
            ok(json!({ "text": text }))
        }
        ("DELETE", ["v1", "vms", name]) => {
            crate::vms::remove(agent, name).await.map_err(state_err)?;
            ok(json!({ "removed": name }))
        }
        ("GET", ["v1", "tasks"]) => ok(Value::Array(
            agent.tasks.list().iter().map(|t| t.to_json()).collect(),
        )),
        ("GET", ["v1", "tasks", id]) => ok(task(agent, id)?.to_json()),
        ("POST", ["v1", "tasks", id, "resolve"]) => {
            let t = task(agent, id)?;
            crate::relocation::switchover::resolve(agent, &t)
                .await
                .map_err(state_err)?;
            ok(t.to_json())
        }
        ("POST", ["v1", "tasks", id, "cancel"]) => {
            let id = task_id(id)?;
            let t = agent.tasks.cancel(id).map_err(|e| err(409, e))?;
            ok(t.to_json())
        }
        (_, ["v1", ..]) => Err(err(
            404,
            format!("no route {m} {} (see docs/api.md)", req.path),
        )),
        _ => Err(err(
            404,
            format!("unknown path {} (the API lives under /v1)", req.path),
        )),
    }
}

fn task(agent: &Agent, id: &str) -> Result<Arc<crate::host::tasks::Task>, ApiError> {
    let id = task_id(id)?;
    agent
        .tasks
        .get(id)
        .ok_or_else(|| err(404, format!("no task {id}")))
}

fn task_id(s: &str) -> Result<u64, ApiError> {
    s.parse()
        .map_err(|_| err(400, format!("task id {s:?} is not a number")))
}

fn member(agent: &Agent, key: &str) -> Result<Arc<Member>, ApiError> {
    agent.member(key).ok_or_else(|| {
        err(
            404,
            format!(
                "this host has no datastore {key:?} (it has: {})",
                agent
                    .members
                    .iter()
                    .map(|m| m.label().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )
    })
}

fn host(agent: &Agent) -> ApiResult {
    let dss: Vec<Value> = agent
        .members
        .iter()
        .map(|m| {
            let o = m.owner();
            json!({
                "datastore": m.label(),
                "uuid": m.ds.uuid().to_string(),
                "device": m.device,
                "host_id": o.host_id,
                "generation": o.generation,
                "resumed": m.resumed,
            })
        })
        .collect();
    ok(json!({
        "name": agent.cfg.host,
        "pid": std::process::id(),
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_s": agent.started.elapsed().as_secs_f64(),
        "control_socket": agent.cfg.control_socket,
        "nbd_socket": agent.cfg.nbd_socket(),
        "management_address": agent.mgmt_addr.lock().expect("addr").map(|a| a.to_string()),
        "nbd_address": agent.nbd_tcp_addr.lock().expect("addr").map(|a| a.to_string()),
        "datastores": dss,
    }))
}

async fn datastore_json(m: &Arc<Member>) -> Result<Value, ApiError> {
    let s = Arc::clone(&m.session);
    let space = tokio::task::spawn_blocking(move || s.space())
        .await
        .expect("space task")
        .map_err(ds_err)?;
    let sb = m.ds.superblock();
    let o = m.owner();
    Ok(json!({
        "name": sb.label,
        "uuid": m.ds.uuid().to_string(),
        "device": m.device,
        "size_bytes": sb.size,
        "block_size": space.block_size,
        "total_bytes": space.total_blocks * space.block_size,
        "free_bytes": space.free_blocks * space.block_size,
        "max_hosts": sb.max_hosts,
        "host_id": o.host_id,
        "generation": o.generation,
        "live_hosts": m.views().iter().filter(|v| v.liveness == Liveness::Live).count(),
    }))
}

async fn datastores(agent: &Agent) -> ApiResult {
    let mut out = Vec::new();
    for m in &agent.members {
        out.push(datastore_json(m).await?);
    }
    ok(Value::Array(out))
}

fn path_param(req: &Request) -> Result<String, ApiError> {
    req.param("path")
        .map(str::to_string)
        .ok_or_else(|| err(400, "give the file's path as ?path=/folder/name"))
}

async fn list_files(agent: &Agent, ds: &str, req: &Request) -> ApiResult {
    let m = member(agent, ds)?;
    let path = req.param("path").unwrap_or("/").to_string();
    let d = Arc::clone(&m.ds);
    let list: Vec<Stat> = tokio::task::spawn_blocking(move || datastore::files::list(&d, &path))
        .await
        .expect("list task")
        .map_err(ds_err)?;
    ok(serde_json::to_value(list).expect("json"))
}

async fn stat_file(agent: &Agent, ds: &str, req: &Request) -> ApiResult {
    let m = member(agent, ds)?;
    let path = path_param(req)?;
    let d = Arc::clone(&m.ds);
    let st = tokio::task::spawn_blocking(move || datastore::files::stat(&d, &path))
        .await
        .expect("stat task")
        .map_err(ds_err)?;
    ok(serde_json::to_value(st).expect("json"))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateReq {
    path: String,
    #[serde(default)]
    folder: bool,
    size: Option<u64>,
    provisioning: Option<String>,
    /// Answer at once with a task instead of waiting (large eager-thick files).
    #[serde(default)]
    no_wait: bool,
}

async fn create_file(agent: &Agent, ds: &str, req: &Request) -> ApiResult {
    let m = member(agent, ds)?;
    let r: CreateReq = body(req)?;
    if r.folder {
        let s = Arc::clone(&m.session);
        let p = r.path.clone();
        tokio::task::spawn_blocking(move || s.mkdir(&p))
            .await
            .expect("mkdir task")
            .map_err(ds_err)?;
        return Ok(Response {
            status: 201,
            body: json!({"path": r.path, "kind": "folder"}),
        });
    }
    let size = r
        .size
        .ok_or_else(|| err(400, "a file needs `size` (bytes)"))?;
    let prov: Provisioning = r
        .provisioning
        .as_deref()
        .unwrap_or("thin")
        .parse()
        .map_err(|e: String| err(400, format!("provisioning: {e}")))?;
    let task = agent
        .tasks
        .start("create-file", &format!("{}:{}", m.label(), r.path), false);
    task.progress(0, size);
    let s = Arc::clone(&m.session);
    let d = Arc::clone(&m.ds);
    let path = r.path.clone();
    let t2 = Arc::clone(&task);
    let work = async move {
        let f = s.create(&path, size, prov).await.map_err(ds_err)?;
        f.close().await.map_err(ds_err)?;
        let p2 = path.clone();
        let st = tokio::task::spawn_blocking(move || datastore::files::stat(&d, &p2))
            .await
            .expect("stat task")
            .map_err(ds_err)?;
        Ok::<Value, ApiError>(serde_json::to_value(st).expect("json"))
    };
    let handle = tokio::spawn(async move {
        let out = work.await;
        match &out {
            Ok(v) => {
                t2.progress(size, size);
                t2.finish(Ok(v.clone()));
            }
            Err(ApiError(_, _, e)) => t2.finish(Err(e.clone())),
        }
        out
    });
    if r.no_wait {
        return Ok(Response {
            status: 202,
            body: task.to_json(),
        });
    }
    let v = handle.await.expect("create task")?;
    Ok(Response {
        status: 201,
        body: v,
    })
}

async fn delete_file(agent: &Agent, ds: &str, req: &Request) -> ApiResult {
    let m = member(agent, ds)?;
    let path = path_param(req)?;
    m.session.remove(&path).await.map_err(ds_err)?;
    ok(json!({"removed": path}))
}

async fn export_json(agent: &Agent, e: &ExportEntry) -> Value {
    let m = agent.member_by_uuid(&e.spec.datastore);
    let sock = agent.cfg.nbd_socket();
    let mut v = json!({
        "name": e.spec.name,
        "datastore": m.as_ref().map(|m| m.label().to_string()),
        "datastore_uuid": e.spec.datastore.to_string(),
        "path": e.spec.path,
        "read_only": e.spec.read_only,
        "active": e.gate.is_active(),
        "size": diskfmt::BlockDev::size(&*e.gate),
        "socket": sock,
        "uri": format!("nbd+unix:///{}?socket={}", e.spec.name, sock.display()),
        "lock_version": match &m {
            Some(m) => e.gate.lock_version(&m.session).await,
            None => None,
        },
    });
    if let Some(secret) = &agent.cfg.secret {
        let tcp = exports::tcp_name(secret, &e.spec.name);
        if let Some(addr) = *agent.nbd_tcp_addr.lock().expect("addr") {
            v["tcp_uri"] = json!(format!("nbd://{addr}/{tcp}"));
        }
        v["tcp_name"] = json!(tcp);
    }
    v
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AddReq {
    name: Option<String>,
    datastore: String,
    path: String,
    #[serde(default)]
    read_only: bool,
    #[serde(default)]
    inactive: bool,
}

async fn add_export(agent: &Agent, req: &Request) -> ApiResult {
    let r: AddReq = body(req)?;
    let m = member(agent, &r.datastore)?;
    let name = match r.name {
        Some(n) => n,
        None => r.path.rsplit('/').next().unwrap_or_default().to_string(),
    };
    exports::check_name(&name).map_err(|e| err(400, e.to_string()))?;
    if r.inactive && r.read_only {
        return Err(err(
            400,
            "a read-only export is never inactive (it takes a shared lock)",
        ));
    }
    let mut table = agent.exports.lock().await;
    if let Some(e) = table.get(&name) {
        return Err(err(
            409,
            format!(
                "export {name:?} already exists ({}); remove it or choose another name",
                e.spec.path
            ),
        ));
    }
    let gate = Gate::open(
        &m.session,
        &r.path,
        r.read_only,
        !r.inactive,
        agent.cfg.write_hold,
    )
    .await
    .map_err(any_err)?;
    let spec = ExportSpec {
        name: name.clone(),
        datastore: *m.ds.uuid(),
        path: r.path,
        read_only: r.read_only,
        active: !r.inactive,
    };
    let gate = Arc::new(gate);
    agent.publish(&spec, &gate);
    table.insert(name.clone(), ExportEntry { spec, gate });
    if let Err(e) = agent.save_exports(&table).await {
        let e2 = table.remove(&name).expect("just added");
        agent.unpublish(&name);
        let _ = e2.gate.shut(false).await;
        return Err(any_err(e));
    }
    tracing::info!("export {name} added");
    Ok(Response {
        status: 201,
        body: export_json(agent, &table[&name]).await,
    })
}

async fn remove_export(agent: &Agent, name: &str) -> ApiResult {
    let mut table = agent.exports.lock().await;
    let e = table
        .remove(name)
        .ok_or_else(|| err(404, format!("no export named {name:?}")))?;
    agent.unpublish(name);
    let shut = e.gate.shut(false).await;
    agent.save_exports(&table).await.map_err(any_err)?;
    shut.map_err(any_err)?;
    tracing::info!("export {name} removed");
    ok(json!({"removed": name}))
}

async fn activate(agent: &Agent, name: &str) -> ApiResult {
    let mut table = agent.exports.lock().await;
    let e = table
        .get_mut(name)
        .ok_or_else(|| err(404, format!("no export named {name:?}")))?;
    let m = agent
        .member_by_uuid(&e.spec.datastore)
        .ok_or_else(|| err(500, "datastore gone"))?;
    e.gate.activate(&m.session).await.map_err(any_err)?;
    e.spec.active = true;
    agent.save_exports(&table).await.map_err(any_err)?;
    ok(export_json(agent, &table[name]).await)
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct DeactivateReq {
    /// Hand the lock to this host (by name) instead of releasing it.
    handoff_to: Option<String>,
    /// The lock version the handoff expects (default: the current one).
    expected_version: Option<u64>,
}

async fn deactivate(agent: &Agent, name: &str, req: &Request) -> ApiResult {
    let r: DeactivateReq = body(req)?;
    let mut table = agent.exports.lock().await;
    let e = table
        .get_mut(name)
        .ok_or_else(|| err(404, format!("no export named {name:?}")))?;
    let m = agent
        .member_by_uuid(&e.spec.datastore)
        .ok_or_else(|| err(500, "datastore gone"))?;
    let to = match &r.handoff_to {
        Some(h) => Some(m.owner_of(h).ok_or_else(|| {
            err(
                409,
                format!(
                    "host {h:?} is not live on datastore {}: cannot hand the lock to it",
                    m.label()
                ),
            )
        })?),
        None => None,
    };
    let v = e
        .gate
        .deactivate(&m.session, to, r.expected_version)
        .await
        .map_err(any_err)?;
    e.spec.active = e.gate.is_active();
    agent.save_exports(&table).await.map_err(any_err)?;
    let mut out = export_json(agent, &table[name]).await;
    out["handed_off_version"] = json!(v);
    ok(out)
}
