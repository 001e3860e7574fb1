//! The one task that owns the swarm.
//!
//! Job: drive the libp2p [`Swarm`] and everything keyed by peer around it:
//! it answers `Command`s from [`Client`]s, publishes this node's record as
//! its heartbeat, runs the failure detector, dials peers found through
//! Kademlia and node records (so the mesh forms from one bootstrap address),
//! re-dials members whose links dropped, spawns one writer task per
//! destination and one reader task per inbound frame stream, and applies the
//! test fault hook (blocked peers). Boundary: only this task touches the
//! swarm; frame bytes do not pass through it (writers and readers move
//! them), only the set-up and tear-down of links.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    time::Duration,
};

use futures::StreamExt as _;
use libp2p::{
    gossipsub, identify, kad,
    multiaddr::Protocol,
    swarm::{
        dial_opts::{DialOpts, PeerCondition},
        ConnectionId, DialError, ListenError, SwarmEvent,
    },
    Multiaddr, PeerId, Stream, Swarm, TransportError,
};
use tokio::{
    sync::{mpsc, oneshot},
    task::{AbortHandle, JoinSet},
    time::{Instant, MissedTickBehavior},
};
use tracing::{debug, info, trace, warn};

use super::{
    behaviour::{build_swarm, error_chain, is_network_error, Behaviour, BehaviourEvent, MEMBERSHIP_TOPIC},
    client::{Client, Command, Event, LinkQueue},
    config::peer_id_of,
    frames::{self, PROTOCOL},
    membership::{Change, FailureDetector, Load, Member, MemberState, NodeRecord, RECORD_VERSION},
    DriverConfig, Error,
};

/// Capacity of the event channel handed to the caller.
const EVENT_CHANNEL: usize = 4096;
/// Capacity of the command channel.
const COMMAND_CHANNEL: usize = 1024;
/// How long `start` waits for the listeners to report their addresses.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(5);
/// Inbound frame streams read at once per peer.
const MAX_READERS_PER_PEER: usize = 4;
/// How long a leaving node keeps driving the swarm so its farewell record
/// goes out.
const LEAVE_GRACE: Duration = Duration::from_millis(300);

