//! The gRPC service: requests checked and turned into sessions on the
//! samplers, figures turned into answers. Errors are [`PowerError`]s until
//! the edge, where each becomes its status once.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use berth_proto::power::v1 as pb;
use berth_proto::power::v1::power_sampler_server::PowerSampler;
use berth_server::error::into_status;
use berth_server::{CancellationToken, GrpcStream};
use futures::StreamExt;
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;
use tonic::{Request, Response, Status};

use crate::clock::Clock;
use crate::config::SamplerConfig;
use crate::devices::{DeviceEntry, DeviceRegistry};
use crate::error::{PowerError, StartError};
use crate::export;
use crate::metrics::PowerMetrics;
use crate::reading::SourceKind;
use crate::recorder::{Point, RecordedDevice, Recorder};
use crate::sampler::{Sampler, Tick};
use crate::series::{SampleRow, SeriesView};
use crate::session::{OpenSession, SessionInfo, Sessions, StoppedSession};
use crate::source;

const MAX_RUN_ID_BYTES: usize = 256;
const DEFAULT_PAGE_SIZE: u32 = 1_000;
const MAX_PAGE_SIZE: u32 = 10_000;
const EXPORT_CHUNK_BYTES: usize = 64 * 1024;

#[derive(Clone)]
pub struct PowerSamplerService {
    inner: Arc<Inner>,
}

struct Inner {
    clock: Clock,
    config: SamplerConfig,
    devices: DeviceRegistry,
    samplers: Vec<Sampler>,
    sessions: Mutex<Sessions>,
    metrics: PowerMetrics,
    shutdown: CancellationToken,
}

impl PowerSamplerService {
    /// Opens the sources and starts their (idle) sampling threads.
    pub fn new(
        config: SamplerConfig,
        metrics: PowerMetrics,
        shutdown: CancellationToken,
    ) -> Result<Self, StartError> {
        config.validate()?;
        let clock = Clock::start();
        let discovered = source::discover(&config)?;
        let devices = DeviceRegistry::new(&discovered.sources, discovered.unavailable)?;
        let samplers = discovered
            .sources
            .into_iter()
            .enumerate()
            .map(|(index, source)| {
                let name = source.name().to_string();
                Sampler::spawn(
                    index,
                    source,
                    clock,
                    metrics.source(&name),
                    config.stream_buffer,
                )
                .map_err(|error| StartError::Thread {
                    source_name: name,
                    error,
                })
            })
            .collect::<Result<_, _>>()?;
        let sessions = Mutex::new(Sessions::new(
            config.max_sessions,
            config.max_stopped_sessions,
        ));
        Ok(Self {
            inner: Arc::new(Inner {
                clock,
                config,
                devices,
                samplers,
                sessions,
                metrics,
                shutdown,
            }),
        })
    }
}

/// Removes a session whose StartSession was abandoned during its idle
/// baseline (client gone or deadline passed), unless disarmed.
struct DiscardOnDrop {
    inner: Arc<Inner>,
    id: Option<String>,
}

impl Drop for DiscardOnDrop {
    fn drop(&mut self) {
        if let Some(id) = self.id.take() {
            let mut sessions = self.inner.lock_sessions();
            if let Ok(session) = sessions.take_open(&id) {
                self.inner.release(&session);
                self.inner
                    .metrics
                    .open_sessions
                    .set(sessions.open_count() as i64);
            }
        }
    }
}

/// Counts a live stream for as long as it exists: dropped with the stream
/// when the client goes away.
struct LiveStreamGuard(prometheus_client::metrics::gauge::Gauge);

impl LiveStreamGuard {
    fn new(gauge: &prometheus_client::metrics::gauge::Gauge) -> Self {
        gauge.inc();
        Self(gauge.clone())
    }
}

impl Drop for LiveStreamGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl Inner {
    fn lock_sessions(&self) -> MutexGuard<'_, Sessions> {
        // Sessions are changed in single statements; a panic elsewhere leaves
        // them usable.
        self.sessions.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn entry(&self, index: usize) -> &DeviceEntry {
        self.devices.get(index)
    }

