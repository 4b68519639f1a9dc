//! The Kubernetes contract: every label, label value, class name, API group and field manager
//! the mesh reads or writes, one constant each (this file), and the objects as users write
//! them:
//!
//! - [`policy`]: the `security.trellis.dev/v1` kinds (AuthorizationPolicy, PeerAuthentication,
//!   RequestAuthentication).
//! - [`traffic_policy`]: the `traffic.trellis.dev/v1` TrafficPolicy.
//! - [`gateway`]: the HTTPRoute and GRPCRoute specs (Gateway API v1) the waypoint reads.
//! - [`istio_networking`]: Istio's `networking.istio.io` VirtualService and DestinationRule.
//! - [`status`]: the status shape written back (`Accepted` conditions).
//! - [`crds`]: the CustomResourceDefinitions of the mesh's own kinds, as the chart ships them.
//!
//! What the objects mean is decided where they are compiled ([`crate::policy`],
//! [`crate::l7`]). The `#[kube(group = ...)]` attributes of the derived kinds must repeat their
//! group as a literal; a test below pins them to these constants.

pub mod crds;
pub mod gateway;
pub mod istio_networking;
pub mod policy;
pub mod status;
pub mod traffic_policy;

/// Namespace label that enrolls a namespace's pods, and pod label that opts one out.
pub const MESH_LABEL: &str = "trellis.dev/mesh";
/// [`MESH_LABEL`] value on a namespace: its pods are in the mesh.
pub const MESH_ENABLED: &str = "enabled";
/// [`MESH_LABEL`] value on a pod: it stays out of its namespace's mesh.
pub const MESH_DISABLED: &str = "disabled";

/// Label on a Namespace, Service or pod naming the waypoint its traffic goes through.
pub const USE_WAYPOINT_LABEL: &str = "trellis.dev/use-waypoint";
/// [`USE_WAYPOINT_LABEL`] value that opts a Service or pod out of its namespace's waypoint.
pub const NO_WAYPOINT: &str = "none";
/// Pod label that, set to [`WAYPOINT_ENFORCEMENT_DISABLED`], lets a pod behind a waypoint be
/// reached without crossing it.
pub const WAYPOINT_ENFORCEMENT_LABEL: &str = "trellis.dev/waypoint-enforcement";
/// The [`WAYPOINT_ENFORCEMENT_LABEL`] value that opts a pod out.
pub const WAYPOINT_ENFORCEMENT_DISABLED: &str = "disabled";

/// Istio's label enrolling a namespace or pod (with the controller's `compatibility.istio_labels`
/// switch on); read only where no [`MESH_LABEL`] is set on the same object.
pub const ISTIO_DATAPLANE_MODE_LABEL: &str = "istio.io/dataplane-mode";
/// [`ISTIO_DATAPLANE_MODE_LABEL`] value that enrolls (a namespace's pods, or one pod).
pub const ISTIO_DATAPLANE_AMBIENT: &str = "ambient";
/// [`ISTIO_DATAPLANE_MODE_LABEL`] value that keeps a namespace or pod out.
pub const ISTIO_DATAPLANE_NONE: &str = "none";
/// Istio's twin of [`USE_WAYPOINT_LABEL`] (same values, [`NO_WAYPOINT`] included), read with
/// the switch on where no [`USE_WAYPOINT_LABEL`] is set on the same object.
pub const ISTIO_USE_WAYPOINT_LABEL: &str = "istio.io/use-waypoint";

/// The `gatewayClassName` that makes a Gateway a waypoint, and the `GatewayClass` a
/// root-namespace policy may target to apply at every waypoint.
pub const WAYPOINT_CLASS: &str = "trellis-waypoint";
/// Istio's waypoint class: a `GatewayClass` target of this name in a `security.istio.io`
/// policy means every waypoint; with Istio labels read (the controller's
/// `compatibility.istio_labels`), Gateways of this class are waypoints too, and otherwise they
/// are left to Istio.
pub const ISTIO_WAYPOINT_CLASS: &str = "istio-waypoint";
/// `status.parents[].controllerName` of the route status entries the mesh writes.
pub const WAYPOINT_CONTROLLER_NAME: &str = "trellis.dev/waypoint";
/// Label on the pods (and Services) of a Gateway, naming it (the Gateway API's own).
pub const GATEWAY_NAME_LABEL: &str = "gateway.networking.k8s.io/gateway-name";

/// Node label giving the node's zone; copied onto workloads and endpoints.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
/// EndpointSlice label naming the Service the slice belongs to.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// The recommended label naming the tool that manages an object.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
/// The recommended label naming an application.
pub const APP_NAME_LABEL: &str = "app.kubernetes.io/name";
/// The recommended label naming an application's component.
pub const APP_COMPONENT_LABEL: &str = "app.kubernetes.io/component";

