//! Glue between the ABI exports and a [`Consumer`](crate::Consumer) inside a wasm guest.
//! Used only through `export_consumer!`. This is the one place in the SDK with `unsafe`:
//! raw buffers handed over by the host.
#![allow(unsafe_code)]

use std::any::Any;
use std::cell::RefCell;

use crate::abi::{self, Batch, InitResult};
use crate::{Consumer, Host};

thread_local! {
    static INSTANCE: RefCell<Option<Box<dyn Any>>> = const { RefCell::new(None) };
    static OUTPUT: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

#[cfg(target_arch = "wasm32")]
#[link(wasm_import_module = "shoal")]
unsafe extern "C" {
    fn state_get(key_ptr: u32, key_len: u32, dst_ptr: u32, dst_cap: u32) -> i32;
    fn log(level: u32, ptr: u32, len: u32);
    fn now_ms() -> i64;
}

/// The host as seen from inside the guest.
struct Imports;

#[cfg(target_arch = "wasm32")]
impl Host for Imports {
    fn state_get(&mut self, key: &[u8]) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; 64];
        loop {
            // SAFETY: both buffers are valid for the given lengths for the whole call.
            let n = unsafe {
                state_get(
                    key.as_ptr() as u32,
                    key.len() as u32,
                    buf.as_mut_ptr() as u32,
                    buf.len() as u32,
                )
            };
            if n < 0 {
                return None;
            }
            let n = n as usize;
            if n <= buf.len() {
                buf.truncate(n);
                return Some(buf);
            }
            buf.resize(n, 0);
        }
    }
    fn log(&mut self, level: u32, message: &str) {
        // SAFETY: the string is valid for the call.
        unsafe { log(level, message.as_ptr() as u32, message.len() as u32) }
    }
    fn now_ms(&mut self) -> u64 {
        // SAFETY: no arguments.
        unsafe { now_ms() }.max(0) as u64
    }
}

#[cfg(not(target_arch = "wasm32"))]
impl Host for Imports {
    fn state_get(&mut self, _: &[u8]) -> Option<Vec<u8>> {
        None
    }
    fn log(&mut self, _: u32, _: &str) {}
    fn now_ms(&mut self) -> u64 {
        0
    }
}

/// `shoal_alloc`: a buffer of `len` bytes the host writes input into.
pub fn alloc(len: u32) -> u32 {
    let mut v: Vec<u8> = Vec::with_capacity(len as usize);
    let p = v.as_mut_ptr();
    std::mem::forget(v);
    p as usize as u32
}

/// `shoal_dealloc`.
pub fn dealloc(ptr: u32, len: u32) {
    // SAFETY: `ptr` came from `alloc(len)` (the ABI contract).
    unsafe {
        drop(Vec::from_raw_parts(
            ptr as usize as *mut u8,
            0,
            len as usize,
        ))
    }
}

/// Takes ownership of an input buffer the host filled.
fn take_input(ptr: u32, len: u32) -> Vec<u8> {
    // SAFETY: `ptr` came from `alloc(len)` and the host wrote `len` bytes into it.
    unsafe { Vec::from_raw_parts(ptr as usize as *mut u8, len as usize, len as usize) }
}

fn set_output(bytes: Vec<u8>) -> u64 {
    OUTPUT.with(|o| {
        let mut o = o.borrow_mut();
        *o = bytes;
        abi::pack(o.as_ptr() as usize as u32, o.len() as u32)
    })
}

/// `shoal_init`.
pub fn init<C: Consumer>(ptr: u32, len: u32) -> u64 {
    let config = take_input(ptr, len);
    let mut c = C::default();
    let result: InitResult = match std::str::from_utf8(&config) {
        Ok(text) => c.init(text),
        Err(e) => Err(format!("config is not UTF-8: {e}")),
    };
    if result.is_ok() {
        INSTANCE.with(|i| *i.borrow_mut() = Some(Box::new(c)));
    }
    set_output(postcard::to_allocvec(&result).unwrap_or_default())
}

/// `shoal_consume`.
pub fn consume<C: Consumer>(ptr: u32, len: u32) -> u64 {
    let input = take_input(ptr, len);
    let Ok(batch) = postcard::from_bytes::<Batch<'_>>(&input) else {
        // The host never sends this; trap so the host reports it.
        panic!("shoal: undecodable batch");
    };
    let out = INSTANCE.with(|i| {
        let mut slot = i.borrow_mut();
        let c = slot
            .as_mut()
            .and_then(|b| b.downcast_mut::<C>())
            .expect("shoal_init was not called");
        crate::run_batch(c, &mut Imports, &batch)
    });
    set_output(postcard::to_allocvec(&out).unwrap_or_default())
}

/// Exports a [`Consumer`](crate::Consumer) type as a Shoal wasm module.
#[macro_export]
macro_rules! export_consumer {
    ($t:ty) => {
        #[cfg(target_arch = "wasm32")]
        type __ShoalExported = $t;

        #[cfg(target_arch = "wasm32")]
        #[allow(unsafe_code)]
        mod __shoal_exports {
            #[unsafe(no_mangle)]
            pub extern "C" fn shoal_abi_version() -> u32 {
                $crate::ABI_VERSION
            }
            #[unsafe(no_mangle)]
            pub extern "C" fn shoal_alloc(len: u32) -> u32 {
                $crate::guest::alloc(len)
            }
            #[unsafe(no_mangle)]
            pub extern "C" fn shoal_dealloc(ptr: u32, len: u32) {
                $crate::guest::dealloc(ptr, len)
            }
            #[unsafe(no_mangle)]
            pub extern "C" fn shoal_init(ptr: u32, len: u32) -> u64 {
                $crate::guest::init::<super::__ShoalExported>(ptr, len)
            }
            #[unsafe(no_mangle)]
            pub extern "C" fn shoal_consume(ptr: u32, len: u32) -> u64 {
                $crate::guest::consume::<super::__ShoalExported>(ptr, len)
            }
        }
    };
}
