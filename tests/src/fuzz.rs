//! Fuzz targets that run in `cargo test` on stable Rust. proptest feeds a
//! parser inputs made from the target's seed corpus, checked in beside the
//! crate's tests (`tests/fuzz_corpus/<target>/`): a seed as it is, a seed
//! mutated the way a coverage-guided fuzzer would (bytes flipped, pieces
//! cut, repeated or spliced in, tokens of the format inserted, one token
//! inserted thousands of times over, as deep nesting is made), or arbitrary
//! bytes. Each target runs a bounded number of cases ([`DEFAULT_CASES`],
//! `PROPTEST_CASES=N` for a longer run), and each case must end within
//! [`CASE_TIME_BOUND`]: a hang or a quadratic blow-up fails like a panic.
//!
//! A failure is reported with the shrunk input; it then becomes a named
//! regression test in the crate, not a file proptest writes on its own.

use std::path::Path;
use std::time::{Duration, Instant};

use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError};

/// Cases per target in an ordinary `cargo test`.
pub const DEFAULT_CASES: u32 = 256;

/// Longest one case may take. Inputs are a few KiB, which a linear parser
/// reads in microseconds even in a debug build on a busy 2-core machine; a
/// hang, or work quadratic in the input, takes longer.
pub const CASE_TIME_BOUND: Duration = Duration::from_secs(1);

/// Longest input made by mutation or at random.
const MAX_INPUT_BYTES: usize = 16 << 10;

/// The runner's config: [`DEFAULT_CASES`] unless `PROPTEST_CASES` says
/// otherwise, and no regression files written into the source tree.
pub fn config() -> Config {
    let mut config = Config::default();
    if std::env::var_os("PROPTEST_CASES").is_none() {
        config.cases = DEFAULT_CASES;
    }
    config.failure_persistence = None;
    config
}

/// The seed inputs of `target`: every file in
/// `<crate_dir>/tests/fuzz_corpus/<target>/`, in name order. A target
/// without seeds is a mistake, so it panics.
pub fn corpus(crate_dir: &str, target: &str) -> Vec<Vec<u8>> {
    named_corpus(crate_dir, target)
        .into_iter()
        .map(|(_, seed)| seed)
        .collect()
}

/// [`corpus`] with each seed's file name, for targets whose seeds say by
/// their name what must become of them (e.g. `valid-*` must parse).
pub fn named_corpus(crate_dir: &str, target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = Path::new(crate_dir).join("tests/fuzz_corpus").join(target);
    let mut paths: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("fuzz corpus {}: {e}", dir.display()))
        .map(|entry| entry.expect("corpus entry").path())
        .filter(|path| path.is_file())
        .collect();
    paths.sort();
    assert!(!paths.is_empty(), "fuzz corpus {} is empty", dir.display());
    paths
        .iter()
        .map(|path| {
            let name = path.file_name().unwrap_or_default().to_string_lossy();
            let seed = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            (name.into_owned(), seed)
        })
        .collect()
}

/// One change to an input. Positions are taken modulo the input's length,
/// so any `usize` is one.
#[derive(Debug, Clone)]
enum Mutation {
    /// Replaces the byte at a position.
    Set(usize, u8),
    /// Cuts the input short.
    Truncate(usize),
    /// Removes up to `len` bytes from a position.
    Remove(usize, usize),
    /// Inserts arbitrary bytes at a position.
    Insert(usize, Vec<u8>),
    /// Inserts one of the format's tokens at a position.
    Token(usize, usize),
    /// Repeats the piece of up to `len` bytes at a position `times` times.
    Repeat(usize, usize, usize),
    /// Inserts one of the format's tokens `times` times over at a position
    /// (thousands of `[`: nesting deeper than any parser should follow).
    Flood(usize, usize, usize),
}

