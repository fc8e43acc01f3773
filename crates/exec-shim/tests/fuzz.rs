//! Fuzz targets of the shim's wire protocol: `request` (what the shim reads
//! from a connection) and `frames` (what the agent reads back), with seeds
//! in `tests/fuzz_corpus/<target>/`. Whatever the bytes, decoding ends
//! without a panic, reads no more than the lengths it accepts, and those
//! lengths are bounded.

use std::io::{self, Read};

use berth_exec_shim::protocol::{self, FrameKind, MAX_FRAME_BYTES, MAX_REQUEST_BYTES, Request};
use berth_tests::fuzz;
use proptest::prelude::*;

/// The protocol's pieces: lengths at the edges, tags, `=`.
const TOKENS: &[&[u8]] = &[
    &[0, 0, 0, 0],
    &[0, 0, 0, 1],
    &[0, 0, 0, 4],
    &[0, 1, 0, 0],
    &[0, 1, 0, 1],
    &[0, 0x10, 0, 0],
    &[0, 0x10, 0, 1],
    &[0xff, 0xff, 0xff, 0xff],
    &[0x7f, 0xff, 0xff, 0xff],
    &[1],
    &[2],
    &[3],
    &[0],
    b"=",
    b"\xff\xfe",
    b"\0",
];

/// A reader that counts what is taken from it.
struct Counting<'a> {
    input: &'a [u8],
    taken: usize,
}

impl Read for Counting<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.input.read(buf)?;
        self.taken += n;
        Ok(n)
    }
}

proptest! {
    #![proptest_config(fuzz::config())]

    /// A request is decoded from exactly its announced length, which is at
    /// most `MAX_REQUEST_BYTES`, and encodes back to the same bytes; a
    /// refused one is refused as malformed or cut short.
    #[test]
    fn request(input in fuzz::inputs(fuzz::corpus(env!("CARGO_MANIFEST_DIR"), "request"), TOKENS)) {
        let mut reader = Counting { input: &input, taken: 0 };
        let decoded = fuzz::timed("Request::decode", || Request::decode(&mut reader))?;
        prop_assert!(reader.taken <= 4 + MAX_REQUEST_BYTES as usize);
        match decoded {
            Ok(request) => {
                prop_assert!(!request.argv.is_empty());
                prop_assert!(request.env.iter().all(|(name, _)| !name.contains('=')));
                let encoded = request.encode();
                prop_assert_eq!(&encoded[..], &input[..reader.taken]);
            }
            Err(error) => prop_assert!(
                matches!(error.kind(), io::ErrorKind::InvalidData | io::ErrorKind::UnexpectedEof),
                "{error}"
            ),
        }
    }

    /// Frames read one after another, as the agent does: each header
    /// either refused or announcing a bounded payload of its kind, until
    /// the bytes run out or the exit frame ends the stream.
    #[test]
    fn frames(input in fuzz::inputs(fuzz::corpus(env!("CARGO_MANIFEST_DIR"), "frames"), TOKENS)) {
        fuzz::timed("frames", || {
            let mut rest = input.as_slice();
            loop {
                let Some((header, after)) = rest.split_first_chunk::<5>() else {
                    return Ok(());
                };
                let Ok((kind, length)) = protocol::parse_header(*header) else {
                    return Ok(());
                };
                prop_assert!(length <= MAX_FRAME_BYTES);
                let Some(payload) = after.get(..length) else {
                    return Ok(()); // cut short: the agent's read fails
                };
                if kind == FrameKind::Exit {
                    let code: [u8; 4] = payload.try_into().map_err(|_| {
                        TestCaseError::fail(format!("an exit frame of {length} bytes was accepted"))
                    })?;
                    let _ = i32::from_be_bytes(code);
                    return Ok(());
                }
                rest = &after[length..];
            }
        })??;
    }
}
