//! The request side of reserve-then-settle: where a route's estimate comes from.
//!
//! `from_json` reads a member of the JSON request body *before* the request is forwarded, yet
//! the body must still stream to the upstream unchanged and memory must stay bounded whatever
//! its size. So at most `PREFIX_LIMIT` bytes are read, scanned as they arrive by a small
//! streaming scanner (`JsonField`, no JSON tree is built), kept as the frames they came in, and
//! replayed ahead of the rest of the body (`Prefixed`). A member that is not within the prefix
//! (or not a non-negative integer) gives the route's `default`.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body as HttpBody, Frame, SizeHint};

use crate::serve::{BodyError, RequestBody};

/// The most of a request body read to find a `from_json` estimate (64 KiB).
pub const PREFIX_LIMIT: usize = 64 * 1024;

/// A request body with the frames already read from it put back in front.
pub struct Prefixed {
    prefix: VecDeque<Frame<Bytes>>,
    /// Bytes of data still in `prefix` (for `size_hint`).
    prefix_len: u64,
    /// Reading the prefix failed: handed on after it, so the upstream exchange fails as it
    /// would have.
    error: Option<BodyError>,
    /// The body ended while the prefix was read.
    ended: bool,
    inner: RequestBody,
}

impl Prefixed {
    /// The body as it is (nothing read yet).
    pub fn plain(inner: RequestBody) -> Self {
        Self {
            prefix: VecDeque::new(),
            prefix_len: 0,
            error: None,
            ended: false,
            inner,
        }
    }
}

impl HttpBody for Prefixed {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        if let Some(frame) = this.prefix.pop_front() {
            if let Some(d) = frame.data_ref() {
                this.prefix_len -= d.len() as u64;
            }
            return Poll::Ready(Some(Ok(frame)));
        }
        if let Some(e) = this.error.take() {
            this.ended = true;
            return Poll::Ready(Some(Err(e)));
        }
        if this.ended {
            return Poll::Ready(None);
        }
        Pin::new(&mut this.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.prefix.is_empty() && self.error.is_none() && (self.ended || self.inner.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        if self.ended {
            return SizeHint::with_exact(self.prefix_len);
        }
        let inner = self.inner.size_hint();
        let mut hint = SizeHint::new();
        hint.set_lower(inner.lower() + self.prefix_len);
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper + self.prefix_len);
        }
        hint
    }
}

/// Read up to `PREFIX_LIMIT` bytes of `body` looking for the top-level member `field`; returns
/// its value (when a non-negative integer) and the whole body to forward.
pub async fn read_json_estimate(mut body: RequestBody, field: &str) -> (Option<u64>, Prefixed) {
    let mut scan = JsonField::new(field);
    let mut prefix = VecDeque::new();
    let (mut error, mut ended, mut found) = (None, false, None);
    let mut read = 0usize;
    while read < PREFIX_LIMIT {
        match body.frame().await {
            None => {
                ended = true;
                found = scan.finish();
                break;
            }
            Some(Err(e)) => {
                error = Some(e);
                break;
            }
            Some(Ok(frame)) => {
                let mut decided = None;
                if let Some(d) = frame.data_ref() {
                    // Only the part within the limit is scanned.
                    let within = d.len().min(PREFIX_LIMIT - read);
                    read += d.len();
                    decided = scan.feed(&d[..within]);
                }
                prefix.push_back(frame);
                if let Some(v) = decided {
                    found = v;
                    break;
                }
            }
        }
    }
    let body = Prefixed {
        prefix,
        prefix_len: read as u64,
        error,
        ended,
        inner: body,
    };
    (found, body)
}

/// Where `JsonField` is in the body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// Before the first byte that is not white space.
    Start,
    /// Somewhere in the top-level object.
    Scan,
    /// Right after the wanted key, before its `:`.
    Colon,
    /// After the `:`, before the value.
    Value,
    /// In the value's digits.
    Number,
    Done,
}

/// A streaming scan for one top-level member of a JSON object holding a non-negative integer.
/// It tracks only nesting, strings and escapes, so its memory is the wanted name and a key of
/// that length, whatever the body.
pub struct JsonField {
    want: Vec<u8>,
    step: Step,
    depth: u32,
    in_string: bool,
    escaped: bool,
    /// At depth 1: the next string is a key.
    expect_key: bool,
    /// The key being read (up to one byte longer than `want`), and whether it is a key.
    key: Vec<u8>,
    reading_key: bool,
    number: u64,
}

impl JsonField {
    pub fn new(field: &str) -> Self {
        Self {
            want: field.as_bytes().to_vec(),
            step: Step::Start,
            depth: 0,
            in_string: false,
            escaped: false,
            expect_key: false,
            key: Vec::with_capacity(field.len() + 1),
            reading_key: false,
            number: 0,
        }
    }

