//! `shoal-sim score`: compares alerts with anomaly labels and reports precision, recall,
//! F1 and detection delay, overall and per anomaly kind.
//!
//! Labels come from `generate`'s labels file, a SKAB CSV file or a directory of them (see
//! [`crate::dataset`]). Alerts come from a JSON lines file (items of the node's
//! `GET /v1/alerts`, or whole pages of it) or straight from a node (`--url`), optionally only
//! one consumer's; they are deduplicated by `id`.
//!
//! An alert on subject `sensors/{device}/{sensor}` at event time `t` matches a label when
//! the device is the same, the sensor is the same (or the label covers every sensor), and
//! `start <= t <= end + tolerance`. Precision = alerts matching some label / alerts;
//! recall = labels with a matching alert / labels; delay = first matching alert - start.
//! Per kind, precision = alerts matching a label of that kind / (those + alerts matching no
//! label at all). Percentiles are nearest-rank.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use clap::Args;
use serde_json::{Value, json};

use crate::dataset::{self, Format, Label};

/// Alerts asked for per page from a node.
const PAGE: usize = 10_000;

/// Flags of `shoal-sim score`.
#[derive(Args, Debug, Clone)]
pub struct ScoreArgs {
    /// Anomaly labels: a labels file from `generate` (JSON lines), a SKAB CSV file, or a
    /// directory searched for SKAB CSV files.
    #[arg(long)]
    pub labels: PathBuf,
    /// Alerts as JSON lines (items of `GET /v1/alerts`, or whole pages of it).
    #[arg(long, required_unless_present = "url", conflicts_with = "url")]
    pub alerts: Option<PathBuf>,
    /// Read the alerts from this node's HTTP API instead, e.g. http://127.0.0.1:8080.
    #[arg(long)]
    pub url: Option<String>,
    /// Only alerts raised by this consumer.
    #[arg(long)]
    pub consumer: Option<String>,
    /// How long after a label's end an alert still counts as detecting it.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub tolerance: Duration,
    /// Score only these anomaly kinds (comma-separated, e.g. spike,stuck,dropout). Alerts
    /// that fall on anomalies of other kinds are then left out instead of counted as false.
    #[arg(long, value_delimiter = ',')]
    pub kinds: Vec<String>,
    /// Also score point by point, as SKAB's leaderboard does: every reading time in this
    /// data (a file, or a directory of SKAB CSVs) is a point, anomalous when inside a label
    /// window, and flagged when an alert has that device and event time.
    #[arg(long)]
    pub points: Option<PathBuf>,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
}

/// Point-wise precision, recall and F1 over every (device, time) of a data set.
pub fn pointwise(data: &Path, labels: &[Label], alerts: &[Alert]) -> Result<Value> {
    let mut files = Vec::new();
    if data.is_dir() {
        collect_csv(data, &mut files)?;
    } else {
        files.push(data.to_path_buf());
    }
    let mut points: BTreeSet<(String, u64)> = BTreeSet::new();
    for f in &files {
        for r in dataset::read_readings(f)? {
            points.insert((r.device, r.ts_ms));
        }
    }
    let flagged: HashSet<(String, u64)> = alerts
        .iter()
        .filter_map(|a| dataset::parse_subject(&a.subject).map(|(d, _)| (d, a.event_time)))
        .collect();
    let mut by_device: HashMap<&str, Vec<&Label>> = HashMap::new();
    for l in labels {
        by_device.entry(l.device.as_str()).or_default().push(l);
    }
    let (mut tp, mut fp, mut fne, mut anomalous) = (0u64, 0u64, 0u64, 0u64);
    for (device, ts) in &points {
        let truth = by_device
            .get(device.as_str())
            .is_some_and(|ls| ls.iter().any(|l| *ts >= l.start_ms && *ts <= l.end_ms));
        let pred = flagged.contains(&(device.clone(), *ts));
        anomalous += u64::from(truth);
        match (truth, pred) {
            (true, true) => tp += 1,
            (false, true) => fp += 1,
            (true, false) => fne += 1,
            (false, false) => {}
        }
    }
    let precision = ratio(tp as usize, (tp + fp) as usize);
    let recall = ratio(tp as usize, (tp + fne) as usize);
    let f1 = match (precision, recall) {
        (Some(p), Some(r)) if p + r > 0.0 => Some(2.0 * p * r / (p + r)),
        _ => None,
    };
    Ok(serde_json::json!({
        "points": points.len(), "anomalous": anomalous, "flagged": tp + fp,
        "precision": precision, "recall": recall, "f1": f1,
    }))
}

