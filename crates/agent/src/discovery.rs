//! Zero-configuration discovery: sealed UDP multicast beacons on the local
//! segment, with broadcast as the fallback when multicast is unavailable.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};

use serde::{Deserialize, Serialize};
use shoal_membership::NodeId;
use socket2::{Domain, Protocol, Socket, Type};

/// What a beacon says: "I am `id`, of cluster `cluster`". It is sealed
/// with the cluster key, so only members of the same cluster can read it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Beacon {
    /// Cluster name (also bound into the key derivation).
    pub cluster: String,
    /// The sender.
    pub id: NodeId,
}

/// The discovery socket and where to send beacons.
#[derive(Debug)]
pub struct Discovery {
    /// Bound to the group's port on every address.
    pub socket: tokio::net::UdpSocket,
    /// The multicast group, when joining it worked.
    pub group: Option<SocketAddr>,
    /// The subnet broadcast address, the fallback.
    pub broadcast: Option<SocketAddr>,
}

/// The first IPv4 address of an interface that is up and not loopback,
/// with its broadcast address.
pub fn local_ipv4() -> Option<(Ipv4Addr, Option<Ipv4Addr>)> {
    let addrs = nix::ifaddrs::getifaddrs().ok()?;
    for a in addrs {
        use nix::net::if_::InterfaceFlags as F;
        if !a.flags.contains(F::IFF_UP) || a.flags.contains(F::IFF_LOOPBACK) {
            continue;
        }
        let Some(ip) = a
            .address
            .as_ref()
            .and_then(|s| s.as_sockaddr_in())
            .map(|s| s.ip())
        else {
            continue;
        };
        let bcast = a
            .broadcast
            .as_ref()
            .and_then(|s| s.as_sockaddr_in())
            .map(|s| s.ip());
        return Some((ip, bcast));
    }
    None
}

/// Broadcast address of the interface holding `ip`.
fn broadcast_of(ip: Ipv4Addr) -> Option<Ipv4Addr> {
    let addrs = nix::ifaddrs::getifaddrs().ok()?;
    addrs
        .filter(|a| {
            a.address
                .as_ref()
                .and_then(|s| s.as_sockaddr_in())
                .is_some_and(|s| s.ip() == ip)
        })
        .find_map(|a| {
            a.broadcast
                .as_ref()
                .and_then(|s| s.as_sockaddr_in())
                .map(|s| s.ip())
        })
}

/// Opens the discovery socket on `group`'s port, joins the group on the
/// interface of `local`, and finds the broadcast fallback.
///
/// # Errors
/// The socket could not be bound (another program holds the port without
/// address reuse).
pub fn open(group: SocketAddr, local: IpAddr, broadcast: bool) -> std::io::Result<Discovery> {
    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    s.set_broadcast(true)?;
    s.set_nonblocking(true)?;
    s.bind(&SocketAddr::from(([0, 0, 0, 0], group.port())).into())?;
    let local4 = match local {
        IpAddr::V4(v) => v,
        IpAddr::V6(_) => Ipv4Addr::UNSPECIFIED,
    };
    let joined = match group.ip() {
        IpAddr::V4(g) => s
            .join_multicast_v4(&g, &local4)
            .and_then(|()| s.set_multicast_if_v4(&local4))
            .and_then(|()| s.set_multicast_loop_v4(true))
            .and_then(|()| s.set_multicast_ttl_v4(1)),
        IpAddr::V6(_) => Err(std::io::Error::other("IPv6 groups are not supported")),
    };
    if let Err(e) = &joined {
        tracing::warn!(error = %e, %group, "cannot join the discovery group; using broadcast only");
    }
    let bcast = if broadcast {
        broadcast_of(local4).map(|b| SocketAddr::V4(SocketAddrV4::new(b, group.port())))
    } else {
        None
    };
    Ok(Discovery {
        socket: tokio::net::UdpSocket::from_std(s.into())?,
        group: joined.ok().map(|()| group),
        broadcast: bcast,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn beacon_roundtrip() {
        let b = Beacon {
            cluster: "lab".into(),
            id: NodeId::new("10.0.0.1:7946".parse().unwrap(), "a", 1),
        };
        let bytes = postcard::to_stdvec(&b).unwrap();
        assert_eq!(postcard::from_bytes::<Beacon>(&bytes).unwrap(), b);
    }
}
