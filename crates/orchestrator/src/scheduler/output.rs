//! What a run's exec printed, as much as is kept: the end of its stdout (to
//! find the result line), of its stderr (for the error of a failed run) and
//! of both together (the run's `logs_tail`).

/// stdout kept per run to find its result line; older output is dropped.
const STDOUT_TAIL_BYTES: usize = 1024 * 1024;
/// stderr kept per run for the error message of a failed run.
const STDERR_TAIL_BYTES: usize = 2048;
/// stdout and stderr together kept with every run for people to read.
const LOGS_TAIL_BYTES: usize = 4096;
/// Longest result JSON line recorded.
const MAX_RESULT_BYTES: usize = 256 * 1024;

/// The kept output of one attempt's exec.
pub(super) struct RunOutput {
    stdout: Tail,
    stderr: Tail,
    logs: Tail,
}

impl RunOutput {
    pub(super) fn new() -> Self {
        Self {
            stdout: Tail::new(STDOUT_TAIL_BYTES),
            stderr: Tail::new(STDERR_TAIL_BYTES),
            logs: Tail::new(LOGS_TAIL_BYTES),
        }
    }

    pub(super) fn stdout(&mut self, data: &[u8]) {
        self.stdout.push(data);
        self.logs.push(data);
    }

    pub(super) fn stderr(&mut self, data: &[u8]) {
        self.stderr.push(data);
        self.logs.push(data);
    }

    /// The result JSON (empty when stdout has none), or why it is not recorded.
    pub(super) fn result(&self) -> Result<String, String> {
        result_line(self.stdout.bytes())
    }

    /// The end of stdout and stderr together, as text.
    pub(super) fn logs_tail(&self) -> String {
        self.logs.text()
    }

    /// The end of stderr, as text without surrounding blanks.
    pub(super) fn stderr_text(&self) -> String {
        String::from_utf8_lossy(self.stderr.bytes())
            .trim()
            .to_string()
    }
}

/// The run's result: the last line of its stdout that is a JSON object.
fn result_line(stdout: &[u8]) -> Result<String, String> {
    let text = String::from_utf8_lossy(stdout);
    for line in text.lines().rev() {
        let line = line.trim();
        if !line.starts_with('{') {
            continue;
        }
        if let Ok(serde_json::Value::Object(_)) = serde_json::from_str::<serde_json::Value>(line) {
            if line.len() > MAX_RESULT_BYTES {
                return Err(format!(
                    "result JSON is {} bytes; at most {MAX_RESULT_BYTES} are recorded",
                    line.len()
                ));
            }
            return Ok(line.to_string());
        }
    }
    Ok(String::new())
}

/// The last `capacity` bytes of a stream.
struct Tail {
    bytes: Vec<u8>,
    capacity: usize,
}

impl Tail {
    fn new(capacity: usize) -> Self {
        Self {
            bytes: Vec::new(),
            capacity,
        }
    }

    fn push(&mut self, data: &[u8]) {
        self.bytes.extend_from_slice(data);
        if self.bytes.len() > self.capacity {
            let excess = self.bytes.len() - self.capacity;
            self.bytes.drain(..excess);
        }
    }

    fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The tail as text, from the first whole UTF-8 character: the cut may
    /// fall inside one.
    fn text(&self) -> String {
        let start = self
            .bytes
            .iter()
            .take(3)
            .take_while(|b| (**b & 0b1100_0000) == 0b1000_0000)
            .count();
        String::from_utf8_lossy(&self.bytes[start..]).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn result_is_last_json_object_line() {
        let out = b"warming up\n{\"a\": 1}\nprogress 50%\n{\"mib_per_s\": 812.5, \"n\": 3}\ndone\n";
        assert_eq!(
            result_line(out).unwrap(),
            "{\"mib_per_s\": 812.5, \"n\": 3}"
        );
        assert_eq!(result_line(b"no json here\n[1,2]\n").unwrap(), "");
    }

    #[test]
    fn tail_keeps_the_end() {
        let mut tail = Tail::new(4);
        tail.push(b"abc");
        tail.push(b"defg");
        assert_eq!(tail.bytes(), b"defg");
        // "é" is two bytes; a cut after its first leaves a stray continuation byte.
        let mut tail = Tail::new(3);
        tail.push("é!!".as_bytes());
        assert_eq!(tail.text(), "!!");
    }
}
