//! Multi-process clusters for tests: real `shoal up` processes, each on its own loopback IP
//! (127.A.B.n, with A.B random per test so tests run in parallel), behind a fault-injecting
//! proxy on 127.A.B.(100+n) that carries all of its gossip (UDP), peer and HTTP traffic
//! (TCP). Nodes advertise their proxy address, so every byte between two nodes crosses a
//! proxy, and [`Net::isolate`] cuts a node off both ways (a network partition) while its
//! clients can still reach it directly.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::task::JoinHandle;

use crate::{DEADLINE, Process, http_get};

/// Fixed ports: every node has its own IP, so they never collide.
pub const MQTT_PORT: u16 = 21883;
pub const HTTP_PORT: u16 = 28080;
pub const PEER_PORT: u16 = 27070;
pub const GOSSIP_PORT: u16 = 27946;

/// The simulated network: which real node IPs are cut off.
#[derive(Clone, Default)]
pub struct Net {
    cut: Arc<RwLock<HashSet<IpAddr>>>,
}

impl Net {
    /// Cuts the node with this real IP off from every other node, both ways.
    pub fn isolate(&self, ip: IpAddr) {
        self.cut.write().expect("net").insert(ip);
    }

    /// Restores every link.
    pub fn heal(&self) {
        self.cut.write().expect("net").clear();
    }

    fn blocked(&self, a: IpAddr, b: IpAddr) -> bool {
        let cut = self.cut.read().expect("net");
        cut.contains(&a) || cut.contains(&b)
    }
}

