//! Tests of `shoal-sim generate`, run as a process: output is a pure function of the
//! arguments, CSV and JSON lines hold the same readings, and every label matches what the
//! data shows (a stuck window repeats one value, a dropout window has no rows, a spike
//! stands far from its neighbours, ...).

#![allow(clippy::unwrap_used)]

#[allow(dead_code)]
#[path = "../src/dataset.rs"]
mod dataset;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;

mod common;
use common::temp_dir;

fn generate(args: &[&str]) -> std::process::Output {
    let out = Command::new(env!("CARGO_BIN_EXE_shoal-sim"))
        .arg("generate")
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "generate {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn run(out: &Path, seed: &str, extra: &[&str]) {
    let mut args = vec![
        "--devices",
        "3",
        "--duration",
        "30m",
        "--seed",
        seed,
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    generate(&args);
}

#[test]
fn same_seed_same_bytes_other_seed_other_bytes() {
    let dir = temp_dir("determinism");
    let (a, b, c) = (dir.join("a.csv"), dir.join("b.csv"), dir.join("c.csv"));
    run(&a, "42", &["--anomalies-per-device-hour", "6"]);
    run(&b, "42", &["--anomalies-per-device-hour", "6"]);
    run(&c, "43", &["--anomalies-per-device-hour", "6"]);
    let read = |p: &Path| std::fs::read(p).unwrap();
    assert_eq!(read(&a), read(&b));
    assert_eq!(
        read(&dir.join("a.labels.jsonl")),
        read(&dir.join("b.labels.jsonl"))
    );
    assert!(!read(&dir.join("a.labels.jsonl")).is_empty());
    assert_ne!(read(&a), read(&c));
    assert_ne!(
        read(&dir.join("a.labels.jsonl")),
        read(&dir.join("c.labels.jsonl"))
    );
}

#[test]
fn csv_and_jsonl_hold_the_same_readings() {
    let dir = temp_dir("formats");
    let (csv, jsonl) = (dir.join("f.csv"), dir.join("f.jsonl"));
    let labels = dir.join("custom-labels.jsonl");
    run(&csv, "5", &[]);
    run(&jsonl, "5", &["--labels", labels.to_str().unwrap()]);
    let a = dataset::read_readings(&csv).unwrap();
    assert_eq!(a, dataset::read_readings(&jsonl).unwrap());
    assert_eq!(
        a.len(),
        3 * 5 * 1800 - missing(&dataset::read_labels(&labels).unwrap())
    );
    assert_eq!(
        std::fs::read(dir.join("f.labels.jsonl")).unwrap(),
        std::fs::read(&labels).unwrap()
    );
    let first = std::fs::read_to_string(&csv).unwrap();
    let mut lines = first.lines();
    assert_eq!(lines.next(), Some("timestamp,device,sensor,value"));
    let row = lines.next().unwrap();
    assert!(
        row.starts_with("2026-01-01T00:00:00.000Z,dev-0,temperature,"),
        "{row}"
    );
    let value = row.rsplit(',').next().unwrap();
    assert_eq!(
        value.split('.').nth(1).unwrap().len(),
        4,
        "4 decimals: {row}"
    );
}

/// Readings left out by dropout labels (1 s interval).
fn missing(labels: &[dataset::Label]) -> usize {
    labels
        .iter()
        .filter(|l| l.kind == "dropout")
        .map(|l| ((l.end_ms - l.start_ms) / 1000 + 1) as usize)
        .sum()
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len() as f64
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Noise sd estimated from first differences (robust: median absolute difference).
fn noise_sd(values: &[f64]) -> f64 {
    let diffs: Vec<f64> = values.windows(2).map(|w| (w[1] - w[0]).abs()).collect();
    // For Gaussian noise, median |x1 - x0| = 0.6745 * sqrt(2) * sd.
    median(diffs) / (0.6745 * 2f64.sqrt())
}

fn sd(values: &[f64]) -> f64 {
    let m = mean(values);
    (values.iter().map(|v| (v - m).powi(2)).sum::<f64>() / values.len() as f64).sqrt()
}

#[test]
fn labels_match_the_data() {
    let dir = temp_dir("labels");
    let out = dir.join("fleet.csv");
    generate(&[
        "--devices",
        "4",
        "--duration",
        "3h",
        "--seed",
        "7",
        "--anomalies-per-device-hour",
        "3",
        "--out",
        out.to_str().unwrap(),
    ]);
    let readings = dataset::read_readings(&out).unwrap();
    let labels = dataset::read_labels(&dir.join("fleet.labels.jsonl")).unwrap();
    let mut series: BTreeMap<(String, String), Vec<(u64, f64)>> = BTreeMap::new();
    for r in &readings {
        series
            .entry((r.device.clone(), r.sensor.clone()))
            .or_default()
            .push((r.ts_ms, r.value));
    }
    assert_eq!(series.len(), 4 * 5);
    let start = 1_767_225_600_000u64;
    let end = start + 3 * 3_600_000 - 1000;
    let kinds: BTreeSet<&str> = labels.iter().map(|l| l.kind.as_str()).collect();
    assert_eq!(
        kinds,
        BTreeSet::from([
            "drift",
            "dropout",
            "level_shift",
            "noise_burst",
            "spike",
            "stuck"
        ]),
        "every kind is drawn at this rate"
    );
    assert!(labels.len() >= 30, "{} labels", labels.len());

    let mut by_series: BTreeMap<(String, String), Vec<&dataset::Label>> = BTreeMap::new();
    for l in &labels {
        let sensor = l.sensor.clone().expect("generated labels name the sensor");
        assert!(l.start_ms >= start && l.end_ms <= end && l.start_ms <= l.end_ms);
        assert_eq!(l.start_ms % 1000, 0);
        by_series
            .entry((l.device.clone(), sensor))
            .or_default()
            .push(l);
    }
    for ls in by_series.values() {
        for w in ls.windows(2) {
            assert!(w[1].start_ms > w[0].end_ms, "overlap: {:?}", w);
        }
    }

    for l in &labels {
        let key = (l.device.clone(), l.sensor.clone().unwrap());
        let s = &series[&key];
        let at = |ts: u64| s.partition_point(|(t, _)| *t < ts);
        let (i0, i1) = (at(l.start_ms), at(l.end_ms + 1));
        let inside: Vec<f64> = s[i0..i1].iter().map(|(_, v)| *v).collect();
        let before: Vec<f64> = s[i0.saturating_sub(60)..i0]
            .iter()
            .map(|(_, v)| *v)
            .collect();
        let after: Vec<f64> = s[i1..(i1 + 10).min(s.len())]
            .iter()
            .map(|(_, v)| *v)
            .collect();
        let sigma = noise_sd(&before);
        let what = format!("{l:?}");
        if l.kind == "dropout" {
            assert!(inside.is_empty(), "{what}: rows inside a dropout");
            assert_eq!(
                s[i0 - 1].0,
                l.start_ms - 1000,
                "{what}: gap starts at the label"
            );
            if l.end_ms < end {
                assert_eq!(s[i1].0, l.end_ms + 1000, "{what}: gap ends at the label");
            }
            continue;
        }
        assert_eq!(
            inside.len() as u64,
            (l.end_ms - l.start_ms) / 1000 + 1,
            "{what}: one reading per second inside"
        );
        assert_eq!(
            s[i0 - 1].0,
            l.start_ms - 1000,
            "{what}: normal reading before"
        );
        match l.kind.as_str() {
            "stuck" => {
                assert!(inside.len() >= 2);
                assert!(inside.iter().all(|v| *v == inside[0]), "{what}: not frozen");
                if let Some(next) = after.first() {
                    assert_ne!(*next, inside[0], "{what}: still frozen after the label");
                }
            }
            "spike" => {
                let prev = *before.last().unwrap();
                let next = after.first().copied().unwrap_or(prev);
                for v in &inside {
                    let off = (v - (prev + next) / 2.0).abs();
                    assert!(
                        off > 5.0 * sigma,
                        "{what}: spike {v} only {off} from neighbours (sd {sigma})"
                    );
                }
            }
            "level_shift" => {
                let head = mean(&inside[..10]);
                let tail = mean(&inside[inside.len() - 10..]);
                let step_in = head - mean(&before[before.len() - 10..]);
                assert!(
                    step_in.abs() > 3.0 * sigma,
                    "{what}: step in {step_in} (sd {sigma})"
                );
                if after.len() == 10 {
                    let step_out = mean(&after) - tail;
                    assert!(step_out.abs() > 3.0 * sigma, "{what}: step out {step_out}");
                    assert!(step_in * step_out < 0.0, "{what}: shift does not end");
                }
            }
            "drift" => {
                let tail = mean(&inside[inside.len() - 10..]);
                if after.len() == 10 {
                    let back = mean(&after) - tail;
                    assert!(
                        back.abs() > 4.0 * sigma,
                        "{what}: drift ends with {back} (sd {sigma})"
                    );
                }
                let first_step = inside[0] - before[before.len() - 1];
                assert!(
                    first_step.abs() < 6.0 * sigma,
                    "{what}: drift starts gently"
                );
            }
            "noise_burst" => {
                let in_sd = sd(&inside.windows(2).map(|w| w[1] - w[0]).collect::<Vec<_>>());
                let out_sd = sd(&before.windows(2).map(|w| w[1] - w[0]).collect::<Vec<_>>());
                assert!(in_sd > 4.0 * out_sd, "{what}: noise {in_sd} vs {out_sd}");
            }
            other => panic!("unexpected kind {other}"),
        }
    }
}

#[test]
fn bad_arguments_are_errors() {
    let dir = temp_dir("bad");
    let out = dir.join("x.txt");
    let run = |args: &[&str]| {
        let o = Command::new(env!("CARGO_BIN_EXE_shoal-sim"))
            .arg("generate")
            .args(args)
            .output()
            .unwrap();
        assert!(!o.status.success(), "{args:?} should fail");
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    let o = out.to_str().unwrap();
    assert!(run(&["--out", o]).contains("--format"));
    assert!(run(&["--out", o, "--format", "csv", "--interval", "0s"]).contains("--interval"));
    assert!(
        run(&[
            "--out",
            o,
            "--format",
            "csv",
            "--start",
            "2026-01-01T99:00:00Z"
        ])
        .contains("bad timestamp")
    );
    assert!(run(&["--out", o, "--format", "csv", "--kinds", "spike,bogus"]).contains("bogus"));
}
