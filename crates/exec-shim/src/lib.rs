//! The exec shim: a small server inside a container backend. The agent
//! starts it once per container start with one engine exec; from then on
//! each exec the agent sends over a unix socket (in a directory
//! bind-mounted from the host) runs as the shim's child. It so has what an
//! engine exec would have given it (the container's namespaces, cgroup,
//! user, capabilities and environment) without the engine's create, start
//! and inspect per exec, which cost ~40 ms on Docker 20.10.
//!
//! One connection per exec. The agent sends a [`protocol::Request`]; the
//! shim answers frames (a tag byte, a big-endian u32 length, the payload):
//! stdout and stderr data as it comes, then one exit frame holding the exit
//! code as a big-endian i32 (128 + the signal for a command killed by one;
//! 127 / 126 when the program cannot be found / run). The command runs in a
//! new process group, killed when the command exits (nothing it started is
//! left behind) or when the agent closes the connection before the exit
//! frame (a cancel or a timeout).
//!
//! In a VM (`--serial PORT`, a virtio-serial port) the same requests are
//! served, one connection at a time, and so are versioned messages
//! ([`protocol::Message`]): keyed execs that outlive the agent's connection
//! and attaches to them (`keyed.rs`). Each exec there is journalled on
//! stderr, the guest's console (`journal.rs`).
//!
//! std and nix only, so that it builds as a small static binary that runs in
//! any image.

