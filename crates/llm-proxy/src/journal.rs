//! The spend journal: every charge to a virtual key is appended to a file
//! beside the key store before the request's answer ends, so a recorded
//! spend survives the proxy being killed (`kill -9`) between the key
//! store's periodic rewrites. Each line carries a sequence number; the key
//! store records the last one its snapshot includes, and on start the lines
//! after it are replayed.
//!
//! The line is written (`write(2)`, into the page cache) at once; it is on
//! disk at the next rewrite of the store (`proxy.keys_flush_interval`),
//! which is what a power cut can lose. Rewrites rotate the journal: the
//! current file becomes `.old` and is deleted once a store that includes it
//! is on disk, so the journal holds at most one interval of charges.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Longest journal line read back; a longer one is not a line this module
/// wrote (key ids are short), so it is skipped.
const MAX_LINE_BYTES: usize = 4096;

/// One charge, as appended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Entry {
    pub seq: u64,
    /// The key's id.
    pub id: String,
    pub spend: f64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

#[derive(Debug)]
pub(crate) struct Journal {
    path: PathBuf,
    old: PathBuf,
    /// Opened on the first append.
    file: Option<File>,
    /// The last sequence number used.
    pub seq: u64,
}

impl Journal {
    /// The journal of the key store at `store`.
    pub fn beside(store: &Path) -> Self {
        let name = |suffix: &str| {
            let mut name = store.as_os_str().to_owned();
            name.push(suffix);
            PathBuf::from(name)
        };
        Self {
            path: name(".journal"),
            old: name(".journal.old"),
            file: None,
            seq: 0,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every entry of the rotated and the current file, oldest first. A
    /// line that does not parse (one torn by a crash mid-write) is skipped
    /// with a warning; `seq` is set past the highest number seen.
    pub fn replay(&mut self) -> std::io::Result<Vec<Entry>> {
        let mut entries = Vec::new();
        for path in [&self.old, &self.path] {
            let file = match File::open(path) {
                Ok(file) => file,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            let mut reader = BufReader::new(file);
            let mut line = Vec::new();
            loop {
                line.clear();
                let read = (&mut reader)
                    .take(MAX_LINE_BYTES as u64 + 1)
                    .read_until(b'\n', &mut line)?;
                if read == 0 {
                    break;
                }
                if line.len() > MAX_LINE_BYTES {
                    // Skip the rest of an over-long line.
                    reader.skip_until(b'\n')?;
                    tracing::warn!(journal = %path.display(), "skipping an over-long spend journal line");
                    continue;
                }
                match serde_json::from_slice::<Entry>(&line) {
                    Ok(entry) => {
                        self.seq = self.seq.max(entry.seq);
                        entries.push(entry);
                    }
                    Err(error) => {
                        tracing::warn!(journal = %path.display(), %error, "skipping an unreadable spend journal line (torn by a crash?)");
                    }
                }
            }
        }
        Ok(entries)
    }

    /// Appends one charge, numbered after the last.
    pub fn append(
        &mut self,
        id: &str,
        spend: f64,
        prompt_tokens: u64,
        completion_tokens: u64,
    ) -> std::io::Result<()> {
        self.seq += 1;
        let entry = Entry {
            seq: self.seq,
            id: id.to_string(),
            spend,
            prompt_tokens,
            completion_tokens,
        };
        let mut line = serde_json::to_vec(&entry).map_err(std::io::Error::other)?;
        line.push(b'\n');
        let file = match &mut self.file {
            Some(file) => file,
            None => {
                let mut file = open_append(&self.path)?;
                // After a crash mid-write, the torn line is ended first, so
                // that it does not swallow this one.
                let len = file.metadata()?.len();
                let mut last = [0u8];
                if len > 0 {
                    use std::os::unix::fs::FileExt;
                    file.read_exact_at(&mut last, len - 1)?;
                    if last[0] != b'\n' {
                        file.write_all(b"\n")?;
                    }
                }
                self.file.insert(file)
            }
        };
        // One write of a whole line: O_APPEND keeps lines whole.
        file.write_all(&line)
    }

    /// Starts a new file for the charges after a snapshot, unless an older
    /// rotated file is still waiting for a store to be written (then both
    /// stay, and replay skips what the store includes).
    pub fn rotate(&mut self) -> std::io::Result<()> {
        if self.old.exists() {
            return Ok(());
        }
        self.file = None;
        match std::fs::rename(&self.path, &self.old) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// The store written includes every charge of the rotated file.
    pub fn drop_rotated(&self) -> std::io::Result<()> {
        match std::fs::remove_file(&self.old) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}

fn open_append(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .mode(0o600)
        .open(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appends_replay_in_order_across_a_rotation_and_torn_lines_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("keys.json");
        let mut journal = Journal::beside(&store);
        journal.append("a", 0.5, 1, 2).unwrap();
        journal.rotate().unwrap();
        journal.append("b", 0.25, 3, 4).unwrap();
        // A crash in the middle of a write.
        let mut file = open_append(journal.path()).unwrap();
        file.write_all(br#"{"seq":3,"id":"a","sp"#).unwrap();

        let mut reopened = Journal::beside(&store);
        let entries = reopened.replay().unwrap();
        let seen: Vec<(u64, &str)> = entries.iter().map(|e| (e.seq, e.id.as_str())).collect();
        assert_eq!(seen, [(1, "a"), (2, "b")]);
        assert_eq!(reopened.seq, 2);
        // The next charge after the restart is not lost to the torn line.
        reopened.append("c", 1.0, 0, 0).unwrap();
        reopened.drop_rotated().unwrap();
        let after: Vec<u64> = Journal::beside(&store)
            .replay()
            .unwrap()
            .iter()
            .map(|e| e.seq)
            .collect();
        assert_eq!(after, [2, 3]);
    }
}
