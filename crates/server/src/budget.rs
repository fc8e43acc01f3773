//! A budget of CPU time for the costly synchronous part of a request (parse,
//! validate, expand), and a bound on how many such parts run at once.
//!
//! Size limits are checked before the work they bound, but a request
//! within every limit can still cost seconds of a core (a manifest of
//! 100 000 configurations, a body of 8 MiB of JSON). [`RequestBudget::run`]
//! runs that work off the async workers (`spawn_blocking`), refuses at once
//! when [`ServerConfig::max_costly_requests`] such parts already run (so
//! their memory is not multiplied by the callers' concurrency), and stops it
//! once it has used [`ServerConfig::request_cpu_budget`] of its thread's CPU
//! time, or once its caller has gone away.
//!
//! The work stops cooperatively: its loops call [`check`], which fails once
//! the budget is spent, and the work returns whatever error it has at hand;
//! [`RequestBudget::run`] then answers [`BudgetError::CpuTime`]. The budget
//! is the thread's, not a parameter, for the reason tokio's own cooperative
//! budget is: the loops that must check sit deep inside parsers (a serde
//! visitor, the manifest's expansion) and in code shared with callers that
//! have no budget, where [`check`] is free and never fails.

use std::cell::RefCell;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nix::time::{ClockId, clock_gettime};
use tokio::sync::Semaphore;

use crate::config::ServerConfig;
use crate::error::{ErrorCode, ServiceError, reasons};

/// Calls of [`check`] between two readings of the thread's CPU clock. The
/// clock is a system call (~0.2 µs, no vDSO); loops call [`check`] once per
/// iteration, and their iterations cost a microsecond or more, so the
/// budget is overrun by well under a millisecond. The first call reads it
/// too, so that work checked once, after a step that cannot be cut short
/// (one JSON parse), is measured.
const CALLS_PER_READING: u32 = 32;

/// Why a costly request was refused or stopped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BudgetError {
    #[error(
        "the request exceeded its budget of {} of CPU time and was stopped (server.request_cpu_budget, env BERTH_SERVER__REQUEST_CPU_BUDGET)",
        humantime_serde::re::humantime::format_duration(*budget)
    )]
    CpuTime { budget: Duration },
    #[error(
        "{max} costly requests are already being worked on; try again shortly (server.max_costly_requests, env BERTH_SERVER__MAX_COSTLY_REQUESTS)"
    )]
    Busy { max: usize },
    /// The runtime shut down before the work could start.
    #[error("the service is shutting down")]
    ShuttingDown,
}

impl ServiceError for BudgetError {
    fn error_code(&self) -> ErrorCode {
        match self {
            Self::CpuTime { .. } | Self::Busy { .. } => ErrorCode::ResourceExhausted,
            Self::ShuttingDown => ErrorCode::Unavailable,
        }
    }

    fn reason(&self) -> &'static str {
        match self {
            Self::CpuTime { .. } => reasons::REQUEST_BUDGET_EXCEEDED,
            Self::Busy { .. } => reasons::TOO_MANY_COSTLY_REQUESTS,
            Self::ShuttingDown => "shutting_down",
        }
    }
}

/// One service's budget: shared by all its requests (clones share the
/// bound on concurrent work).
#[derive(Debug, Clone)]
pub struct RequestBudget {
    cpu_time: Duration,
    max_running: usize,
    running: Arc<Semaphore>,
}

impl RequestBudget {
    pub fn new(cpu_time: Duration, max_running: usize) -> Self {
        Self {
            cpu_time,
            max_running,
            running: Arc::new(Semaphore::new(max_running)),
        }
    }

    /// `server.request_cpu_budget` and `server.max_costly_requests`.
    pub fn from_config(server: &ServerConfig) -> Self {
        Self::new(server.request_cpu_budget, server.max_costly_requests)
    }

    /// Runs `work` on the blocking pool within the budget: refused at once
    /// with [`BudgetError::Busy`] when `max_running` works are running;
    /// answered [`BudgetError::CpuTime`] when `work` failed after a
    /// [`check`] found its CPU time spent. A panic in `work` is resumed here,
    /// as if it had run inline.
    pub async fn run<T, E, F>(&self, work: F) -> Result<T, E>
    where
        F: FnOnce() -> Result<T, E> + Send + 'static,
        T: Send + 'static,
        E: From<BudgetError> + Send + 'static,
    {
        let permit =
            Arc::clone(&self.running)
                .try_acquire_owned()
                .map_err(|_| BudgetError::Busy {
                    max: self.max_running,
                })?;
        let budget = self.cpu_time;
        // Set when this future is dropped (the caller hung up, or the
        // request's timeout fired), so that the work stops too.
        let abandoned = Arc::new(AtomicBool::new(false));
        let _abandon_on_drop = AbandonOnDrop(Arc::clone(&abandoned));
        let joined = tokio::task::spawn_blocking(move || {
            // Held until the work ends, not until its caller stops waiting.
            let _permit = permit;
            let meter = Metered::start(budget, abandoned);
            let result = work();
            if result.is_err() {
                release_freed_memory();
            }
            (result, meter.finish())
        })
        .await;
        match joined {
            Ok((Err(_), Stopped::Yes)) => Err(BudgetError::CpuTime { budget }.into()),
            Ok((result, _)) => result,
            Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
            Err(_) => Err(BudgetError::ShuttingDown.into()),
        }
    }
}

