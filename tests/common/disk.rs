//! A small file system for full-disk tests: a tmpfs mounted for the test
//! (root only) and a ballast file that fills it.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

/// A tmpfs mounted for a test, unmounted when dropped.
pub struct Tmpfs {
    pub dir: PathBuf,
}

impl Tmpfs {
    /// None when it cannot be mounted (not root).
    pub fn mount(dir: &Path, size_mib: u32) -> Option<Self> {
        std::fs::create_dir_all(dir).unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size_mib}m"), "tmpfs"])
            .arg(dir)
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| Self {
            dir: dir.to_path_buf(),
        })
    }

    /// Fills the file system with a ballast file (`dir/ballast`).
    pub fn fill(&self) -> Ballast {
        let path = self.dir.join("ballast");
        let mut file = File::create(&path).unwrap();
        let mut len = 0u64;
        for chunk in [1 << 20, 4096] {
            let buf = vec![0xA5u8; chunk];
            while file.write_all(&buf).is_ok() {
                len += chunk as u64;
            }
        }
        let _ = file.sync_all();
        let len = file.metadata().unwrap().len().max(len);
        Ballast { path, file, len }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.dir)
            .status();
    }
}

/// The file that fills a [`Tmpfs`]; removed when dropped.
pub struct Ballast {
    path: PathBuf,
    file: File,
    len: u64,
}

impl Ballast {
    /// Frees `bytes` of the space it holds.
    pub fn free(&mut self, bytes: u64) {
        self.len = self.len.saturating_sub(bytes);
        self.file.set_len(self.len).unwrap();
    }
}

impl Drop for Ballast {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}
