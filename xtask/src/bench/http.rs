//! Requests per second of a small keep-alive HTTP server (the tests' C
//! `http_server` fixture, built `-O2 -g`) under `wrk`, untraced, traced with
//! functions only (`--propagation off`) and traced with HTTP spans (the
//! default), side by side and interleaved. The gap between the two traced
//! runs is the cost of following HTTP on the sockets alone (the syscall
//! tracepoints, the request copies and their parsing); the goal is a few
//! percent of throughput.

use std::{
    fmt::Write as _,
    io::{BufRead as _, BufReader},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use super::{median, Bench};

/// The configurations, in the order they run in each repetition.
const CONFIGS: [(&str, Option<&str>); 3] = [
    ("untraced", None),
    ("traced, --propagation off (functions only)", Some("off")),
    ("traced, HTTP spans (default)", Some("read")),
];

impl Bench {
    pub(super) fn http(&self) -> Result<Vec<HttpRow>> {
        crate::setup::apt_install(&["wrk"])?;
        let server = self.bin.join("http_server");
        let seconds = if self.quick { 2 } else { 4 };
        let mut samples: Vec<Vec<f64>> = vec![Vec::new(); CONFIGS.len()];
        let mut spans: Vec<u64> = vec![0; CONFIGS.len()];
        for _ in 0..self.reps.min(3) {
            for (index, (_, propagation)) in CONFIGS.iter().enumerate() {
                let mut running = RunningServer::start(&server)?;
                let agent = match propagation {
                    Some(mode) => Some(self.attach_http_agent(running.pid(), mode)?),
                    None => None,
                };
                let rate = wrk(running.port, seconds)?;
                if let Some(agent) = agent {
                    spans[index] = agent.stop()?;
                }
                running.stop();
                samples[index].push(rate);
            }
        }
        let rows: Vec<HttpRow> = CONFIGS
            .iter()
            .zip(samples.iter_mut().zip(spans))
            .map(|((name, _), (rates, spans))| HttpRow {
                name: (*name).to_owned(),
                requests_per_second: median(rates),
                spans,
            })
            .collect();
        let untraced = rows[0].requests_per_second;
        for row in &rows {
            println!(
                "  {:<44} {:>9.0} requests/s ({:>5.1}% of untraced), {} spans",
                row.name,
                row.requests_per_second,
                100.0 * row.requests_per_second / untraced,
                row.spans
            );
        }
        Ok(rows)
    }

    fn attach_http_agent(&self, pid: u32, propagation: &str) -> Result<TracingAgent> {
        let mut command = Command::new(&self.agent);
        command
            .arg("--project-root")
            .arg(crate::root().join("tests/fixtures/c"))
            .args(["--format", "json", "--output", "/dev/null"])
            .args(["--overhead-budget", "off", "--propagation", propagation])
            .args(["--pid", &pid.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = command.spawn().context("starting the agent")?;
        let stderr = child.stderr.take().context("agent stderr")?;
        let mut lines = BufReader::new(stderr).lines();
        loop {
            let Some(line) = lines.next() else {
                let _ = child.wait();
                bail!("the agent ended before it attached");
            };
            let line = line?;
            if line.contains("tracing ") && line.contains(" functions of ") {
                break;
            }
        }
        // The rest of stderr, read on a thread so the agent never blocks.
        let rest = std::thread::spawn(move || lines.map_while(Result::ok).collect::<Vec<_>>());
        Ok(TracingAgent { child, rest })
    }
}

/// The fixture server, started on an ephemeral port.
struct RunningServer {
    child: Child,
    port: u16,
}

impl RunningServer {
    fn start(exe: &std::path::Path) -> Result<Self> {
        let mut child = Command::new(exe)
            .arg("0")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", exe.display()))?;
        let stdout = child.stdout.take().context("server stdout")?;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        let port = line
            .trim()
            .strip_prefix("listening on ")
            .and_then(|port| port.parse().ok())
            .with_context(|| format!("the server said {line:?}, not `listening on PORT`"))?;
        Ok(Self { child, port })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct TracingAgent {
    child: Child,
    rest: std::thread::JoinHandle<Vec<String>>,
}

impl TracingAgent {
    /// Stops the agent (SIGINT, as Ctrl-C) and returns the spans it counted.
    fn stop(mut self) -> Result<u64> {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.child.try_wait()?.is_none() {
            if Instant::now() > deadline {
                let _ = self.child.kill();
                bail!("the agent did not stop within 30 s of SIGINT");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let lines = self.rest.join().unwrap_or_default();
        let spans = lines
            .iter()
            .rev()
            .find_map(|line| {
                let (_, rest) = line.split_once(" traces, ")?;
                rest.split_whitespace().next()?.parse().ok()
            })
            .unwrap_or(0);
        Ok(spans)
    }
}

/// Requests per second `wrk` measured: one thread, 4 keep-alive connections.
fn wrk(port: u16, seconds: u32) -> Result<f64> {
    let output = Command::new("wrk")
        .args(["-t1", "-c4", &format!("-d{seconds}s")])
        .arg(format!("http://127.0.0.1:{port}/hello"))
        .output()
        .context("running wrk")?;
    let text = String::from_utf8_lossy(&output.stdout);
    text.lines()
        .find_map(|line| line.strip_prefix("Requests/sec:"))
        .and_then(|rate| rate.trim().parse().ok())
        .with_context(|| format!("no Requests/sec in wrk's output: {text}"))
}

pub(super) struct HttpRow {
    pub(super) name: String,
    pub(super) requests_per_second: f64,
    pub(super) spans: u64,
}

pub(super) fn markdown(md: &mut String, rows: &[HttpRow]) {
    let Some(untraced) = rows.first().map(|row| row.requests_per_second) else {
        return;
    };
    let _ = writeln!(
        md,
        "\n## HTTP server throughput\n\nThe tests' C `http_server` (a thread per connection, \
         keep-alive, `-O2 -g`) under `wrk -t1 -c4` for `GET /hello`; omegi attached by `--pid` \
         (all 9 of its functions traced). Medians of interleaved runs. The gap between the \
         two traced rows is what following HTTP on the sockets costs (the goal: a few \
         percent).\n\n| configuration | requests/s | of untraced | spans |\n|---|---:|---:|---:|"
    );
    for row in rows {
        let _ = writeln!(
            md,
            "| {} | {:.0} | {:.1}% | {} |",
            row.name,
            row.requests_per_second,
            100.0 * row.requests_per_second / untraced,
            row.spans
        );
    }
}
