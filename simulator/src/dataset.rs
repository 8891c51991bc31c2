//! Data files of the simulator, read and written in one place: sensor readings (our long
//! CSV, our JSON lines, and SKAB's `;`-separated CSV) and anomaly labels (JSON lines, or the
//! `anomaly` column of a SKAB file). `generate` writes them; `replay`, `backfill` and `score`
//! read them.
//!
//! Formats:
//! - CSV: header `timestamp,device,sensor,value`, one reading per row; the timestamp is
//!   RFC 3339 UTC with milliseconds (`2026-01-01T00:00:00.000Z`) or integer Unix ms.
//! - JSON lines: `{"ts":<unix ms>,"device":"..","sensor":"..","value":1.5}` per line.
//! - SKAB: header `datetime;Accelerometer1RMS;...;anomaly;changepoint`, `datetime` as
//!   `YYYY-MM-DD hh:mm:ss` taken as UTC. The device is the file's id (`valve1-0` for
//!   `valve1/0.csv`); every numeric column but `anomaly`/`changepoint` is a sensor.
//! - Labels: `{"device":..,"sensor":..|null,"kind":..,"start":<ms>,"end":<ms>}` per line,
//!   `end` inclusive, `sensor: null` meaning every sensor of the device.
//!
//! Bad input is an error naming the file, the line and the problem; nothing here panics.
//! Line endings may be LF or CRLF, mixed.

use std::fmt::{Display, Write as _};
use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};
use serde::{Deserialize, Serialize};

/// One sensor value at one time.
#[derive(Debug, Clone, PartialEq)]
pub struct Reading {
    /// Event time, Unix milliseconds.
    pub ts_ms: u64,
    pub device: String,
    pub sensor: String,
    pub value: f64,
}

/// A labelled anomaly: a time window of one device (one sensor, or all of them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Label {
    pub device: String,
    /// `None` = every sensor of the device.
    pub sensor: Option<String>,
    /// What was injected (`spike`, `level_shift`, ...; `skab` for SKAB's labels).
    pub kind: String,
    /// First affected millisecond.
    pub start_ms: u64,
    /// Last affected millisecond (inclusive).
    pub end_ms: u64,
}

/// The kinds of readings file we know.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Our long CSV: `timestamp,device,sensor,value`.
    Csv,
    /// Our JSON lines: `{"ts":..,"device":..,"sensor":..,"value":..}`.
    JsonLines,
    /// SKAB's wide `;`-separated CSV.
    Skab,
}

/// Header of our CSV.
pub const CSV_HEADER: &str = "timestamp,device,sensor,value";
const CSV_COLUMNS: [&str; 4] = ["timestamp", "device", "sensor", "value"];
/// SKAB columns that are labels, not sensors.
const SKAB_LABEL_COLUMNS: [&str; 2] = ["anomaly", "changepoint"];
/// Label kind of SKAB's anomaly windows.
pub const SKAB_KIND: &str = "skab";

/// The MQTT topic a reading is published to: `sensors/{device}/{sensor}`.
pub fn subject(device: &str, sensor: &str) -> String {
    format!("sensors/{device}/{sensor}")
}

/// Inverse of [`subject`]: `sensors/{device}/{sensor}` -> `(device, sensor)`.
pub fn parse_subject(subject: &str) -> Option<(String, String)> {
    let rest = subject.strip_prefix("sensors/")?;
    let (device, sensor) = rest.split_once('/')?;
    if device.is_empty() || sensor.is_empty() || sensor.contains('/') {
        return None;
    }
    Some((device.to_string(), sensor.to_string()))
}

/// Why `name` cannot be a device or sensor name (one level of an MQTT topic), if it cannot.
pub fn check_name(what: &str, name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err(format!("{what} name is empty"));
    }
    if let Some(c) = name
        .chars()
        .find(|c| matches!(c, '/' | '+' | '#') || c.is_control())
    {
        return Err(format!(
            "{what} name {name:?} contains {c:?} (names are one MQTT topic level: no '/', '+', '#' or control characters)"
        ));
    }
    Ok(())
}

