//! What one campaign manifest may cost the orchestrator: its size, the shape
//! of its YAML and how many configurations and runs it expands to. Each
//! bound is checked before the work it bounds is done, so a hostile manifest
//! is refused in about the time it takes to read it.

use std::cell::{Cell, RefCell};
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, EnumAccess, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};

/// `[manifest]`: limits on one campaign manifest, as submitted and as
/// re-read from the store (a campaign past a lowered limit fails to resume
/// with this same error, naming the limit).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ManifestLimits {
    /// Largest manifest, in bytes. Checked before it is parsed. A request
    /// over max(4 MiB, this + 64 KiB) is refused by the gRPC layer
    /// (`OUT_OF_RANGE`) before it is read.
    pub max_bytes: usize,
    /// Deepest nesting of YAML collections. Flow collections (`[`, `{`) are
    /// counted before the YAML parser sees them: its work grows with their
    /// depth for every token.
    pub max_depth: usize,
    /// Most YAML nodes (scalars, lists and maps), aliases expanded: bounds
    /// what a billion-laughs manifest can make the parser build.
    pub max_nodes: usize,
    /// Longest scalar (a string, key or number), in bytes.
    pub max_scalar_bytes: usize,
    /// Most configurations: the grid's combinations (before excludes), its
    /// includes and the named configs.
    pub max_configurations: u64,
    /// Longest configuration name (`param=value,…` for a grid's), in bytes:
    /// every run carries its configuration's name.
    pub max_config_name_bytes: usize,
    /// Most runs of one campaign, warmup runs included.
    pub max_runs: u64,
    /// Most (grid combination, `grid.exclude` entry) pairs compared.
    pub max_exclude_checks: u64,
}

impl Default for ManifestLimits {
    fn default() -> Self {
        Self {
            max_bytes: 1024 * 1024,
            max_depth: 32,
            max_nodes: 50_000,
            max_scalar_bytes: 64 * 1024,
            max_configurations: 100_000,
            max_config_name_bytes: 256,
            max_runs: 1_000_000,
            max_exclude_checks: 10_000_000,
        }
    }
}

impl ManifestLimits {
    /// The bounds of the pre-scan run before serde_yaml sees the text.
    pub fn yaml(&self) -> berth_server::yaml_prescan::YamlLimits {
        berth_server::yaml_prescan::YamlLimits {
            max_depth: self.max_depth,
            max_nodes: self.max_nodes,
        }
    }
}

/// Which of the [`ManifestLimits`] a manifest went past.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    Bytes,
    Depth,
    Nodes,
    ScalarBytes,
    Configurations,
    ConfigNameBytes,
    Runs,
    ExcludeChecks,
}

impl Limit {
    /// The field of `[manifest]` that sets it.
    pub fn field(self) -> &'static str {
        match self {
            Self::Bytes => "max_bytes",
            Self::Depth => "max_depth",
            Self::Nodes => "max_nodes",
            Self::ScalarBytes => "max_scalar_bytes",
            Self::Configurations => "max_configurations",
            Self::ConfigNameBytes => "max_config_name_bytes",
            Self::Runs => "max_runs",
            Self::ExcludeChecks => "max_exclude_checks",
        }
    }
}

/// A size as far as it was counted: counting stops past the limit, and
/// products of many factors can pass what a `u64` holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Count {
    Exactly(u64),
    MoreThan(u64),
}

impl Count {
    /// `Exactly` for a product that fits in a `u64`, `MoreThan(u64::MAX)` otherwise.
    pub fn product(factors: impl IntoIterator<Item = u64>) -> Self {
        factors
            .into_iter()
            .try_fold(1u64, u64::checked_mul)
            .map_or(Self::MoreThan(u64::MAX), Self::Exactly)
    }

    pub fn exceeds(self, limit: u64) -> bool {
        match self {
            Self::Exactly(n) => n > limit,
            Self::MoreThan(n) => n >= limit,
        }
    }
}

impl fmt::Display for Count {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Exactly(n) => write!(f, "{n}"),
            Self::MoreThan(n) => write!(f, "more than {n}"),
        }
    }
}

/// A manifest past one of its limits: what was measured, how much, the
/// limit and where to raise it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{what}: {value} {unit}; at most {max} (raise manifest.{field}, env BERTH_MANIFEST__{env})",
    field = limit.field(),
    env = limit.field().to_ascii_uppercase()
)]
pub struct LimitExceeded {
    pub limit: Limit,
    /// What was measured, e.g. `grid.params (10 × 10 values)`.
    pub what: String,
    pub value: Count,
    pub unit: &'static str,
    pub max: u64,
}

impl LimitExceeded {
    pub fn new(
        limit: Limit,
        what: impl Into<String>,
        value: Count,
        unit: &'static str,
        max: u64,
    ) -> Self {
        Self {
            limit,
            what: what.into(),
            value,
            unit,
            max,
        }
    }
}

