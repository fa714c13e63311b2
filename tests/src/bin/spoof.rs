//! `spoof`: forged TCP segments from inside a test namespace, for the adversarial tests and
//! bench/synflood.sh.
//!
//! - `spoof syn-flood --from 203.0.0.0/16 --to 198.51.100.1:8001 --count 100000 --rate 50000`
//!   sends SYNs from random addresses and ports of `--from` (random sequence numbers) at
//!   `--rate` per second, and stops after `--count` SYNs or `--max-secs`, whichever comes
//!   first;
//! - `spoof rst --from 198.51.100.200:40000 --to 198.51.100.1:8003 --seq-offset 2147483648`
//!   waits for a segment of that connection arriving here (`--to` → `--from`), and sends one
//!   RST as `--from` whose sequence number is the one the peer expects plus `--seq-offset`
//!   (an off-path attacker's guess: 2^31 is as wrong as a guess can be).
//!
//! Bounded by construction: at most [`MAX_COUNT`] segments and [`MAX_SECS`] seconds, and it
//! refuses to run outside a namespace made with `ip netns` (see [`vipgate_tests::spoof`]).

use std::net::SocketAddrV4;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use ipnet::Ipv4Net;
use vipgate_tests::spoof::{RawSender, Rng, Segment, TcpSniffer, flags, random_host};

/// Most SYNs one run sends.
const MAX_COUNT: u64 = 2_000_000;
/// Longest a run lasts, in seconds.
const MAX_SECS: u64 = 120;
/// The rate is checked (and the sender sleeps) once per this many segments.
const BURST: u64 = 32;

#[derive(Parser)]
#[command(about = "Forged TCP segments for vipgate's adversarial tests (test namespaces only)")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// SYNs from random sources of a network.
    SynFlood {
        /// Network the forged sources are drawn from.
        #[arg(long)]
        from: Ipv4Net,
        /// Destination address and port.
        #[arg(long)]
        to: SocketAddrV4,
        /// SYNs to send (at most 2,000,000).
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..=MAX_COUNT))]
        count: u64,
        /// SYNs per second.
        #[arg(long, default_value_t = 50_000, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
        rate: u64,
        /// Stop after this many seconds even if `--count` is not reached (at most 120).
        #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=MAX_SECS))]
        max_secs: u64,
        /// Seed of the source generator (default: random).
        #[arg(long)]
        seed: Option<u64>,
    },
    /// One RST with a sequence number off by `--seq-offset`, as the client of a connection.
    Rst {
        /// The client endpoint the RST claims to come from.
        #[arg(long)]
        from: SocketAddrV4,
        /// The endpoint it is sent to.
        #[arg(long)]
        to: SocketAddrV4,
        /// Added (mod 2^32) to the sequence number the peer expects.
        #[arg(long)]
        seq_offset: u32,
        /// How long to wait for a segment of the connection to learn that number.
        #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=MAX_SECS))]
        learn_secs: u64,
    },
}

fn main() -> ExitCode {
    let result = match Cli::parse().command {
        Command::SynFlood {
            from,
            to,
            count,
            rate,
            max_secs,
            seed,
        } => syn_flood(from, to, count, rate, Duration::from_secs(max_secs), seed),
        Command::Rst {
            from,
            to,
            seq_offset,
            learn_secs,
        } => rst(from, to, seq_offset, Duration::from_secs(learn_secs)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("spoof: {e}");
            ExitCode::FAILURE
        }
    }
}

fn syn_flood(
    from: Ipv4Net,
    to: SocketAddrV4,
    count: u64,
    rate: u64,
    max: Duration,
    seed: Option<u64>,
) -> std::io::Result<()> {
    let sender = RawSender::open()?;
    let mut rng = match seed {
        Some(s) => Rng::new(s),
        None => Rng::from_urandom()?,
    };
    let start = Instant::now();
    let (mut sent, mut errors) = (0u64, 0u64);
    while sent + errors < count {
        if (sent + errors).is_multiple_of(BURST) {
            let elapsed = start.elapsed();
            if elapsed >= max {
                break;
            }
            // Where the schedule says we should be; sleep off any lead.
            let due = Duration::from_secs_f64((sent + errors) as f64 / rate as f64);
            if let Some(lead) = due.checked_sub(elapsed) {
                std::thread::sleep(lead);
            }
        }
        let src = SocketAddrV4::new(
            random_host(&mut rng, from.network(), from.prefix_len()),
            1024 + (rng.next_u32() % (65_536 - 1024)) as u16,
        );
        let syn = Segment {
            src,
            dst: to,
            seq: rng.next_u32(),
            ack: 0,
            flags: flags::SYN,
            window: 64_240,
            ip_id: rng.next_u32() as u16,
        };
        match sender.send(&syn) {
            Ok(()) => sent += 1,
            Err(_) => errors += 1,
        }
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "sent {sent} SYNs from {from} to {to} in {secs:.2} s ({:.0}/s), {errors} send errors",
        sent as f64 / secs.max(1e-9)
    );
    Ok(())
}

fn rst(
    from: SocketAddrV4,
    to: SocketAddrV4,
    seq_offset: u32,
    learn: Duration,
) -> std::io::Result<()> {
    let sender = RawSender::open()?;
    let sniffer = TcpSniffer::open()?;
    // The peer's segment acknowledges exactly the sequence number it expects from `from`.
    let seen = sniffer.wait_for(learn, |s| {
        s.src == to && s.dst == from && s.flags & flags::ACK != 0
    })?;
    let seq = seen.ack.wrapping_add(seq_offset);
    sender.send(&Segment {
        src: from,
        dst: to,
        seq,
        ack: 0,
        flags: flags::RST,
        window: 0,
        ip_id: 0,
    })?;
    println!(
        "sent RST {from} -> {to} seq {seq} (the peer expects {})",
        seen.ack
    );
    Ok(())
}