/// Turns a column or file name into a name usable as one MQTT topic level: lowercase,
/// whitespace -> `_`, no `/`, `+`, `#` or control characters. May return "" (nothing usable).
pub fn sanitize_name(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for c in name.trim().chars() {
        if c.is_whitespace() {
            out.push('_');
        } else if matches!(c, '/' | '+' | '#') || c.is_control() {
            continue;
        } else {
            out.extend(c.to_lowercase());
        }
    }
    out
}

/// The device id of a SKAB file: its stem prefixed by its parent directory
/// (`data/valve1/0.csv` -> `valve1-0`), sanitized.
pub fn skab_device(path: &Path) -> String {
    let stem = path
        .file_stem()
        .map(|s| sanitize_name(&s.to_string_lossy()))
        .unwrap_or_default();
    let parent = path
        .parent()
        .and_then(|p| p.file_name())
        .map(|s| sanitize_name(&s.to_string_lossy()))
        .unwrap_or_default();
    match (parent.is_empty(), stem.is_empty()) {
        (false, false) => format!("{parent}-{stem}"),
        (true, false) => stem,
        (false, true) => parent,
        (true, true) => "skab".to_string(),
    }
}

// ---------------------------------------------------------------------------------------
// Time

const MS_PER_DAY: u64 = 86_400_000;

/// Days since 1970-01-01 of a proleptic Gregorian date.
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = i64::from((m + 9) % 12);
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Date of a day count since 1970-01-01.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = if z >= 0 { z } else { z - 146_096 } / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

fn days_in_month(y: i64, m: u32) -> u32 {
    match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        _ if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        _ => 28,
    }
}

/// Appends Unix ms as RFC 3339 UTC with milliseconds: `2026-01-01T00:00:00.000Z`.
fn push_rfc3339_ms(out: &mut String, ms: u64) {
    let days = (ms / MS_PER_DAY) as i64;
    let rem = ms % MS_PER_DAY;
    let (y, mo, d) = civil_from_days(days);
    let (h, mi, s, milli) = (
        rem / 3_600_000,
        rem / 60_000 % 60,
        rem / 1000 % 60,
        rem % 1000,
    );
    let _ = write!(
        out,
        "{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}.{milli:03}Z"
    );
}

/// Parses a timestamp into Unix ms: integer Unix ms, RFC 3339
/// (`2026-01-01T00:00:00Z`, `2026-01-01T00:00:00.123+02:00`), or `YYYY-MM-DD hh:mm:ss`
/// without a zone (taken as UTC, as in SKAB). Fractions below a millisecond are dropped.
pub fn parse_timestamp(text: &str) -> Result<u64, String> {
    let s = text.trim();
    let bad = |why: &str| {
        format!(
            "bad timestamp {s:?} ({why}): expected RFC 3339 like 2026-01-01T00:00:00.000Z, \
             `YYYY-MM-DD hh:mm:ss` (UTC) or integer Unix milliseconds"
        )
    };
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        return s.parse::<u64>().map_err(|_| bad("too large"));
    }
    let b = s.as_bytes();
    let num = |from: usize, len: usize| -> Option<u32> {
        let part = b.get(from..from + len)?;
        if !part.iter().all(u8::is_ascii_digit) {
            return None;
        }
        part.iter()
            .try_fold(0u32, |acc, d| Some(acc * 10 + u32::from(d - b'0')))
    };
    let sep = |at: usize, ok: &[u8]| b.get(at).is_some_and(|c| ok.contains(c));
    let (Some(y), Some(mo), Some(d), Some(h), Some(mi), Some(sec)) = (
        num(0, 4),
        num(5, 2),
        num(8, 2),
        num(11, 2),
        num(14, 2),
        num(17, 2),
    ) else {
        return Err(bad("not a date and time"));
    };
    if !(sep(4, b"-") && sep(7, b"-") && sep(10, b"Tt ") && sep(13, b":") && sep(16, b":")) {
        return Err(bad("not a date and time"));
    }
    let y = i64::from(y);
    if !(1..=12).contains(&mo) || d == 0 || d > days_in_month(y, mo) {
        return Err(bad("no such date"));
    }
    if h > 23 || mi > 59 || sec > 59 {
        return Err(bad("no such time of day"));
    }
    let mut i = 19;
    let mut milli = 0u64;
    if b.get(i) == Some(&b'.') {
        i += 1;
        let start = i;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            if i - start < 3 {
                milli = milli * 10 + u64::from(b[i] - b'0');
            }
            i += 1;
        }
        if i == start {
            return Err(bad("empty fraction of a second"));
        }
        for _ in (i - start)..3 {
            milli *= 10;
        }
    }
    let offset_min: i64 = match b.get(i) {
        None => 0,
        Some(b'Z' | b'z') if i + 1 == b.len() => 0,
        Some(&c @ (b'+' | b'-')) if i + 6 == b.len() && sep(i + 3, b":") => {
            let (Some(oh), Some(om)) = (num(i + 1, 2), num(i + 4, 2)) else {
                return Err(bad("bad zone offset"));
            };
            if oh > 23 || om > 59 {
                return Err(bad("bad zone offset"));
            }
            let m = i64::from(oh * 60 + om);
            if c == b'-' { -m } else { m }
        }
        Some(_) => return Err(bad("unexpected text after the time")),
    };
    let secs =
        days_from_civil(y, mo, d) * 86_400 + i64::from(h * 3600 + mi * 60 + sec) - offset_min * 60;
    if secs < 0 {
        return Err(bad("before 1970"));
    }
    Ok(secs as u64 * 1000 + milli)
}