/// Walks the YAML document serde_yaml loaded, aliases expanded, counting
/// nodes and measuring depth and scalars without building anything, and
/// stops at the first limit crossed. Run before the manifest is deserialized
/// into its types, whose `serde_yaml::Value` fields (grid params, includes,
/// excludes) would otherwise expand an alias bomb in memory.
pub(super) fn check_document(text: &str, limits: &ManifestLimits) -> Result<(), DocumentError> {
    let walk = Walk {
        limits,
        nodes: Cell::new(0),
        exceeded: RefCell::new(None),
    };
    let result = Node {
        walk: &walk,
        depth: 0,
    }
    .deserialize(serde_yaml::Deserializer::from_str(text));
    match (result, walk.exceeded.into_inner()) {
        (Ok(()), _) => Ok(()),
        (Err(error), Some(exceeded)) => Err(DocumentError::Limit(exceeded, error)),
        // serde_yaml 0.9 (frozen) stops following aliases after 100 per event
        // of the document; a small alias bomb gets there before max_nodes.
        (Err(error), None) if error.to_string() == "repetition limit exceeded" => {
            Err(DocumentError::AliasRepetition(error))
        }
        (Err(error), None) => Err(DocumentError::Yaml(error)),
    }
}

#[derive(Debug)]
pub(super) enum DocumentError {
    /// Past a limit; the YAML error carries where.
    Limit(LimitExceeded, serde_yaml::Error),
    /// Aliases followed more often than serde_yaml allows.
    AliasRepetition(serde_yaml::Error),
    /// Not YAML (or past serde_yaml's own depth limit).
    Yaml(serde_yaml::Error),
}

struct Walk<'a> {
    limits: &'a ManifestLimits,
    nodes: Cell<usize>,
    /// The limit crossed: serde's error type only carries a message.
    exceeded: RefCell<Option<LimitExceeded>>,
}

#[derive(Clone, Copy)]
struct Node<'w, 'a> {
    walk: &'w Walk<'a>,
    depth: usize,
}

impl Node<'_, '_> {
    fn fail<E: de::Error>(self, exceeded: LimitExceeded) -> E {
        let message = exceeded.to_string();
        *self.walk.exceeded.borrow_mut() = Some(exceeded);
        E::custom(message)
    }

    fn count<E: de::Error>(self) -> Result<(), E> {
        // Every node read costs the request's CPU budget (when it has one):
        // a manifest within the limits still takes time to walk, and the
        // walk is where a recipe's and a manifest's parsing can stop.
        berth_server::budget::check().map_err(E::custom)?;
        let nodes = self.walk.nodes.get() + 1;
        self.walk.nodes.set(nodes);
        let max = self.walk.limits.max_nodes;
        if nodes > max {
            return Err(self.fail(LimitExceeded::new(
                Limit::Nodes,
                "YAML nodes, aliases expanded",
                Count::MoreThan(max as u64),
                "nodes",
                max as u64,
            )));
        }
        Ok(())
    }

    fn scalar<E: de::Error>(self, bytes: usize) -> Result<(), E> {
        self.count()?;
        let max = self.walk.limits.max_scalar_bytes;
        if bytes > max {
            return Err(self.fail(LimitExceeded::new(
                Limit::ScalarBytes,
                "a scalar",
                Count::Exactly(bytes as u64),
                "bytes",
                max as u64,
            )));
        }
        Ok(())
    }

    /// The node inside a collection at this node.
    fn child<E: de::Error>(self) -> Result<Self, E> {
        self.count()?;
        let depth = self.depth + 1;
        let max = self.walk.limits.max_depth;
        if depth > max {
            return Err(self.fail(LimitExceeded::new(
                Limit::Depth,
                "YAML nesting",
                Count::Exactly(depth as u64),
                "levels",
                max as u64,
            )));
        }
        Ok(Self { depth, ..self })
    }
}

impl<'de> DeserializeSeed<'de> for Node<'_, '_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Node<'_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any YAML value")
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        self.scalar(0)
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        self.scalar(0)
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        self.scalar(0)
    }

    fn visit_i128<E: de::Error>(self, _: i128) -> Result<(), E> {
        self.scalar(0)
    }

    fn visit_u128<E: de::Error>(self, _: u128) -> Result<(), E> {
        self.scalar(0)
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        self.scalar(0)
    }

    fn visit_str<E: de::Error>(self, text: &str) -> Result<(), E> {
        self.scalar(text.len())
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        self.scalar(0)
    }

    fn visit_none<E: de::Error>(self) -> Result<(), E> {
        self.scalar(0)
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        self.deserialize(deserializer)
    }

    fn visit_newtype_struct<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        self.deserialize(deserializer)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let child = self.child()?;
        while seq.next_element_seed(child)?.is_some() {}
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let child = self.child()?;
        while map.next_key_seed(child)?.is_some() {
            map.next_value_seed(child)?;
        }
        Ok(())
    }

    /// A tagged node (`!tag value`).
    fn visit_enum<A: EnumAccess<'de>>(self, data: A) -> Result<(), A::Error> {
        let child = self.child()?;
        let ((), variant) = data.variant_seed(child)?;
        de::VariantAccess::newtype_variant_seed(variant, child)
    }
}
