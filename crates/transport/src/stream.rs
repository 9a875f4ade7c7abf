//! Authenticated, encrypted byte streams between agents (task traffic):
//! Noise `NNpsk0` (snow) with a pre-shared key derived from the cluster
//! key and name.
//!
//! ```text
//!  initiator                         responder
//!     ── psk, e  (+16-byte tag) ──▶  refuses here without the key:
//!                                    no task byte is read before this
//!     ◀── e, ee ──
//!     ══ ChaCha20-Poly1305 frames, u16 length prefix, ≤ 65535 bytes ══
//! ```
//!
//! Both ends prove they hold the cluster key; the ephemeral Diffie-Hellman
//! gives each connection its own keys (forward secrecy). After the
//! handshake the stream splits into a reader and a writer with their own
//! nonces, so a task can stream stdin one way and output the other.

use std::sync::Arc;
use std::time::Duration;

use hkdf::Hkdf;
use sha2::Sha256;
use snow::{Builder, StatelessTransportState};
use tokio::io::{
    AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, ReadHalf, WriteHalf,
};

use crate::ClusterKey;

const PATTERN: &str = "Noise_NNpsk0_25519_ChaChaPoly_BLAKE2s";
const PROLOGUE: &[u8] = b"shoal/v1 stream";
/// Largest Noise message.
const MAX_MSG: usize = 65535;
/// Largest payload of one [`Writer::send`].
pub const MAX_PAYLOAD: usize = MAX_MSG - 16;
/// How long a handshake may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a stream failed. The connection should be dropped.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// The peer does not hold the cluster key (or not this cluster's name),
    /// or the bytes were tampered with.
    #[error("peer refused: authentication failed (wrong cluster key or name?)")]
    Auth,
    /// The network failed or the peer hung up.
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    /// The handshake did not finish in time.
    #[error("handshake timed out")]
    Timeout,
    /// A payload larger than one frame.
    #[error("payload of {0} bytes exceeds {MAX_PAYLOAD}")]
    TooLarge(usize),
    /// The peer closed the stream cleanly.
    #[error("peer closed the stream")]
    Closed,
    /// A snow error that is not an authentication failure.
    #[error("noise: {0}")]
    Noise(String),
}

fn psk(key: &ClusterKey, cluster: &str) -> [u8; 32] {
    let hk = Hkdf::<Sha256>::new(Some(b"shoal/v1"), &key.0);
    let mut okm = [0u8; 32];
    let info = format!("stream:{cluster}");
    let _ = hk.expand(info.as_bytes(), &mut okm);
    okm
}

fn noise_err(e: snow::Error) -> StreamError {
    match e {
        snow::Error::Decrypt => StreamError::Auth,
        other => StreamError::Noise(other.to_string()),
    }
}

async fn read_msg<R: AsyncRead + Unpin>(r: &mut R, buf: &mut Vec<u8>) -> Result<(), StreamError> {
    let mut len = [0u8; 2];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Err(StreamError::Closed),
        Err(e) => return Err(e.into()),
    }
    let n = usize::from(u16::from_be_bytes(len));
    buf.resize(n, 0);
    r.read_exact(buf).await?;
    Ok(())
}

async fn write_msg<W: AsyncWrite + Unpin>(w: &mut W, msg: &[u8]) -> Result<(), StreamError> {
    let len = u16::try_from(msg.len()).map_err(|_| StreamError::TooLarge(msg.len()))?;
    let mut out = Vec::with_capacity(msg.len() + 2);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(msg);
    w.write_all(&out).await?;
    Ok(())
}

/// What a [`Reader`] reads ahead: a task's small messages (a few lines of
/// output, the exit status) in one read; a larger message is read past it.
const READ_BUFFER: usize = 16 * 1024;

/// The receiving half of an authenticated stream.
pub struct Reader<S> {
    /// Buffered: one read takes whatever messages have come, not two
    /// reads (length, then body) per message.
    io: BufReader<ReadHalf<S>>,
    noise: Arc<StatelessTransportState>,
    nonce: u64,
    buf: Vec<u8>,
}

/// The sending half of an authenticated stream.
pub struct Writer<S> {
    io: WriteHalf<S>,
    noise: Arc<StatelessTransportState>,
    nonce: u64,
}

impl<S> std::fmt::Debug for Reader<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reader")
            .field("nonce", &self.nonce)
            .finish_non_exhaustive()
    }
}

impl<S> std::fmt::Debug for Writer<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writer")
            .field("nonce", &self.nonce)
            .finish_non_exhaustive()
    }
}

