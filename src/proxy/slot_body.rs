//! A response body that holds its request's concurrency slot while it streams.
//!
//! The slot is the org's request in flight: it is given back when the body's last frame has been
//! read (the response ended), or when the body is dropped unfinished (the client went away, or
//! the connection was cut). Frames pass through untouched and unbuffered; the only cost is one
//! `Option` check per frame.

use std::pin::Pin;
use std::task::{Context, Poll};

use axum::body::Body;
use bytes::Bytes;
use hyper::body::{Body as HttpBody, Frame, SizeHint};

use crate::slots::Slot;

pub struct SlotBody {
    inner: Body,
    slot: Option<Slot>,
}

impl SlotBody {
    pub fn wrap(inner: Body, slot: Slot) -> Body {
        Body::new(SlotBody {
            inner,
            slot: Some(slot),
        })
    }
}

impl HttpBody for SlotBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) | Poll::Ready(Some(Err(_))) => {
                self.slot = None;
            }
            Poll::Ready(Some(Ok(_))) if self.inner.is_end_stream() => {
                self.slot = None;
            }
            _ => {}
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
