//! One shard's Redis connection and the script call that stores a batch.
//!
//! Each shard has its own fred client on the glommio runtime. Batches are sent
//! as concurrent `EVALSHA` commands on that one client: fred pipelines
//! concurrent commands by itself. The explicit `pipeline()` API is avoided
//! because under glommio fred 10.1 broke the connection with it ("invalid
//! buffer response index").
//!
//! fred's glommio mode still calls `tokio::time` for connection and command
//! timeouts; without a Tokio time driver it panics at connect and on every
//! disconnect. `TimeDriver` is a one-thread Tokio runtime with only the time
//! driver, whose handle each shard thread enters for its whole life.
//!
//! The client never gives up reconnecting (exponential backoff to 1 s), and
//! the first connection uses the same policy (`fail_fast = false`), so a
//! server started while Redis is down comes up and answers RETRY until Redis
//! is back. Every call has a timeout. A call that times out may still run in
//! Redis later; that is safe because the script is idempotent per event id.

use std::fmt;
use std::time::Duration;

use bytes::Bytes;
use fred::prelude::{ClientLike, Config as FredConfig, ReconnectPolicy, Value};
use fred::types::scripts::Script;
use fred::types::Builder;

use crate::config::Config;
use crate::metrics::RedisErrorKind;
use crate::script::{DEDUP_APPEND_LUA, OUTCOME_ALREADY_STORED, OUTCOME_APPENDED};

/// Reconnect backoff: quick first retries for a restart, capped at 1 s.
const RECONNECT_DELAY_MS_MIN: u32 = 10;
const RECONNECT_DELAY_MS_MAX: u32 = 1_000;
const CONNECT_TIMEOUT_MS: u64 = 1_000;
const QUIT_TIMEOUT: Duration = Duration::from_millis(100);

/// Keeps a Tokio time driver running for fred; see the module doc.
pub struct TimeDriver {
    handle: tokio::runtime::Handle,
}

impl TimeDriver {
    pub fn start() -> std::io::Result<TimeDriver> {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_time().build()?;
        let handle = runtime.handle().clone();
        std::thread::Builder::new()
            .name("shardgate-timers".into())
            .spawn(move || runtime.block_on(std::future::pending::<()>()))?;
        Ok(TimeDriver { handle })
    }

    pub fn handle(&self) -> tokio::runtime::Handle {
        self.handle.clone()
    }
}

/// Why a batch was not stored. All of them answer RETRY.
#[derive(Debug)]
pub struct StoreError {
    kind: RedisErrorKind,
    message: String,
}

impl fmt::Display for StoreError {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(&self.message)
    }
}

impl StoreError {
    fn new(kind: RedisErrorKind, message: String) -> StoreError {
        StoreError { kind, message }
    }

    fn from_fred(error: &fred::error::Error) -> StoreError {
        use fred::error::ErrorKind;
        let kind = match error.kind() {
            ErrorKind::Timeout => RedisErrorKind::Timeout,
            ErrorKind::IO | ErrorKind::Canceled | ErrorKind::Backpressure => RedisErrorKind::Connection,
            _ => RedisErrorKind::Script,
        };
        StoreError::new(kind, format!("redis script failed: {error}"))
    }

    pub fn kind(&self) -> RedisErrorKind {
        self.kind
    }
}

impl std::error::Error for StoreError {}

impl StoreError {
    /// The drain deadline passed while the call was in Redis.
    pub fn abandoned() -> StoreError {
        StoreError::new(
            RedisErrorKind::Abandoned,
            "shutdown drain deadline passed before redis answered".into(),
        )
    }
}

/// What Redis said about one event of a batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Newly marked and appended: ACCEPTED.
    Appended,
    /// The marker was there: an earlier copy is stored. DUPLICATE.
    AlreadyStored,
}

pub struct Store {
    client: fred::clients::Client,
    script: Script,
    prefix: Bytes,
    window_secs: Bytes,
}

