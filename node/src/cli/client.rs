//! HTTP client side of the CLI: topic commands and `consume`.

use super::out;
use std::io::Write;
use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::{Value, json};

use base64::Engine;

use super::{ConsumeArgs, ConsumerCommand, TopicCommand};

fn http() -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .build()?)
}

/// Sends a request and returns the JSON body, turning an error reply into its message.
async fn call(req: reqwest::RequestBuilder, url: &str) -> anyhow::Result<Value> {
    let resp = req.send().await.with_context(|| {
        format!("cannot reach the node at {url} (is `shoal up` running? set --url or SHOAL_URL)")
    })?;
    let status = resp.status();
    let body: Value = resp.json().await.with_context(|| {
        format!("the node at {url} answered {status} with a body that is not JSON")
    })?;
    if !status.is_success() {
        let msg = body["error"].as_str().unwrap_or("no message");
        bail!("{msg} (HTTP {status})");
    }
    Ok(body)
}

pub(super) async fn topic(url: &str, cmd: TopicCommand) -> anyhow::Result<()> {
    let c = http()?;
    let base = url.trim_end_matches('/');
    match cmd {
        TopicCommand::Create {
            name,
            partitions,
            replication_factor,
            acks,
            retention,
            retention_bytes,
        } => {
            let retention = if retention == "none" {
                Value::Null
            } else {
                json!(retention)
            };
            let body = json!({
                "name": name,
                "partitions": partitions,
                "replication_factor": replication_factor,
                "acks": acks,
                "retention": retention,
                "retention_bytes": retention_bytes,
            });
            let v = call(c.post(format!("{base}/v1/topics")).json(&body), base).await?;
            out!(
                "created topic {} with {} partitions",
                v["name"].as_str().unwrap_or(&name),
                v["partitions"]
            );
        }
        TopicCommand::List => {
            let v = call(c.get(format!("{base}/v1/topics")), base).await?;
            out!(
                "{:<24} {:>10} {:>4} {:>7}  RETENTION",
                "TOPIC",
                "PARTITIONS",
                "RF",
                "ACKS"
            );
            for t in v["topics"].as_array().into_iter().flatten() {
                let retention = t["retention_ms"]
                    .as_u64()
                    .map(|ms| humantime::format_duration(Duration::from_millis(ms)).to_string())
                    .unwrap_or_else(|| "forever".into());
                out!(
                    "{:<24} {:>10} {:>4} {:>7}  {}",
                    t["name"].as_str().unwrap_or("?"),
                    t["partitions"].as_u64().unwrap_or(0),
                    t["replication_factor"].as_u64().unwrap_or(0),
                    t["acks"].as_str().unwrap_or("?"),
                    retention
                );
            }
        }
        TopicCommand::Describe { name } => {
            let v = call(c.get(format!("{base}/v1/topics/{name}")), base).await?;
            out!("{}", serde_json::to_string_pretty(&v)?);
        }
    }
    Ok(())
}

/// Turns `--from` into the API's `from` parameter: durations mean "that long ago".
fn api_from(from: &str) -> anyhow::Result<String> {
    if matches!(from, "beginning" | "earliest" | "latest" | "end") || from.parse::<u64>().is_ok() {
        return Ok(from.to_string());
    }
    if humantime::parse_rfc3339_weak(from).is_ok() {
        return Ok(from.to_string());
    }
    if let Ok(ago) = humantime::parse_duration(from) {
        let ms = crate::types::now_ms().saturating_sub(ago.as_millis() as u64);
        return Ok(format!("time:{ms}"));
    }
    bail!(
        "--from {from:?}: use beginning, latest, an offset, an RFC 3339 time or a duration like 10m"
    )
}

