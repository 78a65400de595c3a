//! Operations: what a host's operator runs next to the agent, tested against
//! the real binary and the real tools.
//!
//! - `/metrics` passes `promtool check metrics` and counts what qemu-io did;
//! - a real Prometheus server scrapes the agent, loads deploy/prometheus/alerts.yml
//!   and can evaluate every query of the Grafana dashboard;
//! - deploy/prometheus/*.yml pass `promtool check config|rules` and the rule unit tests,
//!   which cover every alert both firing and silent;
//! - the dashboard only uses metric names the agent exports;
//! - the control API answers each error class with its status and JSON body, and the
//!   OpenAPI document matches what the agent serves;
//! - deploy/rbdsync.service passes `systemd-analyze verify`.
//!
//! Needs (tests/run.sh installs them): promtool and prometheus (Debian package
//! `prometheus`), qemu-io, curl, systemd-analyze. A missing tool fails the test.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;
use tests::{agent_bin, run, show, Agent, AgentBuilder};

const KIB: u64 = 1024;

// ------------------------------------------------------------------ helpers

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn read_repo_file(rel: &str) -> String {
    let p = repo().join(rel);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("cannot read {}: {e}", p.display()))
}

/// Fails with a clear message when an external tool is not installed.
fn require_tool(tool: &str, package: &str) {
    let found = Command::new(tool).arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok();
    assert!(found, "`{tool}` is not installed: install the Debian package `{package}` (tests/run.sh does)");
}

/// A TCP port that was free a moment ago.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("bind 127.0.0.1:0").port()
}

fn control(agent: &Agent) -> PathBuf {
    agent.dir().join("control.sock")
}

fn job_id(record: &Value) -> String {
    record["id"].as_str().unwrap_or_else(|| panic!("no job id in {record}")).to_owned()
}

/// Polls a job until it concludes.
fn wait_concluded(agent: &Agent, id: &str, limit: Duration) -> Value {
    let deadline = Instant::now() + limit;
    loop {
        let j = agent.json(&["job", "show", id]);
        if j["state"] == "concluded" {
            return j;
        }
        assert!(Instant::now() < deadline, "job {id} not concluded after {limit:?}: {j}\n{}", agent.log_tail());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// An HTTP answer.
#[derive(Debug)]
struct Http {
    status: u16,
    content_type: String,
    body: String,
}

impl Http {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("body is not JSON ({e}): {self:?}"))
    }
}

/// Runs curl with `args`; returns status, content type and body.
fn curl(args: &[&str]) -> Http {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "20", "-o", "-", "-w", "\n%{http_code} %{content_type}"])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("spawn curl: {e} (install the Debian package curl)"));
    assert!(out.status.success(), "curl {args:?}: {}", show(&out));
    let text = String::from_utf8(out.stdout).expect("curl output is UTF-8");
    let (body, tail) = text.rsplit_once('\n').expect("curl write-out");
    let (status, content_type) = tail.split_once(' ').unwrap_or((tail, ""));
    Http { status: status.parse().expect("HTTP status"), content_type: content_type.to_owned(), body: body.to_owned() }
}

/// A request to the control API on the agent's Unix socket.
fn api(agent: &Agent, method: &str, path: &str, body: Option<&str>) -> Http {
    let sock = control(agent);
    let url = format!("http://localhost{path}");
    let mut args = vec!["--unix-socket", sock.to_str().expect("utf-8 path"), "-X", method, &url];
    if let Some(b) = body {
        args.extend(["-H", "Content-Type: application/json", "--data-binary", b]);
    }
    curl(&args)
}

/// `GET http://addr/metrics` (Prometheus text, or OpenMetrics with `openmetrics`).
fn scrape(addr: SocketAddr, openmetrics: bool) -> Http {
    let url = format!("http://{addr}/metrics");
    let accept = if openmetrics { "Accept: application/openmetrics-text; version=1.0.0" } else { "Accept: text/plain" };
    let r = curl(&["-H", accept, &url]);
    assert_eq!(r.status, 200, "GET /metrics: {r:?}");
    r
}

/// One sample of the text exposition format.
#[derive(Debug, Clone)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// Samples and `# TYPE` lines of a Prometheus text (or OpenMetrics) body.
fn parse_exposition(text: &str) -> (Vec<Sample>, BTreeMap<String, String>) {
    let mut samples = Vec::new();
    let mut types = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or_else(|| panic!("bad TYPE line {line:?}"));
            types.insert(name.to_owned(), kind.to_owned());
            continue;
        }
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("bad sample line {line:?}"));
        let (name, labels) = match series.split_once('{') {
            None => (series.to_owned(), BTreeMap::new()),
            Some((name, rest)) => {
                let body = rest.strip_suffix('}').unwrap_or_else(|| panic!("bad labels in {line:?}"));
                let mut labels = BTreeMap::new();
                // Label values here never contain `",` (disk names are restricted).
                for pair in body.split("\",").filter(|p| !p.is_empty()) {
                    let (k, v) = pair.split_once("=\"").unwrap_or_else(|| panic!("bad label {pair:?} in {line:?}"));
                    labels.insert(k.to_owned(), v.trim_end_matches('"').to_owned());
                }
                (name.to_owned(), labels)
            }
        };
        let value = value.parse().unwrap_or_else(|e| panic!("bad value in {line:?}: {e}"));
        samples.push(Sample { name, labels, value });
    }
    (samples, types)
}

/// The value of the one sample `name` whose labels include `labels`.
fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    let found: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.name == name && labels.iter().all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v)))
        .collect();
    assert_eq!(found.len(), 1, "expected one sample {name}{labels:?}, found {found:?}");
    found[0].value
}

/// `promtool check metrics` on a Prometheus text body (exit 0 = no lint problem).
fn promtool_check_metrics(body: &str) {
    require_tool("promtool", "prometheus");
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn promtool");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(body.as_bytes()).expect("write to promtool");
    }
    let out = child.wait_with_output().expect("promtool");
    assert!(out.status.success(), "promtool check metrics found problems: {}\n--- metrics:\n{body}", show(&out));
}

