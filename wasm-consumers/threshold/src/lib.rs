//! Threshold consumer: raises one alert per reading outside `[min, max]`.
//!
//! Config (JSON): `{"min": 10.0, "max": 80.0, "field": "value"}`. Either bound may be left
//! out. A payload is a bare number or a JSON object whose numeric field is `field`
//! (default `"value"`); records without a reading are skipped.

use shoal_sdk::{Consumer, Context, Record, Severity, config_f64, config_str, export_consumer};

#[derive(Default)]
pub struct Threshold {
    min: Option<f64>,
    max: Option<f64>,
    field: String,
}

impl Consumer for Threshold {
    fn init(&mut self, config: &str) -> Result<(), String> {
        self.min = config_f64(config, "min");
        self.max = config_f64(config, "max");
        self.field = config_str(config, "field").unwrap_or_else(|| "value".into());
        if self.min.is_none() && self.max.is_none() {
            return Err("threshold needs \"min\" and/or \"max\" in its config".into());
        }
        if let (Some(lo), Some(hi)) = (self.min, self.max)
            && lo > hi
        {
            return Err(format!("min {lo} is above max {hi}"));
        }
        Ok(())
    }

    fn on_record(&mut self, ctx: &mut Context<'_>, r: &Record<'_>) {
        let Some(v) = r.value(&self.field) else {
            return;
        };
        if let Some(max) = self.max
            && v > max
        {
            ctx.alert(
                r.subject,
                Severity::Warning,
                format!("{v} above max {max}"),
                Some(v),
            );
        } else if let Some(min) = self.min
            && v < min
        {
            ctx.alert(
                r.subject,
                Severity::Warning,
                format!("{v} below min {min}"),
                Some(v),
            );
        }
    }
}

export_consumer!(Threshold);

#[cfg(test)]
mod tests {
    use shoal_sdk::testing::Harness;

    use super::*;

    #[test]
    fn one_alert_per_reading_outside_the_band() {
        let mut h = Harness::<Threshold>::new(r#"{"min": 0, "max": 10}"#).unwrap();
        let a = h.feed_values(&[
            ("s/1", "5", 1),
            ("s/1", "11", 2),
            ("s/1", "12", 3),
            ("s/2", "-1", 4),
            ("s/2", "{\"value\": 3}", 5),
            ("s/2", "junk", 6),
        ]);
        let got: Vec<(String, Option<f64>)> = a.iter().map(|a| (a.key.clone(), a.value)).collect();
        assert_eq!(
            got,
            vec![
                ("s/1".into(), Some(11.0)),
                ("s/1".into(), Some(12.0)),
                ("s/2".into(), Some(-1.0))
            ]
        );
    }

    #[test]
    fn field_and_one_sided_bands() {
        let mut h = Harness::<Threshold>::new(r#"{"max": 1, "field": "temp"}"#).unwrap();
        assert_eq!(
            h.feed_values(&[("x", r#"{"temp": 2}"#, 1), ("x", "-100", 2)])
                .len(),
            1
        );
        assert!(Harness::<Threshold>::new("{}").is_err());
        assert!(Harness::<Threshold>::new(r#"{"min": 5, "max": 1}"#).is_err());
    }
}
