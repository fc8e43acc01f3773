//! Where each node of a YAML document stands, for placing an error found
//! after serde_yaml read the document: the node at a path of keys and
//! indices (whatever the indentation, block or flow style), or the nth
//! mapping value equal to a text. saphyr-parser reads the document, as its
//! events carry their spans; only for an error, from a text the limits have
//! already bounded (size, nodes, depth), in one pass that builds no more
//! than a node per event and never recurses.

use std::collections::HashMap;

use saphyr_parser::{Event, Parser, Span};

/// Line and column, both counted from 1.
pub(crate) type Position = (usize, usize);

/// One step of a path into a document.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PathStep<'a> {
    /// The entry of a mapping with this key. On a sequence: the entry of its
    /// first item that has the key (a path of keys alone, such as
    /// `["ports", "name"]`, passes through lists this way).
    Key(&'a str),
    /// The item of a sequence at this index (from 0).
    Index(usize),
}

type NodeId = usize;

/// The first document of a text, as far as it parses: a node per scalar,
/// alias and collection, in the order they are written.
pub(crate) struct SpanTree {
    nodes: Vec<Node>,
    /// Anchor ids (saphyr-parser's, from 1) to the node they name.
    anchors: HashMap<usize, NodeId>,
}

struct Node {
    at: Position,
    /// Whether it stands as a mapping's value (not a key, not an item).
    is_mapping_value: bool,
    kind: Kind,
}

enum Kind {
    Scalar(String),
    Alias(usize),
    Sequence(Vec<NodeId>),
    Mapping(Vec<(NodeId, NodeId)>),
}

/// A collection whose end event has not come yet; a mapping holds the key
/// read before its value.
struct Open {
    node: NodeId,
    pending_key: Option<NodeId>,
}

impl SpanTree {
    /// Reads `text` up to the end of its first document, or up to where it
    /// stops parsing: a YAML 1.2 parser may refuse what serde_yaml's 1.1
    /// accepted, and what came before still places errors.
    pub(crate) fn parse(text: &str) -> Self {
        let mut tree = Self {
            nodes: Vec::new(),
            anchors: HashMap::new(),
        };
        let mut open: Vec<Open> = Vec::new();
        for item in Parser::new_from_str(text) {
            let Ok((event, span)) = item else { break };
            let (kind, anchor) = match event {
                Event::Scalar(value, _, anchor, _) => (Kind::Scalar(value.into_owned()), anchor),
                Event::Alias(anchor) => (Kind::Alias(anchor), 0),
                Event::SequenceStart(anchor, _) => (Kind::Sequence(Vec::new()), anchor),
                Event::MappingStart(anchor, _) => (Kind::Mapping(Vec::new()), anchor),
                Event::SequenceEnd | Event::MappingEnd => {
                    open.pop();
                    continue;
                }
                Event::DocumentEnd => break,
                Event::StreamStart
                | Event::StreamEnd
                | Event::DocumentStart(_)
                | Event::Nothing => continue,
            };
            let is_collection = matches!(kind, Kind::Sequence(_) | Kind::Mapping(_));
            let id = tree.push(&mut open, kind, span);
            if anchor != 0 {
                tree.anchors.insert(anchor, id);
            }
            if is_collection {
                open.push(Open {
                    node: id,
                    pending_key: None,
                });
            }
        }
        tree
    }

    /// Adds a node where it stands in its open parent, if any.
    fn push(&mut self, open: &mut [Open], kind: Kind, span: Span) -> NodeId {
        let id = self.nodes.len();
        let mut is_mapping_value = false;
        if let Some(parent) = open.last_mut() {
            match &mut self.nodes[parent.node].kind {
                Kind::Sequence(items) => items.push(id),
                Kind::Mapping(entries) => match parent.pending_key.take() {
                    Some(key) => {
                        entries.push((key, id));
                        is_mapping_value = true;
                    }
                    None => parent.pending_key = Some(id),
                },
                Kind::Scalar(_) | Kind::Alias(_) => {}
            }
        }
        self.nodes.push(Node {
            at: (span.start.line(), span.start.col() + 1),
            is_mapping_value,
            kind,
        });
        id
    }