impl Store {
    /// Builds the client; `connect` starts it. Must run on a shard thread that
    /// has entered the `TimeDriver`.
    pub fn new(config: &Config) -> Result<Store, StoreError> {
        let fred_config = FredConfig::from_url(config.redis_url.expose())
            .map_err(|error| StoreError::new(RedisErrorKind::Connection, format!("invalid redis url: {error}")))?;
        let mut builder = Builder::from_config(fred_config);
        builder
            .with_config(|fred_config| fred_config.fail_fast = false)
            .with_performance_config(|performance| {
                performance.default_command_timeout = Duration::from_millis(config.redis_timeout_ms);
            })
            .with_connection_config(|connection| {
                connection.connection_timeout = Duration::from_millis(CONNECT_TIMEOUT_MS);
                connection.internal_command_timeout = Duration::from_millis(config.redis_timeout_ms);
            })
            .set_policy(ReconnectPolicy::new_exponential(
                0,
                RECONNECT_DELAY_MS_MIN,
                RECONNECT_DELAY_MS_MAX,
                2,
            ));
        let client = builder.build().map_err(|error| {
            StoreError::new(
                RedisErrorKind::Connection,
                format!("cannot build redis client: {error}"),
            )
        })?;
        Ok(Store {
            client,
            script: Script::from_lua(DEDUP_APPEND_LUA),
            prefix: Bytes::copy_from_slice(config.prefix.as_bytes()),
            window_secs: Bytes::copy_from_slice(config.dedup_window_secs.to_string().as_bytes()),
        })
    }

    /// Starts the connection task; it reconnects forever.
    pub fn connect(&self) {
        let _connection_task = self.client.connect();
    }

    pub fn is_connected(&self) -> bool {
        self.client.is_connected()
    }

    /// Runs the script on one batch. `outcomes` receives one entry per event,
    /// in order. On error nothing is known about any event of the batch.
    pub async fn dedup_append(
        &self,
        event_count: usize,
        blob: Bytes,
        outcomes: &mut Vec<Outcome>,
    ) -> Result<(), StoreError> {
        outcomes.clear();
        let arguments = vec![
            Value::Bytes(self.prefix.clone()),
            Value::Bytes(self.window_secs.clone()),
            Value::Integer(event_count as i64),
            Value::Bytes(blob),
        ];
        let reply: Value = self
            .script
            .evalsha_with_reload(&self.client, Vec::<fred::types::Key>::new(), arguments)
            .await
            .map_err(|error| StoreError::from_fred(&error))?;
        decode_outcomes(&reply, event_count, outcomes)
    }

    /// Closes the connection; bounded, since a client still trying to connect
    /// would otherwise wait out its connect timeout.
    pub async fn quit(&self) {
        let quit = async {
            let _ = self.client.quit().await;
        };
        futures_lite::future::or(quit, glommio::timer::sleep(QUIT_TIMEOUT)).await;
    }
}

/// Reads the script's reply: exactly one `A` or `D` per event.
fn decode_outcomes(reply: &Value, event_count: usize, outcomes: &mut Vec<Outcome>) -> Result<(), StoreError> {
    let bytes: &[u8] = match reply {
        Value::String(text) => text.as_bytes(),
        Value::Bytes(bytes) => bytes,
        other => {
            return Err(StoreError::new(
                RedisErrorKind::Script,
                format!("redis script replied with an unexpected type: {:?}", other.kind()),
            ))
        }
    };
    if bytes.len() != event_count {
        return Err(StoreError::new(
            RedisErrorKind::Script,
            format!("redis script answered {} events of {event_count}", bytes.len()),
        ));
    }
    for &byte in bytes {
        let outcome = match byte {
            OUTCOME_APPENDED => Outcome::Appended,
            OUTCOME_ALREADY_STORED => Outcome::AlreadyStored,
            _ => {
                return Err(StoreError::new(
                    RedisErrorKind::Script,
                    format!("redis script answered an unknown outcome {byte:#04x}"),
                ))
            }
        };
        outcomes.push(outcome);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reply of the right length decodes in order; anything else is an error, never a guess.
    #[test]
    fn outcomes_decode_strictly() {
        let mut outcomes = Vec::new();
        decode_outcomes(&Value::Bytes(Bytes::from_static(b"ADA")), 3, &mut outcomes).unwrap();
        assert_eq!(
            outcomes,
            vec![Outcome::Appended, Outcome::AlreadyStored, Outcome::Appended]
        );
        assert!(decode_outcomes(&Value::Bytes(Bytes::from_static(b"AD")), 3, &mut outcomes).is_err());
        assert!(decode_outcomes(&Value::Bytes(Bytes::from_static(b"AX")), 2, &mut outcomes).is_err());
        assert!(decode_outcomes(&Value::Integer(1), 1, &mut outcomes).is_err());
    }
}
