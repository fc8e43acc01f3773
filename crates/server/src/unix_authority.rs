//! Any `:authority` on a unix socket.
//!
//! A client that reaches a gRPC server over a unix socket has no host name
//! to put in the HTTP/2 `:authority`, and many send the socket's path:
//! grpcurl up to 1.8.9 (`grpcurl -plaintext -unix /run/x.sock …`, the one
//! PyPI ships), grpc-java, grpc-go before it chose `localhost`; grpcio from
//! 1.57 sends the path %-encoded. A path is not a URI authority, and h2
//! (under hyper and tonic) resets every such stream with `PROTOCOL_ERROR`
//! ("malformed headers: malformed authority") before tonic sees the request.
//! h2 has no setting to relax it (hyperium/h2#487 is still open).
//!
//! [`AnyAuthority`] sits between an accepted unix socket and the server. It
//! reads the client's HTTP/2 frames and decodes the connection's first
//! header block:
//! - when its `:authority` is one h2 accepts (berth's own clients send
//!   `localhost`), the connection passes through untouched, byte for byte,
//!   from then on;
//! - otherwise every header block of that connection is decoded and sent on
//!   re-encoded without HPACK indexing, with each authority h2 would refuse
//!   replaced by `localhost` (the convention of grpc-go, kubernetes and h2's
//!   own client for unix sockets). Every other frame passes unchanged.
//!
//! The server's replies are not touched. A unix socket's client is already
//! authenticated by the socket file's mode; the authority means nothing here.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The HTTP/2 client connection preface.
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADER: usize = 9;
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// The largest frame every HTTP/2 peer accepts (SETTINGS_MAX_FRAME_SIZE's
/// initial value): re-encoded blocks are cut to it.
const MAX_FRAME: usize = 16_384;
/// The encoded header block a connection may send (its frames together).
const MAX_BLOCK: usize = 256 * 1024;
/// The decoded header list, counted as HPACK does (name + value + 32 each);
/// hyper's server refuses lists over 16 KiB itself.
const MAX_LIST: usize = 256 * 1024;
/// The dynamic table size the server advertises (h2's default: it sends no
/// SETTINGS_HEADER_TABLE_SIZE), so the most a client may ask for.
const HEADER_TABLE: usize = 4096;
/// What an authority h2 refuses becomes.
pub const UNIX_AUTHORITY: &str = "localhost";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Up to the end of the first header block.
    Inspect,
    /// The first block had an authority h2 refuses: every block re-encoded.
    Rewrite,
    /// Everything passes unchanged.
    PassThrough,
}

/// A header block being gathered from a HEADERS frame and its CONTINUATIONs.
struct Block {
    stream: u32,
    /// END_STREAM and PRIORITY of the HEADERS frame.
    flags: u8,
    priority: Option<[u8; 5]>,
    fragment: Vec<u8>,
    /// The frames as received, for a connection that passes through.
    raw: Vec<u8>,
}

/// An accepted unix socket whose HTTP/2 requests reach the server with an
/// authority it accepts (see the module's documentation).
pub struct AnyAuthority<S> {
    inner: S,
    mode: Mode,
    /// Preface bytes still to come.
    preface_left: usize,
    /// Payload bytes of a non-header frame still to pass on.
    forward_left: usize,
    /// Bytes read from the client, not yet processed.
    input: Vec<u8>,
    /// Processed bytes for the server, from `output_at` on.
    output: Vec<u8>,
    output_at: usize,
    block: Option<Block>,
    decoder: loona_hpack::Decoder<'static>,
    eof: bool,
}

