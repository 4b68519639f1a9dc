//! The Kubernetes objects that deploy one waypoint (`meshctl waypoint generate`): its Gateway
//! of class `trellis-waypoint`, a ServiceAccount (the identity it holds), a ConfigMap with
//! its configuration file and the mesh's root certificate, and a Deployment whose pods carry
//! the Gateway's name label (how the controller finds a waypoint's endpoints and authorizes
//! its certificate).
//!
//! The configuration file is written through [`WaypointConfig`] and validated before any
//! object is produced, so what is generated is what the waypoint accepts.

use std::collections::BTreeMap;

use k8s_openapi::{
    api::{
        apps::v1::{Deployment, DeploymentSpec},
        core::v1::{
            ConfigMap, ConfigMapVolumeSource, Container, ContainerPort, HTTPGetAction,
            PodSecurityContext, PodSpec, PodTemplateSpec, Probe, ProjectedVolumeSource,
            SecurityContext, ServiceAccount, ServiceAccountTokenProjection, Volume, VolumeMount,
            VolumeProjection,
        },
    },
    apimachinery::pkg::{
        apis::meta::v1::{LabelSelector, ObjectMeta},
        util::intstr::IntOrString,
    },
};
use mesh_node::{
    config::{ConfigError, waypoint::WaypointConfig},
    k8s::{
        APP_COMPONENT_LABEL, APP_NAME_LABEL, GATEWAY_API_VERSION, GATEWAY_NAME_LABEL,
        WAYPOINT_CLASS,
    },
};
use serde_json::{Value, json};

const HBONE_PORT: u16 = 15008;
const METRICS_PORT: u16 = 15020;
const READY_PORT: u16 = 15021;
/// Where the pod finds its files.
const CONFIG_DIR: &str = "/etc/trellis";
const TOKEN_DIR: &str = "/var/run/secrets/tokens";
/// The audience the controller's TokenReview expects (the agents' token uses the same).
const TOKEN_AUDIENCE: &str = "trellis";

/// What `meshctl waypoint generate` asks for.
#[derive(Clone, Debug)]
pub struct WaypointSpec {
    pub namespace: String,
    pub name: String,
    /// The service account the waypoint runs as; by default the Gateway's name.
    pub service_account: String,
    pub image: String,
    pub replicas: i32,
    pub trust_domain: String,
    /// The controller's gRPC address, `host:port`.
    pub controller: String,
    /// Namespace whose policies apply mesh-wide (where the mesh is installed).
    pub root_namespace: String,
    /// The mesh's root certificate (PEM), from the `trellis-ca-root` ConfigMap.
    pub root_cert_pem: String,
}

