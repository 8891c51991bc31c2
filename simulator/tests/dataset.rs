//! Tests of the simulator's data files module (`simulator/src/dataset.rs`, compiled in here):
//! CSV / JSON lines round trips, SKAB parsing and labels on small hand-written samples
//! (LF and CRLF), timestamps, subjects, and errors that name the line.

#![allow(clippy::unwrap_used)]

#[allow(dead_code)]
#[path = "../src/dataset.rs"]
mod dataset;

use std::path::Path;

use dataset::{Format, Label, Reading, ReadingWriter};

mod common;
use common::temp_dir;

fn write(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

fn reading(ts_ms: u64, device: &str, sensor: &str, value: f64) -> Reading {
    Reading {
        ts_ms,
        device: device.into(),
        sensor: sensor.into(),
        value,
    }
}

fn sample() -> Vec<Reading> {
    vec![
        reading(1_767_225_600_000, "dev-0", "temperature", 21.5),
        reading(1_767_225_600_000, "dev-0", "humidity", 0.1 + 0.2),
        reading(1_767_225_600_001, "dev-1", "temperature", -3.25e-7),
        reading(1_767_225_601_500, "dev-1", "pressure", 1_013.123_456_789),
        reading(1_767_225_602_000, "dev 2", "current", 0.0),
    ]
}

fn write_all(path: &Path, format: Format, readings: &[Reading]) {
    let file = std::fs::File::create(path).unwrap();
    let mut w = ReadingWriter::new(std::io::BufWriter::new(file), format).unwrap();
    for r in readings {
        w.write(r.ts_ms, &r.device, &r.sensor, r.value).unwrap();
    }
    w.finish().unwrap();
}

#[test]
fn csv_round_trip_is_exact() {
    let dir = temp_dir("csv-rt");
    let path = dir.join("fleet.csv");
    write_all(&path, Format::Csv, &sample());
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.starts_with(
        "timestamp,device,sensor,value\n2026-01-01T00:00:00.000Z,dev-0,temperature,21.5\n"
    ));
    assert!(text.contains("2026-01-01T00:00:01.500Z,dev-1,pressure,1013.123456789\n"));
    assert_eq!(dataset::detect_format(&path).unwrap(), Format::Csv);
    assert_eq!(dataset::read_readings(&path).unwrap(), sample());
}

#[test]
fn jsonl_round_trip_is_exact() {
    let dir = temp_dir("jsonl-rt");
    let path = dir.join("fleet.jsonl");
    write_all(&path, Format::JsonLines, &sample());
    let first = std::fs::read_to_string(&path).unwrap();
    assert!(first.starts_with(
        "{\"ts\":1767225600000,\"device\":\"dev-0\",\"sensor\":\"temperature\",\"value\":21.5}\n"
    ));
    assert_eq!(dataset::detect_format(&path).unwrap(), Format::JsonLines);
    assert_eq!(dataset::read_readings(&path).unwrap(), sample());
}

#[test]
fn fixed_decimals() {
    let dir = temp_dir("decimals");
    let path = dir.join("f.csv");
    let file = std::fs::File::create(&path).unwrap();
    let mut w = ReadingWriter::new(file, Format::Csv)
        .unwrap()
        .with_decimals(4);
    w.write(0, "d", "s", 1.5).unwrap();
    w.finish().unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    assert_eq!(
        text,
        "timestamp,device,sensor,value\n1970-01-01T00:00:00.000Z,d,s,1.5000\n"
    );
}

#[test]
fn csv_reader_accepts_unix_ms_crlf_and_sorts_stably() {
    let dir = temp_dir("csv-ms");
    let path = dir.join("x.csv");
    write(
        &path,
        "timestamp,device,sensor,value\r\n2000,a,t,1\r\n1000,a,t,2\n\n1970-01-01T00:00:01+00:00,b,t,3\r\n",
    );
    let r = dataset::read_readings(&path).unwrap();
    let got: Vec<(u64, &str, f64)> = r
        .iter()
        .map(|r| (r.ts_ms, r.device.as_str(), r.value))
        .collect();
    assert_eq!(
        got,
        vec![(1000, "a", 2.0), (1000, "b", 3.0), (2000, "a", 1.0)]
    );
}

