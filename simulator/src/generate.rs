//! `shoal-sim generate`: a synthetic sensor fleet with injected, labelled anomalies,
//! written as our CSV or JSON lines (see [`crate::dataset`]) plus a labels file.
//!
//! Every device has five sensors: `temperature`, `humidity`, `pressure`, `vibration` and
//! `current`. The signals: a daily temperature cycle (peak mid-afternoon UTC, a per-device
//! phase), humidity anti-correlated with it, pressure following a slow "weather" process,
//! and a machine load factor (mean-reverting random process) that drives vibration and
//! current and warms the device a little. Each sensor adds a slow mean-reverting drift and
//! Gaussian noise; levels and amplitudes differ per device.
//!
//! Anomalies are placed per device at random times and sensors, never overlapping (and at
//! least [`GAP`] apart) within one series: `spike` (1-3 readings 8-15 noise sd out),
//! `level_shift` (5-30 min offset of 5-10 sd), `drift` (10-60 min ramp up to 8-15 sd),
//! `stuck` (5-30 min of one exactly repeated value), `dropout` (2-20 min with no rows) and
//! `noise_burst` (2-10 min of 8x noise). Each label covers exactly the affected readings
//! (for `dropout`, the missing ones).
//!
//! Output is a pure function of the arguments: randomness comes from ChaCha8 streams keyed
//! by the seed (one stream per device and purpose, so a device's signal does not change
//! with the anomaly settings), normals from our own Box-Muller, values rounded to 4
//! decimals, rows in (time, device, sensor) order.

use std::f64::consts::TAU;
use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::{RngCore, SeedableRng};

use crate::dataset::{self, Format, Label, ReadingWriter};

/// Sensors of every device, in output order.
pub const SENSORS: [&str; 5] = [
    "temperature",
    "humidity",
    "pressure",
    "vibration",
    "current",
];
const TEMP: usize = 0;
const HUM: usize = 1;
const PRESS: usize = 2;
const VIB: usize = 3;
const CUR: usize = 4;
/// Gaussian noise sd per sensor (°C, %RH, hPa, mm/s, A); anomaly sizes are in these units.
const NOISE_SD: [f64; 5] = [0.1, 0.5, 0.1, 0.05, 0.15];
/// Physical bounds per sensor; every value is clamped into them.
const BOUNDS: [(f64, f64); 5] = [
    (-40.0, 125.0),
    (0.0, 100.0),
    (800.0, 1100.0),
    (0.0, 100.0),
    (0.0, 100.0),
];
/// Stationary sd and time constant (s) of each sensor's slow drift.
const DRIFT_SD: [f64; 5] = [0.3, 1.0, 0.2, 0.05, 0.1];
const DRIFT_TAU_S: f64 = 3600.0;
/// Minimum distance between two anomalies of one series.
const GAP: Duration = Duration::from_secs(5 * 60);
/// No anomaly starts in the first 10 minutes (or fifth of the run), so detectors can warm up.
const WARMUP: Duration = Duration::from_secs(10 * 60);
const DAY_MS: u64 = 86_400_000;
/// Decimals of every written value.
const DECIMALS: usize = 4;

/// An injected anomaly kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, ValueEnum)]
pub enum Kind {
    #[value(name = "spike")]
    Spike,
    #[value(name = "level_shift")]
    LevelShift,
    #[value(name = "drift")]
    Drift,
    #[value(name = "stuck")]
    Stuck,
    #[value(name = "dropout")]
    Dropout,
    #[value(name = "noise_burst")]
    NoiseBurst,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Spike => "spike",
            Kind::LevelShift => "level_shift",
            Kind::Drift => "drift",
            Kind::Stuck => "stuck",
            Kind::Dropout => "dropout",
            Kind::NoiseBurst => "noise_burst",
        }
    }

    /// Range of the anomaly's length.
    fn length(self) -> Length {
        let min = |m: u64| Duration::from_secs(m * 60);
        match self {
            Kind::Spike => Length::Readings(1, 3),
            Kind::LevelShift | Kind::Stuck => Length::Time(min(5), min(30)),
            Kind::Drift => Length::Time(min(10), min(60)),
            Kind::Dropout => Length::Time(min(2), min(20)),
            Kind::NoiseBurst => Length::Time(min(2), min(10)),
        }
    }
}

enum Length {
    Readings(u64, u64),
    Time(Duration, Duration),
}

