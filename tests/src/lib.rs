//! Test harness for Shoal's integration tests: in-process nodes on 127.0.0.1:0, real `shoal`
//! child processes (for SIGKILL tests), a rumqttc client wrapper, a raw MQTT client for
//! byte-level tests, and `eventually` for awaiting a condition with a deadline.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::BytesMut;
use rumqttc::mqttbytes::v4::Packet;
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, QoS};
use serde_json::Value;
use shoal::{Config, Node};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

/// Default deadline for conditions in tests.
pub const DEADLINE: Duration = Duration::from_secs(20);

/// A config for a test node: loopback, port 0 everywhere, the given data directory.
pub fn test_config(data_dir: &Path) -> Config {
    Config {
        data_dir: data_dir.to_path_buf(),
        mqtt_addr: "127.0.0.1:0".parse().expect("addr"),
        http_addr: "127.0.0.1:0".parse().expect("addr"),
        peer_addr: "127.0.0.1:0".parse().expect("addr"),
        gossip_addr: "127.0.0.1:0".parse().expect("addr"),
        ..Config::default()
    }
}

/// An in-process node with its own temporary data directory.
pub struct TestNode {
    pub node: Option<Node>,
    pub dir: tempfile::TempDir,
    pub config: Config,
}

impl TestNode {
    pub async fn start() -> TestNode {
        Self::start_with(|_| {}).await
    }

    /// Starts a node after `edit` adjusts its config.
    pub async fn start_with(edit: impl FnOnce(&mut Config)) -> TestNode {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = test_config(dir.path());
        edit(&mut config);
        let node = Node::start(config.clone()).await.expect("node starts");
        TestNode {
            node: Some(node),
            dir,
            config,
        }
    }

    fn node(&self) -> &Node {
        self.node.as_ref().expect("node running")
    }

    pub fn mqtt(&self) -> SocketAddr {
        self.node().mqtt_addr
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.node().http_addr)
    }

    /// Graceful restart on the same data directory (addresses change).
    pub async fn restart(&mut self) {
        if let Some(n) = self.node.take() {
            n.shutdown().await;
        }
        self.node = Some(
            Node::start(self.config.clone())
                .await
                .expect("node restarts"),
        );
    }

    pub async fn stop(mut self) {
        if let Some(n) = self.node.take() {
            n.shutdown().await;
        }
    }

    /// GET a JSON document from the node's API.
    pub async fn get(&self, path: &str) -> Value {
        http_get(&self.url(), path).await
    }

    /// Every record of a topic (all partitions), read through the API.
    pub async fn all_records(&self, topic: &str) -> Vec<Value> {
        all_records(&self.url(), topic).await
    }
}

pub async fn http_get(base: &str, path: &str) -> Value {
    let resp = reqwest::get(format!("{base}{path}")).await.expect("GET");
    resp.json().await.expect("JSON body")
}

/// Every record of a topic (all partitions), through the HTTP API.
pub async fn all_records(base: &str, topic: &str) -> Vec<Value> {
    all_records_where(base, topic, "").await
}

/// Every record of a topic that this node holds itself (no forwarding to replicas).
pub async fn local_records(base: &str, topic: &str) -> Vec<Value> {
    all_records_where(base, topic, "&scope=local").await
}

async fn all_records_where(base: &str, topic: &str, extra: &str) -> Vec<Value> {
    let t = http_get(base, &format!("/v1/topics/{topic}")).await;
    let parts = t["partitions"].as_u64().expect("partitions");
    let mut out = Vec::new();
    for p in 0..parts {
        let mut from = 0u64;
        loop {
            let v = http_get(
                base,
                &format!(
                    "/v1/topics/{topic}/partitions/{p}/records?from={from}&limit=10000{extra}"
                ),
            )
            .await;
            let recs = v["records"].as_array().cloned().unwrap_or_default();
            if recs.is_empty() {
                break;
            }
            from = v["next_offset"].as_u64().expect("next_offset");
            out.extend(recs);
        }
    }
    out
}

