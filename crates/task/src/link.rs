//! Messages of any size over links that carry bounded frames: each
//! message is postcard-encoded and cut into chunks of at most
//! [`CHUNK`] bytes, each with a one-byte "more follows" flag.

use std::future::Future;

use serde::de::DeserializeOwned;
use serde::Serialize;
use shoal_transport::stream::{Reader, StreamError, Writer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Largest chunk of a message in one frame.
pub const CHUNK: usize = 60 * 1024;
/// Largest message accepted.
pub const MAX_MESSAGE: usize = 1 << 30;

/// Why a link failed. The task on it is over.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The peer closed the link.
    #[error("the other side closed the connection")]
    Closed,
    /// Network or socket failure.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// Authentication or stream failure.
    #[error("{0}")]
    Stream(StreamError),
    /// A message that does not decode.
    #[error("undecodable message: {0}")]
    Decode(#[from] postcard::Error),
    /// A frame or message over the limits.
    #[error("message too large ({0} bytes)")]
    TooLarge(usize),
}

impl From<StreamError> for LinkError {
    fn from(e: StreamError) -> Self {
        match e {
            StreamError::Closed => Self::Closed,
            other => Self::Stream(other),
        }
    }
}

/// Something that carries frames of at most [`CHUNK`] + 1 bytes.
pub trait FrameSink: Send {
    /// Sends one frame.
    fn send_frame(&mut self, f: &[u8]) -> impl Future<Output = Result<(), LinkError>> + Send;

    /// Sends frames in order; a sink that can puts them in one write, so
    /// that the other side wakes once for them all.
    fn send_frames(
        &mut self,
        frames: &[Vec<u8>],
    ) -> impl Future<Output = Result<(), LinkError>> + Send {
        async move {
            for f in frames {
                self.send_frame(f).await?;
            }
            Ok(())
        }
    }
}

impl<T: FrameSink> FrameSink for &mut T {
    fn send_frame(&mut self, f: &[u8]) -> impl Future<Output = Result<(), LinkError>> + Send {
        (**self).send_frame(f)
    }

    fn send_frames(
        &mut self,
        frames: &[Vec<u8>],
    ) -> impl Future<Output = Result<(), LinkError>> + Send {
        (**self).send_frames(frames)
    }
}

/// Something that yields frames.
pub trait FrameSource: Send {
    /// The next frame.
    fn recv_frame(&mut self) -> impl Future<Output = Result<Vec<u8>, LinkError>> + Send;

    /// Whether the next frame has come whole already (`recv_frame` would
    /// not wait). `false` when the source cannot tell.
    fn frame_ready(&self) -> bool {
        false
    }
}

impl<S: AsyncRead + AsyncWrite + Send> FrameSink for Writer<S> {
    async fn send_frame(&mut self, f: &[u8]) -> Result<(), LinkError> {
        Ok(self.send(f).await?)
    }

    async fn send_frames(&mut self, frames: &[Vec<u8>]) -> Result<(), LinkError> {
        let payloads: Vec<&[u8]> = frames.iter().map(Vec::as_slice).collect();
        Ok(self.send_many(&payloads).await?)
    }
}

impl<S: AsyncRead + AsyncWrite + Send> FrameSource for Reader<S> {
    async fn recv_frame(&mut self) -> Result<Vec<u8>, LinkError> {
        Ok(self.recv().await?)
    }

    fn frame_ready(&self) -> bool {
        self.message_ready()
    }
}

/// Frames on a plain byte stream (the local Unix socket): u32 length
/// prefix.
#[derive(Debug)]
pub struct Plain<T>(pub T);

impl<W: AsyncWrite + Unpin + Send> FrameSink for Plain<W> {
    async fn send_frame(&mut self, f: &[u8]) -> Result<(), LinkError> {
        self.write_frames(&[f]).await
    }

    async fn send_frames(&mut self, frames: &[Vec<u8>]) -> Result<(), LinkError> {
        let frames: Vec<&[u8]> = frames.iter().map(Vec::as_slice).collect();
        self.write_frames(&frames).await
    }
}

impl<W: AsyncWrite + Unpin + Send> Plain<W> {
    /// Frames, each behind its length, in one write.
    async fn write_frames(&mut self, frames: &[&[u8]]) -> Result<(), LinkError> {
        let mut buf = Vec::with_capacity(frames.iter().map(|f| f.len() + 4).sum());
        for f in frames {
            buf.extend_from_slice(&(f.len() as u32).to_be_bytes());
            buf.extend_from_slice(f);
        }
        self.0.write_all(&buf).await?;
        Ok(())
    }
}

impl<R: AsyncRead + Unpin + Send> FrameSource for Plain<R> {
    async fn recv_frame(&mut self) -> Result<Vec<u8>, LinkError> {
        let mut len = [0u8; 4];
        match self.0.read_exact(&mut len).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Err(LinkError::Closed)
            }
            Err(e) => return Err(e.into()),
        }
        let n = u32::from_be_bytes(len) as usize;
        if n > CHUNK + 1 {
            return Err(LinkError::TooLarge(n));
        }
        let mut buf = vec![0u8; n];
        self.0.read_exact(&mut buf).await?;
        Ok(buf)
    }
}

