//! The handle the rest of kadmq holds on the cluster.
//!
//! Job: a cheap, cloneable [`Client`] that asks the event loop for things by
//! sending a `Command` with a oneshot reply, and the [`Event`]s the event
//! loop reports back. Boundary: the client never touches the swarm; frame
//! payloads go straight into the per-peer writer queue the event loop hands
//! out (and the client caches), so sending does not cost an event-loop
//! round trip per frame.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use bytes::Bytes;
use libp2p::{Multiaddr, PeerId};
use tokio::sync::{mpsc, oneshot};

use super::{
    budget::{Charged, SendBudget},
    frames::MAX_FRAME,
    membership::Load,
    Error, Member,
};

/// A peer's writer queue: frames with their share of the send budget.
pub(crate) type LinkQueue = mpsc::UnboundedSender<(Bytes, Charged)>;

/// What the driver reports to its user.
#[derive(Debug, Clone)]
pub enum Event {
    /// A member joined, restarted (higher incarnation), or was heard from
    /// again after being suspect or dead.
    MemberUp(Member),
    /// No heartbeat from this member for the suspect timeout.
    MemberSuspect(PeerId),
    /// No heartbeat for the dead timeout, or it left cleanly.
    MemberDead(PeerId),
    /// A frame from another node, in the order that node sent it. `held`
    /// is its share of the node's receive budget
    /// ([`super::DriverConfig::receive_buffer`]): drop it once the frame
    /// is dealt with, or readers stop reading.
    Frame { from: PeerId, bytes: Bytes, held: Arc<Charged> },
    /// A peer whose record announces other fleet settings (replication,
    /// shard depth, frame version) than this node's: it is not admitted (no
    /// `MemberUp`, frames to it dropped, its frame streams refused). Once
    /// per peer until its record matches; `reason` says what differs.
    MemberRefused { peer: PeerId, reason: String },
    /// Frames sent to `peer` may not have arrived: a write to its frame
    /// stream failed (the frames of that write are dropped), or its last
    /// connection closed (frames written just before may be lost with it).
    /// Delivery is at most once; the user repairs what it must.
    FramesLost { peer: PeerId },
}

/// Requests from a [`Client`] to the event loop.
#[derive(Debug)]
pub(crate) enum Command {
    /// The writer queue for a peer, created on demand; `None` if frames to
    /// it are being dropped (blocked by the fault hook).
    Link {
        peer: PeerId,
        reply: oneshot::Sender<Result<Option<LinkQueue>, Error>>,
    },
    Members {
        reply: oneshot::Sender<Vec<Member>>,
    },
    ListenAddrs {
        reply: oneshot::Sender<Vec<Multiaddr>>,
    },
    ConnectedPeers {
        reply: oneshot::Sender<Vec<PeerId>>,
    },
    SetLoad {
        load: Load,
        reply: oneshot::Sender<()>,
    },
    Dial {
        addr: Multiaddr,
        reply: oneshot::Sender<Result<PeerId, Error>>,
    },
    Block {
        peer: PeerId,
        reply: oneshot::Sender<()>,
    },
    Unblock {
        peer: PeerId,
        reply: oneshot::Sender<()>,
    },
    Shutdown {
        reply: oneshot::Sender<()>,
    },
}

/// A handle on a running node. Cheap to clone; every clone talks to the same
/// event loop. When every clone is dropped, the event loop stops.
#[derive(Clone)]
pub struct Client {
    commands: mpsc::Sender<Command>,
    local_peer_id: PeerId,
    links: Arc<Mutex<HashMap<PeerId, LinkQueue>>>,
    budget: SendBudget,
}

impl Client {
    pub(crate) fn new(commands: mpsc::Sender<Command>, local_peer_id: PeerId, budget: SendBudget) -> Self {
        Self { commands, local_peer_id, links: Arc::default(), budget }
    }

    /// The node-wide budget of bytes held for peers (see
    /// [`Client::send_charged`]).
    pub fn send_budget(&self) -> &SendBudget {
        &self.budget
    }

    /// Forgets the cached writer queue of `peer` (it is dead for good).
    pub fn forget(&self, peer: &PeerId) {
        self.links.lock().expect("link cache poisoned").remove(peer);
    }

    /// Writer queues cached, for tests of the pruning.
    pub fn cached_links(&self) -> usize {
        self.links.lock().expect("link cache poisoned").len()
    }

