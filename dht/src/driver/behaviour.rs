//! The node's libp2p stack: transport and composed behaviour.
//!
//! Job: build the one [`Swarm`] a node runs: TCP, then the pnet pre-shared
//! key handshake (so a stranger without the cluster key cannot even reach
//! the security handshake), then noise and yamux; DNS resolution under TCP
//! for `/dns4/…` bootstrap addresses. The behaviour composes identify, Kademlia
//! (kadmq's own protocol name, server mode), gossipsub (the membership
//! topic) and libp2p-stream (the frame protocol). Boundary: construction
//! only; the event loop drives the swarm.

use std::{
    collections::hash_map::DefaultHasher,
    hash::{Hash, Hasher},
    io,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use libp2p::{
    core::{
        muxing::StreamMuxerBox,
        transport::{upgrade::Version, DialOpts, ListenerId, PortUse, TransportError, TransportEvent},
    },
    dns, gossipsub, identify,
    identity::Keypair,
    kad, noise,
    pnet::{PnetConfig, PreSharedKey},
    swarm::NetworkBehaviour,
    tcp, yamux, Multiaddr, StreamProtocol, Swarm, Transport,
};

use super::{DriverConfig, Error};

/// Kademlia protocol name: kadmq nodes form their own DHT, apart from IPFS.
pub const KAD_PROTOCOL: StreamProtocol = StreamProtocol::new("/kadmq/kad/1.0.0");
/// Identify protocol version string.
pub const IDENTIFY_PROTOCOL: &str = "/kadmq/id/1.0.0";
/// Gossipsub topic of node records and heartbeats.
pub const MEMBERSHIP_TOPIC: &str = "kadmq/membership/1";

/// Everything a kadmq node speaks, composed.
#[derive(NetworkBehaviour)]
pub struct Behaviour {
    pub identify: identify::Behaviour,
    pub kad: kad::Behaviour<kad::store::MemoryStore>,
    pub gossipsub: gossipsub::Behaviour,
    pub stream: libp2p_stream::Behaviour,
}

impl Behaviour {
    fn new(key: &Keypair, config: &DriverConfig) -> Result<Self, Error> {
        let peer_id = key.public().to_peer_id();

        let identify = identify::Behaviour::new(
            identify::Config::new(IDENTIFY_PROTOCOL.to_string(), key.public())
                .with_agent_version(format!("kadmq/{}", env!("CARGO_PKG_VERSION"))),
        );

        let mut kad_config = kad::Config::new(KAD_PROTOCOL);
        kad_config.set_query_timeout(Duration::from_secs(30));
        kad_config.set_periodic_bootstrap_interval(Some(Duration::from_secs(60)));
        let mut kad = kad::Behaviour::with_config(peer_id, kad::store::MemoryStore::new(peer_id), kad_config);
        // Without a confirmed external address kad stays a client and never
        // answers queries; every kadmq node is a full DHT member.
        kad.set_mode(Some(kad::Mode::Server));

        // Gossipsub's own mesh heartbeat, not ours. Its default first
        // heartbeat comes after 5 s; in a fleet that must converge within
        // seconds the mesh should form sooner.
        let mesh_heartbeat = config.heartbeat_interval.min(Duration::from_secs(1));
        let gossipsub_config = gossipsub::ConfigBuilder::default()
            .heartbeat_interval(mesh_heartbeat)
            .heartbeat_initial_delay(Duration::from_millis(100))
            .validation_mode(gossipsub::ValidationMode::Strict)
            // Records carry (incarnation, seq), so content identifies a
            // message; the default (source, sequence number) could collide
            // after a restart with the same peer id.
            .message_id_fn(|message: &gossipsub::Message| {
                let mut hasher = DefaultHasher::new();
                message.source.hash(&mut hasher);
                message.data.hash(&mut hasher);
                gossipsub::MessageId::from(hasher.finish().to_be_bytes().to_vec())
            })
            .build()
            .map_err(|e| Error::Build(format!("gossipsub config: {e}")))?;
        let gossipsub =
            gossipsub::Behaviour::new(gossipsub::MessageAuthenticity::Signed(key.clone()), gossipsub_config)
                .map_err(|e| Error::Build(format!("gossipsub: {e}")))?;

        Ok(Self { identify, kad, gossipsub, stream: libp2p_stream::Behaviour::new() })
    }
}

/// Builds the swarm for `config`: TCP (behind DNS resolution) + pnet +
/// noise + yamux, and the composed [`Behaviour`].
pub fn build_swarm(config: &DriverConfig) -> Result<Swarm<Behaviour>, Error> {
    let psk: PreSharedKey = config.cluster_key;
    let handshake_timeout = config.handshake_timeout;
    let swarm = libp2p::SwarmBuilder::with_existing_identity(config.keypair.clone())
        .with_tokio()
        .with_other_transport(|key| {
            let noise = noise::Config::new(key)?;
            // DNS wraps TCP alone (not the whole stack, as the builder's
            // `with_dns` would) so that every failure below the pnet
            // handshake can be told apart from a failed handshake: see
            // `is_network_error`.
            let tcp = NewPortPerDial(tcp::tokio::Transport::new(tcp::Config::default().nodelay(true)));
            let network =
                dns::tokio::Transport::system(tcp)?.map_err(|e| io::Error::other(NetworkError(e.to_string())));
            let transport = network
                .and_then(move |socket, _| PnetConfig::new(psk).handshake(socket))
                .upgrade(Version::V1Lazy)
                .authenticate(noise)
                .multiplex(yamux::Config::default())
                .map(|(peer, muxer), _| (peer, StreamMuxerBox::new(muxer)));
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(transport)
        })
        .map_err(|e| Error::Build(format!("transport: {e}")))?
        .with_behaviour(|key| {
            Behaviour::new(key, config).map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)
        })
        .map_err(|e| Error::Build(format!("behaviour: {e}")))?
        // Links between nodes are long-lived; the frame streams and gossip
        // keep them busy, but an idle cluster must not drop its links.
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(3600)))
        // Bounds the whole dial and upgrade; see `handshake_timeout`.
        .with_connection_timeout(handshake_timeout)
        .build();
    Ok(swarm)
}