use std::io::{self, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

pub mod protocol {
    use std::io::{self, Read};
    use std::time::Duration;

    pub const STDOUT: u8 = 1;
    pub const STDERR: u8 = 2;
    pub const EXIT: u8 = 3;
    /// Sent first, with no payload, by a shim on a virtio-serial port
    /// (`--serial`): the request was read and the command is being started.
    /// An agent that gets nothing in time knows no shim serves the port.
    pub const ACCEPTED: u8 = 4;
    /// Answer to an attach (serial ports only) for a key the shim does not
    /// keep; no payload.
    pub const UNKNOWN_KEY: u8 = 5;
    /// Sent by the agent mid-exec on a serial port to kill the command's
    /// group. Closing the port alone leaves a keyed exec running. A request
    /// never starts with it, so one that came late (after the exit frame)
    /// is skipped before the next request.
    pub const CANCEL: u8 = 0xCA;
    /// First bytes of a versioned message ([`Message`]). A request of the
    /// first version starts with its length, at most [`MAX_REQUEST_BYTES`],
    /// so the two never clash, and a shim of the first version refuses a
    /// versioned message as too long rather than misreading it.
    pub const MAGIC: [u8; 4] = [0xB3, b'x', b'2', 0];
    /// Largest request (command line, environment, working directory).
    pub const MAX_REQUEST_BYTES: u32 = 1 << 20;
    /// Longest exec key.
    pub const MAX_KEY_BYTES: u32 = 1024;
    const OP_KEYED: u8 = 1;
    const OP_ATTACH: u8 = 2;
    /// Largest output frame the shim sends.
    pub const MAX_FRAME_BYTES: usize = 64 << 10;
    /// Exit code of a program that cannot be found, as a shell reports it.
    pub const NOT_FOUND: i32 = 127;
    /// Exit code of a program that cannot be run.
    pub const CANNOT_RUN: i32 = 126;

    /// One exec: the command line, extra environment and working directory
    /// (empty: the shim's own, i.e. the container's).
    #[derive(Debug, Clone, Default, PartialEq, Eq)]
    pub struct Request {
        pub argv: Vec<String>,
        pub env: Vec<(String, String)>,
        pub working_dir: String,
    }

    impl Request {
        /// Length-prefixed, as [`Self::decode`] reads it.
        pub fn encode(&self) -> Vec<u8> {
            let mut body = Vec::new();
            put_list(&mut body, self.argv.iter().map(String::as_str));
            let env: Vec<String> = self.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
            put_list(&mut body, env.iter().map(String::as_str));
            put_string(&mut body, &self.working_dir);
            let mut out = (body.len() as u32).to_be_bytes().to_vec();
            out.extend(body);
            out
        }

        pub fn decode(input: &mut impl Read) -> io::Result<Self> {
            let length = read_u32(input)?;
            Self::decode_body(length, input)
        }

        /// The request after its length prefix.
        fn decode_body(length: u32, input: &mut impl Read) -> io::Result<Self> {
            if length > MAX_REQUEST_BYTES {
                return Err(invalid(format!(
                    "request of {length} bytes; at most {MAX_REQUEST_BYTES}"
                )));
            }
            let mut body = vec![0; length as usize];
            input.read_exact(&mut body)?;
            let mut body = body.as_slice();
            let argv = read_list(&mut body)?;
            if argv.is_empty() {
                return Err(invalid("the command line is empty".into()));
            }
            let env = read_list(&mut body)?
                .into_iter()
                .map(|pair| match pair.split_once('=') {
                    Some((k, v)) => Ok((k.to_string(), v.to_string())),
                    None => Err(invalid(format!("environment entry `{pair}` has no `=`"))),
                })
                .collect::<io::Result<_>>()?;
            let working_dir = read_string(&mut body)?;
            if !body.is_empty() {
                return Err(invalid(format!(
                    "{} bytes after the working directory",
                    body.len()
                )));
            }
            Ok(Self {
                argv,
                env,
                working_dir,
            })
        }
    }

    /// What the agent asks a shim: a first-version [`Request`] (as
    /// containers send it), or a versioned message ([`MAGIC`], an op byte,
    /// the op's fields) that only a shim on a serial port serves.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum Message {
        /// Runs until it exits; the connection closing kills it.
        Exec(Request),
        /// Runs until it exits, the connection closing or not: the shim
        /// keeps its exit status and a bounded tail of its output under
        /// `key` for a later [`Message::Attach`], and kills it only on a
        /// [`CANCEL`], after `timeout`, or when no agent attached for
        /// `detach_grace`. A key the shim keeps is attached, not run again.
        Keyed {
            key: String,
            request: Request,
            timeout: Option<Duration>,
            detach_grace: Duration,
        },
        /// The kept output of the exec `key`, then the rest live, then its
        /// exit; answered [`UNKNOWN_KEY`] when the shim keeps no such exec.
        Attach { key: String },
    }

    impl Message {
        pub fn encode(&self) -> Vec<u8> {
            let (op, key) = match self {
                Self::Exec(request) => return request.encode(),
                Self::Keyed { key, .. } => (OP_KEYED, key),
                Self::Attach { key } => (OP_ATTACH, key),
            };
            let mut out = MAGIC.to_vec();
            out.push(op);
            put_string(&mut out, key);
            if let Self::Keyed {
                request,
                timeout,
                detach_grace,
                ..
            } = self
            {
                // 0: none; a timeout is never zero.
                let millis = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
                out.extend(timeout.map_or(0, millis).to_be_bytes());
                out.extend(millis(*detach_grace).to_be_bytes());
                out.extend(request.encode());
            }
            out
        }

        pub fn decode(input: &mut impl Read) -> io::Result<Self> {
            let mut first = [0; 4];
            input.read_exact(&mut first)?;
            if first != MAGIC {
                return Request::decode_body(u32::from_be_bytes(first), input).map(Self::Exec);
            }
            let mut op = [0; 1];
            input.read_exact(&mut op)?;
            let length = read_u32(input)?;
            if length > MAX_KEY_BYTES {
                return Err(invalid(format!(
                    "a key of {length} bytes; at most {MAX_KEY_BYTES}"
                )));
            }
            let mut key = vec![0; length as usize];
            input.read_exact(&mut key)?;
            let key = String::from_utf8(key).map_err(|e| invalid(e.to_string()))?;
            match op[0] {
                OP_KEYED => {
                    let timeout = read_u64(input)?;
                    let detach_grace = Duration::from_millis(read_u64(input)?);
                    Ok(Self::Keyed {
                        key,
                        request: Request::decode(input)?,
                        timeout: (timeout > 0).then(|| Duration::from_millis(timeout)),
                        detach_grace,
                    })
                }
                OP_ATTACH => Ok(Self::Attach { key }),
                other => Err(invalid(format!("an unknown op {other}"))),
            }
        }
    }

    /// A frame's header: tag and payload length.
    pub fn header(tag: u8, length: usize) -> [u8; 5] {
        let [a, b, c, d] = (length as u32).to_be_bytes();
        [tag, a, b, c, d]
    }

    /// What a frame the shim sends carries.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum FrameKind {
        Stdout,
        Stderr,
        /// The exit code, a big-endian i32.
        Exit,
        /// The request was read (serial ports only); no payload.
        Accepted,
        /// The shim keeps no exec of the key asked to attach; no payload.
        UnknownKey,
    }

    /// A frame's header as the agent reads it: refused when the tag is
    /// unknown, the payload is over [`MAX_FRAME_BYTES`] or an exit frame's
    /// payload is not an i32, so the payload can be allocated and read as
    /// announced.
    pub fn parse_header(header: [u8; 5]) -> io::Result<(FrameKind, usize)> {
        let [tag, length @ ..] = header;
        let length = u32::from_be_bytes(length) as usize;
        let kind = match tag {
            STDOUT => FrameKind::Stdout,
            STDERR => FrameKind::Stderr,
            EXIT => FrameKind::Exit,
            ACCEPTED => FrameKind::Accepted,
            UNKNOWN_KEY => FrameKind::UnknownKey,
            other => return Err(invalid(format!("an unknown frame tag {other}"))),
        };
        if length > MAX_FRAME_BYTES {
            return Err(invalid(format!(
                "a frame of {length} bytes; at most {MAX_FRAME_BYTES}"
            )));
        }
        if kind == FrameKind::Exit && length != 4 {
            return Err(invalid(format!(
                "an exit frame of {length} bytes; it holds an i32"
            )));
        }
        if matches!(kind, FrameKind::Accepted | FrameKind::UnknownKey) && length != 0 {
            return Err(invalid(format!(
                "a {kind:?} frame of {length} bytes; it holds nothing"
            )));
        }
        Ok((kind, length))
    }

    fn put_string(out: &mut Vec<u8>, text: &str) {
        out.extend((text.len() as u32).to_be_bytes());
        out.extend(text.as_bytes());
    }

    fn put_list<'a>(out: &mut Vec<u8>, items: impl ExactSizeIterator<Item = &'a str>) {
        out.extend((items.len() as u32).to_be_bytes());
        for item in items {
            put_string(out, item);
        }
    }

    fn read_u32(input: &mut impl Read) -> io::Result<u32> {
        let mut bytes = [0; 4];
        input.read_exact(&mut bytes)?;
        Ok(u32::from_be_bytes(bytes))
    }

    fn read_u64(input: &mut impl Read) -> io::Result<u64> {
        let mut bytes = [0; 8];
        input.read_exact(&mut bytes)?;
        Ok(u64::from_be_bytes(bytes))
    }

    fn read_string(input: &mut &[u8]) -> io::Result<String> {
        let length = read_u32(input)? as usize;
        if length > input.len() {
            return Err(invalid(format!(
                "a string of {length} bytes in {} left",
                input.len()
            )));
        }
        let (text, rest) = input.split_at(length);
        *input = rest;
        String::from_utf8(text.to_vec()).map_err(|e| invalid(e.to_string()))
    }

    fn read_list(input: &mut &[u8]) -> io::Result<Vec<String>> {
        let count = read_u32(input)?;
        // Each item takes at least its 4-byte length.
        if count as usize > input.len() / 4 {
            return Err(invalid(format!("a list of {count} items is too long")));
        }
        (0..count).map(|_| read_string(input)).collect()
    }

    fn invalid(reason: String) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidData, reason)
    }
}

