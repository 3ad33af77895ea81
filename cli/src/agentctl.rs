//! `ferry agent` (runs the daemon) and the commands that talk to one over its control
//! API: `ferry host ls|leave`, `ferry datastore ls` (no argument), `ferry export
//! add|ls|rm|activate|deactivate`, `ferry task ls|show|cancel`.
//!
//! `--agent` picks the agent: a unix socket path (default `FERRY_AGENT`, else
//! `/run/ferry/agent.sock`) or `HOST:PORT` for its TCP management address, which needs
//! the cluster secret (`--secret-file`, or `FERRY_SECRET`).

use std::path::PathBuf;

use agent::daemon;
use agent::host::{Config, Stop};
use agent::http;
use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use serde_json::{json, Value};

use crate::units::human;

/// Which agent to talk to.
#[derive(Args, Debug, Clone)]
pub struct AgentArgs {
    /// The agent: its control socket, or HOST:PORT of its management address.
    #[arg(long, global = true, value_name = "SOCKET|HOST:PORT")]
    agent: Option<String>,
    /// The cluster secret for a TCP agent address (else FERRY_SECRET).
    #[arg(long, global = true, value_name = "FILE")]
    secret_file: Option<PathBuf>,
}

const DEFAULT_SOCKET: &str = "/run/ferry/agent.sock";

impl AgentArgs {
    /// The agent of host `host` (by name), found through this one: itself, or the
    /// management address the host publishes in its heartbeat slot (over TCP, with the
    /// same secret).
    pub async fn of_host(&self, host: &str) -> Result<AgentArgs> {
        let me = self.call("GET", "/v1/host", None).await?;
        if me["name"] == host {
            return Ok(self.clone());
        }
        let hosts = self.call("GET", "/v1/hosts", None).await?;
        let h = hosts
            .as_array()
            .into_iter()
            .flatten()
            .find(|h| h["name"] == host)
            .ok_or_else(|| anyhow::anyhow!("no host {host:?} in this agent's datastores"))?;
        if h["state"] != "live" {
            bail!(
                "host {host} is {}",
                h["state"].as_str().unwrap_or("not live")
            );
        }
        let addr = h["address"].as_str().unwrap_or_default();
        if addr.is_empty() {
            bail!(
                "host {host} publishes no management address (set management_listen in its agent config)"
            );
        }
        Ok(AgentArgs {
            agent: Some(addr.to_string()),
            secret_file: self.secret_file.clone(),
        })
    }

    fn target(&self) -> String {
        self.agent
            .clone()
            .or_else(|| std::env::var("FERRY_AGENT").ok().filter(|s| !s.is_empty()))
            .unwrap_or_else(|| DEFAULT_SOCKET.to_string())
    }

    /// Calls the agent; an error status becomes an error carrying the agent's message.
    pub async fn call(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value> {
        let target = self.target();
        let is_tcp = !target.contains('/') && target.contains(':');
        let unreachable = |e: std::io::Error| {
            anyhow::anyhow!(
                "cannot reach the ferry agent at {target}: {e} (is `ferry agent` running? \
                 pass --agent SOCKET or HOST:PORT)"
            )
        };
        let resp = if is_tcp {
            let secret = match &self.secret_file {
                Some(f) => std::fs::read_to_string(f)
                    .with_context(|| format!("{}: cannot read the secret", f.display()))?
                    .trim()
                    .to_string(),
                None => std::env::var("FERRY_SECRET").unwrap_or_default(),
            };
            let auth = format!("Bearer {secret}");
            let s = tokio::net::TcpStream::connect(&target)
                .await
                .map_err(unreachable)?;
            http::call(s, method, path, &[("Authorization", &auth)], body.as_ref()).await
        } else {
            let s = tokio::net::UnixStream::connect(&target)
                .await
                .map_err(unreachable)?;
            http::call(s, method, path, &[], body.as_ref()).await
        }
        .with_context(|| format!("agent at {target}"))?;
        if resp.status >= 400 {
            let msg = resp.body["error"]
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| resp.body.to_string());
            bail!("{msg}");
        }
        Ok(resp.body)
    }
}

#[derive(Args, Debug)]
pub struct AgentCmd {
    /// The agent's TOML configuration (see docs/api.md).
    #[arg(long)]
    config: PathBuf,
    /// Leave every datastore cleanly (through the running agent) instead of running.
    #[arg(long)]
    leave: bool,
}

#[derive(Subcommand, Debug)]
pub enum HostCommand {
    /// Hosts seen in the heartbeat regions of the agent's datastores.
    Ls {
        #[command(flatten)]
        agent: AgentArgs,
        #[arg(long)]
        json: bool,
    },
    /// Leave every datastore cleanly and stop the agent (refused while it serves exports).
    Leave {
        #[command(flatten)]
        agent: AgentArgs,
    },
}

