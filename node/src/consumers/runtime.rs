//! The wasmtime sandbox for consumer modules: one `Engine` per node, modules validated and
//! compiled at upload, one instance per (consumer, partition). Each batch runs with a fuel
//! budget (deterministic CPU bound), an epoch deadline (wall-clock bound), a memory cap
//! (`StoreLimits`) and a wasm stack cap. A trap, a timeout or bad output is an error for
//! that consumer and partition only; the instance is then thrown away.
//!
//! Modules may import only `shoal::state_get`, `shoal::log` and `shoal::now_ms` (no WASI,
//! no files, no network); see `shoal_sdk::abi` for the ABI.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use shoal_sdk::abi::{self, Batch, InitResult, Output};
use wasmtime::{
    Caller, Engine, Linker, Memory, Module, Store, StoreLimits, StoreLimitsBuilder, Trap, TypedFunc,
};

use crate::storage::Storage;

/// Largest module accepted at upload.
pub const MAX_MODULE_BYTES: usize = 16 << 20;
/// Largest output one batch may return.
pub const MAX_OUTPUT_BYTES: u32 = 16 << 20;
/// Epoch tick: the wall-clock resolution of batch timeouts.
const TICK: Duration = Duration::from_millis(10);
/// Most log lines a guest may write per batch (the rest are counted, not printed).
const MAX_LOG_LINES: u32 = 50;
/// Longest state key; a longer one traps the call.
pub const MAX_STATE_KEY: u32 = 1024;
/// Bytes of state values an instance caches before the cache is emptied.
const MAX_CACHE_BYTES: usize = 16 << 20;

/// Why a module or a batch failed; shown in the consumer's status.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ConsumerError {
    #[error("invalid module: {0}")]
    Invalid(String),
    #[error("init failed: {0}")]
    Init(String),
    #[error("trapped: {0}")]
    Trap(String),
    #[error("ran out of its CPU budget ({0} fuel units per batch)")]
    OutOfFuel(u64),
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("bad output: {0}")]
    BadOutput(String),
}

/// Resource limits of one batch call.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub fuel_per_record: u64,
    pub fuel_base: u64,
    pub timeout: Duration,
    pub memory_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            fuel_per_record: 2_000_000,
            fuel_base: 20_000_000,
            timeout: Duration::from_secs(2),
            memory_bytes: 64 << 20,
        }
    }
}

/// State behind the host imports of one instance.
pub struct HostCtx {
    limits: StoreLimits,
    storage: Storage,
    consumer: String,
    partition: u32,
    /// Committed state values read so far (the owner is the only writer, so this cache is
    /// coherent; it is updated after each commit).
    cache: HashMap<Vec<u8>, Option<Vec<u8>>>,
    cache_bytes: usize,
    log_lines: u32,
}

impl HostCtx {
    /// Caches a committed value; the cache is emptied when it holds too many bytes (it is
    /// only a cache: a miss reads redb).
    fn cache_insert(&mut self, key: Vec<u8>, value: Option<Vec<u8>>) {
        let size = key.len() + value.as_ref().map_or(0, Vec::len) + 32;
        if self.cache_bytes + size > MAX_CACHE_BYTES {
            self.cache.clear();
            self.cache_bytes = 0;
        }
        self.cache_bytes += size;
        self.cache.insert(key, value);
    }
}

/// The node's wasm engine and the host functions.
pub struct Runtime {
    engine: Engine,
    fuel: bool,
    linker: Linker<HostCtx>,
    stop: Arc<AtomicBool>,
    ticker: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Runtime {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.ticker.take() {
            let _ = t.join();
        }
    }
}

fn memory_of(caller: &mut Caller<'_, HostCtx>) -> wasmtime::Result<Memory> {
    caller
        .get_export("memory")
        .and_then(|e| e.into_memory())
        .ok_or_else(|| wasmtime::Error::msg("module exports no memory"))
}

fn guest_bytes(
    mem: &Memory,
    caller: &Caller<'_, HostCtx>,
    ptr: u32,
    len: u32,
) -> wasmtime::Result<Vec<u8>> {
    let start = ptr as usize;
    let end = start
        .checked_add(len as usize)
        .ok_or_else(|| wasmtime::Error::msg("pointer overflow"))?;
    mem.data(caller)
        .get(start..end)
        .map(<[u8]>::to_vec)
        .ok_or_else(|| wasmtime::Error::msg("out-of-bounds guest buffer"))
}