/// A VM file with one 16 MiB disk `disk0` carrying bitmap `backup`.
fn vm_with_bitmap(vm: &str) -> String {
    format!(
        "name: {vm}\ndisks:\n  - name: disk0\n    image: file:../images/{vm}-disk0.raw\n    size: 16MiB\n    bitmaps: [{{name: backup, granularity: 64KiB}}]\n"
    )
}

/// An agent serving `vms` (each with a bitmap) with metrics on a free port.
fn metrics_agent(vms: &[&str]) -> (Agent, SocketAddr) {
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let mut b = AgentBuilder::new().extra(&format!("metrics: {{listen: \"{addr}\"}}\n"));
    for vm in vms {
        b = b.vm(vm, &vm_with_bitmap(vm));
    }
    let agent = b.start().expect("start agent");
    // The metrics listener is bound before the agent reports ready, but give it a moment.
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "metrics endpoint {addr} never came up:\n{}", agent.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    (agent, addr)
}

/// Three writes (64 KiB + 64 KiB + 128 KiB, all in different granules) and one
/// 64 KiB read, each qemu-io run ending with one flush.
fn guest_io(agent: &Agent, export: &str) {
    let uri = agent.unix_uri(export);
    run(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0xab 0 64k", "-c", "write -P 0xcd 1M 64k", "-c", "write 4M 128k", &uri],
    )
    .expect("qemu-io writes");
    run("qemu-io", &["-f", "raw", "-c", "read -P 0xab 0 64k", &uri]).expect("qemu-io read");
}

const WRITTEN: u64 = 256 * KIB;

fn now_secs() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").as_secs_f64()
}

// --------------------------------------------------------- (a) /metrics

#[test]
fn metrics_pass_promtool_and_count_the_io_and_the_backup() {
    require_tool("qemu-io", "qemu-utils");
    let (agent, addr) = metrics_agent(&["vm1"]);
    guest_io(&agent, "vm1/disk0");

    let before = scrape(addr, false);
    assert!(
        before.content_type.starts_with("text/plain") && before.content_type.contains("version=0.0.4"),
        "plain scrape content type: {:?}",
        before.content_type
    );
    promtool_check_metrics(&before.body);
    let (s, types) = parse_exposition(&before.body);
    let disk = ("disk", "vm1/disk0");
    assert_eq!(value(&s, "rbdsync_nbd_requests_total", &[disk, ("op", "write")]), 3.0, "three qemu-io writes");
    assert_eq!(value(&s, "rbdsync_nbd_requests_total", &[disk, ("op", "read")]), 1.0, "one qemu-io read");
    assert_eq!(value(&s, "rbdsync_nbd_requests_total", &[disk, ("op", "flush")]), 2.0, "one flush per qemu-io run");
    assert_eq!(value(&s, "rbdsync_nbd_bytes_total", &[disk, ("op", "write")]), WRITTEN as f64);
    assert_eq!(value(&s, "rbdsync_nbd_bytes_total", &[disk, ("op", "read")]), 65536.0);
    assert_eq!(value(&s, "rbdsync_nbd_errors_total", &[disk, ("op", "write")]), 0.0);
    assert_eq!(value(&s, "rbdsync_nbd_request_duration_seconds_count", &[disk, ("op", "write")]), 3.0);
    assert_eq!(value(&s, "rbdsync_nbd_request_duration_seconds_bucket", &[disk, ("op", "write"), ("le", "+Inf")]), 3.0);
    assert_eq!(types.get("rbdsync_nbd_request_duration_seconds").map(String::as_str), Some("histogram"));
    assert_eq!(value(&s, "rbdsync_nbd_connections", &[disk]), 0.0, "qemu-io disconnected");
    assert_eq!(value(&s, "rbdsync_nbd_inflight_requests", &[disk]), 0.0);
    assert_eq!(value(&s, "rbdsync_disk_size_bytes", &[disk]), (16 << 20) as f64);
    let bm = [disk, ("bitmap", "backup")];
    assert_eq!(value(&s, "rbdsync_bitmap_dirty_bytes", &bm), WRITTEN as f64, "four dirty 64 KiB granules");
    assert_eq!(value(&s, "rbdsync_bitmap_granularity_bytes", &bm), 65536.0);
    assert_eq!(value(&s, "rbdsync_bitmap_consistent", &bm), 1.0);
    let status = api(&agent, "GET", "/v1/status", None).json();
    let version = status["version"].as_str().expect("version").to_owned();
    assert_eq!(value(&s, "rbdsync_build_info", &[("version", &version)]), 1.0);
    assert!(
        !s.iter().any(|x| x.name.starts_with("rbdsync_backup_")),
        "backup series before any backup: {}",
        before.body
    );

    // A full backup that takes the bitmap along: afterwards the bitmap is clean.
    let started = now_secs().floor();
    let target = format!("file:{}", agent.dir().join("bk").display());
    let done =
        agent.json(&["backup", "vm1/disk0", "--target", &target, "--bitmap", "backup", "--sync", "full", "--wait"]);
    let done = if done.is_array() { done[0].clone() } else { done };
    assert_eq!(done["result"], "success", "backup: {done:#}\n{}", agent.log_tail());

    let after = scrape(addr, false);
    promtool_check_metrics(&after.body);
    let (s, _) = parse_exposition(&after.body);
    let last = value(&s, "rbdsync_backup_last_success_timestamp_seconds", &[disk]);
    assert!(last >= started && last <= now_secs() + 1.0, "backup timestamp {last} outside [{started}, now]");
    assert_eq!(Some(last as u64), done["finished_at"].as_u64(), "metric = the job's finished_at");
    let bytes = value(&s, "rbdsync_backup_last_written_bytes", &[disk]);
    assert_eq!(Some(bytes as u64), done["summary"]["bytes_written"].as_u64(), "metric = the job summary");
    assert!(bytes >= WRITTEN as f64, "a backup of {WRITTEN} written bytes wrote {bytes}");
    assert_eq!(value(&s, "rbdsync_backup_chain_length", &[disk]), 1.0);
    assert_eq!(value(&s, "rbdsync_jobs_concluded_total", &[("kind", "backup"), ("result", "success")]), 1.0);
    // Every kind's counters exist from the start (the first failure of a kind is an increase).
    assert_eq!(value(&s, "rbdsync_jobs_concluded_total", &[("kind", "verify"), ("result", "failed")]), 0.0);
    assert_eq!(value(&s, "rbdsync_bitmap_dirty_bytes", &bm), 0.0, "the backup committed the bitmap");
    assert_eq!(value(&s, "rbdsync_nbd_requests_total", &[disk, ("op", "write")]), 3.0, "a backup is no NBD write");

    // The OpenMetrics rendering of the same state.
    let om = scrape(addr, true);
    assert!(om.content_type.starts_with("application/openmetrics-text"), "content type {:?}", om.content_type);
    assert!(om.body.trim_end().ends_with("# EOF"), "OpenMetrics body must end with # EOF:\n{}", om.body);
    let (s, types) = parse_exposition(&om.body);
    assert_eq!(types.get("rbdsync_nbd_requests").map(String::as_str), Some("counter"), "OpenMetrics family name");
    assert_eq!(value(&s, "rbdsync_nbd_requests_total", &[disk, ("op", "write")]), 3.0);
}

