//! The client password (Redis's `requirepass`): read from a file, never logged, compared in
//! time that does not depend on where a guess first differs from it.

use std::fmt;
use std::path::Path;

/// The longest password taken, in bytes. Comparisons always run over at least this many
/// bytes, so their time does not reveal the password's length either.
pub const MAX_PASSWORD_BYTES: usize = 512;

/// The password every client must give (`AUTH`, `HELLO … AUTH`) before any other command.
#[derive(Clone)]
pub struct Password(Vec<u8>);

/// Why a password file cannot be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PasswordError {
    Read { path: String, reason: String },
    Empty { path: String },
    TooLong { path: String, len: usize },
}

impl fmt::Display for PasswordError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PasswordError::Read { path, reason } => {
                write!(f, "cannot read the password file {path}: {reason}")
            }
            PasswordError::Empty { path } => write!(f, "the password file {path} is empty"),
            PasswordError::TooLong { path, len } => write!(
                f,
                "the password in {path} is {len} bytes long; at most {MAX_PASSWORD_BYTES}"
            ),
        }
    }
}

impl std::error::Error for PasswordError {}

impl Password {
    /// A password of 1 to [`MAX_PASSWORD_BYTES`] bytes.
    pub fn new(bytes: &[u8]) -> Option<Password> {
        (!bytes.is_empty() && bytes.len() <= MAX_PASSWORD_BYTES).then(|| Password(bytes.to_vec()))
    }

    /// The file's contents without one trailing newline (`\n` or `\r\n`), as `echo pw > FILE`
    /// writes it.
    pub fn from_file(path: &Path) -> Result<Password, PasswordError> {
        let shown = path.display().to_string();
        let mut bytes = std::fs::read(path).map_err(|e| PasswordError::Read {
            path: shown.clone(),
            reason: e.to_string(),
        })?;
        if bytes.last() == Some(&b'\n') {
            bytes.pop();
            if bytes.last() == Some(&b'\r') {
                bytes.pop();
            }
        }
        if bytes.is_empty() {
            return Err(PasswordError::Empty { path: shown });
        }
        if bytes.len() > MAX_PASSWORD_BYTES {
            return Err(PasswordError::TooLong {
                path: shown,
                len: bytes.len(),
            });
        }
        Ok(Password(bytes))
    }

    /// Whether `given` is the password. Every byte position up to the longer of
    /// [`MAX_PASSWORD_BYTES`] and `given.len()` is compared, whatever differs first, so the
    /// time taken depends only on the length of the guess.
    pub fn matches(&self, given: &[u8]) -> bool {
        let span = MAX_PASSWORD_BYTES.max(given.len());
        let mut diff = u8::from(self.0.len() != given.len());
        for i in 0..span {
            let a = self.0.get(i).copied().unwrap_or(0);
            let b = given.get(i).copied().unwrap_or(0);
            diff |= std::hint::black_box(a ^ b);
        }
        diff == 0
    }
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Password(..)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_only_the_exact_password() {
        let pw = Password::new(b"s3cret").unwrap();
        assert!(pw.matches(b"s3cret"));
        for wrong in [
            &b""[..],
            b"s3cre",
            b"s3crett",
            b"S3cret",
            b"s3cret\0",
            &[0u8; 600],
        ] {
            assert!(!pw.matches(wrong), "{wrong:?}");
        }
        assert!(Password::new(b"").is_none());
        assert!(Password::new(&[b'x'; MAX_PASSWORD_BYTES + 1]).is_none());
        assert_eq!(format!("{pw:?}"), "Password(..)");
    }
}