impl<S: AsyncRead + AsyncWrite> Reader<S> {
    /// The next payload the peer sent.
    ///
    /// # Errors
    /// [`StreamError::Closed`] at a clean end; `Auth` for tampered bytes.
    pub async fn recv(&mut self) -> Result<Vec<u8>, StreamError> {
        read_msg(&mut self.io, &mut self.buf).await?;
        let mut out = vec![0u8; self.buf.len()];
        let n = self
            .noise
            .read_message(self.nonce, &self.buf, &mut out)
            .map_err(noise_err)?;
        self.nonce += 1;
        out.truncate(n);
        Ok(out)
    }

    /// Whether the next message has come whole already: [`Reader::recv`]
    /// would return it without waiting.
    pub fn message_ready(&self) -> bool {
        match self.io.buffer() {
            [a, b, rest @ ..] => rest.len() >= usize::from(u16::from_be_bytes([*a, *b])),
            _ => false,
        }
    }
}

impl<S: AsyncRead> Reader<S> {
    /// Whether a link kept idle between uses is still open and has said
    /// nothing: looks once, without waiting. A peer that closed (its end,
    /// or its process, gone) or that sent anything (a byte is then taken,
    /// so the link is not to be used again) makes it `false`.
    pub fn idle_and_open(&mut self) -> bool {
        let mut one = [0u8; 1];
        let mut buf = tokio::io::ReadBuf::new(&mut one);
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        matches!(
            std::pin::Pin::new(&mut self.io).poll_read(&mut cx, &mut buf),
            std::task::Poll::Pending
        )
    }
}

impl<S: AsyncRead + AsyncWrite> Writer<S> {
    /// Sends one payload of at most [`MAX_PAYLOAD`] bytes.
    ///
    /// # Errors
    /// Too large, or the connection failed.
    pub async fn send(&mut self, payload: &[u8]) -> Result<(), StreamError> {
        self.send_many(&[payload]).await
    }

    /// Sends payloads of at most [`MAX_PAYLOAD`] bytes each, in order, in
    /// one write: the peer wakes once for them all.
    ///
    /// # Errors
    /// One is too large (none is then sent), or the connection failed.
    pub async fn send_many(&mut self, payloads: &[&[u8]]) -> Result<(), StreamError> {
        if let Some(p) = payloads.iter().find(|p| p.len() > MAX_PAYLOAD) {
            return Err(StreamError::TooLarge(p.len()));
        }
        let total: usize = payloads.iter().map(|p| p.len() + 18).sum();
        let mut out = Vec::with_capacity(total);
        for payload in payloads {
            let at = out.len();
            // The length prefix, then the sealed message (payload + tag).
            out.resize(at + 2 + payload.len() + 16, 0);
            let n = self
                .noise
                .write_message(self.nonce, payload, &mut out[at + 2..])
                .map_err(noise_err)?;
            self.nonce += 1;
            let len = u16::try_from(n).map_err(|_| StreamError::TooLarge(n))?;
            out[at..at + 2].copy_from_slice(&len.to_be_bytes());
            out.truncate(at + 2 + n);
        }
        self.io.write_all(&out).await?;
        Ok(())
    }

    /// Flushes and shuts down the sending direction.
    ///
    /// # Errors
    /// The connection failed.
    pub async fn close(&mut self) -> Result<(), StreamError> {
        self.io.shutdown().await?;
        Ok(())
    }
}

fn split<S: AsyncRead + AsyncWrite>(
    io: S,
    noise: StatelessTransportState,
) -> (Reader<S>, Writer<S>) {
    let (r, w) = tokio::io::split(io);
    let noise = Arc::new(noise);
    (
        Reader {
            io: BufReader::with_capacity(READ_BUFFER, r),
            noise: noise.clone(),
            nonce: 0,
            buf: Vec::new(),
        },
        Writer {
            io: w,
            noise,
            nonce: 0,
        },
    )
}

/// The handshake state for this cluster's key, as initiator or responder.
fn handshake(
    key: &ClusterKey,
    cluster: &str,
    initiator: bool,
) -> Result<snow::HandshakeState, StreamError> {
    let psk = psk(key, cluster);
    let b = Builder::new(PATTERN.parse().map_err(noise_err)?)
        .prologue(PROLOGUE)
        .and_then(|b| b.psk(0, &psk))
        .map_err(noise_err)?;
    if initiator {
        b.build_initiator()
    } else {
        b.build_responder()
    }
    .map_err(noise_err)
}

