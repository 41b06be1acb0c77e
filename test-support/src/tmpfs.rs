//! A small tmpfs the test mounts (and unmounts on drop), for low-disk tests. Needs root;
//! without it (or `mount`) a test skips, except under `CI=true`, where it fails.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A mounted tmpfs; unmounted and removed on drop.
#[derive(Debug)]
pub struct Tmpfs {
    dir: PathBuf,
    mnt: PathBuf,
}

impl Tmpfs {
    /// Mounts `size` (e.g. `16m`) under a fresh temp directory named after `name`; `None`
    /// (after saying why) where mounting is impossible outside CI.
    #[track_caller]
    pub fn mount(name: &str, size: &str) -> Option<Self> {
        let dir = std::env::temp_dir().join(format!("mllp-tmpfs-{}-{name}", std::process::id()));
        let mnt = dir.join("mnt");
        std::fs::create_dir_all(&mnt).expect("temp dir");
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&mnt)
            .status()
            .is_ok_and(|s| s.success());
        if !mounted {
            assert!(
                std::env::var("CI").is_err(),
                "cannot mount a tmpfs under CI=true"
            );
            eprintln!("skipped: cannot mount a tmpfs (not root?)");
            let _ = std::fs::remove_dir_all(&dir);
            return None;
        }
        Some(Self { dir, mnt })
    }

    /// The mount point.
    pub fn path(&self) -> &Path {
        &self.mnt
    }

    /// A directory next to the mount, on the ordinary disk.
    pub fn outside(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.mnt).status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
