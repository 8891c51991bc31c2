//! Peer wire format: every frame is a `u32` big-endian length followed by a postcard body,
//! with the length capped before anything is allocated. The first frame on a connection is
//! [`Frame::Hello`]; both sides then speak the highest version both support. Architecture
//! invariant: `Frame` only grows at the end (postcard encodes variants by position) and a
//! struct never changes; a changed message is a new variant. Golden bytes pin every frame.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use tokio_util::codec::{Decoder, Encoder};

/// Versions of the peer protocol this build speaks.
pub const PROTO_MIN: u16 = 1;
pub const PROTO_MAX: u16 = 1;

/// Largest frame accepted or sent.
pub const MAX_FRAME: usize = 16 << 20;

/// A record on the wire: its id and the stored record's fields.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireRecord {
    pub origin: u64,
    pub seq: u64,
    pub event_time_ms: u64,
    pub ingest_time_ms: u64,
    pub key: Bytes,
    pub subject: String,
    pub payload: Bytes,
    pub headers: Vec<(String, Bytes)>,
}

/// Every message between peers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Frame {
    /// First frame of a connection, both ways.
    Hello {
        cluster_id: String,
        node_id: String,
        origin: u64,
        proto_min: u16,
        proto_max: u16,
    },
    /// Records of one origin for one partition, in seq order.
    Append {
        topic: String,
        partition: u32,
        records: Vec<WireRecord>,
    },
    /// The highest contiguous seq of `origin` now durable on the sender.
    Ack {
        topic: String,
        partition: u32,
        origin: u64,
        seq: u64,
    },
    /// The receiver holds `origin` only up to `have`: resend from `have + 1`.
    Gap {
        topic: String,
        partition: u32,
        origin: u64,
        have: u64,
    },
    /// Anti-entropy: the sender's version vector and content digest of a partition.
    Digest {
        topic: String,
        partition: u32,
        version_vector: Vec<(u64, u64)>,
        digest: u64,
    },
    /// Anti-entropy: send me what I miss above this version vector.
    Pull {
        topic: String,
        partition: u32,
        version_vector: Vec<(u64, u64)>,
    },
    /// Records of a partition the receiver does not replicate, for its live MQTT
    /// subscribers only (not stored).
    Live {
        topic: String,
        partition: u32,
        records: Vec<WireRecord>,
    },
    /// The sender's log no longer has `origin`'s seqs below `below` (retention deleted
    /// them): the receiver counts them as held, so I3 accepts `below` next.
    Trimmed {
        topic: String,
        partition: u32,
        origin: u64,
        below: u64,
    },
}

/// The version two peers speak, if their ranges overlap.
pub fn negotiate(their_min: u16, their_max: u16) -> Option<u16> {
    let v = their_max.min(PROTO_MAX);
    (v >= their_min.max(PROTO_MIN)).then_some(v)
}

/// Why a peer's byte stream was refused.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("frame of {0} bytes exceeds the {MAX_FRAME}-byte limit")]
    TooLarge(usize),
    #[error("undecodable frame: {0}")]
    Decode(#[from] postcard::Error),
    #[error("{0} trailing bytes after a frame")]
    Trailing(usize),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

/// Largest frame accepted before the peer's `Hello` was checked (a stranger cannot make
/// a node reserve 16 MiB by connecting).
pub const MAX_HELLO: usize = 4096;

/// Length-prefixed postcard framing for peer connections.
#[derive(Debug, Clone, Copy)]
pub struct FrameCodec {
    max: usize,
}

impl Default for FrameCodec {
    fn default() -> Self {
        FrameCodec { max: MAX_FRAME }
    }
}

impl FrameCodec {
    /// The codec of a connection whose `Hello` is still to come.
    pub fn before_hello() -> Self {
        FrameCodec { max: MAX_HELLO }
    }
}

impl Decoder for FrameCodec {
    type Item = Frame;
    type Error = WireError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, WireError> {
        let Some(header) = src.get(..4) else {
            return Ok(None);
        };
        let len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]) as usize;
        if len > self.max {
            return Err(WireError::TooLarge(len));
        }
        if src.len() < 4 + len {
            src.reserve(4 + len - src.len());
            return Ok(None);
        }
        src.advance(4);
        let body = src.split_to(len);
        let (frame, rest) = postcard::take_from_bytes::<Frame>(&body)?;
        if !rest.is_empty() {
            return Err(WireError::Trailing(rest.len()));
        }
        Ok(Some(frame))
    }
}

impl Encoder<Frame> for FrameCodec {
    type Error = WireError;