// ---------------------------------------------------------------------------------------
// Reading lines

fn err_at(path: &Path, line: usize, msg: impl Display) -> anyhow::Error {
    anyhow!("{}: line {line}: {msg}", path.display())
}

/// Lines of a text file without their `\n` / `\r\n`, numbered from 1.
struct Lines<'p> {
    path: &'p Path,
    inner: BufReader<File>,
    buf: Vec<u8>,
    line: usize,
}

impl<'p> Lines<'p> {
    fn open(path: &'p Path) -> Result<Self> {
        let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        Ok(Lines {
            path,
            inner: BufReader::with_capacity(1 << 20, file),
            buf: Vec::new(),
            line: 0,
        })
    }

    /// Reads the next line into `buf` (without its line ending and a leading BOM); false at
    /// the end of the file.
    fn advance(&mut self) -> Result<bool> {
        self.buf.clear();
        let n = self
            .inner
            .read_until(b'\n', &mut self.buf)
            .with_context(|| format!("cannot read {}", self.path.display()))?;
        if n == 0 {
            return Ok(false);
        }
        self.line += 1;
        if self.buf.last() == Some(&b'\n') {
            self.buf.pop();
        }
        if self.buf.last() == Some(&b'\r') {
            self.buf.pop();
        }
        if self.line == 1 && self.buf.starts_with("\u{feff}".as_bytes()) {
            self.buf.drain(..3);
        }
        if let Err(e) = std::str::from_utf8(&self.buf) {
            return Err(err_at(
                self.path,
                self.line,
                format!("not valid UTF-8 ({e})"),
            ));
        }
        Ok(true)
    }

    /// The current line (checked to be UTF-8 by [`Lines::advance`]).
    fn text(&self) -> &str {
        std::str::from_utf8(&self.buf).unwrap_or_default()
    }

    /// The next line and its number, or `None` at the end of the file.
    fn next_line(&mut self) -> Result<Option<(usize, &str)>> {
        if !self.advance()? {
            return Ok(None);
        }
        Ok(Some((self.line, self.text())))
    }

    /// The next line that is not blank.
    fn next_nonblank(&mut self) -> Result<Option<(usize, &str)>> {
        while self.advance()? {
            if !self.text().trim().is_empty() {
                return Ok(Some((self.line, self.text())));
            }
        }
        Ok(None)
    }
}

