//! `vipgate`: the one binary. Parses the command line, sets up logging, dispatches.
//!
//! This is the only crate that uses anyhow: libraries return typed errors, and here they
//! become messages for the operator. It is a library with a thin `main.rs` only so that
//! the fuzz targets can reach the config loader ([`fuzzing`]).
// The `show lb --json` shape test spells out one whole service in one `json!`.
#![recursion_limit = "256"]

mod args;
mod check;
mod config;
mod control;
mod lab;
mod logging;
mod metrics;
mod notify;
mod parts;
mod privileges;
mod run;

use anyhow::Context;
use args::{Cli, Command, ControlArgs, HttpOp, HttpSetOp, LbOp, LbSetOp, NatOp, VrrpOp};
use clap::{CommandFactory, Parser};
use control::{ControlOp, Request};
use std::path::PathBuf;
use std::process::ExitCode;

/// The whole program: what `main` runs.
pub fn main_entry() -> ExitCode {
    let cli = Cli::parse();
    let (quiet, log_file) = match &cli.command {
        Command::Ssh(args) => parts::ssh::log_settings(args),
        _ => (false, None),
    };
    if let Err(e) = logging::init(cli.log_format, cli.verbose, quiet, log_file.as_deref()) {
        eprintln!("vipgate: {e}");
        return ExitCode::from(255);
    }
    // The daemons load their config and reduce privileges while the main thread is the only
    // thread, so every thread and child created afterwards inherits the reduced set.
    let preloaded = match &cli.command {
        Command::Run { config, .. } => match prepare_daemon(config) {
            Ok(site) => Some(site),
            Err(code) => return code,
        },
        Command::Sshd(args) => match prepare_daemon(&args.config) {
            Ok(site) => Some(site),
            Err(code) => return code,
        },
        _ => None,
    };
    // Two workers: the machines vipgate targets are small, and the hot paths run on their own
    // threads in the drivers.
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("vipgate: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(cli.command, preloaded)) {
        Ok(code) => code,
        Err(e) => {
            // Config errors are already FILE:LINE:COL lines; print them as they are.
            match e.downcast_ref::<config::ConfigErrors>() {
                Some(c) => eprintln!("{c}"),
                None => eprintln!("vipgate: {e:#}"),
            }
            ExitCode::FAILURE
        }
    }
}

/// Loads a daemon's config, raises the open-file limit and reduces privileges (per
/// `[daemon]`); on failure prints why and returns the exit code.
fn prepare_daemon(path: &std::path::Path) -> Result<config::SiteConfig, ExitCode> {
    let site = match config::load_on_host(path) {
        Ok(site) => site,
        Err(errors) => {
            eprintln!("{errors}");
            return Err(ExitCode::FAILURE);
        }
    };
    for w in &site.warnings {
        tracing::warn!("{w}");
    }
    privileges::raise_nofile_limit();
    if !site.daemon.drop_privileges {
        tracing::warn!("[daemon] drop_privileges = false: running with every privilege");
        return Ok(site);
    }
    let identity = match &site.daemon.user {
        Some(user) => match privileges::resolve(
            user.get_ref(),
            site.daemon.group.as_ref().map(|g| g.get_ref().as_str()),
        ) {
            Ok(id) => Some(id),
            Err(e) => {
                eprintln!("vipgate: [daemon] user: {e:#}");
                return Err(ExitCode::FAILURE);
            }
        },
        None => None,
    };
    // The gateway's kernel path (the default data path; a PAT gateway's or a director's) needs bpffs mounted while
    // CAP_SYS_ADMIN is still held, and CAP_BPF afterwards; when bpffs cannot be had the
    // gateway runs on the TUN and says why.
    let kernel = |d: Option<&toml::Spanned<String>>| d.is_none_or(|d| d.get_ref() == "kernel");
    let kernel_path = match &site.nat {
        Some(n) => kernel(n.datapath.as_ref()),
        // A director runs a gateway of its own for its services.
        None => {
            !site.service.is_empty() && kernel(site.lb.as_ref().and_then(|l| l.datapath.as_ref()))
        }
    };
    let mut extra = Vec::new();
    if kernel_path {
        match natgw::driver::prepare_kernel_datapath() {
            Ok(()) => extra.push(caps::Capability::CAP_BPF),
            Err(e) => tracing::warn!("the NAT kernel path will not load: {e}"),
        }
    }
    // The same for the GRE kernel path (the default for plain GRE tunnels).
    let gre_kernel_path = site
        .gre
        .iter()
        .any(|g| g.datapath.as_ref().is_none_or(|d| d.get_ref() == "kernel"));
    if gre_kernel_path && !extra.contains(&caps::Capability::CAP_BPF) {
        match gre::driver::prepare_kernel_datapath() {
            Ok(()) => extra.push(caps::Capability::CAP_BPF),
            Err(e) => tracing::warn!("the GRE kernel path will not load: {e}"),
        }
    }
    if let Err(e) = privileges::reduce(identity, &extra) {
        eprintln!("vipgate: reducing privileges: {e:#}");
        return Err(ExitCode::FAILURE);
    }
    Ok(site)
}

