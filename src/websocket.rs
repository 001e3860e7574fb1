//! MQTT over WebSocket: the handshake (path `/mqtt`, subprotocol `mqtt`)
//! and a byte-stream view of the binary frames, so a WebSocket connection
//! is served by the same code as a TCP one.

use bytes::{Buf, Bytes};
use futures_util::{Sink, Stream};
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

pub const PATH: &str = "/mqtt";

/// Accepts the WebSocket handshake on `stream`.
pub async fn accept(stream: TcpStream) -> Result<WsBridge, tokio_tungstenite::tungstenite::Error> {
    // The callback's signature is tungstenite's; its error type is large by design.
    #[allow(clippy::result_large_err)]
    let callback = |request: &Request, mut response: Response| -> Result<Response, ErrorResponse> {
        if request.uri().path() != PATH {
            let mut refusal = ErrorResponse::new(Some(format!("MQTT is served on {PATH}")));
            *refusal.status_mut() = StatusCode::NOT_FOUND;
            return Err(refusal);
        }
        let offers_mqtt = request
            .headers()
            .get_all("sec-websocket-protocol")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|p| p.trim().eq_ignore_ascii_case("mqtt"));
        if offers_mqtt {
            response.headers_mut().insert("sec-websocket-protocol", HeaderValue::from_static("mqtt"));
        }
        Ok(response)
    };
    let ws = tokio_tungstenite::accept_hdr_async(stream, callback).await?;
    Ok(WsBridge { ws, pending: Bytes::new() })
}

/// Reads the payloads of binary frames as one byte stream; each write is
/// sent as one binary frame.
pub struct WsBridge {
    ws: WebSocketStream<TcpStream>,
    pending: Bytes,
}

fn to_io(err: tokio_tungstenite::tungstenite::Error) -> io::Error {
    io::Error::other(err)
}

impl AsyncRead for WsBridge {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        loop {
            if !self.pending.is_empty() {
                let n = self.pending.len().min(buf.remaining());
                buf.put_slice(&self.pending[..n]);
                self.pending.advance(n);
                return Poll::Ready(Ok(()));
            }
            match ready!(Pin::new(&mut self.ws).poll_next(cx)) {
                None | Some(Ok(Message::Close(_))) => return Poll::Ready(Ok(())),
                Some(Ok(Message::Binary(data))) => self.pending = data,
                // MQTT over WebSocket is binary only; pings are answered by
                // tungstenite itself.
                Some(Ok(Message::Text(_))) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "text frame on an MQTT WebSocket",
                    )))
                }
                Some(Ok(_)) => {}
                Some(Err(err)) => return Poll::Ready(Err(to_io(err))),
            }
        }
    }
}

impl AsyncWrite for WsBridge {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        ready!(Pin::new(&mut self.ws).poll_ready(cx)).map_err(to_io)?;
        Pin::new(&mut self.ws).start_send(Message::Binary(Bytes::copy_from_slice(data))).map_err(to_io)?;
        Poll::Ready(Ok(data.len()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.ws).poll_flush(cx).map_err(to_io)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.ws).poll_close(cx).map_err(to_io)
    }
}
