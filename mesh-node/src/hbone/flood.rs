//! Floods of HTTP/2 control frames on an inbound HBONE connection.
//!
//! `h2` answers every PING with a PONG and every SETTINGS with an ACK. It keeps one answer
//! pending at a time and reads nothing more until it is written, so a flood costs bounded
//! memory; but the CPU of answering is spent for as long as the peer keeps sending, the peer is
//! never told to stop, and each PING ack nobody asked for is logged. Neither `h2` nor hyper has
//! a setting for it. This layer sits between TLS and HTTP/2, reads the nine-byte frame headers
//! out of the plaintext (no allocation, nine bytes of state), and counts PING frames and
//! non-ACK SETTINGS frames per window. A peer over the bound gets GOAWAY(ENHANCE_YOUR_CALM),
//! written at a frame boundary of what the server sends (if the server is mid-frame the
//! connection is only closed), and the connection ends.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll, ready},
    time::{Duration, Instant},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::sync::CancellationToken;

/// PING and SETTINGS frames a peer may send per [`WINDOW`]. An honest HBONE client sends one
/// SETTINGS, answers our keepalive PINGs and sends its own every few seconds at most: a few
/// per window. A hundred is far beyond that and far below what a flood sends.
pub const MAX_CONTROL_FRAMES: u32 = 100;
pub const WINDOW: Duration = Duration::from_secs(10);
/// How long a flooded connection may take to deliver its GOAWAY.
pub const GRACE: Duration = Duration::from_secs(1);

/// `PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n`: precedes the client's first frame.
const CLIENT_PREFACE_LEN: u32 = 24;
const HEADER_LEN: usize = 9;
const HEADERS: u8 = 0x1;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const ACK: u8 = 0x1;
const ENHANCE_YOUR_CALM: u32 = 0xb;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FrameHeader {
    length: u32,
    kind: u8,
    flags: u8,
    stream: u32,
}

impl FrameHeader {
    fn parse(b: &[u8; HEADER_LEN]) -> Self {
        Self {
            length: u32::from_be_bytes([0, b[0], b[1], b[2]]),
            kind: b[3],
            flags: b[4],
            stream: u32::from_be_bytes([b[5], b[6], b[7], b[8]]) & 0x7fff_ffff,
        }
    }
}

/// Walks a byte stream of HTTP/2 frames header by header, skipping payloads.
#[derive(Clone, Copy, Debug)]
struct FrameWalker {
    header: [u8; HEADER_LEN],
    filled: usize,
    /// Bytes of the preface or of the current frame's payload still to pass.
    skip: u32,
}

impl FrameWalker {
    fn client() -> Self {
        Self {
            skip: CLIENT_PREFACE_LEN,
            ..Self::server()
        }
    }

    fn server() -> Self {
        Self {
            header: [0; HEADER_LEN],
            filled: 0,
            skip: 0,
        }
    }

    /// Passes `bytes`, calling `on_header` for every frame header completed in them.
    fn feed(&mut self, mut bytes: &[u8], mut on_header: impl FnMut(FrameHeader)) {
        while !bytes.is_empty() {
            if self.skip > 0 {
                let n = bytes
                    .len()
                    .min(usize::try_from(self.skip).unwrap_or(usize::MAX));
                // n <= skip, which is a u32.
                self.skip -= u32::try_from(n).unwrap_or(self.skip);
                bytes = &bytes[n..];
                continue;
            }
            let n = bytes.len().min(HEADER_LEN - self.filled);
            self.header[self.filled..self.filled + n].copy_from_slice(&bytes[..n]);
            self.filled += n;
            bytes = &bytes[n..];
            if self.filled == HEADER_LEN {
                self.filled = 0;
                let header = FrameHeader::parse(&self.header);
                self.skip = header.length;
                on_header(header);
            }
        }
    }

    /// Between two frames: another frame may be written here.
    fn at_boundary(&self) -> bool {
        self.skip == 0 && self.filled == 0
    }
}

