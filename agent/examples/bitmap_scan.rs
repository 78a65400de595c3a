//! Micro-benchmark: memory and full-scan cost of one dirty bitmap of a large disk.
//!
//! For each granularity (default 64 KiB and 4 KiB) and dirty pattern, builds an
//! [`AtomicBits`] covering `--disk` bytes (default 1 TiB), marks `--dirty` percent of
//! its granules (seeded random runs, or scattered single granules), then times finding
//! every dirty extent: iterating `runs_from(0)` over the whole set, and
//! `Bitmap::dirty_ranges` (the same plus the conversion to byte ranges in a `Vec`, what
//! a backup job does). Each time is the median of `--iters` passes (after one warm-up).
//!
//! Memory: the computed size of one `AtomicBits` (words + summary level) and the
//! measured growth of this process's VmRSS right after it was allocated and after its
//! granules were marked. Every set is allocated as a fresh mapping (glibc's mmap threshold
//! is pinned to 128 KiB), so zeroed pages stay unresident until a bit in them is set. A
//! bitmap in the agent holds two sets (the bits and the persisted copy).
//!
//! ```sh
//! cargo build --release -p agent --example bitmap_scan
//! target/release/examples/bitmap_scan [--disk 1TiB] [--dirty 1.0] [--run 16] [--iters 15] [--seed 1]
//!                                     [--granularity 64KiB,4KiB]
//! ```
//!
//! Output: a Markdown table on stdout. No criterion, no dependencies beyond the agent.

use std::hint::black_box;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use agent::bitmap::Bitmap;
use agent::bits::AtomicBits;

/// Seeded, dependency-free PRNG (SplitMix64).
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0); the modulo bias is irrelevant here.
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

struct Args {
    disk: u64,
    dirty_percent: f64,
    mean_run: u64,
    iters: usize,
    seed: u64,
    granularities: Vec<u64>,
}

fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("bad size {s:?}"))?;
    let mult: u64 = match unit {
        "" | "B" => 1,
        "K" | "KiB" => 1 << 10,
        "M" | "MiB" => 1 << 20,
        "G" | "GiB" => 1 << 30,
        "T" | "TiB" => 1 << 40,
        _ => return Err(format!("bad size unit in {s:?} (use KiB, MiB, GiB, TiB)")),
    };
    n.checked_mul(mult).ok_or_else(|| format!("size {s:?} too large"))
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        disk: 1 << 40,
        dirty_percent: 1.0,
        mean_run: 16,
        iters: 15,
        seed: 1,
        granularities: vec![64 << 10, 4 << 10],
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "-h" || flag == "--help" {
            return Err(String::new());
        }
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let bad = |what: &str| format!("{flag}: bad {what} {value:?}");
        match flag.as_str() {
            "--disk" => args.disk = parse_size(&value)?,
            "--dirty" => args.dirty_percent = value.parse().map_err(|_| bad("percentage"))?,
            "--run" => args.mean_run = value.parse().map_err(|_| bad("run length"))?,
            "--iters" => args.iters = value.parse().map_err(|_| bad("count"))?,
            "--seed" => args.seed = value.parse().map_err(|_| bad("seed"))?,
            "--granularity" => {
                args.granularities = value.split(',').map(parse_size).collect::<Result<_, _>>()?;
            }
            _ => return Err(format!("unknown option {flag}")),
        }
    }
    if !(0.0..=100.0).contains(&args.dirty_percent) {
        return Err("--dirty must be a percentage from 0 to 100".into());
    }
    if args.iters == 0 || args.mean_run == 0 || args.disk == 0 {
        return Err("--iters, --run and --disk must be positive".into());
    }
    if args.granularities.iter().any(|g| !g.is_power_of_two() || *g < 512) {
        return Err("--granularity: powers of two of at least 512 bytes".into());
    }
    Ok(args)
}

/// `fraction` of `n`, rounded down.
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // non-negative, at most n
fn share(n: u64, percent: f64) -> u64 {
    ((n as f64) * percent / 100.0) as u64
}