mod journal;
mod keyed;

use journal::Journal;
use protocol::{ACCEPTED, EXIT, Message, Request, STDERR, STDOUT};

const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a shim on a serial port looks again for an agent while none is
/// connected (the port reads end of file until the host side opens).
const SERIAL_IDLE_POLL: Duration = Duration::from_millis(20);

pub fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let (what, served) = match args.as_slice() {
        [_, flag, port] if flag == "--serial" => (port, serve_serial(Path::new(port))),
        [_, socket] if !socket.starts_with('-') => (socket, serve(Path::new(socket))),
        _ => {
            eprintln!("usage: berth-exec-shim SOCKET | berth-exec-shim --serial PORT");
            return ExitCode::from(2);
        }
    };
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("berth-exec-shim: {what}: {error}");
            ExitCode::FAILURE
        }
    }
}

pub fn serve(socket: &Path) -> io::Result<()> {
    let _ = std::fs::remove_file(socket);
    let listener = UnixListener::bind(socket)?;
    for connection in listener.incoming() {
        let Ok(connection) = connection else { continue };
        std::thread::spawn(move || {
            if let Err(error) = run(connection) {
                eprintln!("berth-exec-shim: exec: {error}");
            }
        });
    }
    Ok(())
}

/// Serves execs over a virtio-serial port inside a VM (e.g. /dev/vport1p1),
/// whose host side is a unix socket the agent connects to, once per exec:
/// the same frames as on a socket, after an [`ACCEPTED`] frame. One
/// connection at a time (the host side takes one at a time). A first-version
/// request is killed when the agent disconnects before its exit frame, as on
/// a socket; a keyed one ([`Message::Keyed`]) runs on, and the next
/// connection may attach to it (`keyed.rs`). Each exec's start and end go
/// to stderr, the guest's console in a VM image (`journal.rs`).
pub fn serve_serial(port: &Path) -> io::Result<()> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(port)?;
    let journal = Journal::spawn();
    let mut kept = keyed::Kept::default();
    // A request's first byte the last exec's watcher read.
    let mut begun = None;
    loop {
        // Nobody connected: reads end at once. Wait for a request's first byte.
        let mut first = [0; 1];
        let read = match begun.take() {
            Some(byte) => {
                first[0] = byte;
                Ok(1)
            }
            None => (&file).read(&mut first),
        };
        match read {
            Ok(0) => {
                std::thread::sleep(SERIAL_IDLE_POLL);
                continue;
            }
            // A cancel that crossed its exec's exit frame: nothing to kill.
            Ok(_) if first[0] == protocol::CANCEL => continue,
            Ok(_) => {}
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            Err(error) => return Err(error),
        }
        let mut rest = Patient {
            file: &file,
            deadline: std::time::Instant::now() + REQUEST_TIMEOUT,
        };
        let message = match Message::decode(&mut first.as_slice().chain(&mut rest)) {
            Ok(message) => message,
            Err(error) => {
                eprintln!(
                    "berth-exec-shim: {}: a bad request: {error}",
                    port.display()
                );
                drain_until_closed(&file);
                continue;
            }
        };
        // Each ends once its connection did (after the exit frame, when the
        // agent disconnects), and the next request is read after that.
        let served = match message {
            Message::Exec(request) => execute(file.try_clone()?, request, Some(&journal))
                .map(|watcher| watcher.join().unwrap_or(Watched::HungUp)),
            Message::Keyed {
                key,
                request,
                timeout,
                detach_grace,
            } => {
                let exec = kept.run(key, request, timeout, detach_grace, &journal);
                keyed::serve(&file, &exec)
            }
            Message::Attach { key } => match kept.find(&key) {
                Some(exec) => keyed::serve(&file, &exec),
                None => send_to(&file, protocol::UNKNOWN_KEY, &[]).map(|()| Watched::Finished),
            },
        };
        match served {
            Ok(Watched::Begun(byte)) => begun = Some(byte),
            Ok(_) => {}
            Err(error) => {
                eprintln!("berth-exec-shim: exec: {error}");
                drain_until_closed(&file);
            }
        }
    }
}

