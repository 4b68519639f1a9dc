//! The server side of an HBONE connection: the HTTP/2 handshake with the limits of
//! [`super`], then one CONNECT stream after another, with keepalive.
//!
//! The caller (the agent's inbound listener, the waypoint) owns the loop: it takes each
//! stream from [`Server::next`], decides it, and answers with [`respond`] or [`accept`].

use std::time::Duration;

use bytes::Bytes;
use h2::{RecvStream, server::SendResponse};
use http::{Request, Response, StatusCode};
use tokio::io::{AsyncRead, AsyncWrite};

use super::{H2Stream, keepalive::Keepalive};

/// What a connection produced.
#[allow(
    clippy::large_enum_variant,
    reason = "moved once per stream straight into a match; boxing would allocate per stream"
)]
pub enum Next {
    /// A new stream: its request and the handle to answer it.
    Stream(Request<RecvStream>, SendResponse<Bytes>),
    /// The connection closed (the peer went away, or a graceful shutdown completed).
    Closed,
    /// The connection failed: a protocol error, a broken transport, or a silent peer.
    Failed(String),
}

/// One accepted HBONE connection.
pub struct Server<T> {
    conn: h2::server::Connection<T, Bytes>,
    keepalive: Keepalive,
}

impl<T: AsyncRead + AsyncWrite + Unpin> Server<T> {
    /// Exchanges the HTTP/2 preface and settings on `io`, accepting up to `max_streams`
    /// concurrent CONNECTs. The caller bounds how long this may take.
    pub async fn handshake(io: T, max_streams: u32) -> Result<Self, h2::Error> {
        let mut builder = h2::server::Builder::new();
        builder
            .max_concurrent_streams(max_streams)
            .max_header_list_size(super::MAX_HEADER_LIST_SIZE)
            .initial_window_size(super::STREAM_WINDOW)
            .initial_connection_window_size(super::CONNECTION_WINDOW)
            .max_frame_size(super::MAX_FRAME_SIZE)
            .max_pending_accept_reset_streams(super::MAX_PENDING_ACCEPT_RESETS);
        let mut conn = builder.handshake(io).await?;
        let keepalive = Keepalive::new(
            conn.ping_pong(),
            super::KEEPALIVE_INTERVAL,
            super::KEEPALIVE_TIMEOUT,
        );
        Ok(Self { conn, keepalive })
    }

    /// Drives the connection until the next stream arrives or the connection ends.
    pub async fn next(&mut self) -> Next {
        tokio::select! {
            accepted = self.conn.accept() => match accepted {
                Some(Ok((request, respond))) => Next::Stream(request, respond),
                Some(Err(e)) => Next::Failed(e.to_string()),
                None => Next::Closed,
            },
            dead = self.keepalive.dead() => Next::Failed(dead),
        }
    }

    /// Sends GOAWAY: streams already open finish, no new ones are taken, and [`Self::next`]
    /// reports [`Next::Closed`] once they are done.
    pub fn graceful_shutdown(&mut self) {
        self.conn.graceful_shutdown();
    }

    /// Drives the connection, taking no new stream, for at most `grace`: lets a GOAWAY or the
    /// last frames reach the peer before the connection is dropped.
    pub async fn drain(mut self, grace: Duration) {
        let _ = tokio::time::timeout(grace, async {
            while let Next::Stream(..) = self.next().await {}
        })
        .await;
    }
}

/// Refuses a stream with `status` (and no body).
pub fn respond(respond: &mut SendResponse<Bytes>, status: StatusCode) {
    let mut response = Response::new(());
    *response.status_mut() = status;
    // Fails only when the peer already reset the stream: nothing left to tell it.
    let _ = respond.send_response(response, true);
}

/// Accepts a stream with 200: the tunnel is open both ways.
pub fn accept(
    mut respond: SendResponse<Bytes>,
    request: Request<RecvStream>,
) -> Result<H2Stream, h2::Error> {
    let send = respond.send_response(Response::new(()), false)?;
    Ok(H2Stream::new(send, request.into_body()))
}