    async fn request<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Command) -> Result<T, Error> {
        let (reply, rx) = oneshot::channel();
        self.commands.send(make(reply)).await.map_err(|_| Error::Stopped)?;
        rx.await.map_err(|_| Error::Stopped)
    }

    /// Queues `frame` for `peer` on the long-lived stream to it. Returns once
    /// queued (waiting while the node's send budget is spent); delivery is at most
    /// once: frames in flight when a link drops are lost, and frames to a
    /// blocked peer are dropped silently. Refused for a peer that is dead,
    /// or neither a member nor connected.
    pub async fn send(&self, peer: PeerId, frame: impl Into<Bytes>) -> Result<(), Error> {
        let frame = frame.into();
        if frame.len() > MAX_FRAME {
            return Err(Error::FrameTooLarge(frame.len()));
        }
        if peer == self.local_peer_id {
            return Err(Error::SelfSend);
        }
        let charged = self.budget.charge(frame.len()).await;
        self.send_charged(peer, frame, charged).await
    }

    /// As [`Client::send`], for a frame whose bytes the caller reserved in
    /// [`Client::send_budget`] already: never waits for room.
    pub async fn send_charged(&self, peer: PeerId, frame: Bytes, charged: Charged) -> Result<(), Error> {
        if frame.len() > MAX_FRAME {
            return Err(Error::FrameTooLarge(frame.len()));
        }
        if peer == self.local_peer_id {
            return Err(Error::SelfSend);
        }
        let cached = {
            let links = self.links.lock().expect("link cache poisoned");
            links.get(&peer).filter(|tx| !tx.is_closed()).cloned()
        };
        let tx = match cached {
            Some(tx) => tx,
            None => {
                let link = self.request(|reply| Command::Link { peer, reply }).await??;
                let mut links = self.links.lock().expect("link cache poisoned");
                match link {
                    Some(tx) => {
                        links.insert(peer, tx.clone());
                        tx
                    }
                    None => {
                        links.remove(&peer);
                        return Ok(());
                    }
                }
            }
        };
        // A closed queue means the link was torn down (peer blocked or
        // dead) after we looked it up: the frame is dropped, as it would
        // be in flight.
        let _ = tx.send((frame, charged));
        Ok(())
    }

    /// Every known member, this node included (always `Alive`).
    pub async fn members(&self) -> Result<Vec<Member>, Error> {
        self.request(|reply| Command::Members { reply }).await
    }

    /// This node's peer id.
    pub fn local_peer_id(&self) -> PeerId {
        self.local_peer_id
    }

    /// The addresses this node listens on, each ending in `/p2p/<peer id>`
    /// so it can be handed to another node as a bootstrap address.
    pub async fn listen_addrs(&self) -> Result<Vec<Multiaddr>, Error> {
        self.request(|reply| Command::ListenAddrs { reply }).await
    }

    /// The peers this node holds a connection to right now.
    pub async fn connected_peers(&self) -> Result<Vec<PeerId>, Error> {
        self.request(|reply| Command::ConnectedPeers { reply }).await
    }

    /// Sets the load figures carried in this node's next heartbeats.
    pub async fn set_load(&self, load: Load) -> Result<(), Error> {
        self.request(|reply| Command::SetLoad { load, reply }).await
    }

    /// Dials `addr` and waits until the connection is up (or has failed).
    pub async fn dial(&self, addr: Multiaddr) -> Result<PeerId, Error> {
        self.request(|reply| Command::Dial { addr, reply }).await?
    }

    /// Fault hook for tests: cut every link to `peer`, refuse its
    /// connections, drop frames to it and ignore its heartbeats (also when
    /// relayed by others) until [`Client::unblock_peer`]. Block on both
    /// sides for a clean partition.
    pub async fn block_peer(&self, peer: PeerId) -> Result<(), Error> {
        self.links.lock().expect("link cache poisoned").remove(&peer);
        self.request(|reply| Command::Block { peer, reply }).await
    }

    /// Undoes [`Client::block_peer`]; links are re-established by the
    /// event loop's reconnect logic.
    pub async fn unblock_peer(&self, peer: PeerId) -> Result<(), Error> {
        self.request(|reply| Command::Unblock { peer, reply }).await
    }

    /// Announces that this node leaves (others mark it dead at once) and
    /// stops the event loop.
    pub async fn shutdown(&self) -> Result<(), Error> {
        self.request(|reply| Command::Shutdown { reply }).await
    }
}