    /// The samplers reading a session's devices, each once.
    fn samplers_of(&self, devices: &[usize]) -> BTreeSet<usize> {
        devices.iter().map(|&d| self.entry(d).sampler).collect()
    }

    /// Stops feeding a session and ends its live streams.
    fn release(&self, session: &OpenSession) {
        for sampler in self.samplers_of(&session.info.devices) {
            self.samplers[sampler].unsubscribe(&session.recorder);
        }
        session.ended.cancel();
    }

    fn rate(&self, asked: f64) -> Result<f64, PowerError> {
        let config = &self.config;
        if asked == 0.0 {
            return Ok(config.default_rate_hz);
        }
        if !(config.min_rate_hz..=config.max_rate_hz).contains(&asked) {
            return Err(PowerError::RateOutOfRange {
                rate: asked,
                min: config.min_rate_hz,
                max: config.max_rate_hz,
                default: config.default_rate_hz,
            });
        }
        Ok(asked)
    }

    fn baseline(&self, asked: Option<prost_types::Duration>) -> Result<Duration, PowerError> {
        let Some(asked) = asked else {
            return Ok(Duration::ZERO);
        };
        let max = self.config.max_idle_baseline;
        match Duration::try_from(asked) {
            Ok(baseline) if baseline <= max => Ok(baseline),
            _ => Err(PowerError::BaselineOutOfRange {
                requested: format!("{}.{:09}s", asked.seconds, asked.nanos),
                max,
            }),
        }
    }

    fn series_view<'a>(&'a self, info: &SessionInfo, points: &'a [Point]) -> SeriesView<'a> {
        let labels = info
            .devices
            .iter()
            .map(|&d| {
                let entry = self.entry(d);
                (
                    entry.info.id.as_str(),
                    entry.info.kind == SourceKind::Replay,
                )
            })
            .collect();
        SeriesView::new(labels, points, info.started_at, self.clock)
    }

    fn session_reply(&self, info: &SessionInfo) -> pb::Session {
        pb::Session {
            id: info.id.clone(),
            run_id: info.run_id.clone(),
            devices: info
                .devices
                .iter()
                .map(|&d| self.entry(d).info.id.clone())
                .collect(),
            rate_hz: info.rate_hz,
            started_at: Some(self.clock.wall(info.started_at).into()),
            idle_baseline: Some(proto_duration(info.idle_baseline)),
            replay: info
                .devices
                .iter()
                .any(|&d| self.entry(d).info.kind == SourceKind::Replay),
        }
    }

    fn summary(&self, session: &StoppedSession) -> pb::SessionSummary {
        let info = &session.info;
        let devices = info
            .devices
            .iter()
            .zip(&session.devices)
            .map(|(&d, outcome)| {
                let stats = &outcome.stats;
                let span = stats.span.as_secs_f64();
                let energy_net_j = outcome
                    .baseline_w
                    .zip(stats.energy_j())
                    .map(|(idle_w, energy)| energy - idle_w * span);
                pb::DeviceEnergy {
                    device: self.entry(d).info.id.clone(),
                    energy_counter_j: stats.energy_counter_j,
                    energy_integrated_j: stats.energy_integrated_j,
                    mean_w: stats.mean_w,
                    peak_w: stats.peak_w,
                    samples: stats.samples,
                    distinct_readings: stats.distinct_readings,
                    coverage: stats.coverage,
                    idle_baseline_w: outcome.baseline_w,
                    replay: self.entry(d).info.kind == SourceKind::Replay,
                    energy_net_j,
                    achieved_rate_hz: if span > 0.0 {
                        stats.samples.saturating_sub(1) as f64 / span
                    } else {
                        0.0
                    },
                    span: Some(proto_duration(stats.span)),
                }
            })
            .collect();
        pb::SessionSummary {
            session_id: info.id.clone(),
            run_id: info.run_id.clone(),
            duration: Some(proto_duration(
                session.stopped_at.saturating_sub(info.started_at),
            )),
            devices,
            started_at: Some(self.clock.wall(info.started_at).into()),
            stopped_at: Some(self.clock.wall(session.stopped_at).into()),
            series_truncated: session.truncated,
        }
    }

