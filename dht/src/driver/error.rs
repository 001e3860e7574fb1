//! Errors of the libp2p driver.
//!
//! Job: one error enum for starting a node, loading its keys and talking to
//! its event loop. Boundary: link failures after start are not errors of
//! any call; they show up as log lines and membership events.

use std::path::Path;

use libp2p::PeerId;

/// What can go wrong in the driver.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration is unusable.
    #[error("invalid cluster config: {0}")]
    Config(String),
    /// A key (node keypair or cluster key) could not be read or decoded.
    #[error("key: {0}")]
    Key(String),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// The swarm could not be built (transport or behaviour setup).
    #[error("building the swarm: {0}")]
    Build(String),
    /// A listen address was refused.
    #[error("listening on {addr}: {reason}")]
    Listen { addr: String, reason: String },
    /// A dial failed (see the log for the cause; a handshake failure
    /// usually means a different cluster key).
    #[error("dialing {addr}: {reason}")]
    Dial { addr: String, reason: String },
    /// The peer is known to be dead; frames to it are refused.
    #[error("peer {0} is dead")]
    PeerDead(PeerId),
    /// The peer is neither a known member nor connected.
    #[error("peer {0} is not a member of the cluster")]
    UnknownPeer(PeerId),
    /// Frames cannot be sent to oneself.
    #[error("cannot send a frame to the local node")]
    SelfSend,
    /// The frame is larger than [`super::frames::MAX_FRAME`].
    #[error("frame of {0} bytes exceeds the maximum frame size")]
    FrameTooLarge(usize),
    /// The event loop has stopped (shut down or its task was dropped).
    #[error("the cluster event loop has stopped")]
    Stopped,
}

impl Error {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        Error::Io { path: path.display().to_string(), source }
    }
}
