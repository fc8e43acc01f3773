//! The ContainerAgent gRPC service: checks requests, routes each to the
//! runtime that owns the workload, and turns errors into statuses.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use berth_proto::agent::v1::container_agent_server::ContainerAgent;
use berth_proto::agent::v1::*;
use berth_proto::common::v1::Runtime;
use berth_server::GrpcStream;
use tokio::sync::{Semaphore, mpsc};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::{BroadcastStream, ReceiverStream};
use tonic::{Request, Response, Status, Streaming};

use crate::error::AgentError;
use crate::events::EventBus;
use crate::keyed_exec::KeyedExecs;
use crate::metrics::{Census, metrics};
use crate::process_group::HostCommand;
use crate::provenance::ProvenanceProbe;
use crate::runtime::{ExecCommand, WorkloadRuntime, validate_name};
use crate::spec_limits;

const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest workload id or name looked up: names are at most 128 bytes, ids
/// shorter; a longer one would only travel to every engine to be unknown.
const MAX_WORKLOAD_REF_BYTES: usize = 256;
const DEFAULT_STATS_INTERVAL: Duration = Duration::from_secs(1);
/// The longest DescribeExecAccounting waits for a record (a call held open).
const MAX_ACCOUNTING_WAIT: Duration = Duration::from_secs(60);
/// Tar chunks buffered between the client and the engine during an import.
const IMPORT_BUFFER: usize = 16;

pub struct AgentService {
    runtimes: BTreeMap<i32, Arc<dyn WorkloadRuntime>>,
    events: EventBus,
    execs: Arc<Semaphore>,
    max_execs: usize,
    keyed_execs: KeyedExecs,
    max_image_bytes: u64,
    host: HostInfo,
    provenance: Arc<ProvenanceProbe>,
    /// Counts the workloads and execs for the metrics while the service lives.
    _census: Arc<Census>,
}

impl AgentService {
    pub fn new(
        runtimes: Vec<Arc<dyn WorkloadRuntime>>,
        events: EventBus,
        max_execs: usize,
        keyed_execs: KeyedExecs,
        max_image_bytes: u64,
        host: HostInfo,
        provenance: ProvenanceProbe,
    ) -> Self {
        let execs = Arc::new(Semaphore::new(max_execs));
        let census = Census::start(&runtimes, events.subscribe(), execs.clone(), max_execs);
        Self {
            runtimes: runtimes.into_iter().map(|r| (r.kind() as i32, r)).collect(),
            events,
            execs,
            max_execs,
            keyed_execs,
            max_image_bytes,
            host,
            provenance: Arc::new(provenance),
            _census: census,
        }
    }

    /// The keyed exec `key`: from this agent's table, else one an earlier
    /// agent process started that a runtime still reaches (a VM's shim),
    /// entered in the table as it is attached.
    async fn attach_keyed(&self, key: &str) -> Result<mpsc::Receiver<ExecOutput>, AgentError> {
        match self.keyed_execs.attach(key) {
            Err(AgentError::ExecNotFound(_)) => {}
            known => return known,
        }
        for runtime in self.runtimes.values() {
            let permit = self
                .execs
                .clone()
                .try_acquire_owned()
                .map_err(|_| AgentError::TooManyExecs(self.max_execs))?;
            let found = async {
                runtime
                    .reattach(key, permit)
                    .await?
                    .ok_or_else(|| AgentError::ExecNotFound(key.to_string()))
            };
            match self.keyed_execs.start(key.to_string(), found).await {
                Err(AgentError::ExecNotFound(_)) => {}
                // Another attacher entered it meanwhile.
                Err(AgentError::ExecKeyTaken(_)) => return self.keyed_execs.attach(key),
                attached => return attached,
            }
        }
        Err(AgentError::ExecNotFound(key.to_string()))
    }

    fn runtime(
        &self,
        field: &'static str,
        kind: i32,
    ) -> Result<&Arc<dyn WorkloadRuntime>, AgentError> {
        let name = Runtime::try_from(kind)
            .map(|r| r.as_str_name())
            .unwrap_or("RUNTIME_UNKNOWN");
        if kind == Runtime::Unspecified as i32 {
            return Err(AgentError::InvalidArgument {
                field,
                reason: "must be set (e.g. RUNTIME_PROCESS)".to_string(),
            });
        }
        self.runtimes.get(&kind).ok_or_else(|| {
            let why = self
                .host
                .unavailable_runtimes
                .get(name)
                .cloned()
                .unwrap_or_else(|| "not configured".into());
            AgentError::RuntimeUnavailable(name, why)
        })
    }