/// Output file format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum OutFormat {
    Csv,
    Jsonl,
}

/// Flags of `shoal-sim generate`.
#[derive(Args, Debug, Clone)]
pub struct GenerateArgs {
    /// Devices in the fleet (named dev-0, dev-1, ...), five sensors each.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub devices: u32,
    /// Time span covered, e.g. 2h, 30m, 7days.
    #[arg(long, default_value = "2h", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Time between two readings of one sensor (whole milliseconds), e.g. 1s, 500ms.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub interval: Duration,
    /// Seed of every random choice: the same arguments give byte-identical files.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Readings file to write: `.csv` -> CSV, `.jsonl` -> JSON lines (or see --format).
    #[arg(long)]
    pub out: PathBuf,
    /// Format of --out, when its extension does not tell.
    #[arg(long, value_enum)]
    pub format: Option<OutFormat>,
    /// Labels file to write (JSON lines) [default: OUT with extension .labels.jsonl].
    #[arg(long)]
    pub labels: Option<PathBuf>,
    /// Time of the first reading, RFC 3339.
    #[arg(long, default_value = "2026-01-01T00:00:00Z", value_parser = dataset::parse_timestamp)]
    pub start: u64,
    /// Expected anomalies per device per hour (over all its sensors); 0 = none.
    #[arg(long, default_value_t = 1.0)]
    pub anomalies_per_device_hour: f64,
    /// Anomaly kinds to draw from (comma-separated).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "spike,level_shift,drift,stuck,dropout,noise_burst"
    )]
    pub kinds: Vec<Kind>,
}

/// Entry point of `shoal-sim generate`.
pub fn main(args: GenerateArgs) -> Result<()> {
    let started = Instant::now();
    let plan = Plan::new(&args)?;
    let labels_path = args
        .labels
        .clone()
        .unwrap_or_else(|| args.out.with_extension("labels.jsonl"));
    if labels_path == args.out {
        bail!("--labels and --out are the same file");
    }
    let file =
        File::create(&args.out).with_context(|| format!("cannot create {}", args.out.display()))?;
    let out = BufWriter::with_capacity(1 << 20, file);
    let mut writer = ReadingWriter::new(out, plan.format)?.with_decimals(DECIMALS);
    let per_step = u64::from(args.devices) * SENSORS.len() as u64;
    let pb = crate::progress::bar(plan.steps * per_step, "generate");
    let mut devices: Vec<Device> = (0..args.devices).map(|i| Device::new(&plan, i)).collect();
    let mut rows = 0u64;
    let mut values = [0.0; 5];
    for step in 0..plan.steps {
        let ts = plan.start_ms + step * plan.interval_ms;
        for dev in &mut devices {
            dev.step(step, ts, &mut values);
            for (s, sensor) in SENSORS.iter().enumerate() {
                if values[s].is_nan() {
                    continue; // dropout
                }
                writer
                    .write(ts, &dev.name, sensor, values[s])
                    .with_context(|| format!("cannot write {}", args.out.display()))?;
                rows += 1;
            }
        }
        pb.inc(per_step);
    }
    writer
        .finish()
        .with_context(|| format!("cannot write {}", args.out.display()))?;
    pb.finish_and_clear();

    let mut labels: Vec<(u64, u32, usize, Label)> = Vec::new();
    let mut wanted = 0;
    for (d, dev) in devices.iter().enumerate() {
        wanted += dev.wanted;
        for (s, series) in dev.series.iter().enumerate() {
            for w in &series.windows {
                let label = plan.label(&dev.name, s, w);
                labels.push((label.start_ms, d as u32, s, label));
            }
        }
    }
    labels.sort_by_key(|(start, d, s, _)| (*start, *d, *s));
    let labels: Vec<Label> = labels.into_iter().map(|(_, _, _, l)| l).collect();
    dataset::write_labels(&labels_path, &labels)?;
    println!(
        "generate: {rows} readings ({} devices x {} sensors, {} steps of {}) -> {}",
        args.devices,
        SENSORS.len(),
        plan.steps,
        humantime::format_duration(args.interval),
        args.out.display()
    );
    println!(
        "generate: {} labelled anomalies -> {} in {:.2}s",
        labels.len(),
        labels_path.display(),
        started.elapsed().as_secs_f64()
    );
    if labels.len() < wanted {
        eprintln!(
            "generate: placed {} of {wanted} anomalies; the rest found no free slot (try a longer --duration or a lower rate)",
            labels.len()
        );
    }
    Ok(())
}

