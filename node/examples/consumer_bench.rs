//! Consumer throughput: the threshold and z-score consumers as wasm (through the node's
//! sandbox, fuel and epoch checks on) against the same Rust code run natively, in one run.
//! Also the host overhead of one batch call (an empty batch).
//!
//! Run: `cargo build --profile wasm --target wasm32-unknown-unknown -p threshold -p zscore`
//! then `cargo run --release -p shoal --example consumer_bench`.

use std::time::Instant;

use shoal::consumers::{Limits, Runtime};
use shoal::storage::{Storage, StorageConfig};
use shoal_sdk::abi::{Batch, OwnedRecord};
use shoal_sdk::testing::MemoryHost;
use shoal_sdk::{Consumer, run_batch};

const BATCH: usize = 1000;
const BATCHES: usize = 2000;
const RUNS: usize = 5;

fn records(seed: u64) -> Vec<OwnedRecord> {
    (0..BATCH as u64)
        .map(|i| {
            let n = seed * BATCH as u64 + i;
            OwnedRecord {
                offset: n,
                origin: 1,
                seq: n + 1,
                event_time_ms: n,
                ingest_time_ms: n,
                key: format!("sensor/{}", n % 100).into_bytes(),
                subject: format!("sensor/{}", n % 100),
                // Mostly normal readings, one in 500 out of band.
                payload: if n.is_multiple_of(500) {
                    b"99.5".to_vec()
                } else {
                    format!("{}", 20 + n % 7).into_bytes()
                },
            }
        })
        .collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn native<C: Consumer>(config: &str, batches: &[Batch<'_>]) -> f64 {
    let mut c = C::default();
    c.init(config).expect("init");
    let mut host = MemoryHost::default();
    let start = Instant::now();
    let mut alerts = 0;
    for b in batches {
        let out = run_batch(&mut c, &mut host, b);
        alerts += out.alerts.len();
        for (k, v) in out.state {
            if let Some(v) = v {
                host.state.insert(k, v);
            }
        }
    }
    std::hint::black_box(alerts);
    (batches.len() * BATCH) as f64 / start.elapsed().as_secs_f64()
}

/// The same consumer natively, through the same ABI path the wasm call takes: encode the
/// batch, decode it, run, encode the output, decode it.
fn native_abi<C: Consumer>(config: &str, batches: &[Batch<'_>]) -> anyhow::Result<f64> {
    let mut c = C::default();
    c.init(config).map_err(anyhow::Error::msg)?;
    let mut host = MemoryHost::default();
    let start = Instant::now();
    let mut alerts = 0;
    for b in batches {
        let bytes = postcard::to_allocvec(b)?;
        let batch: Batch<'_> = postcard::from_bytes(&bytes)?;
        let out = run_batch(&mut c, &mut host, &batch);
        let encoded = postcard::to_allocvec(&out)?;
        let out: shoal_sdk::abi::Output = postcard::from_bytes(&encoded)?;
        alerts += out.alerts.len();
        for (k, v) in out.state {
            if let Some(v) = v {
                host.state.insert(k, v);
            }
        }
    }
    std::hint::black_box(alerts);
    Ok((batches.len() * BATCH) as f64 / start.elapsed().as_secs_f64())
}

fn wasm(
    rt: &Runtime,
    storage: &Storage,
    file: &str,
    config: &str,
    batches: &[Batch<'_>],
) -> anyhow::Result<f64> {
    let bytes = std::fs::read(file).map_err(|e| {
        anyhow::anyhow!("{file}: {e} (build the consumers first, see the file header)")
    })?;
    let module = rt.compile(&bytes)?;
    let mut inst = rt.instantiate(
        &module,
        config,
        storage.clone(),
        "bench",
        0,
        Limits {
            fuel_per_record: 2_000_000,
            ..Limits::default()
        },
    )?;
    let start = Instant::now();
    let mut alerts = 0;
    for b in batches {
        let out = inst.consume(b)?;
        alerts += out.alerts.len();
        inst.committed(&out.state);
    }
    std::hint::black_box(alerts);
    Ok((batches.len() * BATCH) as f64 / start.elapsed().as_secs_f64())
}

fn main() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let storage = Storage::open(StorageConfig::new(dir.path()))?;
    let fuel = std::env::var("FUEL").map_or(true, |v| v != "0");
    let rt = Runtime::new(fuel)?;
    println!(
        "fuel metering: {}",
        if fuel {
            "on"
        } else {
            "off (epoch deadline only)"
        }
    );
    let owned: Vec<Vec<OwnedRecord>> = (0..BATCHES as u64).map(records).collect();
    let batches: Vec<Batch<'_>> = owned
        .iter()
        .map(|rs| Batch {
            partition: 0,
            records: rs.iter().map(OwnedRecord::as_record).collect(),
        })
        .collect();
    let target = std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".into());
    let wasm_dir = format!("{target}/wasm32-unknown-unknown/wasm");
    let th_cfg = r#"{"max": 90}"#;
    let z_cfg = r#"{"threshold": 5}"#;
    let (mut tn, mut tw, mut zn, mut zw) = (vec![], vec![], vec![], vec![]);
    let (mut ta, mut za) = (vec![], vec![]);
    for _ in 0..RUNS {
        ta.push(native_abi::<threshold::Threshold>(th_cfg, &batches)?);
        za.push(native_abi::<zscore::ZScore>(z_cfg, &batches)?);
        tn.push(native::<threshold::Threshold>(th_cfg, &batches));
        tw.push(wasm(
            &rt,
            &storage,
            &format!("{wasm_dir}/threshold.wasm"),
            th_cfg,
            &batches,
        )?);
        zn.push(native::<zscore::ZScore>(z_cfg, &batches));
        zw.push(wasm(
            &rt,
            &storage,
            &format!("{wasm_dir}/zscore.wasm"),
            z_cfg,
            &batches,
        )?);
    }
    // Host overhead: an empty batch through the whole call path.
    let module = rt.compile(&std::fs::read(format!("{wasm_dir}/threshold.wasm"))?)?;
    let mut inst = rt.instantiate(
        &module,
        th_cfg,
        storage.clone(),
        "bench",
        0,
        Limits::default(),
    )?;
    let empty = Batch::default();
    let n = 100_000;
    let start = Instant::now();
    for _ in 0..n {
        inst.consume(&empty)?;
    }
    let per_call_us = start.elapsed().as_secs_f64() * 1e6 / n as f64;
    let (tn, tw, zn, zw) = (median(tn), median(tw), median(zn), median(zw));
    let (ta, za) = (median(ta), median(za));
    println!(
        "consumer throughput, {BATCH}-record batches, median of {RUNS} runs of {} records:",
        BATCH * BATCHES
    );
    println!(
        "| consumer | native logic rec/s | native via ABI rec/s | wasm rec/s | wasm / native logic | wasm / native via ABI |"
    );
    println!("|---|---|---|---|---|---|");
    println!(
        "| threshold | {tn:.0} | {ta:.0} | {tw:.0} | {:.2} | {:.2} |",
        tw / tn,
        tw / ta
    );
    println!(
        "| zscore | {zn:.0} | {za:.0} | {zw:.0} | {:.2} | {:.2} |",
        zw / zn,
        zw / za
    );
    println!("host overhead per batch call (empty batch): {per_call_us:.2} µs");
    Ok(())
}