/// Starts a node: builds the swarm, binds the listeners (waiting until their
/// addresses are known, so [`Client::listen_addrs`] is useful at once) and
/// returns the client, the event stream and the event loop. Nothing happens
/// on the network until the caller spawns [`EventLoop::run`].
pub async fn start(config: DriverConfig) -> Result<(Client, mpsc::Receiver<Event>, EventLoop), Error> {
    config.validate()?;
    let mut swarm = build_swarm(&config)?;
    let local = *swarm.local_peer_id();

    let topic = gossipsub::IdentTopic::new(MEMBERSHIP_TOPIC);
    swarm.behaviour_mut().gossipsub.subscribe(&topic).map_err(|e| Error::Build(format!("gossipsub subscribe: {e}")))?;

    let mut control = swarm.behaviour().stream.new_control();
    let incoming = control.accept(PROTOCOL).map_err(|e| Error::Build(format!("frame protocol: {e}")))?;
    let (accepted_tx, accepted_rx) = mpsc::channel(frames::ACCEPT_QUEUE);

    let mut waiting = HashSet::new();
    for addr in &config.listen_addrs {
        let id = swarm
            .listen_on(addr.clone())
            .map_err(|e| Error::Listen { addr: addr.to_string(), reason: e.to_string() })?;
        waiting.insert(id);
    }
    let mut listen_addrs = Vec::new();
    let bound = tokio::time::timeout(LISTEN_TIMEOUT, async {
        while !waiting.is_empty() {
            match swarm.select_next_some().await {
                SwarmEvent::NewListenAddr { listener_id, address } => {
                    info!(%address, peer = %local, "listening");
                    waiting.remove(&listener_id);
                    listen_addrs.push(address);
                }
                SwarmEvent::ListenerClosed { reason, .. } => {
                    return Err(reason.err().map(|e| e.to_string()).unwrap_or_default());
                }
                SwarmEvent::ListenerError { error, .. } => return Err(error.to_string()),
                other => trace!(?other, "event before start"),
            }
        }
        Ok(())
    })
    .await;
    match bound {
        Ok(Ok(())) => {}
        Ok(Err(reason)) => return Err(Error::Listen { addr: format!("{:?}", config.listen_addrs), reason }),
        Err(_) => {
            return Err(Error::Listen {
                addr: format!("{:?}", config.listen_addrs),
                reason: "no listen address reported in time".into(),
            })
        }
    }

    let (command_tx, command_rx) = mpsc::channel(COMMAND_CHANNEL);
    let budget = super::SendBudget::new(config.send_buffer);
    let receive_budget = super::SendBudget::new(config.receive_buffer);
    let (event_tx, event_rx) = mpsc::channel(EVENT_CHANNEL);
    let record = NodeRecord {
        version: RECORD_VERSION,
        peer_id: local.to_bytes(),
        name: config.node_name.clone(),
        listen_addrs: Vec::new(),
        mqtt_listeners: config.mqtt_listeners.clone(),
        incarnation: config.incarnation,
        load: Load::default(),
        seq: 0,
        leaving: false,
        fleet: config.fleet,
    };
    let event_loop = EventLoop {
        swarm,
        local,
        commands: command_rx,
        events: event_tx,
        pending_events: VecDeque::new(),
        incoming: Some((incoming, accepted_tx)),
        accepted: accepted_rx,
        control,
        detector: FailureDetector::new(local, config.suspect_timeout, config.dead_timeout),
        record,
        topic,
        writers: HashMap::new(),
        readers: HashMap::new(),
        tasks: JoinSet::new(),
        blocked: HashSet::new(),
        refused: HashMap::new(),
        pending_dials: HashMap::new(),
        connected_since: HashMap::new(),
        bootstrap: config.bootstrap.clone(),
        last_bootstrap_dial: None,
        kad_bootstrapped: false,
        listen_addrs,
        heartbeat_interval: config.heartbeat_interval,
        dead_timeout: config.dead_timeout,
        receive_budget,
    };
    Ok((Client::new(command_tx, local, budget), event_rx, event_loop))
}

/// The writer side of one peer's link: the queue its frames go into and the
/// task that writes them to the peer's frame stream.
struct LinkWriter {
    queue: LinkQueue,
    task: AbortHandle,
    created: Instant,
}

/// Owns the swarm and all per-peer state; see the module docs.
pub struct EventLoop {
    swarm: Swarm<Behaviour>,
    local: PeerId,
    commands: mpsc::Receiver<Command>,
    events: mpsc::Sender<Event>,
    /// Membership events not yet taken by the consumer. Queued here rather
    /// than awaited so a slow consumer never stalls the swarm (and with it
    /// our own heartbeats).
    pending_events: VecDeque<Event>,
    /// libp2p-stream's inbound frame streams, handed to an accept task when
    /// the loop starts.
    incoming: Option<(libp2p_stream::IncomingStreams, mpsc::Sender<(PeerId, Stream)>)>,
    /// Inbound frame streams queued by the accept task.
    accepted: mpsc::Receiver<(PeerId, Stream)>,
    control: libp2p_stream::Control,
    detector: FailureDetector,
    /// This node's own record; `seq` counts heartbeats.
    record: NodeRecord,
    topic: gossipsub::IdentTopic,
    writers: HashMap<PeerId, LinkWriter>,
    readers: HashMap<PeerId, Vec<AbortHandle>>,
    /// Writer and reader tasks; dropping the event loop aborts them all.
    tasks: JoinSet<()>,
    blocked: HashSet<PeerId>,
    /// Peers whose records announce other fleet settings than ours, and
    /// when we last heard one: not admitted, frames neither sent nor read.
    refused: HashMap<PeerId, Instant>,
    /// Dials requested through [`Client::dial`], answered on connection or
    /// failure.
    pending_dials: HashMap<ConnectionId, (Multiaddr, oneshot::Sender<Result<PeerId, Error>>)>,
    /// Peers we hold at least one connection to, and since when.
    connected_since: HashMap<PeerId, Instant>,
    bootstrap: Vec<Multiaddr>,
    last_bootstrap_dial: Option<Instant>,
    kad_bootstrapped: bool,
    listen_addrs: Vec<Multiaddr>,
    heartbeat_interval: Duration,
    dead_timeout: Duration,
    /// Bytes of received frames not yet dealt with by the user.
    receive_budget: super::SendBudget,
}