    /// The stored series of a stopped session, without holding the lock.
    fn stopped_series(&self, id: &str) -> Result<(SessionInfo, Arc<Vec<Point>>), PowerError> {
        let sessions = self.lock_sessions();
        let session = sessions.stopped(id)?;
        Ok((session.info.clone(), session.series.clone()))
    }
}

fn proto_duration(duration: Duration) -> prost_types::Duration {
    prost_types::Duration::try_from(duration).unwrap_or(prost_types::Duration {
        seconds: i64::MAX,
        nanos: 0,
    })
}

fn proto_sample(row: &SampleRow<'_>) -> pb::Sample {
    let r = row.reading;
    pb::Sample {
        device: row.device.to_string(),
        time: Some(row.time.into()),
        elapsed: Some(proto_duration(row.elapsed)),
        power_w: r.power_w,
        energy_j: r.energy_j,
        utilization_pct: r.utilization_pct.map(f64::from),
        memory_used_bytes: r.memory_used_bytes,
        temperature_c: r.temperature_c.map(f64::from),
        sm_clock_mhz: r.sm_clock_mhz,
        replay: row.replay,
        power_avg_w: r.power_avg_w,
    }
}

fn proto_device(entry: &DeviceEntry, max_rate_hz: f64) -> pb::Device {
    let info = &entry.info;
    pb::Device {
        id: info.id.clone(),
        name: info.name.clone(),
        source: match info.kind {
            SourceKind::Nvml => pb::SourceKind::Nvml,
            SourceKind::Rapl => pb::SourceKind::Rapl,
            SourceKind::Replay => pb::SourceKind::Replay,
        }
        .into(),
        has_energy_counter: info.has_energy_counter,
        has_power: info.has_power,
        max_rate_hz,
    }
}

impl PowerSamplerService {
    fn devices_reply(&self) -> pb::ListDevicesResponse {
        let inner = &self.inner;
        pb::ListDevicesResponse {
            devices: inner
                .devices
                .entries()
                .iter()
                .map(|entry| proto_device(entry, inner.config.max_rate_hz))
                .collect(),
            unavailable: inner.devices.unavailable().clone().into_iter().collect(),
            min_rate_hz: inner.config.min_rate_hz,
            default_rate_hz: inner.config.default_rate_hz,
        }
    }

    async fn open_session(
        &self,
        request: pb::StartSessionRequest,
    ) -> Result<pb::Session, PowerError> {
        let inner = &self.inner;
        if request.run_id.len() > MAX_RUN_ID_BYTES {
            return Err(PowerError::RunIdTooLong {
                len: request.run_id.len(),
                max: MAX_RUN_ID_BYTES,
            });
        }
        let devices = inner.devices.resolve(&request.devices)?;
        let rate_hz = inner.rate(request.rate_hz)?;
        let idle_baseline = inner.baseline(request.idle_baseline)?;
        let recorded: Vec<RecordedDevice> = devices
            .iter()
            .map(|&d| {
                let entry = inner.entry(d);
                RecordedDevice {
                    sampler: entry.sampler,
                    index: entry.index,
                    integrate: entry.info.has_power,
                    counter_range_j: entry.info.counter_range_j,
                }
            })
            .collect();
        let now = inner.clock.now();
        let recorder = Arc::new(Recorder::new(
            &recorded,
            rate_hz,
            now,
            !idle_baseline.is_zero(),
            inner.config.max_series_samples,
        ));
        let info = SessionInfo {
            id: uuid::Uuid::new_v4().to_string(),
            run_id: request.run_id,
            devices,
            rate_hz,
            idle_baseline,
            started_at: now,
        };
        {
            let mut sessions = inner.lock_sessions();
            sessions.insert_open(OpenSession {
                info: info.clone(),
                recorder: recorder.clone(),
                ended: inner.shutdown.child_token(),
            })?;
            for sampler in inner.samplers_of(&info.devices) {
                inner.samplers[sampler].subscribe(rate_hz, recorder.clone());
            }
            inner
                .metrics
                .open_sessions
                .set(sessions.open_count() as i64);
        }
        if idle_baseline.is_zero() {
            return Ok(inner.session_reply(&info));
        }

        let mut discard = DiscardOnDrop {
            inner: inner.clone(),
            id: Some(info.id.clone()),
        };
        tokio::time::sleep(idle_baseline).await;
        discard.id = None;
        let started_at = inner.clock.now();
        recorder.begin_measurement(started_at);
        let mut sessions = inner.lock_sessions();
        let session = sessions
            .open_mut(&info.id)
            .ok_or_else(|| PowerError::UnknownSession(info.id.clone()))?;
        session.info.started_at = started_at;
        Ok(inner.session_reply(&session.info))
    }

