//! The auth secrets a shard checks frame tags with: one, or two during a rotation.
//!
//! The tag arithmetic lives in `wire::auth`, which the client crate shares; loading the
//! secrets from files (permissions, bounds) is `host::secrets`. Here is only what admission
//! needs: the secrets, and whether a frame's tag is valid under one of them.

use std::fmt;
use std::path::PathBuf;

use crate::limits;
use crate::wire::auth::{is_fresh, player_key, verify};
use crate::wire::frame::Action;

/// The secrets a shard accepts tags from: one, or two during a rotation.
/// Loaded once at start; `Debug` shows the files, never the bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct Secrets {
    files: Vec<PathBuf>,
    secrets: Vec<Vec<u8>>,
}

impl fmt::Debug for Secrets {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("Secrets")
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

impl Secrets {
    /// Secrets already checked against the bounds in `limits.rs` (`host::secrets::load`).
    pub(crate) fn new(files: Vec<PathBuf>, secrets: Vec<Vec<u8>>) -> Secrets {
        assert!(!secrets.is_empty() && secrets.len() <= limits::AUTH_SECRET_FILES_MAX);
        Secrets { files, secrets }
    }

    /// The secret bytes, for the loader's tests.
    #[cfg(test)]
    pub(crate) fn bytes(&self) -> &[Vec<u8>] {
        &self.secrets
    }

    /// Tests-only and tools: secrets from bytes, bounds unchecked.
    pub fn from_bytes(secrets: Vec<Vec<u8>>) -> Secrets {
        Secrets::new(Vec::new(), secrets)
    }

    /// Whether `action` carries a valid tag under any secret and is fresh at
    /// `now_us`. Stateless: the player's key is derived anew for each frame.
    pub fn admits(&self, action: &Action<'_>, now_us: u64, dedup_window_secs: u64) -> bool {
        let Some(tag) = action.auth_tag else {
            return false;
        };
        if !is_fresh(action.client_time_us, now_us, dedup_window_secs) {
            return false;
        }
        self.secrets
            .iter()
            .any(|secret| verify(&player_key(secret, action.id.player_id), action.signed, tag))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::auth::MICROSECONDS_PER_SECOND;

    fn signed_action(secret: &[u8], client_time_us: u64) -> Vec<u8> {
        let fields = crate::wire::frame::ActionFields {
            id: crate::wire::frame::EventId { player_id: 77, seq: 9 },
            client_time_us,
            action_type: 3,
            payload: b"loot",
        };
        let mut out = Vec::new();
        crate::wire::frame::encode_action_signed(&fields, &player_key(secret, 77), &mut out);
        out
    }

    // A frame signed with either secret of a rotation is admitted; another secret's, an
    // unsigned copy, and a stale one are not.
    #[test]
    fn admits_either_rotation_secret_only_when_fresh() {
        let old = b"old-secret-0123456789".to_vec();
        let new = b"new-secret-0123456789".to_vec();
        let rotation = Secrets::from_bytes(vec![old.clone(), new.clone()]);
        let now_us = 1_700_000_000_000_000;
        for secret in [&old, &new] {
            let frame = signed_action(secret, now_us);
            let action = crate::wire::frame::parse(&frame).unwrap();
            assert!(rotation.admits(&action, now_us, 600));
            assert!(
                !rotation.admits(&action, now_us + 301 * MICROSECONDS_PER_SECOND, 600),
                "stale"
            );
        }
        let forged = signed_action(b"attacker-secret-0123", now_us);
        assert!(!rotation.admits(&crate::wire::frame::parse(&forged).unwrap(), now_us, 600));
        let mut unsigned = Vec::new();
        crate::wire::frame::encode_action(
            &crate::wire::frame::ActionFields {
                id: crate::wire::frame::EventId { player_id: 77, seq: 9 },
                client_time_us: now_us,
                action_type: 3,
                payload: b"loot",
            },
            &mut unsigned,
        );
        assert!(!rotation.admits(&crate::wire::frame::parse(&unsigned).unwrap(), now_us, 600));
        let only_new = Secrets::from_bytes(vec![new]);
        assert!(!only_new.admits(
            &crate::wire::frame::parse(&signed_action(&old, now_us)).unwrap(),
            now_us,
            600
        ));
    }
}