impl EventLoop {
    /// Runs the node until [`Client::shutdown`] or until every [`Client`] is
    /// dropped. Dropping this future (aborting its task) stops the node at
    /// once, without a farewell: to the others that looks like a crash.
    pub async fn run(mut self) {
        info!(
            peer = %self.local,
            name = %self.record.name,
            incarnation = self.record.incarnation,
            "cluster node starting"
        );
        if let Some((incoming, accepted)) = self.incoming.take() {
            self.tasks.spawn(frames::accept_loop(incoming, accepted));
        }
        self.dial_bootstrap();
        self.publish_record();
        let mut heartbeat = tokio::time::interval_at(Instant::now() + self.heartbeat_interval, self.heartbeat_interval);
        heartbeat.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                event = self.swarm.select_next_some() => self.on_swarm_event(event),
                command = self.commands.recv() => match command {
                    Some(Command::Shutdown { reply }) => {
                        self.leave().await;
                        let _ = reply.send(());
                        return;
                    }
                    Some(command) => self.on_command(command),
                    None => {
                        self.leave().await;
                        return;
                    }
                },
                Some((peer, stream)) = self.accepted.recv() => self.on_inbound_stream(peer, stream),
                _ = heartbeat.tick() => self.on_heartbeat(),
                Ok(permit) = self.events.clone().reserve_owned(), if !self.pending_events.is_empty() => {
                    if let Some(event) = self.pending_events.pop_front() {
                        permit.send(event);
                    }
                }
                Some(_) = self.tasks.join_next(), if !self.tasks.is_empty() => {}
            }
        }
    }

    fn emit(&mut self, event: Event) {
        if self.events.is_closed() {
            self.pending_events.clear();
            return;
        }
        self.pending_events.push_back(event);
    }

    // ---- membership -------------------------------------------------------

    fn publish_record(&mut self) {
        self.record.seq += 1;
        self.record.listen_addrs = self.listen_addrs.iter().map(|a| a.to_string()).collect();
        let data = self.record.encode();
        match self.swarm.behaviour_mut().gossipsub.publish(self.topic.clone(), data) {
            Ok(_) => {}
            // Alone (or not yet meshed): nobody to tell, which is fine.
            Err(gossipsub::PublishError::NoPeersSubscribedToTopic) => {
                trace!("no peer subscribed to the membership topic yet")
            }
            Err(e) => debug!(cause = %e, "publishing node record failed"),
        }
    }

    fn on_heartbeat(&mut self) {
        self.publish_record();
        let changes = self.detector.tick(Instant::now().into_std());
        for change in changes {
            self.apply_change(change);
        }
        // Reconnect to every member we should be linked to.
        let to_dial: Vec<(PeerId, Vec<Multiaddr>)> = self
            .detector
            .iter()
            .filter(|m| m.state != MemberState::Dead)
            .map(|m| (m.peer_id, m.listen_addrs.clone()))
            .collect();
        for (peer, addrs) in to_dial {
            self.maybe_dial(peer, addrs);
        }
        self.reset_silent_links();
        self.drop_orphan_links();
        // Refused peers not heard from for the dead timeout are forgotten
        // (one heard again is refused, and logged, again).
        let dead_timeout = self.dead_timeout;
        self.refused.retain(|_, heard| heard.elapsed() < dead_timeout);
        // Lost every link (or never had one): go back to the bootstrap list.
        if self.swarm.connected_peers().next().is_none() && !self.bootstrap.is_empty() {
            let retry = self.heartbeat_interval.max(Duration::from_secs(2));
            if self.last_bootstrap_dial.is_none_or(|at| at.elapsed() >= retry) {
                self.dial_bootstrap();
            }
        }
    }

    /// Every peer that can connect holds the cluster key, so it is a node
    /// that heartbeats. A connection to a peer from which no record has come
    /// (directly or relayed) for the dead timeout may be broken for gossip:
    /// gossipsub disables its handler for good after a few failed substream
    /// attempts on one connection (`MAX_SUBSTREAM_ATTEMPTS`). Closing it lets
    /// a fresh connection, with fresh protocol handlers, take its place if
    /// the peer is alive. Not at the suspect timeout: under CPU starvation
    /// heartbeats merely arrive late, and resetting every link then would
    /// turn slowness into churn and lost frames.
    fn reset_silent_links(&mut self) {
        let now = Instant::now();
        let silent: Vec<PeerId> = self
            .connected_since
            .iter()
            .filter(|(peer, since)| {
                let heard = self.detector.last_heard(peer).map(Instant::from_std).map_or(**since, |h| h.max(**since));
                now.saturating_duration_since(heard) > self.dead_timeout
            })
            .map(|(peer, _)| *peer)
            .collect();
        for peer in silent {
            warn!(%peer, "connected but no heartbeat arrives; resetting the connection");
            self.connected_since.insert(peer, now);
            let _ = self.swarm.disconnect_peer_id(peer);
        }
    }

    /// A link to a peer that was connected but never became a member would
    /// retry forever once the connection is gone and, with its queue full,
    /// block its senders; after the dead timeout it goes. Links to members
    /// go when the member is declared dead.
    fn drop_orphan_links(&mut self) {
        let orphans: Vec<PeerId> = self
            .writers
            .iter()
            .filter(|(peer, link)| {
                self.detector.get(peer).is_none()
                    && !self.swarm.is_connected(peer)
                    && link.created.elapsed() > self.dead_timeout
            })
            .map(|(peer, _)| *peer)
            .collect();
        for peer in orphans {
            warn!(%peer, "dropping the link to a peer that never joined");
            self.drop_links(&peer);
        }
    }

    fn on_record(&mut self, via: PeerId, message: gossipsub::Message) {
        let Some(record) = NodeRecord::decode(&message.data) else {
            warn!(%via, "ignoring undecodable node record (unknown version?)");
            return;
        };
        let Ok(peer) = PeerId::from_bytes(&record.peer_id) else {
            warn!(%via, "ignoring node record with a malformed peer id");
            return;
        };
        if message.source != Some(peer) {
            warn!(%via, claimed = %peer, signer = ?message.source, "ignoring node record signed by another peer");
            return;
        }
        if self.blocked.contains(&peer) || self.blocked.contains(&via) {
            trace!(%peer, "ignoring record of a blocked peer");
            return;
        }
        if let Some(reason) = self.record.fleet.refusal(&peer, &record.fleet) {
            // One line per peer (not per heartbeat) while it stays refused.
            if self.refused.insert(peer, Instant::now()).is_none() {
                warn!(%peer, name = %record.name, "{reason}");
                self.drop_links(&peer);
                self.emit(Event::MemberRefused { peer, reason });
            }
            return;
        }
        if self.refused.remove(&peer).is_some() {
            info!(%peer, name = %record.name, "peer now runs this fleet's settings: admitted");
        }
        if let Some(change) = self.detector.observe(&record, Instant::now().into_std()) {
            if let Change::Up(member) = &change {
                for addr in &member.listen_addrs {
                    self.swarm.behaviour_mut().kad.add_address(&member.peer_id, addr.clone());
                }
                self.maybe_dial(member.peer_id, member.listen_addrs.clone());
            }
            self.apply_change(change);
        }
    }

    fn apply_change(&mut self, change: Change) {
        match change {
            Change::Up(member) => {
                info!(
                    peer = %member.peer_id,
                    name = %member.name,
                    incarnation = member.incarnation,
                    "member up"
                );
                self.emit(Event::MemberUp(member));
            }
            Change::Suspect(peer) => {
                warn!(%peer, "member suspect: no heartbeat");
                self.emit(Event::MemberSuspect(peer));
            }
            Change::Dead(peer) => {
                warn!(%peer, "member dead");
                self.drop_links(&peer);
                self.emit(Event::MemberDead(peer));
            }
        }
    }

    fn local_member(&self) -> Member {
        Member {
            peer_id: self.local,
            name: self.record.name.clone(),
            listen_addrs: self.listen_addrs.clone(),
            mqtt_listeners: self.record.mqtt_listeners.clone(),
            incarnation: self.record.incarnation,
            load: self.record.load,
            state: MemberState::Alive,
        }
    }

    async fn leave(&mut self) {
        info!(peer = %self.local, "leaving the cluster");
        self.record.leaving = true;
        self.publish_record();
        // Keep the swarm turning briefly so the farewell actually leaves.
        let grace = tokio::time::sleep(LEAVE_GRACE);
        tokio::pin!(grace);
        loop {
            tokio::select! {
                _ = &mut grace => break,
                _ = self.swarm.select_next_some() => {}
            }
        }
        self.tasks.abort_all();
    }

    // ---- links ------------------------------------------------------------

    fn maybe_dial(&mut self, peer: PeerId, addrs: Vec<Multiaddr>) {
        if peer == self.local || self.blocked.contains(&peer) || self.swarm.is_connected(&peer) {
            return;
        }
        let opts = DialOpts::peer_id(peer).addresses(addrs).condition(PeerCondition::DisconnectedAndNotDialing).build();
        match self.swarm.dial(opts) {
            Ok(()) => debug!(%peer, "dialing"),
            Err(DialError::DialPeerConditionFalse(_)) => {}
            Err(e) => debug!(%peer, cause = %e, "dial refused"),
        }
    }

    fn dial_bootstrap(&mut self) {
        self.last_bootstrap_dial = Some(Instant::now());
        for addr in self.bootstrap.clone() {
            match peer_id_of(&addr) {
                Some(peer) if peer == self.local || self.blocked.contains(&peer) => {}
                Some(peer) => {
                    let mut plain = addr.clone();
                    plain.pop();
                    self.swarm.behaviour_mut().kad.add_address(&peer, plain);
                    self.maybe_dial(peer, vec![addr.clone()]);
                }
                None => {
                    if let Err(e) = self.swarm.dial(addr.clone()) {
                        warn!(%addr, cause = %e, "cannot dial bootstrap address");
                    }
                }
            }
        }
    }

    fn drop_links(&mut self, peer: &PeerId) {
        if let Some(link) = self.writers.remove(peer) {
            link.task.abort();
        }
        for reader in self.readers.remove(peer).unwrap_or_default() {
            reader.abort();
        }
    }

    fn link(&mut self, peer: PeerId) -> LinkQueue {
        if let Some(link) = self.writers.get(&peer) {
            if !link.queue.is_closed() {
                return link.queue.clone();
            }
        }
        // Unbounded in frames, bounded in bytes: every frame in it holds
        // its share of the node's send budget.
        let (queue, rx) = mpsc::unbounded_channel();
        let task = self.tasks.spawn(frames::write_loop(peer, self.control.clone(), rx, self.events.clone()));
        self.writers.insert(peer, LinkWriter { queue: queue.clone(), task, created: Instant::now() });
        queue
    }

    fn on_inbound_stream(&mut self, peer: PeerId, stream: Stream) {
        if self.blocked.contains(&peer) || self.refused.contains_key(&peer) {
            debug!(%peer, "refusing frame stream of a blocked or refused peer");
            return;
        }
        debug!(%peer, "inbound frame stream");
        let task = self.tasks.spawn(frames::read_loop(peer, stream, self.events.clone(), self.receive_budget.clone()));
        let readers = self.readers.entry(peer).or_default();
        readers.retain(|r| !r.is_finished());
        readers.push(task);
        // A peer writes on one stream (a new one after a failure): more
        // live readers than a few are stale streams, or a peer opening
        // streams to make this node hold buffers; the oldest go.
        while readers.len() > MAX_READERS_PER_PEER {
            readers.remove(0).abort();
        }
    }

    // ---- commands ---------------------------------------------------------

    fn on_command(&mut self, command: Command) {
        match command {
            Command::Link { peer, reply } => {
                let result = if peer == self.local {
                    Err(Error::SelfSend)
                } else if self.blocked.contains(&peer) || self.refused.contains_key(&peer) {
                    Ok(None)
                } else {
                    match self.detector.get(&peer).map(|m| m.state) {
                        Some(MemberState::Dead) => Err(Error::PeerDead(peer)),
                        Some(_) => Ok(Some(self.link(peer))),
                        // Not (yet) a member, but linked: e.g. answering a
                        // frame that arrived before the sender's record.
                        None if self.swarm.is_connected(&peer) => Ok(Some(self.link(peer))),
                        None => Err(Error::UnknownPeer(peer)),
                    }
                };
                let _ = reply.send(result);
            }
            Command::Members { reply } => {
                let mut members = vec![self.local_member()];
                members.extend(self.detector.iter().cloned());
                let _ = reply.send(members);
            }
            Command::ListenAddrs { reply } => {
                let addrs = self.listen_addrs.iter().map(|a| a.clone().with(Protocol::P2p(self.local))).collect();
                let _ = reply.send(addrs);
            }
            Command::ConnectedPeers { reply } => {
                let _ = reply.send(self.swarm.connected_peers().copied().collect());
            }
            Command::SetLoad { load, reply } => {
                self.record.load = load;
                let _ = reply.send(());
            }
            Command::Dial { addr, reply } => self.dial_for_client(addr, reply),
            Command::Block { peer, reply } => {
                info!(%peer, "fault hook: blocking peer");
                self.blocked.insert(peer);
                self.drop_links(&peer);
                let _ = self.swarm.disconnect_peer_id(peer);
                let _ = reply.send(());
            }
            Command::Unblock { peer, reply } => {
                info!(%peer, "fault hook: unblocking peer");
                self.blocked.remove(&peer);
                let _ = reply.send(());
            }
            Command::Shutdown { .. } => unreachable!("handled in run"),
        }
    }

    fn dial_for_client(&mut self, addr: Multiaddr, reply: oneshot::Sender<Result<PeerId, Error>>) {
        let opts = match peer_id_of(&addr) {
            Some(peer) if self.swarm.is_connected(&peer) => {
                let _ = reply.send(Ok(peer));
                return;
            }
            Some(peer) => {
                DialOpts::peer_id(peer).addresses(vec![addr.clone()]).condition(PeerCondition::Always).build()
            }
            None => DialOpts::unknown_peer_id().address(addr.clone()).build(),
        };
        let id = opts.connection_id();
        match self.swarm.dial(opts) {
            Ok(()) => {
                self.pending_dials.insert(id, (addr, reply));
            }
            Err(e) => {
                let _ = reply.send(Err(Error::Dial { addr: addr.to_string(), reason: e.to_string() }));
            }
        }
    }

    // ---- swarm events -----------------------------------------------------

    fn on_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::Behaviour(BehaviourEvent::Gossipsub(event)) => match event {
                gossipsub::Event::Message { propagation_source, message, .. } => {
                    self.on_record(propagation_source, message)
                }
                // Tell a newcomer who we are now rather than at the next
                // heartbeat.
                gossipsub::Event::Subscribed { peer_id, topic }
                    if topic == self.topic.hash() && !self.blocked.contains(&peer_id) =>
                {
                    debug!(peer = %peer_id, "peer joined the membership topic");
                    self.publish_record();
                }
                _ => {}
            },
            SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received { peer_id, info, .. })) => {
                if self.blocked.contains(&peer_id) {
                    return;
                }
                for addr in info.listen_addrs {
                    self.swarm.behaviour_mut().kad.add_address(&peer_id, addr);
                }
                if !self.kad_bootstrapped {
                    match self.swarm.behaviour_mut().kad.bootstrap() {
                        Ok(_) => {
                            debug!("kademlia bootstrap started");
                            self.kad_bootstrapped = true;
                        }
                        Err(e) => debug!(cause = %e, "kademlia bootstrap not possible yet"),
                    }
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Kad(event)) => match event {
                kad::Event::RoutingUpdated { peer, addresses, .. } => self.maybe_dial(peer, addresses.into_vec()),
                kad::Event::OutboundQueryProgressed { result, .. } => match result {
                    kad::QueryResult::GetClosestPeers(Ok(ok)) => {
                        for peer in ok.peers {
                            self.maybe_dial(peer.peer_id, peer.addrs);
                        }
                    }
                    kad::QueryResult::Bootstrap(Ok(ok)) => {
                        trace!(peer = %ok.peer, remaining = ok.num_remaining, "kademlia bootstrap step")
                    }
                    kad::QueryResult::Bootstrap(Err(e)) => {
                        debug!(cause = %e, "kademlia bootstrap failed")
                    }
                    _ => {}
                },
                _ => {}
            },
            SwarmEvent::Behaviour(_) => {}
            SwarmEvent::NewListenAddr { address, .. } => {
                info!(%address, "listening");
                if !self.listen_addrs.contains(&address) {
                    self.listen_addrs.push(address);
                }
            }
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                self.listen_addrs.retain(|a| a != &address);
            }
            SwarmEvent::ConnectionEstablished { peer_id, connection_id, endpoint, .. } => {
                if self.blocked.contains(&peer_id) {
                    debug!(peer = %peer_id, "fault hook: closing connection of a blocked peer");
                    let _ = self.swarm.disconnect_peer_id(peer_id);
                    if let Some((addr, reply)) = self.pending_dials.remove(&connection_id) {
                        let _ =
                            reply.send(Err(Error::Dial { addr: addr.to_string(), reason: "peer is blocked".into() }));
                    }
                    return;
                }
                debug!(peer = %peer_id, addr = %endpoint.get_remote_address(), "connection established");
                self.connected_since.entry(peer_id).or_insert_with(Instant::now);
                if let Some((_, reply)) = self.pending_dials.remove(&connection_id) {
                    let _ = reply.send(Ok(peer_id));
                }
            }
            SwarmEvent::ConnectionClosed { peer_id, num_established, cause, .. } => {
                debug!(peer = %peer_id, remaining = num_established, cause = ?cause, "connection closed");
                if num_established == 0 {
                    self.connected_since.remove(&peer_id);
                    // What was written to it last may be lost with it.
                    self.emit(Event::FramesLost { peer: peer_id });
                }
            }
            SwarmEvent::OutgoingConnectionError { connection_id, peer_id, error } => {
                log_dial_error(peer_id, &error);
                if let Some((addr, reply)) = self.pending_dials.remove(&connection_id) {
                    let _ = reply.send(Err(Error::Dial { addr: addr.to_string(), reason: error_chain(&error) }));
                }
            }
            SwarmEvent::IncomingConnectionError { send_back_addr, error, .. } => {
                log_listen_error(&send_back_addr, &error)
            }
            _ => {}
        }
    }
}