fn is_skab_header(line: &str) -> bool {
    line.contains(';')
        && line
            .split(';')
            .next()
            .is_some_and(|f| f.trim().eq_ignore_ascii_case("datetime"))
}

fn is_csv_header(line: &str) -> bool {
    let cols: Vec<&str> = line.split(',').map(str::trim).collect();
    cols.len() == CSV_COLUMNS.len()
        && cols
            .iter()
            .zip(CSV_COLUMNS)
            .all(|(c, want)| c.eq_ignore_ascii_case(want))
}

/// Tells the format of a readings file from its first non-blank line (the extension only
/// decides for an empty `.jsonl`/`.ndjson` file).
pub fn detect_format(path: &Path) -> Result<Format> {
    let mut lines = Lines::open(path)?;
    let Some((n, first)) = lines.next_nonblank()? else {
        let ext = path
            .extension()
            .map(|e| e.to_string_lossy().to_ascii_lowercase());
        if matches!(ext.as_deref(), Some("jsonl" | "ndjson")) {
            return Ok(Format::JsonLines);
        }
        bail!(
            "{}: the file is empty, cannot tell its format",
            path.display()
        );
    };
    let first = first.trim();
    if first.starts_with('{') {
        Ok(Format::JsonLines)
    } else if is_skab_header(first) {
        Ok(Format::Skab)
    } else if is_csv_header(first) {
        Ok(Format::Csv)
    } else {
        Err(err_at(
            path,
            n,
            format!(
                "unknown format: expected the CSV header `{CSV_HEADER}`, a SKAB header \
                 `datetime;...` or JSON lines, found {:?}",
                first.chars().take(80).collect::<String>()
            ),
        ))
    }
}

/// Reads every reading of a file in any [`Format`], sorted by time (stable: readings with
/// the same time keep their order in the file).
pub fn read_readings(path: &Path) -> Result<Vec<Reading>> {
    let mut readings = match detect_format(path)? {
        Format::Csv => read_csv(path)?,
        Format::JsonLines => read_jsonl(path)?,
        Format::Skab => read_skab(path)?.into_readings(),
    };
    readings.sort_by_key(|r| r.ts_ms);
    Ok(readings)
}

/// Reuses the previous row's string when a name repeats (most rows of a fleet file).
fn name_from(prev: &str, text: &str) -> String {
    if prev == text {
        prev.to_string()
    } else {
        text.to_string()
    }
}

fn parse_value(text: &str) -> Result<f64, String> {
    let t = text.trim();
    match t.parse::<f64>() {
        Ok(v) if v.is_finite() => Ok(v),
        Ok(_) => Err(format!("value {t:?} is not a finite number")),
        Err(_) => Err(format!("value {t:?} is not a number")),
    }
}

fn read_csv(path: &Path) -> Result<Vec<Reading>> {
    let mut lines = Lines::open(path)?;
    let Some((n, header)) = lines.next_nonblank()? else {
        bail!("{}: the file is empty (no header)", path.display());
    };
    if !is_csv_header(header.trim()) {
        return Err(err_at(
            path,
            n,
            format!("missing header: expected `{CSV_HEADER}`"),
        ));
    }
    let mut out: Vec<Reading> = Vec::new();
    while let Some((n, line)) = lines.next_line()? {
        if line.trim().is_empty() {
            continue;
        }
        let fields: Vec<&str> = line.split(',').collect();
        if fields.len() != CSV_COLUMNS.len() {
            return Err(err_at(
                path,
                n,
                format!(
                    "expected {} fields ({CSV_HEADER}), found {}",
                    CSV_COLUMNS.len(),
                    fields.len()
                ),
            ));
        }
        let ts_ms = parse_timestamp(fields[0]).map_err(|e| err_at(path, n, e))?;
        let (device, sensor) = (fields[1].trim(), fields[2].trim());
        check_name("device", device).map_err(|e| err_at(path, n, e))?;
        check_name("sensor", sensor).map_err(|e| err_at(path, n, e))?;
        let value = parse_value(fields[3]).map_err(|e| err_at(path, n, e))?;
        let (device, sensor) = match out.last() {
            Some(p) => (name_from(&p.device, device), name_from(&p.sensor, sensor)),
            None => (device.to_string(), sensor.to_string()),
        };
        out.push(Reading {
            ts_ms,
            device,
            sensor,
            value,
        });
    }
    Ok(out)
}