/// The checked arguments in the units the generator works in.
struct Plan {
    format: Format,
    start_ms: u64,
    interval_ms: u64,
    steps: u64,
    seed: u64,
    rate: f64,
    kinds: Vec<Kind>,
}

impl Plan {
    fn new(args: &GenerateArgs) -> Result<Plan> {
        let format = match args.format {
            Some(OutFormat::Csv) => Format::Csv,
            Some(OutFormat::Jsonl) => Format::JsonLines,
            None => format_of(&args.out)?,
        };
        let interval_ms = args.interval.as_millis();
        if interval_ms == 0 || !args.interval.subsec_nanos().is_multiple_of(1_000_000) {
            bail!("--interval must be a whole number of milliseconds, at least 1ms");
        }
        let interval_ms = u64::try_from(interval_ms).context("--interval is too long")?;
        let duration_ms =
            u64::try_from(args.duration.as_millis()).context("--duration is too long")?;
        let steps = duration_ms / interval_ms;
        if steps == 0 {
            bail!("--duration must be at least one --interval");
        }
        if !args.anomalies_per_device_hour.is_finite() || args.anomalies_per_device_hour < 0.0 {
            bail!("--anomalies-per-device-hour must be a finite number >= 0");
        }
        if args.kinds.is_empty() && args.anomalies_per_device_hour > 0.0 {
            bail!("--kinds is empty");
        }
        args.start
            .checked_add(steps * interval_ms)
            .context("--start + --duration is too far in the future")?;
        // The same set in any order or with repeats draws the same anomalies.
        let mut kinds = args.kinds.clone();
        kinds.sort();
        kinds.dedup();
        Ok(Plan {
            format,
            start_ms: args.start,
            interval_ms,
            steps,
            seed: args.seed,
            rate: args.anomalies_per_device_hour,
            kinds,
        })
    }

    /// Steps in `d`, rounded up (at least 1).
    fn steps_of(&self, d: Duration) -> u64 {
        (d.as_millis() as u64).div_ceil(self.interval_ms).max(1)
    }

    /// A random generator for `device` and one `purpose`, stable across versions.
    fn rng(&self, device: u32, purpose: u64) -> ChaCha8Rng {
        let mut key = [0u8; 32];
        let mut x = self.seed;
        for chunk in key.chunks_exact_mut(8) {
            chunk.copy_from_slice(&splitmix64(&mut x).to_le_bytes());
        }
        let mut rng = ChaCha8Rng::from_seed(key);
        rng.set_stream(u64::from(device) * 4 + purpose);
        rng
    }

    fn label(&self, device: &str, sensor: usize, w: &Window) -> Label {
        Label {
            device: device.to_string(),
            sensor: Some(SENSORS[sensor].to_string()),
            kind: w.kind.as_str().to_string(),
            start_ms: self.start_ms + w.start * self.interval_ms,
            end_ms: self.start_ms + w.end * self.interval_ms,
        }
    }
}

fn format_of(path: &Path) -> Result<Format> {
    let ext = path
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase());
    match ext.as_deref() {
        Some("csv") => Ok(Format::Csv),
        Some("jsonl" | "ndjson") => Ok(Format::JsonLines),
        _ => bail!(
            "cannot tell the format of {} from its extension: use .csv or .jsonl, or --format",
            path.display()
        ),
    }
}

