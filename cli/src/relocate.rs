//! `ferry relocate-vm`: moves a VM's disks and definition to other datastores (live
//! when it runs) through an agent, showing the task's progress until it ends.

use std::io::IsTerminal;
use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use serde_json::{json, Value};

use crate::agentctl::AgentArgs;
use crate::units::{human, parse_size};

/// `ferry relocate-vm`.
#[derive(clap::Args, Debug)]
pub struct RelocateArgs {
    /// The VM.
    vm: String,
    /// The datastore for the definition and every disk not named by --disk.
    #[arg(long)]
    datastore: Option<String>,
    /// Another host that sees the VM's datastores: live host relocation (vMotion).
    #[arg(long)]
    host: Option<String>,
    /// Host relocation: the longest acceptable guest stop at the switch, in ms.
    #[arg(long)]
    downtime_ms: Option<u64>,
    /// Host relocation: migration bandwidth limit (bytes/s, e.g. 100M).
    #[arg(long, value_parser = parse_size)]
    bandwidth: Option<u64>,
    /// Host relocation: parallel migration connections (multifd).
    #[arg(long)]
    multifd_channels: Option<u32>,
    /// Host relocation: give up (the VM stays) after this many seconds.
    #[arg(long)]
    timeout: Option<u64>,
    /// A disk's own destination: NAME=DATASTORE; repeat for more.
    #[arg(long = "disk")]
    disks: Vec<String>,
    /// same, thin, lazy-thick or eager-thick.
    #[arg(long, default_value = "same")]
    disk_format: String,
    /// Bulk copy rate limit per disk (bytes/s, e.g. 100M); guest writes are never slowed.
    #[arg(long, value_parser = parse_size)]
    speed: Option<u64>,
    /// Start the relocation and print its task id instead of waiting.
    #[arg(long)]
    no_wait: bool,
    #[command(flatten)]
    agent: AgentArgs,
    #[arg(long)]
    json: bool,
}

pub async fn run(a: RelocateArgs) -> Result<u8> {
    let mut disks = serde_json::Map::new();
    for d in &a.disks {
        let (n, ds) = d
            .split_once('=')
            .filter(|(n, ds)| !n.is_empty() && !ds.is_empty())
            .ok_or_else(|| anyhow!("--disk {d:?}: expected NAME=DATASTORE (e.g. disk0=ds2)"))?;
        disks.insert(n.to_string(), json!(ds));
    }
    if a.host.is_none() && a.datastore.is_none() && disks.is_empty() && a.disk_format == "same" {
        bail!(
            "say where VM {} goes: --host HOST, --datastore DS, --disk NAME=DS or --disk-format",
            a.vm
        );
    }
    let body = json!({
        "datastore": a.datastore, "host": a.host, "disks": disks,
        "disk_format": a.disk_format, "speed": a.speed,
        "downtime_ms": a.downtime_ms, "bandwidth": a.bandwidth,
        "multifd_channels": a.multifd_channels, "timeout_s": a.timeout,
    });
    let t = a
        .agent
        .call("POST", &format!("/v1/vms/{}/relocate", a.vm), Some(body))
        .await?;
    let id = t["id"]
        .as_u64()
        .ok_or_else(|| anyhow!("the agent returned no task: {t}"))?;
    if a.no_wait {
        if a.json {
            println!("{}", serde_json::to_string_pretty(&t)?);
        } else {
            println!("relocating VM {} as task {id} (ferry task show {id})", a.vm);
        }
        return Ok(0);
    }
    let bar = (!a.json && std::io::stderr().is_terminal()).then(|| {
        let b = indicatif::ProgressBar::new(t["progress"]["total_bytes"].as_u64().unwrap_or(0));
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg} {bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .expect("valid template"),
        );
        b.set_message(format!("relocating {}", a.vm));
        b
    });
    let end: Value = loop {
        let v = a
            .agent
            .call("GET", &format!("/v1/tasks/{id}"), None)
            .await?;
        if let Some(b) = &bar {
            b.set_length(v["progress"]["total_bytes"].as_u64().unwrap_or(0));
            b.set_position(v["progress"]["done_bytes"].as_u64().unwrap_or(0));
        }
        if v["state"] != "running" {
            break v;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&end)?);
    }
    match end["state"].as_str() {
        Some("done") => {
            if !a.json && end["result"]["host"].is_string() {
                let r = &end["result"];
                print_disks(r);
                if let Some(note) = r["note"].as_str() {
                    println!("{note}");
                } else {
                    let storage = match r["copied_bytes"].as_u64() {
                        Some(c) => format!(
                            " and datastore {} ({} of disk copied)",
                            r["datastore"].as_str().unwrap_or("?"),
                            human(c)
                        ),
                        None => String::new(),
                    };
                    println!(
                        "VM {} moved live to host {}{storage} in {:.1} s: guest paused {:.0} ms (stop to resume), {} of memory sent",
                        a.vm,
                        r["host"].as_str().unwrap_or("?"),
                        r["duration_s"].as_f64().unwrap_or(0.0),
                        r["pause_ms"].as_f64().unwrap_or(f64::NAN),
                        human(r["ram_transferred_bytes"].as_u64().unwrap_or(0)),
                    );
                }
            } else if !a.json {
                let r = &end["result"];
                print_disks(r);
                println!(
                    "VM {} relocated ({}; definition on {}) in {:.1} s; guest I/O held {:.1} ms at the switch",
                    a.vm,
                    if r["running"] == true { "live" } else { "powered off" },
                    r["datastore"].as_str().unwrap_or("?"),
                    r["duration_s"].as_f64().unwrap_or(0.0),
                    r["io_pause_ms"].as_f64().unwrap_or(0.0),
                );
            }
            Ok(0)
        }
        Some("cancelled") => {
            eprintln!(
                "ferry: relocation of VM {} was cancelled; it stays where it was",
                a.vm
            );
            Ok(1)
        }
        Some("unknown") => {
            eprintln!(
                "ferry: {}",
                end["error"]
                    .as_str()
                    .unwrap_or("the relocation's outcome is unknown")
            );
            Ok(3)
        }
        _ => bail!(
            "relocation of VM {} failed: {}",
            a.vm,
            end["error"].as_str().unwrap_or("(no reason given)")
        ),
    }
}

/// One line per disk a relocation moved.
fn print_disks(r: &Value) {
    for d in r["disks"].as_array().into_iter().flatten() {
        println!(
            "disk {}: {} -> {} ({}, {} copied)",
            d["disk"].as_str().unwrap_or("?"),
            d["from"].as_str().unwrap_or("?"),
            d["to"].as_str().unwrap_or("?"),
            d["format"].as_str().unwrap_or("?"),
            human(d["copied_bytes"].as_u64().unwrap_or(0)),
        );
    }
}