/// This process's resident set, in bytes (0 if /proc is unavailable).
fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// Marks about `target` granules dirty: runs of 1..=2*mean_run-1 granules (mean
/// `mean_run`) at uniformly random places; `mean_run == 1` gives scattered granules.
fn fill(bits: &AtomicBits, target: u64, mean_run: u64, rng: &mut SplitMix64) {
    let len = bits.len();
    let mut marked = 0;
    while marked < target {
        let run = if mean_run == 1 { 1 } else { 1 + rng.below(2 * mean_run - 1) };
        let first = rng.below(len);
        bits.set_range(first, first + run - 1);
        marked += run;
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// Runs `f` once to warm up, then `iters` times; returns (median, min).
fn time(iters: usize, mut f: impl FnMut() -> u64) -> (Duration, Duration) {
    black_box(f());
    let mut times = Vec::with_capacity(iters);
    for _ in 0..iters {
        let t = Instant::now();
        black_box(f());
        times.push(t.elapsed());
    }
    let min = times.iter().copied().min().unwrap_or_default();
    (median(times), min)
}

fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes;
    let mut u = 0;
    while v >= 1024 && v.is_multiple_of(1024) && u + 1 < UNITS.len() {
        v /= 1024;
        u += 1;
    }
    if v >= 10 * 1024 && u + 1 < UNITS.len() {
        // Not a round number: one decimal in the next unit.
        #[allow(clippy::cast_precision_loss)]
        return format!("{:.1} {}", bytes as f64 / (1u64 << (10 * (u + 1))) as f64, UNITS[u + 1]);
    }
    format!("{v} {}", UNITS[u])
}

fn ms(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64() * 1e3)
}

fn main() -> ExitCode {
    // A fixed threshold turns off glibc's dynamic one, which would otherwise serve a set
    // from heap memory a previous row freed (already resident): every row then starts
    // from a fresh, untouched mapping.
    // SAFETY: mallopt only adjusts allocator parameters; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 << 10);
    }
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("bitmap_scan: {e}");
            }
            eprintln!(
                "usage: bitmap_scan [--disk 1TiB] [--dirty 1.0] [--run 16] [--iters 15] [--seed 1] \
                 [--granularity 64KiB,4KiB]"
            );
            return ExitCode::from(2);
        }
    };
    println!(
        "Bitmap scan: disk {}, {}% of granules dirty, seed {}, median of {} passes (after 1 warm-up)",
        human(args.disk),
        args.dirty_percent,
        args.seed,
        args.iters
    );
    println!();
    println!(
        "| granularity | bits | AtomicBits size | RSS after new / after marking | dirty pattern | dirty granules \
         | runs | runs_from(0) median ms | min ms | ns per run | dirty_ranges median ms | count() median ms |"
    );
    println!("|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|");
    let patterns: [(&str, u64, f64); 3] = [
        ("clean (0%)", 1, 0.0),
        ("random runs, mean length", args.mean_run, args.dirty_percent),
        ("scattered single granules", 1, args.dirty_percent),
    ];
    for &granularity in &args.granularities {
        let len = args.disk.div_ceil(granularity);
        let words = len.div_ceil(64);
        let computed = (words + words.div_ceil(64)) * 8;
        for (pi, &(name, mean_run, percent)) in patterns.iter().enumerate() {
            let mut rng = SplitMix64(args.seed ^ granularity.rotate_left(17) ^ (pi as u64));
            let before = rss_bytes();
            let bits = AtomicBits::new(len);
            let grown = rss_bytes().saturating_sub(before);
            fill(&bits, share(len, percent), mean_run, &mut rng);
            let marked = rss_bytes().saturating_sub(before);
            let dirty = bits.count();
            let runs = bits.runs_from(0).count() as u64;
            let (scan_med, scan_min) = time(args.iters, || bits.runs_from(0).map(|(f, n)| f ^ n).sum());
            let (ranges_med, _) = time(args.iters, || Bitmap::dirty_ranges(&bits, granularity, args.disk).len() as u64);
            let (count_med, _) = time(args.iters, || bits.count());
            let per_run = if runs == 0 {
                "-".to_owned()
            } else {
                #[allow(clippy::cast_precision_loss)]
                let ns = scan_med.as_secs_f64() * 1e9 / runs as f64;
                format!("{ns:.1}")
            };
            let pattern = if mean_run > 1 { format!("{name} {mean_run}") } else { name.to_owned() };
            println!(
                "| {} | {} | {} | {} / {} | {} | {} ({:.2}%) | {} | {} | {} | {} | {} | {} |",
                human(granularity),
                len,
                human(computed),
                human(grown),
                human(marked),
                pattern,
                dirty,
                {
                    #[allow(clippy::cast_precision_loss)]
                    let p = dirty as f64 * 100.0 / len as f64;
                    p
                },
                runs,
                ms(scan_med),
                ms(scan_min),
                per_run,
                ms(ranges_med),
                ms(count_med),
            );
            drop(bits);
        }
    }
    println!();
    println!(
        "- memory: one AtomicBits = 1 bit per granule + 1 summary bit per 64-bit word; a bitmap in the agent \
         keeps two (bits and persisted), so per bitmap x2. RSS: VmRSS growth over the row's allocation, right \
         after AtomicBits::new and after marking (zeroed pages become resident only when a bit in them is set)."
    );
    println!(
        "- runs_from(0): iterate every run of dirty granules over the whole bitmap (summary level skips 4096 clean \
         granules per word); dirty_ranges: the same, converted to byte ranges and collected in a Vec."
    );
    ExitCode::SUCCESS
}
