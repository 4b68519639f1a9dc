//! The deterministic payload stream that `pod-app` sends and verifies.
//!
//! Byte `i` of the stream depends only on `i`, so any party (the sending client, the `source`
//! server, a test computing an expectation, the echo client checking what came back) can
//! produce or check any part of it in 64 KiB pieces without holding the whole transfer.
//! The bytes come from a SplitMix64 mix of the 8-byte block index: they look random to a
//! compressor, so nothing on the path can shrink them and inflate throughput numbers.
//!
//! An optional *marker* (a short string) can be written over the stream at every
//! [`MARKER_INTERVAL`] bytes, so a packet capture can be searched for plaintext payload.

use anyhow::{Result, bail};
use sha2::{Digest, Sha256};

/// Distance between two copies of the marker, and the largest marker allowed.
pub const MARKER_INTERVAL: u64 = 64 * 1024;

/// Buffer size used for streaming the pattern.
pub const CHUNK: usize = 64 * 1024;

/// Fixed seed, so the stream differs from a plain counter run through the same mixer.
const SEED: u64 = 0x7472_656c_6c69_7321; // "trellis!"

/// SplitMix64 finaliser applied to a block index.
fn mix(block: u64) -> u64 {
    let mut z = block.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(SEED);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Writes the raw pattern (without marker) for stream positions `offset..offset + buf.len()`.
pub fn fill_raw(offset: u64, buf: &mut [u8]) {
    let mut i = 0;
    while i < buf.len() {
        let pos = offset + i as u64;
        let word = mix(pos / 8).to_le_bytes();
        let start = (pos % 8) as usize;
        let n = (8 - start).min(buf.len() - i);
        buf[i..i + n].copy_from_slice(&word[start..start + n]);
        i += n;
    }
}

/// Overlays the marker on `buf`, which holds stream positions starting at `offset`.
fn overlay_marker(offset: u64, buf: &mut [u8], marker: &[u8]) {
    let end = offset + buf.len() as u64;
    // First marker copy that can touch this buffer starts at or before `offset`.
    let mut copy_start = offset - offset % MARKER_INTERVAL;
    while copy_start < end {
        for (j, &b) in marker.iter().enumerate() {
            let pos = copy_start + j as u64;
            if pos >= offset && pos < end {
                buf[(pos - offset) as usize] = b;
            }
        }
        copy_start += MARKER_INTERVAL;
    }
}

/// A cursor over the first `len` bytes of the pattern, optionally with a marker.
#[derive(Debug, Clone)]
pub struct Pattern {
    len: u64,
    pos: u64,
    marker: Option<Vec<u8>>,
}

impl Pattern {
    /// The first `len` bytes of the plain pattern.
    pub fn new(len: u64) -> Self {
        Self {
            len,
            pos: 0,
            marker: None,
        }
    }

    /// The first `len` bytes of the pattern with `marker` written at every
    /// [`MARKER_INTERVAL`]. The marker must be 1..=`MARKER_INTERVAL` bytes long.
    pub fn with_marker(len: u64, marker: &[u8]) -> Result<Self> {
        if marker.is_empty() || marker.len() as u64 > MARKER_INTERVAL {
            bail!(
                "marker must be 1..={MARKER_INTERVAL} bytes, got {}",
                marker.len()
            );
        }
        Ok(Self {
            len,
            pos: 0,
            marker: Some(marker.to_vec()),
        })
    }

    /// Total length of the stream.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the stream is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes produced so far.
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// Bytes not yet produced.
    pub fn remaining(&self) -> u64 {
        self.len - self.pos
    }

    /// Writes the next bytes into `buf` and returns how many (0 at the end of the stream).
    pub fn fill(&mut self, buf: &mut [u8]) -> usize {
        let n = (buf.len() as u64).min(self.remaining()) as usize;
        let out = &mut buf[..n];
        fill_raw(self.pos, out);
        if let Some(marker) = &self.marker {
            overlay_marker(self.pos, out, marker);
        }
        self.pos += n as u64;
        n
    }

    /// SHA-256 (lower-case hex) of the whole stream, computed by streaming it.
    pub fn sha256_hex(&self) -> String {
        let mut cursor = Self {
            pos: 0,
            ..self.clone()
        };
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = cursor.fill(&mut buf);
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
        hex(&hasher.finalize())
    }
}

/// SHA-256 (hex) of the first `len` bytes of the plain pattern.
pub fn sha256_hex(len: u64) -> String {
    Pattern::new(len).sha256_hex()
}

/// Checks a received stream against the plain pattern, chunk by chunk.
#[derive(Debug, Default, Clone)]
pub struct Verifier {
    pos: u64,
    mismatch_at: Option<u64>,
    scratch: Vec<u8>,
}

impl Verifier {
    /// A verifier expecting the pattern from position 0.
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds the next received bytes.
    pub fn update(&mut self, data: &[u8]) {
        if self.mismatch_at.is_none() {
            self.scratch.resize(data.len(), 0);
            fill_raw(self.pos, &mut self.scratch);
            // Slice equality is a memcmp; only look for the position when it differs.
            if data != self.scratch.as_slice() {
                let i = data
                    .iter()
                    .zip(&self.scratch)
                    .position(|(a, b)| a != b)
                    .unwrap_or(0);
                self.mismatch_at = Some(self.pos + i as u64);
            }
        }
        self.pos += data.len() as u64;
    }

    /// Bytes fed so far.
    pub fn received(&self) -> u64 {
        self.pos
    }

    /// Stream position of the first byte that differed from the pattern, if any.
    pub fn mismatch_at(&self) -> Option<u64> {
        self.mismatch_at
    }
}

/// Lower-case hex encoding.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 0xf)] as char);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn collect(mut p: Pattern, chunk: usize) -> Vec<u8> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; chunk];
        loop {
            let n = p.fill(&mut buf);
            if n == 0 {
                return out;
            }
            out.extend_from_slice(&buf[..n]);
        }
    }

    #[test]
    fn chunking_does_not_change_the_stream() {
        let whole = collect(Pattern::new(200_003), 1 << 20);
        assert_eq!(whole.len(), 200_003);
        for chunk in [1, 3, 7, 8, 13, 4096, 65_537] {
            assert_eq!(
                collect(Pattern::new(200_003), chunk),
                whole,
                "chunk {chunk}"
            );
        }
    }

    #[test]
    fn stream_is_deterministic_and_not_trivial() {
        let a = collect(Pattern::new(4096), 4096);
        let b = collect(Pattern::new(4096), 4096);
        assert_eq!(a, b);
        // Every byte value should show up in 4 KiB of random-looking data.
        let mut seen = [false; 256];
        for &x in &a {
            seen[usize::from(x)] = true;
        }
        assert!(seen.iter().filter(|&&s| s).count() > 240);
        // A prefix of a longer stream equals the shorter stream.
        assert_eq!(&collect(Pattern::new(10_000), 999)[..4096], &a[..]);
    }

    #[test]
    fn marker_is_embedded_at_every_interval() {
        let marker = b"TRELLIS-MARKER";
        let len = 3 * MARKER_INTERVAL + 5;
        let data = collect(Pattern::with_marker(len, marker).expect("marker"), 1000);
        for k in 0..3 {
            let at = (k * MARKER_INTERVAL) as usize;
            assert_eq!(&data[at..at + marker.len()], marker);
        }
        // The tail is shorter than the marker: only its first bytes appear.
        let at = (3 * MARKER_INTERVAL) as usize;
        assert_eq!(&data[at..], &marker[..5]);
        // Between markers the plain pattern is untouched.
        let plain = collect(Pattern::new(len), 1 << 16);
        assert_eq!(data[100..1000], plain[100..1000]);
        assert!(Pattern::with_marker(1, b"").is_err());
    }

    #[test]
    fn sha256_matches_a_direct_hash_and_verifier_accepts_the_stream() {
        let data = collect(Pattern::new(100_000), 777);
        assert_eq!(sha256_hex(100_000), hex(&Sha256::digest(&data)));
        assert_eq!(
            sha256_hex(0),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        let mut v = Verifier::new();
        for part in data.chunks(1234) {
            v.update(part);
        }
        assert_eq!(v.received(), 100_000);
        assert_eq!(v.mismatch_at(), None);

        let mut bad = data.clone();
        bad[50_000] ^= 1;
        let mut v = Verifier::new();
        v.update(&bad);
        assert_eq!(v.mismatch_at(), Some(50_000));
    }

    #[test]
    fn hex_encodes() {
        assert_eq!(hex(&[0x00, 0xab, 0x0f, 0xff]), "00ab0fff");
    }
}
