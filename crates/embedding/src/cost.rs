//! What a request would cost before it is queued: the time a session takes
//! to read its tokens, at the rate the model's sessions are measured at,
//! against `server.request_cpu_budget`. With one thread a session (the
//! default pool: a session per core) that time is the request's CPU time;
//! with more, the budget bounds the sessions' time, the resource requests
//! wait for.
//!
//! The size limits bound a request's memory, but one within them can still
//! be 2048 texts × `max_tokens` (524 288 tokens): minutes of CPU. Such a
//! request is refused at once rather than embedded, and the estimate must be
//! far cheaper than the work. It is decided in up to three steps, each only
//! when the one before could not decide:
//!
//! 1. an upper bound from each text's length (a token is at least one byte):
//!    a request within the budget even so is accepted, with no tokenizing,
//!    which is every small request;
//! 2. a lower bound from each text's words (each word is at least one
//!    token): a request over the budget even so is refused;
//! 3. the texts are tokenized one by one, and counting stops as soon as what
//!    is counted, with the bounds of the rest, decides.
//!
//! The rate is the tokens per second one session reads ([`Throughput`]),
//! measured at load on a text of `max_tokens` tokens and then on every batch
//! the sessions run.

use std::sync::Mutex;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::metrics::gauge::Gauge;
use tokenizers::Tokenizer;

/// Batches of fewer tokens are not measured: a run's fixed cost (~1 ms in a
/// release build, ~5 ms in a debug one) is a large part of theirs, so a
/// stream of single short texts would make the rate look several times
/// slower than it is for the large requests that the estimate is for.
const MIN_MEASURED_TOKENS: u64 = 256;

/// Weight of the measure so far at each new batch: the rate follows the
/// last ten or so batches, so that it tracks the machine's load without
/// jumping at one slow batch.
const DECAY: f64 = 0.8;

/// Tokens the model adds to every text ([CLS] and [SEP]).
const SPECIAL_TOKENS: u64 = 2;

/// The bytes of a text tokenized to count its tokens, per token the model
/// reads: a text of ordinary words reaches `max_tokens` well before (4 to 5
/// bytes a token in English, 3 in CJK), so the tokenizer never reads the
/// rest of a long text (it would tokenize all of it before truncating).
const COUNTED_BYTES_PER_TOKEN: usize = 16;

/// Tokens per second one session reads: measured on a text at load, then a
/// running measure over the batches the sessions run. Shared by the
/// sessions (which record) and the requests (which read).
#[derive(Debug)]
pub struct Throughput {
    /// Decayed sums of tokens and seconds.
    measure: Mutex<(f64, f64)>,
    /// `berth_embedding_tokens_per_second`.
    gauge: Gauge<f64, AtomicU64>,
}

impl Throughput {
    /// Starts from a first measure (the load-time one), so that there is no
    /// rate to guess before the first batch.
    pub fn new(tokens: u64, elapsed: Duration, gauge: Gauge<f64, AtomicU64>) -> Self {
        let seconds = elapsed.as_secs_f64().max(1e-6);
        let throughput = Self {
            measure: Mutex::new((tokens.max(1) as f64, seconds)),
            gauge,
        };
        throughput.gauge.set(throughput.tokens_per_second());
        throughput
    }

    /// Adds one batch's tokens (not counting padding) and time.
    pub fn record(&self, tokens: u64, elapsed: Duration) {
        if tokens < MIN_MEASURED_TOKENS {
            return;
        }
        let rate = {
            let mut measure = self.lock();
            measure.0 = measure.0 * DECAY + tokens as f64;
            measure.1 = measure.1 * DECAY + elapsed.as_secs_f64();
            measure.0 / measure.1
        };
        self.gauge.set(rate);
    }

