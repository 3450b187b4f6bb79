//! The auth secrets a server accepts tags under: loaded once at start from files only the
//! service may read, one secret or two during a rotation.
//!
//! The tag arithmetic itself lives in `auth.rs`, which the client crate shares; this file holds
//! what only the server needs (files, permissions, bounds), so the client never links `config`.

use std::fmt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::auth::{is_fresh, player_key, verify};
use crate::config::ConfigError;
use crate::frame::Action;
use crate::limits;

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
    /// Reads each file, refusing one that group or others may read, or whose
    /// length is outside the bounds in `limits.rs`. One trailing newline is
    /// not part of the secret: editors and `echo` add it.
    pub fn load(files: &[PathBuf]) -> Result<Secrets, ConfigError> {
        if files.is_empty() || files.len() > limits::AUTH_SECRET_FILES_MAX {
            return Err(ConfigError::new(format!(
                "--auth-secret-file is given {} times; give it once, or twice during a rotation",
                files.len()
            )));
        }
        let secrets = files.iter().map(|file| read_secret(file)).collect::<Result<_, _>>()?;
        Ok(Secrets {
            files: files.to_vec(),
            secrets,
        })
    }

    /// Tests-only and tools: secrets from bytes, bounds unchecked.
    pub fn from_bytes(secrets: Vec<Vec<u8>>) -> Secrets {
        assert!(!secrets.is_empty() && secrets.len() <= limits::AUTH_SECRET_FILES_MAX);
        Secrets {
            files: Vec::new(),
            secrets,
        }
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

fn read_secret(file: &Path) -> Result<Vec<u8>, ConfigError> {
    let cannot =
        |error: std::io::Error| ConfigError::new(format!("cannot read auth secret file {}: {error}", file.display()));
    let mode = std::fs::metadata(file).map_err(cannot)?.permissions().mode();
    if mode & 0o077 != 0 {
        return Err(ConfigError::new(format!(
            "auth secret file {} may be read by group or others (mode {:o}); chmod 600 it",
            file.display(),
            mode & 0o777
        )));
    }
    let mut secret = std::fs::read(file).map_err(cannot)?;
    if secret.ends_with(b"\n") {
        secret.pop();
        if secret.ends_with(b"\r") {
            secret.pop();
        }
    }
    if !(limits::AUTH_SECRET_BYTES_MIN..=limits::AUTH_SECRET_BYTES_MAX).contains(&secret.len()) {
        return Err(ConfigError::new(format!(
            "auth secret file {} holds {} bytes; a secret is {} to {} bytes",
            file.display(),
            secret.len(),
            limits::AUTH_SECRET_BYTES_MIN,
            limits::AUTH_SECRET_BYTES_MAX
        )));
    }
    Ok(secret)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::MICROSECONDS_PER_SECOND;

    fn secret_file(directory: &Path, name: &str, bytes: &[u8], mode: u32) -> PathBuf {
        let path = directory.join(name);
        std::fs::write(&path, bytes).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        path
    }

    // A file group or others may read is refused with the mode and the fix in the message.
    #[test]
    fn readable_secret_file_is_refused() {
        let directory = tempfile::tempdir().unwrap();
        for mode in [0o644, 0o640, 0o604] {
            let path = secret_file(directory.path(), "secret", b"0123456789abcdef", mode);
            let error = Secrets::load(&[path]).unwrap_err().to_string();
            assert!(
                error.contains("may be read by group or others") && error.contains("chmod 600"),
                "{error}"
            );
        }
        let path = secret_file(directory.path(), "secret", b"0123456789abcdef", 0o400);
        assert!(Secrets::load(&[path]).is_ok());
    }

    // One trailing newline is dropped; too short, too long and three files are refused.
    #[test]
    fn secret_bounds_and_newline() {
        let directory = tempfile::tempdir().unwrap();
        let with_newline = secret_file(directory.path(), "a", b"0123456789abcdef\n", 0o600);
        let loaded = Secrets::load(std::slice::from_ref(&with_newline)).unwrap();
        assert_eq!(loaded.secrets, vec![b"0123456789abcdef".to_vec()]);
        assert!(
            !format!("{loaded:?}").contains("0123456789abcdef"),
            "Debug must not show the secret"
        );
        let short = secret_file(directory.path(), "b", b"short\n", 0o600);
        assert!(Secrets::load(&[short])
            .unwrap_err()
            .to_string()
            .contains("holds 5 bytes"));
        let long = secret_file(directory.path(), "c", &[b'x'; 1025], 0o600);
        assert!(Secrets::load(&[long]).is_err());
        let three = vec![with_newline.clone(), with_newline.clone(), with_newline];
        assert!(Secrets::load(&three).unwrap_err().to_string().contains("3 times"));
    }

    fn signed_action(secret: &[u8], client_time_us: u64) -> Vec<u8> {
        let fields = crate::frame::ActionFields {
            id: crate::frame::EventId { player_id: 77, seq: 9 },
            client_time_us,
            action_type: 3,
            payload: b"loot",
        };
        let mut out = Vec::new();
        crate::frame::encode_action_signed(&fields, &player_key(secret, 77), &mut out);
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
            let action = crate::frame::parse(&frame).unwrap();
            assert!(rotation.admits(&action, now_us, 600));
            assert!(
                !rotation.admits(&action, now_us + 301 * MICROSECONDS_PER_SECOND, 600),
                "stale"
            );
        }
        let forged = signed_action(b"attacker-secret-0123", now_us);
        assert!(!rotation.admits(&crate::frame::parse(&forged).unwrap(), now_us, 600));
        let mut unsigned = Vec::new();
        crate::frame::encode_action(
            &crate::frame::ActionFields {
                id: crate::frame::EventId { player_id: 77, seq: 9 },
                client_time_us: now_us,
                action_type: 3,
                payload: b"loot",
            },
            &mut unsigned,
        );
        assert!(!rotation.admits(&crate::frame::parse(&unsigned).unwrap(), now_us, 600));
        let only_new = Secrets::from_bytes(vec![new]);
        assert!(!only_new.admits(&crate::frame::parse(&signed_action(&old, now_us)).unwrap(), now_us, 600));
    }
}