#[derive(Subcommand, Debug)]
pub enum ExportCommand {
    /// Serve a datastore file over NBD (writable with the exclusive lock, or read-only).
    Add {
        /// DATASTORE:/folder/file (DATASTORE is the datastore's name or uuid).
        file: String,
        /// Export name (default: the file's name).
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        read_only: bool,
        /// Serve reads without the lock and hold writes until activated.
        #[arg(long)]
        inactive: bool,
        #[command(flatten)]
        agent: AgentArgs,
        #[arg(long)]
        json: bool,
    },
    /// List exports.
    Ls {
        #[command(flatten)]
        agent: AgentArgs,
        #[arg(long)]
        json: bool,
    },
    /// Stop serving an export and release its lock.
    Rm {
        name: String,
        #[command(flatten)]
        agent: AgentArgs,
    },
    /// Take the lock (or accept it handed over) and let writes through.
    Activate {
        name: String,
        #[command(flatten)]
        agent: AgentArgs,
        #[arg(long)]
        json: bool,
    },
    /// Drain, flush, and release the lock or hand it to another host.
    Deactivate {
        name: String,
        /// Hand the lock to this host instead of releasing it.
        #[arg(long, value_name = "HOST")]
        handoff_to: Option<String>,
        /// The lock version the handoff expects.
        #[arg(long)]
        expected_version: Option<u64>,
        #[command(flatten)]
        agent: AgentArgs,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum TaskCommand {
    /// Tasks of the agent (running and recently finished).
    Ls {
        #[command(flatten)]
        agent: AgentArgs,
        #[arg(long)]
        json: bool,
    },
    /// One task with its progress.
    Show {
        id: u64,
        #[command(flatten)]
        agent: AgentArgs,
        #[arg(long)]
        json: bool,
    },
    /// Ask a task to stop.
    Cancel {
        id: u64,
        #[command(flatten)]
        agent: AgentArgs,
    },
    /// Settle a relocation whose outcome is unknown (its destination stopped answering
    /// during the switchover): asks that host again; the guest resumes here or its
    /// copy here quits.
    Resolve {
        id: u64,
        #[command(flatten)]
        agent: AgentArgs,
        #[arg(long)]
        json: bool,
    },
}

/// `ferry agent`: runs until stopped; exit 0 after SIGTERM or leaving, 1 if a lease
/// was lost.
pub fn run_agent(cmd: AgentCmd, rt: &tokio::runtime::Runtime) -> Result<u8> {
    let cfg = Config::load(&cmd.config)?;
    if cmd.leave {
        let a = AgentArgs {
            agent: Some(cfg.control_socket.display().to_string()),
            secret_file: None,
        };
        let v = rt.block_on(a.call("POST", "/v1/host/leave", None))?;
        println!("{} left {}", cfg.host, v["left"]);
        return Ok(0);
    }
    let exe = std::env::current_exe().context("cannot find the ferry executable")?;
    match rt.block_on(daemon::run(cfg, exe))? {
        Stop::Signal | Stop::Left => Ok(0),
        Stop::LeaseLost(e) => {
            eprintln!("ferry agent: host lease lost: {e}");
            Ok(1)
        }
    }
}

fn print_json(v: &Value) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

pub async fn run_host(cmd: HostCommand) -> Result<u8> {
    match cmd {
        HostCommand::Ls { agent, json } => {
            let v = agent.call("GET", "/v1/hosts", None).await?;
            if json {
                print_json(&v)?;
                return Ok(0);
            }
            println!("{:<20} {:<8} {:<22} DATASTORES", "HOST", "STATE", "ADDRESS");
            for h in v.as_array().into_iter().flatten() {
                let dss: Vec<String> = h["datastores"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|d| {
                        format!(
                            "{}(id {}, gen {}, {})",
                            d["datastore"].as_str().unwrap_or("?"),
                            d["host_id"],
                            d["generation"],
                            d["state"].as_str().unwrap_or("?")
                        )
                    })
                    .collect();
                println!(
                    "{:<20} {:<8} {:<22} {}",
                    h["name"].as_str().unwrap_or("?"),
                    h["state"].as_str().unwrap_or("?"),
                    h["address"]
                        .as_str()
                        .filter(|a| !a.is_empty())
                        .unwrap_or("-"),
                    dss.join(" ")
                );
            }
            Ok(0)
        }
        HostCommand::Leave { agent } => {
            let v = agent.call("POST", "/v1/host/leave", None).await?;
            println!("left {}", v["left"]);
            Ok(0)
        }
    }
}

/// `ferry datastore ls` with no argument: the agent's datastores.
pub async fn datastores(agent: &AgentArgs, json: bool) -> Result<u8> {
    let v = agent.call("GET", "/v1/datastores", None).await?;
    if json {
        print_json(&v)?;
        return Ok(0);
    }
    println!(
        "{:<16} {:<36} {:>10} {:>10} {:>8} DEVICE",
        "NAME", "UUID", "SIZE", "FREE", "HOST ID"
    );
    for d in v.as_array().into_iter().flatten() {
        println!(
            "{:<16} {:<36} {:>10} {:>10} {:>8} {}",
            d["name"].as_str().unwrap_or("?"),
            d["uuid"].as_str().unwrap_or("?"),
            human(d["total_bytes"].as_u64().unwrap_or(0)),
            human(d["free_bytes"].as_u64().unwrap_or(0)),
            d["host_id"],
            d["device"].as_str().unwrap_or("?"),
        );
    }
    Ok(0)
}

fn print_export(e: &Value) {
    println!(
        "{:<24} {:<8} {:<4} {:>10} {}:{}  {}",
        e["name"].as_str().unwrap_or("?"),
        if e["active"].as_bool() == Some(true) {
            "active"
        } else {
            "inactive"
        },
        if e["read_only"].as_bool() == Some(true) {
            "ro"
        } else {
            "rw"
        },
        human(e["size"].as_u64().unwrap_or(0)),
        e["datastore"].as_str().unwrap_or("?"),
        e["path"].as_str().unwrap_or("?"),
        e["uri"].as_str().unwrap_or("")
    );
}

pub async fn run_export(cmd: ExportCommand) -> Result<u8> {
    match cmd {
        ExportCommand::Add {
            file,
            name,
            read_only,
            inactive,
            agent,
            json,
        } => {
            let Some((ds, path)) = file.split_once(':') else {
                bail!("{file}: give the file as DATASTORE:/folder/file");
            };
            let v = agent
                .call(
                    "POST",
                    "/v1/exports",
                    Some(json!({
                        "name": name, "datastore": ds, "path": path,
                        "read_only": read_only, "inactive": inactive,
                    })),
                )
                .await?;
            if json {
                print_json(&v)?;
            } else {
                print_export(&v);
            }
            Ok(0)
        }
        ExportCommand::Ls { agent, json } => {
            let v = agent.call("GET", "/v1/exports", None).await?;
            if json {
                print_json(&v)?;
                return Ok(0);
            }
            for e in v.as_array().into_iter().flatten() {
                print_export(e);
            }
            Ok(0)
        }
        ExportCommand::Rm { name, agent } => {
            agent
                .call(
                    "DELETE",
                    &format!("/v1/exports/{}", http::percent_encode(&name)),
                    None,
                )
                .await?;
            println!("removed export {name}");
            Ok(0)
        }
        ExportCommand::Activate { name, agent, json } => {
            let v = agent
                .call(
                    "POST",
                    &format!("/v1/exports/{}/activate", http::percent_encode(&name)),
                    None,
                )
                .await?;
            if json {
                print_json(&v)?;
            } else {
                print_export(&v);
            }
            Ok(0)
        }
        ExportCommand::Deactivate {
            name,
            handoff_to,
            expected_version,
            agent,
            json,
        } => {
            let v = agent
                .call(
                    "POST",
                    &format!("/v1/exports/{}/deactivate", http::percent_encode(&name)),
                    Some(json!({"handoff_to": handoff_to, "expected_version": expected_version})),
                )
                .await?;
            if json {
                print_json(&v)?;
            } else {
                print_export(&v);
                if let Some(ver) = v["handed_off_version"].as_u64() {
                    println!("lock handed over (version {ver})");
                }
            }
            Ok(0)
        }
    }
}

fn print_task(t: &Value) {
    let p = &t["progress"];
    let done = p["done_bytes"].as_u64().unwrap_or(0);
    let total = p["total_bytes"].as_u64().unwrap_or(0);
    println!(
        "{:>4} {:<12} {:<10} {:>10}/{:<10} {:>7.1}s {}{}",
        t["id"],
        t["kind"].as_str().unwrap_or("?"),
        t["state"].as_str().unwrap_or("?"),
        human(done),
        human(total),
        t["elapsed_s"].as_f64().unwrap_or(0.0),
        t["object"].as_str().unwrap_or(""),
        t["error"]
            .as_str()
            .map(|e| format!(": {e}"))
            .unwrap_or_default()
    );
}

pub async fn run_task(cmd: TaskCommand) -> Result<u8> {
    match cmd {
        TaskCommand::Ls { agent, json } => {
            let v = agent.call("GET", "/v1/tasks", None).await?;
            if json {
                print_json(&v)?;
            } else {
                for t in v.as_array().into_iter().flatten() {
                    print_task(t);
                }
            }
            Ok(0)
        }
        TaskCommand::Show { id, agent, json } => {
            let v = agent.call("GET", &format!("/v1/tasks/{id}"), None).await?;
            if json {
                print_json(&v)?;
            } else {
                print_task(&v);
            }
            Ok(0)
        }
        TaskCommand::Cancel { id, agent } => {
            agent
                .call("POST", &format!("/v1/tasks/{id}/cancel"), None)
                .await?;
            println!("task {id}: cancel requested");
            Ok(0)
        }
        TaskCommand::Resolve { id, agent, json } => {
            let v = agent
                .call("POST", &format!("/v1/tasks/{id}/resolve"), None)
                .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!(
                    "task {id}: {}",
                    v["result"]["note"].as_str().unwrap_or("settled")
                );
            }
            Ok(0)
        }
    }
}
