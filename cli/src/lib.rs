//! The `ferry` command: parses arguments, runs one command, prints human or `--json`
//! output. Errors print as one line on stderr and exit with status 2 (`disk compare`
//! exits 1 when the images differ, like `qemu-img compare`).
//!
//! A library so that the test build of the command (`ferry-hooked`, which installs test
//! hooks first) runs exactly this code; `src/main.rs` is the shipped `ferry`.

mod agentctl;
mod cluster;
mod disk;
mod dsfiles;
mod guestcheck;
mod host;
mod relocate;
mod units;
mod vmctl;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "ferry",
    version,
    about = "Live migration and clustered storage for KVM"
)]
struct Cli {
    /// I/O engine: uring, pread or auto (default; also FERRY_IO_ENGINE).
    #[arg(long, global = true, value_name = "ENGINE")]
    engine: Option<String>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create, inspect, convert and compare disk images (raw, qcow2).
    #[command(subcommand)]
    Disk(disk::DiskCommand),
    /// Create and inspect clustered datastores, and the files and folders in them.
    #[command(subcommand)]
    Datastore(cluster::DatastoreCommand),
    /// Join a datastore as a host, hold a lock while a command runs (like flock(1)).
    Lock(cluster::LockArgs),
    /// Run the host agent (joins datastores, serves NBD exports and the control API).
    Agent(agentctl::AgentCmd),
    /// Hosts of the cluster, as the local agent sees them.
    #[command(subcommand)]
    Host(agentctl::HostCommand),
    /// NBD exports of datastore files, served by an agent.
    #[command(subcommand)]
    Export(agentctl::ExportCommand),
    /// Virtual machines: define, start, stop, list, console, remove.
    #[command(subcommand)]
    Vm(vmctl::VmCommand),
    /// Move a VM to other datastores (live when it runs): disks, definition, or both.
    RelocateVm(relocate::RelocateArgs),
    /// Check the test guest's console logs against its disk: every acknowledged write
    /// present, and the longest pause between them.
    GuestCheck(guestcheck::GuestCheckArgs),
    /// Long-running work of an agent.
    #[command(subcommand)]
    Task(agentctl::TaskCommand),
    /// Internal: the fencing watchdog started by `ferry lock` and `ferry agent`.
    #[command(hide = true)]
    Supervise(cluster::SuperviseArgs),
}

/// Runs the command line of this process.
pub fn run() -> ExitCode {
    let cli = Cli::parse();
    if matches!(cli.command, Command::Supervise(_)) {
        // The watchdog leaves the caller's session and blocks SIGHUP before any thread
        // exists (a signal mask is per thread; threads inherit it).
        if let Err(e) = datastore::fence::detach() {
            eprintln!("ferry supervise: {e}");
            return ExitCode::from(2);
        }
    }
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FERRY_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    if let Some(e) = &cli.engine {
        // Read once by the process-wide engine, before any I/O starts.
        std::env::set_var("FERRY_IO_ENGINE", e);
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ferry: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let result = match cli.command {
        Command::Disk(cmd) => rt.block_on(disk::run(cmd)),
        Command::Datastore(cmd) => cluster::run_datastore(cmd, &rt),
        Command::Lock(args) => cluster::run_lock(args),
        Command::Supervise(args) => cluster::run_supervise(args),
        Command::Agent(cmd) => agentctl::run_agent(cmd, &rt),
        Command::Host(cmd) => rt.block_on(agentctl::run_host(cmd)),
        Command::Export(cmd) => rt.block_on(agentctl::run_export(cmd)),
        Command::Task(cmd) => rt.block_on(agentctl::run_task(cmd)),
        Command::Vm(cmd) => rt.block_on(vmctl::run(cmd)),
        Command::RelocateVm(a) => rt.block_on(relocate::run(a)),
        Command::GuestCheck(a) => rt.block_on(guestcheck::run(a)),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("ferry: {e:#}");
            ExitCode::from(2)
        }
    }
}
