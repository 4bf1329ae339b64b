//! The response side of reserve-then-settle: find the actual cost while the body streams on.
//!
//! The response body is wrapped (`Metered`), never collected: each frame is handed on as it
//! arrives, and on the way data frames feed a line scanner for server-sent events (`SseScan`)
//! and a trailers frame is searched for the trailer. Memory is one line of at most
//! `MAX_SSE_LINE` bytes whatever the length of the stream: a longer line is skipped, not kept.
//!
//! The settlement happens exactly once per request (`Settle` is consumed by it): when the body
//! ends, or when the wrapper is dropped before its end (the client went away, the upstream broke
//! the stream): then what was reported so far counts, else the route's `on_missing`.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use hyper::body::{Body as HttpBody, Frame, SizeHint};

use super::routes::{OnMissing, ReserveSpec};

/// The longest server-sent event line scanned for usage (64 KiB); longer lines pass through
/// unscanned.
pub const MAX_SSE_LINE: usize = 64 * 1024;

/// How the actual of a settlement was learnt (the `source` label of its metric).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Header,
    Trailer,
    Sse,
    /// Nothing reported: `on_missing` decided.
    Missing,
    /// The stream ended early (client gone, upstream broke it) with nothing reported.
    Disconnected,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Header => "header",
            Source::Trailer => "trailer",
            Source::Sse => "sse",
            Source::Missing => "missing",
            Source::Disconnected => "disconnected",
        }
    }
}

/// What a settlement does once its actual is known; called exactly once.
pub trait Settle: Send + 'static {
    /// `actual`: the reported units, or `None` for the route's `on_missing`.
    fn settle(self: Box<Self>, actual: Option<u64>, source: Source);
}

/// The actual units `on_missing` stands for.
pub fn missing_actual(on_missing: OnMissing, estimate: u64) -> u64 {
    match on_missing {
        OnMissing::Reserved => estimate,
        OnMissing::Zero => 0,
    }
}

/// A reported number of units: a non-negative integer no larger than the largest counter.
pub fn parse_units(raw: &[u8]) -> Option<u64> {
    std::str::from_utf8(raw)
        .ok()?
        .trim()
        .parse::<u64>()
        .ok()
        .filter(|n| *n <= crate::domain::decision::MAX_COUNTER as u64)
}

/// Incremental `data:` line scanner.
pub struct SseScan {
    path: Vec<String>,
    line: Vec<u8>,
    /// The current line passed `MAX_SSE_LINE`: skipped up to its end.
    skipping: bool,
    /// The last value found.
    pub found: Option<u64>,
}

impl SseScan {
    pub fn new(path: Vec<String>) -> Self {
        Self {
            path,
            line: Vec::new(),
            skipping: false,
            found: None,
        }
    }

    pub fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            match bytes.iter().position(|&b| b == b'\n') {
                Some(at) => {
                    if !self.skipping && self.line.len() + at <= MAX_SSE_LINE {
                        self.line.extend_from_slice(&bytes[..at]);
                        self.end_line();
                    }
                    self.line.clear();
                    self.skipping = false;
                    bytes = &bytes[at + 1..];
                }
                None => {
                    if !self.skipping {
                        if self.line.len() + bytes.len() <= MAX_SSE_LINE {
                            self.line.extend_from_slice(bytes);
                        } else {
                            self.skipping = true;
                            self.line = Vec::new();
                        }
                    }
                    return;
                }
            }
        }
    }

    /// The stream ended: a last line without its newline still counts.
    pub fn finish(&mut self) {
        if !self.skipping && !self.line.is_empty() {
            self.end_line();
        }
        self.line = Vec::new();
    }

    fn end_line(&mut self) {
        let line = self.line.strip_suffix(b"\r").unwrap_or(&self.line);
        let Some(data) = line.strip_prefix(b"data:") else {
            return;
        };
        let data = data.strip_prefix(b" ").unwrap_or(data);
        // Cheap test first: most events do not carry usage, and need no parsing.
        let Some(last) = self.path.last() else { return };
        if !contains(data, last.as_bytes()) {
            return;
        }
        let Ok(value) = serde_json::from_slice::<serde_json::Value>(data) else {
            return;
        };
        let mut v = &value;
        for part in &self.path {
            match v.get(part) {
                Some(next) => v = next,
                None => return,
            }
        }
        if let Some(n) = v
            .as_u64()
            .filter(|n| *n <= crate::domain::decision::MAX_COUNTER as u64)
        {
            self.found = Some(n);
        }
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || hay.windows(needle.len()).any(|w| w == needle)
}

