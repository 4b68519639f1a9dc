//! The one request most end-to-end tests make: a GET to a `pod-app` `http` server, answered
//! with the server's name.

use std::{net::SocketAddr, time::Duration};

use super::{Place, Testbed};

/// Longest a single GET may take, whatever the client's own timeout says.
const RUN_LIMIT: Duration = Duration::from_secs(20);

impl Testbed {
    /// One GET from `place` to `to` with `pod-app http-get` (bounded by `timeout`, or the
    /// client's default): the name of the server that answered, or why it failed (a failed
    /// or refused connection, a timeout, a missing name).
    pub fn get_server_name<'a>(
        &self,
        place: impl Into<Place<'a>>,
        to: SocketAddr,
        timeout: Option<Duration>,
    ) -> Result<String, String> {
        let timeout_ms = timeout.map(|t| t.as_millis().to_string());
        let to = to.to_string();
        let mut cmd = vec!["pod-app"];
        if let Some(ms) = &timeout_ms {
            cmd.extend(["--timeout-ms", ms]);
        }
        cmd.extend(["http-get", "--to", &to]);
        let out = self
            .run(place, &cmd, RUN_LIMIT)
            .map_err(|e| format!("{e:#}"))?;
        let json = out.ok_json().map_err(|e| format!("{e:#}"))?;
        json["body"]["server"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| format!("no server name in {json}"))
    }
}
