//! What a node process sets up about files before it opens any: everything it creates is
//! private to its user (directories 0700, files 0600, whatever umask it was started with),
//! an existing data directory is made so, and its limit on open files is raised to the hard
//! limit so that the client port can hold its `maxclients` connections.

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// Files and directories a node creates get no permission for group or others.
pub fn private_umask() {
    // SAFETY: umask only sets the process's file mode creation mask; it cannot fail.
    unsafe {
        libc::umask(0o077);
    }
}

/// Makes `dir` and everything under it private: directories 0700, files 0600 (symbolic
/// links are left alone). Depth-limited, so a cycle of bind mounts cannot loop.
pub fn make_private(dir: &Path) -> io::Result<()> {
    fn walk(path: &Path, depth: usize) -> io::Result<()> {
        let meta = fs::symlink_metadata(path)?;
        if meta.file_type().is_symlink() {
            return Ok(());
        }
        if meta.is_dir() {
            if meta.permissions().mode() & 0o777 != 0o700 {
                fs::set_permissions(path, fs::Permissions::from_mode(0o700))?;
            }
            if depth < 8 {
                for entry in fs::read_dir(path)? {
                    walk(&entry?.path(), depth + 1)?;
                }
            }
        } else if meta.permissions().mode() & 0o777 != 0o600 {
            fs::set_permissions(path, fs::Permissions::from_mode(0o600))?;
        }
        Ok(())
    }
    walk(dir, 0)
}

/// Raises the soft limit on open files to the hard limit. Returns the limit now in force.
pub fn raise_open_files_limit() -> io::Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit read and write only the struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return Err(io::Error::last_os_error());
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) != 0 {
                return Err(io::Error::last_os_error());
            }
            limit = raised;
        }
    }
    Ok(limit.rlim_cur)
}
