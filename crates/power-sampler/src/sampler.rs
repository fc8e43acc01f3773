//! One thread per source, off the async runtime: a slow NVML call must not
//! stall gRPC, and the runtime's scheduling must not jitter the samples.
//!
//! The thread sleeps while no session needs its source, and otherwise reads
//! every device at the highest rate any open session asked for, on a fixed
//! schedule (instants `k / rate` after the rate was set, so errors do not
//! accumulate). Each tick goes to the subscribed sessions' recorders and to a
//! bounded broadcast ring that live streams read; a reader that falls behind
//! skips ticks instead of holding the thread back.

use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::broadcast;

use crate::clock::Clock;
use crate::metrics::SourceMetrics;
use crate::reading::Reading;
use crate::recorder::Recorder;
use crate::source::Source;

/// The readings of one source at one instant.
#[derive(Debug)]
pub struct Tick {
    pub sampler: usize,
    pub readings: Vec<Reading>,
}

pub struct Sampler {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

struct Shared {
    state: Mutex<State>,
    wake: Condvar,
    live: broadcast::Sender<Arc<Tick>>,
}

#[derive(Default)]
struct State {
    subscribers: Vec<(f64, Arc<Recorder>)>,
    stop: bool,
}

impl State {
    fn rate_hz(&self) -> Option<f64> {
        self.subscribers
            .iter()
            .map(|(rate, _)| *rate)
            .reduce(f64::max)
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The instants a source is read at.
struct Schedule {
    rate_hz: f64,
    anchor: Instant,
    period_ns: u64,
    ticks: u64,
}

impl Schedule {
    fn new(rate_hz: f64, anchor: Instant) -> Self {
        Self {
            rate_hz,
            anchor,
            period_ns: (1e9 / rate_hz).round() as u64,
            ticks: 0,
        }
    }

    fn due(&self) -> Instant {
        self.anchor + Duration::from_nanos(self.period_ns.saturating_mul(self.ticks))
    }

    /// Moves to the next instant after a read that finished at `now`. A read
    /// that is late by less than a period still happens; instants a whole
    /// period or more in the past are skipped, and their count returned.
    fn advance(&mut self, now: Instant) -> u64 {
        self.ticks += 1;
        let late = now.saturating_duration_since(self.due()).as_nanos() as u64;
        let missed = late / self.period_ns;
        self.ticks += missed;
        missed
    }
}

impl Sampler {
    /// Starts the thread of source number `index`; it sleeps until a
    /// session subscribes.
    pub fn spawn(
        index: usize,
        source: Box<dyn Source>,
        clock: Clock,
        metrics: SourceMetrics,
        stream_buffer: usize,
    ) -> std::io::Result<Self> {
        let (live, _) = broadcast::channel(stream_buffer);
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            wake: Condvar::new(),
            live,
        });
        let thread = std::thread::Builder::new()
            .name(format!("sampler-{}", source.name()))
            .spawn({
                let shared = shared.clone();
                move || run(index, source, &shared, clock, &metrics)
            })?;
        Ok(Self {
            shared,
            thread: Some(thread),
        })
    }

    /// Feeds `recorder` every tick from now on, sampling at least at `rate_hz`.
    pub fn subscribe(&self, rate_hz: f64, recorder: Arc<Recorder>) {
        self.shared.lock().subscribers.push((rate_hz, recorder));
        self.shared.wake.notify_all();
    }

    /// Stops feeding `recorder`; the source sleeps when no one is left.
    pub fn unsubscribe(&self, recorder: &Arc<Recorder>) {
        self.shared
            .lock()
            .subscribers
            .retain(|(_, r)| !Arc::ptr_eq(r, recorder));
        self.shared.wake.notify_all();
    }