/// PING and SETTINGS frames in the current window, and the last stream the peer opened.
#[derive(Debug, Default)]
struct ControlCount {
    window_start: Option<Instant>,
    count: u32,
    last_stream: u32,
}

impl ControlCount {
    /// Counts one frame header read from the peer; `true` once the peer is over the bound.
    fn frame(&mut self, header: FrameHeader, now: impl FnOnce() -> Instant) -> bool {
        let counted = match header.kind {
            // A PING ack nobody asked for is logged by h2: count acks too.
            PING => true,
            // A SETTINGS ack without our SETTINGS pending is already a protocol error in h2.
            SETTINGS => header.flags & ACK == 0,
            HEADERS => {
                if header.stream % 2 == 1 {
                    self.last_stream = self.last_stream.max(header.stream);
                }
                false
            }
            _ => false,
        };
        if !counted {
            return false;
        }
        let now = now();
        if self
            .window_start
            .is_none_or(|t| now.saturating_duration_since(t) >= WINDOW)
        {
            self.window_start = Some(now);
            self.count = 0;
        }
        self.count += 1;
        self.count > MAX_CONTROL_FRAMES
    }
}

fn goaway(last_stream: u32) -> [u8; HEADER_LEN + 8] {
    let mut frame = [0u8; HEADER_LEN + 8];
    frame[2] = 8;
    frame[3] = GOAWAY;
    frame[9..13].copy_from_slice(&(last_stream & 0x7fff_ffff).to_be_bytes());
    frame[13..17].copy_from_slice(&ENHANCE_YOUR_CALM.to_be_bytes());
    frame
}

#[derive(Debug)]
enum State {
    Open,
    /// Over the bound: GOAWAY (if any) being written, then the transport shut down.
    Closing {
        goaway: Option<[u8; HEADER_LEN + 8]>,
        sent: usize,
    },
    Closed,
}

/// The transport of one inbound HBONE connection, as HTTP/2 sees it; `flooded` is cancelled
/// when the peer goes over the bound.
#[derive(Debug)]
pub struct FloodGuard<T> {
    inner: T,
    reads: FrameWalker,
    writes: FrameWalker,
    control: ControlCount,
    state: State,
    flooded: CancellationToken,
}

fn flood_error() -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionAborted,
        "HTTP/2 control frame flood",
    )
}

impl<T: AsyncRead + AsyncWrite + Unpin> FloodGuard<T> {
    pub fn new(inner: T, flooded: CancellationToken) -> Self {
        Self {
            inner,
            reads: FrameWalker::client(),
            writes: FrameWalker::server(),
            control: ControlCount::default(),
            state: State::Open,
            flooded,
        }
    }