/// The objects, in the order to apply them.
pub fn generate(spec: &WaypointSpec) -> Result<Vec<Value>, ConfigError> {
    let config_text = config_file(spec);
    // What the pod will load; refused here rather than in a crash-looping pod.
    WaypointConfig::parse(&config_text)?;
    if !spec.root_cert_pem.contains("-----BEGIN CERTIFICATE-----") {
        return Err(mesh_node::config::invalid(
            "root certificate",
            "not a PEM certificate (take it from ConfigMap trellis-ca-root)",
        ));
    }

    let labels = BTreeMap::from([
        (GATEWAY_NAME_LABEL.to_owned(), spec.name.clone()),
        (APP_NAME_LABEL.to_owned(), spec.name.clone()),
        (APP_COMPONENT_LABEL.to_owned(), "waypoint".to_owned()),
    ]);
    let meta = |name: &str| ObjectMeta {
        name: Some(name.to_owned()),
        namespace: Some(spec.namespace.clone()),
        labels: Some(labels.clone()),
        ..Default::default()
    };
    let config_map_name = format!("{}-waypoint", spec.name);

    let gateway = json!({
        "apiVersion": GATEWAY_API_VERSION,
        "kind": "Gateway",
        "metadata": {"name": spec.name, "namespace": spec.namespace},
        "spec": {
            "gatewayClassName": WAYPOINT_CLASS,
            "listeners": [{"name": "mesh", "port": HBONE_PORT, "protocol": "HBONE"}],
        },
    });
    let service_account = ServiceAccount {
        metadata: meta(&spec.service_account),
        ..Default::default()
    };
    let config_map = ConfigMap {
        metadata: meta(&config_map_name),
        data: Some(BTreeMap::from([
            ("waypoint.yaml".to_owned(), config_text),
            ("root-cert.pem".to_owned(), spec.root_cert_pem.clone()),
        ])),
        ..Default::default()
    };
    let port = |name: &str, port: u16| ContainerPort {
        name: Some(name.to_owned()),
        container_port: i32::from(port),
        protocol: Some("TCP".to_owned()),
        ..Default::default()
    };
    let container = Container {
        name: "waypoint".to_owned(),
        image: Some(spec.image.clone()),
        args: Some(vec![
            "waypoint".to_owned(),
            "--config".to_owned(),
            format!("{CONFIG_DIR}/waypoint.yaml"),
        ]),
        ports: Some(vec![
            port("hbone", HBONE_PORT),
            port("metrics", METRICS_PORT),
            port("readiness", READY_PORT),
        ]),
        readiness_probe: Some(Probe {
            http_get: Some(HTTPGetAction {
                path: Some("/healthz/ready".to_owned()),
                port: IntOrString::Int(i32::from(READY_PORT)),
                ..Default::default()
            }),
            period_seconds: Some(5),
            ..Default::default()
        }),
        // An ordinary unprivileged process: it only listens and dials.
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            run_as_non_root: Some(true),
            run_as_user: Some(65_532),
            capabilities: Some(k8s_openapi::api::core::v1::Capabilities {
                drop: Some(vec!["ALL".to_owned()]),
                ..Default::default()
            }),
            ..Default::default()
        }),
        volume_mounts: Some(vec![
            VolumeMount {
                name: "config".to_owned(),
                mount_path: CONFIG_DIR.to_owned(),
                read_only: Some(true),
                ..Default::default()
            },
            VolumeMount {
                name: "trellis-token".to_owned(),
                mount_path: TOKEN_DIR.to_owned(),
                read_only: Some(true),
                ..Default::default()
            },
        ]),
        ..Default::default()
    };
    let deployment = Deployment {
        metadata: meta(&spec.name),
        spec: Some(DeploymentSpec {
            replicas: Some(spec.replicas),
            selector: LabelSelector {
                match_labels: Some(BTreeMap::from([(
                    GATEWAY_NAME_LABEL.to_owned(),
                    spec.name.clone(),
                )])),
                ..Default::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels.clone()),
                    // For a Prometheus that discovers pods by annotation (no operator).
                    annotations: Some(BTreeMap::from([
                        ("prometheus.io/scrape".to_owned(), "true".to_owned()),
                        ("prometheus.io/port".to_owned(), METRICS_PORT.to_string()),
                        ("prometheus.io/path".to_owned(), "/metrics".to_owned()),
                    ])),
                    ..Default::default()
                }),
                spec: Some(PodSpec {
                    service_account_name: Some(spec.service_account.clone()),
                    // Its only credential is the audience-bound token below.
                    automount_service_account_token: Some(false),
                    // Projected files readable by the container's user.
                    security_context: Some(PodSecurityContext {
                        fs_group: Some(65_532),
                        ..Default::default()
                    }),
                    containers: vec![container],
                    volumes: Some(vec![
                        Volume {
                            name: "config".to_owned(),
                            config_map: Some(ConfigMapVolumeSource {
                                name: config_map_name.clone(),
                                ..Default::default()
                            }),
                            ..Default::default()
                        },
                        Volume {
                            name: "trellis-token".to_owned(),
                            projected: Some(ProjectedVolumeSource {
                                sources: Some(vec![VolumeProjection {
                                    service_account_token: Some(ServiceAccountTokenProjection {
                                        audience: Some(TOKEN_AUDIENCE.to_owned()),
                                        expiration_seconds: Some(3600),
                                        path: "trellis-token".to_owned(),
                                    }),
                                    ..Default::default()
                                }]),
                                ..Default::default()
                            }),
                            ..Default::default()
                        },
                    ]),
                    ..Default::default()
                }),
            },
            ..Default::default()
        }),
        ..Default::default()
    };

    Ok(vec![
        gateway,
        typed("v1", "ServiceAccount", &service_account),
        typed("v1", "ConfigMap", &config_map),
        typed("apps/v1", "Deployment", &deployment),
    ])
}

