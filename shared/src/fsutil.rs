//! Durable, private file writes: atomic replace, fsync, and key files only we can read.
//!
//! The one place in `shared` that touches the file system; the pure modules never do.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
#[cfg(unix)]
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// A file-system error with the path it concerns.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("{path}: {error}")]
    Io { path: PathBuf, error: io::Error },
    #[error("{path}: private key is readable by others (mode {mode:o}); run `chmod 600 {path}` and check who copied it")]
    KeyTooOpen { path: PathBuf, mode: u32 },
    #[error("{path} already exists; refusing to overwrite (move it away first)")]
    Exists { path: PathBuf },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> FsError + '_ {
    move |error| FsError::Io { path: path.to_owned(), error }
}

/// Writes `bytes` to `path` atomically: a temp file in the same directory, fsync, rename,
/// then fsync of the directory, so a crash leaves either the old or the new file.
pub fn atomic_write(path: &Path, bytes: &[u8], private: bool) -> Result<(), FsError> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    let file_name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{file_name}.tmp-{}", std::process::id()));
    {
        let mut f = open_new(&tmp, private, true)?;
        f.write_all(bytes).map_err(io_err(&tmp))?;
        f.sync_all().map_err(io_err(&tmp))?;
    }
    fs::rename(&tmp, path).map_err(io_err(path))?;
    sync_dir(dir)
}

/// Like [`atomic_write`], but `write` produces the temp file itself (e.g. a serialiser
/// that streams to a path); it is then fsynced and renamed over `path`.
pub fn atomic_write_with<E: std::fmt::Display>(path: &Path, write: impl FnOnce(&Path) -> Result<(), E>) -> Result<(), FsError> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    let file_name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{file_name}.tmp-{}", std::process::id()));
    if let Err(e) = write(&tmp) {
        let _ = fs::remove_file(&tmp);
        return Err(FsError::Io { path: tmp, error: io::Error::other(e.to_string()) });
    }
    File::open(&tmp).and_then(|f| f.sync_all()).map_err(io_err(&tmp))?;
    fs::rename(&tmp, path).map_err(io_err(path))?;
    sync_dir(dir)
}

/// Creates a new file readable only by its owner (0600) and writes `bytes`; refuses to
/// overwrite an existing file.
pub fn write_private_new(path: &Path, bytes: &[u8]) -> Result<(), FsError> {
    if path.exists() {
        return Err(FsError::Exists { path: path.to_owned() });
    }
    if let Some(dir) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::create_dir_all(dir).map_err(io_err(dir))?;
    }
    let mut f = open_new(path, true, false)?;
    f.write_all(bytes).map_err(io_err(path))?;
    f.sync_all().map_err(io_err(path))
}

/// Writes a new public file (certificate, request); refuses to overwrite.
pub fn write_public_new(path: &Path, bytes: &[u8]) -> Result<(), FsError> {
    if path.exists() {
        return Err(FsError::Exists { path: path.to_owned() });
    }
    atomic_write(path, bytes, false)
}

/// Reads a private key, refusing one that group or others can read.
pub fn read_private_key(path: &Path) -> Result<Vec<u8>, FsError> {
    #[cfg(unix)]
    {
        let mode = fs::metadata(path).map_err(io_err(path))?.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(FsError::KeyTooOpen { path: path.to_owned(), mode });
        }
    }
    fs::read(path).map_err(io_err(path))
}

/// Reads a whole file, naming the path on error.
pub fn read(path: &Path) -> Result<Vec<u8>, FsError> {
    fs::read(path).map_err(io_err(path))
}

/// fsyncs a directory so a rename or create inside it is durable.
pub fn sync_dir(dir: &Path) -> Result<(), FsError> {
    #[cfg(unix)]
    File::open(dir).and_then(|d| d.sync_all()).map_err(io_err(dir))?;
    Ok(())
}

fn open_new(path: &Path, private: bool, truncate: bool) -> Result<File, FsError> {
    let mut opts = OpenOptions::new();
    opts.write(true);
    if truncate {
        opts.create(true).truncate(true);
    } else {
        opts.create_new(true);
    }
    #[cfg(unix)]
    opts.mode(if private { 0o600 } else { 0o644 });
    opts.open(path).map_err(io_err(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state.json");
        atomic_write(&p, b"one", false).unwrap();
        atomic_write(&p, b"two", false).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[cfg(unix)]
    #[test]
    fn private_keys_are_0600_and_open_ones_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("site.key");
        write_private_new(&p, b"secret").unwrap();
        assert_eq!(fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(read_private_key(&p).unwrap(), b"secret");
        assert!(matches!(write_private_new(&p, b"again"), Err(FsError::Exists { .. })));
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
        let err = read_private_key(&p).unwrap_err();
        assert!(matches!(err, FsError::KeyTooOpen { mode: 0o644, .. }), "{err}");
        assert!(err.to_string().contains("chmod 600"));
    }
}
