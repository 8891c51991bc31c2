//! The server side of rumqttc's MQTT 3.1.1 packet codec, wrapped so that no packet is ever
//! swallowed: the fixed header is checked first (size limit enforced before the body is
//! buffered), and any error after that is fatal for the connection (see CRATE-NOTES,
//! "Codec turns inner InsufficientBytes into wait for more data").

use bytes::BytesMut;
use rumqttc::mqttbytes::{self, v4::Packet};
use tokio_util::codec::{Decoder, Encoder};

/// Codec for one MQTT connection.
#[derive(Debug, Clone, Copy)]
pub struct ServerCodec {
    pub max_incoming: usize,
    pub max_outgoing: usize,
    /// Until the first packet is decoded: refuse at its first byte anything that is not a
    /// CONNECT, so garbage (an HTTP request, a TLS hello) is cut off at once instead of
    /// waiting for the connect timeout.
    pub expect_connect: bool,
}

impl ServerCodec {
    pub fn new(max_incoming: usize) -> ServerCodec {
        ServerCodec {
            max_incoming,
            max_outgoing: usize::MAX,
            expect_connect: true,
        }
    }
}

/// Why a connection's byte stream was refused.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("malformed packet: {0}")]
    Mqtt(#[from] mqttbytes::Error),
    #[error("the first packet must be CONNECT (first byte {0:#04x})")]
    NotConnect(u8),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

impl Decoder for ServerCodec {
    type Item = Packet;
    type Error = CodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Packet>, CodecError> {
        if self.expect_connect
            && let Some(&first) = src.first()
            && first != 0x10
        {
            return Err(CodecError::NotConnect(first));
        }
        match mqttbytes::check(src.iter(), self.max_incoming) {
            Ok(_) => {
                self.expect_connect = false;
                Ok(Some(Packet::read(src, self.max_incoming)?))
            }
            Err(mqttbytes::Error::InsufficientBytes(missing)) => {
                src.reserve(missing.min(self.max_incoming));
                Ok(None)
            }
            Err(e) => Err(e.into()),
        }
    }
}

impl Encoder<Packet> for ServerCodec {
    type Error = CodecError;

    fn encode(&mut self, packet: Packet, dst: &mut BytesMut) -> Result<(), CodecError> {
        packet.write(dst, self.max_outgoing)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn codec() -> ServerCodec {
        ServerCodec {
            max_incoming: 1024,
            max_outgoing: 1024,
            expect_connect: false,
        }
    }

    #[test]
    fn anything_but_connect_first_is_refused_at_the_first_byte() {
        let mut c = ServerCodec::new(1024);
        let mut buf = BytesMut::from(&b"G"[..]);
        assert!(matches!(
            c.decode(&mut buf),
            Err(CodecError::NotConnect(b'G'))
        ));
        let mut c = ServerCodec::new(1024);
        let mut buf = BytesMut::from(&[0x10u8][..]);
        assert!(c.decode(&mut buf).unwrap().is_none());
    }

    #[test]
    fn partial_frames_wait_and_whole_frames_decode() {
        let mut c = codec();
        let mut buf = BytesMut::from(&[0xC0u8][..]);
        assert!(c.decode(&mut buf).unwrap().is_none());
        buf.extend_from_slice(&[0x00]);
        assert_eq!(c.decode(&mut buf).unwrap(), Some(Packet::PingReq));
        assert!(buf.is_empty());
    }

    #[test]
    fn oversized_header_is_refused_before_the_body_arrives() {
        let mut c = codec();
        // PUBLISH announcing 2 MiB.
        let mut buf = BytesMut::from(&[0x30u8, 0x80, 0x80, 0x80, 0x01][..]);
        assert!(matches!(
            c.decode(&mut buf),
            Err(CodecError::Mqtt(
                mqttbytes::Error::PayloadSizeLimitExceeded(_)
            ))
        ));
    }

    #[test]
    fn garbage_is_an_error_not_a_hang() {
        let mut c = codec();
        let mut buf = BytesMut::from(&[0x00u8, 0x00][..]);
        assert!(c.decode(&mut buf).is_err());
        // Invalid UTF-8 in a PUBLISH topic.
        let mut buf = BytesMut::from(&[0x30u8, 0x05, 0x00, 0x02, 0xC3, 0x28, b'x'][..]);
        assert!(c.decode(&mut buf).is_err());
    }
}