    /// The runtime owning workload `id` (an id or a name), and its current state.
    async fn owner(&self, id: &str) -> Result<(&Arc<dyn WorkloadRuntime>, Workload), AgentError> {
        if id.is_empty() {
            return Err(AgentError::InvalidArgument {
                field: "id",
                reason: "must name a workload".into(),
            });
        }
        if id.len() > MAX_WORKLOAD_REF_BYTES {
            return Err(AgentError::InvalidArgument {
                field: "id",
                reason: format!("{} bytes; at most {MAX_WORKLOAD_REF_BYTES}", id.len()),
            });
        }
        for runtime in self.runtimes.values() {
            if let Some(workload) = runtime.inspect(id).await? {
                return Ok((runtime, workload));
            }
        }
        Err(AgentError::WorkloadNotFound(id.to_string()))
    }
}

fn duration(
    field: &'static str,
    value: Option<prost_types::Duration>,
) -> Result<Option<Duration>, AgentError> {
    value
        .map(|d| {
            Duration::try_from(d).map_err(|_| AgentError::InvalidArgument {
                field,
                reason: "must not be negative".into(),
            })
        })
        .transpose()
}

#[tonic::async_trait]
impl ContainerAgent for AgentService {
    async fn info(&self, _: Request<InfoRequest>) -> Result<Response<HostInfo>, Status> {
        let mut host = self.host.clone();
        // Still offered (its workloads are there, and come back with it),
        // yet unavailable now: the host is degraded rather than unable.
        for runtime in self.runtimes.values() {
            if let Some(why) = runtime.failing() {
                host.unavailable_runtimes
                    .insert(runtime.kind().as_str_name().to_string(), why);
            }
        }
        Ok(Response::new(host))
    }

    async fn create_workload(
        &self,
        request: Request<CreateWorkloadRequest>,
    ) -> Result<Response<Workload>, Status> {
        let request = request.into_inner();
        let spec = request.spec.ok_or(AgentError::InvalidArgument {
            field: "spec",
            reason: "is required".into(),
        })?;
        validate_name(&request.name)?;
        spec_limits::check_spec(&spec)?;
        if self.owner(&request.name).await.is_ok() {
            return Err(AgentError::NameTaken(request.name).into());
        }
        let runtime = self.runtime("spec.runtime", spec.runtime)?;
        Ok(Response::new(runtime.create(&request.name, spec).await?))
    }

    async fn start_workload(
        &self,
        request: Request<WorkloadRef>,
    ) -> Result<Response<Workload>, Status> {
        let (runtime, workload) = self.owner(&request.get_ref().id).await?;
        Ok(Response::new(runtime.start(&workload.id).await?))
    }

    async fn stop_workload(
        &self,
        request: Request<StopWorkloadRequest>,
    ) -> Result<Response<Workload>, Status> {
        let request = request.into_inner();
        let timeout = duration("timeout", request.timeout)?.unwrap_or(DEFAULT_STOP_TIMEOUT);
        let (runtime, workload) = self.owner(&request.id).await?;
        Ok(Response::new(runtime.stop(&workload.id, timeout).await?))
    }

    async fn remove_workload(
        &self,
        request: Request<RemoveWorkloadRequest>,
    ) -> Result<Response<RemoveWorkloadResponse>, Status> {
        let request = request.into_inner();
        let (runtime, workload) = self.owner(&request.id).await?;
        runtime.remove(&workload.id, request.force).await?;
        Ok(Response::new(RemoveWorkloadResponse {}))
    }

    async fn inspect_workload(
        &self,
        request: Request<WorkloadRef>,
    ) -> Result<Response<Workload>, Status> {
        Ok(Response::new(self.owner(&request.get_ref().id).await?.1))
    }

    async fn list_workloads(
        &self,
        request: Request<ListWorkloadsRequest>,
    ) -> Result<Response<ListWorkloadsResponse>, Status> {
        let mut all = Vec::new();
        for runtime in self.runtimes.values() {
            all.extend(runtime.list().await?);
        }
        all.sort_by(|a, b| a.name.cmp(&b.name));
        let request = request.into_inner();
        let (workloads, next_page_token) =
            berth_server::paging::page(&all, request.page_size, &request.page_token)
                .map_err(AgentError::from)?;
        Ok(Response::new(ListWorkloadsResponse {
            workloads,
            next_page_token,
        }))
    }

    type ExecStream = GrpcStream<ExecOutput>;