#[derive(Deserialize)]
#[serde(untagged)]
enum JsonTs {
    Ms(u64),
    Text(String),
}

#[derive(Deserialize)]
struct JsonReading<'a> {
    ts: JsonTs,
    #[serde(borrow)]
    device: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    sensor: std::borrow::Cow<'a, str>,
    value: f64,
}

fn read_jsonl(path: &Path) -> Result<Vec<Reading>> {
    let mut lines = Lines::open(path)?;
    let mut out: Vec<Reading> = Vec::new();
    while let Some((n, line)) = lines.next_line()? {
        if line.trim().is_empty() {
            continue;
        }
        let r: JsonReading = serde_json::from_str(line)
            .map_err(|e| err_at(path, n, format!("bad reading ({e}); expected {{\"ts\":<unix ms>,\"device\":\"..\",\"sensor\":\"..\",\"value\":<number>}}")))?;
        let ts_ms = match r.ts {
            JsonTs::Ms(ms) => ms,
            JsonTs::Text(t) => parse_timestamp(&t).map_err(|e| err_at(path, n, e))?,
        };
        check_name("device", &r.device).map_err(|e| err_at(path, n, e))?;
        check_name("sensor", &r.sensor).map_err(|e| err_at(path, n, e))?;
        if !r.value.is_finite() {
            return Err(err_at(path, n, "value is not a finite number"));
        }
        let (device, sensor) = match out.last() {
            Some(p) => (
                name_from(&p.device, &r.device),
                name_from(&p.sensor, &r.sensor),
            ),
            None => (r.device.into_owned(), r.sensor.into_owned()),
        };
        out.push(Reading {
            ts_ms,
            device,
            sensor,
            value: r.value,
        });
    }
    Ok(out)
}

/// A SKAB file, parsed.
struct SkabTable {
    device: String,
    /// Sanitized sensor names, in column order.
    sensors: Vec<String>,
    /// Per row: time, one value per sensor, whether `anomaly` is set (false without the column).
    rows: Vec<(u64, Vec<f64>, bool)>,
}

impl SkabTable {
    fn into_readings(self) -> Vec<Reading> {
        let mut out = Vec::with_capacity(self.rows.len() * self.sensors.len());
        for (ts_ms, values, _) in &self.rows {
            for (sensor, value) in self.sensors.iter().zip(values) {
                out.push(Reading {
                    ts_ms: *ts_ms,
                    device: self.device.clone(),
                    sensor: sensor.clone(),
                    value: *value,
                });
            }
        }
        out
    }
}