impl<S> AnyAuthority<S> {
    pub fn new(inner: S) -> Self {
        let mut decoder = loona_hpack::Decoder::new();
        decoder.set_max_allowed_table_size(HEADER_TABLE);
        Self {
            inner,
            mode: Mode::Inspect,
            preface_left: PREFACE.len(),
            forward_left: 0,
            input: Vec::new(),
            output: Vec::new(),
            output_at: 0,
            block: None,
            decoder,
            eof: false,
        }
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Moves what can be decided of `input` to `output`.
    fn process(&mut self) -> io::Result<()> {
        let input = std::mem::take(&mut self.input);
        let mut at = 0;
        let result = loop {
            let rest = &input[at..];
            if rest.is_empty() {
                break Ok(());
            }
            if self.mode == Mode::PassThrough {
                self.output.extend_from_slice(rest);
                at = input.len();
                break Ok(());
            }
            if self.preface_left > 0 {
                // Whole, so that a client speaking something else is left to
                // the server to refuse, unchanged.
                if rest.len() < PREFACE.len() {
                    if !PREFACE.starts_with(rest) {
                        self.mode = Mode::PassThrough;
                    }
                    break Ok(());
                }
                if &rest[..PREFACE.len()] != PREFACE {
                    self.mode = Mode::PassThrough;
                    continue;
                }
                self.output.extend_from_slice(&rest[..PREFACE.len()]);
                at += PREFACE.len();
                self.preface_left = 0;
                continue;
            }
            if self.forward_left > 0 {
                let n = self.forward_left.min(rest.len());
                self.output.extend_from_slice(&rest[..n]);
                at += n;
                self.forward_left -= n;
                continue;
            }
            if rest.len() < FRAME_HEADER {
                break Ok(());
            }
            let length = u32::from_be_bytes([0, rest[0], rest[1], rest[2]]) as usize;
            let kind = rest[3];
            if kind != HEADERS && kind != CONTINUATION {
                if self.block.is_some() {
                    break Err(invalid(
                        "a frame other than CONTINUATION inside a header block",
                    ));
                }
                self.output.extend_from_slice(&rest[..FRAME_HEADER]);
                at += FRAME_HEADER;
                self.forward_left = length;
                continue;
            }
            if length > MAX_BLOCK {
                break Err(invalid("a header frame larger than 256 KiB"));
            }
            if rest.len() < FRAME_HEADER + length {
                break Ok(());
            }
            let frame = &rest[..FRAME_HEADER + length];
            at += frame.len();
            if let Err(error) = self.header_frame(frame) {
                break Err(error);
            }
        };
        self.input = input;
        self.input.drain(..at);
        result
    }

    /// A HEADERS or CONTINUATION frame, whole.
    fn header_frame(&mut self, frame: &[u8]) -> io::Result<()> {
        let kind = frame[3];
        let flags = frame[4];
        let stream = u32::from_be_bytes([frame[5], frame[6], frame[7], frame[8]]) & 0x7fff_ffff;
        let payload = &frame[FRAME_HEADER..];
        if kind == HEADERS {
            if self.block.is_some() {
                return Err(invalid("HEADERS inside a header block"));
            }
            let mut body = payload;
            let mut padding = 0;
            if flags & PADDED != 0 {
                let (&pad, after) = body
                    .split_first()
                    .ok_or_else(|| invalid("a padded HEADERS frame without its pad length"))?;
                padding = pad as usize;
                body = after;
            }
            let priority = if flags & PRIORITY != 0 {
                let (fields, after) = body
                    .split_first_chunk::<5>()
                    .ok_or_else(|| invalid("a HEADERS frame too short for its priority"))?;
                body = after;
                Some(*fields)
            } else {
                None
            };
            if padding > body.len() {
                return Err(invalid("HEADERS padding longer than the frame"));
            }
            self.block = Some(Block {
                stream,
                flags: flags & (END_STREAM | PRIORITY),
                priority,
                fragment: body[..body.len() - padding].to_vec(),
                raw: frame.to_vec(),
            });
        } else {
            let block = self
                .block
                .as_mut()
                .filter(|block| block.stream == stream)
                .ok_or_else(|| invalid("CONTINUATION outside its stream's header block"))?;
            if block.fragment.len() + payload.len() > MAX_BLOCK {
                return Err(invalid("a header block larger than 256 KiB"));
            }
            block.fragment.extend_from_slice(payload);
            block.raw.extend_from_slice(frame);
        }
        if flags & END_HEADERS != 0
            && let Some(block) = self.block.take()
        {
            self.finish(block)?;
        }
        Ok(())
    }

    /// A whole header block: passed on as it came or re-encoded.
    fn finish(&mut self, block: Block) -> io::Result<()> {
        let mut fields: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        let mut size = 0;
        let decoded = self.decoder.decode_with_cb(&block.fragment, |name, value| {
            size += name.len() + value.len() + 32;
            if size <= MAX_LIST {
                fields.push((name.into_owned(), value.into_owned()));
            }
        });
        let fits = size <= MAX_LIST;
        if self.mode == Mode::Inspect {
            let refused = fields
                .iter()
                .any(|(name, value)| name == b":authority" && !authority_ok(value));
            if decoded.is_err() || !fits || !refused {
                // Nothing to fix (or nothing this can fix: the server answers
                // a bad block itself): the connection is left alone.
                self.output.extend_from_slice(&block.raw);
                self.mode = Mode::PassThrough;
                return Ok(());
            }
            tracing::debug!(
                "a unix-socket client sent an authority h2 refuses; its requests go on with :authority {UNIX_AUTHORITY}"
            );
            self.mode = Mode::Rewrite;
        }
        decoded.map_err(|e| invalid(&format!("HPACK: {e}")))?;
        if !fits {
            return Err(invalid("a header list larger than 256 KiB"));
        }
        let mut encoded = Vec::with_capacity(block.fragment.len() * 2);
        for (name, value) in &fields {
            let value = if name == b":authority" && !authority_ok(value) {
                UNIX_AUTHORITY.as_bytes()
            } else {
                value.as_slice()
            };
            literal_without_indexing(&mut encoded, name, value);
        }
        self.emit(&block, &encoded);
        Ok(())
    }

    /// `encoded` as a HEADERS frame and as many CONTINUATIONs as it needs.
    fn emit(&mut self, block: &Block, encoded: &[u8]) {
        let priority: &[u8] = block.priority.as_ref().map_or(&[], |p| p.as_slice());
        let first = encoded.len().min(MAX_FRAME - priority.len());
        let (head, mut rest) = encoded.split_at(first);
        let mut flags = block.flags;
        if rest.is_empty() {
            flags |= END_HEADERS;
        }
        self.frame_header(priority.len() + head.len(), HEADERS, flags, block.stream);
        self.output.extend_from_slice(priority);
        self.output.extend_from_slice(head);
        while !rest.is_empty() {
            let (chunk, after) = rest.split_at(rest.len().min(MAX_FRAME));
            rest = after;
            let flags = if rest.is_empty() { END_HEADERS } else { 0 };
            self.frame_header(chunk.len(), CONTINUATION, flags, block.stream);
            self.output.extend_from_slice(chunk);
        }
    }

    fn frame_header(&mut self, length: usize, kind: u8, flags: u8, stream: u32) {
        let length = (length as u32).to_be_bytes();
        self.output.extend_from_slice(&length[1..]);
        self.output.push(kind);
        self.output.push(flags);
        self.output.extend_from_slice(&stream.to_be_bytes());
    }
}

/// Whether h2 takes `value` as an `:authority` (the check it makes).
fn authority_ok(value: &[u8]) -> bool {
    http::uri::Authority::try_from(value).is_ok()
}

/// HPACK "literal header field without indexing, new name", no Huffman:
/// the server's dynamic table is never used.
fn literal_without_indexing(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.push(0x00);
    for string in [name, value] {
        out.extend(loona_hpack::encoder::encode_integer(string.len(), 7));
        out.extend_from_slice(string);
    }
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("HTTP/2 from a unix-socket client: {what}"),
    )
}

