//! The shardgate wire contract (docs/protocol.md, revision 2), as pure functions over bytes.
//!
//! This crate is the leaf of the whole project: the server (`shardgate::wire`), the client
//! crate, the bench and the fuzzers all depend on it, and it depends on none of them. It does no
//! I/O, never allocates on decode, and never panics on any input.
//! - [`frame`]: ACTION frames in, ACK frames out; `check` finds a frame, `parse` verifies it.
//! - [`auth`]: the optional auth tag: per-player keys, tags, the freshness rule.
//! - [`stream`]: a TCP connection's buffered bytes split into whole frames.

pub mod auth;
pub mod frame;
pub mod stream;
