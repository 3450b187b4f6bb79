//! Redis, behind one narrow door: a batch's blob goes in, one outcome per event comes out.
//!
//! - `script`: the Lua dedup-and-append script, and the blob format it reads.
//! - `groups`: a batch split by partition, for a Redis Cluster (one call per hash slot).
//! - `store`: the fred client of one shard: connect, call the script, check the partition
//!   count, quit.
//!
//! This layer imports neither intake nor the pipeline; it takes its own settings
//! (`store::StoreSettings`), built by `host`.

pub(crate) mod groups;
pub mod script;
pub mod store;