    async fn exec(
        &self,
        request: Request<ExecRequest>,
    ) -> Result<Response<Self::ExecStream>, Status> {
        let arrived = std::time::Instant::now();
        let request = request.into_inner();
        spec_limits::check_exec(&request.command, &request.env, &request.working_dir)?;
        let timeout = duration("timeout", request.timeout)?;
        let permit = self
            .execs
            .clone()
            .try_acquire_owned()
            .map_err(|_| AgentError::TooManyExecs(self.max_execs))?;
        let (runtime, workload) = self.owner(&request.workload_id).await?;
        let exec = ExecCommand {
            command: HostCommand {
                argv: request.command,
                env: request.env.into_iter().map(|e| (e.name, e.value)).collect(),
                working_dir: (!request.working_dir.is_empty()).then(|| request.working_dir.into()),
            },
            timeout,
            key: (!request.exec_key.is_empty()).then(|| request.exec_key.clone()),
        };
        let started = runtime.exec(&workload.id, exec, permit);
        let output = if request.exec_key.is_empty() {
            started.await?
        } else {
            self.keyed_execs.start(request.exec_key, started).await?
        };
        metrics().exec_started(runtime.kind(), arrived.elapsed());
        Ok(Response::new(Box::pin(ReceiverStream::new(output).map(Ok))))
    }

    type AttachExecStream = GrpcStream<ExecOutput>;

    async fn attach_exec(
        &self,
        request: Request<AttachExecRequest>,
    ) -> Result<Response<Self::AttachExecStream>, Status> {
        let output = self.attach_keyed(&request.get_ref().exec_key).await?;
        Ok(Response::new(Box::pin(ReceiverStream::new(output).map(Ok))))
    }

    async fn cancel_exec(
        &self,
        request: Request<CancelExecRequest>,
    ) -> Result<Response<CancelExecResponse>, Status> {
        let key = &request.get_ref().exec_key;
        if let Err(AgentError::ExecNotFound(_)) = self.keyed_execs.cancel(key) {
            // Started by an earlier agent process: attached to be cancelled.
            drop(self.attach_keyed(key).await?);
            self.keyed_execs.cancel(key)?;
        }
        Ok(Response::new(CancelExecResponse {}))
    }

    type LogsStream = GrpcStream<LogLine>;

    async fn logs(
        &self,
        request: Request<LogsRequest>,
    ) -> Result<Response<Self::LogsStream>, Status> {
        let request = request.into_inner();
        let (runtime, workload) = self.owner(&request.workload_id).await?;
        let since = request
            .since
            .and_then(|t| std::time::SystemTime::try_from(t).ok());
        let lines = runtime
            .logs(&workload.id, request.tail as usize, request.follow)
            .await?;
        let stream = ReceiverStream::new(lines).filter(move |line| match (since, &line.time) {
            (Some(since), Some(time)) => {
                std::time::SystemTime::try_from(*time).is_ok_and(|t| t > since)
            }
            _ => true,
        });
        Ok(Response::new(Box::pin(stream.map(Ok))))
    }

    type EventsStream = GrpcStream<WorkloadEvent>;

    async fn events(
        &self,
        request: Request<EventsRequest>,
    ) -> Result<Response<Self::EventsStream>, Status> {
        let only = request.into_inner().workload_id;
        let stream =
            BroadcastStream::new(self.events.subscribe()).filter_map(move |event| match event {
                Ok(event)
                    if only.is_empty()
                        || event.workload_id == only
                        || event.workload_name == only =>
                {
                    Some(Ok(event))
                }
                Ok(_) => None,
                // A slow subscriber learns it missed events rather than silently losing them.
                Err(tokio_stream::wrappers::errors::BroadcastStreamRecvError::Lagged(missed)) => {
                    Some(Err(AgentError::EventsDropped(missed).into()))
                }
            });
        Ok(Response::new(Box::pin(stream)))
    }

    type StatsStream = GrpcStream<WorkloadStats>;

    async fn stats(
        &self,
        request: Request<StatsRequest>,
    ) -> Result<Response<Self::StatsStream>, Status> {
        let request = request.into_inner();
        let interval = duration("interval", request.interval)?
            .filter(|i| !i.is_zero())
            .unwrap_or(DEFAULT_STATS_INTERVAL);
        let (runtime, workload) = self.owner(&request.workload_id).await?;
        let samples = runtime
            .stats(&workload.id, request.stream.then_some(interval))
            .await?;
        Ok(Response::new(Box::pin(
            ReceiverStream::new(samples).map(Ok),
        )))
    }

