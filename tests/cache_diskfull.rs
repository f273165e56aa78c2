//! A full disk during a download: the cache directory on a 2 MiB tmpfs.
//!
//! Mounting needs root (or CAP_SYS_ADMIN); where it is refused the test says so on stderr and
//! passes without checking anything (CI containers usually run as root).

#[path = "cache_common/mod.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use corral::error::Error;
use corral::types::CacheTier;
use corral::worker::cache::DiskCache;

/// A tmpfs mounted for the test's lifetime.
struct Tmpfs {
    dir: PathBuf,
    _parent: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Option<Tmpfs> {
        let parent = tempfile::tempdir().unwrap();
        let dir = parent.path().join("small-disk");
        std::fs::create_dir(&dir).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&dir)
            .status()
            .is_ok_and(|s| s.success());
        ok.then_some(Tmpfs {
            dir,
            _parent: parent,
        })
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

fn free_bytes(p: &Path) -> u64 {
    let out = Command::new("df")
        .args(["--output=avail", "-B1"])
        .arg(p)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .nth(1)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

#[tokio::test]
async fn a_full_disk_fails_the_download_cleanly() {
    let Some(disk) = Tmpfs::mount("2m") else {
        eprintln!("SKIPPED: cannot mount a tmpfs here (needs root); nothing was checked");
        return;
    };
    let src = tempfile::tempdir().unwrap();
    // 3 MB does not fit on the 2 MiB disk; the budget (100 MB) does not know that.
    let big = local_bundle(
        src.path(),
        "big",
        &[
            ("a.bin", 1_000_000),
            ("b.bin", 1_000_000),
            ("c.bin", 1_000_000),
        ],
    );
    let small = local_bundle(src.path(), "small", &[("s.bin", 600_000)]);
    let cache = DiskCache::open(config(&disk.dir, 100_000_000, None))
        .await
        .unwrap();
    let free_before = free_bytes(&disk.dir);

    for attempt in 0..2 {
        let e = cache.ensure(&big, &|_, _| {}).await.unwrap_err();
        match &e {
            Error::Io { source, .. } => {
                assert_eq!(source.kind(), std::io::ErrorKind::StorageFull, "{e}")
            }
            other => panic!("attempt {attempt}: expected a disk-full I/O error, got {other}"),
        }
        // Nothing left behind: no temporary directory, no reservation, no pin, no entry.
        assert_eq!(listing(&disk.dir), [".corral-cache"], "attempt {attempt}");
        let r = cache.report();
        assert_eq!((r.used_bytes, r.reserved_bytes), (0, 0), "{r:?}");
        assert!(r.downloads.is_empty() && r.disk_models.is_empty(), "{r:?}");
        assert!(cache.pinned().is_empty());
        assert_eq!(
            free_bytes(&disk.dir),
            free_before,
            "the partial files still take space"
        );
    }
    assert_eq!(cache.stats().bytes_downloaded, 0);

    // What fits still downloads: the space and the budget were both given back.
    let (g, tier) = cache.ensure(&small, &|_, _| {}).await.unwrap();
    assert_eq!(tier, CacheTier::Download);
    assert_bundle(g.path(), &small);
    assert_eq!(cache.report().used_bytes, 600_000);
    // A prefetch hitting the full disk ends the same way and keeps the good bundle.
    let e = cache.prefetch(big.clone()).await.unwrap().unwrap_err();
    assert!(matches!(e, Error::Io { .. }), "{e}");
    assert_eq!(listing(&disk.dir), [".corral-cache", "small"]);
    assert_eq!(cache.report().reserved_bytes, 0);
    assert_eq!(cache.pinned().len(), 1);
    drop(g);
    assert!(cache.pinned().is_empty());
}