/// How long `vipgate restart` waits for the new run to answer.
const RESTART_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

async fn dispatch(
    command: Command,
    preloaded: Option<config::SiteConfig>,
) -> anyhow::Result<ExitCode> {
    match command {
        Command::Check {
            config,
            quiet,
            dump,
            host,
        } => Ok(check::run(&config, quiet, dump, host)?),
        Command::Run { config, only } => run::run(&config, preloaded, only)
            .await
            .map(|()| ExitCode::SUCCESS),
        Command::Status { control, json } => {
            let result = control::request(&control_path(&control)?, &Request::Status).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&result)?);
            } else {
                print!("{}", render_status(&result));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Show {
            what,
            control,
            json,
            connections: true,
            service,
            backend,
            client,
            limit,
            ..
        } => {
            if what != parts::Kind::Lb {
                anyhow::bail!(
                    "--connections lists the flows of the virtual services: `show lb --connections`"
                );
            }
            let backend = backend.as_deref().map(parse_backend).transpose()?;
            let req = Request::Control {
                command: ControlOp::LbConnections {
                    service,
                    backend,
                    client,
                    limit,
                },
            };
            let result = control::request(&control_path(&control)?, &req).await?;
            let answers: Vec<parts::lb::Connections> = serde_json::from_value(result)
                .context("the daemon's answer to show lb --connections")?;
            let matched = answers.iter().map(|a| a.matched).sum();
            let mut all: Vec<_> = answers.into_iter().flat_map(|a| a.connections).collect();
            all.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
            if json {
                let out = serde_json::json!({ "connections": all, "matched": matched });
                println!("{}", serde_json::to_string_pretty(&out)?);
            } else {
                print!("{}", parts::lb::render_connections(&all, matched));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Show {
            what,
            control,
            json,
            rate: true,
            interval,
            ..
        } => {
            if what != parts::Kind::Lb {
                anyhow::bail!("--rate gives the virtual services' rates: `show lb --rate`");
            }
            let path = control_path(&control)?;
            let read =
                async || -> anyhow::Result<(tokio::time::Instant, Vec<serde_json::Value>)> {
                    let v = control::request(&path, &Request::Show { kind: what }).await?;
                    Ok((
                        tokio::time::Instant::now(),
                        v.as_array().cloned().unwrap_or_default(),
                    ))
                };
            let (t0, before) = read().await?;
            tokio::time::sleep(interval).await;
            let (t1, after) = read().await?;
            let rates = parts::lb::rates(&before, &after, t1 - t0);
            if json {
                let out = serde_json::json!({
                    "interval_ms": u64::try_from((t1 - t0).as_millis()).unwrap_or(u64::MAX),
                    "services": rates,
                });
                println!("{}", serde_json::to_string_pretty(&out)?);
            } else if rates.is_empty() {
                println!("no lb configured in the running daemon");
            } else {
                print!("{}", parts::lb::render_rates(&rates));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Show {
            what,
            control,
            json,
            utc,
            ..
        } => {
            let result =
                control::request(&control_path(&control)?, &Request::Show { kind: what }).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&result)?);
            } else {
                let items = result.as_array().cloned().unwrap_or_default();
                if items.is_empty() {
                    println!("no {what} configured in the running daemon");
                } else {
                    print!("{}", render_kind(what, &items, utc));
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Reload { control } => {
            let report = control::request(&control_path(&control)?, &Request::Reload).await?;
            let lines = report.as_array().cloned().unwrap_or_default();
            if lines.is_empty() {
                println!("reloaded: nothing changed");
            }
            for l in lines {
                println!("reloaded: {}", l.as_str().unwrap_or_default());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Restart { control } => {
            let path = control_path(&control)?;
            let said = control::request(&path, &Request::Restart).await?;
            println!("{}", said.as_str().unwrap_or("restarting"));
            // The old run stopped serving before it answered: whoever answers now is the new
            // run, once it is up.
            let deadline = tokio::time::Instant::now() + RESTART_WAIT;
            loop {
                match control::request(&path, &Request::Status).await {
                    Ok(_) => break,
                    Err(e) if tokio::time::Instant::now() >= deadline => {
                        anyhow::bail!(
                            "the daemon did not answer within {}s of its restart (see its log): {e:#}",
                            RESTART_WAIT.as_secs()
                        );
                    }
                    Err(_) => tokio::time::sleep(std::time::Duration::from_millis(100)).await,
                }
            }
            println!("restarted: the daemon answers again");
            Ok(ExitCode::SUCCESS)
        }
        Command::Nat {
            op: NatOp::Clear { control },
        } => {
            let req = Request::Control {
                command: ControlOp::NatClear,
            };
            let result = control::request(&control_path(&control)?, &req).await?;
            println!("{}", serde_json::to_string_pretty(&result)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Lb {
            op:
                LbOp::Weight {
                    service,
                    backend,
                    weight,
                    canary,
                    control,
                },
        } => {
            let command = match (canary.as_deref(), backend, weight) {
                (Some([backend, percent]), _, _) => ControlOp::LbCanary {
                    service,
                    backend: parse_backend(backend)?,
                    percent: parse_percent(percent)?,
                },
                (_, Some(backend), Some(weight)) => ControlOp::LbWeight {
                    service,
                    backend: parse_backend(&backend)?,
                    weight: u16::try_from(weight)
                        .map_err(|_| anyhow::anyhow!("weight {weight} is over 65535"))?,
                },
                _ => anyhow::bail!("give BACKEND WEIGHT, or --canary BACKEND PERCENT"),
            };
            let req = Request::Control { command };
            let result = control::request(&control_path(&control)?, &req).await?;
            println!("{}", serde_json::to_string_pretty(&result)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Lb {
            op:
                LbOp::AddBackend {
                    service,
                    backend,
                    weight,
                    max_connections,
                    min_connections,
                    control,
                },
        } => {
            let command = ControlOp::LbAddBackend {
                service,
                backend: parse_backend(&backend)?,
                weight: u16::try_from(weight)
                    .map_err(|_| anyhow::anyhow!("weight {weight} is over 65535"))?,
                max_connections,
                min_connections,
            };
            lb_control(&control, command).await
        }
        Command::Lb {
            op:
                LbOp::RemoveBackend {
                    service,
                    backend,
                    control,
                },
        } => {
            let backend = parse_backend(&backend)?;
            lb_control(&control, ControlOp::LbRemoveBackend { service, backend }).await
        }
        Command::Lb {
            op:
                LbOp::Set {
                    what:
                        LbSetOp::State {
                            service,
                            backend,
                            state,
                            control,
                        },
                },
        } => {
            let backend = parse_backend(&backend)?;
            let command = ControlOp::LbSetState {
                service,
                backend,
                state,
            };
            lb_control(&control, command).await
        }
        Command::Lb {
            op:
                LbOp::Drain {
                    service,
                    backend,
                    wait,
                    all,
                    timeout,
                    control,
                },
        } => {
            let backend = parse_backend(&backend)?;
            let command = ControlOp::LbSetState {
                service: service.clone(),
                backend,
                state: balance::AdminState::Drain,
            };
            // A backend the service no longer lists (removed meanwhile) holds nothing.
            drain(&control, command, wait.then_some((parts::Kind::Lb, timeout)), |show| {
                let counts = parts::lb::backend_connections(show, &service, backend)?;
                let (active, inactive) = counts.unwrap_or((0, 0));
                Ok(Held {
                    drained: active == 0 && (!all || inactive == 0),
                    progress: format!(
                        "{backend} of `{service}`: {active} active, {inactive} inactive connections"
                    ),
                    still: format!(
                        "{backend} of `{service}` still holds {active} active and {inactive} inactive connections"
                    ),
                })
            })
            .await
        }
        Command::Http {
            op:
                HttpOp::Set {
                    what:
                        HttpSetOp::State {
                            listener,
                            pool,
                            backend,
                            state,
                            control,
                        },
                },
        } => {
            let backend = parse_backend(&backend)?;
            let command = ControlOp::HttpSetState {
                listener,
                pool,
                backend,
                state,
            };
            lb_control(&control, command).await
        }
        Command::Http {
            op:
                HttpOp::Drain {
                    listener,
                    pool,
                    backend,
                    wait,
                    timeout,
                    control,
                },
        } => {
            let backend = parse_backend(&backend)?;
            let command = ControlOp::HttpSetState {
                listener: listener.clone(),
                pool: pool.clone(),
                backend,
                state: balance::AdminState::Drain,
            };
            // A backend the pool no longer lists (removed by a reload, its requests
            // finished) answers none.
            drain(&control, command, wait.then_some((parts::Kind::Http, timeout)), |show| {
                let active =
                    parts::http::backend_active(show, &listener, &pool, backend)?.unwrap_or(0);
                Ok(Held {
                    drained: active == 0,
                    progress: format!(
                        "{backend} of `{listener}` pool `{pool}`: {active} requests in flight"
                    ),
                    still: format!(
                        "{backend} of `{listener}` pool `{pool}` still answers {active} requests"
                    ),
                })
            })
            .await
        }
        Command::Vrrp {
            op:
                VrrpOp::SetPriority {
                    instance,
                    priority,
                    control,
                },
        } => {
            let priority = u8::try_from(priority)
                .ok()
                .filter(|p| (1..=254).contains(p))
                .ok_or_else(|| anyhow::anyhow!("priority {priority} is outside 1..=254"))?;
            let req = Request::Control {
                command: ControlOp::VrrpSetPriority { instance, priority },
            };
            let result = control::request(&control_path(&control)?, &req).await?;
            println!("{}", serde_json::to_string_pretty(&result)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Ssh(args) => Ok(parts::ssh::run_ssh(*args).await),
        Command::Sshd(args) => parts::ssh::run_sshd(args).await.map(|()| ExitCode::SUCCESS),
        Command::Lab { action, prefix } => {
            lab::lab(action, &prefix).await.map(|()| ExitCode::SUCCESS)
        }
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "vipgate",
                &mut std::io::stdout(),
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Man { out } => {
            write_man_pages(&out)?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// A backend as `lb` commands take it: `ip:port`, or `ip` for a backend without a port (a
/// multi-port service's; shown as `ip:0`), as in the config.
fn parse_backend(text: &str) -> anyhow::Result<std::net::SocketAddrV4> {
    text.parse()
        .or_else(|_| {
            text.parse::<std::net::Ipv4Addr>()
                .map(|ip| std::net::SocketAddrV4::new(ip, 0))
        })
        .with_context(|| {
            format!(
                "backend {text:?} must be written ip:port (or ip for no port), as in the config"
            )
        })
}

/// A canary share as `lb weight --canary` takes it: `10%` or `10`, 0 to 100.
fn parse_percent(text: &str) -> anyhow::Result<u8> {
    text.strip_suffix('%')
        .unwrap_or(text)
        .trim()
        .parse::<u8>()
        .ok()
        .filter(|&p| p <= 100)
        .with_context(|| format!("canary share {text:?} must be a whole percentage, 0% to 100%"))
}

/// How often `lb drain --wait` and `http drain --wait` read the backend's counts.
const DRAIN_POLL: std::time::Duration = std::time::Duration::from_millis(100);

/// What a drained backend still holds, as `lb drain --wait` / `http drain --wait` read it.
struct Held {
    /// Nothing left that the wait is for.
    drained: bool,
    /// The counts, printed each time they change.
    progress: String,
    /// The error line when the wait times out.
    still: String,
}

/// `lb drain` / `http drain`: sends the drain order and prints the daemon's answer; with
/// `wait` (`show` kind, timeout), polls that `show` until `held` reads the backend drained,
/// printing each change of its counts; exit 1 after the timeout (the backend stays in drain).
async fn drain(
    control: &ControlArgs,
    command: ControlOp,
    wait: Option<(parts::Kind, std::time::Duration)>,
    held: impl Fn(&serde_json::Value) -> anyhow::Result<Held>,
) -> anyhow::Result<ExitCode> {
    let path = control_path(control)?;
    let result = control::request(&path, &Request::Control { command }).await?;
    println!("{}", serde_json::to_string_pretty(&result)?);
    let Some((kind, timeout)) = wait else {
        return Ok(ExitCode::SUCCESS);
    };
    let deadline = tokio::time::Instant::now() + timeout;
    let mut last = None;
    loop {
        let show = control::request(&path, &Request::Show { kind }).await?;
        let held = held(&show)?;
        if last.as_ref() != Some(&held.progress) {
            println!("{}", held.progress);
            last = Some(held.progress);
        }
        if held.drained {
            println!("drained");
            return Ok(ExitCode::SUCCESS);
        }
        if tokio::time::Instant::now() >= deadline {
            eprintln!(
                "vipgate: {} after {}s; it stays in drain",
                held.still,
                timeout.as_secs_f64()
            );
            return Ok(ExitCode::FAILURE);
        }
        tokio::time::sleep(DRAIN_POLL).await;
    }
}

/// Sends one operator command (`lb`, `http`) and prints the daemon's answer.
async fn lb_control(control: &ControlArgs, command: ControlOp) -> anyhow::Result<ExitCode> {
    let req = Request::Control { command };
    let result = control::request(&control_path(control)?, &req).await?;
    println!("{}", serde_json::to_string_pretty(&result)?);
    Ok(ExitCode::SUCCESS)
}

/// The control socket: --control, else `[daemon] control` of --config, else the default.
fn control_path(args: &ControlArgs) -> anyhow::Result<PathBuf> {
    if let Some(p) = &args.control {
        return Ok(p.clone());
    }
    if let Some(c) = &args.config {
        return Ok(config::load(c)?.daemon.control.into_inner());
    }
    Ok(PathBuf::from(config::daemon::DEFAULT_CONTROL))
}

/// One kind's screen: the kind's own table of the units that run, then a line per unit the
/// supervisor has restarted or is restarting (a dead unit has no table row to show it in).
fn render_kind(kind: parts::Kind, items: &[serde_json::Value], utc: bool) -> String {
    let is_dead = |v: &serde_json::Value| v["state"] == "dead";
    let running: Vec<serde_json::Value> = items.iter().filter(|v| !is_dead(v)).cloned().collect();
    let mut out = if running.is_empty() {
        String::new()
    } else {
        kind.render(&running, utc)
    };
    for v in items {
        let restarts = v["restarts"].as_u64().unwrap_or(0);
        if restarts == 0 && !is_dead(v) {
            continue;
        }
        let name = v["name"].as_str().unwrap_or("?");
        let cause = v["last_death"].as_str().unwrap_or("unknown");
        if is_dead(v) {
            out.push_str(&format!(
                "{name}: dead, being restarted ({restarts} restarts so far): {cause}\n"
            ));
        } else {
            out.push_str(&format!(
                "{name}: restarted {restarts}x, last death: {cause}\n"
            ));
        }
    }
    out
}

pub(crate) fn render_status(result: &serde_json::Value) -> String {
    let Ok(parts) = serde_json::from_value::<Vec<control::PartStatus>>(result.clone()) else {
        return format!("{result}\n");
    };
    if parts.is_empty() {
        return "vipgate is running with no parts\n".into();
    }
    let mut out = String::new();
    for kind in parts::Kind::ALL {
        let items: Vec<serde_json::Value> = parts
            .iter()
            .filter(|p| p.kind == kind)
            .map(|p| p.status.clone())
            .collect();
        if !items.is_empty() {
            out.push_str(&format!("== {kind}\n{}", render_kind(kind, &items, false)));
        }
    }
    out
}

/// Writes `vipgate.1`, a page per subcommand at every depth (`vipgate-lb-weight.1`), and
/// `vipgate.toml.5`, printing each path.
fn write_man_pages(dir: &std::path::Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut pages = Vec::new();
    man_pages("vipgate", Cli::command(), &mut pages);
    let mut files = Vec::new();
    for (name, page) in pages {
        let mut buf = Vec::new();
        clap_mangen::Man::new(page).render(&mut buf)?;
        files.push((format!("{name}.1"), buf));
    }
    files.push(("vipgate.toml.5".to_owned(), config_man_page().into_bytes()));
    for (name, bytes) in files {
        let path = dir.join(name);
        std::fs::write(&path, bytes).with_context(|| format!("writing {}", path.display()))?;
        println!("{}", path.display());
    }
    Ok(())
}

/// `cmd` as the page `name`, then each subcommand as `name-sub`, depth first.
fn man_pages(name: &str, cmd: clap::Command, out: &mut Vec<(String, clap::Command)>) {
    let subs: Vec<clap::Command> = cmd
        .get_subcommands()
        .filter(|s| s.get_name() != "help")
        .cloned()
        .collect();
    out.push((name.to_owned(), cmd.name(name.to_owned())));
    for sub in subs {
        let sub_name = format!("{name}-{}", sub.get_name());
        man_pages(&sub_name, sub, out);
    }
}

/// The contract example every release is checked against (`vipgate check` passes it).
const REFERENCE_CONFIG: &str = include_str!("../../examples/reference.toml");

/// vipgate.toml(5): the sections `check` knows and the reference example, which the config
/// tests validate, so the page shows a file `check` accepts.
fn config_man_page() -> String {
    let roff_text = |text: &str| {
        text.lines()
            .map(|l| {
                let l = l.replace('\\', "\\e");
                if l.starts_with('.') || l.starts_with('\'') {
                    format!("\\&{l}\n")
                } else {
                    format!("{l}\n")
                }
            })
            .collect::<String>()
    };
    let sections = config::SECTIONS
        .iter()
        .map(|s| format!(".TP\n.B {s}\n{}\n", config::section_summary(s)))
        .collect::<String>();
    format!(
        ".TH VIPGATE.TOML 5 \"\" \"vipgate {version}\" \"File Formats\"\n\
         .SH NAME\nvipgate.toml \\- vipgate site configuration\n\
         .SH DESCRIPTION\nOne TOML file describes everything a vipgate host runs. \
         .B vipgate check -c FILE\nreports every mistake as FILE:LINE:COL lines, or summarises a valid file; \
         .B vipgate run\nand\n.B vipgate reload\nread the same file. A top-level\n.B include\nlists further files or patterns \
         (* and ? in the file name) whose sections add to the main file's.\n\
         .SH SECTIONS\n{sections}\
         .SH EXAMPLE\nEvery section once (examples/reference.toml):\n.PP\n.nf\n{example}.fi\n\
         .SH SEE ALSO\n.BR vipgate (1),\n.BR vipgate-check (1),\n.BR vipgate-run (1)\n",
        version = env!("CARGO_PKG_VERSION"),
        example = roff_text(REFERENCE_CONFIG),
    )
}

/// Entry points for the fuzz targets in `fuzz/` and the corpus replay test; not an API.
#[doc(hidden)]
pub mod fuzzing {
    /// Parses and validates config text; must never panic.
    pub fn config_parse(text: &str) {
        let _ = crate::config::parse(std::path::Path::new("fuzz.toml"), text);
    }

    /// Parses a duration string; must never panic, and must round-trip through Display.
    pub fn duration_parse(text: &str) {
        if let Ok(d) = text.parse::<crate::config::HumanDuration>() {
            let back: crate::config::HumanDuration =
                d.to_string().parse().expect("display output parses");
            assert_eq!(back, d);
        }
    }
}

#[cfg(test)]
mod render_tests {
    use super::*;

    #[test]
    fn restarted_and_dead_units_get_a_line_of_their_own() {
        let items = vec![
            serde_json::json!({"name": "gw", "state": "dead", "restarts": 2,
                               "last_death": "nat packet loop failed: TUN I/O"}),
        ];
        let text = render_kind(parts::Kind::Nat, &items, false);
        assert_eq!(
            text,
            "gw: dead, being restarted (2 restarts so far): nat packet loop failed: TUN I/O\n"
        );
    }
}