    async fn import_image(
        &self,
        request: Request<Streaming<ImportImageChunk>>,
    ) -> Result<Response<Image>, Status> {
        let mut chunks = request.into_inner();
        let metadata = match chunks.message().await?.and_then(|c| c.chunk) {
            Some(import_image_chunk::Chunk::Metadata(metadata)) => metadata,
            _ => {
                return Err(AgentError::InvalidArgument {
                    field: "metadata",
                    reason: "the first message must carry the metadata".into(),
                }
                .into());
            }
        };
        let runtime = self.runtime("metadata.runtime", metadata.runtime)?.clone();
        let kind = runtime.kind();
        let (tx, rx) = mpsc::channel(IMPORT_BUFFER);
        let limit = self.max_image_bytes;
        // Read by the metrics: a refusal for size is no failure of the engine.
        let too_large = std::sync::atomic::AtomicBool::new(false);
        let refused_for_size = &too_large;
        // The engine reads the tar while the client still sends it; neither
        // side holds more than IMPORT_BUFFER chunks.
        let feed = async move {
            let mut total: u64 = 0;
            while let Some(chunk) = chunks.message().await? {
                let Some(import_image_chunk::Chunk::Data(data)) = chunk.chunk else {
                    return Err(AgentError::InvalidArgument {
                        field: "metadata",
                        reason: "only the first message may carry metadata".into(),
                    }
                    .into());
                };
                total += data.len() as u64;
                if total > limit {
                    let error = AgentError::InvalidArgument {
                        field: "data",
                        reason: format!(
                            "the image is larger than engines.max_image_bytes ({limit})"
                        ),
                    };
                    // Breaking the body makes the engine abandon the import.
                    let _ = tx.send(Err(std::io::Error::other(error.to_string()))).await;
                    refused_for_size.store(true, std::sync::atomic::Ordering::Relaxed);
                    return Err(Status::from(error));
                }
                if tx.send(Ok(data.into())).await.is_err() {
                    break; // the engine stopped reading; its answer says why
                }
            }
            Ok::<(), Status>(())
        };
        let (imported, fed) = tokio::join!(runtime.import_image(metadata, rx), feed);
        let outcome = if too_large.into_inner() {
            "too_large"
        } else if fed.is_ok() && imported.is_ok() {
            "ok"
        } else {
            "failed"
        };
        metrics().image_imported(kind, outcome);
        fed?;
        Ok(Response::new(imported?))
    }

    async fn list_images(
        &self,
        request: Request<ListImagesRequest>,
    ) -> Result<Response<ListImagesResponse>, Status> {
        let mut all = Vec::new();
        for runtime in self.runtimes.values() {
            match runtime.list_images().await {
                Ok(images) => all.extend(images),
                Err(AgentError::Unimplemented(_)) => {} // a runtime without images
                Err(error) => return Err(error.into()),
            }
        }
        all.sort_by(|a, b| a.references.cmp(&b.references).then(a.id.cmp(&b.id)));
        let request = request.into_inner();
        let (images, next_page_token) =
            berth_server::paging::page(&all, request.page_size, &request.page_token)
                .map_err(AgentError::from)?;
        Ok(Response::new(ListImagesResponse {
            images,
            next_page_token,
        }))
    }

    async fn remove_image(
        &self,
        request: Request<RemoveImageRequest>,
    ) -> Result<Response<RemoveImageResponse>, Status> {
        let request = request.into_inner();
        if request.image.is_empty() {
            return Err(AgentError::InvalidArgument {
                field: "image",
                reason: "must name an image".into(),
            }
            .into());
        }
        self.runtime("runtime", request.runtime)?
            .remove_image(&request.image)
            .await?;
        Ok(Response::new(RemoveImageResponse {}))
    }

    async fn describe_provenance(
        &self,
        request: Request<WorkloadRef>,
    ) -> Result<Response<Provenance>, Status> {
        let (runtime, workload) = self.owner(&request.get_ref().id).await?;
        let spec = workload.spec.unwrap_or_default();
        let image_id = runtime.image_id(&workload.id).await;
        let probe = self.provenance.clone();
        let mut provenance = tokio::task::spawn_blocking(move || probe.describe(&spec))
            .await
            .map_err(|error| AgentError::Internal(format!("reading provenance: {error}")))?;
        match image_id {
            Ok(id) => provenance.image_id = id.unwrap_or_default(),
            Err(error) => provenance.unknown.push(format!("image id: {error}")),
        }
        Ok(Response::new(provenance))
    }

    async fn describe_exec_accounting(
        &self,
        request: Request<DescribeExecAccountingRequest>,
    ) -> Result<Response<ExecAccounting>, Status> {
        let request = request.into_inner();
        crate::keyed_exec::validate_key(&request.exec_key)?;
        let wait = duration("wait", request.wait)?.unwrap_or_default();
        if wait > MAX_ACCOUNTING_WAIT {
            return Err(AgentError::InvalidArgument {
                field: "wait",
                reason: format!("{wait:?} is above {MAX_ACCOUNTING_WAIT:?}"),
            }
            .into());
        }
        for runtime in self.runtimes.values() {
            if let Some(record) = runtime.exec_accounting(&request.exec_key, wait).await? {
                return Ok(Response::new(record));
            }
        }
        let (runtime, _) = self.owner(&request.workload_id).await?;
        Err(if runtime.keeps_exec_accounting() {
            AgentError::ExecNotFound(request.exec_key)
        } else {
            AgentError::Unimplemented(format!(
                "DescribeExecAccounting: the {} runtime keeps no accounting of its execs; RUNTIME_SLURM does (sacct)",
                runtime.kind().as_str_name()
            ))
        }
        .into())
    }
}
