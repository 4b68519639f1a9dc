//! Prometheus metrics, named and labelled as Istio's so existing dashboards and Kiali read
//! them.
//!
//! `reporter` tells the direction: `source` is counted by the client's node (outbound),
//! `destination` by the server's node (inbound), `waypoint` by a waypoint (its HTTP metrics,
//! `crate::waypoint::telemetry`).
//!
//! The L4 series (`istio_tcp_connections_opened_total`, `istio_tcp_connections_closed_total`,
//! `istio_tcp_sent_bytes_total`, `istio_tcp_received_bytes_total`) carry exactly Istio's
//! standard label set ([`TcpLabels`]):
//!
//! | labels | value |
//! |--------|-------|
//! | `reporter` | `source` or `destination` |
//! | `source_*`, `destination_*`: `workload`, `workload_namespace`, `principal`, `app`, `version`, `canonical_service`, `canonical_revision`, `cluster` | [`PeerLabels`]: the workload is the owning controller (a Deployment, not its pods) |
//! | `destination_service`, `destination_service_name`, `destination_service_namespace` | [`ServiceLabels`] |
//! | `request_protocol` | `tcp` |
//! | `response_flags` | `-`: only connections that opened are counted here; the others are `trellis_connection_failures_total{direction, reason}` |
//! | `connection_security_policy` | `mutual_tls` or `none` |
//!
//! A value that cannot be known is `unknown`, never empty (Prometheus drops empty labels, and
//! Kiali skips series without the labels it groups by). No label names a pod, a connection or
//! an address, so the number of series is bounded by the workloads and services that talk,
//! and a rollout (new pods of the same Deployment) creates none.

use std::sync::Arc;

use prometheus_client::{
    collector::Collector,
    encoding::{
        DescriptorEncoder, EncodeLabelSet, EncodeLabelValue, EncodeMetric, LabelValueEncoder,
    },
    metrics::{
        MetricType,
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::Gauge,
    },
    registry::Registry,
};

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Reporter {
    Source,
    Destination,
    /// Counted by a waypoint, between source and destination.
    Waypoint,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum SecurityPolicy {
    MutualTls,
    None,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Direction {
    Inbound,
    Outbound,
}

/// Label values spelled as Istio spells them.
macro_rules! label_values {
    ($ty:ty { $($variant:ident => $text:literal),+ $(,)? }) => {
        impl $ty {
            pub const fn as_str(self) -> &'static str {
                match self { $(Self::$variant => $text),+ }
            }
        }
        impl EncodeLabelValue for $ty {
            fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
                std::fmt::Write::write_str(encoder, self.as_str())
            }
        }
    };
}
label_values!(Reporter { Source => "source", Destination => "destination", Waypoint => "waypoint" });
label_values!(SecurityPolicy { MutualTls => "mutual_tls", None => "none" });
label_values!(Direction { Inbound => "inbound", Outbound => "outbound" });

mod delivery;
mod failure;
pub use delivery::NodeReason;
pub use failure::FailureReason;

mod labels;
pub(crate) use labels::encode_standard;
pub use labels::{PeerLabels, ServiceLabels, TcpLabels};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailureLabels {
    pub direction: Direction,
    pub reason: FailureReason,
}

/// Where the datapath's counters come from at scrape time.
pub trait DatapathStats: Send + Sync + std::fmt::Debug + 'static {
    fn stats(&self) -> Vec<(&'static str, u64)>;
    /// Each eBPF program's runs and run time, as the kernel counts them.
    fn program_runs(&self) -> Vec<ProgramRuns> {
        Vec::new()
    }
}

/// One eBPF program's runs and their total time, since it was loaded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProgramRuns {
    pub program: String,
    pub runs: u64,
    pub run_time: std::time::Duration,
}

