//! Native test harness: runs a consumer without wasm, with in-memory state, so consumer
//! logic is unit-tested with `cargo test`.

use std::collections::BTreeMap;

use crate::abi::{Alert, Batch, Emit, OwnedRecord};
use crate::{Consumer, Host, run_batch};

/// In-memory host.
#[derive(Debug, Default)]
pub struct MemoryHost {
    pub state: BTreeMap<Vec<u8>, Vec<u8>>,
    pub logs: Vec<(u32, String)>,
    pub now_ms: u64,
}

impl Host for MemoryHost {
    fn state_get(&mut self, key: &[u8]) -> Option<Vec<u8>> {
        self.state.get(key).cloned()
    }
    fn log(&mut self, level: u32, message: &str) {
        self.logs.push((level, message.to_string()));
    }
    fn now_ms(&mut self) -> u64 {
        self.now_ms
    }
}

/// Drives a consumer through batches like the node does, committing state after each.
pub struct Harness<C: Consumer> {
    pub consumer: C,
    pub host: MemoryHost,
    pub alerts: Vec<Alert>,
    pub emits: Vec<Emit>,
    next_offset: u64,
}

impl<C: Consumer> Harness<C> {
    /// A consumer initialised with `config` (JSON).
    pub fn new(config: &str) -> Result<Self, String> {
        let mut consumer = C::default();
        consumer.init(config)?;
        Ok(Harness {
            consumer,
            host: MemoryHost::default(),
            alerts: Vec::new(),
            emits: Vec::new(),
            next_offset: 0,
        })
    }

    /// A record on `subject` (also its key) with `payload` at `event_time_ms`.
    pub fn record(&mut self, subject: &str, payload: &str, event_time_ms: u64) -> OwnedRecord {
        self.next_offset += 1;
        OwnedRecord {
            offset: self.next_offset - 1,
            origin: 1,
            seq: self.next_offset,
            event_time_ms,
            ingest_time_ms: event_time_ms,
            key: subject.as_bytes().to_vec(),
            subject: subject.to_string(),
            payload: payload.as_bytes().to_vec(),
        }
    }

    /// Runs one batch; returns the alerts it raised (also accumulated in `self.alerts`).
    pub fn feed(&mut self, records: Vec<OwnedRecord>) -> Vec<Alert> {
        let batch = Batch {
            partition: 0,
            records: records.iter().map(OwnedRecord::as_record).collect(),
        };
        let out = run_batch(&mut self.consumer, &mut self.host, &batch);
        for (k, v) in out.state {
            match v {
                Some(v) => self.host.state.insert(k, v),
                None => self.host.state.remove(&k),
            };
        }
        self.alerts.extend(out.alerts.iter().cloned());
        self.emits.extend(out.emits);
        out.alerts
    }

    /// Feeds `(subject, payload, event_time)` readings one batch at a time.
    pub fn feed_values(&mut self, readings: &[(&str, &str, u64)]) -> Vec<Alert> {
        let records = readings
            .iter()
            .map(|(s, p, t)| self.record(s, p, *t))
            .collect();
        self.feed(records)
    }

    /// Drops the consumer's in-memory fields and keeps only committed state, as a restart
    /// or failover does.
    pub fn restart(&mut self, config: &str) -> Result<(), String> {
        let mut consumer = C::default();
        consumer.init(config)?;
        self.consumer = consumer;
        Ok(())
    }
}
