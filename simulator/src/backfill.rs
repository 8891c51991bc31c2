//! `shoal-sim backfill FILE --url URL`: loads history through the node's bulk ingest API
//! with the readings' original event times, fast (large chunks, several in flight) and
//! idempotent: every line carries a producer id (derived from the file's content, one per
//! device) and the reading's index within its device as sequence number, and the node skips
//! any (producer, sequence) it has already stored. A device's readings go in order through
//! one lane, so each producer's sequences arrive contiguously and the node keeps one range
//! per producer. So a re-run, or a run resumed after an interruption, never duplicates a
//! record. A small state file remembers which chunks were acknowledged, so a resumed run
//! does not even resend them.
//!
//! Order: requests run in parallel lanes, and every device's readings stay in one lane, sent
//! chunk after chunk, so each sensor's records reach the log in file (event-time) order;
//! consumers that look at event-time gaps or rates see the history as it happened.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use clap::Args;
use serde::{Deserialize, Serialize};

use crate::dataset::{self, Reading};

#[derive(Args, Debug, Clone)]
pub struct BackfillArgs {
    /// Data file: the generator's CSV or JSON lines, or a SKAB CSV.
    pub file: PathBuf,
    /// The node's HTTP API.
    #[arg(long, env = "SHOAL_URL", default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// Topic to load into (must exist).
    #[arg(long, default_value = "telemetry")]
    pub topic: String,
    /// Producer id for idempotency; default: derived from the file's content.
    #[arg(long)]
    pub producer: Option<String>,
    /// Readings per request.
    #[arg(long, default_value_t = 20_000)]
    pub chunk: usize,
    /// Requests in flight (lanes; a device's readings stay in one lane, in order).
    #[arg(long, default_value_t = 4)]
    pub parallel: usize,
    /// Where progress is kept for resuming; default FILE.backfill.json. `--state none`
    /// keeps none (the node still drops duplicates).
    #[arg(long)]
    pub state: Option<String>,
    /// Print the summary as one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// Progress of one backfill, for resuming.
#[derive(Debug, Default, Serialize, Deserialize, PartialEq)]
struct State {
    producer: String,
    /// Hash of the file's content: a state file never applies to another file.
    content: String,
    topic: String,
    chunk: usize,
    lanes: usize,
    /// `(lane, chunk)` pairs acknowledged.
    done: BTreeSet<(usize, usize)>,
}

/// Appends the ingest line of one reading to `out`. Device and sensor names are checked
/// by the dataset reader (no quotes or control characters), so only the producer needs
/// escaping, once, by the caller.
fn push_line(out: &mut String, r: &Reading, producer_json: &str, sequence: u64) {
    use std::fmt::Write;
    let subject = dataset::subject(&r.device, &r.sensor);
    let _ = writeln!(
        out,
        r#"{{"subject":{},"payload":{},"event_time":{},"producer":{producer_json},"sequence":{sequence}}}"#,
        serde_json::Value::from(subject),
        serde_json::Value::from(r.value),
        r.ts_ms,
    );
}

/// A producer id that is the same for the same file content and topic.
fn producer_for(bytes: &[u8], topic: &str) -> String {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(bytes);
    h.update(topic.as_bytes());
    format!("backfill-{:016x}", h.digest())
}

pub fn main(args: BackfillArgs) -> Result<()> {
    if args.chunk == 0 || args.parallel == 0 {
        bail!("--chunk and --parallel must be at least 1");
    }
    let bytes =
        std::fs::read(&args.file).with_context(|| format!("reading {}", args.file.display()))?;
    let readings = dataset::read_readings(&args.file)?;
    let content = producer_for(&bytes, "");
    let producer = args
        .producer
        .clone()
        .unwrap_or_else(|| producer_for(&bytes, &args.topic));
    let state_path = match args.state.as_deref() {
        Some("none") => None,
        Some(p) => Some(PathBuf::from(p)),
        None => Some(PathBuf::from(format!(
            "{}.backfill.json",
            args.file.display()
        ))),
    };
    let mut state = state_path
        .as_ref()
        .and_then(|p| std::fs::read(p).ok())
        .and_then(|b| serde_json::from_slice::<State>(&b).ok())
        .filter(|s| {
            s.producer == producer
                && s.content == content
                && s.topic == args.topic
                && s.chunk == args.chunk
                && s.lanes == args.parallel
        })
        .unwrap_or_else(|| State {
            producer: producer.clone(),
            content: content.clone(),
            topic: args.topic.clone(),
            chunk: args.chunk,
            lanes: args.parallel,
            done: BTreeSet::new(),
        });
    // Devices to lanes, round robin over the sorted device names (deterministic).
    let mut devices: Vec<&str> = readings.iter().map(|r| r.device.as_str()).collect();
    devices.sort_unstable();
    devices.dedup();
    let lane_of: std::collections::HashMap<&str, usize> = devices
        .iter()
        .enumerate()
        .map(|(i, d)| (*d, i % args.parallel))
        .collect();
    let mut lanes: Vec<Vec<usize>> = vec![Vec::new(); args.parallel];
    // Sequence of each reading within its device (file order).
    let mut per_device: std::collections::HashMap<&str, u64> = std::collections::HashMap::new();
    let mut seq_of = Vec::with_capacity(readings.len());
    for (i, r) in readings.iter().enumerate() {
        lanes[lane_of[r.device.as_str()]].push(i);
        let n = per_device.entry(r.device.as_str()).or_default();
        seq_of.push(*n);
        *n += 1;
    }
    let already: usize = state
        .done
        .iter()
        .map(|&(l, c)| {
            lanes.get(l).map_or(0, |v| {
                v.len().saturating_sub(c * args.chunk).min(args.chunk)
            })
        })
        .sum();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let started = Instant::now();
    let progress = crate::progress::bar(readings.len() as u64, "backfill");
    progress.inc(already as u64);
    let (mut accepted, mut duplicates) = (0u64, 0u64);
    let result: Result<()> = rt.block_on(async {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(120))
            .build()?;
        let url = format!(
            "{}/v1/topics/{}/records",
            args.url.trim_end_matches('/'),
            args.topic
        );
        let probe = client
            .get(format!(
                "{}/v1/topics/{}",
                args.url.trim_end_matches('/'),
                args.topic
            ))
            .send()
            .await
            .with_context(|| format!("cannot reach {}", args.url))?;
        if !probe.status().is_success() {
            bail!(
                "topic {:?} is not available on {}: HTTP {}",
                args.topic,
                args.url,
                probe.status()
            );
        }
        let readings = &readings;
        let state_cell = std::sync::Mutex::new(&mut state);
        let totals = std::sync::Mutex::new((0u64, 0u64));
        let last_save = std::sync::Mutex::new(Instant::now());
        let (state_ref, totals_ref, save_ref, progress_ref) =
            (&state_cell, &totals, &last_save, &progress);
        let lanes_ref = &lanes;
        let seq_ref = &seq_of;
        let state_path_ref = &state_path;
        let lane_runs = (0..lanes.len()).map(|l| {
            let (client, url, producer) = (client.clone(), url.clone(), producer.clone());
            async move {
                let mut producer_json: std::collections::HashMap<&str, String> = Default::default();
                let idx = &lanes_ref[l];
                for c in 0..idx.len().div_ceil(args.chunk) {
                    let skip = state_ref
                        .lock()
                        .map(|s| s.done.contains(&(l, c)))
                        .unwrap_or(false);
                    if skip {
                        continue;
                    }
                    let part = &idx[c * args.chunk..((c + 1) * args.chunk).min(idx.len())];
                    let mut body = String::with_capacity(part.len() * 128);
                    for &i in part {
                        let r = &readings[i];
                        let pj = producer_json.entry(r.device.as_str()).or_insert_with(|| {
                            let id = format!(
                                "{producer}-{:08x}",
                                xxhash_rust::xxh3::xxh3_64(r.device.as_bytes()) as u32
                            );
                            serde_json::Value::from(id).to_string()
                        });
                        push_line(&mut body, r, pj, seq_ref[i]);
                    }
                    let (a, d) = send_chunk(&client, &url, body, l, c).await?;
                    progress_ref.inc(part.len() as u64);
                    if let Ok(mut t) = totals_ref.lock() {
                        t.0 += a;
                        t.1 += d;
                    }
                    if let Ok(mut s) = state_ref.lock() {
                        s.done.insert((l, c));
                        let mut last = save_ref.lock().map_err(|_| anyhow!("lock"))?;
                        if last.elapsed() > Duration::from_millis(500) {
                            save(state_path_ref, &s)?;
                            *last = Instant::now();
                        }
                    }
                }
                Ok::<_, anyhow::Error>(())
            }
        });
        let results = futures::future::join_all(lane_runs).await;
        if let Ok(t) = totals.lock() {
            accepted = t.0;
            duplicates = t.1;
        }
        for r in results {
            r?;
        }
        Ok(())
    });
    save(&state_path, &state)?;
    progress.finish_and_clear();
    result?;
    let secs = started.elapsed().as_secs_f64().max(1e-9);
    let rate = (accepted + duplicates) as f64 / secs;
    if args.json {
        println!(
            "{}",
            serde_json::json!({"readings": readings.len(), "accepted": accepted, "duplicates": duplicates,
                "elapsed_s": secs, "records_per_s": rate, "producer": producer, "topic": args.topic})
        );
    } else {
        println!(
            "backfilled {} readings into {} in {secs:.2} s ({rate:.0} records/s): {accepted} new, {duplicates} already there (producer {producer})",
            readings.len(),
            args.topic
        );
    }
    Ok(())
}