impl<S: AsyncRead + Unpin> AsyncRead for AnyAuthority<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.output_at < this.output.len() {
                let n = buf.remaining().min(this.output.len() - this.output_at);
                buf.put_slice(&this.output[this.output_at..this.output_at + n]);
                this.output_at += n;
                if this.output_at == this.output.len() {
                    this.output.clear();
                    this.output_at = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if this.mode == Mode::PassThrough && this.input.is_empty() {
                return Pin::new(&mut this.inner).poll_read(cx, buf);
            }
            if this.eof {
                // A frame cut short: on as it is, for the server to refuse.
                if this.input.is_empty() {
                    return Poll::Ready(Ok(()));
                }
                this.output = std::mem::take(&mut this.input);
                continue;
            }
            let mut chunk = [0u8; 8192];
            let mut read = ReadBuf::new(&mut chunk);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut read))?;
            if read.filled().is_empty() {
                this.eof = true;
                continue;
            }
            this.input.extend_from_slice(read.filled());
            this.process()?;
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for AnyAuthority<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

impl<S: tonic::transport::server::Connected> tonic::transport::server::Connected
    for AnyAuthority<S>
{
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const SETTINGS_FRAME: [u8; 9] = [0, 0, 0, 0x4, 0, 0, 0, 0, 0];

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        out.push(kind);
        out.push(flags);
        out.extend_from_slice(&stream.to_be_bytes());
        out.extend_from_slice(payload);
        out
    }

    fn request(authority: &str) -> Vec<(&'static [u8], Vec<u8>)> {
        vec![
            (b":method".as_slice(), b"POST".to_vec()),
            (b":scheme", b"http".to_vec()),
            (b":path", b"/grpc.health.v1.Health/Check".to_vec()),
            (b":authority", authority.as_bytes().to_vec()),
            (b"content-type", b"application/grpc".to_vec()),
            (b"te", b"trailers".to_vec()),
        ]
    }

    /// What the server reads when the client writes `sent`, `chunk` bytes
    /// at a time.
    async fn through(sent: Vec<u8>, chunk: usize) -> io::Result<Vec<u8>> {
        let (mut client, server) = tokio::io::duplex(1 << 20);
        let writer = tokio::spawn(async move {
            for piece in sent.chunks(chunk) {
                client.write_all(piece).await.unwrap();
                tokio::task::yield_now().await;
            }
        });
        let mut fixed = AnyAuthority::new(server);
        let mut received = Vec::new();
        let result = fixed.read_to_end(&mut received).await;
        writer.await.unwrap();
        result.map(|_| received)
    }

    /// The frames of `bytes` after the preface: (type, flags, stream, payload).
    fn frames(bytes: &[u8]) -> Vec<(u8, u8, u32, Vec<u8>)> {
        assert_eq!(&bytes[..24], PREFACE);
        let mut rest = &bytes[24..];
        let mut out = Vec::new();
        while !rest.is_empty() {
            let length = u32::from_be_bytes([0, rest[0], rest[1], rest[2]]) as usize;
            let stream = u32::from_be_bytes([rest[5], rest[6], rest[7], rest[8]]);
            out.push((rest[3], rest[4], stream, rest[9..9 + length].to_vec()));
            rest = &rest[9 + length..];
        }
        out
    }

    /// The header lists of the HEADERS(+CONTINUATION) blocks in `frames`,
    /// decoded as the server decodes them.
    fn header_lists(frames: &[(u8, u8, u32, Vec<u8>)]) -> Vec<Vec<(Vec<u8>, Vec<u8>)>> {
        let mut decoder = loona_hpack::Decoder::new();
        let mut lists = Vec::new();
        let mut block = Vec::new();
        for (kind, flags, _, payload) in frames {
            match *kind {
                HEADERS => {
                    let mut body = payload.as_slice();
                    let mut pad = 0;
                    if flags & PADDED != 0 {
                        pad = body[0] as usize;
                        body = &body[1..];
                    }
                    if flags & PRIORITY != 0 {
                        body = &body[5..];
                    }
                    block = body[..body.len() - pad].to_vec();
                }
                CONTINUATION => block.extend_from_slice(payload),
                _ => continue,
            }
            if flags & END_HEADERS != 0 {
                lists.push(decoder.decode(&block).expect("valid HPACK"));
            }
        }
        lists
    }

    fn authority(list: &[(Vec<u8>, Vec<u8>)]) -> String {
        list.iter()
            .find(|(name, _)| name == b":authority")
            .map(|(_, value)| String::from_utf8_lossy(value).into_owned())
            .expect(":authority")
    }

    /// A client connection: preface, SETTINGS, then one request per
    /// authority on streams 1, 3, …, each with a DATA frame. The encoder
    /// indexes every field, as clients do, so later blocks refer to the
    /// dynamic table.
    fn connection(authorities: &[&str]) -> Vec<u8> {
        let mut encoder = loona_hpack::Encoder::new();
        let mut out = PREFACE.to_vec();
        out.extend_from_slice(&SETTINGS_FRAME);
        for (i, authority) in authorities.iter().enumerate() {
            let stream = 1 + 2 * i as u32;
            let fields = request(authority);
            let block = encoder.encode(fields.iter().map(|(n, v)| (*n, v.as_slice())));
            out.extend(frame(HEADERS, END_HEADERS, stream, &block));
            out.extend(frame(0x0, END_STREAM, stream, &[0, 0, 0, 0, 0]));
        }
        out
    }

    #[tokio::test]
    async fn a_socket_path_authority_becomes_localhost_on_every_request() {
        let sent = connection(&[
            "/run/user/0/berth/agent.sock",
            "/run/user/0/berth/agent.sock",
        ]);
        for chunk in [1, 7, 4096] {
            let received = through(sent.clone(), chunk).await.unwrap();
            let frames = frames(&received);
            let lists = header_lists(&frames);
            assert_eq!(lists.len(), 2, "chunk {chunk}");
            for list in &lists {
                assert_eq!(authority(list), "localhost", "chunk {chunk}");
                assert_eq!(list.len(), 6, "every other field kept: {list:?}");
                assert!(
                    list.contains(&(b":path".to_vec(), b"/grpc.health.v1.Health/Check".to_vec()))
                );
            }
            // SETTINGS and both DATA frames pass unchanged.
            assert_eq!(frames[0], (0x4, 0, 0, vec![]));
            let data: Vec<_> = frames.iter().filter(|f| f.0 == 0x0).collect();
            assert_eq!(data.len(), 2);
            assert!(
                data.iter()
                    .all(|f| f.1 == END_STREAM && f.3 == [0, 0, 0, 0, 0])
            );
        }
    }

    #[tokio::test]
    async fn a_valid_authority_passes_byte_for_byte() {
        // Once the first block is fine the connection is left alone, even
        // if a later one is not (clients keep one authority per connection).
        let sent = connection(&["localhost", "127.0.0.1:7702", "/x.sock"]);
        for chunk in [1, 4096] {
            assert_eq!(through(sent.clone(), chunk).await.unwrap(), sent);
        }
    }

    #[tokio::test]
    async fn padding_priority_and_continuation_are_understood() {
        let mut encoder = loona_hpack::Encoder::new();
        let fields = request("/tmp/a.sock");
        let block = encoder.encode(fields.iter().map(|(n, v)| (*n, v.as_slice())));
        let (first, second) = block.split_at(block.len() / 2);
        let mut payload = vec![3u8]; // pad length
        payload.extend_from_slice(&[0x80, 0, 0, 0, 15]); // exclusive, depends on 0, weight 15
        payload.extend_from_slice(first);
        payload.extend_from_slice(&[0, 0, 0]);
        let mut sent = PREFACE.to_vec();
        sent.extend(frame(HEADERS, PADDED | PRIORITY | END_STREAM, 1, &payload));
        sent.extend(frame(CONTINUATION, END_HEADERS, 1, second));
        let received = through(sent, 5).await.unwrap();
        let frames = frames(&received);
        assert_eq!(frames.len(), 1, "one HEADERS frame: {frames:?}");
        let (kind, flags, stream, payload) = &frames[0];
        assert_eq!(
            (*kind, *flags, *stream),
            (HEADERS, PRIORITY | END_STREAM | END_HEADERS, 1)
        );
        assert_eq!(&payload[..5], &[0x80, 0, 0, 0, 15], "priority kept");
        assert_eq!(authority(&header_lists(&frames)[0]), "localhost");
    }

    #[tokio::test]
    async fn a_long_block_is_cut_into_continuations() {
        let mut fields = request("/tmp/a.sock");
        fields.push((b"x-big", vec![b'a'; 40_000]));
        let block =
            loona_hpack::Encoder::new().encode(fields.iter().map(|(n, v)| (*n, v.as_slice())));
        let mut sent = PREFACE.to_vec();
        for (i, piece) in block.chunks(MAX_FRAME).enumerate() {
            let last = (i + 1) * MAX_FRAME >= block.len();
            let kind = if i == 0 { HEADERS } else { CONTINUATION };
            sent.extend(frame(kind, if last { END_HEADERS } else { 0 }, 1, piece));
        }
        let frames = frames(&through(sent, 4096).await.unwrap());
        assert!(frames.len() >= 3, "{}", frames.len());
        assert!(frames.iter().all(|f| f.3.len() <= MAX_FRAME));
        let lists = header_lists(&frames);
        assert_eq!(authority(&lists[0]), "localhost");
        assert!(lists[0].contains(&(b"x-big".to_vec(), vec![b'a'; 40_000])));
    }

    #[tokio::test]
    async fn another_protocol_passes_unchanged() {
        let sent = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec();
        assert_eq!(through(sent.clone(), 3).await.unwrap(), sent);
        // A connection cut inside a frame: what came is handed on.
        let mut cut = connection(&["/x.sock"]);
        cut.truncate(PREFACE.len() + SETTINGS_FRAME.len() + 5);
        assert_eq!(through(cut.clone(), 4096).await.unwrap(), cut);
    }

    /// What a served unix socket answers to a grpc.health.v1 Check whose
    /// `:authority` is `authority`: the type of the first frame on stream 1
    /// (HEADERS 0x1 when it is served, RST_STREAM 0x3 when refused).
    async fn served_answer(authority: &str) -> u8 {
        use crate::ServerConfig;
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("s.sock");
        let config = ServerConfig {
            listen: format!("unix://{}", socket.display()),
            ..ServerConfig::default()
        };
        let service = crate::ServiceHost::bind(config).await.unwrap().spawn(None);
        let mut stream = tokio::net::UnixStream::connect(&socket).await.unwrap();
        let mut sent = PREFACE.to_vec();
        sent.extend_from_slice(&SETTINGS_FRAME);
        let mut block = Vec::new();
        for (name, value) in request(authority) {
            literal_without_indexing(&mut block, name, &value);
        }
        sent.extend(frame(HEADERS, END_HEADERS, 1, &block));
        sent.extend(frame(0x0, END_STREAM, 1, &[0, 0, 0, 0, 0]));
        stream.write_all(&sent).await.unwrap();
        let kind = tokio::time::timeout(std::time::Duration::from_secs(10), async {
            loop {
                let mut header = [0u8; 9];
                stream.read_exact(&mut header).await.unwrap();
                let length = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
                let mut payload = vec![0u8; length];
                stream.read_exact(&mut payload).await.unwrap();
                let id = u32::from_be_bytes([header[5], header[6], header[7], header[8]]);
                if id == 1 {
                    break header[3];
                }
            }
        })
        .await
        .expect("an answer on stream 1");
        drop(stream);
        service.stop().await.unwrap();
        kind
    }

    #[tokio::test]
    async fn a_served_unix_socket_answers_a_request_that_names_its_path() {
        assert_eq!(served_answer("/run/user/0/berth/agent.sock").await, HEADERS);
        assert_eq!(served_answer("").await, HEADERS);
        assert_eq!(served_answer("localhost").await, HEADERS);
    }

    #[tokio::test]
    async fn a_frame_inside_a_header_block_is_refused() {
        let block = loona_hpack::Encoder::new()
            .encode(request("/x.sock").iter().map(|(n, v)| (*n, v.as_slice())));
        let mut sent = PREFACE.to_vec();
        sent.extend(frame(HEADERS, 0, 1, &block));
        sent.extend(frame(0x0, 0, 1, b"x"));
        let error = through(sent, 4096).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::InvalidData, "{error}");
    }
}