/// Polls `check` until it returns `Some`, or fails after `DEADLINE`.
pub async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A rumqttc client whose event loop runs in a task; events arrive on `events`.
pub struct Client {
    pub client: AsyncClient,
    pub events: mpsc::Receiver<Result<Event, String>>,
    /// PUBLISHes that arrived while waiting for something else.
    stash: std::collections::VecDeque<rumqttc::Publish>,
    task: tokio::task::JoinHandle<()>,
}

impl Client {
    pub fn options(addr: SocketAddr, id: &str, clean: bool) -> MqttOptions {
        let mut o = MqttOptions::new(id, addr.ip().to_string(), addr.port());
        o.set_clean_session(clean);
        o.set_keep_alive(Duration::from_secs(30));
        o.set_max_packet_size(1 << 20, 1 << 20);
        o
    }

    /// Connects and waits for CONNACK; returns the client and "session present".
    pub async fn connect(addr: SocketAddr, id: &str, clean: bool) -> (Client, bool) {
        Self::connect_with(Self::options(addr, id, clean)).await
    }

    pub async fn connect_with(opts: MqttOptions) -> (Client, bool) {
        let (client, eventloop) = AsyncClient::new(opts, 1000);
        let (tx, mut events) = mpsc::channel(10_000);
        let task = tokio::spawn(drive(eventloop, tx));
        let present = loop {
            match tokio::time::timeout(DEADLINE, events.recv()).await {
                Ok(Some(Ok(Event::Incoming(rumqttc::Packet::ConnAck(c))))) => {
                    assert_eq!(c.code, rumqttc::ConnectReturnCode::Success, "CONNACK");
                    break c.session_present;
                }
                Ok(Some(Ok(_))) => {}
                other => panic!("no CONNACK: {other:?}"),
            }
        };
        (
            Client {
                client,
                events,
                stash: Default::default(),
                task,
            },
            present,
        )
    }

    /// Subscribes and waits for the SUBACK; returns its return codes.
    pub async fn subscribe(&mut self, filter: &str, qos: QoS) -> Vec<rumqttc::SubscribeReasonCode> {
        self.client.subscribe(filter, qos).await.expect("subscribe");
        loop {
            match self.next_event().await {
                Event::Incoming(rumqttc::Packet::SubAck(s)) => return s.return_codes,
                Event::Incoming(rumqttc::Packet::Publish(p)) => self.stash.push_back(p),
                _ => {}
            }
        }
    }

    pub async fn next_event(&mut self) -> Event {
        match tokio::time::timeout(DEADLINE, self.events.recv()).await {
            Ok(Some(Ok(e))) => e,
            other => panic!("no MQTT event: {other:?}"),
        }
    }

    /// The next PUBLISH received.
    pub async fn next_publish(&mut self) -> rumqttc::Publish {
        if let Some(p) = self.stash.pop_front() {
            return p;
        }
        loop {
            if let Event::Incoming(rumqttc::Packet::Publish(p)) = self.next_event().await {
                return p;
            }
        }
    }

    /// Publishes and waits until the broker acknowledged it (PUBACK / PUBCOMP; QoS 0:
    /// until it was written to the socket).
    pub async fn publish_acked(&mut self, topic: &str, qos: QoS, retain: bool, payload: &[u8]) {
        self.client
            .publish(topic, qos, retain, payload.to_vec())
            .await
            .expect("publish");
        loop {
            match (qos, self.next_event().await) {
                (QoS::AtMostOnce, Event::Outgoing(rumqttc::Outgoing::Publish(_))) => return,
                (QoS::AtLeastOnce, Event::Incoming(rumqttc::Packet::PubAck(_))) => return,
                (QoS::ExactlyOnce, Event::Incoming(rumqttc::Packet::PubComp(_))) => return,
                (_, Event::Incoming(rumqttc::Packet::Publish(p))) => self.stash.push_back(p),
                _ => {}
            }
        }
    }

    /// Sends DISCONNECT and waits until it went out.
    pub async fn disconnect(mut self) {
        let _ = self.client.disconnect().await;
        loop {
            match tokio::time::timeout(DEADLINE, self.events.recv()).await {
                Ok(Some(Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)))) => break,
                Ok(Some(Ok(_))) => {}
                _ => break,
            }
        }
        self.task.abort();
    }

    /// Drops the connection without DISCONNECT (the will fires).
    pub fn kill(self) {
        self.task.abort();
    }
}

