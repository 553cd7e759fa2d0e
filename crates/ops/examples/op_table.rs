//! Prints markdown tables of median op times measured in one run: ours vs candle's own path
//! (warm-up, then the median of `--runs` repetitions; ratios are within the run) and, with
//! `--peer <python>`, our depthwise forward vs PyTorch's in NCHW and channels-last.
//!
//! `RAYON_NUM_THREADS=2 cargo run --release -p deeplab-ops --example op_table -- --runs 7`
//!
//! Options:
//! - `--runs N`: repetitions per measurement (default 5).
//! - `--filter S`: only the ours-vs-candle cases whose name contains `S`.
//! - `--no-candle`: skip the ours-vs-candle table.
//! - `--ours-only`: in that table, time only our side (for profiling).
//! - `--peer PY`: also run `benches/peers/ops_torch.py --serve` under the Python `PY` (with
//!   `OMP_NUM_THREADS` set to our thread count) and print the depthwise table against PyTorch.
//!   The machine is shared and noisy, so measurements alternate (ours, torch, ours, torch, ...)
//!   for `--rounds R` rounds (default 5) and each column is the median of the rounds' medians.
//!   Without a usable peer only our column is printed, with a line saying why.
//! - `OP_TABLE_MIN=1` (environment): report the minimum of the runs instead of the median,
//!   steadier than the median when other processes load the machine.
//!
//! Ours against PyTorch on the depthwise shapes only:
//! `RAYON_NUM_THREADS=2 cargo run --release -p deeplab-ops --example op_table -- --runs 15
//! --rounds 7 --no-candle --peer ~/.cache/deeplab-peer-venv/bin/python`
//!
//! The process allocator is mimalloc with freed memory kept mapped, as in the `deeplab`
//! binary (`deeplab_cli::alloc`): op outputs of tens of MB then reuse pages instead of
//! page-faulting fresh ones on every call, which is how the ops run inside a model.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `purge_delay` option index (see `deeplab_cli::alloc`): -1 keeps freed pages.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

use candle_core::{Device, Result, Tensor};
use deeplab_ops::reference::seeded_uniform;
use deeplab_ops::{depthwise_conv2d, Conv2dGeometry};
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::Instant;

#[path = "../benches/cases.rs"]
mod cases;

fn median(mut t: Vec<f64>) -> f64 {
    t.sort_by(f64::total_cmp);
    t[t.len() / 2]
}