/// The exposition must stay lint-clean while a job runs (its job_* series
/// exist only then).
#[test]
fn metrics_pass_promtool_while_a_job_runs() {
    let (agent, addr) = metrics_agent(&["vm1"]);
    let target = format!("file:{}", agent.dir().join("bk").display());
    let job = agent.json(&["backup", "vm1/disk0", "--target", &target, "--sync", "full", "--speed", "1MiB"]);
    let id = job_id(&job);
    let body = scrape(addr, false).body;
    let (s, _) = parse_exposition(&body);
    let running = s.iter().any(|x| {
        x.name == "rbdsync_job_state"
            && x.labels.get("job_id") == Some(&id)
            && !x.labels.contains_key("job")
            && x.labels.get("state").map(String::as_str) == Some("running")
    });
    assert!(running, "no rbdsync_job_state{{job_id={id:?},state=\"running\"}} while the job runs:\n{body}");
    let cancelled = api(&agent, "POST", &format!("/v1/jobs/{id}/cancel"), None);
    assert_eq!(cancelled.status, 200, "cancel: {cancelled:?}");
    promtool_check_metrics(&body);
}

// --------------------------------------------------- (b) a real Prometheus

/// A Prometheus server on a free port, killed on drop.
struct Prometheus {
    child: Option<Child>,
    dir: tempfile::TempDir,
    port: u16,
}

