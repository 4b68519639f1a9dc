//! The client side of an HBONE connection: the HTTP/2 handshake with the limits of
//! [`super`], CONNECT streams, and the task that drives the connection with keepalive.

use std::net::SocketAddr;

use bytes::Bytes;
use h2::client::SendRequest;
use http::{Method, Request, StatusCode};
use tokio::io::{AsyncRead, AsyncWrite};

use super::{H2Stream, keepalive::Keepalive};

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("HBONE connection cannot open a stream: {0}")]
    Connection(h2::Error),
    #[error("CONNECT failed: {0}")]
    Request(h2::Error),
    #[error("CONNECT refused with {0}")]
    Status(StatusCode),
}

/// Drives one client connection: frames in and out, keepalive. Run it on a task of its own.
pub struct Driver<T> {
    conn: h2::client::Connection<T, Bytes>,
    keepalive: Keepalive,
}

impl<T: AsyncRead + AsyncWrite + Unpin> Driver<T> {
    /// Runs until the connection ends: `Ok` when it closed (the peer went away cleanly, or
    /// nothing holds it any more), the reason otherwise.
    pub async fn run(mut self) -> Result<(), String> {
        tokio::select! {
            result = &mut self.conn => result.map_err(|e| e.to_string()),
            dead = self.keepalive.dead() => Err(dead),
        }
    }
}

/// Sends the HTTP/2 preface and settings on `io`. The connection closes once the returned
/// handle (and its clones) and every stream are gone.
pub async fn handshake<T: AsyncRead + AsyncWrite + Unpin>(
    io: T,
) -> Result<(SendRequest<Bytes>, Driver<T>), h2::Error> {
    let mut builder = h2::client::Builder::new();
    builder
        .initial_window_size(super::STREAM_WINDOW)
        .initial_connection_window_size(super::CONNECTION_WINDOW)
        .max_frame_size(super::MAX_FRAME_SIZE)
        .max_header_list_size(super::MAX_HEADER_LIST_SIZE)
        .enable_push(false);
    let (sender, mut conn) = builder.handshake(io).await?;
    let keepalive = Keepalive::new(
        conn.ping_pong(),
        super::KEEPALIVE_INTERVAL,
        super::KEEPALIVE_TIMEOUT,
    );
    Ok((sender, Driver { conn, keepalive }))
}

/// Opens a CONNECT stream to `dst` on the connection of `sender`; `forwarded` is the client
/// (telemetry for the peer, never trusted there).
pub async fn connect(
    sender: &SendRequest<Bytes>,
    dst: SocketAddr,
    forwarded: SocketAddr,
) -> Result<H2Stream, ConnectError> {
    let mut sender = sender
        .clone()
        .ready()
        .await
        .map_err(ConnectError::Connection)?;
    let mut request = Request::new(());
    *request.method_mut() = Method::CONNECT;
    // An `IP:port` always parses as an authority-form URI.
    *request.uri_mut() = http::Uri::try_from(dst.to_string())
        .map_err(|_| ConnectError::Status(StatusCode::BAD_REQUEST))?;
    if let Ok(value) = http::HeaderValue::try_from(super::forwarded_for(forwarded)) {
        request.headers_mut().insert(http::header::FORWARDED, value);
    }
    let (response, send) = sender
        .send_request(request, false)
        .map_err(ConnectError::Request)?;
    let response = response.await.map_err(ConnectError::Request)?;
    if response.status() != StatusCode::OK {
        return Err(ConnectError::Status(response.status()));
    }
    Ok(H2Stream::new(send, response.into_body()))
}
