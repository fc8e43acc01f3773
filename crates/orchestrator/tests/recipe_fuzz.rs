//! Fuzz target `recipe`: the deployment recipe parser on the shared runner
//! ([`berth_tests::fuzz`]), on stable in `cargo test`. Seeds: the checked-in
//! corpus (`fuzz_corpus/recipe/`: seed 000's recipes and others that must
//! parse, `valid-*`, and hostile ones: deep nesting, an alias bomb, counts
//! past their limits, broken placeholders), mutated as every target's are,
//! with YAML's indicators and a recipe's pieces as the tokens spliced in.
//! The parser must never panic, must answer within the runner's bound, and
//! must place every refusal in the text (`file:line:column`).

use berth_orchestrator::deployment::recipe::{RecipeLimits, parse};
use berth_orchestrator::manifest::ManifestLimits;
use berth_tests::fuzz;
use proptest::prelude::*;

const LIMITS: RecipeLimits = RecipeLimits { max_replicas: 1000 };

fn parsed(text: &str) -> Result<Result<u32, String>, TestCaseError> {
    fuzz::timed("recipe::parse", || {
        parse("fuzz.yaml", text, &ManifestLimits::default(), LIMITS)
            .map(|recipe| recipe.replicas)
            .map_err(|e| e.to_string())
    })
}

#[test]
fn corpus_answers_in_time_valid_entries_parse() {
    let seeds = fuzz::named_corpus(env!("CARGO_MANIFEST_DIR"), "recipe");
    assert!(seeds.len() >= 8, "{} seeds", seeds.len());
    for (name, text) in seeds {
        let outcome =
            parsed(&String::from_utf8_lossy(&text)).unwrap_or_else(|e| panic!("{name}: {e}"));
        match outcome {
            Ok(_) => assert!(name.starts_with("valid-"), "{name} was accepted"),
            Err(error) => {
                assert!(
                    !name.starts_with("valid-"),
                    "{name} no longer parses: {error}"
                );
                assert!(error.starts_with("fuzz.yaml:"), "{name}: {error}");
            }
        }
    }
}

/// YAML's indicators and a recipe's pieces, worth splicing in.
const TOKENS: &[&[u8]] = &[
    b"[",
    b"]",
    b"{",
    b"}",
    b", ",
    b": ",
    b"- ",
    b"'",
    b"\"",
    b"#",
    b"&a ",
    b"*a",
    b"!t ",
    b"|\n",
    b"\n",
    b"\n  ",
    b"\t",
    b"{{port.http}}",
    b"{{replica}}",
    b"{{",
    b"<<: *a\n",
    b"\0",
    b"~",
    b"ports: [{name: http, port: 70000}]\n",
    b"replicas: 99999999999\n",
    b"health: {check: grpc, port: grpc}\n",
    b"restart: {backoff: 0s}\n",
    b"ulimits: {nofile: {soft: 9, hard: 1}}\n",
    "\u{feff}".as_bytes(),
    b"\r\n",
];

proptest! {
    #![proptest_config(fuzz::config())]

    #[test]
    fn mutated_recipes_answer_in_time_without_panicking_or_are_refused_at_a_place(
        input in fuzz::inputs(fuzz::corpus(env!("CARGO_MANIFEST_DIR"), "recipe"), TOKENS),
    ) {
        if let Err(error) = parsed(&String::from_utf8_lossy(&input))? {
            prop_assert!(error.starts_with("fuzz.yaml:"), "{}", error);
        }
    }
}