    /// The live ticks from now on.
    pub fn live(&self) -> broadcast::Receiver<Arc<Tick>> {
        self.shared.live.subscribe()
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.shared.lock().stop = true;
        self.shared.wake.notify_all();
        if let Some(thread) = self.thread.take() {
            // The thread wakes at once; only a read in progress delays it.
            let _ = thread.join();
        }
    }
}

fn run(
    index: usize,
    mut source: Box<dyn Source>,
    shared: &Shared,
    clock: Clock,
    metrics: &SourceMetrics,
) {
    let devices = source.devices().len();
    let mut failures = Vec::new();
    let mut schedule: Option<Schedule> = None;
    let mut state = shared.lock();
    loop {
        if state.stop {
            return;
        }
        let Some(rate_hz) = state.rate_hz() else {
            schedule = None;
            metrics.rate_hz.set(0.0);
            state = shared
                .wake
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
            continue;
        };
        let now = Instant::now();
        let plan = match &mut schedule {
            Some(plan) if plan.rate_hz == rate_hz => plan,
            _ => {
                metrics.rate_hz.set(rate_hz);
                schedule.insert(Schedule::new(rate_hz, now))
            }
        };
        let due = plan.due();
        if now < due {
            // Woken early by a new subscriber, a rate change or stop: re-check.
            state = shared
                .wake
                .wait_timeout(state, due - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
            continue;
        }

        // Read without the lock: subscribing must never wait on a device.
        drop(state);
        let mut readings = Vec::with_capacity(devices);
        source.read(&clock, &mut readings, &mut failures);
        metrics.samples.inc_by(readings.len() as u64);
        if !failures.is_empty() {
            // The first failure is logged; the count says if it goes on.
            if metrics.read_errors.get() == 0 {
                tracing::warn!(source = source.name(), error = %failures[0], "reading failed");
            }
            metrics.read_errors.inc_by(failures.len() as u64);
            failures.clear();
        }
        let tick = Arc::new(Tick {
            sampler: index,
            readings,
        });

        state = shared.lock();
        for (_, recorder) in &state.subscribers {
            recorder.record(index, &tick.readings);
        }
        // No live stream listening is the usual case, not an error.
        let _ = shared.live.send(tick);
        if let Some(plan) = &mut schedule {
            metrics.missed_ticks.inc_by(plan.advance(Instant::now()));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::recorder::RecordedDevice;
    use crate::source::ReplaySource;

    const TRACE: &str = "time_s,device,power_w,energy_j\n0,a,10,0\n1,a,20,15\n";

    fn replay_sampler(clock: Clock, metrics: &SourceMetrics) -> Sampler {
        let source = ReplaySource::parse(Path::new("t.csv"), TRACE).unwrap();
        Sampler::spawn(3, Box::new(source), clock, metrics.clone(), 64).unwrap()
    }

    fn recorder(clock: &Clock) -> Arc<Recorder> {
        let device = RecordedDevice {
            sampler: 3,
            index: 0,
            integrate: true,
            counter_range_j: None,
        };
        Arc::new(Recorder::new(&[device], 1.0, clock.now(), false, 100_000))
    }

    #[test]
    fn samples_at_the_fastest_rate_asked_and_never_faster() {
        let clock = Clock::start();
        let metrics = SourceMetrics::default();
        let sampler = replay_sampler(clock, &metrics);
        let (slow, fast) = (recorder(&clock), recorder(&clock));
        let started = clock.now();
        sampler.subscribe(400.0, fast.clone());
        sampler.subscribe(50.0, slow.clone());
        std::thread::sleep(Duration::from_millis(300));
        sampler.unsubscribe(&slow);
        sampler.unsubscribe(&fast);
        let elapsed = (clock.now() - started).as_secs_f64();
        let series = fast.close(clock.now()).series;
        let slow_samples = slow.close(clock.now()).series.len();

        // The schedule never runs ahead: at most one read per period, plus the first.
        assert!(
            series.len() as f64 <= 400.0 * elapsed + 1.0,
            "{} in {elapsed} s",
            series.len()
        );
        assert!(
            series.len() as f64 > 50.0 * elapsed + 1.0,
            "{} in {elapsed} s",
            series.len()
        );
        // Both sessions share the one sampler: the same ticks, give or take
        // one between the two subscriptions and one between the two ends.
        assert!(
            series.len().abs_diff(slow_samples) <= 2,
            "{} vs {slow_samples}",
            series.len()
        );
        assert!(
            series.windows(2).all(|w| w[0].reading.at < w[1].reading.at),
            "monotonic"
        );
    }

    #[test]
    fn sleeps_without_subscribers_and_feeds_live_streams() {
        let clock = Clock::start();
        let metrics = SourceMetrics::default();
        let sampler = replay_sampler(clock, &metrics);
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(metrics.samples.get(), 0, "no session, no reading");

        let mut live = sampler.live();
        let recorder = recorder(&clock);
        sampler.subscribe(200.0, recorder.clone());
        let tick = live.blocking_recv().unwrap();
        assert_eq!(tick.sampler, 3);
        assert_eq!(tick.readings.len(), 1);
        sampler.unsubscribe(&recorder);
        let taken = metrics.samples.get();
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(
            metrics.samples.get(),
            taken,
            "stopped with the last subscriber"
        );
    }

    #[test]
    fn a_late_read_runs_but_a_whole_missed_period_is_skipped() {
        let anchor = Instant::now();
        let mut schedule = Schedule::new(100.0, anchor);
        assert_eq!(schedule.advance(anchor + Duration::from_millis(15)), 0);
        assert_eq!(schedule.due(), anchor + Duration::from_millis(10));
        // Finished at 45 ms: 20 and 30 ms are a period or more in the past and
        // are skipped; 40 ms runs, late.
        assert_eq!(schedule.advance(anchor + Duration::from_millis(45)), 2);
        assert_eq!(schedule.due(), anchor + Duration::from_millis(40));
    }
}
