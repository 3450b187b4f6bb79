//! Loading the auth secret files at start: only the service may read them, and each secret's
//! length is within the bounds in `limits.rs`. What a shard does with them is
//! `pipeline::keys`.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::host::config::ConfigError;
use crate::limits;
pub use crate::pipeline::keys::Secrets;

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
    Ok(Secrets::new(files.to_vec(), secrets))
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
            let error = load(&[path]).unwrap_err().to_string();
            assert!(
                error.contains("may be read by group or others") && error.contains("chmod 600"),
                "{error}"
            );
        }
        let path = secret_file(directory.path(), "secret", b"0123456789abcdef", 0o400);
        assert!(load(&[path]).is_ok());
    }

    // One trailing newline is dropped; too short, too long and three files are refused.
    #[test]
    fn secret_bounds_and_newline() {
        let directory = tempfile::tempdir().unwrap();
        let with_newline = secret_file(directory.path(), "a", b"0123456789abcdef\n", 0o600);
        let loaded = load(std::slice::from_ref(&with_newline)).unwrap();
        assert_eq!(loaded.bytes(), vec![b"0123456789abcdef".to_vec()]);
        assert!(
            !format!("{loaded:?}").contains("0123456789abcdef"),
            "Debug must not show the secret"
        );
        let short = secret_file(directory.path(), "b", b"short\n", 0o600);
        assert!(load(&[short]).unwrap_err().to_string().contains("holds 5 bytes"));
        let long = secret_file(directory.path(), "c", &[b'x'; 1025], 0o600);
        assert!(load(&[long]).is_err());
        let three = vec![with_newline.clone(), with_newline.clone(), with_newline];
        assert!(load(&three).unwrap_err().to_string().contains("3 times"));
    }
}
