//! Guest SDK for Shoal WebAssembly consumers: the one place the consumer ABI will be defined
//! (records in, alerts and emitted records out, batched and postcard-encoded).
//!
//! The ABI arrives with the WebAssembly consumer runtime; until then this crate only pins
//! the ABI version the node and guests will negotiate, so the workspace layout of DESIGN.md
//! is in place and nothing depends on a second copy of these types later.

/// Version of the guest ABI; bumped on any incompatible change.
pub const ABI_VERSION: u32 = 1;