/// Posts one chunk, retrying transient failures; returns (accepted, duplicates).
async fn send_chunk(
    client: &reqwest::Client,
    url: &str,
    body: String,
    lane: usize,
    c: usize,
) -> Result<(u64, u64)> {
    let mut tries = 0;
    loop {
        tries += 1;
        let sent = client.post(url).body(body.clone()).send().await;
        match sent {
            Ok(resp) if resp.status().is_success() => {
                let v: serde_json::Value = resp.json().await?;
                return Ok((
                    v["accepted"].as_u64().unwrap_or(0),
                    v["duplicates"].as_u64().unwrap_or(0),
                ));
            }
            Ok(resp) if resp.status().is_client_error() => {
                let text = resp.text().await.unwrap_or_default();
                bail!("the node refused chunk {lane}:{c}: {text}");
            }
            other if tries < 5 => {
                let why = match other {
                    Ok(r) => format!("HTTP {}", r.status()),
                    Err(e) => e.to_string(),
                };
                eprintln!("shoal-sim: chunk {lane}:{c} failed ({why}); retrying");
                tokio::time::sleep(Duration::from_millis(200 << tries)).await;
            }
            Ok(resp) => bail!("chunk {lane}:{c} failed: HTTP {}", resp.status()),
            Err(e) => return Err(anyhow!("chunk {lane}:{c} failed: {e}")),
        }
    }
}

fn save(path: &Option<PathBuf>, state: &State) -> Result<()> {
    if let Some(p) = path {
        let tmp = p.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec(state)?)?;
        std::fs::rename(&tmp, p).with_context(|| format!("saving {}", p.display()))?;
    }
    Ok(())
}