/// Gives back to the system what a refused request's work built and freed.
/// glibc keeps the small blocks a thread frees in that thread's arena (its
/// fast bins and tcache) rather than returning them, so without this a
/// manifest stopped halfway through its expansion left the orchestrator
/// ~65 MiB bigger for good. `malloc_trim` consolidates every arena and
/// releases their free pages: a few milliseconds, paid only on refusal.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn release_freed_memory() {
    // SAFETY: malloc_trim takes no pointers; it walks glibc's own arenas
    // under their locks, as any malloc or free does.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Other allocators give freed memory back on their own.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn release_freed_memory() {}

/// Fails once the budget of the work running on this thread is spent (or
/// its caller has gone away), and on every call after that. Outside
/// [`RequestBudget::run`] it never fails. Cheap: call it once per
/// iteration of every loop whose length the input decides.
pub fn check() -> Result<(), BudgetError> {
    METER.with_borrow_mut(|meter| match meter {
        Some(meter) => meter.check(),
        None => Ok(()),
    })
}

thread_local! {
    /// The budget of the work running on this thread, if any.
    static METER: RefCell<Option<Meter>> = const { RefCell::new(None) };
}

struct AbandonOnDrop(Arc<AtomicBool>);

impl Drop for AbandonOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stopped {
    Yes,
    No,
}

struct Meter {
    budget: Duration,
    clock: CpuClock,
    abandoned: Arc<AtomicBool>,
    calls: u32,
    stopped: Stopped,
}

impl Meter {
    fn check(&mut self) -> Result<(), BudgetError> {
        if self.stopped == Stopped::No {
            self.calls = self.calls.wrapping_add(1);
            if self.calls % CALLS_PER_READING == 1
                && (self.clock.spent() > self.budget || self.abandoned.load(Ordering::Relaxed))
            {
                self.stopped = Stopped::Yes;
            }
        }
        match self.stopped {
            Stopped::Yes => Err(BudgetError::CpuTime {
                budget: self.budget,
            }),
            Stopped::No => Ok(()),
        }
    }
}

/// The meter installed on this thread for one work; removed when dropped,
/// so that a panicking work leaves no budget behind on a pooled thread.
struct Metered;

impl Metered {
    fn start(budget: Duration, abandoned: Arc<AtomicBool>) -> Self {
        let meter = Meter {
            budget,
            clock: CpuClock::start(),
            abandoned,
            calls: 0,
            stopped: Stopped::No,
        };
        METER.set(Some(meter));
        Self
    }

    /// Whether a [`check`] stopped the work.
    fn finish(self) -> Stopped {
        METER.with_borrow(|meter| meter.as_ref().map_or(Stopped::No, |m| m.stopped))
    }
}

impl Drop for Metered {
    fn drop(&mut self) {
        METER.set(None);
    }
}

/// CPU time this thread has used since the clock started; the wall time
/// where the system has no per-thread CPU clock.
enum CpuClock {
    Thread(Duration),
    Wall(Instant),
}

impl CpuClock {
    fn start() -> Self {
        thread_cpu_time().map_or_else(|| Self::Wall(Instant::now()), Self::Thread)
    }

    fn spent(&self) -> Duration {
        match self {
            Self::Thread(start) => thread_cpu_time().unwrap_or(*start).saturating_sub(*start),
            Self::Wall(start) => start.elapsed(),
        }
    }
}

