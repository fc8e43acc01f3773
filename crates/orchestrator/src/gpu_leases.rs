//! Which of its host's GPUs a backend uses, and which runs may use a GPU at
//! the same time.
//!
//! A backend uses every GPU of its host when it is a host process (those see
//! them all) or asks for `gpus: {count: all}`; the devices it names; or, for
//! `gpus: {count: N}`, the N GPUs it was assigned at placement, those held by
//! the fewest backends first. Each run leases its backend's GPUs for as long
//! as it runs: a run that measures power leases them exclusively, so no other
//! run of any campaign uses them while its energy is read, and other runs
//! share theirs. A run takes its leases in index order, so two runs never
//! wait on each other; waiting is fair, so a measuring run is not starved by
//! a stream of sharing ones.
//!
//! A deployment's replica holds the GPUs it was given for as long as it is
//! placed. A run that measures power waits until no deployment holds its
//! GPUs, except the deployment it measures (whose load is what it reads);
//! a replica is not given a GPU that a measuring run has at that moment.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use berth_proto::agent::v1::Gpu;
use tokio::sync::{Notify, OwnedRwLockReadGuard, OwnedRwLockWriteGuard, RwLock};

use crate::manifest::{Backend, GpuCount, GpuRequest, RuntimeName};

/// One GPU: a host and the index its driver gives the GPU.
type GpuKey = (String, u32);

#[derive(Default)]
pub struct GpuLeases {
    locks: Mutex<HashMap<GpuKey, Arc<RwLock<()>>>>,
    /// Backends and replicas assigned to each GPU, to spread them.
    assigned: Mutex<HashMap<GpuKey, usize>>,
    /// The deployments whose replicas hold each GPU, one entry a replica.
    held: Mutex<HashMap<GpuKey, Vec<String>>>,
    /// Woken when a replica lets go of its GPUs.
    let_go: Notify,
}

/// A run's hold on its GPUs, released when dropped.
#[derive(Default)]
pub struct GpuLease {
    _shared: Vec<OwnedRwLockReadGuard<()>>,
    _exclusive: Vec<OwnedRwLockWriteGuard<()>>,
}

/// How a run uses its GPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GpuUse {
    /// Other runs may use the GPUs at the same time.
    Shared,
    /// The run has the GPUs to itself (it measures their power).
    Exclusive,
}

impl GpuLeases {
    /// Leases `gpus` of `host`, waiting for runs that hold them in a way
    /// that excludes `mode`, and for an exclusive lease also for the
    /// replicas of deployments other than `measured` that hold them.
    pub async fn lease(
        &self,
        host: &str,
        gpus: &[u32],
        mode: GpuUse,
        measured: Option<&str>,
    ) -> GpuLease {
        loop {
            let let_go = self.let_go.notified();
            tokio::pin!(let_go);
            // Registered before the check, so a release after it wakes us.
            let_go.as_mut().enable();
            let mut lease = GpuLease::default();
            for lock in self.locks_of(host, gpus) {
                match mode {
                    GpuUse::Shared => lease._shared.push(lock.read_owned().await),
                    GpuUse::Exclusive => lease._exclusive.push(lock.write_owned().await),
                }
            }
            if mode == GpuUse::Shared || self.held_by_others(host, gpus, measured).is_empty() {
                return lease;
            }
            drop(lease);
            let_go.await;
        }
    }

    /// The lease if every GPU is free for `mode` now.
    pub fn try_lease(
        &self,
        host: &str,
        gpus: &[u32],
        mode: GpuUse,
        measured: Option<&str>,
    ) -> Option<GpuLease> {
        let mut lease = GpuLease::default();
        for lock in self.locks_of(host, gpus) {
            match mode {
                GpuUse::Shared => lease._shared.push(lock.try_read_owned().ok()?),
                GpuUse::Exclusive => lease._exclusive.push(lock.try_write_owned().ok()?),
            }
        }
        if mode == GpuUse::Exclusive && !self.held_by_others(host, gpus, measured).is_empty() {
            return None;
        }
        Some(lease)
    }

    /// The GPUs among `gpus` that replicas of deployments other than
    /// `measured` hold, with one such deployment each.
    pub fn held_by_others(
        &self,
        host: &str,
        gpus: &[u32],
        measured: Option<&str>,
    ) -> Vec<(u32, String)> {
        let held = lock(&self.held);
        gpus.iter()
            .filter_map(|&index| {
                let holders = held.get(&(host.to_string(), index))?;
                let other = holders.iter().find(|d| Some(d.as_str()) != measured)?;
                Some((index, other.clone()))
            })
            .collect()
    }

