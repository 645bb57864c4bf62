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
    #[error("state directory {dir} is in use by another fedward process{holder}; stop it first (or point this one at another directory)")]
    InUse { dir: PathBuf, holder: String },
}

impl FsError {
    /// A setting the operator must change (no retry helps): a key others can read.
    pub fn is_misconfiguration(&self) -> bool {
        matches!(self, Self::KeyTooOpen { .. })
    }
}

/// The lock file's name inside a locked directory.
pub const LOCK_FILE: &str = ".lock";

/// An exclusive hold on a state directory, released when dropped (or when the process
/// dies: the operating system drops the lock with the file).
#[derive(Debug)]
pub struct DirLock {
    _file: File,
}

/// Takes the directory for this process alone: two daemons on one state directory would
/// both pass a budget check against one ledger, or overwrite each other's checkpoints.
/// Fails at once, naming the holder's pid, when another process holds it.
pub fn lock_dir(dir: &Path) -> Result<DirLock, FsError> {
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    let path = dir.join(LOCK_FILE);
    let mut file = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path).map_err(io_err(&path))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(fs::TryLockError::WouldBlock) => {
            let holder = fs::read_to_string(&path).ok().map(|pid| pid.trim().to_owned()).filter(|p| !p.is_empty());
            return Err(FsError::InUse { dir: dir.to_owned(), holder: holder.map(|p| format!(" (pid {p})")).unwrap_or_default() });
        }
        Err(fs::TryLockError::Error(error)) => return Err(FsError::Io { path, error }),
    }
    file.set_len(0).and_then(|()| file.write_all(std::process::id().to_string().as_bytes())).map_err(io_err(&path))?;
    Ok(DirLock { _file: file })
}

/// Removes what interrupted atomic writes left in `dir` (`.NAME.tmp-PID` files): the
/// caller holds the directory's lock, so no write of another process is in progress.
/// Returns what was removed.
pub fn remove_temp_files(dir: &Path) -> Result<Vec<PathBuf>, FsError> {
    let mut removed = Vec::new();
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(removed),
        Err(error) => return Err(FsError::Io { path: dir.to_owned(), error }),
    };
    let mut found = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io_err(dir))?;
        if is_temp_name(&entry.file_name().to_string_lossy()) {
            found.push(entry.path());
        }
    }
    for path in found {
        if remove_if_present(&path)? {
            removed.push(path);
        }
    }
    Ok(removed)
}

/// Removes `path`; one already gone is not an error (a writer finishing its rename between
/// the listing and the removal: an agent's test restarts it in the process whose aborted
/// run still has a cache write on a blocking thread, and it stopped with ENOENT).
fn remove_if_present(path: &Path) -> Result<bool, FsError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(error) => Err(FsError::Io { path: path.to_owned(), error }),
    }
}

/// `.NAME.tmp-PID`, the names [`atomic_write`] and [`atomic_write_with`] write to.
fn is_temp_name(name: &str) -> bool {
    name.starts_with('.') && name.rsplit_once(".tmp-").is_some_and(|(_, pid)| !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()))
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
/// that streams to a path); it is then made owner-only when `private` (whatever mode the
/// writer created it with and whatever the umask), fsynced and renamed over `path`.
pub fn atomic_write_with<E: std::fmt::Display>(
    path: &Path,
    private: bool,
    write: impl FnOnce(&Path) -> Result<(), E>,
) -> Result<(), FsError> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    let file_name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{file_name}.tmp-{}", std::process::id()));
    if let Err(e) = write(&tmp) {
        let _ = fs::remove_file(&tmp);
        return Err(FsError::Io { path: tmp, error: io::Error::other(e.to_string()) });
    }
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&tmp, fs::Permissions::from_mode(0o600)).map_err(io_err(&tmp))?;
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

/// Appends `line` and a newline to an append-only record (created if missing) and fsyncs
/// it before returning.
pub fn append_line(path: &Path, line: &str) -> Result<(), FsError> {
    use std::io::Write as _;
    let mut f = OpenOptions::new().create(true).append(true).open(path).map_err(io_err(path))?;
    f.write_all(format!("{line}\n").as_bytes()).and_then(|()| f.sync_all()).map_err(io_err(path))
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
    fn a_locked_directory_is_refused_to_a_second_holder_and_freed_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let lock = lock_dir(dir.path()).unwrap();
        let err = lock_dir(dir.path()).unwrap_err();
        assert!(matches!(err, FsError::InUse { .. }), "{err}");
        assert!(err.to_string().contains(&format!("pid {}", std::process::id())), "{err}");
        drop(lock);
        lock_dir(dir.path()).unwrap();
    }

    #[test]
    fn leftovers_of_interrupted_writes_are_removed_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        for name in [".state.json.tmp-123", ".round-00004.safetensors.tmp-9", "state.json", ".lock", "notes.tmp-1", ".x.tmp-abc"] {
            fs::write(dir.path().join(name), b"x").unwrap();
        }
        let mut removed: Vec<String> =
            remove_temp_files(dir.path()).unwrap().iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect();
        removed.sort();
        assert_eq!(removed, [".round-00004.safetensors.tmp-9", ".state.json.tmp-123"]);
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 4);
        assert!(remove_temp_files(&dir.path().join("absent")).unwrap().is_empty());
    }

    #[test]
    fn a_leftover_that_vanishes_before_its_removal_is_no_error() {
        let dir = tempfile::tempdir().unwrap();
        let leftover = dir.path().join(".model.safetensors.tmp-123");
        fs::write(&leftover, b"half").unwrap();
        fs::write(dir.path().join("model.safetensors"), b"whole").unwrap();
        assert!(remove_if_present(&leftover).unwrap());
        // Its writer renamed it between the listing and the removal.
        assert!(!remove_if_present(&leftover).unwrap());
        fs::write(&leftover, b"half").unwrap();
        assert_eq!(remove_temp_files(dir.path()).unwrap(), vec![leftover]);
        assert!(dir.path().join("model.safetensors").exists(), "only temp names are removed");
    }

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
    fn a_private_file_written_by_a_serialiser_is_0600_on_every_write() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("checkpoint.safetensors");
        for bytes in [b"one", b"two"] {
            // The writer creates the file as it likes (here readable by all).
            atomic_write_with(&p, true, |tmp| -> io::Result<()> {
                fs::write(tmp, bytes)?;
                fs::set_permissions(tmp, fs::Permissions::from_mode(0o644))
            })
            .unwrap();
            assert_eq!(fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
            assert_eq!(fs::read(&p).unwrap(), bytes);
        }
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