#[test]
fn timestamps() {
    let p = dataset::parse_timestamp;
    assert_eq!(p("2026-01-01T00:00:00.000Z"), Ok(1_767_225_600_000));
    assert_eq!(p("2026-01-01T00:00:00Z"), Ok(1_767_225_600_000));
    assert_eq!(p("2026-01-01T02:00:00.5+02:00"), Ok(1_767_225_600_500));
    assert_eq!(p("2025-12-31T19:00:00.123456-05:00"), Ok(1_767_225_600_123));
    assert_eq!(p("2020-03-09 10:14:33"), Ok(1_583_748_873_000));
    assert_eq!(p("2024-02-29T23:59:59.999Z"), Ok(1_709_251_199_999));
    assert_eq!(p("1767225600000"), Ok(1_767_225_600_000));
    for bad in [
        "",
        "2026-13-01T00:00:00Z",
        "2025-02-29T00:00:00Z",
        "2026-01-01T24:00:00Z",
        "2026-01-01T00:00:00Zjunk",
        "2026-01-01",
        "1969-12-31T23:59:59Z",
        "yesterday",
    ] {
        assert!(p(bad).is_err(), "{bad:?} should not parse");
    }
}

#[test]
fn subjects() {
    assert_eq!(
        dataset::subject("dev-3", "temperature"),
        "sensors/dev-3/temperature"
    );
    assert_eq!(
        dataset::parse_subject("sensors/dev-3/temperature"),
        Some(("dev-3".into(), "temperature".into()))
    );
    for bad in [
        "sensors/dev-3",
        "sensors//t",
        "sensors/d/",
        "sensors/d/t/x",
        "x/d/t",
    ] {
        assert_eq!(dataset::parse_subject(bad), None, "{bad}");
    }
    assert_eq!(
        dataset::sanitize_name(" Volume Flow RateRMS"),
        "volume_flow_raterms"
    );
    assert_eq!(dataset::sanitize_name("a/b+c#D"), "abcd");
}

const SKAB_HEADER: &str = "datetime;Accelerometer1RMS;Accelerometer2RMS;Current;Pressure;Temperature;Thermocouple;Voltage;Volume Flow RateRMS;anomaly;changepoint";

/// A SKAB-format sample: rows at 1 s steps (one 2 s step), anomalies on rows 3-4 and 7.
fn skab_sample(eol: &str) -> String {
    let anomaly = [0, 0, 1, 1, 0, 0, 1];
    let mut s = format!("{SKAB_HEADER}{eol}");
    let mut sec = 10;
    for (i, a) in anomaly.iter().enumerate() {
        s.push_str(&format!(
            "2020-03-09 10:14:{sec:02};0.02{i};0.04;1.{i};0.054711;{}.5;25.0;229.{i};32.0;{a}.0;0.0{eol}",
            70 + i
        ));
        sec += if i == 3 { 2 } else { 1 };
    }
    s
}

fn skab_ts(sec: u64) -> u64 {
    1_583_748_840_000 + sec * 1000
}

#[test]
fn skab_readings_and_labels_with_lf_and_crlf() {
    let dir = temp_dir("skab");
    let lf = dir.join("valve1").join("0.csv");
    let crlf = dir.join("other").join("11.csv");
    write(&lf, &skab_sample("\n"));
    write(&crlf, &skab_sample("\r\n"));
    for (path, device) in [(&lf, "valve1-0"), (&crlf, "other-11")] {
        assert_eq!(dataset::detect_format(path).unwrap(), Format::Skab);
        let r = dataset::read_readings(path).unwrap();
        assert_eq!(r.len(), 7 * 8, "8 sensors per row, labels are not sensors");
        assert_eq!(
            r[0],
            reading(skab_ts(10), device, "accelerometer1rms", 0.020)
        );
        assert_eq!(r[2], reading(skab_ts(10), device, "current", 1.0));
        assert_eq!(
            r[7],
            reading(skab_ts(10), device, "volume_flow_raterms", 32.0)
        );
        assert_eq!(r[8 * 6 + 4].value, 76.5);
        assert!(
            r.iter()
                .all(|x| x.sensor != "anomaly" && x.sensor != "changepoint")
        );
        assert_eq!(r.last().unwrap().ts_ms, skab_ts(17));

        let labels = dataset::skab_labels(path).unwrap();
        let want = |s, e| Label {
            device: device.into(),
            sensor: None,
            kind: "skab".into(),
            start_ms: skab_ts(s),
            end_ms: skab_ts(e),
        };
        assert_eq!(labels, vec![want(12, 13), want(17, 17)]);
    }
}

#[test]
fn skab_without_label_columns_has_no_labels() {
    let dir = temp_dir("skab-free");
    let path = dir.join("anomaly-free").join("anomaly-free.csv");
    write(
        &path,
        "datetime;Accelerometer1RMS;Current\r\n2020-02-08 13:30:47;0.2;1.5\r\n2020-02-08 13:30:48;0.3;1.6\r\n",
    );
    assert_eq!(dataset::skab_labels(&path).unwrap(), vec![]);
    let r = dataset::read_readings(&path).unwrap();
    assert_eq!(r.len(), 4);
    assert_eq!(r[0].device, "anomaly-free-anomaly-free");
}