async fn drive(mut eventloop: EventLoop, tx: mpsc::Sender<Result<Event, String>>) {
    loop {
        let ev = eventloop.poll().await;
        let stop = ev.is_err();
        if tx.send(ev.map_err(|e| e.to_string())).await.is_err() || stop {
            return;
        }
    }
}

/// A byte-level MQTT client for protocol tests.
pub struct RawClient {
    pub stream: TcpStream,
    buf: BytesMut,
}

impl RawClient {
    pub async fn connect(addr: SocketAddr) -> RawClient {
        RawClient {
            stream: TcpStream::connect(addr).await.expect("tcp connect"),
            buf: BytesMut::new(),
        }
    }

    pub async fn send(&mut self, p: Packet) {
        let mut b = BytesMut::new();
        p.write(&mut b, usize::MAX).expect("encode");
        self.send_bytes(&b).await;
    }

    pub async fn send_bytes(&mut self, b: &[u8]) {
        // The server may already have closed; tests then see it in `recv`.
        let _ = self.stream.write_all(b).await;
    }

    /// The next packet, or `None` once the server closed the connection.
    pub async fn recv(&mut self) -> Option<Packet> {
        loop {
            if !self.buf.is_empty()
                && let Ok(p) = Packet::read(&mut self.buf, usize::MAX)
            {
                return Some(p);
            }
            let mut chunk = [0u8; 4096];
            match tokio::time::timeout(DEADLINE, self.stream.read(&mut chunk)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return None,
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
                Err(_) => panic!("no packet and no close within {DEADLINE:?}"),
            }
        }
    }

    /// Reads until the server closes the connection; returns the packets seen before.
    pub async fn until_closed(&mut self) -> Vec<Packet> {
        let mut seen = Vec::new();
        while let Some(p) = self.recv().await {
            seen.push(p);
        }
        seen
    }

    /// CONNECT with the given client id, clean flag and keepalive; returns the CONNACK.
    pub async fn handshake(
        &mut self,
        id: &str,
        clean: bool,
        keep_alive: u16,
    ) -> rumqttc::mqttbytes::v4::ConnAck {
        let mut c = rumqttc::mqttbytes::v4::Connect::new(id);
        c.clean_session = clean;
        c.keep_alive = keep_alive;
        self.send(Packet::Connect(c)).await;
        match self.recv().await {
            Some(Packet::ConnAck(a)) => a,
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }
}

/// Path of the `shoal` binary built next to the test executable (or `SHOAL_BIN`).
pub fn shoal_bin() -> PathBuf {
    if let Ok(p) = std::env::var("SHOAL_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().and_then(|d| d.parent()).expect("target dir");
    let bin = dir.join("shoal");
    assert!(
        bin.exists(),
        "{} is missing: build it first with `cargo build -p shoal` (the gate script does)",
        bin.display()
    );
    bin
}

/// A real `shoal up` child process.
pub struct Process {
    pub child: tokio::process::Child,
    pub mqtt: SocketAddr,
    pub http: SocketAddr,
    /// Gossip address (for other nodes' `--seed`).
    pub gossip: SocketAddr,
    pub log: mpsc::UnboundedReceiver<String>,
}

impl Process {
    /// Spawns `shoal up` on `data_dir` with ephemeral loopback ports and waits until it is
    /// ready (its log line names the bound addresses).
    pub async fn spawn(data_dir: &Path, extra: &[&str]) -> anyhow::Result<Process> {
        let mut child = tokio::process::Command::new(shoal_bin())
            .arg("up")
            .arg("--data-dir")
            .arg(data_dir)
            .args([
                "--mqtt-addr",
                "127.0.0.1:0",
                "--http-addr",
                "127.0.0.1:0",
                "--peer-addr",
                "127.0.0.1:0",
                "--gossip-addr",
                "127.0.0.1:0",
                "--log",
                "info",
            ])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("spawn shoal")?;
        let stderr = child.stderr.take().context("stderr")?;
        let (tx, mut log) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(l)) = lines.next_line().await {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        let ready = tokio::time::timeout(DEADLINE, async {
            while let Some(l) = log.recv().await {
                if l.contains("shoal node ready") {
                    return Some(l);
                }
            }
            None
        })
        .await
        .context("shoal did not become ready in time")?;
        let Some(line) = ready else {
            bail!("shoal exited before becoming ready: {:?}", child.try_wait());
        };
        let field = |name: &str| -> anyhow::Result<SocketAddr> {
            let start = line.find(&format!("{name}=")).context("addr field")? + name.len() + 1;
            let rest = &line[start..];
            let end = rest.find(' ').unwrap_or(rest.len());
            Ok(rest[..end].parse()?)
        };
        Ok(Process {
            mqtt: field("mqtt")?,
            http: field("http")?,
            gossip: field("gossip")?,
            child,
            log,
        })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.http)
    }

    /// SIGKILL, and wait for the process to be gone.
    pub async fn kill9(mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }

    /// SIGTERM, and wait for a graceful exit; returns its exit status.
    pub async fn terminate(mut self) -> std::process::ExitStatus {
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
        tokio::time::timeout(DEADLINE, self.child.wait())
            .await
            .expect("exits after SIGTERM")
            .expect("wait")
    }
}

/// Path of an example consumer built for wasm (`cargo build --profile wasm --target
/// wasm32-unknown-unknown -p NAME`; the gate does it).
pub fn consumer_wasm(name: &str) -> Vec<u8> {
    let exe = std::env::current_exe().expect("current exe");
    let target = exe
        .ancestors()
        .find(|d| d.file_name().is_some_and(|n| n == "target"))
        .expect("target dir")
        .to_path_buf();
    let path = target
        .join("wasm32-unknown-unknown/wasm")
        .join(format!("{}.wasm", name.replace('-', "_")));
    std::fs::read(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}; build the example consumers first: cargo build --profile wasm \
             --target wasm32-unknown-unknown -p {name} (scripts/gate.sh does)",
            path.display()
        )
    })
}

