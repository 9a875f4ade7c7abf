//! Bandwidth to a peer, on demand: a TCP connection on the agent's SWIM
//! port, authenticated and encrypted like all task traffic
//! ([`shoal_transport::stream`]), so a stranger cannot make an agent stream
//! data at it, and the figure is that of the channel tasks will use.

use std::time::{Duration, Instant};

use shoal_transport::stream::{self, StreamError, Writer, MAX_PAYLOAD};
use shoal_transport::ClusterKey;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use crate::peer::Hello;

/// Largest transfer a request may ask for.
pub const MAX_BYTES: u64 = 256 * 1024 * 1024;

/// Why a measurement failed.
#[derive(Debug, thiserror::Error)]
pub enum BandwidthError {
    /// Network trouble or a refused peer.
    #[error("{0}")]
    Stream(#[from] StreamError),
    /// Connecting failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The request did not encode.
    #[error("bad request: {0}")]
    Request(#[from] postcard::Error),
    /// The peer took too long.
    #[error("timed out")]
    Timeout,
}

/// Streams `bytes` of data back on an accepted stream.
///
/// # Errors
/// The stream failed.
pub async fn answer<S: AsyncRead + AsyncWrite + Send>(
    mut w: Writer<S>,
    bytes: u64,
) -> Result<(), BandwidthError> {
    let mut left = bytes.min(MAX_BYTES);
    let chunk = vec![0u8; MAX_PAYLOAD];
    while left > 0 {
        let n = (left as usize).min(MAX_PAYLOAD);
        w.send(&chunk[..n]).await?;
        left -= n as u64;
    }
    w.close().await?;
    Ok(())
}

/// Measures the bandwidth to `peer` by asking it for `bytes`; MB/s.
///
/// # Errors
/// Connection failed, the peer was refused, or no answer within `timeout`.
pub async fn measure(
    peer: std::net::SocketAddr,
    key: &ClusterKey,
    cluster: &str,
    bytes: u64,
    timeout: Duration,
) -> Result<f64, BandwidthError> {
    tokio::time::timeout(timeout, async {
        let s = TcpStream::connect(peer).await?;
        s.set_nodelay(true)?;
        let (mut r, mut w) = stream::connect(s, key, cluster).await?;
        let start = Instant::now();
        w.send(&postcard::to_stdvec(&Hello::Bandwidth { bytes })?)
            .await?;
        let want = bytes.min(MAX_BYTES);
        let mut got = 0u64;
        while got < want {
            got += r.recv().await?.len() as u64;
        }
        let secs = start.elapsed().as_secs_f64().max(1e-9);
        Ok(got as f64 / secs / 1e6)
    })
    .await
    .map_err(|_| BandwidthError::Timeout)?
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::peer;

    #[tokio::test]
    async fn loopback_measurement_and_wrong_key_refused() {
        let key = ClusterKey::from_bytes([7; 32]);
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(peer::serve(l, key.clone(), "lab".into(), None));
        let mbps = measure(addr, &key, "lab", 4 << 20, Duration::from_secs(10))
            .await
            .unwrap();
        assert!(mbps > 0.0);
        let wrong = ClusterKey::from_bytes([8; 32]);
        assert!(
            measure(addr, &wrong, "lab", 1 << 20, Duration::from_secs(5))
                .await
                .is_err()
        );
        assert!(
            measure(addr, &key, "office", 1 << 20, Duration::from_secs(5))
                .await
                .is_err()
        );
    }
}