/// Relays TCP from `listen` to `target`; connections are dropped while either side is cut.
async fn tcp_proxy(listener: TcpListener, target: SocketAddr, net: Net) {
    while let Ok((inbound, src)) = listener.accept().await {
        let net = net.clone();
        tokio::spawn(async move {
            if net.blocked(src.ip(), target.ip()) {
                return;
            }
            let Ok(outbound) = TcpStream::connect(target).await else {
                return;
            };
            let _ = inbound.set_nodelay(true);
            let _ = outbound.set_nodelay(true);
            let (mut ri, mut wi) = inbound.into_split();
            let (mut ro, mut wo) = outbound.into_split();
            let (n1, n2) = (net.clone(), net.clone());
            let (s, t) = (src.ip(), target.ip());
            let up = async move {
                let mut buf = vec![0u8; 64 << 10];
                loop {
                    let n = ri.read(&mut buf).await.unwrap_or(0);
                    if n == 0 || n1.blocked(s, t) || wo.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            };
            let down = async move {
                let mut buf = vec![0u8; 64 << 10];
                loop {
                    let n = ro.read(&mut buf).await.unwrap_or(0);
                    if n == 0 || n2.blocked(s, t) || wi.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            };
            // Either direction ending (or a cut) closes both.
            tokio::select! {
                _ = up => {}
                _ = down => {}
            }
        });
    }
}

/// Relays UDP from `listen` to `target`, NAT-style: one relay socket per source, replies go
/// back to that source from the proxy address. Datagrams are dropped while either side is cut.
async fn udp_proxy(main: UdpSocket, target: SocketAddr, net: Net) {
    let main = Arc::new(main);
    let Ok(local) = main.local_addr() else { return };
    let mut relays: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
    let mut tasks: Vec<JoinHandle<()>> = Vec::new();
    let mut buf = vec![0u8; 65_536];
    while let Ok((n, src)) = main.recv_from(&mut buf).await {
        if net.blocked(src.ip(), target.ip()) {
            continue;
        }
        let relay = match relays.get(&src) {
            Some(r) => r.clone(),
            None => {
                let Ok(r) = UdpSocket::bind(SocketAddr::new(local.ip(), 0)).await else {
                    continue;
                };
                let r = Arc::new(r);
                let (r2, main2, net2) = (r.clone(), main.clone(), net.clone());
                tasks.push(tokio::spawn(async move {
                    let mut buf = vec![0u8; 65_536];
                    while let Ok((n, from)) = r2.recv_from(&mut buf).await {
                        if !net2.blocked(from.ip(), src.ip()) {
                            let _ = main2.send_to(&buf[..n], src).await;
                        }
                    }
                }));
                relays.insert(src, r.clone());
                r
            }
        };
        let _ = relay.send_to(&buf[..n], target).await;
    }
    for t in tasks {
        t.abort();
    }
}

/// One node of a test cluster.
pub struct ClusterNode {
    pub name: String,
    /// The node's own IP (its clients connect here).
    pub ip: IpAddr,
    /// Its proxy's IP (what it advertises to the other nodes).
    pub proxy_ip: IpAddr,
    pub dir: tempfile::TempDir,
    pub proc: Option<Process>,
    proxies: Vec<JoinHandle<()>>,
}

impl ClusterNode {
    pub fn mqtt(&self) -> SocketAddr {
        SocketAddr::new(self.ip, MQTT_PORT)
    }

    pub fn url(&self) -> String {
        format!("http://{}:{HTTP_PORT}", self.ip)
    }
}

impl Drop for ClusterNode {
    fn drop(&mut self) {
        for p in &self.proxies {
            p.abort();
        }
    }
}

/// A cluster of real `shoal up` processes.
pub struct Cluster {
    pub nodes: Vec<ClusterNode>,
    pub net: Net,
    base: [u8; 2],
    config: PathBuf,
    _config_dir: tempfile::TempDir,
}

impl Cluster {
    /// Starts `n` nodes that join through the first; `toml` is appended to each node's
    /// config (gossip every 100 ms and anti-entropy every second are set already).
    pub async fn start(n: usize, toml: &str) -> Cluster {
        let seed = std::process::id() as u64 ^ crate::now_nanos();
        let base = [(seed % 200 + 20) as u8, ((seed >> 8) % 250 + 1) as u8];
        let config_dir = tempfile::tempdir().expect("tempdir");
        let config = config_dir.path().join("shoal.toml");
        std::fs::write(
            &config,
            format!(
                "[cluster]\ngossip_interval = \"100ms\"\nanti_entropy_interval = \"1s\"\nack_timeout = \"4s\"\n{toml}\n"
            ),
        )
        .expect("write config");
        let mut c = Cluster {
            nodes: Vec::new(),
            net: Net::default(),
            base,
            config,
            _config_dir: config_dir,
        };
        for _ in 0..n {
            c.add_node().await;
        }
        c.wait_live(n).await;
        c
    }

    /// Adds (and starts) one more node, seeded with the first.
    pub async fn add_node(&mut self) -> usize {
        let i = self.nodes.len();
        let ip = IpAddr::V4(Ipv4Addr::new(127, self.base[0], self.base[1], i as u8 + 1));
        let proxy_ip = IpAddr::V4(Ipv4Addr::new(
            127,
            self.base[0],
            self.base[1],
            i as u8 + 101,
        ));
        let mut proxies = Vec::new();
        for port in [PEER_PORT, HTTP_PORT] {
            let l = TcpListener::bind(SocketAddr::new(proxy_ip, port))
                .await
                .expect("bind tcp proxy");
            proxies.push(tokio::spawn(tcp_proxy(
                l,
                SocketAddr::new(ip, port),
                self.net.clone(),
            )));
        }
        let u = UdpSocket::bind(SocketAddr::new(proxy_ip, GOSSIP_PORT))
            .await
            .expect("bind udp proxy");
        proxies.push(tokio::spawn(udp_proxy(
            u,
            SocketAddr::new(ip, GOSSIP_PORT),
            self.net.clone(),
        )));
        self.nodes.push(ClusterNode {
            name: format!("n{}", i + 1),
            ip,
            proxy_ip,
            dir: tempfile::tempdir().expect("tempdir"),
            proc: None,
            proxies,
        });
        self.start_node(i).await;
        i
    }

    /// Starts (or restarts) node `i` on its data directory.
    pub async fn start_node(&mut self, i: usize) {
        let seed = format!("{}:{GOSSIP_PORT}", self.nodes[0].proxy_ip);
        let node = &self.nodes[i];
        let addr = |port: u16| SocketAddr::new(node.ip, port).to_string();
        let mut args: Vec<String> = vec![
            "--node-id".into(),
            node.name.clone(),
            "--config".into(),
            self.config.display().to_string(),
            "--mqtt-addr".into(),
            addr(MQTT_PORT),
            "--http-addr".into(),
            addr(HTTP_PORT),
            "--peer-addr".into(),
            addr(PEER_PORT),
            "--gossip-addr".into(),
            addr(GOSSIP_PORT),
            "--advertise-host".into(),
            node.proxy_ip.to_string(),
        ];
        if i != 0 || self.nodes.len() > 1 {
            args.extend(["--seed".into(), seed]);
        }
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let p = Process::spawn(node.dir.path(), &refs)
            .await
            .expect("node starts");
        self.nodes[i].proc = Some(p);
    }

    /// SIGKILL node `i`.
    pub async fn kill9(&mut self, i: usize) {
        if let Some(p) = self.nodes[i].proc.take() {
            p.kill9().await;
        }
    }

    /// SIGTERM node `i` and wait for it to exit.
    pub async fn terminate(&mut self, i: usize) {
        if let Some(p) = self.nodes[i].proc.take() {
            let status = p.terminate().await;
            assert!(
                status.success(),
                "{} exited with {status}",
                self.nodes[i].name
            );
        }
    }

    /// Running nodes' indexes.
    pub fn running(&self) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|i| self.nodes[*i].proc.is_some())
            .collect()
    }

    /// Waits until every running node sees exactly `n` live members.
    pub async fn wait_live(&self, n: usize) {
        self.wait_live_on(&self.running(), n).await;
    }

    /// Waits until each of `nodes` sees exactly `n` live members.
    pub async fn wait_live_on(&self, nodes: &[usize], n: usize) {
        for &i in nodes {
            let url = self.nodes[i].url();
            crate::eventually(
                &format!("{} sees {n} live members", self.nodes[i].name),
                || {
                    let url = url.clone();
                    async move {
                        let v = http_get(&url, "/v1/cluster").await;
                        let live = v["members"]
                            .as_array()?
                            .iter()
                            .filter(|m| m["live"] == true)
                            .count();
                        (live == n).then_some(())
                    }
                },
            )
            .await;
        }
    }

    /// Waits until, seen from node `i`, every partition of `topic` has all its replicas
    /// reachable with the same digest (I5). Returns the topic description.
    pub async fn wait_converged(&self, i: usize, topic: &str, within: Duration) -> Value {
        let url = self.nodes[i].url();
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let v = http_get(&url, &format!("/v1/topics/{topic}")).await;
            let parts = v["partitions_detail"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            if !parts.is_empty() && parts.iter().all(|p| p["converged"] == true) {
                return v;
            }
            if tokio::time::Instant::now() > deadline {
                panic!("{topic} did not converge within {within:?}: {v:#}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Every record of `topic` node `i` holds itself (no forwarding): payload -> count, and
    /// the number of distinct record ids.
    pub async fn local_payloads(&self, i: usize, topic: &str) -> (HashMap<String, usize>, usize) {
        let recs = crate::local_records(&self.nodes[i].url(), topic).await;
        let mut ids = HashSet::new();
        let mut payloads: HashMap<String, usize> = HashMap::new();
        for r in &recs {
            // Ids are (origin, seq) with seq dense per partition: unique within a partition.
            ids.insert(format!(
                "{}/{}",
                r["partition"],
                r["id"].as_str().unwrap_or_default()
            ));
            *payloads
                .entry(r["payload"].as_str().unwrap_or_default().to_string())
                .or_default() += 1;
        }
        if ids.len() != recs.len() {
            let mut seen: HashMap<String, Value> = HashMap::new();
            let mut dups = Vec::new();
            for r in &recs {
                let id = format!(
                    "{}/{}",
                    r["partition"],
                    r["id"].as_str().unwrap_or_default()
                );
                if let Some(first) = seen.get(&id) {
                    dups.push((first.clone(), r.clone()));
                } else {
                    seen.insert(id, r.clone());
                }
            }
            panic!(
                "{} record ids appear twice on {}, e.g. {:#?}",
                dups.len(),
                self.nodes[i].name,
                &dups[..dups.len().min(3)]
            );
        }
        (payloads, ids.len())
    }
}

/// Default deadline, for callers that want it explicitly.
pub const CONVERGE: Duration = DEADLINE;

/// Payloads of PUBACKed publishes.
pub type Acked = Arc<std::sync::Mutex<Vec<String>>>;

/// A device publishing QoS 1 to `topic_prefix/{id}` with `window` publishes in flight,
/// recording every PUBACKed payload. When its node goes away it fails over to the next
/// address (publishes that were not acked are abandoned: only acked ones must survive).
/// Runs until `stop` is set.
pub async fn device(
    addrs: Vec<SocketAddr>,
    id: String,
    topic_prefix: &'static str,
    window: usize,
    acked: Acked,
    stop: Arc<std::sync::atomic::AtomicBool>,
) {
    use rumqttc::QoS;
    use rumqttc::mqttbytes::v4::{Connect, Packet, Publish};
    use std::sync::atomic::Ordering;
    let mut next = 0u64;
    let mut k = 0usize;
    while !stop.load(Ordering::SeqCst) {
        let addr = addrs[k % addrs.len()];
        k += 1;
        let Ok(Ok(mut s)) =
            tokio::time::timeout(Duration::from_secs(1), TcpStream::connect(addr)).await
        else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let mut out = bytes::BytesMut::new();
        let mut c = Connect::new(id.clone());
        c.keep_alive = 30;
        let _ = Packet::Connect(c).write(&mut out, usize::MAX);
        if s.write_all(&out).await.is_err() {
            continue;
        }
        let mut inbuf = bytes::BytesMut::new();
        let mut inflight: HashMap<u16, String> = HashMap::new();
        let mut connected = false;
        loop {
            while connected && inflight.len() < window && !stop.load(Ordering::SeqCst) {
                next += 1;
                let pkid = (next % 65_535 + 1) as u16;
                let payload = format!("{id}-{next}");
                let mut p = Publish::new(
                    format!("{topic_prefix}/{id}"),
                    QoS::AtLeastOnce,
                    payload.clone().into_bytes(),
                );
                p.pkid = pkid;
                out.clear();
                let _ = Packet::Publish(p).write(&mut out, usize::MAX);
                if s.write_all(&out).await.is_err() {
                    break;
                }
                inflight.insert(pkid, payload);
            }
            if stop.load(Ordering::SeqCst) && inflight.is_empty() {
                return;
            }
            let mut chunk = [0u8; 4096];
            let read = tokio::time::timeout(Duration::from_secs(6), s.read(&mut chunk)).await;
            match read {
                Ok(Ok(n)) if n > 0 => inbuf.extend_from_slice(&chunk[..n]),
                // Closed, failed, or silent (a stopped node): fail over.
                _ => break,
            }
            while let Ok(p) = Packet::read(&mut inbuf, usize::MAX) {
                match p {
                    Packet::ConnAck(_) => connected = true,
                    Packet::PubAck(a) => {
                        if let Some(payload) = inflight.remove(&a.pkid) {
                            acked.lock().expect("acked").push(payload);
                        }
                    }
                    _ => {}
                }
            }
        }
    }
}
