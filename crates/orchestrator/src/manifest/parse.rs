//! From text to [`Manifest`], within the limits, and where in the text an
//! error is: serde_yaml's own position for what it rejects, and for what is
//! found wrong afterwards the node at fault, found in the document's
//! [`SpanTree`] by its path (keys and indices) or by its value.

use super::limits::{self, Count, Limit, LimitExceeded, ManifestLimits};
use super::prescan;
use super::spans::{PathStep, Position, SpanTree};
use super::types::Manifest;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{source_name}:{line}:{column}: {message}")]
pub struct ManifestError {
    pub source_name: String,
    pub line: usize,
    pub column: usize,
    pub message: String,
}

/// A manifest's text and the name errors give it (`file:line:column`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Source<'a> {
    pub name: &'a str,
    pub text: &'a str,
}

impl Source<'_> {
    /// An error at a line and column (1-based).
    pub fn error(&self, (line, column): Position, message: String) -> ManifestError {
        ManifestError {
            source_name: self.name.to_string(),
            line,
            column,
            message,
        }
    }

    /// An error at the key `path` (lists passed through at their first item
    /// holding the next key); at the start when the document has not the
    /// first key.
    pub fn at(&self, path: &[&str], message: String) -> ManifestError {
        let steps: Vec<PathStep<'_>> = path.iter().map(|key| PathStep::Key(key)).collect();
        self.at_path(&steps, message)
    }

    /// An error at `path` of keys and list indices (the second backend's
    /// image: `[Key("backends"), Index(1), Key("image")]`), or as far along
    /// it as the document goes; at the start when it has not the first step.
    pub fn at_path(&self, path: &[PathStep<'_>], message: String) -> ManifestError {
        self.placed(|tree| tree.find(path), message)
    }

    /// An error at the `nth` (from 1) mapping value equal to `value` (for
    /// duplicates); at the start when there are fewer.
    pub fn at_value(&self, value: &str, nth: usize, message: String) -> ManifestError {
        self.placed(|tree| tree.find_value(value, nth), message)
    }

    /// The document is read for its spans only here, when an error is to be
    /// placed: a manifest without errors is parsed once, by serde_yaml.
    fn placed(
        &self,
        find: impl FnOnce(&SpanTree) -> Option<Position>,
        message: String,
    ) -> ManifestError {
        let position = find(&SpanTree::parse(self.text)).unwrap_or((1, 1));
        self.error(position, message)
    }

    /// An error serde_yaml reported, at its position; serde_yaml appends
    /// " at line L column C", which the prefix already says.
    fn yaml_error(&self, error: &serde_yaml::Error) -> ManifestError {
        let message = error.to_string();
        let message = message
            .split(" at line ")
            .next()
            .unwrap_or(&message)
            .to_string();
        self.error(yaml_location(error), message)
    }
}

/// Reads the manifest, refusing it as soon as it is past one of `limits`:
/// its size before it is parsed, its nesting before serde_yaml scans it,
/// its nodes (aliases expanded) and scalars before anything is built from
/// them.
pub(super) fn parse(
    source: Source<'_>,
    limits: &ManifestLimits,
) -> Result<Manifest, ManifestError> {
    parse_document(source, limits)
}

/// Reads a YAML document of berth's (a manifest, a recipe) into `T` within
/// `limits`, every error placed in the text.
pub(crate) fn parse_document<T: serde::de::DeserializeOwned>(
    source: Source<'_>,
    limits: &ManifestLimits,
) -> Result<T, ManifestError> {
    let text = source.text;
    if text.len() > limits.max_bytes {
        let exceeded = LimitExceeded::new(
            Limit::Bytes,
            "manifest size",
            Count::Exactly(text.len() as u64),
            "bytes",
            limits.max_bytes as u64,
        );
        return Err(source.error((1, 1), exceeded.to_string()));
    }
    prescan::check(text, &limits.yaml()).map_err(|stop: prescan::Refused| {
        // The pre-scan stops at the first level or node past the limit.
        let (limit, what, unit, max) = match stop.past {
            prescan::Past::Depth => (Limit::Depth, "YAML nesting", "levels", limits.max_depth),
            prescan::Past::Nodes => (Limit::Nodes, "YAML nodes", "nodes", limits.max_nodes),
        };
        let max = max as u64;
        let exceeded = LimitExceeded::new(limit, what, Count::MoreThan(max), unit, max);
        source.error((stop.line, stop.column), exceeded.to_string())
    })?;
    limits::check_document(text, limits).map_err(|error| match error {
        limits::DocumentError::Limit(exceeded, at) => {
            source.error(yaml_location(&at), exceeded.to_string())
        }
        limits::DocumentError::AliasRepetition(at) => source.error(
            yaml_location(&at),
            format!(
                "YAML aliases: followed more than 100 times per YAML event (serde_yaml's repetition limit); expanded, the manifest may hold at most {} nodes (manifest.max_nodes)",
                limits.max_nodes
            ),
        ),
        limits::DocumentError::Yaml(error) => source.yaml_error(&error),
    })?;
    serde_yaml::from_str(text).map_err(|error| source.yaml_error(&error))
}

/// Where serde_yaml places an error; the start when it does not say.
fn yaml_location(error: &serde_yaml::Error) -> Position {
    error
        .location()
        .map_or((1, 1), |location| (location.line(), location.column()))
}