/// Follows frames relayed untouched, message by message.
#[derive(Debug)]
pub struct Boundaries {
    /// The next frame starts a message.
    at_start: bool,
}

impl Default for Boundaries {
    fn default() -> Self {
        Self { at_start: true }
    }
}

impl Boundaries {
    /// Takes the next frame; returns the message when this frame is all of
    /// it (the first of its message, and no more follow).
    pub fn next<'a>(&mut self, frame: &'a [u8]) -> Option<&'a [u8]> {
        let last = frame.first() != Some(&1);
        let whole = self.at_start && last;
        self.at_start = last;
        if whole {
            frame.get(1..)
        } else {
            None
        }
    }

    /// Whether the frames so far end a message (none is half relayed).
    pub fn between_messages(&self) -> bool {
        self.at_start
    }
}

/// Sends `msg` as one or more frames.
///
/// # Errors
/// The link failed.
pub async fn send<T: Serialize, S: FrameSink>(sink: &mut S, msg: &T) -> Result<(), LinkError> {
    for f in frames_of(&postcard::to_stdvec(msg)?) {
        sink.send_frame(&f).await?;
    }
    Ok(())
}

/// An encoded message's frames: chunks of at most [`CHUNK`] bytes, each
/// behind its "more follows" flag (one frame, `[0]`, for no bytes).
fn frames_of(bytes: &[u8]) -> impl Iterator<Item = Vec<u8>> + '_ {
    let n = bytes.len().div_ceil(CHUNK).max(1);
    (0..n).map(move |i| {
        let c = bytes
            .get(i * CHUNK..bytes.len().min((i + 1) * CHUNK))
            .unwrap_or_default();
        let mut f = Vec::with_capacity(c.len() + 1);
        f.push(u8::from(i + 1 < n));
        f.extend_from_slice(c);
        f
    })
}

/// Sends small messages (of at most [`CHUNK`] bytes encoded each, else
/// as [`send`] would) in one write where the sink can: a task's last
/// messages wake its submitter once.
///
/// # Errors
/// The link failed.
pub async fn send_small<T: Serialize, S: FrameSink>(
    sink: &mut S,
    msgs: &[&T],
) -> Result<(), LinkError> {
    let mut frames = Vec::with_capacity(msgs.len());
    for m in msgs {
        let bytes = postcard::to_stdvec(m)?;
        if bytes.len() > CHUNK {
            // (Not small: frames so far first, then this one as usual.)
            sink.send_frames(&std::mem::take(&mut frames)).await?;
            send(sink, m).await?;
            continue;
        }
        frames.extend(frames_of(&bytes));
    }
    sink.send_frames(&frames).await
}