    /// Writes the GOAWAY, flushes and shuts the transport down; errors just end it.
    fn poll_close(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            match &mut self.state {
                State::Open | State::Closed => return Poll::Ready(()),
                State::Closing {
                    goaway: Some(frame),
                    sent,
                } if *sent < frame.len() => {
                    match ready!(Pin::new(&mut self.inner).poll_write(cx, &frame[*sent..])) {
                        Ok(n) if n > 0 => *sent += n,
                        _ => self.state = State::Closed,
                    }
                }
                State::Closing { .. } => {
                    let flushed = ready!(Pin::new(&mut self.inner).poll_flush(cx));
                    if flushed.is_ok() {
                        let _ = ready!(Pin::new(&mut self.inner).poll_shutdown(cx));
                    }
                    self.state = State::Closed;
                }
            }
        }
    }

    fn trip(&mut self) {
        let goaway = self
            .writes
            .at_boundary()
            .then(|| goaway(self.control.last_stream));
        self.state = State::Closing { goaway, sent: 0 };
        self.flooded.cancel();
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncRead for FloodGuard<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !matches!(this.state, State::Open) {
            ready!(this.poll_close(cx));
            return Poll::Ready(Err(flood_error()));
        }
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
        let control = &mut this.control;
        let mut over = false;
        this.reads.feed(&buf.filled()[before..], |header| {
            over |= control.frame(header, Instant::now);
        });
        if over {
            // What was read is handed on (it is bounded); the next read ends the connection.
            this.trip();
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncWrite for FloodGuard<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if !matches!(this.state, State::Open) {
            ready!(this.poll_close(cx));
            return Poll::Ready(Err(flood_error()));
        }
        let n = ready!(Pin::new(&mut this.inner).poll_write(cx, buf))?;
        this.writes.feed(&buf[..n.min(buf.len())], |_| {});
        Poll::Ready(Ok(n))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if !matches!(this.state, State::Open) {
            ready!(this.poll_close(cx));
            return Poll::Ready(Err(flood_error()));
        }
        let n = ready!(Pin::new(&mut this.inner).poll_write_vectored(cx, bufs))?;
        let mut left = n;
        for buf in bufs {
            if left == 0 {
                break;
            }
            let take = left.min(buf.len());
            this.writes.feed(&buf[..take], |_| {});
            left -= take;
        }
        Poll::Ready(Ok(n))
    }

    fn is_write_vectored(&self) -> bool {
        // HTTP/2 writes a frame header and its payload as separate slices; without vectored
        // writes each would become its own TLS record.
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !matches!(this.state, State::Open) {
            ready!(this.poll_close(cx));
            return Poll::Ready(Err(flood_error()));
        }
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !matches!(this.state, State::Open) {
            ready!(this.poll_close(cx));
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = u32::try_from(payload.len()).expect("small").to_be_bytes();
        let mut f = vec![len[1], len[2], len[3], kind, flags];
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    fn headers_of(walker: &mut FrameWalker, chunks: &[&[u8]]) -> Vec<FrameHeader> {
        let mut seen = Vec::new();
        for c in chunks {
            walker.feed(c, |h| seen.push(h));
        }
        seen
    }

    #[test]
    fn frame_headers_are_found_however_the_stream_is_split() {
        let mut stream = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        stream.extend(frame(SETTINGS, 0, 0, &[0; 6]));
        stream.extend(frame(HEADERS, 0x4, 1, &[0x82; 20]));
        stream.extend(frame(PING, 0, 0, &[7; 8]));
        stream.extend(frame(PING, ACK, 0, &[7; 8]));
        stream.extend(frame(0x0, 0x1, 1, &[]));
        let whole = headers_of(&mut FrameWalker::client(), &[&stream]);
        let kinds: Vec<u8> = whole.iter().map(|h| h.kind).collect();
        assert_eq!(kinds, [SETTINGS, HEADERS, PING, PING, 0x0]);
        assert_eq!(whole[1].length, 20);
        assert_eq!(whole[1].stream, 1);
        for split in 0..=stream.len() {
            let (a, b) = stream.split_at(split);
            let mut walker = FrameWalker::client();
            assert_eq!(headers_of(&mut walker, &[a, b]), whole, "split at {split}");
            assert!(walker.at_boundary());
        }
    }

    #[test]
    fn every_short_input_is_walked_without_panic() {
        // Every input of up to three bytes from a set that covers lengths, kinds and flags at
        // their extremes, fed to a walker in the middle of a header.
        let alphabet = [0x00, 0x01, 0x04, 0x06, 0x7f, 0x80, 0xff];
        for a in alphabet {
            for b in alphabet {
                for c in alphabet {
                    let mut walker = FrameWalker::server();
                    walker.feed(&[0xff, 0xff, 0xff, PING, 0, 0], |_| {});
                    walker.feed(&[a, b, c], |h| assert_eq!(h.length, 0xff_ffff));
                    assert!(walker.skip <= 0xff_ffff);
                }
            }
        }
    }

    proptest! {
        #[test]
        fn hostile_bytes_never_panic_and_splitting_changes_nothing(
            bytes in proptest::collection::vec(any::<u8>(), 0..512),
            split in any::<prop::sample::Index>(),
        ) {
            let whole = headers_of(&mut FrameWalker::client(), &[&bytes]);
            let (a, b) = bytes.split_at(split.index(bytes.len() + 1));
            prop_assert_eq!(headers_of(&mut FrameWalker::client(), &[a, b]), whole.clone());
            let mut count = ControlCount::default();
            let now = Instant::now();
            for h in whole {
                count.frame(h, || now);
            }
            prop_assert!(count.last_stream <= 0x7fff_ffff);
        }
    }

    #[test]
    fn the_bound_is_per_window() {
        let mut count = ControlCount::default();
        let t0 = Instant::now();
        let ping = FrameHeader {
            length: 8,
            kind: PING,
            flags: 0,
            stream: 0,
        };
        for _ in 0..MAX_CONTROL_FRAMES {
            assert!(!count.frame(ping, || t0));
        }
        // SETTINGS acks and other frames are not counted.
        let ack = FrameHeader {
            kind: SETTINGS,
            flags: ACK,
            ..ping
        };
        assert!(!count.frame(ack, || t0));
        assert!(count.frame(ping, || t0));
        // A new window starts afresh.
        assert!(!count.frame(ping, || t0 + WINDOW));
    }

    #[tokio::test]
    async fn a_flooding_peer_gets_goaway_enhance_your_calm_and_the_end() {
        let (server, mut client) = tokio::io::duplex(64 * 1024);
        let flooded = CancellationToken::new();
        let mut guard = FloodGuard::new(server, flooded.clone());
        let mut flood = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        flood.extend(frame(SETTINGS, 0, 0, &[]));
        flood.extend(frame(HEADERS, 0x4, 3, &[0x82]));
        for _ in 0..=MAX_CONTROL_FRAMES {
            flood.extend(frame(PING, 0, 0, &[1; 8]));
        }
        client.write_all(&flood).await.expect("send");
        // The server side wrote one whole frame of its own: GOAWAY goes after it.
        guard
            .write_all(&frame(SETTINGS, 0, 0, &[]))
            .await
            .expect("write");
        let mut sink = vec![0u8; flood.len()];
        let mut read = 0;
        let err = loop {
            match guard.read(&mut sink[read..]).await {
                Ok(0) => panic!("end of stream before the bound"),
                Ok(n) => read += n,
                Err(e) => break e,
            }
        };
        assert_eq!(err.kind(), io::ErrorKind::ConnectionAborted);
        assert!(flooded.is_cancelled());
        assert!(guard.write(b"more").await.is_err());
        let mut seen = Vec::new();
        client.read_to_end(&mut seen).await.expect("read");
        let mut expected = frame(SETTINGS, 0, 0, &[]);
        expected.extend(goaway(3));
        assert_eq!(seen, expected);
        assert_eq!(&seen[9 + 9 + 4..], &ENHANCE_YOUR_CALM.to_be_bytes());
    }

    #[tokio::test]
    async fn mid_frame_the_connection_is_only_closed() {
        let (server, mut client) = tokio::io::duplex(64 * 1024);
        let flooded = CancellationToken::new();
        let mut guard = FloodGuard::new(server, flooded.clone());
        let mut flood = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        for _ in 0..=MAX_CONTROL_FRAMES {
            flood.extend(frame(SETTINGS, 0, 0, &[]));
        }
        client.write_all(&flood).await.expect("send");
        // Half a frame written: nothing may be put after it.
        let half = frame(0x0, 0, 1, &[9; 10]);
        guard.write_all(&half[..12]).await.expect("write");
        let mut sink = vec![0u8; flood.len()];
        let drain = async { while guard.read(&mut sink).await.is_ok() {} };
        tokio::time::timeout(Duration::from_secs(5), drain)
            .await
            .expect("the read side ends");
        assert!(flooded.is_cancelled());
        let mut seen = Vec::new();
        client.read_to_end(&mut seen).await.expect("read");
        assert_eq!(seen, &half[..12]);
    }
}
