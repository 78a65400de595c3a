//! The agent's RBD store without the NBD server: `--io-threads` requests in
//! flight on the store's asynchronous data path (`BlockStore::async_io`,
//! librbd aio completions), issued from one thread by as many tasks of a
//! single-threaded tokio runtime, the way the NBD server issues reads and
//! plain writes. Mirrors `rbd bench`'s options (which also issues aio from one
//! thread) so the two can be compared in one run (tests/bench/rbd-store.sh does).
//!
//! ```sh
//! cargo build --release -p agent --example rbd_bench
//! target/release/examples/rbd_bench --conf DIR/ceph.conf --image rbd/IMG \
//!     --io-type write --io-size 4M --io-threads 16 --io-total 1G --io-pattern seq
//! ```
//!
//! Sequential: the next offset comes from a shared counter (wrapping at the
//! image size), so requests are issued in order across threads, like `rbd bench`.
//! Random: offsets aligned to the IO size, uniformly over the image, per-thread
//! seeded generator. The image must exist. Prints one line:
//! `ops N elapsed_s S ops_per_s X bytes_per_s Y cpu_user_s U cpu_sys_s V`
//! (CPU of the whole process, librados/librbd threads included, from getrusage).

use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use agent::config::{parse_size, CephConfig, ImageUri};
use agent::store::{OpenOptions, Stores};

struct Args {
    conf: String,
    client: String,
    image: String,
    write: bool,
    io_size: u64,
    threads: u64,
    total: u64,
    sequential: bool,
    seed: u64,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        conf: "/etc/ceph/ceph.conf".into(),
        client: "admin".into(),
        image: String::new(),
        write: true,
        io_size: 4 << 20,
        threads: 16,
        total: 1 << 30,
        sequential: true,
        seed: 1,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let bad = |what: &str| format!("{flag}: bad {what} {value:?}");
        match flag.as_str() {
            "--conf" => a.conf = value,
            "--client" => a.client = value,
            "--image" => a.image = value,
            "--io-type" => {
                a.write = match value.as_str() {
                    "write" => true,
                    "read" => false,
                    _ => return Err(bad("io type (write or read)")),
                }
            }
            "--io-size" => a.io_size = parse_size(&value)?,
            "--io-threads" => a.threads = value.parse().map_err(|_| bad("count"))?,
            "--io-total" => a.total = parse_size(&value)?,
            "--io-pattern" => {
                a.sequential = match value.as_str() {
                    "seq" => true,
                    "rand" => false,
                    _ => return Err(bad("pattern (seq or rand)")),
                }
            }
            "--seed" => a.seed = value.parse().map_err(|_| bad("seed"))?,
            _ => return Err(format!("unknown option {flag}")),
        }
    }
    if a.image.is_empty() {
        return Err("--image POOL/IMAGE is required".into());
    }
    if a.io_size == 0 || a.threads == 0 || a.total < a.io_size {
        return Err("--io-size, --io-threads must be positive and --io-total at least one IO".into());
    }
    Ok(a)
}

/// SplitMix64: seeded, dependency-free.
fn next_random(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// User and system CPU seconds of this process so far.
fn cpu_seconds() -> (f64, f64) {
    // SAFETY: all-zero is a valid `rusage` (plain integers).
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid out-pointer for the duration of the call.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return (0.0, 0.0);
    }
    #[allow(clippy::cast_precision_loss)] // seconds of CPU time
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    (secs(usage.ru_utime), secs(usage.ru_stime))
}

fn run(a: &Args) -> Result<(), String> {
    let uri: ImageUri = format!("rbd:{}", a.image).parse().map_err(|e| format!("--image: {e}"))?;
    let ceph = CephConfig { conf: a.conf.clone().into(), client: a.client.clone(), keyring: None };
    let stores = Stores::new(Some(ceph));
    let store = stores.open(&uri, &OpenOptions::default()).map_err(|e| format!("opening {uri}: {e}"))?;
    let size = store.size();
    let slots = size / a.io_size;
    if slots == 0 {
        return Err(format!("image {uri} ({size} bytes) is smaller than one IO"));
    }
    let io_len = usize::try_from(a.io_size).map_err(|_| "--io-size too large".to_owned())?;
    let ops = a.total / a.io_size;
    let issued = Arc::new(AtomicU64::new(0));
    let cpu0 = cpu_seconds();
    let start = Instant::now();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
    let result: Result<(), String> = runtime.block_on(async {
        let mut tasks = tokio::task::JoinSet::new();
        for t in 0..a.threads {
            let (store, issued) = (store.clone(), issued.clone());
            let (write, sequential, io_size) = (a.write, a.sequential, a.io_size);
            let mut rng = a.seed ^ (t + 1).wrapping_mul(0xD1B5_4A32_D192_ED03);
            let data: bytes::Bytes = (0..io_len).map(|i| (i % 251).to_le_bytes()[0] ^ t.to_le_bytes()[0]).collect();
            tasks.spawn(async move {
                let aio = store.async_io().ok_or("this store has no asynchronous data path")?;
                let mut buf = Vec::with_capacity(io_len);
                loop {
                    let n = issued.fetch_add(1, Ordering::Relaxed);
                    if n >= ops {
                        return Ok::<(), String>(());
                    }
                    let slot = if sequential { n % slots } else { next_random(&mut rng) % slots };
                    let offset = slot * io_size;
                    let what = if write { "write" } else { "read" };
                    let failed = |e| format!("{what} at {offset}: {e}");
                    if write {
                        aio.write(data.clone(), offset).await.map_err(failed)?;
                    } else {
                        buf.clear();
                        buf = aio.read(buf, io_len, offset).await.map_err(failed)?;
                    }
                }
            });
        }
        while let Some(done) = tasks.join_next().await {
            done.map_err(|_| "worker panicked".to_owned())??;
        }
        Ok(())
    });
    result?;
    if a.write {
        store.flush().map_err(|e| format!("flush: {e}"))?;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let cpu1 = cpu_seconds();
    #[allow(clippy::cast_precision_loss)] // op and byte counts well below 2^52
    let (ops_f, bytes_f) = (ops as f64, (ops * a.io_size) as f64);
    println!(
        "ops {ops} elapsed_s {elapsed:.3} ops_per_s {:.1} bytes_per_s {:.0} cpu_user_s {:.3} cpu_sys_s {:.3}",
        ops_f / elapsed,
        bytes_f / elapsed,
        cpu1.0 - cpu0.0,
        cpu1.1 - cpu0.1
    );
    Ok(())
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("rbd_bench: {e}");
            eprintln!(
                "usage: rbd_bench --image POOL/IMAGE [--conf /etc/ceph/ceph.conf] [--client admin] \
                 [--io-type write|read] [--io-size 4M] [--io-threads 16] [--io-total 1G] [--io-pattern seq|rand] \
                 [--seed 1]"
            );
            return ExitCode::from(2);
        }
    };
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rbd_bench: {e}");
            ExitCode::FAILURE
        }
    }
}
