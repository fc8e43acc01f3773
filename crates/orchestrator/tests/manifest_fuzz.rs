//! Fuzz target `manifest`: the campaign manifest parser on the shared
//! runner ([`berth_tests::fuzz`]), on stable in `cargo test`. Seeds: the
//! checked-in corpus (`fuzz_corpus/manifest/`: the hostile manifests of
//! issue 15 and valid ones, `valid-*`) and the example campaigns, mutated
//! as every target's are, with YAML's indicators and a manifest's pieces as
//! the tokens spliced in (and flooded: deep nesting). The parser must never
//! panic, must answer within [`TIME_BOUND`], must place every refusal in
//! the text, and valid manifests must still parse. A case that fails becomes a file of the corpus.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use berth_orchestrator::manifest::plan;
use berth_tests::fuzz;
use proptest::prelude::*;

/// Every seed: (file name, text, whether it must parse).
fn corpus() -> &'static [(String, Vec<u8>, bool)] {
    static CORPUS: OnceLock<Vec<(String, Vec<u8>, bool)>> = OnceLock::new();
    CORPUS.get_or_init(|| {
        let mut seeds: Vec<_> = fuzz::named_corpus(env!("CARGO_MANIFEST_DIR"), "manifest")
            .into_iter()
            .map(|(name, text)| {
                let valid = name.starts_with("valid-");
                (name, text, valid)
            })
            .collect();
        let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/campaigns");
        let mut files: Vec<PathBuf> = std::fs::read_dir(&examples)
            .unwrap_or_else(|e| panic!("{}: {e}", examples.display()))
            .map(|entry| entry.expect("example entry").path())
            .filter(|path| path.extension().is_some_and(|e| e == "yaml"))
            .collect();
        files.sort();
        for path in files {
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            seeds.push((name, std::fs::read(&path).expect("example"), true));
        }
        seeds
    })
}

/// Longest one manifest may take: more than the runner's usual bound, as
/// the limits allow more than a linear pass: `manifest.max_exclude_checks`
/// (10M comparisons of a grid's combinations with its excludes) take
/// 0.6–1.1 s in a debug build on a loaded 2-core machine.
const TIME_BOUND: Duration = Duration::from_secs(2);

/// Plans `text`, failing the case past [`TIME_BOUND`]; panics propagate.
fn timed_plan(text: &str) -> Result<Result<usize, String>, TestCaseError> {
    fuzz::timed_within("manifest::plan", TIME_BOUND, || {
        plan("fuzz.yaml", text)
            .map(|plan| plan.runs.len())
            .map_err(|e| e.to_string())
    })
}

#[test]
fn corpus_answers_in_time_valid_entries_parse() {
    assert!(corpus().len() >= 10, "{} seeds", corpus().len());
    for (name, text, valid) in corpus() {
        let text = String::from_utf8_lossy(text);
        let started = Instant::now();
        let outcome = timed_plan(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
        println!(
            "{name}: {} bytes, {:?}: {outcome:?}",
            text.len(),
            started.elapsed()
        );
        match outcome {
            Ok(runs) => assert!(*valid && runs > 0, "{name} was accepted"),
            Err(error) => assert!(!valid, "{name} no longer parses: {error}"),
        }
    }
}

/// YAML's indicators and a manifest's pieces, worth splicing in.
const TOKENS: &[&[u8]] = &[
    b"[",
    b"]",
    b"{",
    b"}",
    b"{a: ",
    b", ",
    b": ",
    b"- ",
    b"? ",
    b"'",
    b"\"",
    b"''",
    b"\\\"",
    b"#",
    b"&a ",
    b"*a",
    b"!t ",
    b"!<x> ",
    b"|\n",
    b">-\n",
    b"\n",
    b"\n  ",
    b"\n    - ",
    b"---\n",
    b"...\n",
    b"%YAML 1.1\n",
    b"\t",
    b"{{p0}}",
    b"{{",
    b"<<: *a\n",
    "\u{85}".as_bytes(),
    "\u{2028}".as_bytes(),
    "\u{feff}".as_bytes(),
    b"\r\n",
    b"\0",
    b"~",
    b"grid:\n  params:\n    p0: [1, 2, 3]\n",
    b"repetitions: 1000000\n",
    b"exclude: [{p0: 1}]\n",
];

proptest! {
    #![proptest_config(fuzz::config())]

    #[test]
    fn mutated_manifests_answer_in_time_without_panicking_or_are_refused_at_a_place(
        input in fuzz::inputs(corpus().iter().map(|(_, text, _)| text.clone()).collect(), TOKENS),
    ) {
        // Accepted, or refused at a place in the text.
        if let Err(error) = timed_plan(&String::from_utf8_lossy(&input))? {
            prop_assert!(error.starts_with("fuzz.yaml:"), "{}", error);
        }
    }
}
