//! Transform consumer: per key, averages readings over fixed event-time windows and writes
//! one record per closed window into a derived topic (e.g. one-minute averages).
//!
//! Config: `{"topic": "telemetry_1m", "window_ms": 60000, "field": "value"}`. The derived
//! topic must exist. Each output payload is
//! `{"avg": .., "min": .., "max": .., "count": .., "window_start": ..}` with the source
//! subject and key. A window closes when the first reading of a later window arrives.

use serde::{Deserialize, Serialize};
use shoal_sdk::{Consumer, Context, Record, config_f64, config_str, export_consumer};

#[derive(Default)]
pub struct Transform {
    topic: String,
    window_ms: u64,
    field: String,
}

#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
struct Window {
    start: u64,
    sum: f64,
    min: f64,
    max: f64,
    count: u64,
}

impl Consumer for Transform {
    fn init(&mut self, config: &str) -> Result<(), String> {
        self.topic = config_str(config, "topic").unwrap_or_else(|| "telemetry_1m".into());
        self.window_ms = config_f64(config, "window_ms").unwrap_or(60_000.0) as u64;
        self.field = config_str(config, "field").unwrap_or_else(|| "value".into());
        if self.window_ms == 0 {
            return Err("window_ms must be positive".into());
        }
        Ok(())
    }

    fn on_record(&mut self, ctx: &mut Context<'_>, r: &Record<'_>) {
        let Some(x) = r.value(&self.field) else {
            return;
        };
        let key = format!("w/{}", r.subject);
        let start = r.event_time_ms - r.event_time_ms % self.window_ms;
        let mut w: Window = ctx.get_as(&key).unwrap_or_default();
        if w.count > 0 && start > w.start {
            let payload = serde_json::json!({
                "avg": w.sum / w.count as f64,
                "min": w.min,
                "max": w.max,
                "count": w.count,
                "window_start": w.start,
            });
            ctx.emit(
                &self.topic,
                r.key,
                r.subject,
                payload.to_string().into_bytes(),
            );
            w = Window::default();
        }
        if w.count > 0 && start < w.start {
            // A reading for a window already closed: dropped (documented behaviour).
            return;
        }
        if w.count == 0 {
            w = Window {
                start,
                sum: 0.0,
                min: x,
                max: x,
                count: 0,
            };
        }
        w.sum += x;
        w.min = w.min.min(x);
        w.max = w.max.max(x);
        w.count += 1;
        ctx.set_as(&key, &w);
    }
}

export_consumer!(Transform);

#[cfg(test)]
mod tests {
    use shoal_sdk::testing::Harness;

    use super::*;

    #[test]
    fn emits_one_average_per_closed_window() {
        let mut h = Harness::<Transform>::new(r#"{"topic": "avg", "window_ms": 1000}"#).unwrap();
        h.feed_values(&[
            ("s", "1", 0),
            ("s", "3", 500),
            ("s", "10", 1200),
            ("s", "20", 2100),
        ]);
        assert_eq!(h.emits.len(), 2);
        let first: serde_json::Value = serde_json::from_slice(&h.emits[0].payload).unwrap();
        assert_eq!(first["avg"], 2.0);
        assert_eq!(first["count"], 2);
        assert_eq!(first["window_start"], 0);
        assert_eq!(h.emits[0].topic, "avg");
        let second: serde_json::Value = serde_json::from_slice(&h.emits[1].payload).unwrap();
        assert_eq!(second["avg"], 10.0);
    }
}