    fn close_session(&self, id: &str) -> Result<pb::SessionSummary, PowerError> {
        let inner = &self.inner;
        let mut sessions = inner.lock_sessions();
        let open = sessions.take_open(id)?;
        let stopped_at = inner.clock.now();
        // Closed before unsubscribing: nothing after `stopped_at` counts.
        let recording = open.recorder.close(stopped_at);
        inner.release(&open);
        let stopped = StoppedSession {
            info: open.info,
            stopped_at,
            devices: recording.devices,
            series: Arc::new(recording.series),
            truncated: recording.truncated,
        };
        let summary = inner.summary(&stopped);
        sessions.insert_stopped(stopped);
        inner
            .metrics
            .open_sessions
            .set(sessions.open_count() as i64);
        Ok(summary)
    }

    fn live_stream(&self, id: &str) -> Result<GrpcStream<pb::Sample>, PowerError> {
        let inner = self.inner.clone();
        let (info, ended) = {
            let sessions = inner.lock_sessions();
            let session = sessions.open(id)?;
            (session.info.clone(), session.ended.clone())
        };
        let live = inner
            .samplers_of(&info.devices)
            .into_iter()
            .map(|sampler| BroadcastStream::new(inner.samplers[sampler].live()));
        let guard = LiveStreamGuard::new(&inner.metrics.live_streams);
        let samples = futures::stream::select_all(live)
            .flat_map(move |tick| {
                // Lives as long as the stream: dropped when the client goes.
                let _alive = &guard;
                let samples = match tick {
                    Ok(tick) => live_samples(&inner, &info, &tick),
                    Err(BroadcastStreamRecvError::Lagged(skipped)) => {
                        inner.metrics.stream_skipped_ticks.inc_by(skipped);
                        Vec::new()
                    }
                };
                futures::stream::iter(samples.into_iter().map(Ok))
            })
            .take_until(ended.cancelled_owned());
        Ok(Box::pin(samples))
    }

    fn series_page(
        &self,
        request: &pb::GetSeriesRequest,
    ) -> Result<pb::GetSeriesResponse, PowerError> {
        let inner = &self.inner;
        let page_size = match request.page_size {
            0 => DEFAULT_PAGE_SIZE,
            size if size > MAX_PAGE_SIZE => {
                return Err(PowerError::PageTooLarge {
                    size,
                    max: MAX_PAGE_SIZE,
                });
            }
            size => size,
        } as usize;
        let skip = if request.page_token.is_empty() {
            0
        } else {
            request
                .page_token
                .parse::<usize>()
                .map_err(|_| PowerError::BadPageToken(request.page_token.clone()))?
        };
        let (info, series) = inner.stopped_series(&request.session_id)?;
        let device = if request.device.is_empty() {
            None
        } else {
            let position = info
                .devices
                .iter()
                .position(|&d| inner.entry(d).info.id == request.device)
                .ok_or_else(|| PowerError::DeviceNotInSession {
                    device: request.device.clone(),
                    session: info.id.clone(),
                })?;
            Some(position as u16)
        };
        let view = inner.series_view(&info, &series);
        let mut samples: Vec<pb::Sample> = view
            .rows(device, skip)
            .take(page_size + 1)
            .map(|row| proto_sample(&row))
            .collect();
        let next_page_token = if samples.len() > page_size {
            samples.truncate(page_size);
            (skip + page_size).to_string()
        } else {
            String::new()
        };
        Ok(pb::GetSeriesResponse {
            samples,
            next_page_token,
        })
    }

