//! Shared by the fuzz targets: the readers take paths, so each input is written to a
//! file in a per-process scratch directory (on /dev/shm where there is one).

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The scratch directory of this process.
pub fn scratch() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let base = if Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let d = base.join(format!("ferrotune-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&d).expect("scratch directory");
        d
    })
}

/// Writes `data` to `name` in the scratch directory and returns its path.
pub fn file(name: &str, data: &[u8]) -> PathBuf {
    let p = scratch().join(name);
    std::fs::write(&p, data).expect("write scratch file");
    p
}

/// Every error must be one line naming the file (the project's rule for bad input).
pub fn check_error(e: &ferrotune::Error, path: &Path) {
    let msg = e.to_string();
    assert!(!msg.contains('\n'), "error of more than one line: {msg:?}");
    let name = path.file_name().unwrap().to_string_lossy();
    assert!(msg.contains(&*name), "error does not name {name}: {msg}");
}