/// Receives one message.
///
/// # Errors
/// The link failed or the message does not decode.
pub async fn recv<T: DeserializeOwned, S: FrameSource>(src: &mut S) -> Result<T, LinkError> {
    let mut bytes = Vec::new();
    loop {
        let f = src.recv_frame().await?;
        let Some((&more, chunk)) = f.split_first() else {
            return Err(LinkError::TooLarge(0));
        };
        bytes.extend_from_slice(chunk);
        if bytes.len() > MAX_MESSAGE {
            return Err(LinkError::TooLarge(bytes.len()));
        }
        if more == 0 {
            return Ok(postcard::from_bytes(&bytes)?);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{FromExec, ToExec};

    #[tokio::test]
    async fn big_and_small_messages_cross_plain_frames() {
        let (a, b) = tokio::io::duplex(1 << 16);
        let (br, _bw) = tokio::io::split(b);
        let (ar, aw) = tokio::io::split(a);
        drop(ar); // the stream closes once the sender drops its half
        let mut tx = Plain(aw);
        let mut rx = Plain(br);
        let big = ToExec::Blob {
            hash: [3; 32],
            data: (0..200_000).map(|i| (i % 251) as u8).collect(),
        };
        let sender = tokio::spawn(async move {
            send(&mut tx, &ToExec::StdinEof).await.unwrap();
            send(&mut tx, &big).await.unwrap();
            send(&mut tx, &FromExec::Need(vec![])).await.unwrap();
            big
        });
        assert_eq!(recv::<ToExec, _>(&mut rx).await.unwrap(), ToExec::StdinEof);
        let got: ToExec = recv(&mut rx).await.unwrap();
        let big = sender.await.unwrap();
        assert_eq!(got, big);
        assert_eq!(
            recv::<FromExec, _>(&mut rx).await.unwrap(),
            FromExec::Need(vec![])
        );
        assert!(matches!(
            recv::<FromExec, _>(&mut rx).await,
            Err(LinkError::Closed)
        ));
    }

    /// Counts the writes made on it, and keeps what they wrote.
    #[derive(Default)]
    struct Writes {
        count: usize,
        bytes: Vec<u8>,
    }

    impl AsyncWrite for Writes {
        fn poll_write(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> std::task::Poll<std::io::Result<usize>> {
            self.count += 1;
            self.bytes.extend_from_slice(buf);
            std::task::Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
        fn poll_shutdown(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn small_messages_go_in_one_write_and_a_large_one_as_usual() {
        use crate::proto::Status;
        let exit = FromExec::Exit {
            status: Status::Code(0),
            oom: false,
            cpu_s: 0.1,
            mem_peak_bytes: Some(1 << 20),
        };
        let out = FromExec::Stdout(b"hello".to_vec());
        let mut w = Plain(Writes::default());
        send_small(&mut w, &[&out, &exit]).await.unwrap();
        assert_eq!(w.0.count, 1, "two small messages, one write");
        let big = FromExec::Stdout(vec![7; 3 * CHUNK]);
        send_small(&mut w, &[&out, &big, &exit]).await.unwrap();
        let mut rx = Plain(&w.0.bytes[..]);
        for want in [&out, &exit, &out, &big, &exit] {
            assert_eq!(&recv::<FromExec, _>(&mut rx).await.unwrap(), want);
        }
        assert!(matches!(
            recv::<FromExec, _>(&mut rx).await,
            Err(LinkError::Closed)
        ));
    }

    /// Keeps the frames sent to it.
    #[derive(Default)]
    struct Frames(Vec<Vec<u8>>);

    impl FrameSink for Frames {
        async fn send_frame(&mut self, f: &[u8]) -> Result<(), LinkError> {
            self.0.push(f.to_vec());
            Ok(())
        }
    }

    #[tokio::test]
    async fn a_relay_finds_each_tasks_last_message_among_untouched_frames() {
        use crate::proto::Status;
        let exit = FromExec::Exit {
            status: Status::Code(3),
            oom: false,
            cpu_s: 0.5,
            mem_peak_bytes: None,
        };
        let failed = FromExec::Failed {
            code: 127,
            message: "x: command not found".into(),
        };
        let evicted = FromExec::Evicted {
            node: "h1".into(),
            reason: "owner".into(),
        };
        // Output as large as a last message's variant, spread over frames:
        // its later frames start with such a byte too.
        let big = FromExec::Stdout(vec![6; 3 * CHUNK]);
        let msgs = vec![
            FromExec::Started { node: "h1".into() },
            FromExec::Stdout(vec![7, 9, 6]),
            big,
            FromExec::Content(vec![]),
            exit,
            FromExec::Unknown,
            failed,
            FromExec::NeedImage,
            evicted,
            FromExec::Need(vec![[6; 32]]),
        ];
        let mut sink = Frames::default();
        for m in &msgs {
            send(&mut sink, m).await.unwrap();
        }
        let mut b = Boundaries::default();
        let mut whole = Vec::new();
        let mut last = Vec::new();
        for f in &sink.0 {
            if let Some(m) = b.next(f) {
                whole.push(postcard::from_bytes::<FromExec>(m).unwrap());
                last.push(FromExec::encoded_ends_task(m));
            } else {
                assert!(f.len() > 1, "only a message's frames are passed by");
            }
        }
        assert!(b.between_messages());
        let expect: Vec<_> = msgs
            .iter()
            .filter(|m| !matches!(m, FromExec::Stdout(d) if d.len() > CHUNK))
            .cloned()
            .collect();
        assert_eq!(whole, expect, "every one-frame message, in order");
        assert_eq!(
            last,
            expect.iter().map(FromExec::ends_task).collect::<Vec<_>>()
        );
        assert_eq!(last.iter().filter(|l| **l).count(), 3);
        // Half way through a large message: not between messages.
        let mut b = Boundaries::default();
        let mut sink = Frames::default();
        send(&mut sink, &FromExec::Stdout(vec![0; 2 * CHUNK]))
            .await
            .unwrap();
        assert!(b.next(&sink.0[0]).is_none());
        assert!(!b.between_messages());
    }

    #[tokio::test]
    async fn oversized_frames_and_garbage_are_errors() {
        let (a, b) = tokio::io::duplex(1 << 16);
        let (br, _bw) = tokio::io::split(b);
        let (_ar, mut aw) = tokio::io::split(a);
        aw.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
        let mut rx = Plain(br);
        assert!(matches!(
            recv::<ToExec, _>(&mut rx).await,
            Err(LinkError::TooLarge(_))
        ));
        let (a, b) = tokio::io::duplex(1 << 16);
        let (br, _bw) = tokio::io::split(b);
        let (_ar, aw) = tokio::io::split(a);
        let mut tx = Plain(aw);
        tx.send_frame(&[0, 0xff, 0xff, 0xff, 0xff, 0xff])
            .await
            .unwrap();
        let mut rx = Plain(br);
        assert!(matches!(
            recv::<ToExec, _>(&mut rx).await,
            Err(LinkError::Decode(_))
        ));
    }
}
