//! `ferry vm create|start|stop|ls|console|rm`: VMs through an agent's control API
//! (`docs/vm.md`).

use anyhow::{anyhow, bail, Result};
use clap::Subcommand;
use serde_json::{json, Value};

use crate::agentctl::AgentArgs;
use crate::units::{human, parse_size};

/// `ferry vm create`.
#[derive(clap::Args, Debug)]
pub struct CreateArgs {
    name: String,
    #[arg(long)]
    datastore: String,
    /// Memory (e.g. 256M, 2G).
    #[arg(long, value_parser = parse_size)]
    memory: u64,
    #[arg(long, default_value_t = 1)]
    vcpus: u32,
    /// A disk: SIZE[,thin|lazy-thick|eager-thick][,datastore=DS]; repeat for more.
    #[arg(long = "disk")]
    disks: Vec<String>,
    #[arg(long)]
    kernel: Option<String>,
    #[arg(long)]
    initrd: Option<String>,
    #[arg(long)]
    append: Option<String>,
    #[arg(long, conflicts_with_all = ["kernel", "initrd", "append"])]
    firmware: Option<String>,
    /// A NIC: [mac=52:54:00:..][,bridge=BR]; repeat for more.
    #[arg(long = "nic")]
    nics: Vec<String>,
    /// A versioned machine type.
    #[arg(long, default_value = "pc-q35-7.2")]
    machine: String,
    /// A named CPU model.
    #[arg(long, default_value = "qemu64")]
    cpu: String,
    #[command(flatten)]
    agent: AgentArgs,
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand, Debug)]
pub enum VmCommand {
    /// Define a VM in a datastore folder, with new disks.
    Create(Box<CreateArgs>),
    /// Start a VM on the agent's host.
    Start {
        name: String,
        /// Start it on this host (by name) instead of the agent's own.
        #[arg(long)]
        host: Option<String>,
        #[command(flatten)]
        agent: AgentArgs,
        #[arg(long)]
        json: bool,
    },
    /// Stop a VM: ACPI power-down, then quit after the timeout (at once with --force).
    Stop {
        name: String,
        #[arg(long)]
        force: bool,
        #[arg(long, default_value_t = 30)]
        timeout: u64,
        #[command(flatten)]
        agent: AgentArgs,
    },
    /// VMs in the agent's datastores: state, host, datastore, disks.
    Ls {
        #[command(flatten)]
        agent: AgentArgs,
        #[arg(long)]
        json: bool,
    },
    /// The VM's serial console log (on the host that runs or ran it).
    Console {
        name: String,
        /// Keep printing what the console adds.
        #[arg(long)]
        follow: bool,
        #[command(flatten)]
        agent: AgentArgs,
    },
    /// Delete a stopped VM and its disks.
    Rm {
        name: String,
        #[command(flatten)]
        agent: AgentArgs,
    },
}

fn disk(s: &str) -> Result<Value> {
    let mut parts = s.split(',');
    let size =
        parse_size(parts.next().unwrap_or_default()).map_err(|e| anyhow!("--disk {s}: {e}"))?;
    let mut prov = None;
    let mut ds = None;
    for p in parts {
        match p.split_once('=') {
            Some(("datastore", d)) => ds = Some(d.to_string()),
            None if ["thin", "lazy-thick", "eager-thick"].contains(&p) => {
                prov = Some(p.to_string())
            }
            _ => bail!("--disk {s}: {p:?} is not thin, lazy-thick, eager-thick or datastore=DS"),
        }
    }
    Ok(json!({"size": size, "provisioning": prov, "datastore": ds}))
}

fn nic(s: &str) -> Result<Value> {
    let mut v = json!({});
    for p in s.split(',').filter(|p| !p.is_empty()) {
        match p.split_once('=') {
            Some(("mac", m)) => v["mac"] = json!(m),
            Some(("bridge", b)) => v["bridge"] = json!(b),
            _ => bail!("--nic {s}: want mac=..,bridge=.."),
        }
    }
    Ok(v)
}

fn print(v: &Value) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

