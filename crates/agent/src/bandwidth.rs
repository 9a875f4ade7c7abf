//! Bandwidth to a peer, on demand: a TCP exchange of sealed frames on the
//! agent's SWIM port. The request is authenticated like every datagram, so
//! a stranger cannot make an agent stream data at it.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use shoal_transport::{Channel, ClusterKey, Kind};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Plaintext bytes per frame.
const FRAME: usize = 64 * 1024;
/// Largest transfer a request may ask for.
pub const MAX_BYTES: u64 = 256 * 1024 * 1024;
/// Largest sealed frame accepted.
const MAX_SEALED: usize = FRAME + 64;

/// Why a measurement failed.
#[derive(Debug, thiserror::Error)]
pub enum BandwidthError {
    /// Network trouble.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The peer's frame did not authenticate or decode.
    #[error("bad frame from peer: {0}")]
    Frame(String),
    /// The peer took too long.
    #[error("timed out")]
    Timeout,
}

#[derive(Debug, Serialize, Deserialize)]
struct Request {
    bytes: u64,
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

async fn write_frame(s: &mut TcpStream, sealed: &[u8]) -> std::io::Result<()> {
    s.write_all(&(sealed.len() as u32).to_be_bytes()).await?;
    s.write_all(sealed).await
}

async fn read_frame(s: &mut TcpStream) -> Result<Vec<u8>, BandwidthError> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len).await?;
    let n = u32::from_be_bytes(len) as usize;
    if n > MAX_SEALED {
        return Err(BandwidthError::Frame(format!("frame of {n} bytes")));
    }
    let mut buf = vec![0u8; n];
    s.read_exact(&mut buf).await?;
    Ok(buf)
}

/// Serves bandwidth requests until the listener fails.
pub async fn serve(listener: TcpListener, key: ClusterKey, cluster: String) {
    loop {
        let Ok((mut s, peer)) = listener.accept().await else {
            continue;
        };
        let key = key.clone();
        let cluster = cluster.clone();
        tokio::spawn(async move {
            let mut ch = Channel::new(&key, &cluster);
            let res = tokio::time::timeout(Duration::from_secs(30), async {
                let req = read_frame(&mut s).await?;
                let (kind, plain) = ch
                    .open(&req, unix_now())
                    .map_err(|e| BandwidthError::Frame(e.to_string()))?;
                if kind != Kind::Bandwidth {
                    return Err(BandwidthError::Frame("not a bandwidth request".into()));
                }
                let req: Request = postcard::from_bytes(&plain)
                    .map_err(|e| BandwidthError::Frame(e.to_string()))?;
                let mut left = req.bytes.min(MAX_BYTES);
                let chunk = vec![0u8; FRAME];
                while left > 0 {
                    let n = (left as usize).min(FRAME);
                    let sealed = ch.seal(Kind::Bandwidth, &chunk[..n], unix_now());
                    write_frame(&mut s, &sealed).await?;
                    left -= n as u64;
                }
                Ok::<(), BandwidthError>(())
            })
            .await;
            match res {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::debug!(%peer, error = %e, "bandwidth request refused"),
                Err(_) => tracing::debug!(%peer, "bandwidth request timed out"),
            }
        });
    }
}

/// Measures the bandwidth to `peer` by asking it for `bytes`; MB/s.
///
/// # Errors
/// Connection failed, bad frames, or no answer within `timeout`.
pub async fn measure(
    peer: std::net::SocketAddr,
    key: &ClusterKey,
    cluster: &str,
    bytes: u64,
    timeout: Duration,
) -> Result<f64, BandwidthError> {
    let mut ch = Channel::new(key, cluster);
    tokio::time::timeout(timeout, async {
        let mut s = TcpStream::connect(peer).await?;
        s.set_nodelay(true)?;
        let req = postcard::to_stdvec(&Request { bytes })
            .map_err(|e| BandwidthError::Frame(e.to_string()))?;
        let start = Instant::now();
        write_frame(&mut s, &ch.seal(Kind::Bandwidth, &req, unix_now())).await?;
        let want = bytes.min(MAX_BYTES);
        let mut got = 0u64;
        while got < want {
            let frame = read_frame(&mut s).await?;
            let (_, plain) = ch
                .open(&frame, unix_now())
                .map_err(|e| BandwidthError::Frame(e.to_string()))?;
            got += plain.len() as u64;
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

    #[tokio::test]
    async fn loopback_measurement_and_wrong_key_refused() {
        let key = ClusterKey::from_bytes([7; 32]);
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(serve(l, key.clone(), "lab".into()));
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
