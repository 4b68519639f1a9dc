//! Istio's standard label set: one end of a connection or request ([`PeerLabels`]), the
//! destination service ([`ServiceLabels`]), and the L4 series' whole set ([`TcpLabels`]). The
//! waypoint's request labels (`crate::waypoint::telemetry::RequestLabels`) are built from the
//! same parts. `unknown` stands for every value that cannot be known, here and only here.

use std::net::SocketAddr;

use prometheus_client::encoding::{EncodeLabel, EncodeLabelSet, LabelSetEncoder};

use super::{Reporter, SecurityPolicy};
use crate::{
    identity::Identity,
    state::{MeshState, Service, Workload, workload::UNKNOWN},
};

/// What the metrics say about one end: its workload (the owning controller), namespace,
/// principal, app, version, canonical service and revision, and cluster.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct PeerLabels {
    pub workload: String,
    pub workload_namespace: String,
    pub principal: String,
    pub app: String,
    pub version: String,
    pub canonical_service: String,
    pub canonical_revision: String,
    pub cluster: String,
}

impl Default for PeerLabels {
    fn default() -> Self {
        Self {
            workload: UNKNOWN.into(),
            workload_namespace: UNKNOWN.into(),
            principal: UNKNOWN.into(),
            app: UNKNOWN.into(),
            version: UNKNOWN.into(),
            canonical_service: UNKNOWN.into(),
            canonical_revision: UNKNOWN.into(),
            cluster: UNKNOWN.into(),
        }
    }
}

impl PeerLabels {
    /// An end known as `workload` (from the mesh state) and proven as `principal` (its
    /// certificate); either may be unknown. The principal is the proven one when both are
    /// known, and else the workload's own identity.
    pub fn of(workload: Option<&Workload>, principal: Option<&Identity>) -> Self {
        let mut labels = Self::default();
        if let Some(w) = workload {
            let t = &w.telemetry;
            labels.workload.clone_from(&t.workload_name);
            labels.workload_namespace.clone_from(&w.namespace);
            labels.app.clone_from(&t.app);
            labels.version.clone_from(&t.version);
            labels.canonical_service.clone_from(&t.canonical_service);
            labels.canonical_revision.clone_from(&t.canonical_revision);
            labels.cluster.clone_from(&t.cluster);
        }
        if let Some(p) = principal.or(workload.map(|w| &w.identity)) {
            labels.principal = p.to_string();
        }
        labels
    }

    /// Encodes the labels under the `source_` or `destination_` names.
    fn encode(&self, side: Side, encoder: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        let names = match side {
            Side::Source => &SOURCE_NAMES,
            Side::Destination => &DESTINATION_NAMES,
        };
        let values = [
            &self.workload,
            &self.workload_namespace,
            &self.principal,
            &self.app,
            &self.version,
            &self.canonical_service,
            &self.canonical_revision,
            &self.cluster,
        ];
        for (name, value) in names.iter().zip(values) {
            (*name, value.as_str()).encode(encoder.encode_label())?;
        }
        Ok(())
    }
}

#[derive(Clone, Copy)]
enum Side {
    Source,
    Destination,
}

const SOURCE_NAMES: [&str; 8] = [
    "source_workload",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "source_canonical_service",
    "source_canonical_revision",
    "source_cluster",
];
const DESTINATION_NAMES: [&str; 8] = [
    "destination_workload",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_version",
    "destination_canonical_service",
    "destination_canonical_revision",
    "destination_cluster",
];

/// The destination service: `destination_service` (its hostname,
/// `<name>.<namespace>.svc.<domain>`), `destination_service_name` and
/// `destination_service_namespace`.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct ServiceLabels {
    pub service: String,
    pub name: String,
    pub namespace: String,
}

impl Default for ServiceLabels {
    fn default() -> Self {
        Self {
            service: UNKNOWN.into(),
            name: UNKNOWN.into(),
            namespace: UNKNOWN.into(),
        }
    }
}

impl ServiceLabels {
    pub fn of(service: Option<&Service>) -> Self {
        service.map_or_else(Self::default, |s| Self {
            service: s.hostname.clone(),
            name: s.name.clone(),
            namespace: s.namespace.clone(),
        })
    }

    /// What a destination node knows of the service a connection to `dst` was for (the client
    /// addressed it, not the node): the first Service, by namespace and name, with an endpoint
    /// at that address whose port targets `dst`'s port, else the first with an endpoint there.
    pub fn serving(state: &MeshState, dst: SocketAddr) -> Self {
        let services = state.services_by_endpoint(dst.ip());
        let by_port = services
            .iter()
            .find(|s| s.ports.iter().any(|p| p.target_port == Some(dst.port())));
        Self::of(by_port.or(services.first()).map(AsRef::as_ref))
    }

    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        ("destination_service", self.service.as_str()).encode(encoder.encode_label())?;
        ("destination_service_name", self.name.as_str()).encode(encoder.encode_label())?;
        ("destination_service_namespace", self.namespace.as_str()).encode(encoder.encode_label())
    }
}

