//! Flatline (stuck sensor) consumer: per key, alerts once when a reading has not changed
//! by more than `epsilon` for `min_count` readings in a row (and at least `min_duration_ms`
//! of event time), then re-arms when the value moves.
//!
//! Config: `{"min_count": 10, "min_duration_ms": 0, "epsilon": 0.0, "field": "value"}`.

use serde::{Deserialize, Serialize};
use shoal_sdk::{Consumer, Context, Record, Severity, config_f64, config_str, export_consumer};

#[derive(Default)]
pub struct Flatline {
    min_count: u64,
    min_duration_ms: u64,
    epsilon: f64,
    field: String,
}

#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
struct Run {
    value: f64,
    count: u64,
    since_ms: u64,
    alerted: bool,
}

impl Consumer for Flatline {
    fn init(&mut self, config: &str) -> Result<(), String> {
        self.min_count = config_f64(config, "min_count").unwrap_or(10.0).max(2.0) as u64;
        self.min_duration_ms = config_f64(config, "min_duration_ms").unwrap_or(0.0) as u64;
        self.epsilon = config_f64(config, "epsilon").unwrap_or(0.0).abs();
        self.field = config_str(config, "field").unwrap_or_else(|| "value".into());
        Ok(())
    }

    fn on_record(&mut self, ctx: &mut Context<'_>, r: &Record<'_>) {
        let Some(x) = r.value(&self.field) else {
            return;
        };
        let key = format!("f/{}", r.subject);
        let mut run: Run = ctx.get_as(&key).unwrap_or_default();
        if run.count > 0 && (x - run.value).abs() <= self.epsilon {
            run.count += 1;
        } else {
            run = Run {
                value: x,
                count: 1,
                since_ms: r.event_time_ms,
                alerted: false,
            };
        }
        let lasted = r.event_time_ms.saturating_sub(run.since_ms);
        if !run.alerted && run.count >= self.min_count && lasted >= self.min_duration_ms {
            run.alerted = true;
            ctx.alert(
                r.subject,
                Severity::Warning,
                format!("stuck at {x} for {} readings ({lasted} ms)", run.count),
                Some(x),
            );
        }
        ctx.set_as(&key, &run);
    }
}

export_consumer!(Flatline);

#[cfg(test)]
mod tests {
    use shoal_sdk::testing::Harness;

    use super::*;

    #[test]
    fn alerts_once_per_stuck_run() {
        let mut h = Harness::<Flatline>::new(r#"{"min_count": 5}"#).unwrap();
        let mut alerts = 0;
        for i in 0..20u64 {
            let v = if (5..15).contains(&i) {
                "7".to_string()
            } else {
                i.to_string()
            };
            alerts += h.feed_values(&[("s", &v, i * 1000)]).len();
        }
        assert_eq!(alerts, 1);
        // A second stuck run alerts again.
        for i in 20..30u64 {
            alerts += h.feed_values(&[("s", "1", i * 1000)]).len();
        }
        assert_eq!(alerts, 2);
    }

    #[test]
    fn duration_and_epsilon() {
        let mut h = Harness::<Flatline>::new(
            r#"{"min_count": 3, "min_duration_ms": 10000, "epsilon": 0.01}"#,
        )
        .unwrap();
        let a = h.feed_values(&[
            ("s", "1.000", 0),
            ("s", "1.005", 1000),
            ("s", "1.001", 2000),
        ]);
        assert!(a.is_empty(), "too short");
        assert_eq!(h.feed_values(&[("s", "1.002", 11_000)]).len(), 1);
    }
}
