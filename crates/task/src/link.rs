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
}

/// Something that yields frames.
pub trait FrameSource: Send {
    /// The next frame.
    fn recv_frame(&mut self) -> impl Future<Output = Result<Vec<u8>, LinkError>> + Send;
}

impl<S: AsyncRead + AsyncWrite + Send> FrameSink for Writer<S> {
    async fn send_frame(&mut self, f: &[u8]) -> Result<(), LinkError> {
        Ok(self.send(f).await?)
    }
}

impl<S: AsyncRead + AsyncWrite + Send> FrameSource for Reader<S> {
    async fn recv_frame(&mut self) -> Result<Vec<u8>, LinkError> {
        Ok(self.recv().await?)
    }
}

/// Frames on a plain byte stream (the local Unix socket): u32 length
/// prefix.
#[derive(Debug)]
pub struct Plain<T>(pub T);

impl<W: AsyncWrite + Unpin + Send> FrameSink for Plain<W> {
    async fn send_frame(&mut self, f: &[u8]) -> Result<(), LinkError> {
        let mut buf = Vec::with_capacity(f.len() + 4);
        buf.extend_from_slice(&(f.len() as u32).to_be_bytes());
        buf.extend_from_slice(f);
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

/// Sends `msg` as one or more frames.
///
/// # Errors
/// The link failed.
pub async fn send<T: Serialize, S: FrameSink>(sink: &mut S, msg: &T) -> Result<(), LinkError> {
    let bytes = postcard::to_stdvec(msg)?;
    let mut chunks = bytes.chunks(CHUNK).peekable();
    if chunks.peek().is_none() {
        return sink.send_frame(&[0]).await;
    }
    while let Some(c) = chunks.next() {
        let mut f = Vec::with_capacity(c.len() + 1);
        f.push(u8::from(chunks.peek().is_some()));
        f.extend_from_slice(c);
        sink.send_frame(&f).await?;
    }
    Ok(())
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