/// Whether alert `a` falls on label `l`.
fn on_label(a: &Alert, l: &Label, tolerance_ms: u64) -> bool {
    let Some((device, sensor)) = dataset::parse_subject(&a.subject) else {
        return false;
    };
    device == l.device
        && l.sensor.as_deref().is_none_or(|s| s == sensor)
        && a.event_time >= l.start_ms
        && a.event_time <= l.end_ms.saturating_add(tolerance_ms)
}

/// Entry point of `shoal-sim score`.
pub fn main(args: ScoreArgs) -> Result<()> {
    let labels = load_labels(&args.labels)?;
    let raw = match (&args.alerts, &args.url) {
        (Some(path), _) => read_alerts_file(path)?,
        (None, Some(url)) => fetch_alerts(url, args.consumer.as_deref())?,
        (None, None) => bail!("give --alerts FILE or --url URL"),
    };
    let tolerance_ms = u64::try_from(args.tolerance.as_millis()).unwrap_or(u64::MAX);
    let (labels, raw) = if args.kinds.is_empty() {
        (labels, raw)
    } else {
        let (kept, other): (Vec<Label>, Vec<Label>) = labels
            .into_iter()
            .partition(|l| args.kinds.contains(&l.kind));
        let raw = raw
            .into_iter()
            .filter(|a| {
                kept.iter().any(|l| on_label(a, l, tolerance_ms))
                    || !other.iter().any(|l| on_label(a, l, tolerance_ms))
            })
            .collect();
        (kept, raw)
    };
    let points = match &args.points {
        Some(data) => {
            let filtered: Vec<Alert> = raw
                .iter()
                .filter(|a| {
                    args.consumer
                        .as_deref()
                        .is_none_or(|c| a.consumer.as_deref() == Some(c))
                })
                .cloned()
                .collect();
            Some(pointwise(data, &labels, &filtered)?)
        }
        None => None,
    };
    let report = score(&labels, raw, args.consumer.as_deref(), tolerance_ms);
    if args.json {
        let mut v = report.to_json();
        if let Some(p) = points {
            v["pointwise"] = p;
        }
        println!("{v}");
    } else {
        print!("{}", report.to_text());
        if let Some(p) = points {
            let f = |k: &str| p[k].as_f64().map_or("-".to_string(), |x| format!("{x:.3}"));
            println!(
                "point-wise over {} points ({} anomalous, {} flagged): precision {}, recall {}, F1 {}",
                p["points"],
                p["anomalous"],
                p["flagged"],
                f("precision"),
                f("recall"),
                f("f1")
            );
        }
    }
    Ok(())
}

/// One alert, as far as scoring cares.
#[derive(Debug, Clone, PartialEq)]
pub struct Alert {
    pub id: Option<String>,
    pub consumer: Option<String>,
    pub subject: String,
    pub event_time: u64,
}

impl Alert {
    fn from_json(v: &Value) -> Result<Alert, String> {
        let Value::Object(m) = v else {
            return Err("an alert must be a JSON object".into());
        };
        let text = |k: &str| match m.get(k) {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(other) => Some(other.to_string()),
        };
        let subject = match m.get("subject") {
            Some(Value::String(s)) => s.clone(),
            _ => return Err("alert has no string field \"subject\"".into()),
        };
        let event_time = m
            .get("event_time")
            .and_then(Value::as_u64)
            .ok_or("alert has no field \"event_time\" with Unix milliseconds")?;
        Ok(Alert {
            id: text("id"),
            consumer: text("consumer"),
            subject,
            event_time,
        })
    }
}

