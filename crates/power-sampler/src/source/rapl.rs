//! Intel and AMD RAPL through the powercap tree (`/sys/class/powercap`, or a
//! fake tree in tests): one device per CPU package and one per DRAM domain,
//! each an `energy_uj` counter that wraps at `max_energy_range_uj`.
//!
//! The tree lists every zone at its root, subzones included:
//! `intel-rapl:0` (name `package-0`), `intel-rapl:0:2` (name `dram`), …
//! `intel-rapl-mmio:*` zones are the same packages through another interface
//! and are left out so nothing is counted twice; so are `core`, `uncore` and
//! `psys`, which overlap the package.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::Source;
use crate::clock::Clock;
use crate::energy::counter_delta;
use crate::reading::{DeviceInfo, Reading, SourceError, SourceKind};

pub struct RaplSource {
    devices: Vec<DeviceInfo>,
    zones: Vec<Zone>,
}

struct Zone {
    path: PathBuf,
    /// Kept open: reading at offset 0 makes sysfs produce a fresh value, and
    /// costs one system call instead of three.
    file: File,
    range_j: f64,
    /// The previous reading, from which power is derived.
    last: Option<(Duration, f64)>,
}

/// A zone directory's name split into its package and subzone numbers:
/// `intel-rapl:0` → (0, None), `intel-rapl:0:2` → (0, Some(2)).
fn zone_numbers(dir_name: &str) -> Option<(u32, Option<u32>)> {
    let rest = dir_name.strip_prefix("intel-rapl:")?;
    let mut parts = rest.split(':');
    let package = parts.next()?.parse().ok()?;
    let sub = match parts.next() {
        Some(part) => Some(part.parse().ok()?),
        None => None,
    };
    parts.next().is_none().then_some((package, sub))
}

fn read_text(path: &Path) -> Result<String, SourceError> {
    std::fs::read_to_string(path)
        .map(|text| text.trim().to_string())
        .map_err(|source| SourceError::Io {
            path: path.to_path_buf(),
            source,
        })
}

fn parse_microjoules(path: &Path, text: &str) -> Result<f64, SourceError> {
    text.trim()
        .parse::<u64>()
        .map(|uj| uj as f64 / 1e6)
        .map_err(|_| SourceError::Parse {
            path: path.to_path_buf(),
            reason: format!("`{}` is not a count of microjoules", text.trim()),
        })
}

/// Reads a counter file from the start; sysfs attributes are small.
fn read_counter(zone: &Zone) -> Result<f64, SourceError> {
    let mut buf = [0u8; 32];
    let len = zone
        .file
        .read_at(&mut buf, 0)
        .map_err(|source| SourceError::Io {
            path: zone.path.clone(),
            source,
        })?;
    let text = String::from_utf8_lossy(&buf[..len]);
    parse_microjoules(&zone.path, &text)
}

impl RaplSource {
    /// Finds the package and DRAM zones under `root`. Fails, with the reason,
    /// when there are none or none can be read (energy_uj is readable by root
    /// only since Linux 5.10).
    pub fn open(root: &Path) -> Result<Self, SourceError> {
        let entries = std::fs::read_dir(root).map_err(|source| SourceError::Io {
            path: root.to_path_buf(),
            source,
        })?;
        let mut found = Vec::new();
        for entry in entries.flatten() {
            let dir_name = entry.file_name().to_string_lossy().into_owned();
            if let Some(numbers) = zone_numbers(&dir_name) {
                found.push((numbers, entry.path()));
            }
        }
        // Packages before their subzones, in numeric order: stable device order.
        found.sort();
        let package_name = |package: u32| {
            found
                .iter()
                .find(|((p, sub), _)| *p == package && sub.is_none())
                .and_then(|(_, path)| read_text(&path.join("name")).ok())
        };
        let mut devices = Vec::new();
        let mut zones = Vec::new();
        let mut first_error = None;
        for ((package, sub), path) in &found {
            let Ok(name) = read_text(&path.join("name")) else {
                continue;
            };
            let id = match sub {
                None if name.starts_with("package") => name.clone(),
                Some(_) if name == "dram" => match package_name(*package) {
                    Some(parent) => format!("{parent}/dram"),
                    None => continue,
                },
                _ => continue,
            };
            match open_zone(path) {
                Ok(zone) => {
                    devices.push(DeviceInfo {
                        id: format!("rapl:{id}"),
                        name: format!(
                            "RAPL {id} ({})",
                            path.file_name().unwrap_or_default().to_string_lossy()
                        ),
                        kind: SourceKind::Rapl,
                        has_energy_counter: true,
                        has_power: false,
                        counter_range_j: Some(zone.range_j),
                    });
                    zones.push(zone);
                }
                Err(error) => {
                    first_error.get_or_insert(error);
                }
            }
        }
        if zones.is_empty() {
            return Err(first_error.unwrap_or_else(|| {
                SourceError::Missing(format!("no RAPL package zone under {}", root.display()))
            }));
        }
        Ok(Self { devices, zones })
    }
}