    pub fn tokens_per_second(&self) -> f64 {
        let (tokens, seconds) = *self.lock();
        tokens / seconds
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (f64, f64)> {
        // Two floats, each written in one statement: never left half-done.
        self.measure.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// What one text will cost at most and at least, in tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    pub low: u64,
    pub high: u64,
}

impl Bounds {
    /// From the text alone, without its tokenizer. High: a token covers at
    /// least one byte (WordPiece and byte-level BPE; a Hangul syllable's
    /// three bytes make at most three jamo tokens). Low: every word, a run
    /// between spaces that holds an ASCII letter or digit, is at least one
    /// token whatever the tokenizer (none of them joins words across a space
    /// or drops such a character); BERT's punctuation tokens and word pieces
    /// are not counted, so that the bound holds for other tokenizers too.
    pub fn of(text: &str, max_tokens: usize) -> Self {
        let max = max_tokens as u64;
        let mut words = 0;
        for word in text.as_bytes().split(|&b| b == b' ') {
            if words + SPECIAL_TOKENS >= max {
                break;
            }
            if word.iter().any(u8::is_ascii_alphanumeric) {
                words += 1;
            }
        }
        Self {
            low: (words + SPECIAL_TOKENS).min(max),
            high: (text.len() as u64 + SPECIAL_TOKENS).min(max),
        }
    }
}

/// The tokens `tokenizer` makes of `text` within `max_tokens`, reading at
/// most [`COUNTED_BYTES_PER_TOKEN`] × `max_tokens` bytes of it; a text cut
/// there that still made fewer than `max_tokens` tokens (runs of spaces,
/// words of hundreds of letters) counts as its upper bound.
pub fn count_tokens(tokenizer: &Tokenizer, text: &str, max_tokens: usize) -> u64 {
    let max = max_tokens as u64;
    let mut end = text
        .len()
        .min(max_tokens.saturating_mul(COUNTED_BYTES_PER_TOKEN));
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let counted = match tokenizer.encode(&text[..end], true) {
        Ok(encoding) => encoding
            .get_attention_mask()
            .iter()
            .filter(|&&m| m != 0)
            .count() as u64,
        // The session would fail on it too, and say why: let it through.
        Err(_) => 0,
    };
    if end < text.len() && counted < max {
        Bounds::of(text, max_tokens).high
    } else {
        counted.min(max)
    }
}

/// Whether a request's texts fit in `allowance` tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Within,
    /// At least this many tokens, more than the allowance.
    Over(u64),
    /// The bounds do not decide: the texts must be counted ([`count_until_decided`]).
    Undecided,
}

/// Steps 1 and 2: the request from its texts' bounds.
pub fn judge_by_bounds(bounds: &[Bounds], allowance: u64) -> Verdict {
    let high: u64 = bounds.iter().map(|b| b.high).sum();
    let low: u64 = bounds.iter().map(|b| b.low).sum();
    if high <= allowance {
        Verdict::Within
    } else if low > allowance {
        Verdict::Over(low)
    } else {
        Verdict::Undecided
    }
}

/// Step 3: counts the texts' tokens (`count(i)` for text `i`) one by one
/// until what is counted, with the bounds of the texts not yet counted,
/// decides: refusing a request far over the budget, or accepting one far
/// under it, counts only part of it.
pub fn count_until_decided(
    bounds: &[Bounds],
    allowance: u64,
    mut count: impl FnMut(usize) -> u64,
) -> Verdict {
    let mut low_rest: u64 = bounds.iter().map(|b| b.low).sum();
    let mut high_rest: u64 = bounds.iter().map(|b| b.high).sum();
    let mut counted = 0;
    for (i, b) in bounds.iter().enumerate() {
        low_rest -= b.low;
        high_rest -= b.high;
        counted += if b.low == b.high { b.low } else { count(i) };
        if counted + low_rest > allowance {
            return Verdict::Over(counted + low_rest);
        }
        if counted + high_rest <= allowance {
            return Verdict::Within;
        }
    }
    // Not reached: after the last text both rests are 0, and one of the
    // two tests above held.
    Verdict::Within
}

/// The tokens a request may hold: as many as a session reads in `budget`.
pub fn allowance(budget: Duration, tokens_per_second: f64) -> u64 {
    (budget.as_secs_f64() * tokens_per_second) as u64
}

/// The session time `tokens` take at `tokens_per_second`.
pub fn session_time(tokens: u64, tokens_per_second: f64) -> Duration {
    Duration::from_secs_f64(tokens as f64 / tokens_per_second.max(1e-9))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_of_a_text() {
        // Empty: [CLS] [SEP] at most, nothing certain beyond them.
        assert_eq!(Bounds::of("", 256), Bounds { low: 2, high: 2 });
        // Words between spaces; punctuation alone is not a sure token.
        assert_eq!(Bounds::of("a cat , sat.", 256), Bounds { low: 5, high: 14 });
        // Neither bound passes max_tokens.
        let long = "word ".repeat(1000);
        assert_eq!(
            Bounds::of(&long, 256),
            Bounds {
                low: 256,
                high: 256
            }
        );
        // A non-ASCII word is not sure to survive normalisation.
        assert_eq!(Bounds::of("\u{0301}\u{0301} é", 256).low, 2);
    }

    #[test]
    fn bounds_decide_small_and_wordy_requests() {
        let bounds =
            |texts: &[&str]| -> Vec<Bounds> { texts.iter().map(|t| Bounds::of(t, 256)).collect() };
        // At most 2 × 7 tokens.
        assert_eq!(
            judge_by_bounds(&bounds(&["a cat", "a dog"]), 14),
            Verdict::Within
        );
        // At least 2 × 4 tokens.
        assert_eq!(
            judge_by_bounds(&bounds(&["a cat", "a dog"]), 7),
            Verdict::Over(8)
        );
        assert_eq!(
            judge_by_bounds(&bounds(&["a cat", "a dog"]), 10),
            Verdict::Undecided
        );
    }

    #[test]
    fn counting_stops_once_decided() {
        let bounds = vec![Bounds { low: 3, high: 100 }; 10];
        // Each text is 50 tokens: after two, 100 counted + 8 × 3 at least.
        let mut counted = 0;
        let verdict = count_until_decided(&bounds, 120, |_| {
            counted += 1;
            50
        });
        assert_eq!(verdict, Verdict::Over(124));
        assert_eq!(counted, 2);
        // Each text is 3 tokens: the rest's upper bound fits only once
        // every text is counted (9 × 3 + 100 > 120).
        let mut counted = 0;
        let verdict = count_until_decided(&bounds, 120, |_| {
            counted += 1;
            3
        });
        assert_eq!(verdict, Verdict::Within);
        assert_eq!(counted, 10);
        // Texts whose bounds meet are not counted.
        let exact = vec![
            Bounds {
                low: 256,
                high: 256
            };
            4
        ];
        let verdict = count_until_decided(&exact, 600, |_| unreachable!("counted"));
        assert_eq!(verdict, Verdict::Over(1024));
    }

    #[test]
    fn allowance_and_session_time_agree() {
        let budget = Duration::from_secs(10);
        assert_eq!(allowance(budget, 2000.0), 20_000);
        assert_eq!(session_time(20_000, 2000.0), budget);
    }

    #[test]
    fn throughput_follows_large_batches_only() {
        let gauge = Gauge::<f64, AtomicU64>::default();
        let throughput = Throughput::new(256, Duration::from_millis(100), gauge.clone());
        assert_eq!(throughput.tokens_per_second(), 2560.0);
        assert_eq!(gauge.get(), 2560.0);
        // A single short text: mostly the run's fixed cost, not measured.
        throughput.record(5, Duration::from_millis(7));
        assert_eq!(throughput.tokens_per_second(), 2560.0);
        // Faster batches pull the rate up, a step at a time.
        for _ in 0..30 {
            throughput.record(5120, Duration::from_secs(1));
        }
        let rate = throughput.tokens_per_second();
        assert!((5000.0..=5120.0).contains(&rate), "{rate}");
        assert_eq!(gauge.get(), rate);
    }
}
