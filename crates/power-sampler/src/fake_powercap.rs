//! A fake powercap tree laid out like `/sys/class/powercap`, for tests,
//! benchmarks and demos on machines without RAPL (or without root, which
//! reading the real counters needs).

use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// One zone: its directory name (`intel-rapl:0`, `intel-rapl:0:2`), its zone
/// name (`package-0`, `dram`), its counter and the counter's range, in µJ.
#[derive(Debug, Clone, Copy)]
pub struct FakeZone<'a> {
    pub dir: &'a str,
    pub name: &'a str,
    pub energy_uj: u64,
    pub max_energy_range_uj: u64,
}

#[derive(Debug)]
pub struct FakePowercap {
    root: PathBuf,
}

impl FakePowercap {
    /// Writes the zones under `root` (an existing, usually temporary, directory).
    pub fn create(root: &Path, zones: &[FakeZone<'_>]) -> io::Result<Self> {
        let tree = Self {
            root: root.to_path_buf(),
        };
        for zone in zones {
            let dir = root.join(zone.dir);
            std::fs::create_dir_all(&dir)?;
            std::fs::write(dir.join("name"), format!("{}\n", zone.name))?;
            std::fs::write(
                dir.join("max_energy_range_uj"),
                format!("{}\n", zone.max_energy_range_uj),
            )?;
            tree.set_energy(zone.dir, zone.energy_uj)?;
        }
        Ok(tree)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Sets a zone's counter. The value is written in place at a fixed width,
    /// in one write: a sampler holding the file open (as it holds sysfs's)
    /// never sees it empty or half written.
    pub fn set_energy(&self, dir: &str, energy_uj: u64) -> io::Result<()> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(false)
            .open(self.root.join(dir).join("energy_uj"))?;
        file.write_all_at(format!("{energy_uj:020}\n").as_bytes(), 0)
    }
}
