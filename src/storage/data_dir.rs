//! The data directory's `FORMAT` file: what makes a directory kadmq's, and
//! which on-disk format it holds.
//!
//! Boundary: checked before any engine opens, so an unknown or foreign
//! directory is refused with a clear error and never written into.

use super::{Result, StorageError};
use std::path::Path;

/// Bump when the on-disk records change incompatibly.
pub const FORMAT_VERSION: u32 = 1;
pub(super) const FORMAT_FILE: &str = "FORMAT";

/// Creates the data directory if needed and checks (or, when empty, writes)
/// its `FORMAT` file. Anything that puts files in the data directory calls
/// this first, so a directory is never half kadmq's.
pub fn prepare_data_dir(path: &Path) -> Result<()> {
    std::fs::create_dir_all(path).map_err(|source| StorageError::Io { path: path.to_path_buf(), source })?;
    check_format(path)
}

fn check_format(path: &Path) -> Result<()> {
    let io = |source| StorageError::Io { path: path.to_path_buf(), source };
    let format_file = path.join(FORMAT_FILE);
    let expected = format!("kadmq-data {FORMAT_VERSION}");
    // Another process preparing the same directory (`kadmq id` beside a
    // starting node) may have created the file and not written it yet.
    for _ in 0..FORMAT_WAIT_TRIES {
        match std::fs::read_to_string(&format_file) {
            Ok(found) if found.is_empty() => std::thread::sleep(FORMAT_WAIT),
            Ok(found) if found.trim() == expected => return Ok(()),
            Ok(found) => {
                return Err(StorageError::UnknownFormat { path: path.to_path_buf(), found: found.trim().to_string() })
            }
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                let empty = std::fs::read_dir(path).map_err(io)?.next().is_none();
                if !empty {
                    if format_file.exists() {
                        continue; // written meanwhile by another process
                    }
                    return Err(StorageError::Foreign { path: path.to_path_buf() });
                }
                // Exclusive: of two processes preparing at once, one writes.
                let mut options = std::fs::OpenOptions::new();
                match options.write(true).create_new(true).open(&format_file) {
                    Ok(mut file) => {
                        return std::io::Write::write_all(&mut file, format!("{expected}\n").as_bytes()).map_err(io)
                    }
                    Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => continue,
                    Err(err) => return Err(io(err)),
                }
            }
            Err(err) => return Err(io(err)),
        }
    }
    Err(StorageError::UnknownFormat { path: path.to_path_buf(), found: String::new() })
}

/// How long (tries x wait) a `FORMAT` file another process created may stay
/// empty before it counts as damaged.
const FORMAT_WAIT_TRIES: usize = 200;
const FORMAT_WAIT: std::time::Duration = std::time::Duration::from_millis(10);