/// A response body that settles its request's reservation when it ends or is dropped.
pub struct Metered<B> {
    inner: B,
    sse: Option<SseScan>,
    trailer: Option<http::HeaderName>,
    /// From the trailer.
    trailed: Option<u64>,
    settle: Option<Box<dyn Settle>>,
}

impl<B> Metered<B> {
    pub fn new(inner: B, spec: &ReserveSpec, settle: Box<dyn Settle>) -> Self {
        Self {
            inner,
            sse: spec.from_sse.clone().map(SseScan::new),
            trailer: spec.from_trailer.clone(),
            trailed: None,
            settle: Some(settle),
        }
    }

    fn reported(&self) -> Option<(u64, Source)> {
        self.trailed
            .map(|n| (n, Source::Trailer))
            .or_else(|| self.sse.as_ref()?.found.map(|n| (n, Source::Sse)))
    }

    fn finish(&mut self, complete: bool) {
        let Some(settle) = self.settle.take() else {
            return;
        };
        if complete && let Some(sse) = &mut self.sse {
            sse.finish();
        }
        match self.reported() {
            Some((n, source)) => settle.settle(Some(n), source),
            None if complete => settle.settle(None, Source::Missing),
            None => settle.settle(None, Source::Disconnected),
        }
    }

    fn look_at_trailers(&mut self, trailers: &HeaderMap) {
        if let Some(name) = &self.trailer
            && let Some(n) = trailers.get(name).and_then(|v| parse_units(v.as_bytes()))
        {
            self.trailed = Some(n);
        }
    }
}

impl<B> HttpBody for Metered<B>
where
    B: HttpBody<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    if let Some(sse) = &mut this.sse {
                        sse.feed(d);
                    }
                } else if let Some(t) = frame.trailers_ref() {
                    this.look_at_trailers(t);
                }
                if this.inner.is_end_stream() {
                    this.finish(true);
                }
            }
            Poll::Ready(None) => this.finish(true),
            // The upstream broke the stream: as if the client had gone.
            Poll::Ready(Some(Err(_))) => this.finish(false),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B> Drop for Metered<B> {
    fn drop(&mut self) {
        self.finish(false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path() -> Vec<String> {
        vec!["usage".into(), "total_tokens".into()]
    }

    #[test]
    fn the_last_event_with_the_path_wins_in_any_chunking() {
        let stream = b"data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\n\
            data: {\"usage\":{\"total_tokens\":7}}\r\n\r\n\
            : comment\n\
            data: {\"usage\":{\"total_tokens\":42},\"x\":1}\n\n\
            data: [DONE]\n\n";
        for chunk in [1, 3, 10, 4096] {
            let mut s = SseScan::new(path());
            for part in stream.chunks(chunk) {
                s.feed(part);
            }
            s.finish();
            assert_eq!(s.found, Some(42), "chunk {chunk}");
        }
    }

    #[test]
    fn a_line_too_long_is_skipped_and_memory_stays_bounded() {
        let mut s = SseScan::new(path());
        let mut long = b"data: {\"usage\":{\"total_tokens\":5},\"pad\":\"".to_vec();
        long.extend(std::iter::repeat_n(b'x', MAX_SSE_LINE));
        long.extend(b"\"}\n");
        for part in long.chunks(1000) {
            s.feed(part);
            assert!(s.line.capacity() <= 2 * MAX_SSE_LINE);
        }
        assert_eq!(s.found, None, "the over-long line is not scanned");
        s.feed(b"data: {\"usage\":{\"total_tokens\":9}}\n");
        assert_eq!(s.found, Some(9), "the next line is");
        // Without a final newline, the end of the stream ends the line.
        s.feed(b"data: {\"usage\":{\"total_tokens\":11}}");
        s.finish();
        assert_eq!(s.found, Some(11));
    }

    #[test]
    fn units_must_be_non_negative_integers() {
        assert_eq!(parse_units(b" 12 "), Some(12));
        for bad in [&b"-1"[..], b"1.5", b"abc", b"", b"9007199254740992"] {
            assert_eq!(parse_units(bad), None);
        }
    }
}