/// Istio's standard TCP labels (the module docs of [`super`] list them).
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct TcpLabels {
    pub reporter: Reporter,
    pub source: PeerLabels,
    pub destination: PeerLabels,
    pub service: ServiceLabels,
    pub connection_security_policy: SecurityPolicy,
}

impl TcpLabels {
    pub fn new(reporter: Reporter, security: SecurityPolicy) -> Self {
        Self {
            reporter,
            source: PeerLabels::default(),
            destination: PeerLabels::default(),
            service: ServiceLabels::default(),
            connection_security_policy: security,
        }
    }

    pub fn with_source(
        mut self,
        workload: Option<&Workload>,
        principal: Option<&Identity>,
    ) -> Self {
        self.source = PeerLabels::of(workload, principal);
        self
    }

    pub fn with_destination(
        mut self,
        workload: Option<&Workload>,
        principal: Option<&Identity>,
    ) -> Self {
        self.destination = PeerLabels::of(workload, principal);
        self
    }

    pub fn with_service(mut self, service: ServiceLabels) -> Self {
        self.service = service;
        self
    }
}

/// Encodes the parts every Istio series shares, in one order: reporter, source, destination,
/// service, protocol, response flags, security policy.
#[allow(
    clippy::too_many_arguments,
    reason = "one argument per part of the label set"
)]
pub(crate) fn encode_standard(
    encoder: &mut LabelSetEncoder,
    reporter: Reporter,
    source: &PeerLabels,
    destination: &PeerLabels,
    service: &ServiceLabels,
    request_protocol: &str,
    response_flags: &str,
    security: SecurityPolicy,
) -> Result<(), std::fmt::Error> {
    ("reporter", reporter.as_str()).encode(encoder.encode_label())?;
    source.encode(Side::Source, encoder)?;
    destination.encode(Side::Destination, encoder)?;
    service.encode(encoder)?;
    ("request_protocol", request_protocol).encode(encoder.encode_label())?;
    ("response_flags", response_flags).encode(encoder.encode_label())?;
    ("connection_security_policy", security.as_str()).encode(encoder.encode_label())
}

/// `response_flags` of a connection counted by the L4 series: none (see the module docs of
/// [`super`]).
const NO_FLAGS: &str = "-";

impl EncodeLabelSet for TcpLabels {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        encode_standard(
            encoder,
            self.reporter,
            &self.source,
            &self.destination,
            &self.service,
            "tcp",
            NO_FLAGS,
            self.connection_security_policy,
        )
    }
}

#[cfg(test)]
mod tests {
    use prometheus_client::{
        metrics::{counter::Counter, family::Family},
        registry::Registry,
    };

    use super::*;

    fn encoded(labels: TcpLabels) -> String {
        let mut registry = Registry::default();
        let family = Family::<TcpLabels, Counter>::default();
        registry.register("t", "t", family.clone());
        family.get_or_create(&labels).inc();
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry).expect("encodes");
        out.lines()
            .find(|l| l.starts_with("t_total{"))
            .expect("sample")
            .to_owned()
    }

    /// `(name, value)` of every label of a sample line.
    fn pairs(line: &str) -> Vec<(String, String)> {
        let inner = &line[line.find('{').expect("{") + 1..line.rfind('}').expect("}")];
        inner
            .split("\",")
            .map(|p| {
                let (k, v) = p.split_once("=\"").expect("pair");
                (k.to_owned(), v.trim_end_matches('"').to_owned())
            })
            .collect()
    }

    #[test]
    fn every_standard_label_is_there_and_unknown_when_not_known() {
        let line = encoded(TcpLabels::new(Reporter::Source, SecurityPolicy::None));
        let labels = pairs(&line);
        let names: Vec<&str> = labels.iter().map(|(k, _)| k.as_str()).collect();
        let mut expected = vec!["reporter"];
        expected.extend(SOURCE_NAMES);
        expected.extend(DESTINATION_NAMES);
        expected.extend([
            "destination_service",
            "destination_service_name",
            "destination_service_namespace",
            "request_protocol",
            "response_flags",
            "connection_security_policy",
        ]);
        assert_eq!(names, expected, "{line}");
        for (k, v) in &labels {
            let want = match k.as_str() {
                "reporter" => "source",
                "request_protocol" => "tcp",
                "response_flags" => "-",
                "connection_security_policy" => "none",
                _ => UNKNOWN,
            };
            assert_eq!(v, want, "{k} in {line}");
        }
    }
}
