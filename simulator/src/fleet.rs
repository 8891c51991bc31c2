//! `shoal-sim fleet`: N simulated devices publishing live readings at a steady rate until
//! stopped (Ctrl-C or `--duration`). Each device is its own MQTT client with a persistent
//! session, and keeps going across a broker restart: rumqttc reconnects, and with the
//! session present it resends what was not acknowledged.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Result, bail};
use clap::Args;
use rand::{Rng, SeedableRng};
use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};

use crate::dataset;

#[derive(Args, Debug, Clone)]
pub struct FleetArgs {
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    #[arg(long, default_value_t = 1883)]
    pub port: u16,
    /// Number of devices (one MQTT connection each).
    #[arg(long, default_value_t = 10)]
    pub devices: usize,
    /// Readings per second per device (all its sensors together).
    #[arg(long, default_value_t = 1.0)]
    pub rate: f64,
    #[arg(long, default_value_t = 1)]
    pub qos: u8,
    /// Stop after this long (e.g. 10m); default: run until Ctrl-C.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub duration: Option<Duration>,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    #[arg(long, default_value = "fleet")]
    pub client_id_prefix: String,
}

const SENSORS: [(&str, f64, f64); 5] = [
    ("temperature", 21.0, 0.2),
    ("humidity", 45.0, 0.8),
    ("pressure", 1013.0, 0.5),
    ("vibration", 0.3, 0.02),
    ("current", 4.0, 0.1),
];

pub fn main(args: FleetArgs) -> Result<()> {
    if args.devices == 0 || args.rate.is_nan() || args.rate <= 0.0 || args.qos > 2 {
        bail!("--devices must be at least 1, --rate above 0, --qos 0, 1 or 2");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(run(args))
}

async fn run(args: FleetArgs) -> Result<()> {
    let published = Arc::new(AtomicU64::new(0));
    let acked = Arc::new(AtomicU64::new(0));
    let reconnects = Arc::new(AtomicU64::new(0));
    let stop = tokio_util::sync::CancellationToken::new();
    let qos = match args.qos {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    };
    let mut tasks = Vec::new();
    for d in 0..args.devices {
        let device = format!("dev-{d:04}");
        let mut o = MqttOptions::new(
            format!("{}-{device}", args.client_id_prefix),
            args.host.clone(),
            args.port,
        );
        o.set_clean_session(false);
        o.set_keep_alive(Duration::from_secs(15));
        let (client, mut el) = AsyncClient::new(o, 1000);
        let (acked, reconnects, stop1) = (acked.clone(), reconnects.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut down = false;
            loop {
                tokio::select! {
                    _ = stop1.cancelled() => break,
                    ev = el.poll() => match ev {
                        Ok(Event::Incoming(Packet::PubAck(_))) | Ok(Event::Incoming(Packet::PubComp(_))) => {
                            acked.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(Event::Incoming(Packet::ConnAck(_))) => {
                            if down {
                                reconnects.fetch_add(1, Ordering::Relaxed);
                                down = false;
                            }
                        }
                        Ok(Event::Outgoing(Outgoing::Disconnect)) => break,
                        Ok(_) => {}
                        Err(e) => {
                            if !down {
                                eprintln!("shoal-sim fleet: {device}: {e}; reconnecting");
                            }
                            down = true;
                            tokio::time::sleep(Duration::from_millis(500)).await;
                        }
                    }
                }
            }
        }));
        let (published, stop2, args2) = (published.clone(), stop.clone(), args.clone());
        let device = format!("dev-{d:04}");
        tasks.push(tokio::spawn(async move {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(
                args2.seed ^ (d as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
            );
            let period = Duration::from_secs_f64(1.0 / args2.rate);
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut levels: Vec<f64> = SENSORS.iter().map(|(_, base, _)| *base).collect();
            let mut n = 0usize;
            loop {
                tokio::select! {
                    _ = stop2.cancelled() => break,
                    _ = tick.tick() => {}
                }
                let i = n % SENSORS.len();
                n += 1;
                let (sensor, base, noise) = SENSORS[i];
                // A mean-reverting random walk around the base level.
                levels[i] += (base - levels[i]) * 0.05 + rng.random_range(-noise..noise);
                let topic = dataset::subject(&device, sensor);
                let payload = format!("{:.4}", levels[i]);
                // `publish` only queues; a full queue (broker away) waits here.
                if client.publish(topic, qos, false, payload).await.is_err() {
                    break;
                }
                published.fetch_add(1, Ordering::Relaxed);
            }
            let _ = client.disconnect().await;
        }));
    }
    let started = std::time::Instant::now();
    match args.duration {
        Some(d) => {
            tokio::select! {
                _ = tokio::time::sleep(d) => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        None => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
    stop.cancel();
    // Give the event loops a moment to flush the last acks and the DISCONNECTs.
    let _ = tokio::time::timeout(Duration::from_secs(5), futures::future::join_all(tasks)).await;
    println!(
        "fleet of {} devices ran {:.1} s: {} readings published, {} acknowledged, {} reconnects",
        args.devices,
        started.elapsed().as_secs_f64(),
        published.load(Ordering::Relaxed),
        acked.load(Ordering::Relaxed),
        reconnects.load(Ordering::Relaxed)
    );
    Ok(())
}