/// A serial port read that waits out the moment a new connection's data is
/// there before its open message (reads end of file meanwhile), up to a
/// deadline.
struct Patient<'a> {
    file: &'a std::fs::File,
    deadline: std::time::Instant,
}

impl Read for Patient<'_> {
    fn read(&mut self, buffer: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.file.read(buffer) {
                Ok(0) if std::time::Instant::now() < self.deadline && !buffer.is_empty() => {
                    std::thread::sleep(Duration::from_millis(2));
                }
                other => return other,
            }
        }
    }
}

/// Reads and drops what the host sends until it disconnects.
fn drain_until_closed(mut file: &std::fs::File) {
    let mut buffer = [0; 4096];
    while let Ok(n) = file.read(&mut buffer) {
        if n == 0 {
            return;
        }
    }
}

/// How the agent's side of an exec's connection ended, as
/// [`Duplex::watch`] saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Watched {
    /// After the command finished: it went away or sent the next request.
    Finished,
    /// It went away before the command finished.
    HungUp,
    /// It sent something before the command finished: a cancel.
    Cancelled,
    /// The next connection's request began (its first byte, read here):
    /// this one went away, whether its hang-up showed yet or not (serial
    /// ports only).
    Begun(u8),
}

/// A two-way byte stream an exec runs over: a unix socket or a serial port.
trait Duplex: Read + Write + Send + Sized + 'static {
    fn duplicate(&self) -> io::Result<Self>;
    /// Blocks until the agent goes away or sends something.
    fn watch(&mut self, finished: &AtomicBool) -> Watched;
}