pub async fn run(cmd: VmCommand) -> Result<u8> {
    match cmd {
        VmCommand::Create(a) => {
            let CreateArgs {
                name,
                datastore,
                memory,
                vcpus,
                disks,
                kernel,
                initrd,
                append,
                firmware,
                nics,
                machine,
                cpu,
                agent,
                json,
            } = *a;
            let disks = disks.iter().map(|d| disk(d)).collect::<Result<Vec<_>>>()?;
            let nics = nics.iter().map(|n| nic(n)).collect::<Result<Vec<_>>>()?;
            let body = json!({
                "name": name, "datastore": datastore, "memory_mib": memory >> 20, "vcpus": vcpus,
                "machine": machine, "cpu": cpu, "kernel": kernel, "initrd": initrd,
                "append": append, "firmware": firmware, "disks": disks, "nics": nics,
            });
            let v = agent.call("POST", "/v1/vms", Some(body)).await?;
            if json {
                print(&v)?;
            } else {
                println!(
                    "created VM {name} (uuid {}) in datastore {datastore}",
                    v["uuid"].as_str().unwrap_or("?")
                );
            }
            Ok(0)
        }
        VmCommand::Start {
            name,
            host,
            agent,
            json,
        } => {
            let agent = match host {
                Some(h) => agent.of_host(&h).await?,
                None => agent,
            };
            let v = agent
                .call("POST", &format!("/v1/vms/{name}/start"), None)
                .await?;
            if json {
                print(&v)?;
            } else {
                println!(
                    "VM {name} runs on {} (QEMU pid {}, {})",
                    v["host"].as_str().unwrap_or("?"),
                    v["pid"],
                    v["accel"].as_str().unwrap_or("?")
                );
            }
            Ok(0)
        }
        VmCommand::Stop {
            name,
            force,
            timeout,
            agent,
        } => {
            agent
                .call(
                    "POST",
                    &format!("/v1/vms/{name}/stop"),
                    Some(json!({"force": force, "timeout_s": timeout})),
                )
                .await?;
            println!("VM {name} stopped");
            Ok(0)
        }
        VmCommand::Ls { agent, json } => {
            let v = agent.call("GET", "/v1/vms", None).await?;
            if json {
                print(&v)?;
                return Ok(0);
            }
            println!(
                "{:<16} {:<18} {:<24} {:<10} {:>8} DISKS",
                "NAME", "STATE", "HOST", "DATASTORE", "MEMORY"
            );
            for vm in v.as_array().into_iter().flatten() {
                let disks: Vec<String> = vm["disks"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|d| {
                        format!(
                            "{}={}:{}({}, {})",
                            d["name"].as_str().unwrap_or("?"),
                            d["datastore"].as_str().unwrap_or("?"),
                            d["path"].as_str().unwrap_or("?"),
                            human(d["size"].as_u64().unwrap_or(0)),
                            d["provisioning"].as_str().unwrap_or("?")
                        )
                    })
                    .collect();
                println!(
                    "{:<16} {:<18} {:<24} {:<10} {:>8} {}",
                    vm["name"].as_str().unwrap_or("?"),
                    vm["state"].as_str().unwrap_or("?"),
                    vm["host"].as_str().unwrap_or("-"),
                    vm["datastore"].as_str().unwrap_or("?"),
                    human(vm["memory_mib"].as_u64().unwrap_or(0) << 20),
                    disks.join(" ")
                );
            }
            Ok(0)
        }
        VmCommand::Console {
            name,
            follow,
            agent,
        } => {
            let mut shown = 0usize;
            loop {
                let v = agent
                    .call(
                        "GET",
                        &format!("/v1/vms/{name}/console?bytes=1048576"),
                        None,
                    )
                    .await?;
                let text = v["text"].as_str().unwrap_or_default();
                // The log only grows; print what is new since the last look.
                if text.len() >= shown {
                    print!("{}", &text[shown.min(text.len())..]);
                } else {
                    print!("{text}");
                }
                shown = text.len();
                if !follow {
                    return Ok(0);
                }
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            }
        }
        VmCommand::Rm { name, agent } => {
            agent
                .call("DELETE", &format!("/v1/vms/{name}"), None)
                .await?;
            println!("removed VM {name} and its disks");
            Ok(0)
        }
    }
}
