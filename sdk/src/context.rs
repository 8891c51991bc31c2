//! The `Context` a consumer gets for each record: persisted key-value state (scoped to the
//! consumer and partition), alerts, emitted records, logging and the clock.

use std::collections::BTreeMap;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::abi::{Alert, Emit, Output, Severity};

/// What the runtime provides: in wasm, the host imports; natively, the test harness.
pub trait Host {
    /// The committed value of a state key.
    fn state_get(&mut self, key: &[u8]) -> Option<Vec<u8>>;
    /// 0 = error, 1 = warn, 2 = info, 3 = debug.
    fn log(&mut self, level: u32, message: &str);
    fn now_ms(&mut self) -> u64;
}

/// Per-record handle for a consumer.
pub struct Context<'a> {
    host: &'a mut dyn Host,
    overlay: &'a mut BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    out: &'a mut Output,
    index: u32,
    partition: u32,
}

impl<'a> Context<'a> {
    pub(crate) fn new(
        host: &'a mut dyn Host,
        overlay: &'a mut BTreeMap<Vec<u8>, Option<Vec<u8>>>,
        out: &'a mut Output,
        index: u32,
        partition: u32,
    ) -> Self {
        Context {
            host,
            overlay,
            out,
            index,
            partition,
        }
    }

    /// The partition being processed.
    pub fn partition(&self) -> u32 {
        self.partition
    }

    /// Reads a state value (changes made earlier in this batch are visible).
    pub fn get(&mut self, key: &[u8]) -> Option<Vec<u8>> {
        match self.overlay.get(key) {
            Some(v) => v.clone(),
            None => self.host.state_get(key),
        }
    }

    /// Writes a state value; committed with the batch, atomically with its cursor.
    pub fn set(&mut self, key: &[u8], value: Vec<u8>) {
        self.overlay.insert(key.to_vec(), Some(value));
    }

    pub fn delete(&mut self, key: &[u8]) {
        self.overlay.insert(key.to_vec(), None);
    }

    /// Reads a typed state value (postcard).
    pub fn get_as<T: DeserializeOwned>(&mut self, key: &str) -> Option<T> {
        let bytes = self.get(key.as_bytes())?;
        postcard::from_bytes(&bytes).ok()
    }

    /// Writes a typed state value (postcard).
    pub fn set_as<T: Serialize>(&mut self, key: &str, value: &T) {
        if let Ok(bytes) = postcard::to_allocvec(value) {
            self.set(key.as_bytes(), bytes);
        }
    }

    /// Raises an alert about `key` (e.g. the sensor's subject).
    pub fn alert(
        &mut self,
        key: &str,
        severity: Severity,
        message: impl Into<String>,
        value: Option<f64>,
    ) {
        self.out.alerts.push(Alert {
            record_index: self.index,
            key: key.to_string(),
            severity,
            message: message.into(),
            value,
        });
    }

    /// Appends a record to `topic` (created by the operator beforehand).
    pub fn emit(&mut self, topic: &str, key: &[u8], subject: &str, payload: Vec<u8>) {
        self.out.emits.push(Emit {
            record_index: self.index,
            topic: topic.to_string(),
            key: key.to_vec(),
            subject: subject.to_string(),
            payload,
        });
    }

    pub fn log(&mut self, message: &str) {
        self.host.log(2, message);
    }

    pub fn warn(&mut self, message: &str) {
        self.host.log(1, message);
    }

    /// Wall-clock Unix milliseconds (prefer record event times for logic).
    pub fn now_ms(&mut self) -> u64 {
        self.host.now_ms()
    }
}