/// Labels from our labels file, a SKAB file, or every SKAB `.csv` under a directory.
pub fn load_labels(path: &Path) -> Result<Vec<Label>> {
    if path.is_dir() {
        let mut files = Vec::new();
        collect_csv(path, &mut files)?;
        if files.is_empty() {
            bail!("{}: no .csv files in this directory", path.display());
        }
        let mut labels = Vec::new();
        for f in files {
            labels.extend(dataset::skab_labels(&f)?);
        }
        return Ok(labels);
    }
    let first = std::fs::read(path)
        .with_context(|| format!("cannot read {}", path.display()))
        .map(|b| {
            let start = b.iter().position(|c| !c.is_ascii_whitespace());
            start.map(|i| b[i])
        })?;
    match first {
        None => Ok(Vec::new()),
        Some(b'{') => dataset::read_labels(path),
        Some(_) if dataset::detect_format(path)? == Format::Skab => dataset::skab_labels(path),
        Some(_) => bail!(
            "{}: not a labels file (JSON lines) nor a SKAB CSV file",
            path.display()
        ),
    }
}

fn collect_csv(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot list {}", dir.display()))?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<_>>()
        .with_context(|| format!("cannot list {}", dir.display()))?;
    entries.sort();
    for p in entries {
        if p.is_dir() {
            collect_csv(&p, out)?;
        } else if p.extension().is_some_and(|e| e.eq_ignore_ascii_case("csv")) {
            out.push(p);
        }
    }
    Ok(())
}

/// Alerts from a JSON lines file: each line an alert, or a page `{"alerts":[...],...}`.
pub fn read_alerts_file(path: &Path) -> Result<Vec<Alert>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let at = |e: String| anyhow!("{}: line {n}: {e}", path.display());
        let v: Value = serde_json::from_str(line).map_err(|e| at(format!("not JSON ({e})")))?;
        match v.get("alerts") {
            Some(Value::Array(items)) if v.get("subject").is_none() => {
                for item in items {
                    out.push(Alert::from_json(item).map_err(at)?);
                }
            }
            _ => out.push(Alert::from_json(&v).map_err(at)?),
        }
    }
    Ok(out)
}

/// Every alert of a node, paging through `GET {url}/v1/alerts` until a page is empty.
pub fn fetch_alerts(url: &str, consumer: Option<&str>) -> Result<Vec<Alert>> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    runtime.block_on(fetch_alerts_async(url, consumer))
}

async fn fetch_alerts_async(url: &str, consumer: Option<&str>) -> Result<Vec<Alert>> {
    let base = url.trim_end_matches('/');
    let endpoint = format!("{base}/v1/alerts");
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .context("cannot build the HTTP client")?;
    let mut out = Vec::new();
    let mut from: u64 = 0;
    loop {
        let mut query = vec![("from", from.to_string()), ("limit", PAGE.to_string())];
        if let Some(c) = consumer {
            query.push(("consumer", c.to_string()));
        }
        let resp = client
            .get(&endpoint)
            .query(&query)
            .send()
            .await
            .with_context(|| format!("cannot reach {endpoint}"))?;
        let status = resp.status();
        let body = resp
            .text()
            .await
            .with_context(|| format!("cannot read the answer of {endpoint}"))?;
        if !status.is_success() {
            let snippet: String = body.chars().take(500).collect();
            bail!("GET {endpoint}?from={from}: {status}: {snippet}");
        }
        let page: Value = serde_json::from_str(&body)
            .with_context(|| format!("GET {endpoint}?from={from}: the answer is not JSON"))?;
        let Some(Value::Array(items)) = page.get("alerts") else {
            bail!("GET {endpoint}?from={from}: the answer has no \"alerts\" array");
        };
        if items.is_empty() {
            break;
        }
        for (i, item) in items.iter().enumerate() {
            out.push(
                Alert::from_json(item)
                    .map_err(|e| anyhow!("GET {endpoint}?from={from}: alert {i}: {e}"))?,
            );
        }
        let next = page.get("next").and_then(Value::as_u64).ok_or_else(|| {
            anyhow!("GET {endpoint}?from={from}: the answer has no \"next\" offset")
        })?;
        if next <= from {
            bail!("GET {endpoint}?from={from}: \"next\" ({next}) does not move forward");
        }
        from = next;
    }
    Ok(out)
}