impl Duplex for UnixStream {
    fn duplicate(&self) -> io::Result<Self> {
        self.try_clone()
    }

    fn watch(&mut self, finished: &AtomicBool) -> Watched {
        let mut byte = [0; 1];
        let read = self.read(&mut byte);
        if finished.load(Ordering::SeqCst) {
            Watched::Finished
        } else if matches!(read, Ok(1)) {
            Watched::Cancelled
        } else {
            Watched::HungUp
        }
    }
}

impl Duplex for std::fs::File {
    fn duplicate(&self) -> io::Result<Self> {
        self.try_clone()
    }

    /// On a virtio-serial port, the host side closing shows as POLLHUP
    /// (with POLLIN: a read then ends at once). Bytes that come after the
    /// exit frame are the next request, left for the next read (as is a
    /// late [`protocol::CANCEL`], which the next read skips). Before it, a
    /// byte is read: a cancel, or, after a hang-up, the next connection's
    /// first byte. The port's open and close messages travel apart from its
    /// data, so a cancel may come with the hang-up, and a hang-up seen
    /// before the command finished counts only when it lasts (a new
    /// connection's data can come before its open message).
    fn watch(&mut self, finished: &AtomicBool) -> Watched {
        use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
        use std::os::fd::AsFd;
        let ended = |before: Watched| match before {
            // Read: it must reach the next request's decoding.
            Watched::Begun(_) => before,
            _ if finished.load(Ordering::SeqCst) => Watched::Finished,
            _ => before,
        };
        let mut hang_ups = 0;
        loop {
            let mut fds = [PollFd::new(self.as_fd(), PollFlags::POLLIN)];
            let timeout = if hang_ups > 0 {
                PollTimeout::from(10u16)
            } else {
                PollTimeout::NONE
            };
            match poll(&mut fds, timeout) {
                Ok(0) => continue, // the pause after a hang-up
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => continue,
                Err(_) => return ended(Watched::HungUp),
            }
            let events = fds[0].revents().unwrap_or(PollFlags::empty());
            let done = finished.load(Ordering::SeqCst);
            let hung_up = events.contains(PollFlags::POLLHUP);
            if events.contains(PollFlags::POLLIN) {
                if done {
                    // The hang-up, or the next request (its hang-up and the
                    // next open can both have passed unseen).
                    return Watched::Finished;
                }
                let mut byte = [0; 1];
                match self.read(&mut byte) {
                    Ok(1) if byte[0] == protocol::CANCEL => return ended(Watched::Cancelled),
                    // A request: this exec's agent went away (its hang-up
                    // may show later), e.g. one that gave up waiting for a
                    // guest still booting, whose request was read late.
                    Ok(1) => return ended(Watched::Begun(byte[0])),
                    _ => {}
                }
            }
            if hung_up {
                hang_ups += 1;
                if done || hang_ups >= 3 {
                    return ended(Watched::HungUp);
                }
                std::thread::sleep(Duration::from_millis(10));
            } else {
                hang_ups = 0;
            }
        }
    }
}

type Writer<S> = Arc<Mutex<S>>;

fn send<S: Write>(writer: &Writer<S>, tag: u8, payload: &[u8]) -> io::Result<()> {
    let mut stream = writer.lock().unwrap_or_else(PoisonError::into_inner);
    send_to(&mut *stream, tag, payload)
}

/// Largest payload the shim puts in a frame. A frame goes in one write,
/// which a virtio-serial port takes whole (its guest driver takes up to 32
/// KiB a write, else blocks while the host side is closed): a frame never
/// starts on one connection and ends on the next.
const MAX_PAYLOAD: usize = (32 << 10) - 5;

fn send_to(mut stream: impl Write, tag: u8, payload: &[u8]) -> io::Result<()> {
    let mut frame = Vec::with_capacity(5 + payload.len());
    frame.extend(protocol::header(tag, payload.len()));
    frame.extend(payload);
    stream.write_all(&frame)?;
    stream.flush()
}