/// Opens an authenticated stream over `io` as the initiator.
///
/// # Errors
/// The peer does not hold the key, the handshake timed out, or I/O failed.
pub async fn connect<S: AsyncRead + AsyncWrite + Unpin>(
    mut io: S,
    key: &ClusterKey,
    cluster: &str,
) -> Result<(Reader<S>, Writer<S>), StreamError> {
    let hs = async {
        let mut hs = handshake(key, cluster, true)?;
        let mut msg = vec![0u8; MAX_MSG];
        let n = hs.write_message(&[], &mut msg).map_err(noise_err)?;
        write_msg(&mut io, &msg[..n]).await?;
        let mut buf = Vec::new();
        read_msg(&mut io, &mut buf).await.map_err(|e| match e {
            // A responder without our key hangs up on our first message.
            StreamError::Closed => StreamError::Auth,
            other => other,
        })?;
        hs.read_message(&buf, &mut msg).map_err(noise_err)?;
        hs.into_stateless_transport_mode().map_err(noise_err)
    };
    let noise = tokio::time::timeout(HANDSHAKE_TIMEOUT, hs)
        .await
        .map_err(|_| StreamError::Timeout)??;
    Ok(split(io, noise))
}

/// Accepts an authenticated stream over `io` as the responder. A peer
/// without the key is refused after its first handshake message, before
/// anything else is read.
///
/// # Errors
/// The peer does not hold the key, the handshake timed out, or I/O failed.
pub async fn accept<S: AsyncRead + AsyncWrite + Unpin>(
    mut io: S,
    key: &ClusterKey,
    cluster: &str,
) -> Result<(Reader<S>, Writer<S>), StreamError> {
    let hs = async {
        let mut hs = handshake(key, cluster, false)?;
        let mut buf = Vec::new();
        read_msg(&mut io, &mut buf).await?;
        let mut msg = vec![0u8; MAX_MSG];
        hs.read_message(&buf, &mut msg).map_err(noise_err)?;
        let n = hs.write_message(&[], &mut msg).map_err(noise_err)?;
        write_msg(&mut io, &msg[..n]).await?;
        hs.into_stateless_transport_mode().map_err(noise_err)
    };
    let noise = tokio::time::timeout(HANDSHAKE_TIMEOUT, hs)
        .await
        .map_err(|_| StreamError::Timeout)??;
    Ok(split(io, noise))
}

#[cfg(test)]
mod tests {
    use tokio::io::duplex;

    use super::*;

    fn key(b: u8) -> ClusterKey {
        ClusterKey::from_bytes([b; 32])
    }

    #[tokio::test]
    async fn an_idle_link_is_open_until_its_peer_speaks_or_leaves() {
        let (a, b) = duplex(1 << 16);
        let server = tokio::spawn(async move { accept(b, &key(1), "lab").await.unwrap() });
        let (mut r, _w) = connect(a, &key(1), "lab").await.unwrap();
        let (sr, mut sw) = server.await.unwrap();
        assert!(r.idle_and_open(), "quiet and open");
        assert!(r.idle_and_open(), "looking takes nothing");
        sw.send(b"unasked").await.unwrap();
        assert!(!r.idle_and_open(), "it spoke");
        let (a, b) = duplex(1 << 16);
        let server = tokio::spawn(async move { accept(b, &key(1), "lab").await.unwrap() });
        let (mut r, _w) = connect(a, &key(1), "lab").await.unwrap();
        drop(server.await.unwrap());
        assert!(!r.idle_and_open(), "its peer is gone");
        drop(sr);
    }

    #[tokio::test]
    async fn roundtrip_both_ways_and_large_payloads() {
        let (a, b) = duplex(1 << 20);
        let server = tokio::spawn(async move {
            let (mut r, mut w) = accept(b, &key(1), "lab").await.unwrap();
            while let Ok(m) = r.recv().await {
                w.send(&m).await.unwrap();
            }
        });
        let (mut r, mut w) = connect(a, &key(1), "lab").await.unwrap();
        for size in [0, 1, 1000, MAX_PAYLOAD] {
            let m: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
            w.send(&m).await.unwrap();
            assert_eq!(r.recv().await.unwrap(), m);
        }
        assert!(matches!(
            w.send(&vec![0; MAX_PAYLOAD + 1]).await,
            Err(StreamError::TooLarge(_))
        ));
        w.close().await.unwrap();
        assert!(matches!(r.recv().await, Err(StreamError::Closed)));
        server.await.unwrap();
    }

