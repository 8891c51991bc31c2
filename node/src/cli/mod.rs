//! The `shoal` command line: `up` runs a node; `topic`, `consume` talk to a node's HTTP API
//! (`--url`, `SHOAL_URL`). Settings for `up` come from defaults, then `--config FILE`, then
//! `SHOAL_*` variables, then flags (each later one wins).

mod client;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

/// `println!` that ends the process quietly when stdout is closed (`shoal cluster | head`)
/// instead of panicking on the broken pipe.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if let Err(e) = writeln!(std::io::stdout().lock(), $($arg)*)
            && e.kind() == std::io::ErrorKind::BrokenPipe
        {
            std::process::exit(0);
        }
    }};
}
pub(crate) use out;

use crate::config::Config;

#[derive(Parser, Debug)]
#[command(
    name = "shoal",
    version,
    args_override_self = true,
    about = "Shoal: an MQTT server whose every message lands in a durable, partitioned, replayable log",
    long_about = "Shoal takes MQTT straight from devices and stores every publish in a durable, \
                  partitioned log (redb) you can read back by offset or time.\n\n\
                  Start a node:      shoal up\n\
                  Publish:           mosquitto_pub -t sensors/1/temp -m 21.5 -q 1\n\
                  Read it back:      shoal consume telemetry --from beginning\n\
                  Join a cluster:    shoal up --seed OTHER_HOST:7946"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a node (MQTT on :1883, HTTP on :8080, data in ./shoal-data by default).
    Up(UpArgs),
    /// Create, list and describe topics.
    Topic {
        #[command(subcommand)]
        command: TopicCommand,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Print a topic's records as JSON lines (one object per record).
    Consume(ConsumeArgs),
    /// Deploy, list, inspect and remove WebAssembly consumers.
    Consumer {
        #[command(subcommand)]
        command: ConsumerCommand,
        #[command(flatten)]
        api: ApiArgs,
        /// API token for deploy and remove (when the node has one).
        #[arg(long, env = "SHOAL_API_TOKEN", global = true, hide_env_values = true)]
        token: Option<String>,
    },
    /// Members with liveness, and where every partition lives (replicas, owner).
    Cluster {
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Print alerts as JSON lines.
    Alerts {
        /// Keep waiting for new alerts (Ctrl-C to stop).
        #[arg(long)]
        follow: bool,
        /// Offset in the alert log to start from.
        #[arg(long, default_value_t = 0)]
        from: u64,
        /// Only this consumer's alerts.
        #[arg(long)]
        consumer: Option<String>,
        #[command(flatten)]
        api: ApiArgs,
    },
}

#[derive(Subcommand, Debug)]
enum ConsumerCommand {
    /// Upload a module (validated and compiled by the node) and start it. Deploying under
    /// an existing name continues from the old version's checkpoint.
    Deploy {
        name: String,
        /// The .wasm file (built for wasm32-unknown-unknown with shoal-sdk).
        file: PathBuf,
        /// Topic to consume.
        #[arg(long, default_value = "telemetry")]
        topic: String,
        /// MQTT-style filter on record subjects.
        #[arg(long, default_value = "#")]
        filter: String,
        /// JSON file with the consumer's config.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Where a first deploy starts: beginning or latest.
        #[arg(long, default_value = "beginning")]
        start: String,
        /// POST every alert of this consumer to this URL.
        #[arg(long)]
        webhook: Option<String>,
    },
    /// List consumers.
    List,
    /// Per-partition owner, cursor, lag, counters and last error.
    Status { name: String },
    /// Stop a consumer and delete its checkpoints and state.
    Remove { name: String },
}

#[derive(Args, Debug)]
struct ApiArgs {
    /// Base URL of a node's HTTP API.
    #[arg(
        long,
        env = "SHOAL_URL",
        default_value = "http://127.0.0.1:8080",
        global = true
    )]
    url: String,
}

#[derive(Args, Debug)]
struct UpArgs {
    /// Name of this node (defaults to the host name).
    #[arg(long, env = "SHOAL_NODE_ID")]
    node_id: Option<String>,
    /// Directory holding the node's database (created if missing) [default: ./shoal-data]
    #[arg(long, env = "SHOAL_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// MQTT listen address [default: 0.0.0.0:1883]
    #[arg(long, env = "SHOAL_MQTT_ADDR")]
    mqtt_addr: Option<SocketAddr>,
    /// HTTP API listen address [default: 0.0.0.0:8080]
    #[arg(long, env = "SHOAL_HTTP_ADDR")]
    http_addr: Option<SocketAddr>,
    /// Peer replication (TCP) listen address [default: 0.0.0.0:7070]
    #[arg(long, env = "SHOAL_PEER_ADDR")]
    peer_addr: Option<SocketAddr>,
    /// Gossip (UDP) listen address; give it to other nodes' --seed [default: 0.0.0.0:7946]
    #[arg(long, env = "SHOAL_GOSSIP_ADDR")]
    gossip_addr: Option<SocketAddr>,
    /// Gossip address (HOST:PORT) of a member of the cluster to join; repeatable or
    /// comma-separated. Without it the node starts a new cluster of its own.
    #[arg(long = "seed", env = "SHOAL_SEED", value_delimiter = ',')]
    seeds: Vec<String>,
    /// Cluster name; nodes with another cluster id are kept out [default: shoal]
    #[arg(long, env = "SHOAL_CLUSTER_ID")]
    cluster_id: Option<String>,
    /// Host or IP other nodes use to reach this one [default: the listen IP, or the
    /// address that routes to the first seed when listening on 0.0.0.0]
    #[arg(long, env = "SHOAL_ADVERTISE_HOST")]
    advertise_host: Option<String>,
    /// TOML file with any setting (see README.md, "Configuration").
    #[arg(long, env = "SHOAL_CONFIG")]
    config: Option<PathBuf>,
    /// Require this token (Authorization: Bearer) to deploy or remove consumers.
    #[arg(long, env = "SHOAL_API_TOKEN", hide_env_values = true)]
    api_token: Option<String>,
    /// Log filter, e.g. info, debug, shoal=debug.
    #[arg(long, env = "SHOAL_LOG", default_value = "info")]
    log: String,
}

