//! Images for hosts with no registry: imported from a tar stream (a rootfs,
//! or a `docker save` archive), listed and removed. The agent lists and
//! removes only the images it imported, recorded in a small file.

use std::path::PathBuf;
use std::sync::Mutex;

use berth_proto::agent::v1::{Image, ImportImageMetadata};
use bollard::query_parameters::{
    CreateImageOptionsBuilder, ImportImageOptionsBuilder, RemoveImageOptionsBuilder,
    TagImageOptionsBuilder,
};
use bytes::Bytes;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::engine::{Engine, status_of};
use crate::error::AgentError;

/// The ids of the images this agent imported into one engine.
pub struct Records {
    path: PathBuf,
    ids: Mutex<Vec<String>>,
}

#[derive(Serialize, Deserialize)]
struct RecordFile {
    imported: Vec<String>,
}

impl Records {
    pub fn load(path: PathBuf) -> Self {
        let ids = std::fs::read(&path)
            .ok()
            .and_then(|bytes| serde_json::from_slice::<RecordFile>(&bytes).ok())
            .map(|file| file.imported)
            .unwrap_or_default();
        Self {
            path,
            ids: Mutex::new(ids),
        }
    }

    fn ids(&self) -> std::sync::MutexGuard<'_, Vec<String>> {
        self.ids
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn update(&self, change: impl FnOnce(&mut Vec<String>)) -> Result<(), AgentError> {
        let mut ids = self.ids();
        change(&mut ids);
        let text = serde_json::to_vec_pretty(&RecordFile {
            imported: ids.clone(),
        })
        .map_err(|e| AgentError::Internal(e.to_string()))?;
        // Written aside then renamed, so a crash never leaves half a file.
        let write = || -> std::io::Result<()> {
            if let Some(dir) = self.path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            let partial = self.path.with_extension("json.partial");
            std::fs::write(&partial, text)?;
            std::fs::rename(&partial, &self.path)
        };
        write().map_err(|e| {
            AgentError::Internal(format!("recording images in {}: {e}", self.path.display()))
        })
    }
}

/// `repo[:tag]` → (repo, tag); the tag defaults to `latest`. A `:` before the
/// last `/` is a registry port, not a tag.
fn split_reference(reference: &str) -> (&str, &str) {
    match reference.rsplit_once(':') {
        Some((repo, tag)) if !tag.contains('/') => (repo, tag),
        _ => (reference, "latest"),
    }
}

pub async fn import(
    engine: &Engine,
    records: &Records,
    metadata: ImportImageMetadata,
    data: mpsc::Receiver<Result<Bytes, std::io::Error>>,
) -> Result<Image, AgentError> {
    let reference = metadata.reference.trim();
    if !metadata.saved_archive && reference.is_empty() {
        return Err(AgentError::InvalidArgument {
            field: "metadata.reference",
            reason: "a rootfs import needs a reference to name the image (e.g. busybox:berth)"
                .into(),
        });
    }
    let docker = engine.client().await?;
    let body = ReceiverStream::new(data);
    let refused = |message: String| AgentError::InvalidArgument {
        field: "data",
        reason: format!(
            "the {} engine could not import the tar: {message}",
            engine.name()
        ),
    };
    let mut loaded = Vec::new();
    if metadata.saved_archive {
        let options = ImportImageOptionsBuilder::new().quiet(true).build();
        let mut answers = docker.import_image_stream(options, body, None);
        while let Some(answer) = answers.next().await {
            let answer = answer.map_err(|e| refused(e.to_string()))?;
            // "Loaded image: busybox:latest" or "Loaded image ID: sha256:…" (podman: "Loaded image: …").
            for text in [answer.stream, answer.status].into_iter().flatten() {
                for line in text.lines() {
                    if let Some((_, image)) = line.split_once("Loaded image") {
                        let image = image
                            .trim_start_matches(" ID")
                            .trim_start_matches(['s', ':', ' '])
                            .trim();
                        loaded.extend(
                            image
                                .split(',')
                                .map(|i| i.trim().to_string())
                                .filter(|i| !i.is_empty()),
                        );
                    }
                }
            }
        }
    } else {
        let (repo, tag) = split_reference(reference);
        // No berth labels on the image: containers inherit image labels, and
        // every container of it would look like this agent's own.
        let mut changes = Vec::new();
        if !metadata.command.is_empty() {
            let command = serde_json::to_string(&metadata.command)
                .map_err(|e| AgentError::Internal(e.to_string()))?;
            changes.push(format!("CMD {command}"));
        }
        let options = CreateImageOptionsBuilder::new()
            .from_src("-")
            .repo(repo)
            .tag(tag)
            .changes(changes)
            .build();
        let mut answers =
            docker.create_image(Some(options), Some(bollard::body_try_stream(body)), None);
        while let Some(answer) = answers.next().await {
            let answer = answer.map_err(|e| refused(e.to_string()))?;
            loaded.extend(answer.status.filter(|s| s.starts_with("sha256:")));
        }
    }
    let first = loaded
        .first()
        .cloned()
        .ok_or_else(|| refused("the engine reported no image".into()))?;
    let id = docker
        .inspect_image(&first)
        .await
        .map_err(|e| refused(e.to_string()))?
        .id
        .unwrap_or(first);
    if !reference.is_empty() {
        // podman ignores the tag of an import; tagging afterwards works on both.
        let (repo, tag) = split_reference(reference);
        let options = TagImageOptionsBuilder::new().repo(repo).tag(tag).build();
        if let Err(e) = docker.tag_image(&id, Some(options)).await {
            return Err(engine.error("tag image", e).await);
        }
    }
    records.update(|ids| {
        if !ids.contains(&id) {
            ids.push(id.clone());
        }
    })?;
    describe(engine, &id)
        .await?
        .ok_or(AgentError::ImageNotFound(id))
}

