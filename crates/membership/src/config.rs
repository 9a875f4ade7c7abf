//! SWIM parameters tuned for a LAN of ordinary machines.

use std::num::{NonZeroU32, NonZeroU8, NonZeroUsize};
use std::time::Duration;

/// foca's configuration for a room of machines on one LAN.
///
/// foca's `new_lan` copies memberlist's defaults: a 1 s probe period and a
/// suspicion of 4 × log10(N) periods, which takes about 6 s to declare a
/// crashed node down on a 5-node cluster (measured, `BENCHMARKS.md`). On a
/// LAN the round trip is well under a millisecond, so we probe every
/// 150 ms, wait 60 ms for a direct ack before asking three others for an
/// indirect probe, and give a suspected member 450 ms to refute. Gossip
/// runs every 100 ms to three members, so a refutation gets four or five
/// gossip rounds to spread, which is ample at 10 % loss. Measured here:
/// 0.72 s median detection, no false down in 60 s at 10 % loss.
///
/// `max_packet_size` leaves room for the sealing overhead (header, nonce
/// and tag) within a 1400-byte datagram.
pub fn lan_config(expected_size: u32) -> foca::Config {
    let size = NonZeroU32::new(expected_size.max(2)).unwrap_or(NonZeroU32::MIN);
    let mut config = foca::Config::new_lan(size);
    config.probe_period = Duration::from_millis(150);
    config.probe_rtt = Duration::from_millis(60);
    config.num_indirect_probes = NonZeroUsize::new(3).unwrap_or(NonZeroUsize::MIN);
    config.suspect_to_down_after = Duration::from_millis(450);
    config.max_transmissions = config
        .max_transmissions
        .max(NonZeroU8::new(6).unwrap_or(NonZeroU8::MIN));
    config.remove_down_after = Some(Duration::from_secs(3600));
    config.max_packet_size = NonZeroUsize::new(1300).unwrap_or(NonZeroUsize::MIN);
    config.notify_down_members = true;
    config.periodic_announce = Some(foca::PeriodicParams {
        frequency: Duration::from_secs(5),
        num_members: NonZeroUsize::MIN,
    });
    config.periodic_announce_to_down_members = Some(foca::PeriodicParams {
        frequency: Duration::from_secs(2),
        num_members: NonZeroUsize::new(2).unwrap_or(NonZeroUsize::MIN),
    });
    config.periodic_gossip = Some(foca::PeriodicParams {
        frequency: Duration::from_millis(100),
        num_members: NonZeroUsize::new(3).unwrap_or(NonZeroUsize::MIN),
    });
    config
}

/// foca's `new_lan`: memberlist's `DefaultLANConfig` (1 s probes, a
/// suspicion of 4 × log10(N) s). The conservative choice for networks that
/// drop packets in bursts; also the peer our benchmark compares against.
pub fn memberlist_lan_config(expected_size: u32) -> foca::Config {
    let size = NonZeroU32::new(expected_size.max(2)).unwrap_or(NonZeroU32::MIN);
    let mut config = foca::Config::new_lan(size);
    config.max_packet_size = NonZeroUsize::new(1300).unwrap_or(NonZeroUsize::MIN);
    config
}
