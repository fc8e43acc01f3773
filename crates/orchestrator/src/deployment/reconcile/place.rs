//! Placing a replica: the host, its ports and GPUs, the image import, and
//! starting one that went down again.

use super::*;

impl Deployments {
    /// Places the replica on the host that fits and starts it there, made
    /// from the recipe of `generation`.
    pub(super) async fn place(
        &self,
        recipe: &Recipe,
        generation: u32,
        replica: ReplicaRecord,
        peers: &Peers,
        state: &mut Followed,
    ) -> ReplicaRecord {
        let host = match peers.choose(self, recipe, &replica, &state.avoid) {
            Ok(host) => host,
            Err(reason) => return with_reason(replica, &format!("waiting for a host: {reason}")),
        };
        let mut client = match self.hosts.client(&host).await {
            Ok(client) => client,
            Err(reason) => {
                return with_reason(replica, &format!("waiting for host `{host}`: {reason}"));
            }
        };
        let mut placed = replica.clone();
        placed.host.clone_from(&host);
        placed.workload_id.clear();
        placed.generation = generation;
        placed.ports = match self.ports_for(recipe, &host, replica.index) {
            Ok(ports) => ports,
            Err(reason) => return with_reason(replica, &format!("waiting for a port: {reason}")),
        };
        if let Some(request) = &recipe.gpus {
            let host_gpus = self.hosts.gpus(&host);
            match self
                .gpu_leases
                .hold_for_replica(&host, &host_gpus, request, &recipe.name)
            {
                Ok(gpus) => placed.gpus = gpus,
                Err(reason) => {
                    self.release_held(&placed);
                    return with_reason(replica, &format!("waiting for GPUs: {reason}"));
                }
            }
        }
        if let Err(not_placed) = self.import_image(recipe, &mut client, &placed).await {
            self.release_held(&placed);
            return match not_placed {
                NotPlaced::Waiting(reason) => with_reason(replica, &format!("waiting: {reason}")),
                NotPlaced::Refused(reason) => self.count_failure(recipe, replica, state, &reason),
            };
        }
        match self
            .create_replica(recipe, &mut client, &host, &placed)
            .await
        {
            Ok(workload) => {
                *state = Followed {
                    avoid: std::mem::take(&mut state.avoid),
                    ..Followed::default()
                };
                placed.workload_id = workload.id;
                placed.state = ReplicaState::Starting;
                placed.since_ms = now_ms();
                placed.reason = format!("started on host `{host}` as `{}`", workload.name);
                placed
            }
            Err(NotPlaced::Waiting(reason)) => {
                self.release_held(&placed);
                with_reason(replica, &format!("waiting: {reason}"))
            }
            Err(NotPlaced::Refused(reason)) => {
                self.release_held(&placed);
                self.count_failure(recipe, replica, state, &reason)
            }
        }
    }

    /// Imports the recipe's image archive into the engine of the replica's
    /// host when it lacks the image, the replica (and the deployment)
    /// Building meanwhile.
    pub(super) async fn import_image(
        &self,
        recipe: &Recipe,
        client: &mut AgentClient,
        replica: &ReplicaRecord,
    ) -> Result<(), NotPlaced> {
        let Some(import) = &recipe.import else {
            return Ok(());
        };
        let host = &replica.host;
        let listed = self
            .bounded(client.list_images(ListImagesRequest {
                page_size: 1000,
                page_token: String::new(),
            }))
            .await
            .map_err(|s| {
                NotPlaced::Waiting(format!(
                    "host `{host}`: listing images: {}",
                    describe_status(&s)
                ))
            })?
            .into_inner();
        let present = listed
            .images
            .iter()
            .flat_map(|image| &image.references)
            .any(|reference| reference.ends_with(&recipe.image));
        if present {
            return Ok(());
        }
        let mut building = replica.clone();
        building.state = ReplicaState::Building;
        building.since_ms = now_ms();
        building.reason = format!(
            "importing {} as `{}` into host `{host}`'s engine",
            import.archive, recipe.image
        );
        let stored = self.store.put_replica(&building).and_then(|()| {
            self.store.set_deployment_state(
                &recipe.name,
                DeploymentState::Building,
                &building.reason,
            )
        });
        if let Err(error) = stored {
            return Err(NotPlaced::Waiting(error.to_string()));
        }
        self.publish(&recipe.name, Some(replica.index), building.reason.clone());
        let started = Instant::now();
        let chunks = crate::deployment::replica::archive_chunks(recipe, import)
            .await
            .map_err(NotPlaced::Refused)?;
        client.import_image(chunks).await.map_err(|s| {
            NotPlaced::Refused(format!(
                "host `{host}`: importing {}: {}",
                import.archive,
                describe_status(&s)
            ))
        })?;
        tracing::info!(deployment = %recipe.name, host, archive = import.archive, took = ?started.elapsed(), "image imported");
        Ok(())
    }

    /// Starts a replica that went down again, on its host; one whose
    /// workload is gone is created again.
    pub(super) async fn start_again(
        &self,
        recipe: &Recipe,
        generation: u32,
        replica: ReplicaRecord,
        peers: &Peers,
        state: &mut Followed,
    ) -> ReplicaRecord {
        if replica.workload_id.is_empty() {
            return self.place(recipe, generation, replica, peers, state).await;
        }
        let mut client = match self.hosts.client(&replica.host).await {
            Ok(client) => client,
            Err(reason) => return self.host_silent(recipe, replica, state, &reason),
        };
        if recipe.runtime == RuntimeName::Slurm {
            // A SLURM job that ended does not run again: the ended one goes
            // (its spec and files with it) and a new job is submitted.
            if let Err(reason) = self.remove_replica(recipe, &replica).await {
                return self.count_failure(recipe, replica, state, &reason);
            }
            let mut ended = replica;
            ended.workload_id.clear();
            return self.place(recipe, generation, ended, peers, state).await;
        }
        match self.bounded(start(&mut client, &replica.workload_id)).await {
            Ok(_) => {
                state.failed_checks = 0;
                state.host_silent_since = None;
                let mut started = replica;
                started.state = ReplicaState::Starting;
                started.since_ms = now_ms();
                started.reason = format!("started again (restart {})", started.restarts);
                started
            }
            Err(status) if status.code() == tonic::Code::NotFound => {
                let mut gone = replica;
                gone.workload_id.clear();
                // Placed again, on the same host when it still fits.
                self.place(recipe, generation, gone, peers, state).await
            }
            Err(status) if agent_did_not_answer(status.code()) => {
                self.host_silent(recipe, replica, state, &describe_status(&status))
            }
            Err(status) => {
                let reason = format!(
                    "host `{}`: starting again: {}",
                    replica.host,
                    describe_status(&status)
                );
                self.count_failure(recipe, replica, state, &reason)
            }
        }
    }
}