    /// Gives a replica of `deployment` the GPUs of `host` it asks for: the
    /// devices it names, all, or `count` of them (those assigned to the
    /// fewest backends and replicas first), none of them measured by a run
    /// at this moment. The error says why it must wait or cannot fit.
    pub fn hold_for_replica(
        &self,
        host: &str,
        host_gpus: &[Gpu],
        request: &GpuRequest,
        deployment: &str,
    ) -> Result<Vec<u32>, String> {
        let measured_now = |index: u32| {
            lock(&self.locks)
                .get(&(host.to_string(), index))
                .is_some_and(|gpu| gpu.try_read().is_err())
        };
        let chosen: Vec<u32> = if request.devices.is_empty() {
            let count = match request.count {
                Some(GpuCount::Exactly(n)) => n as usize,
                Some(GpuCount::All) => host_gpus.len(),
                None => return Ok(Vec::new()),
            };
            let assigned = lock(&self.assigned);
            let mut free: Vec<(usize, u32)> = host_gpus
                .iter()
                .filter(|gpu| !measured_now(gpu.index))
                .map(|gpu| {
                    let load = assigned.get(&(host.to_string(), gpu.index));
                    (load.copied().unwrap_or(0), gpu.index)
                })
                .collect();
            if free.len() < count {
                return Err(format!(
                    "host `{host}` has {} GPU(s) not measured by a run now; the replica needs {count}",
                    free.len()
                ));
            }
            free.sort_unstable();
            let mut chosen: Vec<u32> = free.into_iter().take(count).map(|(_, i)| i).collect();
            chosen.sort_unstable();
            chosen
        } else {
            let mut chosen = Vec::new();
            for device in &request.devices {
                let gpu = host_gpus
                    .iter()
                    .find(|gpu| gpu.uuid == *device || gpu.index.to_string() == *device)
                    .ok_or_else(|| format!("host `{host}` has no GPU `{device}`"))?;
                if measured_now(gpu.index) {
                    return Err(format!(
                        "GPU {} of host `{host}` is measured by a run now",
                        gpu.index
                    ));
                }
                chosen.push(gpu.index);
            }
            chosen
        };
        self.note_replica(host, &chosen, deployment);
        Ok(chosen)
    }

    /// Counts a replica's GPUs as held by `deployment` (placed now, or found
    /// placed after a restart).
    pub fn note_replica(&self, host: &str, gpus: &[u32], deployment: &str) {
        self.note_assigned(host, gpus);
        let mut held = lock(&self.held);
        for &index in gpus {
            held.entry((host.to_string(), index))
                .or_default()
                .push(deployment.to_string());
        }
    }

    /// A replica of `deployment` let go of its GPUs.
    pub fn release_replica(&self, host: &str, gpus: &[u32], deployment: &str) {
        self.unassign(host, gpus);
        let mut held = lock(&self.held);
        for &index in gpus {
            let key = (host.to_string(), index);
            if let Some(holders) = held.get_mut(&key) {
                if let Some(at) = holders.iter().position(|d| d == deployment) {
                    holders.swap_remove(at);
                }
                if holders.is_empty() {
                    held.remove(&key);
                }
            }
        }
        drop(held);
        self.let_go.notify_waiters();
    }

    /// The locks of `gpus`, in index order.
    fn locks_of(&self, host: &str, gpus: &[u32]) -> Vec<Arc<RwLock<()>>> {
        let mut gpus = gpus.to_vec();
        gpus.sort_unstable();
        gpus.dedup();
        let mut locks = lock(&self.locks);
        gpus.into_iter()
            .map(|index| Arc::clone(locks.entry((host.to_string(), index)).or_default()))
            .collect()
    }

    /// Picks `count` of the host's GPUs for a backend, those no deployment
    /// holds and assigned to the fewest backends first (lowest index on a tie); None when the host has
    /// fewer.
    pub fn assign(&self, host: &str, host_gpus: &[Gpu], count: u32) -> Option<Vec<u32>> {
        let count = count as usize;
        if host_gpus.len() < count {
            return None;
        }
        let mut assigned = lock(&self.assigned);
        let held = lock(&self.held);
        // GPUs a deployment holds last: a measuring run would wait for them.
        let mut by_load: Vec<(bool, usize, u32)> = host_gpus
            .iter()
            .map(|gpu| {
                let key = (host.to_string(), gpu.index);
                let load = assigned.get(&key).copied().unwrap_or(0);
                (held.contains_key(&key), load, gpu.index)
            })
            .collect();
        drop(held);
        by_load.sort_unstable();
        let mut chosen: Vec<u32> = by_load.into_iter().take(count).map(|(_, _, i)| i).collect();
        chosen.sort_unstable();
        for &index in &chosen {
            *assigned.entry((host.to_string(), index)).or_default() += 1;
        }
        Some(chosen)
    }

