//! Guest SDK for Shoal WebAssembly consumers, and the one definition of the consumer ABI.
//!
//! A consumer is a plain Rust type implementing [`Consumer`]; [`export_consumer!`] turns it
//! into a `wasm32-unknown-unknown` module the node can run. The SDK hides pointers,
//! allocation and encoding: the host hands a whole batch of records to the guest in one
//! call (postcard-encoded [`abi::Batch`]) and gets back one [`abi::Output`] with the alerts,
//! emitted records and state changes of the batch. The same consumer runs natively under
//! [`testing::Harness`] for unit tests.
//!
//! ```
//! use shoal_sdk::{Consumer, Context, Record, Severity, export_consumer};
//!
//! #[derive(Default)]
//! struct TooHot { limit: f64 }
//!
//! impl Consumer for TooHot {
//!     fn init(&mut self, config: &str) -> Result<(), String> {
//!         self.limit = shoal_sdk::config_f64(config, "limit").unwrap_or(80.0);
//!         Ok(())
//!     }
//!     fn on_record(&mut self, ctx: &mut Context<'_>, r: &Record<'_>) {
//!         if let Some(v) = r.value("value") && v > self.limit {
//!             ctx.alert(r.subject, Severity::Warning, format!("{v} > {}", self.limit), Some(v));
//!         }
//!     }
//! }
//! export_consumer!(TooHot);
//! ```

/// The README's examples compile as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

pub mod abi;
mod context;
#[doc(hidden)]
pub mod guest;
pub mod testing;

pub use abi::{ABI_VERSION, OwnedRecord, Record, Severity};
pub use context::{Context, Host};

/// A stream consumer: called once per record, in partition order, with a [`Context`] for
/// state, alerts, emitted records, logging and the clock.
pub trait Consumer: Default + 'static {
    /// Called once per instance with the deployment's JSON config (`"{}"` when none).
    fn init(&mut self, config: &str) -> Result<(), String> {
        let _ = config;
        Ok(())
    }

    /// Called for every record matching the deployment's subject filter.
    fn on_record(&mut self, ctx: &mut Context<'_>, record: &Record<'_>);
}

/// Runs one batch through a consumer: the same code path for the wasm glue and the native
/// test harness.
pub fn run_batch<C: Consumer>(
    consumer: &mut C,
    host: &mut dyn Host,
    batch: &abi::Batch<'_>,
) -> abi::Output {
    let mut out = abi::Output::default();
    let mut overlay = std::collections::BTreeMap::new();
    for (i, record) in batch.records.iter().enumerate() {
        let mut ctx = Context::new(host, &mut overlay, &mut out, i as u32, batch.partition);
        consumer.on_record(&mut ctx, record);
    }
    out.state = overlay.into_iter().collect();
    out
}

/// Reads a number from a JSON config object (`{"limit": 80}`), if present.
pub fn config_f64(config: &str, field: &str) -> Option<f64> {
    serde_json::from_str::<serde_json::Value>(config)
        .ok()?
        .get(field)?
        .as_f64()
}

/// Reads a string from a JSON config object, if present.
pub fn config_str(config: &str, field: &str) -> Option<String> {
    serde_json::from_str::<serde_json::Value>(config)
        .ok()?
        .get(field)?
        .as_str()
        .map(str::to_string)
}