fn open_zone(path: &Path) -> Result<Zone, SourceError> {
    let range_path = path.join("max_energy_range_uj");
    let range_j = parse_microjoules(&range_path, &read_text(&range_path)?)?;
    let energy_path = path.join("energy_uj");
    let file = File::open(&energy_path).map_err(|source| SourceError::Io {
        path: energy_path.clone(),
        source,
    })?;
    let zone = Zone {
        path: energy_path,
        file,
        range_j,
        last: None,
    };
    // Readable now, or the reason why not (usually: root only).
    read_counter(&zone)?;
    Ok(zone)
}

impl Source for RaplSource {
    fn kind(&self) -> SourceKind {
        SourceKind::Rapl
    }

    fn name(&self) -> &str {
        "rapl"
    }

    fn devices(&self) -> &[DeviceInfo] {
        &self.devices
    }

    fn read(&mut self, clock: &Clock, out: &mut Vec<Reading>, failures: &mut Vec<SourceError>) {
        for (index, zone) in self.zones.iter_mut().enumerate() {
            let energy_j = match read_counter(zone) {
                Ok(value) => value,
                Err(error) => {
                    failures.push(error);
                    continue;
                }
            };
            let at = clock.now();
            // RAPL has no power reading: the mean power since the previous
            // reading stands in for it (for the peak and for live streams).
            let power_w = zone.last.and_then(|(last_at, last_j)| {
                let seconds = at.saturating_sub(last_at).as_secs_f64();
                (seconds > 0.0)
                    .then(|| counter_delta(last_j, energy_j, Some(zone.range_j)) / seconds)
            });
            zone.last = Some((at, energy_j));
            out.push(Reading {
                device: index as u16,
                at,
                power_w,
                energy_j: Some(energy_j),
                ..Reading::default()
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::energy::EnergyAccumulator;
    use crate::fake_powercap::{FakePowercap, FakeZone};

    const RANGE_UJ: u64 = 262_143_328_850;

    fn zone<'a>(
        dir: &'a str,
        name: &'a str,
        energy_uj: u64,
        max_energy_range_uj: u64,
    ) -> FakeZone<'a> {
        FakeZone {
            dir,
            name,
            energy_uj,
            max_energy_range_uj,
        }
    }

    fn fake(zones: &[FakeZone<'_>]) -> (tempfile::TempDir, FakePowercap) {
        let dir = tempfile::tempdir().unwrap();
        let tree = FakePowercap::create(dir.path(), zones).unwrap();
        (dir, tree)
    }

    fn two_sockets() -> (tempfile::TempDir, FakePowercap) {
        fake(&[
            zone("intel-rapl:0", "package-0", 1_000_000, RANGE_UJ),
            zone("intel-rapl:0:0", "core", 5, RANGE_UJ),
            zone("intel-rapl:0:2", "dram", 2_000_000, 65_712_999_613),
            zone("intel-rapl:1", "package-1", 3_000_000, RANGE_UJ),
            zone("intel-rapl:2", "psys", 7, RANGE_UJ),
            zone("intel-rapl-mmio:0", "package-0", 9, RANGE_UJ),
        ])
    }

    fn read(source: &mut RaplSource, clock: &Clock) -> Vec<Reading> {
        let (mut out, mut failures) = (Vec::new(), Vec::new());
        source.read(clock, &mut out, &mut failures);
        assert!(failures.is_empty(), "{failures:?}");
        out
    }

    #[test]
    fn finds_packages_and_dram_only() {
        let (_dir, tree) = two_sockets();
        let source = RaplSource::open(tree.root()).unwrap();
        let ids: Vec<&str> = source.devices().iter().map(|d| d.id.as_str()).collect();
        assert_eq!(
            ids,
            ["rapl:package-0", "rapl:package-0/dram", "rapl:package-1"]
        );
        let dram = &source.devices()[1];
        assert_eq!(dram.counter_range_j, Some(65_712_999_613.0 / 1e6));
        assert!(dram.has_energy_counter && !dram.has_power);
    }

    #[test]
    fn reads_counters_in_joules_and_derives_power() {
        let (_dir, tree) = two_sockets();
        let mut source = RaplSource::open(tree.root()).unwrap();
        let clock = Clock::start();
        let first = read(&mut source, &clock);
        let energies: Vec<Option<f64>> = first.iter().map(|r| r.energy_j).collect();
        assert_eq!(energies, [Some(1.0), Some(2.0), Some(3.0)]);
        // No previous reading: no derived power yet.
        assert!(first.iter().all(|r| r.power_w.is_none()));

        tree.set_energy("intel-rapl:0", 1_500_000).unwrap();
        let second = read(&mut source, &clock);
        assert_eq!(second[0].energy_j, Some(1.5));
        let seconds = (second[0].at - first[0].at).as_secs_f64();
        let power = second[0].power_w.expect("derived from two readings");
        assert!((power - 0.5 / seconds).abs() < 1e-9 * power, "{power}");
        assert_eq!(second[1].power_w, Some(0.0), "unchanged counter: no power");
    }

    #[test]
    fn counter_wrap_is_counted_once() {
        let (_dir, tree) = fake(&[zone(
            "intel-rapl:0",
            "package-0",
            RANGE_UJ - 2_000_000,
            RANGE_UJ,
        )]);
        let mut source = RaplSource::open(tree.root()).unwrap();
        let range_j = source.devices()[0].counter_range_j;
        let clock = Clock::start();
        let mut accumulator =
            EnergyAccumulator::new(Duration::ZERO, Duration::from_secs(10), false, range_j);
        // 2 J to the top of the range, wrap, then 3 J more: 5 J in all.
        for energy_uj in [RANGE_UJ - 2_000_000, 1_000_000, 3_000_000] {
            tree.set_energy("intel-rapl:0", energy_uj).unwrap();
            let reading = read(&mut source, &clock)[0];
            assert!(reading.power_w.is_none_or(|w| w >= 0.0), "{reading:?}");
            accumulator.push(&reading);
        }
        let stats = accumulator.finish(clock.now());
        let energy = stats.energy_counter_j.unwrap();
        assert!((energy - 5.0).abs() < 1e-9, "{energy}");
        assert_eq!(
            stats.energy_integrated_j, None,
            "RAPL power is derived, not integrated"
        );
    }

    #[test]
    fn no_zones_says_so() {
        let empty = tempfile::tempdir().unwrap();
        let error = RaplSource::open(empty.path()).err().unwrap().to_string();
        assert!(error.contains("no RAPL package zone"), "{error}");
        let missing = RaplSource::open(&empty.path().join("nope"))
            .err()
            .unwrap()
            .to_string();
        assert!(missing.contains("nope"), "{missing}");
    }

    #[test]
    fn unreadable_counter_is_the_reason() {
        let (dir, _tree) = fake(&[zone("intel-rapl:0", "package-0", 1, RANGE_UJ)]);
        std::fs::write(dir.path().join("intel-rapl:0/energy_uj"), "garbage").unwrap();
        let error = RaplSource::open(dir.path()).err().unwrap().to_string();
        assert!(
            error.contains("energy_uj") && error.contains("garbage"),
            "{error}"
        );
    }
}
