//! W3C Trace Context (`traceparent`, `tracestate`) at the waypoint, and span export
//! ([`export`]).
//!
//! The waypoint takes part in the trace as one hop: a request that arrives with a valid
//! `traceparent` keeps its trace id and sampling flags and leaves with the waypoint's own span
//! id as parent, so the backend's span is a child of the waypoint's; a request without one (or
//! with one that does not parse) starts a new trace, sampled at the configured rate
//! (unsampled when no exporter is configured), and any `tracestate` is dropped with the
//! invalid header, as the specification requires. The ids appear in the access log, which
//! ties a request's log lines to the application's traces; sampled requests' spans are
//! exported over OTLP when a collector is configured.

pub mod export;

use std::fmt;

use http::{HeaderMap, HeaderValue};

const TRACEPARENT: &str = "traceparent";
const TRACESTATE: &str = "tracestate";
/// The `sampled` bit of the trace flags.
const SAMPLED: u8 = 0x01;

/// The trace context of one request as the waypoint forwards it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceContext {
    pub trace_id: [u8; 16],
    /// The waypoint's span: the parent the upstream sees.
    pub span_id: [u8; 8],
    /// The client's span, when it sent one.
    pub parent_id: Option<[u8; 8]>,
    pub flags: u8,
}

impl TraceContext {
    /// Reads the client's context from `headers` and replaces it with the one to forward. A
    /// new trace is sampled when `sample_new` says so; an existing one keeps its flags.
    pub fn propagate(
        headers: &mut HeaderMap,
        rng: &mut fastrand::Rng,
        sample_new: impl FnOnce(&mut fastrand::Rng) -> bool,
    ) -> Self {
        let incoming = headers
            .get(TRACEPARENT)
            .and_then(|v| v.to_str().ok())
            .and_then(parse);
        let mut span_id = [0u8; 8];
        while span_id == [0; 8] {
            rng.fill(&mut span_id);
        }
        let context = if let Some((trace_id, parent, flags)) = incoming {
            Self {
                trace_id,
                span_id,
                parent_id: Some(parent),
                flags,
            }
        } else {
            headers.remove(TRACESTATE);
            let mut trace_id = [0u8; 16];
            while trace_id == [0; 16] {
                rng.fill(&mut trace_id);
            }
            Self {
                trace_id,
                span_id,
                parent_id: None,
                flags: if sample_new(rng) { SAMPLED } else { 0 },
            }
        };
        if let Ok(value) = HeaderValue::from_str(&context.to_string()) {
            headers.insert(TRACEPARENT, value);
        }
        context
    }

    /// Whether the trace is recorded: the span of a sampled request is exported.
    pub fn sampled(&self) -> bool {
        self.flags & SAMPLED != 0
    }

    pub fn trace_id_hex(&self) -> String {
        hex(&self.trace_id)
    }

    pub fn span_id_hex(&self) -> String {
        hex(&self.span_id)
    }
}

/// The `traceparent` value the waypoint sends (version 00).
impl fmt::Display for TraceContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "00-{}-{}-{:02x}",
            hex(&self.trace_id),
            hex(&self.span_id),
            self.flags
        )
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Lower-case hex only, as the specification requires.
fn unhex<const N: usize>(text: &str) -> Option<[u8; N]> {
    if text.len() != N * 2
        || !text
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return None;
    }
    let mut out = [0u8; N];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(i * 2..i * 2 + 2)?, 16).ok()?;
    }
    Some(out)
}

/// `version-traceid-parentid-flags`; a later version may append fields after a `-`, which
/// are ignored. Version `ff` and all-zero ids are invalid.
fn parse(value: &str) -> Option<([u8; 16], [u8; 8], u8)> {
    let value = value.trim();
    let version = unhex::<1>(value.get(0..2)?)?[0];
    if version == 0xff {
        return None;
    }
    let rest = value.get(2..)?;
    let fields = rest.get(..53)?;
    let extra = rest.get(53..)?;
    if (version == 0 && !extra.is_empty()) || (!extra.is_empty() && !extra.starts_with('-')) {
        return None;
    }
    let mut parts = fields.split('-');
    let (Some(""), Some(trace), Some(parent), Some(flags), None) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return None;
    };
    let trace_id = unhex::<16>(trace)?;
    let parent_id = unhex::<8>(parent)?;
    let flags = unhex::<1>(flags)?[0];
    if trace_id == [0; 16] || parent_id == [0; 8] {
        return None;
    }
    Some((trace_id, parent_id, flags))
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn forward(value: Option<&str>, state: Option<&str>) -> (TraceContext, HeaderMap) {
        let mut headers = HeaderMap::new();
        if let Some(v) = value {
            headers.insert(TRACEPARENT, HeaderValue::from_str(v).expect("header value"));
        }
        if let Some(s) = state {
            headers.insert(TRACESTATE, HeaderValue::from_str(s).expect("header value"));
        }
        let context =
            TraceContext::propagate(&mut headers, &mut fastrand::Rng::with_seed(7), |_| false);
        (context, headers)
    }

    #[test]
    fn a_valid_parent_keeps_its_trace_and_flags_and_gets_the_waypoint_as_parent() {
        let (context, headers) = forward(Some(VALID), Some("vendor=x"));
        assert_eq!(context.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(
            context.parent_id.map(|p| hex(&p)).as_deref(),
            Some("00f067aa0ba902b7")
        );
        assert_eq!(context.flags, 1);
        let sent = headers[TRACEPARENT].to_str().expect("ascii");
        assert_eq!(sent, context.to_string());
        assert!(sent.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"));
        assert!(
            !sent.contains("00f067aa0ba902b7"),
            "the waypoint's own span is the parent"
        );
        assert_eq!(headers[TRACESTATE], "vendor=x");
    }

    #[test]
    fn no_or_invalid_parent_starts_a_new_unsampled_trace_and_drops_tracestate() {
        for bad in [
            None,
            Some("garbage"),
            Some("ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
            Some("00-00000000000000000000000000000000-00f067aa0ba902b7-01"),
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01"),
            Some("00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01"),
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra"),
        ] {
            let (context, headers) = forward(bad, Some("vendor=x"));
            assert_eq!(context.parent_id, None, "{bad:?}");
            assert_eq!(context.flags, 0);
            assert_ne!(context.trace_id, [0; 16]);
            assert!(headers.get(TRACESTATE).is_none(), "{bad:?}");
            assert!(parse(headers[TRACEPARENT].to_str().expect("ascii")).is_some());
        }
    }

    #[test]
    fn new_traces_follow_the_sampling_decision_and_existing_ones_keep_theirs() {
        let mut headers = HeaderMap::new();
        let new = TraceContext::propagate(&mut headers, &mut fastrand::Rng::new(), |_| true);
        assert!(new.sampled());
        assert!(
            headers[TRACEPARENT]
                .to_str()
                .expect("ascii")
                .ends_with("-01")
        );

        let unsampled = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";
        let mut headers = HeaderMap::new();
        headers.insert(TRACEPARENT, HeaderValue::from_static(unsampled));
        let kept = TraceContext::propagate(&mut headers, &mut fastrand::Rng::new(), |_| {
            panic!("a caller's decision is not re-made")
        });
        assert!(!kept.sampled());
        assert!(forward(Some(VALID), None).0.sampled());
    }

    #[test]
    fn a_later_version_with_more_fields_is_understood() {
        let (context, _) = forward(
            Some("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-future"),
            None,
        );
        assert!(context.parent_id.is_some());
    }
}