fn apply(mut input: Vec<u8>, mutation: &Mutation, tokens: &[&[u8]]) -> Vec<u8> {
    let at = |position: &usize, len: usize| position % (len + 1);
    match mutation {
        Mutation::Set(index, byte) => {
            if !input.is_empty() {
                let i = index % input.len();
                input[i] = *byte;
            }
        }
        Mutation::Truncate(index) => input.truncate(at(index, input.len())),
        Mutation::Remove(index, len) => {
            let start = at(index, input.len());
            let end = (start + len).min(input.len());
            input.drain(start..end);
        }
        Mutation::Insert(index, bytes) => {
            let i = at(index, input.len());
            input.splice(i..i, bytes.iter().copied());
        }
        Mutation::Token(index, which) => {
            if !tokens.is_empty() {
                let i = at(index, input.len());
                let token = tokens[which % tokens.len()];
                input.splice(i..i, token.iter().copied());
            }
        }
        Mutation::Repeat(index, len, times) => {
            let start = at(index, input.len());
            let end = (start + len).min(input.len());
            let piece = input[start..end].repeat(*times);
            input.splice(end..end, piece);
        }
        Mutation::Flood(index, which, times) => {
            if !tokens.is_empty() {
                let i = at(index, input.len());
                let token = tokens[which % tokens.len()];
                let times = (*times).min(MAX_INPUT_BYTES / token.len().max(1));
                input.splice(i..i, token.repeat(times));
            }
        }
    }
    input.truncate(MAX_INPUT_BYTES);
    input
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Set(i, b)),
        any::<usize>().prop_map(Mutation::Truncate),
        (any::<usize>(), 1..64usize).prop_map(|(i, n)| Mutation::Remove(i, n)),
        (
            any::<usize>(),
            proptest::collection::vec(any::<u8>(), 1..16)
        )
            .prop_map(|(i, b)| Mutation::Insert(i, b)),
        (any::<usize>(), any::<usize>()).prop_map(|(i, t)| Mutation::Token(i, t)),
        (any::<usize>(), 1..64usize, 1..32usize).prop_map(|(i, n, k)| Mutation::Repeat(i, n, k)),
        (any::<usize>(), any::<usize>(), 1..MAX_INPUT_BYTES)
            .prop_map(|(i, t, k)| Mutation::Flood(i, t, k)),
    ]
}

/// JSON's own pieces worth inserting into any JSON target's inputs.
const JSON_TOKENS: &[&[u8]] = &[
    b"{", b"}", b"[", b"]", b"\"", b",", b":", b"null", b"true", b"0", b"-1",
];

/// A JSON target's tokens: JSON's own pieces, then the target's `keys`
/// (its field names and values worth trying).
pub fn json_tokens(keys: &'static [&'static [u8]]) -> &'static [&'static [u8]] {
    // Built once per target and test process: leaking it is what gives the
    // strategy the 'static slice it keeps.
    Box::leak(
        JSON_TOKENS
            .iter()
            .chain(keys)
            .copied()
            .collect::<Vec<_>>()
            .into_boxed_slice(),
    )
}

/// Inputs for a target: its seeds, the seeds with up to 8 mutations
/// (`tokens` are pieces of the format worth inserting: brackets, keys,
/// delimiters), and arbitrary bytes.
pub fn inputs(
    seeds: Vec<Vec<u8>>,
    tokens: &'static [&'static [u8]],
) -> impl Strategy<Value = Vec<u8>> {
    let seed = proptest::sample::select(seeds);
    prop_oneof![
        1 => seed.clone(),
        6 => (seed, proptest::collection::vec(mutation(), 1..8)).prop_map(move |(seed, mutations)| {
            mutations
                .iter()
                .fold(seed, |input, mutation| apply(input, mutation, tokens))
        }),
        1 => proptest::collection::vec(any::<u8>(), 0..1024),
    ]
}

/// Runs one case of `what`, failing it when it takes longer than
/// [`CASE_TIME_BOUND`].
pub fn timed<T>(what: &str, case: impl FnOnce() -> T) -> Result<T, TestCaseError> {
    timed_within(what, CASE_TIME_BOUND, case)
}

/// [`timed`] with another bound, for a target whose limits allow more work
/// on one input than a parser's linear pass (say why where it is used).
pub fn timed_within<T>(
    what: &str,
    bound: Duration,
    case: impl FnOnce() -> T,
) -> Result<T, TestCaseError> {
    let started = Instant::now();
    let result = case();
    let took = started.elapsed();
    if took > bound {
        return Err(TestCaseError::fail(format!(
            "{what} took {took:?} on one input; the bound is {bound:?}"
        )));
    }
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mutations_stay_in_bounds() {
        let tokens: &[&[u8]] = &[b"[", b"{"];
        let mutations = [
            Mutation::Set(usize::MAX, 0),
            Mutation::Truncate(usize::MAX),
            Mutation::Remove(usize::MAX, 63),
            Mutation::Insert(0, vec![1, 2]),
            Mutation::Token(usize::MAX, usize::MAX),
            Mutation::Repeat(0, 63, 31),
            Mutation::Flood(usize::MAX, usize::MAX, usize::MAX),
        ];
        for input in [Vec::new(), b"abc".to_vec()] {
            for mutation in &mutations {
                assert!(apply(input.clone(), mutation, tokens).len() <= MAX_INPUT_BYTES);
            }
        }
        assert_eq!(
            apply(b"ab".to_vec(), &Mutation::Repeat(0, 1, 3), tokens),
            b"aaaab"
        );
        assert_eq!(
            apply(b"ab".to_vec(), &Mutation::Flood(1, 1, 3), tokens),
            b"a{{{b"
        );
    }
}
