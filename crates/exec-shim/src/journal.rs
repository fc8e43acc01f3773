//! The journal of execs a shim on a serial port ran: one line when each
//! starts (its key, its command line) and one when it ends (its exit code,
//! how long it ran), on stderr. In a VM image stderr is the guest's serial
//! console, which the agent serves as the VM's Logs, so the journal needs
//! no channel of its own and outlives both the agent and the shim.
//!
//! A thread writes the lines (a serial console can take milliseconds per
//! line under emulation, which no exec should wait for) from a bounded
//! queue; lines that find it full are counted and the count written with
//! the next line that fits.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError, sync_channel};
use std::time::Duration;

/// Lines waiting for the console.
const QUEUE: usize = 64;
/// Longest command line written (in characters); the rest is cut.
const MAX_COMMAND_CHARS: usize = 200;

#[derive(Clone)]
pub(crate) struct Journal {
    lines: SyncSender<String>,
    dropped: Arc<AtomicU64>,
}

impl Journal {
    pub(crate) fn spawn() -> Self {
        let (lines, queue) = sync_channel::<String>(QUEUE);
        std::thread::spawn(move || {
            for line in queue {
                eprintln!("{line}");
            }
        });
        Self {
            lines,
            dropped: Arc::default(),
        }
    }

    /// `key`: None for an exec without one.
    pub(crate) fn started(&self, key: Option<&str>, argv: &[String]) {
        let mut command = argv.join(" ");
        if let Some((cut, _)) = command.char_indices().nth(MAX_COMMAND_CHARS) {
            command.truncate(cut);
            command.push('…');
        }
        self.write(format!(
            "berth-exec: started key={} command={command:?}",
            shown(key)
        ));
    }

    pub(crate) fn ended(&self, key: Option<&str>, code: i32, ran: Duration) {
        self.write(format!(
            "berth-exec: ended key={} exit={code} after {:.3} s",
            shown(key),
            ran.as_secs_f64()
        ));
    }

    fn write(&self, mut line: String) {
        let dropped = self.dropped.swap(0, Ordering::SeqCst);
        if dropped > 0 {
            line.push_str(&format!(" ({dropped} journal lines dropped before)"));
        }
        match self.lines.try_send(line) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.dropped.fetch_add(dropped + 1, Ordering::SeqCst);
            }
        }
    }
}

/// A key as written: quoted (it may hold spaces), `-` for none.
fn shown(key: Option<&str>) -> String {
    key.map_or_else(|| "-".to_string(), |key| format!("{key:?}"))
}