    /// Where `path` leads from the root: the last key or item of it that
    /// the document has (a key at the key); `None` when it has not the
    /// first.
    pub(crate) fn find(&self, path: &[PathStep<'_>]) -> Option<Position> {
        let mut node = self.resolve(self.nodes.first().map(|_| 0)?);
        let mut found = None;
        for step in path {
            let Some((at, next)) = self.step(node, *step) else {
                break;
            };
            found = Some(at);
            node = self.resolve(next);
        }
        found
    }

    /// The position of `step` taken from `node`, and the node it leads to.
    fn step(&self, node: NodeId, step: PathStep<'_>) -> Option<(Position, NodeId)> {
        match (&self.nodes[node].kind, step) {
            (Kind::Mapping(_), PathStep::Key(key)) => self.entry(node, key),
            (Kind::Sequence(items), PathStep::Key(key)) => items
                .iter()
                .find_map(|item| self.entry(self.resolve(*item), key)),
            (Kind::Sequence(items), PathStep::Index(index)) => {
                items.get(index).map(|item| (self.nodes[*item].at, *item))
            }
            _ => None,
        }
    }

    /// The position of `key` in the mapping `node`, and its value.
    fn entry(&self, node: NodeId, key: &str) -> Option<(Position, NodeId)> {
        let Kind::Mapping(entries) = &self.nodes[node].kind else {
            return None;
        };
        entries
            .iter()
            .find(|(k, _)| matches!(&self.nodes[*k].kind, Kind::Scalar(s) if s == key))
            .map(|(k, value)| (self.nodes[*k].at, *value))
    }

    /// The node an alias names (an alias of an unknown anchor stays itself).
    fn resolve(&self, node: NodeId) -> NodeId {
        match self.nodes[node].kind {
            Kind::Alias(anchor) => self.anchors.get(&anchor).copied().unwrap_or(node),
            _ => node,
        }
    }

    /// The `nth` (from 1) scalar written as a mapping's value that equals
    /// `value`, in the order of the text.
    pub(crate) fn find_value(&self, value: &str, nth: usize) -> Option<Position> {
        self.nodes
            .iter()
            .filter(|node| node.is_mapping_value)
            .filter(|node| matches!(&node.kind, Kind::Scalar(s) if s == value))
            .nth(nth.checked_sub(1)?)
            .map(|node| node.at)
    }
}

#[cfg(test)]
mod tests {
    use super::PathStep::{Index, Key};
    use super::*;

    #[test]
    fn a_path_of_keys_and_indices_finds_its_node_in_block_style() {
        let tree = SpanTree::parse(
            "name: top\nbackends:\n  - name: a\n    image: x\n  - name: b\n    image: x\n",
        );
        assert_eq!(tree.find(&[Key("name")]), Some((1, 1)));
        assert_eq!(tree.find(&[Key("backends"), Index(1)]), Some((5, 5)));
        assert_eq!(
            tree.find(&[Key("backends"), Index(1), Key("image")]),
            Some((6, 5))
        );
        // Keys alone pass through a list at its first item holding the key.
        assert_eq!(tree.find(&[Key("backends"), Key("image")]), Some((4, 5)));
    }

    #[test]
    fn flow_style_nodes_have_their_own_columns() {
        let tree = SpanTree::parse("backends: [{name: a, image: x}, {name: b, image: ''}]\n");
        assert_eq!(
            tree.find(&[Key("backends"), Index(1), Key("image")]),
            Some((1, 43))
        );
        assert_eq!(tree.find_value("b", 1), Some((1, 40)));
    }

    #[test]
    fn a_path_found_in_part_stops_at_its_last_node_and_none_without_the_first() {
        let tree = SpanTree::parse("run:\n  command: [x]\n");
        assert_eq!(tree.find(&[Key("run"), Key("env")]), Some((1, 1)));
        assert_eq!(tree.find(&[Key("grid"), Key("params")]), None);
        assert_eq!(SpanTree::parse("").find(&[Key("name")]), None);
    }

    #[test]
    fn aliases_lead_to_their_anchor() {
        let tree = SpanTree::parse("base: &b {image: x}\nbackend: *b\n");
        assert_eq!(tree.find(&[Key("backend"), Key("image")]), Some((1, 11)));
    }

    #[test]
    fn values_are_counted_in_the_order_written_keys_and_items_not() {
        let tree = SpanTree::parse("a: x\nx: [x]\nb:\n  c: 'x'\n");
        assert_eq!(tree.find_value("x", 1), Some((1, 4)));
        assert_eq!(tree.find_value("x", 2), Some((4, 6)));
        assert_eq!(tree.find_value("x", 3), None);
        assert_eq!(tree.find_value("x", 0), None);
    }

    #[test]
    fn a_text_that_stops_parsing_keeps_what_came_before() {
        let tree = SpanTree::parse("name: a\ncycles: 2\nrun: [\n");
        assert_eq!(tree.find(&[Key("cycles")]), Some((2, 1)));
    }
}