impl Runtime {
    /// A runtime; `fuel` adds a deterministic instruction budget on top of the wall-clock
    /// deadline (epochs), at some cost in speed.
    pub fn new(fuel: bool) -> anyhow::Result<Runtime> {
        let mut cfg = wasmtime::Config::new();
        cfg.consume_fuel(fuel);
        cfg.epoch_interruption(true);
        cfg.max_wasm_stack(512 << 10);
        cfg.cranelift_opt_level(wasmtime::OptLevel::Speed);
        let engine = Engine::new(&cfg).map_err(wt)?;
        let mut linker: Linker<HostCtx> = Linker::new(&engine);
        linker
            .func_wrap(
                abi::IMPORT_MODULE,
                "state_get",
                |mut caller: Caller<'_, HostCtx>,
                 kp: u32,
                 kl: u32,
                 dp: u32,
                 dc: u32|
                 -> wasmtime::Result<i32> {
                    let mem = memory_of(&mut caller)?;
                    let key = guest_bytes(&mem, &caller, kp, kl)?;
                    let value = {
                        let ctx = caller.data_mut();
                        match ctx.cache.get(&key) {
                            Some(v) => v.clone(),
                            None => {
                                let v = ctx
                                    .storage
                                    .consumer_state(&ctx.consumer, ctx.partition, &key)
                                    .map_err(|e| {
                                        wasmtime::Error::msg(format!("state read failed: {e}"))
                                    })?;
                                ctx.cache.insert(key, v.clone());
                                v
                            }
                        }
                    };
                    let Some(value) = value else { return Ok(-1) };
                    let n = value.len().min(dc as usize);
                    let start = dp as usize;
                    let dst = mem
                        .data_mut(&mut caller)
                        .get_mut(start..start + n)
                        .ok_or_else(|| wasmtime::Error::msg("out-of-bounds state buffer"))?;
                    dst.copy_from_slice(&value[..n]);
                    Ok(i32::try_from(value.len()).unwrap_or(i32::MAX))
                },
            )
            .map_err(wt)?;
        linker
            .func_wrap(
                abi::IMPORT_MODULE,
                "log",
                |mut caller: Caller<'_, HostCtx>,
                 level: u32,
                 ptr: u32,
                 len: u32|
                 -> wasmtime::Result<()> {
                    let mem = memory_of(&mut caller)?;
                    let bytes = guest_bytes(&mem, &caller, ptr, len.min(1024))?;
                    let ctx = caller.data_mut();
                    ctx.log_lines += 1;
                    if ctx.log_lines <= MAX_LOG_LINES {
                        let msg = String::from_utf8_lossy(&bytes);
                        let (c, p) = (&ctx.consumer, ctx.partition);
                        match level {
                            0 => tracing::error!(consumer = %c, partition = p, "{msg}"),
                            1 => tracing::warn!(consumer = %c, partition = p, "{msg}"),
                            2 => tracing::info!(consumer = %c, partition = p, "{msg}"),
                            _ => tracing::debug!(consumer = %c, partition = p, "{msg}"),
                        }
                    }
                    Ok(())
                },
            )
            .map_err(wt)?;
        linker
            .func_wrap(abi::IMPORT_MODULE, "now_ms", || -> i64 {
                crate::types::now_ms() as i64
            })
            .map_err(wt)?;
        let stop = Arc::new(AtomicBool::new(false));
        let (e, s) = (engine.clone(), stop.clone());
        let ticker = std::thread::Builder::new()
            .name("shoal-wasm-epoch".into())
            .spawn(move || {
                while !s.load(Ordering::Relaxed) {
                    std::thread::sleep(TICK);
                    e.increment_epoch();
                }
            })?;
        Ok(Runtime {
            engine,
            fuel,
            linker,
            stop,
            ticker: Some(ticker),
        })
    }

