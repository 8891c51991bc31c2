//! Rate-of-change consumer: per key, alerts when a reading changes faster than
//! `max_rate` units per second of event time (or by more than `max_delta` between two
//! consecutive readings, whichever is configured).
//!
//! Config: `{"max_rate": 5.0, "max_delta": null, "field": "value"}`.

use serde::{Deserialize, Serialize};
use shoal_sdk::{Consumer, Context, Record, Severity, config_f64, config_str, export_consumer};

#[derive(Default)]
pub struct RateOfChange {
    max_rate: Option<f64>,
    max_delta: Option<f64>,
    field: String,
}

#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
struct Last {
    value: f64,
    time_ms: u64,
}

impl Consumer for RateOfChange {
    fn init(&mut self, config: &str) -> Result<(), String> {
        self.max_rate = config_f64(config, "max_rate");
        self.max_delta = config_f64(config, "max_delta");
        self.field = config_str(config, "field").unwrap_or_else(|| "value".into());
        if self.max_rate.is_none() && self.max_delta.is_none() {
            return Err("rate-of-change needs \"max_rate\" (per second) or \"max_delta\"".into());
        }
        Ok(())
    }

    fn on_record(&mut self, ctx: &mut Context<'_>, r: &Record<'_>) {
        let Some(x) = r.value(&self.field) else {
            return;
        };
        let key = format!("r/{}", r.subject);
        if let Some(last) = ctx.get_as::<Last>(&key)
            && r.event_time_ms >= last.time_ms
        {
            let delta = x - last.value;
            let secs = (r.event_time_ms - last.time_ms) as f64 / 1000.0;
            if let Some(max) = self.max_delta
                && delta.abs() > max
            {
                ctx.alert(
                    r.subject,
                    Severity::Warning,
                    format!("changed by {delta:.3} (max {max})"),
                    Some(x),
                );
            } else if let Some(max) = self.max_rate
                && secs > 0.0
                && (delta / secs).abs() > max
            {
                ctx.alert(
                    r.subject,
                    Severity::Warning,
                    format!("changing at {:.3}/s (max {max}/s)", delta / secs),
                    Some(x),
                );
            }
        }
        ctx.set_as(
            &key,
            &Last {
                value: x,
                time_ms: r.event_time_ms,
            },
        );
    }
}

export_consumer!(RateOfChange);

#[cfg(test)]
mod tests {
    use shoal_sdk::testing::Harness;

    use super::*;

    #[test]
    fn rate_per_second_of_event_time() {
        let mut h = Harness::<RateOfChange>::new(r#"{"max_rate": 1}"#).unwrap();
        assert!(
            h.feed_values(&[("s", "0", 0), ("s", "5", 10_000)])
                .is_empty(),
            "0.5/s"
        );
        assert_eq!(h.feed_values(&[("s", "10", 11_000)]).len(), 1, "5/s");
        // Out-of-order readings are not compared.
        assert!(h.feed_values(&[("s", "100", 5_000)]).is_empty());
    }

    #[test]
    fn delta_between_readings() {
        let mut h = Harness::<RateOfChange>::new(r#"{"max_delta": 2}"#).unwrap();
        assert_eq!(
            h.feed_values(&[("s", "0", 0), ("s", "1", 1), ("s", "4", 2)])
                .len(),
            1
        );
        assert!(Harness::<RateOfChange>::new("{}").is_err());
    }
}