/// Logs a failed outbound connection. A TCP connection that came up and then
/// failed its upgrade (pnet, multistream-select, noise, yamux) almost always
/// means the other side holds a different cluster key: with pnet, the first
/// bytes after the nonces are garbage to a peer with another key.
fn log_dial_error(peer: Option<PeerId>, error: &DialError) {
    match error {
        DialError::Transport(attempts) => {
            for (addr, error) in attempts {
                match error {
                    TransportError::Other(e) if !is_network_error(e) => warn!(
                        peer = ?peer,
                        %addr,
                        cause = %error_chain(e),
                        "handshake failed, likely a wrong cluster key (pre-shared key) on one side"
                    ),
                    other => debug!(peer = ?peer, %addr, cause = %error_chain(other), "dial failed"),
                }
            }
        }
        DialError::WrongPeerId { obtained, address } => warn!(
            expected = ?peer,
            %obtained,
            %address,
            "peer id mismatch: the bootstrap address names another node"
        ),
        other => debug!(peer = ?peer, cause = %other, "dial failed"),
    }
}

fn log_listen_error(addr: &Multiaddr, error: &ListenError) {
    match error {
        // The TCP connection was accepted, so a transport error here is an
        // upgrade failure.
        ListenError::Transport(e) => warn!(
            %addr,
            cause = %error_chain(e),
            "inbound handshake failed, likely a wrong cluster key (pre-shared key) on one side"
        ),
        other => debug!(%addr, cause = %other, "inbound connection failed"),
    }
}