fn read_skab(path: &Path) -> Result<SkabTable> {
    enum Col {
        Sensor,
        Anomaly,
        Other,
    }
    let mut lines = Lines::open(path)?;
    let Some((n, header)) = lines.next_nonblank()? else {
        bail!("{}: the file is empty (no header)", path.display());
    };
    if !is_skab_header(header) {
        return Err(err_at(
            path,
            n,
            "missing SKAB header: expected `datetime;<sensor>;...[;anomaly;changepoint]`",
        ));
    }
    let mut cols = Vec::new();
    let mut sensors: Vec<String> = Vec::new();
    for (i, name) in header.split(';').enumerate().skip(1) {
        let lower = name.trim().to_ascii_lowercase();
        if lower == "anomaly" {
            cols.push(Col::Anomaly);
        } else if SKAB_LABEL_COLUMNS.contains(&lower.as_str()) {
            cols.push(Col::Other);
        } else {
            let s = sanitize_name(name);
            if s.is_empty() {
                return Err(err_at(
                    path,
                    n,
                    format!("column {} ({name:?}) has no usable sensor name", i + 1),
                ));
            }
            if sensors.contains(&s) {
                return Err(err_at(
                    path,
                    n,
                    format!("two columns are both sensor {s:?} after sanitizing"),
                ));
            }
            sensors.push(s);
            cols.push(Col::Sensor);
        }
    }
    let width = cols.len() + 1;
    let mut rows = Vec::new();
    while let Some((n, line)) = lines.next_line()? {
        if line.trim().is_empty() {
            continue;
        }
        let fields: Vec<&str> = line.split(';').collect();
        if fields.len() != width {
            return Err(err_at(
                path,
                n,
                format!(
                    "expected {width} fields like the header, found {}",
                    fields.len()
                ),
            ));
        }
        let ts = parse_timestamp(fields[0]).map_err(|e| err_at(path, n, e))?;
        let mut values = Vec::with_capacity(sensors.len());
        let mut anomaly = false;
        for (col, field) in cols.iter().zip(&fields[1..]) {
            let v = parse_value(field).map_err(|e| err_at(path, n, e))?;
            match col {
                Col::Sensor => values.push(v),
                Col::Anomaly => anomaly = v != 0.0,
                Col::Other => {}
            }
        }
        rows.push((ts, values, anomaly));
    }
    Ok(SkabTable {
        device: skab_device(path),
        sensors,
        rows,
    })
}

/// SKAB's labels: one [`Label`] (kind `skab`, every sensor) per run of consecutive rows with
/// `anomaly` = 1, from the first to the last of those rows. A file without the column has none.
pub fn skab_labels(path: &Path) -> Result<Vec<Label>> {
    if detect_format(path)? != Format::Skab {
        bail!(
            "{}: not a SKAB file (its first line is not `datetime;...`)",
            path.display()
        );
    }
    let table = read_skab(path)?;
    let mut labels = Vec::new();
    let mut open: Option<(u64, u64)> = None;
    for &(ts, _, anomaly) in &table.rows {
        open = match (open, anomaly) {
            (None, true) => Some((ts, ts)),
            (Some((s, _)), true) => Some((s, ts)),
            (Some((s, e)), false) => {
                labels.push((s, e));
                None
            }
            (None, false) => None,
        };
    }
    labels.extend(open);
    Ok(labels
        .into_iter()
        .map(|(start_ms, end_ms)| Label {
            device: table.device.clone(),
            sensor: None,
            kind: SKAB_KIND.to_string(),
            start_ms,
            end_ms: end_ms.max(start_ms),
        })
        .collect())
}

#[derive(Serialize, Deserialize)]
struct JsonLabel {
    device: String,
    #[serde(default)]
    sensor: Option<String>,
    kind: String,
    start: u64,
    end: u64,
}