    async fn export_file(&self, request: pb::ExportSeriesRequest) -> Result<Vec<u8>, PowerError> {
        let format = match pb::ExportFormat::try_from(request.format) {
            Ok(format @ (pb::ExportFormat::Csv | pb::ExportFormat::Parquet)) => format,
            _ => return Err(PowerError::BadFormat(request.format)),
        };
        let (info, series) = self.inner.stopped_series(&request.session_id)?;
        let inner = self.inner.clone();
        // Writing a file of up to max_series_samples rows is CPU work: off the runtime.
        tokio::task::spawn_blocking(move || {
            let view = inner.series_view(&info, &series);
            match format {
                pb::ExportFormat::Parquet => {
                    export::parquet(&view).map_err(|e| PowerError::Export(e.to_string()))
                }
                _ => export::csv(&view).map_err(|e| PowerError::Export(e.to_string())),
            }
        })
        .await
        .map_err(|e| PowerError::Export(e.to_string()))?
    }
}

/// The readings of a live tick that belong to the session, as samples.
fn live_samples(inner: &Inner, info: &SessionInfo, tick: &Tick) -> Vec<pb::Sample> {
    tick.readings
        .iter()
        .filter(|reading| reading.at >= info.started_at)
        .filter_map(|reading| {
            let device = info
                .devices
                .iter()
                .map(|&d| inner.entry(d))
                .find(|entry| entry.sampler == tick.sampler && entry.index == reading.device)?;
            Some(proto_sample(&SampleRow {
                device: &device.info.id,
                replay: device.info.kind == SourceKind::Replay,
                time: inner.clock.wall(reading.at),
                elapsed: reading.at - info.started_at,
                reading,
            }))
        })
        .collect()
}

#[tonic::async_trait]
impl PowerSampler for PowerSamplerService {
    async fn list_devices(
        &self,
        _: Request<pb::ListDevicesRequest>,
    ) -> Result<Response<pb::ListDevicesResponse>, Status> {
        Ok(Response::new(self.devices_reply()))
    }

    async fn start_session(
        &self,
        request: Request<pb::StartSessionRequest>,
    ) -> Result<Response<pb::Session>, Status> {
        self.open_session(request.into_inner())
            .await
            .map(Response::new)
            .map_err(into_status)
    }

    async fn stop_session(
        &self,
        request: Request<pb::StopSessionRequest>,
    ) -> Result<Response<pb::SessionSummary>, Status> {
        self.close_session(&request.into_inner().id)
            .map(Response::new)
            .map_err(into_status)
    }

    type StreamSamplesStream = GrpcStream<pb::Sample>;
    async fn stream_samples(
        &self,
        request: Request<pb::StreamSamplesRequest>,
    ) -> Result<Response<Self::StreamSamplesStream>, Status> {
        self.live_stream(&request.into_inner().session_id)
            .map(Response::new)
            .map_err(into_status)
    }

    async fn get_series(
        &self,
        request: Request<pb::GetSeriesRequest>,
    ) -> Result<Response<pb::GetSeriesResponse>, Status> {
        self.series_page(&request.into_inner())
            .map(Response::new)
            .map_err(into_status)
    }

    type ExportSeriesStream = GrpcStream<pb::ExportChunk>;
    async fn export_series(
        &self,
        request: Request<pb::ExportSeriesRequest>,
    ) -> Result<Response<Self::ExportSeriesStream>, Status> {
        let file = self
            .export_file(request.into_inner())
            .await
            .map_err(into_status)?;
        let chunks: Vec<Result<pb::ExportChunk, Status>> = file
            .chunks(EXPORT_CHUNK_BYTES)
            .map(|data| {
                Ok(pb::ExportChunk {
                    data: data.to_vec(),
                })
            })
            .collect();
        Ok(Response::new(Box::pin(futures::stream::iter(chunks))))
    }
}
