//! Runnable walk-throughs of Shoal live in this crate's `examples/` directory as they are
//! written (quick start cluster, anomaly detection on SKAB data). The five-minute tour in
//! README.md needs nothing but the `shoal` binary and the mosquitto clients.
