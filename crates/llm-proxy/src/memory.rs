//! Gives memory freed after an overload back to the system.
//!
//! 2,000 client connections at once take ~15 KiB each (buffers, tasks, the
//! request in flight). Once they close, glibc's malloc keeps what they
//! freed in its per-thread arenas, fragmented, and returns only the top of
//! each heap: RSS stayed at the peak (docs/benchmarks.md). `malloc_trim(0)`
//! releases every free page of every arena; measured, it brings RSS back
//! to idle. mimalloc as the global allocator did worse (it purges freed
//! pages only on later allocator activity in the thread that freed them,
//! and starts larger), so the binary keeps glibc and trims.

use std::time::Duration;

/// How often the allocator's free memory is checked.
const EVERY: Duration = Duration::from_secs(5);
/// Free memory held beyond this is returned; below it, trimming is not
/// worth its pass over the arenas (it takes their locks).
const KEEP_FREE_BYTES: usize = 8 << 20;

/// Checks every [`EVERY`] until `shutdown`, off the async workers.
pub fn spawn_trimmer(shutdown: berth_server::CancellationToken) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = shutdown.cancelled() => break,
            }
            let trimmed = tokio::task::spawn_blocking(trim_if_worth_it).await;
            if let Ok(Some(freed)) = trimmed {
                tracing::debug!(
                    free_before = freed,
                    "returned free heap memory to the system"
                );
            }
        }
    });
}

/// Trims when the arenas hold more than [`KEEP_FREE_BYTES`] free; returns
/// what they held.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn trim_if_worth_it() -> Option<usize> {
    // SAFETY: both are glibc functions without preconditions; mallinfo2
    // returns a plain struct, and malloc_trim takes the arenas' own locks.
    let free = unsafe { libc::mallinfo2() }.fordblks;
    if free <= KEEP_FREE_BYTES {
        return None;
    }
    // SAFETY: as above.
    unsafe { libc::malloc_trim(0) };
    Some(free)
}

/// Other allocators (musl's) return memory on their own.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim_if_worth_it() -> Option<usize> {
    None
}