/// The typed object as JSON with the `apiVersion` and `kind` its Rust type leaves out.
fn typed(api_version: &str, kind: &str, object: &impl serde::Serialize) -> Value {
    let mut value = serde_json::to_value(object).unwrap_or(Value::Null);
    value["apiVersion"] = api_version.into();
    value["kind"] = kind.into();
    value
}

/// The waypoint's configuration file.
fn config_file(spec: &WaypointSpec) -> String {
    format!(
        "# Generated by meshctl waypoint generate.\n\
         namespace: {namespace}\n\
         gateway: {name}\n\
         service_account: {sa}\n\
         trust_domain: {trust_domain}\n\
         control_plane:\n  \
           address: \"{controller}\"\n  \
           ca_cert: {CONFIG_DIR}/root-cert.pem\n  \
           token_file: {TOKEN_DIR}/trellis-token\n  \
           root_namespace: {root}\n\
         listen:\n  \
           hbone: \"[::]:{HBONE_PORT}\"\n  \
           metrics: \"[::]:{METRICS_PORT}\"\n  \
           readiness: \"[::]:{READY_PORT}\"\n\
         log_format: json\n",
        namespace = spec.namespace,
        name = spec.name,
        sa = spec.service_account,
        trust_domain = spec.trust_domain,
        controller = spec.controller,
        root = spec.root_namespace,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROOT: &str = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";

    fn spec() -> WaypointSpec {
        WaypointSpec {
            namespace: "shop".into(),
            name: "shop-waypoint".into(),
            service_account: "shop-waypoint".into(),
            image: "ghcr.io/trellis-mesh/mesh-node:0.1.0".into(),
            replicas: 2,
            trust_domain: "cluster.local".into(),
            controller: "trellis-controller.trellis-system.svc:15012".into(),
            root_namespace: "trellis-system".into(),
            root_cert_pem: ROOT.into(),
        }
    }

    #[test]
    fn the_objects_deploy_a_waypoint_the_controller_recognises() {
        let objects = generate(&spec()).expect("generated");
        let kinds: Vec<&str> = objects.iter().filter_map(|o| o["kind"].as_str()).collect();
        assert_eq!(
            kinds,
            ["Gateway", "ServiceAccount", "ConfigMap", "Deployment"]
        );
        assert_eq!(objects[0]["spec"]["gatewayClassName"], "trellis-waypoint");

        let deployment: Deployment =
            serde_json::from_value(objects[3].clone()).expect("a Deployment");
        let pod = deployment
            .spec
            .and_then(|s| s.template.metadata.zip(s.template.spec))
            .expect("pod template");
        assert_eq!(
            pod.0
                .labels
                .as_ref()
                .and_then(|l| l.get(GATEWAY_NAME_LABEL)),
            Some(&"shop-waypoint".to_owned()),
            "the controller finds waypoint pods by this label"
        );
        assert_eq!(pod.1.service_account_name.as_deref(), Some("shop-waypoint"));

        let config_map: ConfigMap =
            serde_json::from_value(objects[2].clone()).expect("a ConfigMap");
        let data = config_map.data.expect("data");
        let config = WaypointConfig::parse(&data["waypoint.yaml"]).expect("the pod's config");
        assert_eq!(
            config.identity().expect("identity").to_string(),
            "spiffe://cluster.local/ns/shop/sa/shop-waypoint"
        );
        assert_eq!(config.listen.hbone.port(), HBONE_PORT);
        assert_eq!(data["root-cert.pem"], ROOT);
    }

    #[test]
    fn what_the_waypoint_would_refuse_is_refused_here() {
        let mut bad = spec();
        bad.service_account = "Not_A_Name".into();
        assert!(generate(&bad).is_err());
        let mut no_root = spec();
        no_root.root_cert_pem = "garbage".into();
        assert!(generate(&no_root).is_err());
        let mut no_port = spec();
        no_port.controller = "trellis-controller".into();
        assert!(generate(&no_port).is_err());
    }
}
