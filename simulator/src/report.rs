//! The result of a `shoal-sim load` run and its two renderings: a short text summary for
//! people and one JSON object for scripts (`scripts/bench.sh` reads it).

use std::fmt::Write as _;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde_json::{Value, json};

/// Ack-latency percentiles in milliseconds.
#[derive(Clone, Debug, PartialEq)]
pub struct Latency {
    pub count: u64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub mean: f64,
}

impl Latency {
    /// Reads a histogram of microseconds; `None` when it is empty.
    pub fn from_histogram(h: &Histogram<u64>) -> Option<Latency> {
        if h.is_empty() {
            return None;
        }
        let ms = |us: u64| us as f64 / 1000.0;
        Some(Latency {
            count: h.len(),
            p50: ms(h.value_at_quantile(0.50)),
            p90: ms(h.value_at_quantile(0.90)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
            mean: h.mean() / 1000.0,
        })
    }

    fn to_json(&self) -> Value {
        json!({
            "count": self.count,
            "p50": round3(self.p50),
            "p90": round3(self.p90),
            "p99": round3(self.p99),
            "p999": round3(self.p999),
            "max": round3(self.max),
            "mean": round3(self.mean),
        })
    }

    fn to_text(&self) -> String {
        format!(
            "p50 {:.3}  p90 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3}",
            self.p50, self.p90, self.p99, self.p999, self.max
        )
    }
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// Everything a run measured.
#[derive(Clone, Debug)]
pub struct Summary {
    pub target: String,
    pub connections: u32,
    pub qos: u8,
    pub payload_size: usize,
    pub inflight: u16,
    /// Requested total rate; 0 = flat out.
    pub rate_target: f64,
    pub warmup_secs: f64,
    pub sent: u64,
    /// `None` at QoS 0 (nothing is acknowledged).
    pub acked: Option<u64>,
    /// Messages inside the measured window (acked, or sent at QoS 0, after warm-up).
    pub measured: u64,
    /// Length of the measured window: from the end of warm-up to the last ack.
    pub elapsed: Duration,
    /// Send time -> final ack.
    pub latency: Option<Latency>,
    /// Intended (scheduled) send time -> final ack; only for paced runs.
    pub latency_intended: Option<Latency>,
}

impl Summary {
    /// Measured messages per second.
    pub fn rate(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs > 0.0 {
            self.measured as f64 / secs
        } else {
            0.0
        }
    }

    pub fn to_json(&self) -> Value {
        json!({
            "target": self.target,
            "connections": self.connections,
            "qos": self.qos,
            "payload_size": self.payload_size,
            "inflight": self.inflight,
            "rate_target": self.rate_target,
            "warmup_secs": self.warmup_secs,
            "messages_sent": self.sent,
            "messages_acked": self.acked,
            "messages_measured": self.measured,
            "elapsed_s": round3(self.elapsed.as_secs_f64()),
            "msgs_per_s": self.rate().round(),
            "latency_ms": self.latency.as_ref().map(Latency::to_json),
            "latency_from_intended_ms": self.latency_intended.as_ref().map(Latency::to_json),
        })
    }

    pub fn to_text(&self) -> String {
        let mut s = String::new();
        let rate = if self.rate_target > 0.0 {
            format!("target {:.0} msgs/s", self.rate_target)
        } else {
            "flat out".to_string()
        };
        let _ = writeln!(
            s,
            "shoal-sim load: {} connections to {}, QoS {}, {}-byte payloads, window {}, {rate}",
            self.connections, self.target, self.qos, self.payload_size, self.inflight
        );
        let acked = match self.acked {
            Some(a) => format!(", acked {a}"),
            None => String::new(),
        };
        let verb = if self.acked.is_some() {
            "acked"
        } else {
            "sent"
        };
        let warm = if self.warmup_secs > 0.0 {
            format!(" (after {:.1} s warm-up)", self.warmup_secs)
        } else {
            String::new()
        };
        let _ = writeln!(
            s,
            "  sent {}{acked}; {} {verb} in {:.3} s{warm}: {:.0} msgs/s",
            self.sent,
            self.measured,
            self.elapsed.as_secs_f64(),
            self.rate()
        );
        match &self.latency {
            Some(l) => {
                let _ = writeln!(s, "  ack latency (ms): {}", l.to_text());
            }
            None if self.qos == 0 => {
                let _ = writeln!(s, "  QoS 0: no acks, send rate only");
            }
            None => {}
        }
        if let Some(l) = &self.latency_intended {
            let _ = writeln!(s, "  from intended send time (ms): {}", l.to_text());
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(latency: Option<Latency>) -> Summary {
        Summary {
            target: "127.0.0.1:1883".into(),
            connections: 10,
            qos: 1,
            payload_size: 100,
            inflight: 20,
            rate_target: 0.0,
            warmup_secs: 0.0,
            sent: 50_000,
            acked: Some(50_000),
            measured: 50_000,
            elapsed: Duration::from_millis(2500),
            latency,
            latency_intended: None,
        }
    }

    #[test]
    fn percentiles_come_out_in_milliseconds() {
        let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
        for us in 1..=1000 {
            h.record(us).unwrap();
        }
        let l = Latency::from_histogram(&h).unwrap();
        assert_eq!(l.count, 1000);
        assert!((l.p50 - 0.5).abs() < 0.001, "p50 {}", l.p50);
        assert!((l.p99 - 0.99).abs() < 0.001, "p99 {}", l.p99);
        assert!((l.max - 1.0).abs() < 0.001, "max {}", l.max);
        assert_eq!(Latency::from_histogram(&Histogram::new(3).unwrap()), None);
    }

    #[test]
    fn summary_reports_rate_and_latency() {
        let l = Latency {
            count: 50_000,
            p50: 1.25,
            p90: 2.0,
            p99: 4.5,
            p999: 9.0,
            max: 12.0,
            mean: 1.4,
        };
        let s = summary(Some(l));
        assert_eq!(s.rate(), 20_000.0);
        let text = s.to_text();
        assert!(
            text.contains("50000 acked in 2.500 s: 20000 msgs/s"),
            "{text}"
        );
        assert!(text.contains("p50 1.250  p90 2.000  p99 4.500"), "{text}");
        let j = s.to_json();
        assert_eq!(j["msgs_per_s"], 20_000.0);
        assert_eq!(j["latency_ms"]["p99"], 4.5);
        assert_eq!(j["latency_from_intended_ms"], Value::Null);
    }

    #[test]
    fn qos0_has_no_acks() {
        let mut s = summary(None);
        s.qos = 0;
        s.acked = None;
        assert!(s.to_text().contains("50000 sent in"));
        assert_eq!(s.to_json()["messages_acked"], Value::Null);
    }
}