    /// The body ended: a number that ended with it counts.
    pub fn finish(&mut self) -> Option<u64> {
        if self.step == Step::Number {
            self.step = Step::Done;
            return Some(self.number);
        }
        None
    }

    /// Scan the next bytes; `Some(answer)` once the answer is known (the member's value, or
    /// `None`: not there, or not a non-negative integer).
    pub fn feed(&mut self, bytes: &[u8]) -> Option<Option<u64>> {
        for &b in bytes {
            match self.step {
                Step::Done => return Some(None),
                Step::Start => match b {
                    b' ' | b'\t' | b'\r' | b'\n' => {}
                    b'{' => {
                        self.step = Step::Scan;
                        self.depth = 1;
                        self.expect_key = true;
                    }
                    _ => return self.done(None),
                },
                Step::Colon => match b {
                    b' ' | b'\t' | b'\r' | b'\n' => {}
                    b':' => self.step = Step::Value,
                    _ => return self.done(None),
                },
                Step::Value => match b {
                    b' ' | b'\t' | b'\r' | b'\n' => {}
                    b'0'..=b'9' => {
                        self.number = u64::from(b - b'0');
                        self.step = Step::Number;
                    }
                    _ => return self.done(None),
                },
                Step::Number => match b {
                    b'0'..=b'9' => {
                        self.number = match self
                            .number
                            .checked_mul(10)
                            .and_then(|n| n.checked_add(u64::from(b - b'0')))
                        {
                            Some(n) => n,
                            None => return self.done(None),
                        };
                    }
                    b' ' | b'\t' | b'\r' | b'\n' | b',' | b'}' => {
                        let n = self.number;
                        return self.done(Some(n));
                    }
                    // a fraction, an exponent: not a count of units
                    _ => return self.done(None),
                },
                Step::Scan => {
                    if let Some(answer) = self.scan(b) {
                        return Some(answer);
                    }
                }
            }
        }
        None
    }

    fn done(&mut self, v: Option<u64>) -> Option<Option<u64>> {
        self.step = Step::Done;
        Some(v)
    }

    fn scan(&mut self, b: u8) -> Option<Option<u64>> {
        if self.in_string {
            if self.escaped {
                self.escaped = false;
            } else if b == b'\\' {
                self.escaped = true;
            } else if b == b'"' {
                self.in_string = false;
                if self.reading_key {
                    self.reading_key = false;
                    if self.key == self.want {
                        self.step = Step::Colon;
                    }
                }
                return None;
            }
            if self.reading_key && self.key.len() <= self.want.len() {
                self.key.push(b);
            }
            return None;
        }
        match b {
            b'"' => {
                self.in_string = true;
                self.reading_key = self.depth == 1 && self.expect_key;
                self.key.clear();
                if self.depth == 1 {
                    self.expect_key = false;
                }
            }
            b'{' | b'[' => self.depth += 1,
            b'}' | b']' => {
                self.depth -= 1;
                if self.depth == 0 {
                    return self.done(None);
                }
            }
            b',' if self.depth == 1 => self.expect_key = true,
            _ => {}
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan_in(body: &[u8], field: &str, chunk: usize) -> Option<u64> {
        let mut s = JsonField::new(field);
        for part in body.chunks(chunk.max(1)) {
            if let Some(v) = s.feed(part) {
                return v;
            }
        }
        s.finish()
    }

    #[test]
    fn finds_a_top_level_integer_in_any_chunking() {
        let body = br#"{"model":"m","messages":[{"max_tokens":1,"x":"\"max_tokens\": 9"}],"nested":{"max_tokens":2},"max_tokens": 4096 ,"y":1}"#;
        for chunk in [1, 2, 3, 7, 1000] {
            assert_eq!(
                scan_in(body, "max_tokens", chunk),
                Some(4096),
                "chunk {chunk}"
            );
        }
        assert_eq!(scan_in(br#"{"max_tokens":17}"#, "max_tokens", 1), Some(17));
        assert_eq!(scan_in(br#"{"max_tokens":17"#, "max_tokens", 4), Some(17));
    }

    #[test]
    fn anything_else_is_no_estimate() {
        for body in [
            &br#"{"max_tokens":"12"}"#[..],
            br#"{"max_tokens":1.5}"#,
            br#"{"max_tokens":-3}"#,
            br#"{"max_tokens":null}"#,
            br#"{"max_tokens_x":5}"#,
            br#"{"a":{"max_tokens":5}}"#,
            br#"[{"max_tokens":5}]"#,
            br#"{"max_tokens":99999999999999999999999}"#,
            b"not json",
            b"",
        ] {
            assert_eq!(
                scan_in(body, "max_tokens", 3),
                None,
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }
}
