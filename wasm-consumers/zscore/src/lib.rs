//! Rolling z-score consumer: per key, an exponentially weighted mean and variance (EWMA);
//! a reading more than `threshold` standard deviations from the mean raises an alert.
//!
//! Config: `{"threshold": 4.0, "alpha": 0.05, "warmup": 20, "field": "value", "scale": "level"}`.
//! `"scale": "diff"` scores each reading's step from the previous normal reading against
//! the typical step (EWMA of squared steps) instead of its distance from the mean against
//! the level's spread: slow swings of the signal (load, daily cycles) then neither widen the
//! band nor leave the mean behind, so short spikes stand out.
//! Anomalous readings do not update the statistics (so a spike does not hide the next
//! one), unless `adapt_after` (default 20) anomalies come in a row: then the series has
//! shifted level, and the model follows it.

use serde::{Deserialize, Serialize};
use shoal_sdk::{Consumer, Context, Record, Severity, config_f64, config_str, export_consumer};

#[derive(Default)]
pub struct ZScore {
    threshold: f64,
    alpha: f64,
    warmup: u64,
    adapt_after: u64,
    field: String,
    diff_scale: bool,
}

/// Per-key statistics, stored in the consumer's state.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
struct Stats {
    count: u64,
    mean: f64,
    var: f64,
    streak: u64,
    /// Previous accepted reading and the EWMA of half the squared successive difference.
    prev: f64,
    dvar: f64,
}

impl Stats {
    fn update(&mut self, x: f64, alpha: f64) {
        if self.count == 0 {
            self.mean = x;
            self.var = 0.0;
            self.dvar = 0.0;
        } else {
            // A plain running mean until the EWMA window is filled, then EWMA.
            let a = alpha.max(1.0 / (self.count as f64 + 1.0));
            let d = x - self.mean;
            self.mean += a * d;
            self.var = (1.0 - a) * (self.var + a * d * d);
            let step = x - self.prev;
            self.dvar = (1.0 - a) * self.dvar + a * step * step;
        }
        self.prev = x;
        self.count += 1;
    }
}

impl Consumer for ZScore {
    fn init(&mut self, config: &str) -> Result<(), String> {
        self.threshold = config_f64(config, "threshold").unwrap_or(4.0);
        self.alpha = config_f64(config, "alpha").unwrap_or(0.05);
        self.warmup = config_f64(config, "warmup").unwrap_or(20.0) as u64;
        self.adapt_after = config_f64(config, "adapt_after").unwrap_or(20.0) as u64;
        self.field = config_str(config, "field").unwrap_or_else(|| "value".into());
        self.diff_scale = match config_str(config, "scale").as_deref() {
            None | Some("level") => false,
            Some("diff") => true,
            Some(other) => return Err(format!("scale {other:?}: use \"level\" or \"diff\"")),
        };
        if !(self.alpha > 0.0 && self.alpha < 1.0) || self.threshold <= 0.0 {
            return Err("need 0 < alpha < 1 and threshold > 0".into());
        }
        Ok(())
    }

    fn on_record(&mut self, ctx: &mut Context<'_>, r: &Record<'_>) {
        let Some(x) = r.value(&self.field) else {
            return;
        };
        let key = format!("z/{}", r.subject);
        let mut s: Stats = ctx.get_as(&key).unwrap_or_default();
        let (dev, spread) = if self.diff_scale {
            (x - s.prev, s.dvar)
        } else {
            (x - s.mean, s.var)
        };
        let sd = spread.sqrt().max(1e-9 * s.mean.abs().max(1.0));
        let z = dev / sd;
        if s.count >= self.warmup && z.abs() > self.threshold {
            s.streak += 1;
            ctx.alert(
                r.subject,
                Severity::Warning,
                format!("z-score {z:.1}: {x} vs mean {:.3} (sd {:.3})", s.mean, sd),
                Some(x),
            );
            if s.streak >= self.adapt_after {
                s.update(x, self.alpha);
            }
        } else {
            s.streak = 0;
            s.update(x, self.alpha);
        }
        ctx.set_as(&key, &s);
    }
}

export_consumer!(ZScore);

#[cfg(test)]
mod tests {
    use shoal_sdk::testing::Harness;

    use super::*;

    fn noisy(i: u64) -> f64 {
        20.0 + ((i * 7919) % 13) as f64 / 13.0 - 0.5
    }

    #[test]
    fn flags_a_spike_after_warmup_and_not_the_noise() {
        let mut h = Harness::<ZScore>::new(r#"{"threshold": 5}"#).unwrap();
        for i in 0..200 {
            let v = noisy(i).to_string();
            assert!(
                h.feed_values(&[("t", &v, i)]).is_empty(),
                "false alarm at {i}"
            );
        }
        let a = h.feed_values(&[("t", "35", 200)]);
        assert_eq!(a.len(), 1);
        // The spike did not move the model: the next normal reading is fine.
        assert!(
            h.feed_values(&[("t", &noisy(201).to_string(), 201)])
                .is_empty()
        );
    }

    #[test]
    fn diff_scale_ignores_slow_swings() {
        // A slow ramp with small noise: the level spread is large, the step spread small.
        let series = |i: u64| 10.0 + (i as f64 / 50.0).sin() * 5.0 + noisy(i) * 0.2;
        let mut level = Harness::<ZScore>::new(r#"{"threshold": 5}"#).unwrap();
        let mut diff = Harness::<ZScore>::new(r#"{"threshold": 5, "scale": "diff"}"#).unwrap();
        for i in 0..300 {
            let v = series(i).to_string();
            level.feed_values(&[("t", &v, i)]);
            assert!(
                diff.feed_values(&[("t", &v, i)]).is_empty(),
                "false alarm at {i}"
            );
        }
        let spike = (series(300) + 2.0).to_string();
        assert!(
            level.feed_values(&[("t", &spike, 300)]).is_empty(),
            "level scale misses it"
        );
        assert_eq!(
            diff.feed_values(&[("t", &spike, 300)]).len(),
            1,
            "diff scale flags it"
        );
        assert!(Harness::<ZScore>::new(r#"{"scale": "x"}"#).is_err());
    }

    #[test]
    fn state_survives_a_restart_and_keys_are_separate() {
        let mut h = Harness::<ZScore>::new("{}").unwrap();
        for i in 0..100 {
            h.feed_values(&[("a", &noisy(i).to_string(), i), ("b", "1000", i)]);
        }
        h.restart("{}").unwrap();
        assert_eq!(h.feed_values(&[("a", "40", 100)]).len(), 1);
        assert!(h.feed_values(&[("b", "1000", 100)]).is_empty());
    }
}
