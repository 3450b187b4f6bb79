//! The end-to-end tests, one binary: each module was a `tests/e2e_<module>.rs` binary of its
//! own and says on its first line what it proves. Every test starts its own `redis-server`
//! (and `shardgate`) on loopback ports, or in network namespaces of its own (`hosts`);
//! `support` is the shared harness.
//!
//! `cargo test --test e2e` runs them all; `cargo test --test e2e <module>::` one module's, e.g.
//! `cargo test --test e2e chaos:: -- --nocapture` the chaos soak. Tests of different modules
//! never run at the same time (`support::turns`), as when each module was its own binary.

#[path = "../support/mod.rs"]
mod support;

mod abuse;
mod auth;
mod chaos;
mod cli;
mod cluster;
mod dedup;
mod durability;
mod flood;
mod garbage;
mod hlog;
mod hosts;
mod metrics;
mod redis_crash;
mod rev2;
mod rolling;
mod shutdown;
mod stall;
mod systemd;
