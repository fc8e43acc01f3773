//! Fuzzing of the campaign manifest parser, on stable in `cargo test`: the
//! checked-in corpus (`fuzz_corpus/manifest/`: the hostile manifests of
//! issue 15 and valid ones) and the example campaigns, mutated by byte
//! flips, truncation, duplication, nesting and YAML indicators. The parser
//! must never panic, must answer within a time bound, and valid manifests
//! must still parse. A case that fails becomes a file of the corpus.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use berth_orchestrator::manifest::plan;
use proptest::prelude::*;
use proptest::test_runner::Config;

/// Longest a manifest may take to be answered. Generous: unoptimized
/// dependencies in the dev profile, and a loaded 2-core machine; a
/// quadratic path on these inputs takes seconds.
const TIME_BOUND: Duration = Duration::from_secs(2);
const CASES: u32 = 256;

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz_corpus/manifest")
}

/// Every seed: (file name, text, whether it must parse).
fn corpus() -> &'static [(String, String, bool)] {
    static CORPUS: OnceLock<Vec<(String, String, bool)>> = OnceLock::new();
    CORPUS.get_or_init(|| {
        let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/campaigns");
        let mut seeds = Vec::new();
        for (dir, all_valid) in [(corpus_dir(), false), (examples, true)] {
            let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
                .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
                .map(|entry| entry.expect("corpus entry").path())
                .filter(|path| path.extension().is_some_and(|e| e == "yaml"))
                .collect();
            files.sort();
            for path in files {
                let name = path.file_name().unwrap().to_string_lossy().into_owned();
                let text = std::fs::read_to_string(&path).expect("corpus file");
                let valid = all_valid || name.starts_with("valid-");
                seeds.push((name, text, valid));
            }
        }
        seeds
    })
}

/// Plans `text`, asserting it answers within [`TIME_BOUND`]; panics propagate.
fn timed_plan(label: &str, text: &str) -> (Result<usize, String>, Duration) {
    let start = Instant::now();
    let outcome = plan("fuzz.yaml", text)
        .map(|plan| plan.runs.len())
        .map_err(|e| e.to_string());
    let elapsed = start.elapsed();
    assert!(
        elapsed < TIME_BOUND,
        "{label}: {} bytes took {elapsed:?}",
        text.len()
    );
    (outcome, elapsed)
}

#[test]
fn corpus_answers_in_time_valid_entries_parse() {
    assert!(corpus().len() >= 10, "corpus at {}", corpus_dir().display());
    for (name, text, valid) in corpus() {
        let (outcome, elapsed) = timed_plan(name, text);
        println!("{name}: {} bytes, {elapsed:?}: {outcome:?}", text.len());
        match outcome {
            Ok(runs) => assert!(*valid && runs > 0, "{name} was accepted"),
            Err(error) => assert!(!valid, "{name} no longer parses: {error}"),
        }
    }
}

/// One change to a manifest's bytes.
#[derive(Debug, Clone)]
enum Mutation {
    /// XOR one byte (the text is then read back lossily as UTF-8).
    FlipByte {
        at: usize,
        mask: u8,
    },
    Truncate {
        at: usize,
    },
    /// Copies `len` bytes from `from` in front of `to`, `times` times.
    Duplicate {
        from: usize,
        len: usize,
        to: usize,
        times: usize,
    },
    /// Wraps what follows `at` in `depth` open brackets or braces.
    Nest {
        at: usize,
        depth: usize,
        map: bool,
    },
    /// Inserts a YAML indicator or fragment.
    Insert {
        at: usize,
        fragment: &'static str,
    },
}

const FRAGMENTS: &[&str] = &[
    "[",
    "]",
    "{",
    "}",
    ", ",
    ": ",
    "- ",
    "? ",
    "'",
    "\"",
    "''",
    "\\\"",
    "#",
    "&a ",
    "*a",
    "!t ",
    "!<x> ",
    "|\n",
    ">-\n",
    "\n",
    "\n  ",
    "\n    - ",
    "---\n",
    "...\n",
    "%YAML 1.1\n",
    "\t",
    "{{p0}}",
    "{{",
    "<<: *a\n",
    "\u{85}",
    "\u{2028}",
    "\u{feff}",
    "\r\n",
    "\0",
    "~",
];

fn mutation() -> impl Strategy<Value = Mutation> {
    let at = any::<prop::sample::Index>();
    prop_oneof![
        (at.clone(), 1u8..)
            .prop_map(|(at, mask)| (at, mask))
            .prop_map(|(at, mask)| {
                Mutation::FlipByte {
                    at: at.index(usize::MAX),
                    mask,
                }
            }),
        at.clone().prop_map(|at| Mutation::Truncate {
            at: at.index(usize::MAX)
        }),
        (at.clone(), 1usize..4096, at.clone(), 1usize..8).prop_map(|(from, len, to, times)| {
            Mutation::Duplicate {
                from: from.index(usize::MAX),
                len,
                to: to.index(usize::MAX),
                times,
            }
        }),
        (at.clone(), 1usize..20_000, any::<bool>()).prop_map(|(at, depth, map)| {
            Mutation::Nest {
                at: at.index(usize::MAX),
                depth,
                map,
            }
        }),
        (at, prop::sample::select(FRAGMENTS)).prop_map(|(at, fragment)| Mutation::Insert {
            at: at.index(usize::MAX),
            fragment,
        }),
    ]
}

fn apply(text: &str, mutations: &[Mutation]) -> String {
    let mut bytes = text.as_bytes().to_vec();
    for mutation in mutations {
        let position = |at: usize, len: usize| if len == 0 { 0 } else { at % (len + 1) };
        match *mutation {
            Mutation::FlipByte { at, mask } => {
                if !bytes.is_empty() {
                    let at = at % bytes.len();
                    bytes[at] ^= mask;
                }
            }
            Mutation::Truncate { at } => bytes.truncate(position(at, bytes.len())),
            Mutation::Duplicate {
                from,
                len,
                to,
                times,
            } => {
                let from = position(from, bytes.len());
                let piece = bytes[from..(from + len).min(bytes.len())].repeat(times);
                let to = position(to, bytes.len());
                bytes.splice(to..to, piece);
            }
            Mutation::Nest { at, depth, map } => {
                let at = position(at, bytes.len());
                let (open, close) = if map { ("{a: ", "}") } else { ("[", "]") };
                let mut nested = open.repeat(depth).into_bytes();
                nested.extend_from_slice(&bytes[at..]);
                nested.extend_from_slice(close.repeat(depth).as_bytes());
                bytes.truncate(at);
                bytes.extend_from_slice(&nested);
            }
            Mutation::Insert { at, fragment } => {
                let at = position(at, bytes.len());
                bytes.splice(at..at, fragment.bytes());
            }
        }
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

proptest! {
    #![proptest_config(Config {
        cases: CASES,
        // The corpus is the regression record: a failing case is added to it.
        failure_persistence: None,
        ..Config::default()
    })]

    #[test]
    fn mutated_manifests_answer_in_time_without_panicking(
        seed in any::<prop::sample::Index>(),
        mutations in prop::collection::vec(mutation(), 1..6),
    ) {
        let (name, text, _) = &corpus()[seed.index(corpus().len())];
        let mutated = apply(text, &mutations);
        let (_outcome, _elapsed) = timed_plan(&format!("{name} with {mutations:?}"), &mutated);
    }
}