impl Prometheus {
    fn start(config: &str) -> Prometheus {
        require_tool("prometheus", "prometheus");
        let dir = tempfile::tempdir().expect("tempdir");
        let conf = dir.path().join("prometheus.yml");
        std::fs::write(&conf, config).expect("write prometheus.yml");
        let port = free_port();
        let log = std::fs::File::create(dir.path().join("prometheus.log")).expect("log");
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", conf.display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--log.level=warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn prometheus");
        Prometheus { child: Some(child), dir, port }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// `GET /api/v1/PATH` with URL-encoded `params`; the `data` of a successful answer, or the error.
    fn api(&self, path: &str, params: &[(&str, &str)]) -> Result<Value, String> {
        let url = format!("http://127.0.0.1:{}/api/v1/{path}", self.port);
        let encoded: Vec<String> = params.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let mut args = vec!["-G", url.as_str()];
        for p in &encoded {
            args.extend(["--data-urlencode", p.as_str()]);
        }
        let out = Command::new("curl")
            .args(["-sS", "--max-time", "10"])
            .args(&args)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("spawn curl: {e}"))?;
        if !out.status.success() {
            return Err(format!("curl: {}", show(&out)));
        }
        let v: Value = serde_json::from_slice(&out.stdout).map_err(|e| format!("bad JSON {e}: {}", show(&out)))?;
        if v["status"] != "success" {
            return Err(format!("{v}"));
        }
        Ok(v["data"].clone())
    }

    /// Waits until `query` returns a result that `accept` likes.
    fn wait_for(&mut self, query: &str, limit: Duration, accept: impl Fn(&[Value]) -> bool) -> Vec<Value> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!("prometheus exited ({status}):\n{}", self.log());
            }
            let last = match self.api("query", &[("query", query)]) {
                Ok(data) => {
                    let result = data["result"].as_array().cloned().unwrap_or_default();
                    if accept(&result) {
                        return result;
                    }
                    format!("{result:?}")
                }
                Err(e) => e,
            };
            assert!(
                Instant::now() < deadline,
                "prometheus: {query} not as expected after {limit:?}; last answer: {last}\nprometheus log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Every PromQL expression of the dashboard (panel targets and variable queries).
fn dashboard_exprs(dashboard: &Value) -> Vec<String> {
    fn walk(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(o) => {
                for (k, v) in o {
                    match (k.as_str(), v) {
                        ("expr" | "definition", Value::String(s)) => out.push(s.clone()),
                        _ => walk(v, out),
                    }
                }
            }
            Value::Array(a) => a.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(dashboard, &mut out);
    out
}

/// A dashboard expression with Grafana's variables replaced, for Prometheus.
fn grafana_to_promql(expr: &str) -> String {
    let expr = expr
        .replace("$__rate_interval", "1m")
        .replace("$__range", "1h")
        .replace("$instance", ".*")
        .replace("$disk", ".*");
    // label_values(SELECTOR, LABEL) is Grafana's; Prometheus evaluates the selector.
    match expr.strip_prefix("label_values(") {
        Some(rest) => rest.rsplit_once(',').map(|(sel, _)| sel.to_owned()).unwrap_or(expr.clone()),
        None => expr,
    }
}

#[test]
fn a_prometheus_server_scrapes_the_agent_and_runs_the_rules_and_dashboard_queries() {
    require_tool("qemu-io", "qemu-utils");
    let (agent, addr) = metrics_agent(&["vm1"]);
    guest_io(&agent, "vm1/disk0");
    // A job that runs while Prometheus scrapes (its `job_id` label beside Prometheus' `job`).
    let target = format!("file:{}", agent.dir().join("bk").display());
    let job = agent.json(&["backup", "vm1/disk0", "--target", &target, "--sync", "full", "--speed", "1MiB"]);
    let id = job_id(&job);
    let version = api(&agent, "GET", "/v1/status", None).json()["version"].as_str().expect("version").to_owned();

    let alerts = repo().join("deploy/prometheus/alerts.yml");
    let config = format!(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files: [\"{}\"]\nscrape_configs:\n  - job_name: rbdsync\n    static_configs:\n      - targets: [\"{addr}\"]\n",
        alerts.display()
    );
    let mut prom = Prometheus::start(&config);
    let limit = Duration::from_secs(20);
    let instance = addr.to_string();

    let up = prom.wait_for("up{job=\"rbdsync\"}", limit, |r| r.len() == 1 && r[0]["value"][1] == "1");
    assert_eq!(up[0]["metric"]["instance"], instance.as_str());
    let build = prom.wait_for("rbdsync_build_info", limit, |r| !r.is_empty());
    assert_eq!(build.len(), 1, "{build:?}");
    let labels = &build[0]["metric"];
    assert_eq!(labels["job"], "rbdsync", "{labels}");
    assert_eq!(labels["instance"], instance.as_str(), "{labels}");
    assert_eq!(labels["version"], version.as_str(), "{labels}");
    assert_eq!(build[0]["value"][1], "1");
    let writes = prom.wait_for("rbdsync_nbd_requests_total{op=\"write\"}", limit, |r| !r.is_empty());
    assert_eq!(writes.len(), 1, "{writes:?}");
    assert_eq!(writes[0]["metric"]["disk"], "vm1/disk0");
    assert_eq!(writes[0]["metric"]["job"], "rbdsync");
    assert_eq!(writes[0]["value"][1], "3", "three qemu-io writes");
    prom.wait_for("rbdsync_nbd_request_duration_seconds_bucket{op=\"write\",le=\"+Inf\"}", limit, |r| {
        r.len() == 1 && r[0]["value"][1] == "3"
    });
    prom.wait_for("rbdsync_bitmap_dirty_bytes{disk=\"vm1/disk0\",bitmap=\"backup\"}", limit, |r| {
        r.len() == 1 && r[0]["value"][1].as_str().and_then(|v| v.parse::<u64>().ok()) == Some(WRITTEN)
    });
    // The job id is `job_id`; `job` stays Prometheus' target label (what alerts.yml and the
    // dashboard select on), with no `exported_job` left behind.
    let state = prom.wait_for(&format!("rbdsync_job_state{{job_id=\"{id}\"}}"), limit, |r| !r.is_empty());
    assert_eq!(state[0]["metric"]["job"], "rbdsync", "{state:?}");
    assert!(state[0]["metric"].get("exported_job").is_none(), "{state:?}");
    assert_eq!(state[0]["metric"]["state"], "running", "{state:?}");
    assert_eq!(api(&agent, "POST", &format!("/v1/jobs/{id}/cancel"), None).status, 200);

    // alerts.yml loads and every rule evaluates.
    let deadline = Instant::now() + limit;
    loop {
        let data = prom.api("rules", &[]).unwrap_or_else(|e| panic!("GET /api/v1/rules: {e}"));
        let rules: Vec<Value> = data["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
            .collect();
        assert!(rules.len() >= 7, "alerts.yml: only {} rules loaded: {data}", rules.len());
        let bad: Vec<&Value> = rules.iter().filter(|r| r["health"] != "ok").collect();
        if bad.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "rules not healthy: {bad:?}");
        std::thread::sleep(Duration::from_millis(200));
    }

    // Every dashboard query is valid PromQL for this server, and the basic ones find the agent.
    let dashboard: Value =
        serde_json::from_str(&read_repo_file("deploy/grafana/rbdsync.json")).expect("dashboard JSON");
    for expr in dashboard_exprs(&dashboard) {
        let q = grafana_to_promql(&expr);
        if let Err(e) = prom.api("query", &[("query", &q)]) {
            panic!("dashboard query fails in Prometheus:\n  {expr}\n  as {q}\n  {e}");
        }
    }
    for must_find in [
        "count(rbdsync_disk_size_bytes{job=\"rbdsync\", instance=~\".*\", disk=~\".*\"})",
        "sum(up{job=\"rbdsync\", instance=~\".*\"})",
    ] {
        prom.wait_for(must_find, limit, |r| r.len() == 1 && r[0]["value"][1] == "1");
    }
    drop(prom);
}

// --------------------------------------------- (c) promtool on deploy files

#[test]
fn deploy_prometheus_files_pass_promtool_and_every_alert_is_unit_tested() {
    require_tool("promtool", "prometheus");
    let dir = repo().join("deploy/prometheus");
    for args in [
        vec!["check", "config", "scrape.yml"],
        vec!["check", "rules", "alerts.yml"],
        vec!["test", "rules", "alerts_test.yml"],
    ] {
        let out = Command::new("promtool").args(&args).current_dir(&dir).output().expect("spawn promtool");
        assert!(out.status.success(), "promtool {args:?}: {}", show(&out));
    }

    // Every alert appears in alerts_test.yml at least once firing and once silent.
    let rules = read_repo_file("deploy/prometheus/alerts.yml");
    let alerts: BTreeSet<String> =
        rules.lines().filter_map(|l| l.trim().strip_prefix("- alert:").map(|n| n.trim().to_owned())).collect();
    for expected in [
        "RbdsyncAgentDown",
        "RbdsyncBackupTooOld",
        "RbdsyncBackupNeverSucceeded",
        "RbdsyncBitmapInconsistent",
        "RbdsyncJobFailed",
        "RbdsyncMirrorNotConverging",
        "RbdsyncExportErrors",
    ] {
        assert!(alerts.contains(expected), "alerts.yml lacks {expected}: {alerts:?}");
    }
    let tests = read_repo_file("deploy/prometheus/alerts_test.yml");
    let lines: Vec<&str> = tests.lines().map(str::trim).collect();
    let (mut fires, mut silent) = (BTreeSet::new(), BTreeSet::new());
    for (i, line) in lines.iter().enumerate() {
        let Some(name) = line.strip_prefix("alertname:") else { continue };
        let name = name.trim().to_owned();
        let next = lines.get(i + 1).copied().unwrap_or_default();
        if next.starts_with("exp_alerts: []") {
            silent.insert(name);
        } else if next == "exp_alerts:" && lines.get(i + 2).is_some_and(|l| l.starts_with("- exp_labels:")) {
            fires.insert(name);
        } else {
            panic!("alerts_test.yml: `alertname: {name}` not followed by exp_alerts: {next:?}");
        }
    }
    for a in &alerts {
        assert!(fires.contains(a), "alerts_test.yml never shows {a} firing");
        assert!(silent.contains(a), "alerts_test.yml never shows {a} silent");
    }
    let unknown: Vec<_> = fires.union(&silent).filter(|a| !alerts.contains(*a)).collect();
    assert!(unknown.is_empty(), "alerts_test.yml tests alerts that do not exist: {unknown:?}");
}

// ------------------------------------------------------- (d) the dashboard

/// Metric names a PromQL expression selects (functions, keywords, label
/// names in matchers and grouping clauses, strings and durations removed).
fn promql_metric_names(expr: &str) -> BTreeSet<String> {
    const KEYWORDS: [&str; 22] = [
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "stddev",
        "stdvar",
        "count",
        "count_values",
        "bottomk",
        "topk",
        "quantile",
        "and",
        "or",
        "unless",
        "bool",
        "offset",
        "by",
        "without",
        "on",
        "ignoring",
        "atan2",
    ];
    const GROUPING: [&str; 6] = ["by", "without", "on", "ignoring", "group_left", "group_right"];
    let c: Vec<char> = expr.chars().collect();
    let mut names = BTreeSet::new();
    let mut i = 0;
    let skip_to = |from: usize, open: char, close: char| -> usize {
        let mut depth = 0;
        for (j, &ch) in c.iter().enumerate().skip(from) {
            if ch == open {
                depth += 1;
            } else if ch == close {
                depth -= 1;
                if depth == 0 {
                    return j + 1;
                }
            }
        }
        panic!("unbalanced {open}{close} in {expr}");
    };
    while i < c.len() {
        let ch = c[i];
        if ch == '"' || ch == '\'' || ch == '`' {
            i += 1;
            while i < c.len() && c[i] != ch {
                i += if c[i] == '\\' { 2 } else { 1 };
            }
            i += 1;
        } else if ch == '{' {
            // Label matchers (strings inside are skipped by the quote rule first).
            let mut j = i + 1;
            while j < c.len() && c[j] != '}' {
                if c[j] == '"' {
                    j += 1;
                    while j < c.len() && c[j] != '"' {
                        j += if c[j] == '\\' { 2 } else { 1 };
                    }
                }
                j += 1;
            }
            i = j + 1;
        } else if ch == '[' {
            i = skip_to(i, '[', ']');
        } else if ch == '$' {
            i += 1;
            while i < c.len() && (c[i].is_alphanumeric() || c[i] == '_') {
                i += 1;
            }
        } else if ch.is_ascii_digit() || (ch == '.' && c.get(i + 1).is_some_and(char::is_ascii_digit)) {
            // Numbers and durations (5m, 1e3, 0.95).
            while i < c.len() && (c[i].is_alphanumeric() || c[i] == '.') {
                i += 1;
            }
        } else if ch.is_ascii_alphabetic() || ch == '_' || ch == ':' {
            let start = i;
            while i < c.len() && (c[i].is_ascii_alphanumeric() || c[i] == '_' || c[i] == ':') {
                i += 1;
            }
            let word: String = c[start..i].iter().collect();
            let mut j = i;
            while j < c.len() && c[j].is_whitespace() {
                j += 1;
            }
            let called = c.get(j) == Some(&'(');
            if GROUPING.contains(&word.as_str()) {
                if called {
                    i = skip_to(j, '(', ')');
                }
            } else if called || KEYWORDS.contains(&word.to_ascii_lowercase().as_str()) {
                // A function or an operator keyword.
            } else if !["inf", "nan"].contains(&word.to_ascii_lowercase().as_str()) {
                names.insert(word);
            }
        } else {
            i += 1;
        }
    }
    names
}

#[test]
fn promql_metric_name_extraction() {
    let names = promql_metric_names(
        "histogram_quantile(0.95, sum by (le, op) (rate(rbdsync_a_bucket{x=~\"$disk\", y=\"b{c}\"}[$__rate_interval]))) / on (job, disk) group_left rbdsync_b offset 5m or vector(0) unless count(up == 1) > 2e3 and rbdsync_c - time()",
    );
    let want: BTreeSet<String> =
        ["rbdsync_a_bucket", "rbdsync_b", "up", "rbdsync_c"].iter().map(|s| s.to_string()).collect();
    assert_eq!(names, want);
}

#[test]
fn dashboard_and_alerts_use_only_metrics_the_agent_exports() {
    require_tool("qemu-io", "qemu-utils");
    let dashboard: Value = serde_json::from_str(&read_repo_file("deploy/grafana/rbdsync.json"))
        .unwrap_or_else(|e| panic!("deploy/grafana/rbdsync.json is not valid JSON: {e}"));

    // An agent that has done IO, a backup, a completed mirror, and has a job running:
    // every family it can export is present in one of the scrapes.
    let (agent, addr) = metrics_agent(&["vm1", "vm2"]);
    guest_io(&agent, "vm1/disk0");
    let bk1 = format!("file:{}", agent.dir().join("bk1").display());
    let b = agent.json(&["backup", "vm1/disk0", "--target", &bk1, "--bitmap", "backup", "--sync", "full", "--wait"]);
    let b = if b.is_array() { b[0].clone() } else { b };
    assert_eq!(b["result"], "success", "backup: {b:#}");
    let mirror_target = agent.unix_uri("vm2/disk0");
    let m = agent.json(&["mirror", "vm1/disk0", "--target", &mirror_target, "--sync", "full", "--wait"]);
    assert_eq!(m["state"], "ready", "mirror: {m:#}\n{}", agent.log_tail());
    let mid = job_id(&m);
    agent.json(&["job", "complete", &mid]);
    let m = wait_concluded(&agent, &mid, Duration::from_secs(20));
    assert_eq!(m["result"], "success", "mirror: {m:#}\n{}", agent.log_tail());
    let mut scrapes = vec![scrape(addr, false).body];
    let bk2 = format!("file:{}", agent.dir().join("bk2").display());
    let slow = agent.json(&["backup", "vm2/disk0", "--target", &bk2, "--sync", "full", "--speed", "1MiB"]);
    scrapes.push(scrape(addr, false).body);
    assert_eq!(api(&agent, "POST", &format!("/v1/jobs/{}/cancel", job_id(&slow)), None).status, 200);

    let mut exported = BTreeSet::new();
    for body in &scrapes {
        let (samples, types) = parse_exposition(body);
        exported.extend(samples.into_iter().map(|s| s.name));
        for (family, kind) in types {
            if kind == "histogram" {
                exported.extend(["_bucket", "_sum", "_count"].map(|sfx| format!("{family}{sfx}")));
            }
            exported.insert(family);
        }
    }
    for must in ["rbdsync_job_done_bytes", "rbdsync_mirror_last_sent_bytes", "rbdsync_backup_chain_length"] {
        assert!(exported.contains(must), "the scrapes miss {must}; the test setup is broken:\n{scrapes:?}");
    }
    // `up` is made by Prometheus for every target, not exported by the agent.
    let known = |n: &String| exported.contains(n) || n == "up";

    let exprs = dashboard_exprs(&dashboard);
    assert!(exprs.len() >= 20, "the dashboard has only {} queries", exprs.len());
    let mut used = BTreeSet::new();
    let mut unknown = BTreeMap::new();
    for expr in &exprs {
        for name in promql_metric_names(&grafana_to_promql(expr)) {
            if !known(&name) {
                unknown.entry(name.clone()).or_insert_with(Vec::new).push(expr.clone());
            }
            used.insert(name);
        }
    }
    assert!(
        unknown.is_empty(),
        "the dashboard uses metrics the agent does not export: {unknown:#?}\nexported: {exported:?}"
    );
    for needed in [
        "rbdsync_nbd_requests_total",
        "rbdsync_nbd_bytes_total",
        "rbdsync_nbd_request_duration_seconds_bucket",
        "rbdsync_nbd_connections",
        "rbdsync_nbd_inflight_requests",
        "rbdsync_bitmap_dirty_bytes",
        "rbdsync_bitmap_consistent",
        "rbdsync_job_done_bytes",
        "rbdsync_job_total_bytes",
        "rbdsync_job_rate_bytes_per_second",
        "rbdsync_backup_last_success_timestamp_seconds",
        "rbdsync_backup_last_written_bytes",
        "rbdsync_backup_chain_length",
        "rbdsync_mirror_last_sent_bytes",
        "rbdsync_migration_last_downtime_seconds",
    ] {
        assert!(used.contains(needed), "the dashboard has no panel for {needed}");
    }

    // Templating: a `disk` variable that the queries use.
    let vars: Vec<&str> = dashboard["templating"]["list"]
        .as_array()
        .expect("templating.list")
        .iter()
        .filter_map(|v| v["name"].as_str())
        .collect();
    assert!(vars.contains(&"disk"), "no `disk` variable: {vars:?}");
    let filtered = exprs.iter().filter(|e| e.contains("disk=~\"$disk\"")).count();
    assert!(filtered >= 15, "only {filtered} queries filter on $disk");
    let mut ids = BTreeSet::new();
    for p in dashboard["panels"].as_array().expect("panels") {
        let id = p["id"].as_u64().unwrap_or_else(|| panic!("panel without id: {p}"));
        assert!(ids.insert(id), "panel id {id} used twice");
        assert!(p["gridPos"]["w"].as_u64().is_some(), "panel {id} without gridPos");
    }

    // The alert rules only use exported metrics too.
    let rules = read_repo_file("deploy/prometheus/alerts.yml");
    let mut in_rules = BTreeSet::new();
    for word in rules.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
        if word.starts_with("rbdsync_") {
            in_rules.insert(word.to_owned());
        }
    }
    let bad: Vec<_> = in_rules.iter().filter(|n| !exported.contains(*n)).collect();
    assert!(bad.is_empty(), "alerts.yml uses metrics the agent does not export: {bad:?}");
}

// ---------------------------------------------------- (e) the control API

fn assert_error(r: &Http, status: u16, code: &str, what: &str) {
    assert_eq!(r.status, status, "{what}: {r:?}");
    assert!(r.content_type.starts_with("application/json"), "{what}: error content type {:?}", r.content_type);
    let v = r.json();
    let obj = v.as_object().unwrap_or_else(|| panic!("{what}: error body is not an object: {v}"));
    assert_eq!(obj.keys().collect::<Vec<_>>(), ["error"], "{what}: error body {v}");
    let e = v["error"].as_object().unwrap_or_else(|| panic!("{what}: `error` is not an object: {v}"));
    let keys: BTreeSet<&str> = e.keys().map(String::as_str).collect();
    assert_eq!(keys, BTreeSet::from(["code", "message"]), "{what}: error body {v}");
    assert_eq!(v["error"]["code"], code, "{what}: {v}");
    let message = v["error"]["message"].as_str().unwrap_or_default();
    assert!(!message.trim().is_empty(), "{what}: empty message: {v}");
}

#[test]
fn control_api_status_codes_and_error_bodies_per_error_class() {
    let agent = AgentBuilder::new().simple_vm("vm1", "16MiB").start().expect("start agent");
    let sock = control(&agent);
    let meta = std::fs::metadata(&sock).expect("control socket");
    assert!(meta.file_type().is_socket(), "{} is not a socket", sock.display());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600, "control socket mode");

    let bitmaps = "/v1/disks/vm1/disk0/bitmaps";
    let added = api(&agent, "POST", bitmaps, Some(r#"{"name": "backup", "granularity": "64KiB"}"#));
    assert_eq!(added.status, 201, "add bitmap: {added:?}");
    assert_eq!(added.json()["name"], "backup");

    // 400
    assert_error(&api(&agent, "POST", bitmaps, Some("{bad json")), 400, "bad_request", "malformed JSON");
    assert_error(
        &api(&agent, "POST", bitmaps, Some(r#"{"name": "b2", "granularity": "3KiB"}"#)),
        400,
        "invalid_argument",
        "granularity not a power of two",
    );
    assert_error(
        &api(&agent, "POST", bitmaps, Some(r#"{"name": "b2", "colour": "red"}"#)),
        400,
        "bad_request",
        "unknown field",
    );
    assert_error(
        &api(&agent, "POST", "/v1/jobs", Some(r#"{"kind": "backup", "disk": "vm1/disk0", "speed": "fast"}"#)),
        400,
        "bad_request",
        "bad speed",
    );
    // 404
    assert_error(&api(&agent, "GET", "/v1/disks/vm9/disk0", None), 404, "disk_not_found", "unknown disk");
    assert_error(&api(&agent, "GET", "/v1/disks/vm9/disk0/bitmaps", None), 404, "disk_not_found", "unknown disk");
    assert_error(&api(&agent, "GET", &format!("{bitmaps}/nope"), None), 404, "bitmap_not_found", "unknown bitmap");
    assert_error(&api(&agent, "DELETE", &format!("{bitmaps}/nope"), None), 404, "bitmap_not_found", "unknown bitmap");
    assert_error(&api(&agent, "GET", "/v1/jobs/backup-999", None), 404, "job_not_found", "unknown job");
    assert_error(&api(&agent, "POST", "/v1/jobs/backup-999/cancel", None), 404, "job_not_found", "unknown job");
    assert_error(&api(&agent, "GET", "/v1/nope", None), 404, "not_found", "unknown route");
    assert_error(&api(&agent, "GET", "/v2/status", None), 404, "not_found", "unknown route");
    assert_error(
        &api(&agent, "POST", &format!("{bitmaps}/backup/frobnicate"), None),
        404,
        "not_found",
        "unknown action",
    );
    // 409
    assert_error(&api(&agent, "POST", bitmaps, Some(r#"{"name": "backup"}"#)), 409, "bitmap_exists", "bitmap exists");
    let target = format!("file:{}", agent.dir().join("bk").display());
    let first = agent.json(&["backup", "vm1/disk0", "--target", &target, "--sync", "full", "--speed", "1MiB"]);
    let id = job_id(&first);
    assert_eq!(first["state"], "running", "the throttled backup must still run: {first}");
    let second = format!(r#"{{"kind": "backup", "disk": "vm1/disk0", "sync": "full", "target": "{target}2"}}"#);
    let busy = api(&agent, "POST", "/v1/jobs", Some(&second));
    assert_error(&busy, 409, "disk_busy", "second backup of a busy disk");
    assert!(
        busy.json()["error"]["message"].as_str().unwrap_or_default().contains(&id),
        "names the running job: {busy:?}"
    );
    let cancel = api(&agent, "POST", &format!("/v1/jobs/{id}/cancel"), None);
    assert_eq!(cancel.status, 200, "cancel: {cancel:?}");
    let done = wait_concluded(&agent, &id, Duration::from_secs(20));
    assert_eq!(done["result"], "cancelled", "{done}");
    assert_error(
        &api(&agent, "POST", &format!("/v1/jobs/{id}/pause"), None),
        409,
        "job_state",
        "pause a concluded job",
    );

    // Successes keep their statuses.
    assert_eq!(api(&agent, "GET", "/v1/status", None).status, 200);
    assert_eq!(api(&agent, "DELETE", &format!("{bitmaps}/backup"), None).status, 204);
}

/// Every rejection, including the framework's own (wrong method, bad query
/// string, oversized body), answers with the JSON error body of the API.
#[test]
fn control_api_framework_rejections_are_json_errors() {
    let agent = AgentBuilder::new().simple_vm("vm1", "16MiB").start().expect("start agent");
    let mut failures = Vec::new();
    let big = format!("{{\"kind\": \"backup\", \"disk\": \"{}\"}}", "x".repeat(100 << 10));
    let cases: [(&str, &str, Option<&str>, u16); 3] = [
        ("DELETE", "/v1/status", None, 405),
        ("GET", "/v1/jobs?all=maybe", None, 400),
        ("POST", "/v1/jobs", Some(big.as_str()), 413),
    ];
    for (method, path, body, status) in cases {
        let r = api(&agent, method, path, body);
        let ok = r.status == status
            && r.content_type.starts_with("application/json")
            && serde_json::from_str::<Value>(&r.body).is_ok_and(|v| v["error"]["code"].is_string());
        if !ok {
            failures.push(format!(
                "{method} {path}: expected {status} with a JSON error body, got {} {:?} {:?}",
                r.status,
                r.content_type,
                r.body.chars().take(200).collect::<String>()
            ));
        }
    }
    assert!(failures.is_empty(), "rejections without the API's error body:\n{}", failures.join("\n"));
}

/// The served OpenAPI document is the committed one, and its schemas list
/// exactly the fields of what the agent answers.
#[test]
fn openapi_document_is_served_and_matches_live_answers() {
    let agent = AgentBuilder::new().vm("vm1", &vm_with_bitmap("vm1")).start().expect("start agent");
    let served = api(&agent, "GET", "/v1/openapi.json", None);
    assert_eq!(served.status, 200);
    assert!(served.content_type.starts_with("application/json"), "{:?}", served.content_type);
    let doc = served.json();
    let committed: Value = serde_json::from_str(&read_repo_file("agent/openapi.json")).expect("agent/openapi.json");
    assert_eq!(doc, committed, "the agent serves another document than agent/openapi.json");
    assert!(doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.0.")), "openapi: {}", doc["openapi"]);

    let schema_keys = |name: &str| -> BTreeSet<String> {
        doc["components"]["schemas"][name]["properties"]
            .as_object()
            .unwrap_or_else(|| panic!("no schema {name}"))
            .keys()
            .cloned()
            .collect()
    };
    let keys = |v: &Value| -> BTreeSet<String> {
        v.as_object().unwrap_or_else(|| panic!("not an object: {v}")).keys().cloned().collect()
    };
    let status = api(&agent, "GET", "/v1/status", None).json();
    assert_eq!(keys(&status), schema_keys("Status"), "Status: {status}");
    let disk = api(&agent, "GET", "/v1/disks/vm1/disk0", None).json();
    assert_eq!(keys(&disk), schema_keys("Disk"), "Disk: {disk}");
    assert_eq!(keys(&disk["bitmaps"][0]), schema_keys("BitmapInfo"), "BitmapInfo: {disk}");
    let target = format!("file:{}", agent.dir().join("bk").display());
    let job = agent.json(&["backup", "vm1/disk0", "--target", &target, "--sync", "full", "--wait"]);
    let job = if job.is_array() { job[0].clone() } else { job };
    assert_eq!(keys(&job), schema_keys("Job"), "Job: {job}");
    let states = &doc["components"]["schemas"]["JobState"]["enum"];
    assert!(states.as_array().is_some_and(|s| s.contains(&job["state"])), "state {} not in {states}", job["state"]);
    let results = &doc["components"]["schemas"]["JobResult"]["enum"];
    assert!(
        results.as_array().is_some_and(|s| s.contains(&job["result"])),
        "result {} not in {results}",
        job["result"]
    );
    let summary = job["summary"].as_object().expect("summary");
    let known = schema_keys("BackupSummary");
    let extra: Vec<_> = summary.keys().filter(|k| !known.contains(*k)).collect();
    assert!(extra.is_empty(), "backup summary fields missing from BackupSummary: {extra:?}");
    let listed = api(&agent, "GET", "/v1/jobs?all=true", None).json();
    assert!(listed.as_array().is_some_and(|l| l.iter().any(|j| j["id"] == job["id"])), "{listed}");
}

// --------------------------------------------------- deploy/rbdsync.service

#[test]
fn systemd_unit_passes_systemd_analyze_verify() {
    require_tool("systemd-analyze", "systemd");
    let unit = read_repo_file("deploy/rbdsync.service");
    for line in [
        "ExecStart=/usr/local/bin/rbdsync agent --config /etc/rbdsync/agent.yaml",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "KillSignal=SIGTERM",
        "Restart=on-failure",
        "StateDirectory=rbdsync",
        "RuntimeDirectory=rbdsync",
        "RuntimeDirectoryMode=0750",
        "ConfigurationDirectory=rbdsync",
        "ProtectSystem=strict",
        "ReadWritePaths=/var/lib/rbdsync /run/rbdsync",
        "ProtectHome=true",
        "PrivateTmp=true",
        "NoNewPrivileges=true",
        "ProtectKernelTunables=true",
        "ProtectKernelModules=true",
        "ProtectControlGroups=true",
        "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK",
        "LockPersonality=true",
        "MemoryDenyWriteExecute=true",
        "RestrictRealtime=true",
        "SystemCallArchitectures=native",
    ] {
        assert!(unit.lines().any(|l| l.trim() == line), "rbdsync.service lacks `{line}`");
    }
    assert!(unit.lines().any(|l| l.starts_with("TimeoutStopSec=")), "no TimeoutStopSec");
    let nofile: u64 = unit
        .lines()
        .find_map(|l| l.strip_prefix("LimitNOFILE="))
        .and_then(|v| v.trim().parse().ok())
        .expect("LimitNOFILE=<number>");
    assert!(nofile >= 65536, "LimitNOFILE={nofile} is low");

    // verify checks that ExecStart exists: run it on a root with the unit, the
    // agent binary and the system's units (sysinit.target etc.).
    let root = tempfile::tempdir().expect("tempdir");
    let r = root.path();
    for d in ["usr/local/bin", "bin", "etc/systemd/system", "usr/lib/systemd"] {
        std::fs::create_dir_all(r.join(d)).expect("mkdir");
    }
    std::fs::copy(agent_bin(), r.join("usr/local/bin/rbdsync")).expect("copy agent");
    std::fs::copy("/bin/kill", r.join("bin/kill")).expect("copy /bin/kill");
    std::fs::write(r.join("etc/systemd/system/rbdsync.service"), &unit).expect("write unit");
    let units = ["/usr/lib/systemd/system", "/lib/systemd/system"]
        .into_iter()
        .find(|p| Path::new(p).join("sysinit.target").exists())
        .expect("the system's units (sysinit.target) are not installed: install the Debian package systemd");
    run("cp", &["-a", units, r.join("usr/lib/systemd/").to_str().expect("utf-8")]).expect("copy system units");
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(format!("--root={}", r.display()))
        .arg("rbdsync.service")
        .output()
        .expect("spawn systemd-analyze");
    // systemd-analyze exits 0 on unknown keys and bad values: any output is a finding.
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "systemd-analyze verify rbdsync.service: {}",
        show(&out)
    );
}