    /// Validates and compiles an uploaded module (blocking: call from `spawn_blocking`).
    /// Checks its imports and exports against the ABI so a bad module is refused at
    /// upload, with the reason.
    pub fn compile(&self, bytes: &[u8]) -> Result<Module, ConsumerError> {
        if bytes.len() > MAX_MODULE_BYTES {
            return Err(ConsumerError::Invalid(format!(
                "module is {} bytes; the limit is {MAX_MODULE_BYTES}",
                bytes.len()
            )));
        }
        if !bytes.starts_with(b"\0asm") {
            return Err(ConsumerError::Invalid(
                "not a WebAssembly binary (no \\0asm header); upload the .wasm file built for wasm32-unknown-unknown".into(),
            ));
        }
        let module = Module::from_binary(&self.engine, bytes)
            .map_err(|e| ConsumerError::Invalid(format!("{e:#}")))?;
        for import in module.imports() {
            let ok = import.module() == abi::IMPORT_MODULE
                && matches!(import.name(), "state_get" | "log" | "now_ms");
            if !ok {
                return Err(ConsumerError::Invalid(format!(
                    "imports {}::{}; Shoal modules may import only shoal::state_get, shoal::log and shoal::now_ms (no WASI): build for wasm32-unknown-unknown with shoal-sdk",
                    import.module(),
                    import.name()
                )));
            }
        }
        for needed in [
            "memory",
            "shoal_abi_version",
            "shoal_alloc",
            "shoal_init",
            "shoal_consume",
        ] {
            if module.get_export(needed).is_none() {
                return Err(ConsumerError::Invalid(format!(
                    "does not export {needed}; use shoal_sdk::export_consumer!"
                )));
            }
        }
        Ok(module)
    }

    /// Instantiates a module for one partition and runs its `init` (blocking).
    pub fn instantiate(
        &self,
        module: &Module,
        config: &str,
        storage: Storage,
        consumer: &str,
        partition: u32,
        limits: Limits,
    ) -> Result<Instance, ConsumerError> {
        let ctx = HostCtx {
            limits: StoreLimitsBuilder::new()
                .memory_size(limits.memory_bytes)
                .table_elements(100_000)
                .instances(1)
                .tables(4)
                .memories(1)
                .build(),
            storage,
            consumer: consumer.to_string(),
            partition,
            cache: HashMap::new(),
            cache_bytes: 0,
            log_lines: 0,
        };
        let mut store = Store::new(&self.engine, ctx);
        store.limiter(|c| &mut c.limits);
        if self.fuel {
            store
                .set_fuel(limits.fuel_base)
                .map_err(|e| ConsumerError::Invalid(e.to_string()))?;
        }
        store.set_epoch_deadline(ticks(limits.timeout));
        store.epoch_deadline_trap();
        let instance = self
            .linker
            .instantiate(&mut store, module)
            .map_err(|e| classify(e, &limits, limits.fuel_base, ConsumerError::Init))?;
        let bad = |what: &str, e: wasmtime::Error| ConsumerError::Invalid(format!("{what}: {e}"));
        let memory = instance
            .get_memory(&mut store, "memory")
            .ok_or_else(|| ConsumerError::Invalid("no memory export".into()))?;
        let version: TypedFunc<(), u32> = instance
            .get_typed_func(&mut store, "shoal_abi_version")
            .map_err(|e| bad("shoal_abi_version", e))?;
        let alloc = instance
            .get_typed_func(&mut store, "shoal_alloc")
            .map_err(|e| bad("shoal_alloc", e))?;
        let init: TypedFunc<(u32, u32), u64> = instance
            .get_typed_func(&mut store, "shoal_init")
            .map_err(|e| bad("shoal_init", e))?;
        let consume = instance
            .get_typed_func(&mut store, "shoal_consume")
            .map_err(|e| bad("shoal_consume", e))?;
        let v = version
            .call(&mut store, ())
            .map_err(|e| classify(e, &limits, limits.fuel_base, ConsumerError::Init))?;
        if v != abi::ABI_VERSION {
            return Err(ConsumerError::Invalid(format!(
                "built for ABI version {v}; this node speaks {}",
                abi::ABI_VERSION
            )));
        }
        let mut inst = Instance {
            fuel: self.fuel,
            store,
            memory,
            alloc,
            consume,
            limits,
        };
        let out = inst
            .call(init, config.as_bytes(), limits.fuel_base)
            .map_err(|e| match e {
                ConsumerError::Trap(t) => ConsumerError::Init(t),
                other => other,
            })?;
        let result: InitResult = postcard::from_bytes(&out)
            .map_err(|e| ConsumerError::BadOutput(format!("init result: {e}")))?;
        result.map_err(ConsumerError::Init)?;
        Ok(inst)
    }
}

/// Encodes a batch for [`Instance::consume_encoded`].
pub fn encode_batch(batch: &Batch<'_>) -> Result<Vec<u8>, ConsumerError> {
    postcard::to_allocvec(batch)
        .map_err(|e| ConsumerError::BadOutput(format!("encoding the batch: {e}")))
}