    fn encode(&mut self, frame: Frame, dst: &mut BytesMut) -> Result<(), WireError> {
        let body = postcard::to_allocvec(&frame)?;
        if body.len() > MAX_FRAME {
            return Err(WireError::TooLarge(body.len()));
        }
        dst.reserve(4 + body.len());
        dst.put_u32(body.len() as u32);
        dst.extend_from_slice(&body);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    /// Golden bytes of every frame: a change here is a wire-format change.
    fn check(frame: Frame, golden: &str) {
        let mut buf = BytesMut::new();
        FrameCodec::default()
            .encode(frame.clone(), &mut buf)
            .unwrap();
        assert_eq!(hex(&buf), golden, "{frame:?}");
        assert_eq!(FrameCodec::default().decode(&mut buf).unwrap(), Some(frame));
        assert!(buf.is_empty());
    }

    #[test]
    fn golden_frames() {
        check(
            Frame::Hello {
                cluster_id: "c".into(),
                node_id: "n".into(),
                origin: 5,
                proto_min: 1,
                proto_max: 1,
            },
            GOLDEN[0],
        );
        check(
            Frame::Append {
                topic: "t".into(),
                partition: 2,
                records: vec![WireRecord {
                    origin: 5,
                    seq: 1,
                    event_time_ms: 7,
                    ingest_time_ms: 8,
                    key: Bytes::from_static(b"k"),
                    subject: "s".into(),
                    payload: Bytes::from_static(b"p"),
                    headers: vec![],
                }],
            },
            GOLDEN[1],
        );
        check(
            Frame::Ack {
                topic: "t".into(),
                partition: 2,
                origin: 5,
                seq: 300,
            },
            GOLDEN[2],
        );
        check(
            Frame::Gap {
                topic: "t".into(),
                partition: 2,
                origin: 5,
                have: 9,
            },
            GOLDEN[3],
        );
        check(
            Frame::Digest {
                topic: "t".into(),
                partition: 0,
                version_vector: vec![(5, 9)],
                digest: 1,
            },
            GOLDEN[4],
        );
        check(
            Frame::Pull {
                topic: "t".into(),
                partition: 0,
                version_vector: vec![],
            },
            GOLDEN[5],
        );
        check(
            Frame::Live {
                topic: "t".into(),
                partition: 2,
                records: vec![WireRecord {
                    origin: 5,
                    seq: 1,
                    event_time_ms: 7,
                    ingest_time_ms: 8,
                    key: Bytes::from_static(b"k"),
                    subject: "s".into(),
                    payload: Bytes::from_static(b"p"),
                    headers: vec![],
                }],
            },
            GOLDEN[6],
        );
        check(
            Frame::Trimmed {
                topic: "t".into(),
                partition: 2,
                origin: 5,
                below: 300,
            },
            GOLDEN[7],
        );
    }

    const GOLDEN: [&str; 8] = [
        "00000008000163016e050101",
        "00000010010174020105010708016b0173017000",
        "000000070201740205ac02",
        "00000006030174020509",
        "000000080401740001050901",
        "000000050501740000",
        "00000010060174020105010708016b0173017000",
        "000000070701740205ac02",
    ];

    #[test]
    fn partial_oversized_and_trailing_frames() {
        let mut buf = BytesMut::new();
        FrameCodec::default()
            .encode(
                Frame::Pull {
                    topic: "t".into(),
                    partition: 0,
                    version_vector: vec![],
                },
                &mut buf,
            )
            .unwrap();
        let mut partial = BytesMut::from(&buf[..buf.len() - 1]);
        assert_eq!(FrameCodec::default().decode(&mut partial).unwrap(), None);
        let mut huge = BytesMut::from(&((MAX_FRAME as u32) + 1).to_be_bytes()[..]);
        assert!(matches!(
            FrameCodec::default().decode(&mut huge),
            Err(WireError::TooLarge(_))
        ));
        let mut trailing = BytesMut::new();
        trailing.put_u32(5);
        trailing.extend_from_slice(&[5, 0x00, 0x00, 0x00, 0xFF]); // Pull { "", 0, [] } + 1 byte
        assert!(matches!(
            FrameCodec::default().decode(&mut trailing),
            Err(WireError::Trailing(1))
        ));
        let mut garbage = BytesMut::new();
        garbage.put_u32(2);
        garbage.extend_from_slice(&[0x63, 0x01]);
        assert!(matches!(
            FrameCodec::default().decode(&mut garbage),
            Err(WireError::Decode(_))
        ));
    }

    #[test]
    fn version_negotiation() {
        assert_eq!(negotiate(1, 1), Some(1));
        assert_eq!(negotiate(1, 9), Some(1));
        assert_eq!(negotiate(2, 9), None);
        assert_eq!(negotiate(0, 0), None);
    }
}
