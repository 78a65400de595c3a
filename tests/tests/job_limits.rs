//! Host-wide job limits (`jobs:` in `agent.yaml`): jobs past `max_running`
//! wait as `queued` and start in order; `max_rate` bounds what all jobs
//! together copy; SIGHUP applies a changed section. Real agent, real
//! backups to `file:` targets, content written with qemu-img.

use std::time::{Duration, Instant};

use serde_json::Value;
use tests::{run, Agent, AgentBuilder, Rng};

const MIB: u64 = 1 << 20;
const DISK: u64 = 24 * MIB;

fn jobs(agent: &Agent) -> Vec<Value> {
    agent.cli_json(&["jobs"]).unwrap().as_array().cloned().unwrap_or_default()
}

fn states(agent: &Agent, ids: &[String]) -> Vec<String> {
    ids.iter()
        .map(|id| agent.cli_json(&["job", "show", id]).unwrap()["state"].as_str().unwrap_or_default().to_owned())
        .collect()
}

fn bytes_done(agent: &Agent, ids: &[String]) -> u64 {
    ids.iter().map(|id| agent.cli_json(&["job", "show", id]).unwrap()["bytes_done"].as_u64().unwrap_or(0)).sum()
}

#[test]
fn jobs_past_max_running_queue_and_all_jobs_share_max_rate_changed_on_reload() {
    let disks: String = (0..3)
        .map(|i| {
            format!(
                "  - name: disk{i}\n    image: file:../images/vm1-disk{i}.raw\n    size: 24MiB\n    \
                 backup: {{target: \"file:../backups/vm1-disk{i}.raw\"}}\n"
            )
        })
        .collect();
    let agent = AgentBuilder::new()
        .extra("jobs: {max_running: 1}\n")
        .vm("vm1", &format!("name: vm1\ndisks:\n{disks}"))
        .start()
        .unwrap();
    let mut rng = Rng::from_env(0x7e57_0002);
    let data = agent.dir().join("data.raw");
    let mut content = vec![0u8; DISK as usize];
    rng.fill(&mut content);
    std::fs::write(&data, &content).unwrap();
    for i in 0..3 {
        let uri = agent.unix_uri(&format!("vm1/disk{i}"));
        run("qemu-img", &["convert", "-n", "-f", "raw", "-O", "raw", &data.to_string_lossy(), &uri]).unwrap();
    }

    // One slot: the first runs (slowly), the others wait in order.
    let first = agent.cli_json(&["backup", "vm1/disk0", "--sync", "full", "--speed", "2MiB"]).unwrap();
    let second = agent.cli_json(&["backup", "vm1/disk1", "--sync", "full"]).unwrap();
    let third = agent.cli_json(&["backup", "vm1/disk2", "--sync", "full"]).unwrap();
    assert_eq!(
        (&second["state"], &third["state"]),
        (&Value::from("queued"), &Value::from("queued")),
        "{second}\n{third}"
    );
    let ids: Vec<String> = [&first, &second, &third].iter().map(|j| j["id"].as_str().unwrap().to_owned()).collect();
    let until = Instant::now() + Duration::from_secs(1);
    while Instant::now() < until {
        let active: Vec<Value> = jobs(&agent).into_iter().filter(|j| j["state"] != "queued").collect();
        assert!(active.len() <= 1, "more than max_running jobs run: {active:#?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(states(&agent, &ids), ["running", "queued", "queued"]);

    // Reload with three slots and a shared rate: the queued ones start; together they copy at
    // most max_rate (the first one's own limit lifted).
    let config = agent.dir().join("agent.yaml");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, text.replace("jobs: {max_running: 1}", "jobs: {max_running: 3, max_rate: 8MiB}")).unwrap();
    agent.signal(libc::SIGHUP);
    agent.cli_json(&["job", "set-speed", &ids[0], "0"]).unwrap();
    let until = Instant::now() + Duration::from_secs(10);
    while states(&agent, &ids) != ["running", "running", "running"] {
        assert!(Instant::now() < until, "the queued jobs did not start on reload: {:?}", states(&agent, &ids));
        std::thread::sleep(Duration::from_millis(20));
    }
    let (t0, done0) = (Instant::now(), bytes_done(&agent, &ids));
    for id in &ids {
        let j = agent.wait_job(id, Duration::from_secs(60)).unwrap();
        assert_eq!(j["result"], "success", "{j:#}");
    }
    let elapsed = t0.elapsed().as_secs_f64();
    let moved = (3 * DISK - done0) as f64;
    let rate = moved / elapsed / MIB as f64;
    eprintln!("3 jobs moved {:.1} MiB in {elapsed:.2} s: {rate:.2} MiB/s (max_rate 8 MiB/s)", moved / MIB as f64);
    // One 4 MiB chunk per job may have passed the bucket before t0.
    let allowed = 8.0 * MIB as f64 * elapsed + 3.0 * 4.0 * MIB as f64;
    assert!(moved <= allowed, "the jobs copied {moved} bytes in {elapsed:.2} s, over max_rate (allowed {allowed})");
}