/// Reads our labels file (JSON lines). Blank lines are skipped; an empty file has no labels.
pub fn read_labels(path: &Path) -> Result<Vec<Label>> {
    let mut lines = Lines::open(path)?;
    let mut out = Vec::new();
    while let Some((n, line)) = lines.next_line()? {
        if line.trim().is_empty() {
            continue;
        }
        let l: JsonLabel = serde_json::from_str(line).map_err(|e| {
            err_at(
                path,
                n,
                format!(
                    "bad label ({e}); expected {{\"device\":\"..\",\"sensor\":\"..\"|null,\
                     \"kind\":\"..\",\"start\":<ms>,\"end\":<ms>}}"
                ),
            )
        })?;
        check_name("device", &l.device).map_err(|e| err_at(path, n, e))?;
        if let Some(s) = &l.sensor {
            check_name("sensor", s).map_err(|e| err_at(path, n, e))?;
        }
        if l.end < l.start {
            return Err(err_at(
                path,
                n,
                format!("label ends ({}) before it starts ({})", l.end, l.start),
            ));
        }
        out.push(Label {
            device: l.device,
            sensor: l.sensor,
            kind: l.kind,
            start_ms: l.start,
            end_ms: l.end,
        });
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------
// Writing

/// Streams readings into our CSV or JSON lines, one row per [`ReadingWriter::write`].
pub struct ReadingWriter<W: Write> {
    out: W,
    format: Format,
    /// Fixed decimals for values; `None` = shortest text that reads back to the same number.
    decimals: Option<usize>,
    /// The last row's time and its text, reused while the time repeats.
    last_ts: Option<u64>,
    ts_text: String,
    line: String,
}

impl<W: Write> ReadingWriter<W> {
    /// A writer of `format` (CSV or JSON lines); for CSV, writes the header.
    pub fn new(mut out: W, format: Format) -> Result<Self> {
        match format {
            Format::Csv => writeln!(out, "{CSV_HEADER}")?,
            Format::JsonLines => {}
            Format::Skab => bail!("cannot write SKAB files: use CSV or JSON lines"),
        }
        Ok(ReadingWriter {
            out,
            format,
            decimals: None,
            last_ts: None,
            ts_text: String::new(),
            line: String::with_capacity(128),
        })
    }

    /// Writes values with exactly `decimals` digits after the point.
    pub fn with_decimals(mut self, decimals: usize) -> Self {
        self.decimals = Some(decimals);
        self
    }

    /// Writes one reading.
    pub fn write(&mut self, ts_ms: u64, device: &str, sensor: &str, value: f64) -> Result<()> {
        check_name("device", device).map_err(|e| anyhow!(e))?;
        check_name("sensor", sensor).map_err(|e| anyhow!(e))?;
        if !value.is_finite() {
            bail!("cannot write {device}/{sensor} value {value}: not a finite number");
        }
        let line = &mut self.line;
        line.clear();
        match self.format {
            Format::Csv => {
                if device.contains([',', '"']) || sensor.contains([',', '"']) {
                    bail!(
                        "cannot write {device:?}/{sensor:?} to CSV: names may not contain ',' or '\"'"
                    );
                }
                if self.last_ts != Some(ts_ms) {
                    self.ts_text.clear();
                    push_rfc3339_ms(&mut self.ts_text, ts_ms);
                    self.last_ts = Some(ts_ms);
                }
                line.push_str(&self.ts_text);
                line.push(',');
                line.push_str(device);
                line.push(',');
                line.push_str(sensor);
                line.push(',');
            }
            Format::JsonLines => {
                let _ = write!(line, "{{\"ts\":{ts_ms},\"device\":");
                push_json_str(line, device);
                line.push_str(",\"sensor\":");
                push_json_str(line, sensor);
                line.push_str(",\"value\":");
            }
            Format::Skab => bail!("cannot write SKAB files"),
        }
        let _ = match self.decimals {
            Some(d) => write!(line, "{value:.d$}"),
            None => write!(line, "{value}"),
        };
        if self.format == Format::JsonLines {
            line.push('}');
        }
        line.push('\n');
        self.out.write_all(line.as_bytes())?;
        Ok(())
    }

    /// Flushes and returns the inner writer.
    pub fn finish(mut self) -> Result<W> {
        self.out.flush()?;
        Ok(self.out)
    }
}

fn push_json_str(out: &mut String, s: &str) {
    if s.chars().all(|c| c != '"' && c != '\\' && !c.is_control()) {
        out.push('"');
        out.push_str(s);
        out.push('"');
    } else {
        // Serializing a str cannot fail.
        out.push_str(&serde_json::to_string(s).unwrap_or_default());
    }
}

fn create(path: &Path) -> Result<BufWriter<File>> {
    let file = File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    Ok(BufWriter::with_capacity(1 << 20, file))
}

/// Writes labels as JSON lines, in the given order.
pub fn write_labels(path: &Path, labels: &[Label]) -> Result<()> {
    let mut w = create(path)?;
    for l in labels {
        let row = JsonLabel {
            device: l.device.clone(),
            sensor: l.sensor.clone(),
            kind: l.kind.clone(),
            start: l.start_ms,
            end: l.end_ms,
        };
        serde_json::to_writer(&mut w, &row)?;
        w.write_all(b"\n")?;
    }
    w.flush()
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}
