//! Missing-data consumer: per key, alerts when the event time jumps by more than
//! `max_gap_ms` between consecutive readings (a dropout), reported when data resumes.
//!
//! Config: `{"max_gap_ms": 60000}`.

use shoal_sdk::{Consumer, Context, Record, Severity, config_f64, export_consumer};

#[derive(Default)]
pub struct MissingData {
    max_gap_ms: u64,
}

impl Consumer for MissingData {
    fn init(&mut self, config: &str) -> Result<(), String> {
        self.max_gap_ms = config_f64(config, "max_gap_ms").unwrap_or(60_000.0) as u64;
        if self.max_gap_ms == 0 {
            return Err("max_gap_ms must be positive".into());
        }
        Ok(())
    }

    fn on_record(&mut self, ctx: &mut Context<'_>, r: &Record<'_>) {
        let key = format!("m/{}", r.subject);
        let last: Option<u64> = ctx.get_as(&key);
        if let Some(last) = last {
            let gap = r.event_time_ms.saturating_sub(last);
            if gap > self.max_gap_ms {
                ctx.alert(
                    r.subject,
                    Severity::Warning,
                    format!("no data for {gap} ms (max {} ms)", self.max_gap_ms),
                    Some(gap as f64),
                );
            }
        }
        if last.is_none_or(|l| r.event_time_ms > l) {
            ctx.set_as(&key, &r.event_time_ms);
        }
    }
}

export_consumer!(MissingData);

#[cfg(test)]
mod tests {
    use shoal_sdk::testing::Harness;

    use super::*;

    #[test]
    fn gaps_are_reported_when_data_resumes() {
        let mut h = Harness::<MissingData>::new(r#"{"max_gap_ms": 1500}"#).unwrap();
        let a = h.feed_values(&[
            ("s", "1", 0),
            ("s", "1", 1000),
            ("s", "1", 5000),
            ("t", "1", 5000),
            ("s", "1", 6000),
        ]);
        assert_eq!(a.len(), 1);
        assert_eq!(a[0].value, Some(4000.0));
        // A late, older reading is not a gap and does not move the clock back.
        assert!(
            h.feed_values(&[("s", "1", 3000), ("s", "1", 7000)])
                .is_empty()
        );
    }
}