    #[tokio::test]
    async fn payloads_sent_together_arrive_in_order_and_the_stream_goes_on() {
        let (a, b) = duplex(1 << 20);
        let server = tokio::spawn(async move {
            let (mut r, _w) = accept(b, &key(1), "lab").await.unwrap();
            let mut got = Vec::new();
            while let Ok(m) = r.recv().await {
                got.push(m);
            }
            got
        });
        let (_r, mut w) = connect(a, &key(1), "lab").await.unwrap();
        let big: Vec<u8> = (0..MAX_PAYLOAD).map(|i| (i % 251) as u8).collect();
        w.send_many(&[b"one", b"", &big, b"four"]).await.unwrap();
        // One too large: none of them goes.
        assert!(matches!(
            w.send_many(&[b"no", &vec![0; MAX_PAYLOAD + 1]]).await,
            Err(StreamError::TooLarge(_))
        ));
        w.send(b"after").await.unwrap();
        w.close().await.unwrap();
        let got = server.await.unwrap();
        let want: Vec<Vec<u8>> = vec![
            b"one".to_vec(),
            vec![],
            big,
            b"four".to_vec(),
            b"after".to_vec(),
        ];
        assert_eq!(got, want);
    }

    #[tokio::test]
    async fn a_reader_tells_when_the_next_message_has_come_whole() {
        let (a, b) = duplex(1 << 20);
        let server = tokio::spawn(async move { accept(b, &key(1), "lab").await.unwrap() });
        let (_r, mut w) = connect(a, &key(1), "lab").await.unwrap();
        let (mut r, _w) = server.await.unwrap();
        assert!(!r.message_ready(), "nothing sent yet");
        w.send_many(&[b"one", b"two", b"three"]).await.unwrap();
        assert_eq!(r.recv().await.unwrap(), b"one");
        assert!(r.message_ready());
        assert_eq!(r.recv().await.unwrap(), b"two");
        assert!(r.message_ready());
        assert_eq!(r.recv().await.unwrap(), b"three");
        assert!(!r.message_ready(), "all taken");
        // A message larger than what is read ahead still comes whole.
        let big = vec![5u8; 40_000];
        w.send(&big).await.unwrap();
        w.send(b"after").await.unwrap();
        assert_eq!(r.recv().await.unwrap(), big);
        assert_eq!(r.recv().await.unwrap(), b"after");
    }

    #[tokio::test]
    async fn wrong_key_or_cluster_is_refused_at_the_first_message() {
        for (k, c) in [(key(2), "lab"), (key(1), "office")] {
            let (a, b) = duplex(1 << 16);
            let server = tokio::spawn(async move { accept(b, &key(1), "lab").await.map(|_| ()) });
            let client = connect(a, &k, c).await;
            let s = server.await.unwrap();
            assert!(matches!(s, Err(StreamError::Auth)), "{s:?}");
            assert!(client.is_err());
        }
    }

    #[tokio::test]
    async fn tampered_frame_is_refused() {
        let (a, b) = duplex(1 << 16);
        // A man in the middle that flips one byte of the third message.
        let (m1, m2) = duplex(1 << 16);
        let relay = tokio::spawn(async move {
            let (mut ar, mut aw) = tokio::io::split(b);
            let (mut br, mut bw) = tokio::io::split(m1);
            let up = async {
                let mut n = 0;
                let mut len = [0u8; 2];
                while ar.read_exact(&mut len).await.is_ok() {
                    let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
                    ar.read_exact(&mut buf).await.unwrap();
                    n += 1;
                    if n == 2 {
                        buf[0] ^= 1;
                    }
                    bw.write_all(&len).await.unwrap();
                    bw.write_all(&buf).await.unwrap();
                }
            };
            let down = tokio::io::copy(&mut br, &mut aw);
            let _ = tokio::join!(up, down);
        });
        let server = tokio::spawn(async move {
            let (mut r, _w) = accept(m2, &key(1), "lab").await.unwrap();
            r.recv().await
        });
        let (_r, mut w) = connect(a, &key(1), "lab").await.unwrap();
        w.send(b"run rm -rf /").await.unwrap();
        assert!(matches!(server.await.unwrap(), Err(StreamError::Auth)));
        relay.abort();
    }

    #[tokio::test]
    async fn silence_times_out() {
        let (a, _b) = duplex(1 << 16);
        tokio::time::pause();
        let r = connect(a, &key(1), "lab").await;
        assert!(matches!(r, Err(StreamError::Timeout)));
    }
}