/// Counts of one group of labels (all of them, or one kind).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Group {
    pub labels: usize,
    pub detected: usize,
    /// Alerts matching at least one label of the group.
    pub matched_alerts: usize,
    /// Detection delay (ms) of every detected label, sorted.
    pub delays_ms: Vec<u64>,
    /// False alerts charged to the group (see `Report::scores`).
    pub false_alerts: Option<usize>,
}

/// The outcome of scoring.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    /// Alerts scored (after the consumer filter and deduplication).
    pub alerts: usize,
    /// Alerts dropped as repeats of an id.
    pub duplicates: usize,
    /// Alerts whose subject is not `sensors/{device}/{sensor}` (counted as unmatched).
    pub foreign_subjects: usize,
    /// Alerts matching no label.
    pub unmatched: usize,
    pub tolerance_ms: u64,
    pub overall: Group,
    pub kinds: BTreeMap<String, Group>,
}

/// Scores `alerts` against `labels` (see the module doc for the rules).
pub fn score(
    labels: &[Label],
    alerts: Vec<Alert>,
    consumer: Option<&str>,
    tolerance_ms: u64,
) -> Report {
    let mut seen = HashSet::new();
    let mut duplicates = 0;
    let alerts: Vec<Alert> = alerts
        .into_iter()
        .filter(|a| consumer.is_none_or(|c| a.consumer.as_deref() == Some(c)))
        .filter(|a| match &a.id {
            Some(id) if !seen.insert(id.clone()) => {
                duplicates += 1;
                false
            }
            _ => true,
        })
        .collect();

    let mut by_device: HashMap<&str, Vec<usize>> = HashMap::new();
    for (i, l) in labels.iter().enumerate() {
        by_device.entry(l.device.as_str()).or_default().push(i);
    }
    let mut first: Vec<Option<u64>> = vec![None; labels.len()];
    let mut overall = Group::default();
    let mut kinds: BTreeMap<String, Group> = BTreeMap::new();
    for l in labels {
        kinds.entry(l.kind.clone()).or_default().labels += 1;
    }
    overall.labels = labels.len();
    let mut foreign = 0;
    let mut unmatched = 0;
    // Which consumers found each kind, and each consumer's false alerts: a kind's precision
    // counts the false alerts of the detectors that find it, not everyone's.
    let mut kind_consumers: HashMap<String, BTreeSet<Option<String>>> = HashMap::new();
    let mut false_by_consumer: HashMap<Option<String>, usize> = HashMap::new();
    for a in &alerts {
        let Some((device, sensor)) = dataset::parse_subject(&a.subject) else {
            foreign += 1;
            unmatched += 1;
            *false_by_consumer.entry(a.consumer.clone()).or_default() += 1;
            continue;
        };
        let mut matched_kinds: BTreeSet<&str> = BTreeSet::new();
        for &i in by_device.get(device.as_str()).into_iter().flatten() {
            let l = &labels[i];
            let sensor_ok = l.sensor.as_deref().is_none_or(|s| s == sensor);
            let time_ok =
                a.event_time >= l.start_ms && a.event_time <= l.end_ms.saturating_add(tolerance_ms);
            if sensor_ok && time_ok {
                matched_kinds.insert(&l.kind);
                first[i] = Some(first[i].map_or(a.event_time, |f| f.min(a.event_time)));
            }
        }
        if matched_kinds.is_empty() {
            unmatched += 1;
            *false_by_consumer.entry(a.consumer.clone()).or_default() += 1;
        } else {
            overall.matched_alerts += 1;
            for k in matched_kinds {
                if let Some(g) = kinds.get_mut(k) {
                    g.matched_alerts += 1;
                }
                kind_consumers
                    .entry(k.to_string())
                    .or_default()
                    .insert(a.consumer.clone());
            }
        }
    }
    for (l, f) in labels.iter().zip(&first) {
        if let Some(t) = f {
            let delay = t - l.start_ms;
            overall.detected += 1;
            overall.delays_ms.push(delay);
            if let Some(g) = kinds.get_mut(&l.kind) {
                g.detected += 1;
                g.delays_ms.push(delay);
            }
        }
    }
    overall.delays_ms.sort_unstable();
    overall.false_alerts = Some(unmatched);
    for (k, g) in kinds.iter_mut() {
        g.delays_ms.sort_unstable();
        g.false_alerts = Some(kind_consumers.get(k).map_or(0, |cs| {
            cs.iter()
                .map(|c| false_by_consumer.get(c).copied().unwrap_or(0))
                .sum()
        }));
    }
    Report {
        alerts: alerts.len(),
        duplicates,
        foreign_subjects: foreign,
        unmatched,
        tolerance_ms,
        overall,
        kinds,
    }
}

