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

    pub const STDOUT: u8 = 1;
    pub const STDERR: u8 = 2;
    pub const EXIT: u8 = 3;
    /// Largest request (command line, environment, working directory).
    pub const MAX_REQUEST_BYTES: u32 = 1 << 20;
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

use protocol::{EXIT, MAX_FRAME_BYTES, Request, STDERR, STDOUT};

/// How long a connection may take to send its request (the agent sends it
/// at once): one that stalls must not hold a thread of the shim forever.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// `berth-exec-shim SOCKET`: serves until killed (with its container).
pub fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let [_, socket] = args.as_slice() else {
        eprintln!("usage: berth-exec-shim SOCKET");
        return ExitCode::from(2);
    };
    match serve(Path::new(socket)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("berth-exec-shim: {socket}: {error}");
            ExitCode::FAILURE
        }
    }
}

/// Listens on `socket` (replacing a stale one) and runs each connection's
/// exec on a thread of its own. The agent bounds how many run at once.
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

type Writer = Arc<Mutex<UnixStream>>;

fn send(writer: &Writer, tag: u8, payload: &[u8]) -> io::Result<()> {
    let mut stream = writer.lock().unwrap_or_else(PoisonError::into_inner);
    stream.write_all(&protocol::header(tag, payload.len()))?;
    stream.write_all(payload)
}

fn run(connection: UnixStream) -> io::Result<()> {
    connection.set_read_timeout(Some(REQUEST_TIMEOUT))?;
    let request = Request::decode(&mut &connection)?;
    // From here a read waits for the agent to hang up, however long the
    // command runs.
    connection.set_read_timeout(None)?;
    let writer: Writer = Arc::new(Mutex::new(connection.try_clone()?));
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
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(error) => {
            let code = if error.kind() == io::ErrorKind::NotFound {
                protocol::NOT_FOUND
            } else {
                protocol::CANNOT_RUN
            };
            send(
                &writer,
                STDERR,
                format!("berth-exec-shim: {program}: {error}\n").as_bytes(),
            )?;
            return send(&writer, EXIT, &code.to_be_bytes());
        }
    };
    let group = Pid::from_raw(i32::try_from(child.id()).unwrap_or(i32::MAX));
    let finished = Arc::new(AtomicBool::new(false));
    // The agent closing the connection before the exit frame is a cancel.
    let mut closed = connection.try_clone()?;
    let watched = Arc::clone(&finished);
    std::thread::spawn(move || {
        let mut byte = [0; 1];
        let _ = closed.read(&mut byte);
        if !watched.load(Ordering::SeqCst) {
            let _ = killpg(group, Signal::SIGKILL);
        }
    });
    let pumps = [
        child.stdout.take().map(|out| pump(out, STDOUT, &writer)),
        child.stderr.take().map(|err| pump(err, STDERR, &writer)),
    ];
    let status = child.wait()?;
    // Nothing the command started outlives it (and holds its pipes open).
    let _ = killpg(group, Signal::SIGKILL);
    for pump in pumps.into_iter().flatten() {
        let _ = pump.join();
    }
    finished.store(true, Ordering::SeqCst);
    let code = status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0));
    send(&writer, EXIT, &code.to_be_bytes())
}

/// Forwards one output pipe as frames until it closes.
fn pump(mut pipe: impl Read + Send + 'static, tag: u8, writer: &Writer) -> JoinHandle<()> {
    let writer = Arc::clone(writer);
    std::thread::spawn(move || {
        let mut buffer = vec![0; MAX_FRAME_BYTES];
        loop {
            match pipe.read(&mut buffer) {
                Ok(0) | Err(_) => return,
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

    use protocol::FrameKind;

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