pub(super) async fn consume(args: ConsumeArgs) -> anyhow::Result<()> {
    let c = http()?;
    let base = args.api.url.trim_end_matches('/').to_string();
    let topic = call(c.get(format!("{base}/v1/topics/{}", args.topic)), &base).await?;
    let partitions: Vec<u32> = match args.partition {
        Some(p) => vec![p],
        None => (0..topic["partitions"].as_u64().unwrap_or(0) as u32).collect(),
    };
    let from = api_from(&args.from)?;
    let mut tasks = tokio::task::JoinSet::new();
    for p in partitions {
        let (c, base, topic, from) = (c.clone(), base.clone(), args.topic.clone(), from.clone());
        let (follow, limit) = (args.follow, args.limit);
        tasks.spawn(async move { consume_partition(c, base, topic, p, from, follow, limit).await });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    Ok(())
}

async fn consume_partition(
    c: reqwest::Client,
    base: String,
    topic: String,
    partition: u32,
    from: String,
    follow: bool,
    limit: Option<u64>,
) -> anyhow::Result<()> {
    let mut from = from;
    let mut printed = 0u64;
    loop {
        let page = limit.map_or(1000, |l| (l - printed).min(1000));
        let wait = if follow { 30_000 } else { 0 };
        let url = format!("{base}/v1/topics/{topic}/partitions/{partition}/records");
        let v = call(
            c.get(&url).query(&[
                ("from", from.as_str()),
                ("limit", &page.to_string()),
                ("wait_ms", &wait.to_string()),
            ]),
            &base,
        )
        .await?;
        let records = v["records"].as_array().cloned().unwrap_or_default();
        {
            let stdout = std::io::stdout();
            let mut out = stdout.lock();
            for r in &records {
                writeln!(out, "{r}")?;
            }
            out.flush()?;
        }
        printed += records.len() as u64;
        from = v["next_offset"].as_u64().unwrap_or(0).to_string();
        if limit.is_some_and(|l| printed >= l) {
            return Ok(());
        }
        if records.is_empty() && !follow {
            return Ok(());
        }
    }
}

pub(super) async fn consumer(
    url: &str,
    token: Option<&str>,
    cmd: ConsumerCommand,
) -> anyhow::Result<()> {
    let c = http()?;
    let base = url.trim_end_matches('/');
    let auth = |r: reqwest::RequestBuilder| match token {
        Some(t) => r.bearer_auth(t),
        None => r,
    };
    match cmd {
        ConsumerCommand::Deploy {
            name,
            file,
            topic,
            filter,
            config,
            start,
            webhook,
        } => {
            let module = std::fs::read(&file)
                .with_context(|| format!("cannot read module {}", file.display()))?;
            let config: Value = match config {
                Some(p) => {
                    let text = std::fs::read_to_string(&p)
                        .with_context(|| format!("cannot read config {}", p.display()))?;
                    serde_json::from_str(&text)
                        .with_context(|| format!("{} is not JSON", p.display()))?
                }
                None => json!({}),
            };
            if !matches!(start.as_str(), "beginning" | "latest") {
                bail!("--start {start:?}: use beginning or latest");
            }
            let body = json!({
                "module_base64": base64::engine::general_purpose::STANDARD.encode(&module),
                "topic": topic,
                "filter": filter,
                "config": config,
                "start": start,
                "webhook": webhook,
            });
            let v = call(
                auth(c.put(format!("{base}/v1/consumers/{name}")).json(&body)),
                base,
            )
            .await?;
            out!(
                "deployed consumer {name} version {} on topic {} (filter {})",
                v["version"],
                v["topic"].as_str().unwrap_or("?"),
                v["filter"].as_str().unwrap_or("?")
            );
        }
        ConsumerCommand::List => {
            let v = call(c.get(format!("{base}/v1/consumers")), base).await?;
            out!(
                "{:<20} {:>7} {:<16} {:<10} {:>10} {:>8} {:>8}",
                "CONSUMER",
                "VERSION",
                "TOPIC",
                "STATE",
                "RECORDS",
                "ALERTS",
                "LAG"
            );
            for s in v["consumers"].as_array().into_iter().flatten() {
                let parts = s["partitions"].as_array().cloned().unwrap_or_default();
                let sum = |f: &str| {
                    parts
                        .iter()
                        .map(|p| p[f].as_u64().unwrap_or(0))
                        .sum::<u64>()
                };
                out!(
                    "{:<20} {:>7} {:<16} {:<10} {:>10} {:>8} {:>8}",
                    s["name"].as_str().unwrap_or("?"),
                    s["version"].as_u64().unwrap_or(0),
                    s["topic"].as_str().unwrap_or("?"),
                    s["state"].as_str().unwrap_or("?"),
                    sum("records_in"),
                    sum("alerts_out"),
                    sum("lag"),
                );
            }
        }
        ConsumerCommand::Status { name } => {
            let v = call(c.get(format!("{base}/v1/consumers/{name}")), base).await?;
            out!("{}", serde_json::to_string_pretty(&v)?);
        }
        ConsumerCommand::Remove { name } => {
            call(auth(c.delete(format!("{base}/v1/consumers/{name}"))), base).await?;
            out!("removed consumer {name}");
        }
    }
    Ok(())
}

pub(super) async fn alerts(
    url: &str,
    follow: bool,
    from: u64,
    consumer: Option<String>,
) -> anyhow::Result<()> {
    let c = http()?;
    let base = url.trim_end_matches('/');
    let mut next = from;
    loop {
        let mut q = vec![
            ("from", next.to_string()),
            ("limit", "1000".to_string()),
            ("wait_ms", if follow { "30000" } else { "0" }.to_string()),
        ];
        if let Some(cn) = &consumer {
            q.push(("consumer", cn.clone()));
        }
        let v = call(c.get(format!("{base}/v1/alerts")).query(&q), base).await?;
        let alerts = v["alerts"].as_array().cloned().unwrap_or_default();
        {
            let stdout = std::io::stdout();
            let mut out = stdout.lock();
            for a in &alerts {
                writeln!(out, "{a}")?;
            }
            out.flush()?;
        }
        let new_next = v["next"].as_u64().unwrap_or(next);
        let moved = new_next > next;
        next = new_next;
        if !follow && !moved {
            return Ok(());
        }
    }
}

pub(super) async fn cluster(url: &str) -> anyhow::Result<()> {
    let c = http()?;
    let base = url.trim_end_matches('/');
    let v = call(c.get(format!("{base}/v1/cluster")), base).await?;
    out!(
        "{:<20} {:<6} {:<17} {:<22} {:<22}",
        "NODE",
        "LIVE",
        "ORIGIN",
        "MQTT",
        "HTTP"
    );
    for m in v["members"].as_array().into_iter().flatten() {
        out!(
            "{:<20} {:<6} {:<17} {:<22} {:<22}",
            m["node_id"].as_str().unwrap_or("?"),
            if m["live"].as_bool().unwrap_or(false) {
                "yes"
            } else {
                "no"
            },
            m["origin"].as_str().unwrap_or("?"),
            m["mqtt_addr"].as_str().unwrap_or("?"),
            m["http_addr"].as_str().unwrap_or("?"),
        );
    }
    out!();
    out!(
        "{:<24} {:>9} {:<20} REPLICAS",
        "TOPIC",
        "PARTITION",
        "OWNER"
    );
    let mut under = 0;
    for p in v["partitions"].as_array().into_iter().flatten() {
        if p["under_replicated"].as_bool().unwrap_or(false) {
            under += 1;
        }
        let replicas: Vec<&str> = p["replicas"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|r| r.as_str())
            .collect();
        out!(
            "{:<24} {:>9} {:<20} {}",
            p["topic"].as_str().unwrap_or("?"),
            p["partition"].as_u64().unwrap_or(0),
            p["owner"].as_str().unwrap_or("-"),
            replicas.join(",")
        );
    }
    if under > 0 {
        out!(
            "\n{under} partitions have fewer live replicas than they should: a member is down \
             (anti-entropy re-replicates to the live nodes)"
        );
    }
    Ok(())
}
