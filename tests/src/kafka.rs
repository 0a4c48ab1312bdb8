//! A real Kafka-protocol broker for the tests (tansu, in-memory storage, on
//! loopback), and a consumer that reads a topic back.
//!
//! The broker binary is `OMEGI_TANSU` (set by `cargo xtask test`), else
//! `~/.local/share/omegi-tools/tansu/bin/tansu` (`OMEGI_TOOLS_DIR` moves
//! it), where `cargo xtask setup` installs it.

use std::{
    io::{BufRead, BufReader},
    net::TcpListener,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use rdkafka::{
    consumer::{BaseConsumer, Consumer},
    ClientConfig, Message, Offset, TopicPartitionList,
};

/// How long a broker may take to print `ready`.
pub const START_TIMEOUT: Duration = Duration::from_secs(60);

/// The tansu binary.
pub fn tansu_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("OMEGI_TANSU") {
        return PathBuf::from(path);
    }
    crate::tools_dir().join("tansu/bin/tansu")
}

/// A loopback port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free loopback port")
        .port()
}

/// A tansu broker with in-memory storage; killed on drop (and everything it
/// held is gone, as with a real broker that lost its disk).
pub struct Broker {
    pub port: u16,
    child: Option<Child>,
}

impl Broker {
    /// Starts a broker on a free port.
    pub fn start() -> Self {
        Self::start_on(free_port())
    }

    /// Starts a broker on `port` and waits for it to be ready.
    pub fn start_on(port: u16) -> Self {
        let mut broker = Self { port, child: None };
        broker.restart();
        broker
    }

    /// `127.0.0.1:PORT`, for `OMEGI_KAFKA_SERVER`.
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Kills the broker (its topics and messages are lost).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts (again) on the same port, empty.
    pub fn restart(&mut self) {
        self.stop();
        let binary = tansu_binary();
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let deadline = Instant::now() + START_TIMEOUT;
        // The port of a broker just killed may take a moment to be free.
        loop {
            let mut child = Command::new(&binary)
                .args([
                    "broker",
                    "--listener-url",
                    &url,
                    "--advertised-listener-url",
                    &url,
                ])
                .args(["--storage-engine", "memory://tansu/"])
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap_or_else(|e| {
                    panic!(
                        "cannot start the tansu broker {} ({e}): run `cargo xtask setup`, or set \
                         OMEGI_TANSU",
                        binary.display()
                    )
                });
            let (lines_tx, lines) = mpsc::channel();
            let stdout = child.stdout.take().unwrap();
            let stderr = child.stderr.take().unwrap();
            for pipe in [
                Box::new(stdout) as Box<dyn std::io::Read + Send>,
                Box::new(stderr),
            ] {
                let lines_tx = lines_tx.clone();
                std::thread::spawn(move || {
                    // Keeps draining after `ready` so the broker never blocks on a pipe.
                    for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                        let _ = lines_tx.send(line);
                    }
                });
            }
            drop(lines_tx);
            let mut output = String::new();
            let ready = loop {
                let left = deadline.saturating_duration_since(Instant::now());
                match lines.recv_timeout(left.min(Duration::from_millis(200))) {
                    Ok(line) => {
                        output.push_str(&line);
                        output.push('\n');
                        if line.starts_with("ready") {
                            break true;
                        }
                    }
                    Err(mpsc::RecvTimeoutError::Timeout) => {
                        if Instant::now() >= deadline {
                            break false;
                        }
                        if let Ok(Some(_)) = child.try_wait() {
                            break false;
                        }
                    }
                    Err(mpsc::RecvTimeoutError::Disconnected) => break false,
                }
            };
            if ready {
                self.child = Some(child);
                return;
            }
            let _ = child.kill();
            let _ = child.wait();
            assert!(
                Instant::now() < deadline,
                "tansu did not get ready on port {}:\n{output}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(300));
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.stop();
    }
}

/// How long a topic must stay quiet, once the expected messages are in,
/// before reading stops (so that extra messages are seen too).
pub const QUIET: Duration = Duration::from_secs(3);

/// The messages of `topic` (all partitions, from the start): waits until
/// `expected` have arrived (failing after a generous timeout), then reads
/// on until the topic has been quiet for [`QUIET`], so that extra messages
/// show too. A topic that does not exist reads as empty.
///
/// (tansu 0.6 reports a partition's high watermark in record batches, not
/// records, so watermarks cannot say where a partition ends.)
pub fn read_topic(broker: &str, topic: &str, expected: usize) -> Vec<Vec<u8>> {
    let timeout = Duration::from_secs(30);
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", broker)
        .set("group.id", "omegi-tests")
        .set("enable.auto.commit", "false")
        .create()
        .expect("a consumer");
    let metadata = consumer
        .fetch_metadata(Some(topic), timeout)
        .expect("broker metadata");
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .filter(|t| t.name() == topic && t.error().is_none())
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    let mut messages = Vec::new();
    if partitions.is_empty() {
        assert_eq!(expected, 0, "topic {topic} does not exist");
        return messages;
    }
    let mut assignment = TopicPartitionList::new();
    for partition in partitions {
        assignment
            .add_partition_offset(topic, partition, Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&assignment).expect("assign");
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut last_message = Instant::now();
    loop {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(message)) => {
                messages.push(message.payload().unwrap_or_default().to_vec());
                last_message = Instant::now();
            }
            Some(Err(error)) => panic!("reading {topic} back: {error}"),
            None => {}
        }
        if messages.len() >= expected && last_message.elapsed() >= QUIET {
            return messages;
        }
        assert!(
            Instant::now() < deadline,
            "reading {topic} back: {} messages of {expected} after 120 s",
            messages.len()
        );
    }
}

/// [`read_topic`], each message parsed as JSON.
pub fn read_json(broker: &str, topic: &str, expected: usize) -> Vec<serde_json::Value> {
    read_topic(broker, topic, expected)
        .iter()
        .map(|bytes| {
            serde_json::from_slice(bytes).unwrap_or_else(|e| {
                panic!(
                    "message on {topic} is not JSON ({e}): {}",
                    String::from_utf8_lossy(bytes)
                )
            })
        })
        .collect()
}