#[derive(Subcommand, Debug)]
enum TopicCommand {
    /// Create a topic.
    Create {
        name: String,
        /// Number of partitions (fixed once created).
        #[arg(long, default_value_t = 8)]
        partitions: u32,
        /// Replicas per partition (capped by live nodes).
        #[arg(long, default_value_t = 3)]
        replication_factor: u32,
        /// When a write is acknowledged: local, quorum or all.
        #[arg(long, default_value = "quorum")]
        acks: String,
        /// Delete records older than this, e.g. 7d, 12h; "none" keeps them.
        #[arg(long, default_value = "7d")]
        retention: String,
        /// Keep each partition under this many bytes.
        #[arg(long)]
        retention_bytes: Option<u64>,
    },
    /// List topics.
    List,
    /// Show a topic's settings and per-partition offsets, sizes and version vectors.
    Describe { name: String },
}

#[derive(Args, Debug)]
struct ConsumeArgs {
    /// Topic to read.
    topic: String,
    /// Read only this partition (default: all).
    #[arg(long)]
    partition: Option<u32>,
    /// Where to start: beginning, latest, an offset, an RFC 3339 time
    /// (2026-01-02T03:04:05Z) or a duration ago (10m, 2h).
    #[arg(long, default_value = "beginning")]
    from: String,
    /// Keep waiting for new records (Ctrl-C to stop).
    #[arg(long)]
    follow: bool,
    /// Stop after this many records (per partition).
    #[arg(long)]
    limit: Option<u64>,
    #[command(flatten)]
    api: ApiArgs,
}

/// Entry point of the `shoal` binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("shoal-worker")
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Up(args) => up(args).await,
            Command::Topic { command, api } => client::topic(&api.url, command).await,
            Command::Consume(args) => client::consume(args).await,
            Command::Consumer {
                command,
                api,
                token,
            } => client::consumer(&api.url, token.as_deref(), command).await,
            Command::Cluster { api } => client::cluster(&api.url).await,
            Command::Alerts {
                follow,
                from,
                consumer,
                api,
            } => client::alerts(&api.url, follow, from, consumer).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // `shoal consume ... | head`: the reader went away; that is not an error.
        Err(e)
            if e.chain().any(|c| {
                c.downcast_ref::<std::io::Error>()
                    .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            }) =>
        {
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Builds the node configuration from defaults, the file, and flags/variables.
fn build_config(args: &UpArgs) -> anyhow::Result<Config> {
    let mut config = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| anyhow::anyhow!("cannot read config file {}: {e}", path.display()))?;
            Config::from_toml(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?
        }
        None => Config::default(),
    };
    if let Some(v) = &args.node_id {
        config.node_id = Some(v.clone());
    }
    if let Some(v) = &args.data_dir {
        config.data_dir = v.clone();
    }
    if let Some(v) = args.mqtt_addr {
        config.mqtt_addr = v;
    }
    if let Some(v) = args.http_addr {
        config.http_addr = v;
    }
    if let Some(v) = args.peer_addr {
        config.peer_addr = v;
    }
    if let Some(v) = args.gossip_addr {
        config.gossip_addr = v;
    }
    if let Some(t) = &args.api_token {
        config.api_token = Some(t.clone());
    }
    if !args.seeds.is_empty() {
        config.seeds = args.seeds.clone();
    }
    if let Some(v) = &args.cluster_id {
        config.cluster.cluster_id = v.clone();
    }
    if let Some(v) = &args.advertise_host {
        config.cluster.advertise_host = Some(v.clone());
    }
    Ok(config)
}

async fn up(args: UpArgs) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_new(&args.log)
        .map_err(|e| anyhow::anyhow!("--log {:?}: {e}", args.log))?;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let config = build_config(&args)?;
    let node = crate::node::Node::start(config).await?;
    wait_for_signal().await?;
    tracing::info!("shutting down: finishing in-flight commits");
    node.shutdown().await;
    Ok(())
}

async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}
