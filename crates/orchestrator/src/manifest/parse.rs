//! From text to [`Manifest`], within the limits, and where in the text an
//! error is: serde_yaml's own position for what it rejects, and for what is
//! found wrong afterwards a search of the text for the key or value at
//! fault (indentation-blind: the first match after the previous key).

use std::fmt;

use super::limits::{self, Count, Limit, LimitExceeded, ManifestLimits};
use super::prescan;
use super::types::Manifest;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestError {
    pub source_name: String,
    pub line: usize,
    pub column: usize,
    pub message: String,
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.source_name, self.line, self.column, self.message
        )
    }
}

impl std::error::Error for ManifestError {}

/// A manifest's text and the name errors give it (`file:line:column`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Source<'a> {
    pub name: &'a str,
    pub text: &'a str,
}

impl Source<'_> {
    /// An error at a line and column (1-based).
    pub fn error(&self, (line, column): (usize, usize), message: String) -> ManifestError {
        ManifestError {
            source_name: self.name.to_string(),
            line,
            column,
            message,
        }
    }

    /// An error at the key `path`, each key looked for after the previous
    /// one; at the start when the first is not found.
    pub fn at(&self, path: &[&str], message: String) -> ManifestError {
        let position = locate_from(self.text, 0, path).unwrap_or((1, 1));
        self.error(position, message)
    }

    /// An error at the `nth` line holding `value` as a YAML value (for
    /// duplicates); at the start when there are fewer.
    pub fn at_value(&self, value: &str, nth: usize, message: String) -> ManifestError {
        let position = self
            .text
            .lines()
            .enumerate()
            .filter_map(|(i, line)| {
                let (_, after) = line.split_once(':')?;
                let after = after.trim().trim_matches(['"', '\'']);
                (after == value).then(|| (i + 1, line.find(value).unwrap_or(0) + 1))
            })
            .nth(nth - 1)
            .unwrap_or((1, 1));
        self.error(position, message)
    }

    /// An error at the key `path` of the backend named `backend` (not of the
    /// first backend that has such a key).
    pub fn at_backend(&self, backend: &str, path: &[&str], message: String) -> ManifestError {
        let text = self.text;
        let entry = self.at_value(backend, 1, String::new());
        let lines: Vec<&str> = text.lines().collect();
        let leading = |line: &str| line.len() - line.trim_start().len();
        let key_indent = |line: &str| line.len() - line.trim_start().trim_start_matches("- ").len();
        let found = lines
            .get(entry.line.saturating_sub(1))
            .and_then(|entry_line| {
                // The backend's own keys share the indent of its `name:` key; it ends
                // where a line is indented no deeper than its list item.
                let (item, own) = (leading(entry_line), key_indent(entry_line));
                let within = lines
                    .iter()
                    .enumerate()
                    .skip(entry.line)
                    .take_while(|(_, line)| line.trim().is_empty() || leading(line) > item);
                let (first, rest) = path.split_first()?;
                let (index, _) = within.into_iter().find(|(_, line)| {
                    key_indent(line) == own
                        && line
                            .trim_start()
                            .strip_prefix(first)
                            .is_some_and(|after| after.trim_start().starts_with(':'))
                })?;
                locate_from(text, index + 1, rest).or(Some((index + 1, own + 1)))
            });
        self.error(found.unwrap_or((entry.line, entry.column)), message)
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
        let exceeded = match stop.past {
            prescan::Past::Depth => LimitExceeded::new(
                Limit::Depth,
                "YAML nesting",
                Count::MoreThan(limits.max_depth as u64),
                "levels",
                limits.max_depth as u64,
            ),
            prescan::Past::Nodes => LimitExceeded::new(
                Limit::Nodes,
                "YAML nodes",
                Count::MoreThan(limits.max_nodes as u64),
                "nodes",
                limits.max_nodes as u64,
            ),
        };
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
fn yaml_location(error: &serde_yaml::Error) -> (usize, usize) {
    error
        .location()
        .map_or((1, 1), |location| (location.line(), location.column()))
}

/// Line and column (1-based) of the key path searched from line index
/// `from`, each key after the previous one; `None` when the first key is
/// not found.
fn locate_from(text: &str, from: usize, path: &[&str]) -> Option<(usize, usize)> {
    let mut from = from;
    let mut found = None;
    for key in path {
        let hit = text.lines().enumerate().skip(from).find_map(|(i, line)| {
            let trimmed = line.trim_start().trim_start_matches("- ");
            let indent = line.len() - trimmed.len();
            trimmed
                .strip_prefix(key)
                .filter(|rest| rest.trim_start().starts_with(':'))
                .map(|_| (i, indent))
        });
        if let Some((i, indent)) = hit {
            from = i + 1;
            found = Some((i + 1, indent + 1));
        }
    }
    found
}