/// Dials every connection from a fresh ephemeral port.
///
/// libp2p-tcp otherwise binds outgoing sockets to the listening port (port
/// reuse, meant for NAT hole punching). Two nodes that dial each other at the
/// same moment then try the same TCP 4-tuple from both ends: the kernel's
/// simultaneous open leaves one of the two libp2p connections broken shortly
/// after it formed, and whatever was written on its streams is lost. Nodes of
/// a cluster listen on reachable addresses; they never need port reuse.
struct NewPortPerDial<T>(T);

impl<T: Transport + Unpin> Transport for NewPortPerDial<T> {
    type Output = T::Output;
    type Error = T::Error;
    type ListenerUpgrade = T::ListenerUpgrade;
    type Dial = T::Dial;

    fn listen_on(&mut self, id: ListenerId, addr: Multiaddr) -> Result<(), TransportError<Self::Error>> {
        self.0.listen_on(id, addr)
    }

    fn remove_listener(&mut self, id: ListenerId) -> bool {
        self.0.remove_listener(id)
    }

    fn dial(&mut self, addr: Multiaddr, opts: DialOpts) -> Result<Self::Dial, TransportError<Self::Error>> {
        self.0.dial(addr, DialOpts { port_use: PortUse::New, ..opts })
    }

    fn poll(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<TransportEvent<Self::ListenerUpgrade, Self::Error>> {
        Pin::new(&mut self.0).poll(cx)
    }
}

/// Marks an error of the DNS + TCP layer, below the pnet handshake.
#[derive(Debug)]
struct NetworkError(String);

const NETWORK_ERROR_MARK: &str = "unreachable: ";

impl std::fmt::Display for NetworkError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{NETWORK_ERROR_MARK}{}", self.0)
    }
}

impl std::error::Error for NetworkError {}

/// Whether a dial error came from DNS or TCP (the peer is unreachable)
/// rather than from the pnet/noise/yamux upgrade (the peer answered but
/// the handshake failed, which with pnet usually means another cluster
/// key). The upgrade layers wrap errors in types (`Either`, upgrade
/// errors) whose `source` chains skip levels, so this looks for the mark
/// in the rendered chain.
pub(crate) fn is_network_error(error: &io::Error) -> bool {
    error_chain(error).contains(NETWORK_ERROR_MARK)
}

/// Renders an error and its sources (looking inside `io::Error`s, whose
/// `source` skips the wrapped error) as `outer: inner: …`, skipping levels
/// that repeat their inner error's text or say nothing.
pub(crate) fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut current = Some(error);
    while let Some(e) = current {
        let text = e.to_string();
        if !text.is_empty() && !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        current = match e.downcast_ref::<io::Error>().and_then(|io| io.get_ref()) {
            Some(inner) => Some(inner as _),
            None => e.source(),
        };
    }
    parts.join(": ")
}