    /// Counts a backend found already placed (after a restart) as assigned.
    pub fn note_assigned(&self, host: &str, gpus: &[u32]) {
        let mut assigned = lock(&self.assigned);
        for &index in gpus {
            *assigned.entry((host.to_string(), index)).or_default() += 1;
        }
    }

    /// A backend with these assigned GPUs is gone.
    pub fn unassign(&self, host: &str, gpus: &[u32]) {
        let mut assigned = lock(&self.assigned);
        for &index in gpus {
            if let Some(load) = assigned.get_mut(&(host.to_string(), index)) {
                *load = load.saturating_sub(1);
            }
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// How many GPUs the backend needs assigned at placement: `count: N`.
pub fn to_assign(backend: &Backend) -> Option<u32> {
    let request = backend.gpus.as_ref()?;
    match request.count {
        Some(GpuCount::Exactly(n)) if request.devices.is_empty() && n > 0 => Some(n),
        _ => None,
    }
}

/// The indexes of the GPUs of a host with `host_gpus` that the backend's
/// workload can use; `assigned` is what `assign` gave it.
pub fn used_by(backend: &Backend, host_gpus: &[Gpu], assigned: &[u32]) -> Vec<u32> {
    let all = || host_gpus.iter().map(|gpu| gpu.index).collect();
    if backend.runtime == RuntimeName::Process {
        return all();
    }
    let Some(request) = &backend.gpus else {
        return Vec::new();
    };
    if !request.devices.is_empty() {
        // A device the host does not report (yet) could be any of them.
        return request
            .devices
            .iter()
            .map(|device| {
                host_gpus
                    .iter()
                    .find(|gpu| gpu.uuid == *device || gpu.index.to_string() == *device)
                    .map(|gpu| gpu.index)
            })
            .collect::<Option<Vec<_>>>()
            .unwrap_or_else(all);
    }
    match request.count {
        Some(GpuCount::All) => all(),
        Some(GpuCount::Exactly(_)) => assigned.to_vec(),
        None => Vec::new(),
    }
}

/// The power-sampler devices that read `gpus`, as their host reports them.
pub fn power_devices(host_gpus: &[Gpu], gpus: &[u32]) -> Vec<String> {
    gpus.iter()
        .filter_map(|&index| host_gpus.iter().find(|gpu| gpu.index == index))
        .filter(|gpu| !gpu.power_device.is_empty())
        .map(|gpu| gpu.power_device.clone())
        .collect()
}

/// What a workload spec names for assigned GPUs: their UUIDs (stable
/// whatever the index order), or indexes where the host gave no UUID.
pub fn device_ids(host_gpus: &[Gpu], assigned: &[u32]) -> Vec<String> {
    assigned
        .iter()
        .map(|&index| {
            host_gpus
                .iter()
                .find(|gpu| gpu.index == index && !gpu.uuid.is_empty())
                .map_or_else(|| index.to_string(), |gpu| gpu.uuid.clone())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn gpus(n: u32) -> Vec<Gpu> {
        (0..n)
            .map(|index| Gpu {
                index,
                uuid: format!("GPU-{index}"),
                ..Default::default()
            })
            .collect()
    }

    fn backend(yaml: &str) -> Backend {
        serde_yaml::from_str(yaml).unwrap()
    }

    #[test]
    fn what_each_backend_uses() {
        let host = gpus(4);
        let process = backend("{name: p, runtime: process, command: [sh]}");
        assert_eq!(used_by(&process, &host, &[]), [0, 1, 2, 3]);
        let none = backend("{name: c, runtime: docker, image: i}");
        assert_eq!(used_by(&none, &host, &[]), Vec::<u32>::new());
        let all = backend("{name: c, runtime: docker, image: i, gpus: {count: all}}");
        assert_eq!(used_by(&all, &host, &[]), [0, 1, 2, 3]);
        let named = backend("{name: c, runtime: docker, image: i, gpus: {devices: [GPU-2, '0']}}");
        assert_eq!(used_by(&named, &host, &[]), [2, 0]);
        let unknown = backend("{name: c, runtime: docker, image: i, gpus: {devices: [GPU-9]}}");
        assert_eq!(used_by(&unknown, &host, &[]), [0, 1, 2, 3]);
        let two = backend("{name: c, runtime: docker, image: i, gpus: {count: 2}}");
        assert_eq!(to_assign(&two), Some(2));
        assert_eq!(used_by(&two, &host, &[1, 3]), [1, 3]);
        assert_eq!(device_ids(&host, &[1, 3]), ["GPU-1", "GPU-3"]);
        assert_eq!(to_assign(&all), None);
    }

    #[test]
    fn assignment_spreads_backends_over_the_gpus() {
        let leases = GpuLeases::default();
        let host = gpus(4);
        assert_eq!(leases.assign("h", &host, 2), Some(vec![0, 1]));
        assert_eq!(leases.assign("h", &host, 1), Some(vec![2]));
        assert_eq!(leases.assign("h", &host, 2), Some(vec![0, 3]));
        assert_eq!(leases.assign("h", &host, 5), None);
        // Another host's GPUs are counted apart.
        assert_eq!(leases.assign("g", &host, 1), Some(vec![0]));
        leases.unassign("h", &[0, 1]);
        leases.note_assigned("h", &[3]);
        assert_eq!(leases.assign("h", &host, 1), Some(vec![1]));
    }

    #[tokio::test]
    async fn a_measuring_run_has_its_gpus_to_itself() {
        let leases = Arc::new(GpuLeases::default());
        let sharing = leases.lease("h", &[0, 1], GpuUse::Shared, None).await;
        // Sharing runs run together; another host's GPU 0 is another GPU.
        assert!(leases.try_lease("h", &[1], GpuUse::Shared, None).is_some());
        assert!(
            leases
                .try_lease("g", &[0], GpuUse::Exclusive, None)
                .is_some()
        );
        assert!(
            leases
                .try_lease("h", &[1, 2], GpuUse::Exclusive, None)
                .is_none()
        );
        let measuring = tokio::spawn({
            let leases = Arc::clone(&leases);
            async move { leases.lease("h", &[1, 2], GpuUse::Exclusive, None).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!measuring.is_finished(), "waits for the sharing run");
        // Fair: a sharing run that comes later waits behind the measuring one.
        let late = tokio::spawn({
            let leases = Arc::clone(&leases);
            async move { leases.lease("h", &[1], GpuUse::Shared, None).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!late.is_finished());
        // GPU 2 is held by the waiting measuring run; GPU 3 is free.
        assert!(
            leases
                .try_lease("h", &[3], GpuUse::Exclusive, None)
                .is_some()
        );
        drop(sharing);
        let measuring = tokio::time::timeout(Duration::from_secs(5), measuring)
            .await
            .expect("the measuring run gets its GPUs")
            .unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!late.is_finished(), "nobody shares a measured GPU");
        drop(measuring);
        tokio::time::timeout(Duration::from_secs(5), late)
            .await
            .expect("then the sharing run goes")
            .unwrap();
    }

    fn count(n: u32) -> GpuRequest {
        GpuRequest {
            count: Some(GpuCount::Exactly(n)),
            devices: Vec::new(),
        }
    }

    #[tokio::test]
    async fn a_measuring_run_waits_for_other_deployments_gpus() {
        let leases = Arc::new(GpuLeases::default());
        let host = gpus(2);
        let held = leases
            .hold_for_replica("h", &host, &count(1), "llm")
            .unwrap();
        assert_eq!(held, [0]);
        // Campaign backends are given the GPU no deployment holds.
        assert_eq!(leases.assign("h", &host, 1), Some(vec![1]));
        // Sharing runs and runs measuring that deployment go; others wait.
        assert!(leases.try_lease("h", &[0], GpuUse::Shared, None).is_some());
        assert!(
            leases
                .try_lease("h", &[0], GpuUse::Exclusive, Some("llm"))
                .is_some()
        );
        assert!(
            leases
                .try_lease("h", &[0], GpuUse::Exclusive, None)
                .is_none()
        );
        assert_eq!(
            leases.held_by_others("h", &[0, 1], Some("other")),
            [(0, "llm".to_string())]
        );
        let measuring = tokio::spawn({
            let leases = Arc::clone(&leases);
            async move { leases.lease("h", &[0, 1], GpuUse::Exclusive, None).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            !measuring.is_finished(),
            "waits while the replica holds GPU 0"
        );
        leases.release_replica("h", &held, "llm");
        let lease = tokio::time::timeout(Duration::from_secs(5), measuring)
            .await
            .expect("the replica let go")
            .unwrap();
        // A replica is not given a GPU a run measures now.
        let refused = leases
            .hold_for_replica("h", &host, &count(1), "llm")
            .unwrap_err();
        assert!(refused.contains("not measured by a run now"), "{refused}");
        let named = GpuRequest {
            count: None,
            devices: vec!["GPU-1".into()],
        };
        let refused = leases
            .hold_for_replica("h", &host, &named, "llm")
            .unwrap_err();
        assert!(
            refused.contains("GPU 1 of host `h` is measured"),
            "{refused}"
        );
        drop(lease);
        assert_eq!(
            leases.hold_for_replica("h", &host, &named, "llm").unwrap(),
            [1]
        );
        let unknown = GpuRequest {
            count: None,
            devices: vec!["GPU-7".into()],
        };
        assert!(
            leases
                .hold_for_replica("h", &host, &unknown, "llm")
                .unwrap_err()
                .contains("no GPU `GPU-7`")
        );
    }
}