fn ratio(num: usize, den: usize) -> Option<f64> {
    (den > 0).then(|| num as f64 / den as f64)
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[u64], p: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// Precision, recall and F1 of one group.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scores {
    pub precision: Option<f64>,
    pub recall: Option<f64>,
    pub f1: Option<f64>,
}

impl Report {
    /// Scores of a group: its false alerts (overall: every unmatched alert; per kind: those
    /// of the consumers that detected that kind) are added to its alerts for precision.
    pub fn scores(&self, g: &Group) -> Scores {
        let false_alerts = g.false_alerts.unwrap_or(self.unmatched);
        let precision = ratio(g.matched_alerts, g.matched_alerts + false_alerts);
        let recall = ratio(g.detected, g.labels);
        let f1 = match (precision, recall) {
            (Some(p), Some(r)) if p + r > 0.0 => Some(2.0 * p * r / (p + r)),
            (Some(_), Some(_)) => Some(0.0),
            // Nothing detected: F1 is 0 even when no alert was charged to the group.
            (None, Some(0.0)) => Some(0.0),
            _ => None,
        };
        Scores {
            precision,
            recall,
            f1,
        }
    }

    fn group_json(&self, g: &Group) -> Value {
        let s = self.scores(g);
        json!({
            "labels": g.labels,
            "detected": g.detected,
            "matched_alerts": g.matched_alerts,
            "precision": s.precision,
            "recall": s.recall,
            "f1": s.f1,
            "delay_ms_p50": percentile(&g.delays_ms, 0.5),
            "delay_ms_p90": percentile(&g.delays_ms, 0.9),
        })
    }

    /// One JSON object with every figure.
    pub fn to_json(&self) -> Value {
        let kinds: serde_json::Map<String, Value> = self
            .kinds
            .iter()
            .map(|(k, g)| (k.clone(), self.group_json(g)))
            .collect();
        json!({
            "alerts": self.alerts,
            "duplicates": self.duplicates,
            "unmatched_alerts": self.unmatched,
            "foreign_subjects": self.foreign_subjects,
            "labels": self.overall.labels,
            "tolerance_ms": self.tolerance_ms,
            "overall": self.group_json(&self.overall),
            "kinds": kinds,
        })
    }

    /// A table for people.
    pub fn to_text(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "{} alerts ({} unmatched, {} duplicates dropped{}), {} labels, tolerance {}",
            self.alerts,
            self.unmatched,
            self.duplicates,
            if self.foreign_subjects > 0 {
                format!(
                    ", {} not on a sensors/DEVICE/SENSOR subject",
                    self.foreign_subjects
                )
            } else {
                String::new()
            },
            self.overall.labels,
            humantime::format_duration(Duration::from_millis(self.tolerance_ms)),
        );
        let _ = writeln!(
            s,
            "{:<14} {:>7} {:>8} {:>7} {:>7} {:>9} {:>6} {:>10} {:>10}",
            "kind",
            "labels",
            "detected",
            "recall",
            "matched",
            "precision",
            "f1",
            "delay p50",
            "delay p90"
        );
        let mut row = |name: &str, g: &Group| {
            let sc = self.scores(g);
            let num = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.3}"));
            let secs = |v: Option<u64>| {
                v.map_or("-".to_string(), |v| format!("{:.1}s", v as f64 / 1000.0))
            };
            let _ = writeln!(
                s,
                "{:<14} {:>7} {:>8} {:>7} {:>7} {:>9} {:>6} {:>10} {:>10}",
                name,
                g.labels,
                g.detected,
                num(sc.recall),
                g.matched_alerts,
                num(sc.precision),
                num(sc.f1),
                secs(percentile(&g.delays_ms, 0.5)),
                secs(percentile(&g.delays_ms, 0.9)),
            );
        };
        row("overall", &self.overall);
        for (k, g) in &self.kinds {
            row(k, g);
        }
        s
    }
}