/// Istio's labels naming a workload's canonical service and revision (telemetry), read first.
pub const CANONICAL_NAME_LABEL: &str = "service.istio.io/canonical-name";
pub const CANONICAL_REVISION_LABEL: &str = "service.istio.io/canonical-revision";
/// The recommended label naming an application's version, read after the canonical labels
/// (with [`APP_NAME_LABEL`]).
pub const APP_VERSION_LABEL: &str = "app.kubernetes.io/version";
/// The plain `app` and `version` labels, read last (and alone for `app` and `version`).
pub const APP_LABEL: &str = "app";
pub const VERSION_LABEL: &str = "version";
/// The label a Deployment's ReplicaSet stamps on its pods, and suffixes its own name with.
pub const POD_TEMPLATE_HASH_LABEL: &str = "pod-template-hash";

/// The Gateway API group (Gateway, GatewayClass, HTTPRoute, GRPCRoute).
pub const GATEWAY_GROUP: &str = "gateway.networking.k8s.io";
/// `apiVersion` of the Gateway API kinds the mesh reads.
pub const GATEWAY_API_VERSION: &str = "gateway.networking.k8s.io/v1";
/// Trellis's security kinds (AuthorizationPolicy, PeerAuthentication, RequestAuthentication).
pub const SECURITY_GROUP: &str = "security.trellis.dev";
/// `apiVersion` of the security kinds.
pub const SECURITY_API_VERSION: &str = "security.trellis.dev/v1";
/// Istio's security kinds, read unchanged beside Trellis's own (same kinds, same fields).
pub const ISTIO_SECURITY_GROUP: &str = "security.istio.io";
/// The `apiVersion` of the Istio security kinds the mesh watches and writes status to.
pub const ISTIO_SECURITY_API_VERSION: &str = "security.istio.io/v1";
/// Every `apiVersion` of the Istio security kinds the mesh reads (one schema, as in Istio).
pub const ISTIO_SECURITY_API_VERSIONS: [&str; 2] =
    ["security.istio.io/v1", "security.istio.io/v1beta1"];
/// Trellis's traffic management kinds (TrafficPolicy).
pub const TRAFFIC_GROUP: &str = "traffic.trellis.dev";
/// `apiVersion` of the traffic management kinds.
pub const TRAFFIC_API_VERSION: &str = "traffic.trellis.dev/v1";

/// Istio's traffic management kinds (VirtualService, DestinationRule), read as Istio defines
/// them.
pub const ISTIO_NETWORKING_GROUP: &str = "networking.istio.io";
/// The versions of [`ISTIO_NETWORKING_GROUP`] the mesh reads (one schema, served under each);
/// the first is the one watched in Kubernetes and written back to.
pub const ISTIO_NETWORKING_VERSIONS: [&str; 3] = ["v1", "v1beta1", "v1alpha3"];
/// `apiVersion` the status of the Istio kinds is written at.
pub const ISTIO_NETWORKING_API_VERSION: &str = "networking.istio.io/v1";

/// The field manager of the controller's server-side applies, and its [`MANAGED_BY_LABEL`].
pub const FIELD_MANAGER: &str = "trellis-controller";

#[cfg(test)]
mod tests {
    use kube::Resource;

    use super::*;

    #[test]
    fn api_versions_are_their_groups_at_v1() {
        assert_eq!(GATEWAY_API_VERSION, format!("{GATEWAY_GROUP}/v1"));
        assert_eq!(SECURITY_API_VERSION, format!("{SECURITY_GROUP}/v1"));
        assert_eq!(TRAFFIC_API_VERSION, format!("{TRAFFIC_GROUP}/v1"));
        assert_eq!(
            ISTIO_SECURITY_API_VERSION,
            format!("{ISTIO_SECURITY_GROUP}/v1")
        );
        assert!(
            ISTIO_SECURITY_API_VERSIONS
                .iter()
                .all(|v| v.starts_with(&format!("{ISTIO_SECURITY_GROUP}/")))
        );
    }

    #[test]
    fn derived_kinds_carry_the_contracts_groups() {
        assert_eq!(
            policy::AuthorizationPolicy::api_version(&()),
            SECURITY_API_VERSION
        );
        assert_eq!(
            policy::RequestAuthentication::api_version(&()),
            SECURITY_API_VERSION
        );
        assert_eq!(
            traffic_policy::TrafficPolicy::api_version(&()),
            TRAFFIC_API_VERSION
        );
    }
}