/// wasmtime's error type is not `std::error::Error`; keep its full chain as text.
fn wt(e: wasmtime::Error) -> anyhow::Error {
    anyhow::anyhow!("{e:#}")
}

fn ticks(timeout: Duration) -> u64 {
    (timeout.as_millis() / TICK.as_millis()).max(1) as u64
}

fn classify(
    e: wasmtime::Error,
    limits: &Limits,
    fuel: u64,
    other: fn(String) -> ConsumerError,
) -> ConsumerError {
    match e.downcast_ref::<Trap>() {
        Some(Trap::OutOfFuel) => ConsumerError::OutOfFuel(fuel),
        Some(Trap::Interrupt) => ConsumerError::Timeout(limits.timeout),
        Some(t) => ConsumerError::Trap(t.to_string()),
        None => other(format!("{e:#}")),
    }
}

/// One consumer instance for one partition.
pub struct Instance {
    fuel: bool,
    store: Store<HostCtx>,
    memory: Memory,
    alloc: TypedFunc<u32, u32>,
    consume: TypedFunc<(u32, u32), u64>,
    limits: Limits,
}

impl Instance {
    /// Copies `input` into the guest, calls `f`, and copies the output back.
    fn call(
        &mut self,
        f: TypedFunc<(u32, u32), u64>,
        input: &[u8],
        fuel: u64,
    ) -> Result<Vec<u8>, ConsumerError> {
        let limits = self.limits;
        if self.fuel {
            self.store
                .set_fuel(fuel)
                .map_err(|e| ConsumerError::Trap(e.to_string()))?;
        }
        self.store.set_epoch_deadline(ticks(limits.timeout));
        self.store.data_mut().log_lines = 0;
        let len = u32::try_from(input.len())
            .map_err(|_| ConsumerError::BadOutput("input too large".into()))?;
        let ptr = self
            .alloc
            .call(&mut self.store, len)
            .map_err(|e| classify(e, &limits, fuel, ConsumerError::Trap))?;
        self.memory
            .write(&mut self.store, ptr as usize, input)
            .map_err(|e| {
                ConsumerError::BadOutput(format!("shoal_alloc returned a bad buffer: {e}"))
            })?;
        let packed = f
            .call(&mut self.store, (ptr, len))
            .map_err(|e| classify(e, &limits, fuel, ConsumerError::Trap))?;
        let (optr, olen) = abi::unpack(packed);
        if olen > MAX_OUTPUT_BYTES {
            return Err(ConsumerError::BadOutput(format!(
                "output of {olen} bytes exceeds the {MAX_OUTPUT_BYTES}-byte limit"
            )));
        }
        let start = optr as usize;
        self.memory
            .data(&self.store)
            .get(start..start + olen as usize)
            .map(<[u8]>::to_vec)
            .ok_or_else(|| ConsumerError::BadOutput("output points outside guest memory".into()))
    }

    /// Runs one batch.
    pub fn consume(&mut self, batch: &Batch<'_>) -> Result<Output, ConsumerError> {
        let input = encode_batch(batch)?;
        self.consume_encoded(&input, batch.records.len())
    }

    /// Runs one batch already encoded with [`encode_batch`].
    pub fn consume_encoded(
        &mut self,
        input: &[u8],
        records: usize,
    ) -> Result<Output, ConsumerError> {
        let fuel = self.limits.fuel_base + self.limits.fuel_per_record * records as u64;
        let out = self.call(self.consume.clone(), input, fuel)?;
        let (output, rest) = postcard::take_from_bytes::<Output>(&out)
            .map_err(|e| ConsumerError::BadOutput(format!("undecodable output: {e}")))?;
        if !rest.is_empty() {
            return Err(ConsumerError::BadOutput(format!(
                "{} trailing output bytes",
                rest.len()
            )));
        }
        Ok(output)
    }

    /// Fuel left after the last call (0 when fuel is off).
    pub fn fuel_left(&self) -> u64 {
        if self.fuel {
            self.store.get_fuel().unwrap_or(0)
        } else {
            0
        }
    }

    /// Records committed state changes in the instance's cache.
    pub fn committed(&mut self, changes: &[(Vec<u8>, Option<Vec<u8>>)]) {
        let ctx = self.store.data_mut();
        for (k, v) in changes {
            ctx.cache_insert(k.clone(), v.clone());
        }
    }
}