fn thread_cpu_time() -> Option<Duration> {
    clock_gettime(ClockId::CLOCK_THREAD_CPUTIME_ID)
        .ok()
        .map(Duration::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Burns CPU until a check fails; how long that took on this thread.
    fn spin_until_stopped() -> Result<Duration, BudgetError> {
        let clock = CpuClock::start();
        let mut x = 0u64;
        loop {
            for i in 0..1000u64 {
                x = x.wrapping_mul(31).wrapping_add(std::hint::black_box(i));
            }
            std::hint::black_box(x);
            if let Err(error) = check() {
                assert_eq!(check(), Err(error.clone()), "once stopped, stays stopped");
                return Err(error);
            }
            if clock.spent() > Duration::from_secs(10) {
                return Ok(clock.spent());
            }
        }
    }

    #[tokio::test]
    async fn a_loop_that_checks_is_stopped_near_its_deadline() {
        let budget = RequestBudget::new(Duration::from_millis(200), 2);
        let started = Instant::now();
        let spent = budget
            .run(|| {
                let clock = CpuClock::start();
                let stopped = spin_until_stopped();
                Ok::<_, BudgetError>((stopped, clock.spent()))
            })
            .await
            .unwrap();
        let (stopped, cpu) = spent;
        assert_eq!(
            stopped,
            Err(BudgetError::CpuTime {
                budget: Duration::from_millis(200)
            })
        );
        // The budget's clock starts a little before the loop's own.
        assert!(
            cpu >= Duration::from_millis(190) && cpu < Duration::from_millis(300),
            "stopped after {cpu:?} of CPU"
        );
        println!(
            "stopped after {cpu:?} of CPU, {:?} of wall time",
            started.elapsed()
        );
    }

    /// A service's own error, made from a budget error by `From`.
    #[derive(Debug, PartialEq)]
    enum WorkError {
        Parser(&'static str),
        Budget(BudgetError),
    }

    impl From<BudgetError> for WorkError {
        fn from(error: BudgetError) -> Self {
            Self::Budget(error)
        }
    }

    #[tokio::test]
    async fn work_stopped_by_its_budget_is_answered_with_the_limit() {
        let budget = RequestBudget::new(Duration::from_millis(50), 1);
        // The work fails with whatever error it has at hand when a check
        // stops it; the answer is the budget's.
        let answered = budget
            .run(|| spin_until_stopped().map_err(|_| WorkError::Parser("unexpected end")))
            .await
            .unwrap_err();
        let exceeded = BudgetError::CpuTime {
            budget: Duration::from_millis(50),
        };
        assert_eq!(answered, WorkError::Budget(exceeded.clone()));
        let message = exceeded.to_string();
        assert!(
            message.contains("50ms") && message.contains("server.request_cpu_budget"),
            "{message}"
        );
        assert_eq!(
            exceeded.error_code().grpc_code(),
            tonic::Code::ResourceExhausted
        );
        assert_eq!(exceeded.error_code().http_status().as_u16(), 429);
        assert_eq!(exceeded.reason(), reasons::REQUEST_BUDGET_EXCEEDED);
        // Work that ends in time is answered as it ended, its own errors
        // included, and leaves no budget behind on its thread.
        assert_eq!(budget.run(|| Ok::<_, WorkError>(7)).await, Ok(7));
        assert_eq!(
            budget.run(|| Err::<(), _>(WorkError::Parser("bad"))).await,
            Err(WorkError::Parser("bad"))
        );
        assert_eq!(check(), Ok(()));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn beyond_the_bound_a_request_is_refused_at_once() {
        let budget = RequestBudget::new(Duration::from_secs(30), 1);
        let (release, released) = std::sync::mpsc::channel::<()>();
        let (started, has_started) = tokio::sync::oneshot::channel();
        let first = tokio::spawn({
            let budget = budget.clone();
            async move {
                budget
                    .run(move || {
                        started.send(()).unwrap();
                        released.recv().unwrap();
                        Ok::<_, BudgetError>("first")
                    })
                    .await
            }
        });
        has_started.await.unwrap();
        let refused_at = Instant::now();
        let refused = budget.run(|| Ok::<_, BudgetError>("second")).await;
        assert_eq!(refused, Err(BudgetError::Busy { max: 1 }));
        assert!(refused_at.elapsed() < Duration::from_millis(100));
        let message = refused.unwrap_err().to_string();
        assert!(message.contains("server.max_costly_requests"), "{message}");
        release.send(()).unwrap();
        assert_eq!(first.await.unwrap(), Ok("first"));
        assert_eq!(
            budget.run(|| Ok::<_, BudgetError>("third")).await,
            Ok("third")
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn work_whose_caller_went_away_stops() {
        let budget = RequestBudget::new(Duration::from_secs(30), 1);
        let (done, stopped) = std::sync::mpsc::channel();
        let call = budget.run(move || {
            let clock = CpuClock::start();
            let outcome = spin_until_stopped();
            done.send((outcome, clock.spent())).unwrap();
            Ok::<_, BudgetError>(())
        });
        // The caller gives up after 100 ms, as a request's timeout would.
        assert!(
            tokio::time::timeout(Duration::from_millis(100), call)
                .await
                .is_err()
        );
        let (outcome, spent) = tokio::task::spawn_blocking(move || stopped.recv().unwrap())
            .await
            .unwrap();
        assert!(outcome.is_err(), "the work went on after its caller left");
        assert!(spent < Duration::from_secs(1), "{spent:?}");
        // Its permit is given back as its thread finishes.
        let deadline = Instant::now() + Duration::from_secs(5);
        while budget.run(|| Ok::<_, BudgetError>(())).await.is_err() {
            assert!(Instant::now() < deadline, "the permit was never given back");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[test]
    fn outside_a_budget_check_never_fails() {
        for _ in 0..10 * CALLS_PER_READING {
            assert_eq!(check(), Ok(()));
        }
    }
}