#[test]
fn labels_round_trip() {
    let dir = temp_dir("labels");
    let path = dir.join("l.labels.jsonl");
    let labels = vec![
        Label {
            device: "dev-0".into(),
            sensor: Some("temperature".into()),
            kind: "spike".into(),
            start_ms: 5,
            end_ms: 5,
        },
        Label {
            device: "valve1-0".into(),
            sensor: None,
            kind: "skab".into(),
            start_ms: 10,
            end_ms: 20,
        },
    ];
    dataset::write_labels(&path, &labels).unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    assert_eq!(
        text.lines().nth(1).unwrap(),
        r#"{"device":"valve1-0","sensor":null,"kind":"skab","start":10,"end":20}"#
    );
    assert_eq!(dataset::read_labels(&path).unwrap(), labels);
}

/// Writes `text` to a file called `name` and returns the error of `read`.
fn error_of(name: &str, text: &str, read: Read) -> String {
    let dir = temp_dir(&format!("bad-{}", name.replace(['/', '.'], "-")));
    let path = dir.join(name);
    write(&path, text);
    format!("{:#}", read(&path).unwrap_err())
}

fn readings(p: &Path) -> anyhow::Result<()> {
    dataset::read_readings(p).map(|_| ())
}

/// A reader under test: fails or not on a file.
type Read = fn(&Path) -> anyhow::Result<()>;

fn labels(p: &Path) -> anyhow::Result<()> {
    dataset::read_labels(p).map(|_| ())
}

fn skab_labels(p: &Path) -> anyhow::Result<()> {
    dataset::skab_labels(p).map(|_| ())
}

#[test]
fn bad_input_names_file_and_line() {
    let h = "timestamp,device,sensor,value\n";
    let cases: Vec<(&str, String, Read, &str)> = vec![
        (
            "cols.csv",
            format!("{h}0,a,t,1\n0,a,t\n"),
            readings,
            "line 3: expected 4 fields",
        ),
        (
            "value.csv",
            format!("{h}0,a,t,abc\n"),
            readings,
            "line 2: value \"abc\" is not a number",
        ),
        (
            "nan.csv",
            format!("{h}0,a,t,NaN\n"),
            readings,
            "line 2: value \"NaN\" is not a finite number",
        ),
        (
            "ts.csv",
            format!("{h}\n2026-01-01T00:00:00Z,a,t,1\n2026-02-30T00:00:00Z,a,t,1\n"),
            readings,
            "line 4: bad timestamp \"2026-02-30T00:00:00Z\"",
        ),
        (
            "topic.csv",
            format!("{h}0,a/b,t,1\n"),
            readings,
            "line 2: device name \"a/b\" contains '/'",
        ),
        (
            "noheader.txt",
            "0,a,t,1\n".into(),
            readings,
            "line 1: unknown format",
        ),
        ("empty.csv", String::new(), readings, "empty"),
        (
            "bad.jsonl",
            "{\"ts\":1,\"device\":\"a\",\"sensor\":\"t\",\"value\":1}\n{\"ts\":2,\"device\":\"a\"}\n".into(),
            readings,
            "line 2: bad reading",
        ),
        (
            "skab/1.csv",
            format!("{SKAB_HEADER}\n2020-03-09 10:14:10;1;2;3;4;5;6;7;8;0;0\n2020-03-09 10:14:11;1;2;3\n"),
            readings,
            "line 3: expected 11 fields like the header, found 4",
        ),
        (
            "skab/2.csv",
            format!("{SKAB_HEADER}\r\n2020-03-09 10:14:10;1;2;3;4;5;6;7;8;x;0\r\n"),
            skab_labels,
            "line 2: value \"x\" is not a number",
        ),
        (
            "skab/3.csv",
            format!("{SKAB_HEADER}\r\n2020-03-09T25:14:10;1;2;3;4;5;6;7;8;0;0\r\n"),
            readings,
            "line 2: bad timestamp",
        ),
        (
            "l.jsonl",
            "{\"device\":\"d\",\"sensor\":null,\"kind\":\"k\",\"start\":1,\"end\":2}\n\n{\"device\":\"d\",\"kind\":\"k\",\"start\":3,\"end\":2}\n".into(),
            labels,
            "line 3: label ends (2) before it starts (3)",
        ),
        (
            "l2.jsonl",
            "{\"device\":\"d\",\"kind\":\"k\",\"start\":\"x\",\"end\":2}\n".into(),
            labels,
            "line 1: bad label",
        ),
    ];
    for (name, text, read, want) in cases {
        let err = error_of(name, &text, read);
        assert!(
            err.contains(want),
            "{name}: {err:?} should contain {want:?}"
        );
        let file = Path::new(name).file_name().unwrap().to_str().unwrap();
        assert!(err.contains(file), "{name}: {err:?} should name the file");
    }
}