fn splitmix64(x: &mut u64) -> u64 {
    *x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *x;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Uniform numbers and normals from a ChaCha8 stream, with our own conversions so the
/// values never depend on another crate's version.
struct Random {
    rng: ChaCha8Rng,
    spare: Option<f64>,
}

impl Random {
    fn new(rng: ChaCha8Rng) -> Self {
        Random { rng, spare: None }
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.rng.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.unit()
    }

    /// Uniform integer in [lo, hi].
    fn int(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.rng.next_u64() % (hi - lo + 1)
    }

    fn sign(&mut self) -> f64 {
        if self.rng.next_u64() & 1 == 0 {
            1.0
        } else {
            -1.0
        }
    }

    /// Standard normal (Box-Muller, both values used).
    fn normal(&mut self) -> f64 {
        if let Some(z) = self.spare.take() {
            return z;
        }
        let u1 = 1.0 - self.unit(); // (0, 1]
        let u2 = self.unit();
        let r = (-2.0 * u1.ln()).sqrt();
        let (s, c) = (TAU * u2).sin_cos();
        self.spare = Some(r * s);
        r * c
    }
}

/// One injected anomaly of one series, in steps (both ends inclusive).
#[derive(Clone, Debug)]
struct Window {
    kind: Kind,
    start: u64,
    end: u64,
    /// Offset (spike, level shift) or final ramp height (drift), in sensor units.
    size: f64,
}

#[derive(Default)]
struct Series {
    /// Sorted by start, non-overlapping.
    windows: Vec<Window>,
    /// Index of the first window that has not ended yet.
    next: usize,
    /// The repeated value of the `stuck` window in progress.
    frozen: Option<f64>,
}

/// A mean-reverting (Ornstein-Uhlenbeck) process sampled every step, exactly.
#[derive(Clone, Copy)]
struct Ou {
    x: f64,
    /// Decay per step and sd of the step's innovation.
    a: f64,
    k: f64,
}

impl Ou {
    fn new(sd: f64, tau_s: f64, interval_ms: u64, start: f64) -> Self {
        let a = (-(interval_ms as f64 / 1000.0) / tau_s).exp();
        Ou {
            x: start,
            a,
            k: sd * (1.0 - a * a).sqrt(),
        }
    }

    fn step(&mut self, z: f64) -> f64 {
        self.x = self.x * self.a + self.k * z;
        self.x
    }
}

struct Device {
    name: String,
    rng: Random,
    /// Anomalies drawn for this device (some may have found no slot).
    wanted: usize,
    temp_base: f64,
    temp_amp: f64,
    /// Fraction of a day added to the time of day (a device's "longitude").
    phase: f64,
    hum_base: f64,
    /// %RH per °C of the daily temperature swing.
    hum_per_deg: f64,
    press_base: f64,
    vib_base: f64,
    cur_idle: f64,
    cur_per_load: f64,
    load_mean: f64,
    load: Ou,
    weather: Ou,
    drift: [Ou; 5],
    series: [Series; 5],
}

impl Device {
    fn new(plan: &Plan, index: u32) -> Device {
        let mut p = Random::new(plan.rng(index, 0));
        let rng = Random::new(plan.rng(index, 1));
        let load_mean = p.uniform(0.4, 0.8);
        let iv = plan.interval_ms;
        let drift = std::array::from_fn(|s| Ou::new(DRIFT_SD[s], DRIFT_TAU_S, iv, 0.0));
        let mut dev = Device {
            name: format!("dev-{index}"),
            rng,
            wanted: 0,
            temp_base: p.uniform(18.0, 26.0),
            temp_amp: p.uniform(2.0, 5.0),
            phase: p.uniform(-1.0, 1.0) / 24.0,
            hum_base: p.uniform(40.0, 60.0),
            hum_per_deg: p.uniform(1.5, 3.0),
            press_base: p.uniform(1005.0, 1020.0),
            vib_base: p.uniform(1.5, 4.0),
            cur_idle: p.uniform(1.0, 3.0),
            cur_per_load: p.uniform(6.0, 12.0),
            load_mean,
            load: Ou::new(0.15, 600.0, iv, 0.0),
            weather: Ou::new(2.0, 6.0 * 3600.0, iv, p.uniform(-2.0, 2.0)),
            drift,
            series: Default::default(),
        };
        dev.place_anomalies(plan, &mut Random::new(plan.rng(index, 2)));
        dev
    }

    fn place_anomalies(&mut self, plan: &Plan, r: &mut Random) {
        let hours = (plan.steps * plan.interval_ms) as f64 / 3_600_000.0;
        let expected = plan.rate * hours;
        let n = expected.floor() as u64 + u64::from(r.unit() < expected.fract());
        let gap = plan.steps_of(GAP);
        let warmup = plan.steps_of(WARMUP).min(plan.steps / 5);
        for _ in 0..n {
            self.wanted += 1;
            let kind = plan.kinds[r.int(0, plan.kinds.len() as u64 - 1) as usize];
            let s = r.int(0, SENSORS.len() as u64 - 1) as usize;
            let len = match kind.length() {
                Length::Readings(lo, hi) => r.int(lo, hi),
                Length::Time(lo, hi) => {
                    let ms = r.uniform(lo.as_millis() as f64, hi.as_millis() as f64);
                    plan.steps_of(Duration::from_millis(ms as u64))
                }
            };
            let sd = NOISE_SD[s];
            // Faults raise vibration and current; humidity moves toward the middle of its range.
            let dir = match s {
                VIB | CUR => 1.0,
                HUM if self.hum_base > 50.0 => -1.0,
                HUM => 1.0,
                _ => r.sign(),
            };
            let size = match kind {
                Kind::Spike => dir * r.uniform(8.0, 15.0) * sd,
                Kind::LevelShift => dir * r.uniform(5.0, 10.0) * sd,
                Kind::Drift => dir * r.uniform(8.0, 15.0) * sd,
                Kind::Stuck | Kind::Dropout | Kind::NoiseBurst => 0.0,
            };
            if plan.steps < warmup + len {
                continue;
            }
            let windows = &mut self.series[s].windows;
            for _attempt in 0..50 {
                let start = r.int(warmup, plan.steps - len);
                let end = start + len - 1;
                let free = windows
                    .iter()
                    .all(|w| end + gap < w.start || start > w.end + gap);
                if free {
                    windows.push(Window {
                        kind,
                        start,
                        end,
                        size,
                    });
                    break;
                }
            }
        }
        for series in &mut self.series {
            series.windows.sort_by_key(|w| w.start);
        }
    }

    /// Values of the five sensors at `step` (NaN = no reading: dropout).
    fn step(&mut self, step: u64, ts: u64, out: &mut [f64; 5]) {
        let r = &mut self.rng;
        // Always draw the same numbers, whatever the anomalies, so they do not shift the signal.
        let load = (self.load_mean + self.load.step(r.normal())).clamp(0.05, 1.0);
        let weather = self.weather.step(r.normal());
        let mut drift = [0.0; 5];
        for (d, ou) in drift.iter_mut().zip(&mut self.drift) {
            *d = ou.step(r.normal());
        }
        let mut noise = [0.0; 5];
        for n in &mut noise {
            *n = r.normal();
        }
        let day = (ts % DAY_MS) as f64 / DAY_MS as f64 + self.phase;
        // Peak at 15:00, low at 03:00.
        let daily = self.temp_amp * (TAU * (day - 0.375)).sin();
        let mut clean = [0.0; 5];
        clean[TEMP] = self.temp_base + daily + 1.5 * (load - self.load_mean);
        clean[HUM] = self.hum_base - self.hum_per_deg * daily;
        clean[PRESS] = self.press_base + weather;
        clean[VIB] = self.vib_base * (0.3 + load);
        clean[CUR] = self.cur_idle + self.cur_per_load * load;

        for s in 0..SENSORS.len() {
            let mut noise_sd = NOISE_SD[s];
            let mut offset = 0.0;
            let series = &mut self.series[s];
            while series
                .windows
                .get(series.next)
                .is_some_and(|w| w.end < step)
            {
                series.next += 1;
                series.frozen = None;
            }
            let active = series.windows.get(series.next).filter(|w| w.start <= step);
            if let Some(w) = active {
                match w.kind {
                    Kind::Spike | Kind::LevelShift => offset = w.size,
                    Kind::Drift => {
                        let len = (w.end - w.start + 1) as f64;
                        offset = w.size * (step - w.start + 1) as f64 / len;
                    }
                    Kind::NoiseBurst => noise_sd *= 8.0,
                    Kind::Dropout => {
                        out[s] = f64::NAN;
                        continue;
                    }
                    Kind::Stuck => {
                        if let Some(v) = series.frozen {
                            out[s] = v;
                            continue;
                        }
                    }
                }
            }
            let (lo, hi) = BOUNDS[s];
            let v = round(
                (clean[s] + drift[s] + noise_sd * noise[s] + offset).clamp(lo, hi),
                DECIMALS,
            );
            if active.is_some_and(|w| w.kind == Kind::Stuck) {
                series.frozen = Some(v);
            }
            out[s] = v;
        }
    }
}

/// `v` rounded to `decimals` (and -0 made 0), so the file holds exactly the value.
fn round(v: f64, decimals: usize) -> f64 {
    let scale = 10f64.powi(decimals as i32);
    let r = (v * scale).round() / scale;
    if r == 0.0 { 0.0 } else { r }
}