fn run(connection: UnixStream) -> io::Result<()> {
    connection.set_read_timeout(Some(REQUEST_TIMEOUT))?;
    let request = Request::decode(&mut &connection)?;
    connection.set_read_timeout(None)?;
    execute(connection, request, None).map(drop)
}

/// The command of `request`, in a process group of its own, its output
/// piped; or, when it cannot be started, its exit code (127: not found,
/// 126: cannot run) and why, for stderr.
fn spawn(request: &Request) -> Result<(std::process::Child, Pid), (i32, String)> {
    let program = &request.argv[0];
    let mut command = Command::new(program);
    command
        .args(&request.argv[1..])
        .envs(request.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    if !request.working_dir.is_empty() {
        command.current_dir(&request.working_dir);
    }
    match command.spawn() {
        Ok(child) => {
            let group = Pid::from_raw(i32::try_from(child.id()).unwrap_or(i32::MAX));
            Ok((child, group))
        }
        Err(error) => {
            let code = if error.kind() == io::ErrorKind::NotFound {
                protocol::NOT_FOUND
            } else {
                protocol::CANNOT_RUN
            };
            Err((code, format!("berth-exec-shim: {program}: {error}\n")))
        }
    }
}

/// The exit code of a finished command: 128 + the signal that killed it.
fn exit_code(status: std::process::ExitStatus) -> i32 {
    status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
}

/// Runs one request over `connection` and sends its frames. Returns the
/// thread watching the connection: it kills the command's process group
/// when the connection closes (or the agent sends anything) before the
/// command ended, and itself ends when the connection closes, saying how. On a serial
/// port (`serial`, its journal) an [`ACCEPTED`] frame goes first, and the
/// exec is journalled.
fn execute<S: Duplex>(
    connection: S,
    request: Request,
    serial: Option<&Journal>,
) -> io::Result<JoinHandle<Watched>> {
    let writer: Writer<S> = Arc::new(Mutex::new(connection.duplicate()?));
    if serial.is_some() {
        send(&writer, ACCEPTED, &[])?;
    }
    let started = std::time::Instant::now();
    if let Some(journal) = serial {
        journal.started(None, &request.argv);
    }
    let mut closed = connection;
    let (mut child, group) = match spawn(&request) {
        Ok(spawned) => spawned,
        Err((code, why)) => {
            if let Some(journal) = serial {
                journal.ended(None, code, started.elapsed());
            }
            send(&writer, STDERR, why.as_bytes())?;
            send(&writer, EXIT, &code.to_be_bytes())?;
            return Ok(std::thread::spawn(move || {
                closed.watch(&AtomicBool::new(true))
            }));
        }
    };
    let finished = Arc::new(AtomicBool::new(false));
    // Set when the agent went away first: nothing more is sent (on a serial
    // port, bytes sent then would reach the agent's next connection).
    let cancelled = Arc::new(AtomicBool::new(false));
    let watched = Arc::clone(&finished);
    let gone = Arc::clone(&cancelled);
    let watcher = std::thread::spawn(move || {
        let watched = closed.watch(&watched);
        if watched != Watched::Finished {
            gone.store(true, Ordering::SeqCst);
            let _ = killpg(group, Signal::SIGKILL);
        }
        watched
    });
    let pumps = [
        child
            .stdout
            .take()
            .map(|out| pump(out, STDOUT, &writer, &cancelled)),
        child
            .stderr
            .take()
            .map(|err| pump(err, STDERR, &writer, &cancelled)),
    ];
    let status = child.wait()?;
    let _ = killpg(group, Signal::SIGKILL);
    for pump in pumps.into_iter().flatten() {
        let _ = pump.join();
    }
    finished.store(true, Ordering::SeqCst);
    let code = exit_code(status);
    if let Some(journal) = serial {
        journal.ended(None, code, started.elapsed());
    }
    if !cancelled.load(Ordering::SeqCst) {
        send(&writer, EXIT, &code.to_be_bytes())?;
    }
    Ok(watcher)
}

fn pump<S: Write + Send + 'static>(
    mut pipe: impl Read + Send + 'static,
    tag: u8,
    writer: &Writer<S>,
    cancelled: &Arc<AtomicBool>,
) -> JoinHandle<()> {
    let writer = Arc::clone(writer);
    let cancelled = Arc::clone(cancelled);
    std::thread::spawn(move || {
        let mut buffer = vec![0; MAX_PAYLOAD];
        loop {
            match pipe.read(&mut buffer) {
                Ok(0) | Err(_) => return,
                // Drained but not sent once the agent went away.
                Ok(_) if cancelled.load(Ordering::SeqCst) => {}
                Ok(n) => {
                    if send(&writer, tag, &buffer[..n]).is_err() {
                        return;
                    }
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use protocol::{FrameKind, MAX_FRAME_BYTES};

    use super::*;

    #[test]
    fn requests_round_trip_and_bad_ones_are_refused() {
        let request = Request {
            argv: vec!["sh".into(), "-c".into(), "echo é".into()],
            env: vec![("A".into(), "1=2".into())],
            working_dir: "/tmp".into(),
        };
        let bytes = request.encode();
        assert_eq!(Request::decode(&mut bytes.as_slice()).unwrap(), request);
        let empty = Request::default().encode();
        assert!(Request::decode(&mut empty.as_slice()).is_err());
        let huge = (protocol::MAX_REQUEST_BYTES + 1).to_be_bytes();
        let error = Request::decode(&mut huge.as_slice()).unwrap_err();
        assert!(error.to_string().contains("at most"), "{error}");
        // A list claiming more items than its bytes can hold.
        let mut lying = 8u32.to_be_bytes().to_vec();
        lying.extend(u32::MAX.to_be_bytes());
        lying.extend([0; 4]);
        assert!(Request::decode(&mut lying.as_slice()).is_err());
        // Bytes the request's fields do not account for.
        let mut padded = bytes[4..].to_vec();
        padded.push(0);
        let mut framed = (padded.len() as u32).to_be_bytes().to_vec();
        framed.extend(padded);
        let error = Request::decode(&mut framed.as_slice()).unwrap_err();
        assert!(error.to_string().contains("1 bytes after"), "{error}");
    }

    #[test]
    fn versioned_messages_round_trip_beside_first_version_requests() {
        let request = Request {
            argv: vec!["sh".into(), "-c".into(), "sleep 5".into()],
            env: vec![],
            working_dir: String::new(),
        };
        for message in [
            Message::Exec(request.clone()),
            Message::Keyed {
                key: "camp/run 1".into(),
                request: request.clone(),
                timeout: Some(Duration::from_millis(1500)),
                detach_grace: Duration::from_secs(600),
            },
            Message::Keyed {
                key: String::new(),
                request: request.clone(),
                timeout: None,
                detach_grace: Duration::ZERO,
            },
            Message::Attach { key: "k".into() },
        ] {
            let bytes = message.encode();
            assert_eq!(Message::decode(&mut bytes.as_slice()).unwrap(), message);
        }
        // What a container's agent sends is a first-version request.
        let bytes = request.encode();
        assert_eq!(
            Message::decode(&mut bytes.as_slice()).unwrap(),
            Message::Exec(request)
        );
        // A shim of the first version refuses a versioned message.
        let keyed = Message::Attach { key: "k".into() }.encode();
        let error = Request::decode(&mut keyed.as_slice()).unwrap_err();
        assert!(error.to_string().contains("at most"), "{error}");
        assert_ne!(protocol::MAGIC[0], protocol::CANCEL);
        assert!(u32::from_be_bytes(protocol::MAGIC) > protocol::MAX_REQUEST_BYTES);
        let mut long_key = protocol::MAGIC.to_vec();
        long_key.push(2);
        long_key.extend((protocol::MAX_KEY_BYTES + 1).to_be_bytes());
        assert!(Message::decode(&mut long_key.as_slice()).is_err());
    }

    #[test]
    fn frame_headers_the_shim_would_not_send_are_refused() {
        let header = protocol::header(STDOUT, MAX_FRAME_BYTES);
        assert_eq!(
            protocol::parse_header(header).unwrap(),
            (FrameKind::Stdout, MAX_FRAME_BYTES)
        );
        assert_eq!(
            protocol::parse_header(protocol::header(EXIT, 4)).unwrap(),
            (FrameKind::Exit, 4)
        );
        for (header, why) in [
            (protocol::header(STDERR, MAX_FRAME_BYTES + 1), "at most"),
            (protocol::header(STDOUT, u32::MAX as usize), "at most"),
            (protocol::header(EXIT, 0), "holds an i32"),
            (protocol::header(9, 1), "unknown frame tag 9"),
        ] {
            let error = protocol::parse_header(header).unwrap_err().to_string();
            assert!(error.contains(why), "{error}");
        }
    }

    /// Reads frames to the exit frame: (stdout, stderr, exit code).
    fn outcome(mut stream: UnixStream) -> (String, String, i32) {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        loop {
            let mut header = [0; 5];
            stream.read_exact(&mut header).unwrap();
            let (kind, length) = protocol::parse_header(header).unwrap();
            let mut payload = vec![0; length];
            stream.read_exact(&mut payload).unwrap();
            match kind {
                FrameKind::Stdout => out.extend(payload),
                FrameKind::Stderr => err.extend(payload),
                FrameKind::Accepted | FrameKind::UnknownKey => {
                    panic!("a socket shim sends no {kind:?} frame")
                }
                FrameKind::Exit => {
                    let code = i32::from_be_bytes(payload.try_into().unwrap());
                    return (
                        String::from_utf8(out).unwrap(),
                        String::from_utf8(err).unwrap(),
                        code,
                    );
                }
            }
        }
    }

    fn exec(socket: &Path, argv: &[&str], env: &[(&str, &str)], dir: &str) -> UnixStream {
        let mut stream = UnixStream::connect(socket).unwrap();
        let request = Request {
            argv: argv.iter().map(|a| a.to_string()).collect(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            working_dir: dir.into(),
        };
        stream.write_all(&request.encode()).unwrap();
        stream
    }

    #[test]
    fn a_connection_that_stalls_before_its_request_is_closed() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("exec.sock");
        let serving = socket.clone();
        std::thread::spawn(move || serve(&serving));
        let mut stream = loop {
            match UnixStream::connect(&socket) {
                Ok(stream) => break stream,
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        };
        // Half a length prefix, then nothing.
        stream.write_all(&[0, 0]).unwrap();
        let started = Instant::now();
        let mut byte = [0; 1];
        assert_eq!(stream.read(&mut byte).unwrap(), 0, "the shim answered");
        let waited = started.elapsed();
        assert!(
            waited >= REQUEST_TIMEOUT - Duration::from_millis(100)
                && waited < REQUEST_TIMEOUT + Duration::from_secs(5),
            "closed after {waited:?}"
        );
    }

    #[test]
    fn runs_commands_and_kills_what_they_leave_or_what_is_cancelled() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("exec.sock");
        let serving = socket.clone();
        std::thread::spawn(move || serve(&serving));
        while UnixStream::connect(&socket).is_err() {
            std::thread::sleep(Duration::from_millis(10));
        }
        let script = "echo out; echo err >&2; echo \"$GREETING\"; pwd; exit 3";
        let (out, err, code) = outcome(exec(
            &socket,
            &["sh", "-c", script],
            &[("GREETING", "hi")],
            "/usr",
        ));
        assert_eq!(
            (out.as_str(), err.as_str(), code),
            ("out\nhi\n/usr\n", "err\n", 3)
        );

        let (_, err, code) = outcome(exec(&socket, &["no-such-program-berth"], &[], ""));
        assert_eq!(code, protocol::NOT_FOUND, "{err}");
        assert!(err.contains("no-such-program-berth"), "{err}");

        let (_, _, code) = outcome(exec(&socket, &["sh", "-c", "kill -TERM $$"], &[], ""));
        assert_eq!(code, 128 + 15);

        // A background child holding the output open ends with its command.
        let started = Instant::now();
        let (out, _, code) = outcome(exec(&socket, &["sh", "-c", "sleep 30 & echo bg"], &[], ""));
        assert_eq!((out.as_str(), code), ("bg\n", 0));
        assert!(started.elapsed() < Duration::from_secs(10));

        // Closing the connection kills the command and its children.
        let marker = dir.path().join("survived");
        let command = format!("(sleep 1; touch {}) & sleep 1", marker.display());
        drop(exec(&socket, &["sh", "-c", &command], &[], ""));
        std::thread::sleep(Duration::from_millis(1500));
        assert!(!marker.exists(), "the cancelled exec's child ran on");
    }
}