pub struct Metrics {
    registry: Registry,
    pub opened: Family<TcpLabels, Counter>,
    pub closed: Family<TcpLabels, Counter>,
    pub sent_bytes: Family<TcpLabels, Counter>,
    pub received_bytes: Family<TcpLabels, Counter>,
    pub failures: Family<FailureLabels, Counter>,
    pub active: Family<DirectionLabels, Gauge>,
    /// Access-log events left out by the per-source rate limit (the metrics above count
    /// those connections all the same).
    pub access_log_suppressed: Family<DirectionLabels, Counter>,
    /// Connections to local pods opened from the node's address rather than the client's.
    pub delivered_from_node: Family<NodeSourceLabels, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NodeSourceLabels {
    pub reason: NodeReason,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabels {
    pub direction: Direction,
}

/// Counts a connection as active until dropped.
pub struct ActiveGuard(Gauge);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let opened = Family::default();
        let closed = Family::default();
        let sent_bytes = Family::default();
        let received_bytes = Family::default();
        let failures = Family::default();
        let active = Family::default();
        let access_log_suppressed = Family::default();
        let delivered_from_node = Family::default();
        registry.register(
            "istio_tcp_connections_opened",
            "TCP connections opened",
            opened.clone(),
        );
        registry.register(
            "istio_tcp_connections_closed",
            "TCP connections closed",
            closed.clone(),
        );
        registry.register(
            "istio_tcp_sent_bytes",
            "Bytes sent towards the destination",
            sent_bytes.clone(),
        );
        registry.register(
            "istio_tcp_received_bytes",
            "Bytes received from the destination",
            received_bytes.clone(),
        );
        registry.register(
            "trellis_connection_failures",
            "Connections refused or failed, by reason",
            failures.clone(),
        );
        registry.register(
            "trellis_connections_active",
            "Connections being proxied now",
            active.clone(),
        );
        registry.register(
            "trellis_access_log_suppressed",
            "Access log events not written because their source exceeded its rate",
            access_log_suppressed.clone(),
        );
        registry.register(
            "trellis_delivered_from_node",
            "Connections to local pods opened from the node's address instead of the client's, \
             by reason",
            delivered_from_node.clone(),
        );
        Self {
            registry,
            opened,
            closed,
            sent_bytes,
            received_bytes,
            failures,
            active,
            access_log_suppressed,
            delivered_from_node,
        }
    }

    /// Counts a connection to a local pod opened from the node's address, by reason.
    pub fn delivered_from_node(&self, reason: NodeReason) {
        self.delivered_from_node
            .get_or_create(&NodeSourceLabels { reason })
            .inc();
    }

    /// Adds the datapath's own counters as `trellis_datapath_events_total{event}`.
    pub fn register_datapath(&mut self, stats: Arc<dyn DatapathStats>) {
        self.registry
            .register_collector(Box::new(DatapathCollector(stats)));
    }

    /// Where other parts of the process (the waypoint's HTTP metrics) register their families,
    /// so one scrape returns everything.
    pub fn registry_mut(&mut self) -> &mut Registry {
        &mut self.registry
    }

    /// Marks a connection of `direction` active for the guard's lifetime.
    pub fn active(&self, direction: Direction) -> ActiveGuard {
        let gauge = self
            .active
            .get_or_create(&DirectionLabels { direction })
            .clone();
        gauge.inc();
        ActiveGuard(gauge)
    }

    pub fn fail(&self, direction: Direction, reason: FailureReason) {
        self.failures
            .get_or_create(&FailureLabels { direction, reason })
            .inc();
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::error!(error = %e, "cannot encode metrics");
        }
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

#[derive(Debug)]
struct DatapathCollector(Arc<dyn DatapathStats>);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EventLabels {
    event: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProgramLabels {
    program: String,
}

impl Collector for DatapathCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut family = encoder.encode_descriptor(
            "trellis_datapath_events",
            "Events counted by the eBPF programs",
            None,
            MetricType::Counter,
        )?;
        for (event, value) in self.0.stats() {
            let metric = ConstCounter::new(value);
            metric.encode(family.encode_family(&EventLabels { event })?)?;
        }
        let programs = self.0.program_runs();
        let mut family = encoder.encode_descriptor(
            "trellis_datapath_program_runs",
            "Runs of each eBPF program, as the kernel counts them",
            None,
            MetricType::Counter,
        )?;
        for p in &programs {
            let labels = ProgramLabels {
                program: p.program.clone(),
            };
            ConstCounter::new(p.runs).encode(family.encode_family(&labels)?)?;
        }
        let mut family = encoder.encode_descriptor(
            "trellis_datapath_program_run_seconds",
            "Time the kernel spent running each eBPF program",
            None,
            MetricType::Counter,
        )?;
        for p in &programs {
            let labels = ProgramLabels {
                program: p.program.clone(),
            };
            ConstCounter::new(p.run_time.as_secs_f64()).encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}