async fn describe(engine: &Engine, image: &str) -> Result<Option<Image>, AgentError> {
    let docker = engine.client().await?;
    match docker.inspect_image(image).await {
        Ok(inspect) => Ok(Some(Image {
            id: inspect.id.unwrap_or_default(),
            references: inspect.repo_tags.unwrap_or_default(),
            size_bytes: inspect
                .size
                .and_then(|s| u64::try_from(s).ok())
                .unwrap_or(0),
            runtime: engine.dialect.runtime() as i32,
        })),
        Err(e) if status_of(&e) == Some(404) => Ok(None),
        Err(e) => Err(engine.error("inspect image", e).await),
    }
}

pub async fn list(engine: &Engine, records: &Records) -> Result<Vec<Image>, AgentError> {
    let ids = records.ids().clone();
    let mut images = Vec::with_capacity(ids.len());
    let mut gone = Vec::new();
    for id in ids {
        match describe(engine, &id).await? {
            Some(image) => images.push(image),
            None => gone.push(id),
        }
    }
    if !gone.is_empty() {
        // Removed behind the agent's back (e.g. `docker rmi`): forget them.
        records.update(|ids| ids.retain(|id| !gone.contains(id)))?;
    }
    Ok(images)
}

pub async fn remove(engine: &Engine, records: &Records, image: &str) -> Result<(), AgentError> {
    let found = describe(engine, image)
        .await?
        .ok_or_else(|| AgentError::ImageNotFound(image.to_string()))?;
    if !records.ids().contains(&found.id) {
        return Err(AgentError::Unsupported {
            field: "image",
            reason: format!(
                "`{image}` was not imported by this agent; it removes only images it imported"
            ),
        });
    }
    let docker = engine.client().await?;
    let options = RemoveImageOptionsBuilder::new().force(true).build();
    // By the name asked for, not the id: two imports of the same rootfs in
    // the same second get the same id, and a forced removal by id would take
    // the other's name with it. Removing the last name removes the image.
    // Podman lists an unqualified name as `localhost/<name>`.
    let named = |reference: &String| {
        reference == image || reference.strip_prefix("localhost/") == Some(image)
    };
    let by = if found.references.iter().any(named) {
        image
    } else {
        found.id.as_str()
    };
    match docker.remove_image(by, Some(options), None).await {
        Ok(_) => {}
        Err(e) if status_of(&e) == Some(409) => {
            return Err(AgentError::Unsupported {
                field: "image",
                reason: format!("`{image}` is in use: {e}"),
            });
        }
        Err(e) if status_of(&e) == Some(404) => {}
        Err(e) => return Err(engine.error("remove image", e).await),
    }
    records.update(|ids| ids.retain(|id| *id != found.id))
}

#[cfg(test)]
mod tests {
    #[test]
    fn references_split_at_the_tag() {
        use super::split_reference;
        assert_eq!(split_reference("busybox:berth"), ("busybox", "berth"));
        assert_eq!(split_reference("busybox"), ("busybox", "latest"));
        assert_eq!(
            split_reference("localhost:5000/x"),
            ("localhost:5000/x", "latest")
        );
        assert_eq!(
            split_reference("localhost:5000/x:1"),
            ("localhost:5000/x", "1")
        );
    }
}
