//! The cluster's peer secret: what every node proves it holds before a peer link carries
//! anything (see [`net::handshake`](crate::net::handshake)). It lives in a file readable by
//! its owner only; `raftkv local` creates one, `raftkv serve --peer-secret-file` reads it.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use rand::RngCore;

use crate::net::handshake::MIN_SECRET_BYTES;

/// The name `raftkv local` gives the secret in its data directory.
pub const SECRET_FILE: &str = "peer-secret";

/// Reads the secret in `path`: its bytes, trailing whitespace dropped. Refuses a file that
/// others may read (as ssh does a private key) and a secret shorter than
/// [`MIN_SECRET_BYTES`].
pub fn read_secret(path: &Path) -> Result<Vec<u8>, String> {
    let meta = fs::metadata(path).map_err(|e| format!("peer secret {}: {e}", path.display()))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(format!(
            "peer secret {}: mode {mode:o} lets others read it; chmod 600 it",
            path.display()
        ));
    }
    let mut secret = fs::read(path).map_err(|e| format!("peer secret {}: {e}", path.display()))?;
    while secret.last().is_some_and(|b| b.is_ascii_whitespace()) {
        secret.pop();
    }
    if secret.len() < MIN_SECRET_BYTES {
        return Err(format!(
            "peer secret {}: {} bytes; at least {MIN_SECRET_BYTES} are needed \
             (e.g. `head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n' > FILE`)",
            path.display(),
            secret.len()
        ));
    }
    Ok(secret)
}

/// Writes a new random secret (32 bytes, hex) to `path` with mode 0600, unless a file is
/// there already (then that one is kept, and checked as [`read_secret`] does).
pub fn create_secret(path: &Path) -> Result<(), String> {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let created = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path);
    match created {
        Ok(mut f) => f
            .write_all(format!("{hex}\n").as_bytes())
            .and_then(|()| f.sync_all())
            .map_err(|e| format!("peer secret {}: {e}", path.display())),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => read_secret(path).map(|_| ()),
        Err(e) => Err(format!("peer secret {}: {e}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_private_read_back_and_checked() {
        let dir = std::env::temp_dir().join(format!("raftkv-secret-{}", std::process::id()));
        fs::create_dir_all(&dir).expect("dir");
        let path = dir.join(SECRET_FILE);
        let _ = fs::remove_file(&path);
        create_secret(&path).expect("create");
        let mode = fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let first = read_secret(&path).expect("read");
        assert_eq!(first.len(), 64);
        create_secret(&path).expect("kept");
        assert_eq!(read_secret(&path).expect("read"), first);
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).expect("chmod");
        assert!(read_secret(&path).unwrap_err().contains("chmod 600"));
        fs::write(&path, "short\n").expect("write");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).expect("chmod");
        assert!(read_secret(&path).unwrap_err().contains("at least"));
        fs::remove_dir_all(&dir).expect("clean up");
    }
}