fn median_ms(f: &dyn Fn() -> Result<()>, runs: usize) -> Result<f64> {
    f()?;
    let t = (0..runs.max(1))
        .map(|_| {
            let s = Instant::now();
            f().map(|_| s.elapsed().as_secs_f64() * 1e3)
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(if std::env::var_os("OP_TABLE_MIN").is_some() {
        t.into_iter().fold(f64::INFINITY, f64::min)
    } else {
        median(t)
    })
}

/// The PyTorch peer process: one request line in, one JSON line of timings out.
struct Peer {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Peer {
    fn start(python: &str, threads: usize) -> std::result::Result<Self, String> {
        let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../benches/peers/ops_torch.py");
        if !script.is_file() {
            return Err(format!("{} not found", script.display()));
        }
        let mut child = Command::new(python)
            .arg(&script)
            .args(["--serve", "--threads", &threads.to_string()])
            .env("OMP_NUM_THREADS", threads.to_string())
            .env("MKL_NUM_THREADS", threads.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start {python}: {e}"))?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            return Err("peer pipes unavailable".into());
        };
        let mut peer = Self {
            child,
            stdin,
            stdout: BufReader::new(stdout),
        };
        // The first line announces the torch version and thread count.
        let hello = peer.line()?;
        eprintln!("peer: {}", hello.trim());
        Ok(peer)
    }

    fn line(&mut self) -> std::result::Result<String, String> {
        let mut s = String::new();
        match self.stdout.read_line(&mut s) {
            Ok(0) => Err("peer exited".into()),
            Ok(_) => Ok(s),
            Err(e) => Err(format!("reading the peer: {e}")),
        }
    }

    /// One round: (NCHW ms, channels-last ms) per shape of `cases::DW_SHAPES`.
    fn round(&mut self, runs: usize) -> std::result::Result<Vec<(f64, f64)>, String> {
        writeln!(self.stdin, "depthwise {runs}")
            .and_then(|_| self.stdin.flush())
            .map_err(|e| format!("writing to the peer: {e}"))?;
        let line = self.line()?;
        // The line is `[[nchw, cl], ...]`, one pair per shape: parse it by hand.
        let nums: Vec<f64> = line
            .split(|c: char| !(c.is_ascii_digit() || c == '.' || c == 'e' || c == '-'))
            .filter(|s| !s.is_empty())
            .map(|s| s.parse::<f64>())
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| format!("bad peer line {line:?}: {e}"))?;
        if nums.len() != 2 * cases::DW_SHAPES.len() {
            return Err(format!("bad peer line {line:?}"));
        }
        Ok(nums.chunks_exact(2).map(|p| (p[0], p[1])).collect())
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin, "quit");
        let _ = self.stdin.flush();
        let _ = self.child.wait();
    }
}

fn peer_table(python: Option<&str>, runs: usize, rounds: usize) -> Result<()> {
    let dev = Device::Cpu;
    let threads = rayon::current_num_threads();
    let inputs = cases::DW_SHAPES
        .iter()
        .map(|&(c, h, w, r)| {
            let x = seeded_uniform(&[1, c, h, w], 1, &dev)?;
            let k = seeded_uniform(&[c, 1, 3, 3], 2, &dev)?;
            Ok((x, k, Conv2dGeometry::same(3, r)))
        })
        .collect::<Result<Vec<(Tensor, Tensor, Conv2dGeometry)>>>()?;
    let mut peer = match python {
        None => None,
        Some(py) => match Peer::start(py, threads) {
            Ok(p) => Some(p),
            Err(e) => {
                println!("PyTorch peer unavailable ({e}): our column only.");
                None
            }
        },
    };
    let n = inputs.len();
    let (mut ours, mut nchw, mut cl) = (vec![vec![]; n], vec![vec![]; n], vec![vec![]; n]);
    for _ in 0..rounds.max(1) {
        for (i, (x, k, g)) in inputs.iter().enumerate() {
            ours[i].push(median_ms(&|| depthwise_conv2d(x, k, g).map(|_| ()), runs)?);
        }
        if let Some(p) = peer.as_mut() {
            match p.round(runs) {
                Ok(v) => {
                    for (i, (a, b)) in v.into_iter().enumerate() {
                        nchw[i].push(a);
                        cl[i].push(b);
                    }
                }
                Err(e) => {
                    println!("PyTorch peer failed ({e}): our column only from here on.");
                    peer = None;
                }
            }
        }
    }
    drop(peer);
    println!(
        "depthwise 3x3 forward, {threads} threads, median of {} rounds x {runs} runs",
        rounds.max(1)
    );
    println!("| op | ours (ms) | torch NCHW (ms) | torch channels-last (ms) | ours / best torch |");
    println!("|---|---:|---:|---:|---:|");
    for (i, &(c, h, w, r)) in cases::DW_SHAPES.iter().enumerate() {
        let o = median(ours[i].clone());
        let name = format!("depthwise_fwd/1x{c}x{h}x{w}_d{r}");
        if nchw[i].is_empty() || nchw[i].len() != ours[i].len() {
            println!("| {name} | {o:.3} | - | - | - |");
        } else {
            let (a, b) = (median(nchw[i].clone()), median(cl[i].clone()));
            println!(
                "| {name} | {o:.3} | {a:.3} | {b:.3} | {:.2} |",
                o / a.min(b)
            );
        }
    }
    Ok(())
}

fn main() -> Result<()> {
    // SAFETY: sets one entry of mimalloc's global option table (index checked by
    // deeplab-cli's tests against the option's documented default).
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    let args: Vec<String> = std::env::args().collect();
    let value = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let runs = value("--runs").and_then(|v| v.parse().ok()).unwrap_or(5);
    let rounds = value("--rounds").and_then(|v| v.parse().ok()).unwrap_or(5);
    let filter = value("--filter").unwrap_or_default();
    let python = value("--peer");
    if python.is_some() {
        peer_table(python.as_deref(), runs, rounds)?;
        println!();
    }
    if args.iter().any(|a| a == "--no-candle") {
        return Ok(());
    }
    let slow_runs = 3.min(runs);
    let dev = Device::Cpu;
    println!("threads: {}", rayon::current_num_threads());
    println!("| op | ours (ms) | candle (ms) | speed-up |");
    println!("|---|---:|---:|---:|");
    for case in cases::cases(&dev, true)? {
        if !case.name.contains(&filter) {
            continue;
        }
        let ours = median_ms(&case.ours, runs)?;
        if args.iter().any(|a| a == "--ours-only") {
            println!("| {} | {ours:.2} | - | - |", case.name);
            continue;
        }
        // candle's depthwise backward takes seconds: fewer repetitions.
        let theirs = median_ms(
            &case.candle,
            if case.name.contains("bwd") {
                slow_runs
            } else {
                runs
            },
        )?;
        println!(
            "| {} | {ours:.2} | {theirs:.2} | {:.1}x |",
            case.name,
            theirs / ours
        );
    }
    Ok(())
}