/// Deploys a consumer through the API; returns (status code, reply).
pub async fn deploy(
    base: &str,
    name: &str,
    module: &[u8],
    body: serde_json::Value,
    token: Option<&str>,
) -> (u16, Value) {
    use base64::Engine;
    let mut body = body;
    body["module_base64"] = base64::engine::general_purpose::STANDARD
        .encode(module)
        .into();
    let mut req = reqwest::Client::new()
        .put(format!("{base}/v1/consumers/{name}"))
        .json(&body);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.expect("PUT");
    let code = resp.status().as_u16();
    (code, resp.json().await.expect("JSON"))
}

/// Alerts from `GET /v1/alerts` (all of them, from offset 0, page by page).
pub async fn alerts(base: &str, consumer: Option<&str>) -> Vec<Value> {
    let q = consumer.map_or(String::new(), |c| format!("&consumer={c}"));
    let mut out = Vec::new();
    let mut from = 0;
    loop {
        let v = http_get(base, &format!("/v1/alerts?from={from}&limit=10000{q}")).await;
        let page = v["alerts"].as_array().cloned().unwrap_or_default();
        let next = v["next"].as_u64().unwrap_or(from);
        if page.is_empty() || next == from {
            return out;
        }
        out.extend(page);
        from = next;
    }
}

/// Path of the `shoal-sim` binary built next to the test executable.
pub fn sim_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().and_then(|d| d.parent()).expect("target dir");
    let bin = dir.join("shoal-sim");
    assert!(
        bin.exists(),
        "{} is missing: build it first with `cargo build -p simulator` (the gate script does)",
        bin.display()
    );
    bin
}

/// Runs `shoal-sim ARGS`; returns (success, stdout, stderr).
pub async fn sim(args: &[&str]) -> (bool, String, String) {
    let out = tokio::process::Command::new(sim_bin())
        .args(args)
        .output()
        .await
        .expect("run shoal-sim");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

pub mod cluster;

/// Nanoseconds since the epoch (seeds for per-test random choices).
pub fn now_nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}
