//! The Helm chart (`charts/trellis`): what it must deploy for the agent and controller to work.
//!
//! The templates are rendered by the real Helm (`helm template`, the release `.ci/kube-tools`
//! builds), then checked as YAML objects, and the rendered configuration files are loaded with
//! the agent's and controller's own loaders; `helm lint --strict` runs on every mode the values
//! offer. Without helm these tests are skipped (and fail under `MESH_E2E=require`).
//!
//! The CRDs in `crds/` (one file per API group) are generated from mesh-node's types (`cargo
//! xtask crds`); the tests fail while a committed file differs, and validate sample objects
//! (Istio-style policies, TrafficPolicies) against the committed schemas. The cluster tests
//! (tests/tests/cluster.rs) install all of it on a real API server.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;
use mesh_node::{
    check::CAPABILITIES,
    config::{AgentConfig, expand_env},
    controller::ControllerConfig,
    k8s::crds,
    l7::resilience::TrafficPolicy,
    policy::{AuthorizationPolicy, PeerAuthentication, RequestAuthentication},
};
use mesh_tests::cluster::helm_gate;
use serde_json::{Value, json};

const NAMESPACE: &str = "trellis-system";

fn chart_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/trellis")
}

fn read(relative: &str) -> String {
    let path = chart_dir().join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

fn yaml(text: &str, what: &str) -> Value {
    serde_saphyr::from_str(text).unwrap_or_else(|e| panic!("{what} is not valid YAML: {e}\n{text}"))
}

fn default_values() -> Value {
    yaml(&read("values.yaml"), "values.yaml")
}

/// `values` with `path` (dot separated) set to `value`.
fn with(mut values: Value, path: &str, value: Value) -> Value {
    let mut at = &mut values;
    for key in path.split('.') {
        at = &mut at[key];
    }
    *at = value;
    values
}

// ---------------------------------------------------------------------------------------------
// Values and their schema.

/// Validates `values` against values.schema.json; the error message on failure.
fn validate(values: &Value) -> Result<(), String> {
    let schema: Value =
        serde_json::from_str(&read("values.schema.json")).expect("values.schema.json is JSON");
    let mut schemas = boon::Schemas::new();
    let mut compiler = boon::Compiler::new();
    compiler
        .add_resource("file:///chart/values.schema.json", schema)
        .expect("schema location");
    let index = compiler
        .compile("file:///chart/values.schema.json", &mut schemas)
        .expect("values.schema.json is a valid JSON schema");
    schemas
        .validate(values, index)
        .map_err(|e| format!("{e:#}"))
}

#[test]
fn the_default_values_satisfy_the_schema() {
    validate(&default_values()).unwrap_or_else(|e| panic!("values.yaml: {e}"));
}

#[test]
fn the_schema_refuses_values_the_chart_cannot_use() {
    let values = default_values();
    for (path, bad) in [
        ("agent.privileged", json!("yes")),
        ("agent.drainTimeoutSecs", json!(-1)),
        ("agent.terminationGraceMarginSecs", json!(0)),
        ("agent.unknownDestination", json!("drop")),
        ("agent.ports.hbone", json!(70000)),
        ("agent.cgroupRoot", json!("sys/fs/cgroup")),
        ("controller.replicas", json!(0)),
        ("controller.logFormat", json!("xml")),
        ("trustDomain", json!("Cluster.Local")),
        ("agent.typo", json!(true)),
        ("istio.labels", json!("ambient")),
    ] {
        assert!(
            validate(&with(values.clone(), path, bad.clone())).is_err(),
            "{path}: {bad} must be refused"
        );
    }
}

#[test]
fn every_plain_yaml_file_of_the_chart_parses() {
    let Some(helm) = helm_gate("every_plain_yaml_file_of_the_chart_parses") else {
        return;
    };
    let chart = yaml(&read("Chart.yaml"), "Chart.yaml");
    assert_eq!(chart["apiVersion"], "v2");
    assert_eq!(chart["name"], "trellis");
    assert!(
        chart["appVersion"].is_string(),
        "appVersion is the image tag"
    );
    default_values();
    assert!(
        !chart_dir().join("README.md").exists() || !read("README.md").is_empty(),
        "README.md"
    );
    // Every template renders to YAML objects, in every mode the values offer.
    for values in [default_values(), everything()] {
        let objects = render_chart(&helm, &values);
        for (file, docs) in &objects {
            for doc in docs {
                assert!(doc["kind"].is_string(), "{file}: an object without kind");
                assert!(doc["metadata"]["name"].is_string(), "{file}: no name");
            }
        }
        let kinds: BTreeSet<&str> = objects
            .values()
            .flatten()
            .filter_map(|d| d["kind"].as_str())
            .collect();
        for kind in [
            "DaemonSet",
            "Deployment",
            "Service",
            "ServiceAccount",
            "ClusterRole",
            "Role",
        ] {
            assert!(kinds.contains(kind), "no {kind} in {kinds:?}");
        }
    }
    let notes = read("templates/NOTES.txt");
    assert!(
        notes.contains("kubectl label namespace <namespace> trellis.dev/mesh=enabled"),
        "NOTES.txt tells how to add a namespace"
    );
}

// ---------------------------------------------------------------------------------------------
// The agent.

fn object<'a>(objects: &'a BTreeMap<String, Vec<Value>>, kind: &str, name: &str) -> &'a Value {
    objects
        .values()
        .flatten()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

fn container<'a>(pod: &'a Value, list: &str, name: &str) -> &'a Value {
    pod[list]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["name"] == name))
        .unwrap_or_else(|| panic!("no {list} {name}"))
}

/// The volume a container mounts at `path`, with its mount.
fn mount_at<'a>(pod: &'a Value, container: &'a Value, path: &str) -> (&'a Value, &'a Value) {
    let mount = container["volumeMounts"]
        .as_array()
        .and_then(|ms| ms.iter().find(|m| m["mountPath"] == path))
        .unwrap_or_else(|| panic!("{} mounts nothing at {path}", container["name"]));
    let volume = pod["volumes"]
        .as_array()
        .and_then(|vs| vs.iter().find(|v| v["name"] == mount["name"]))
        .unwrap_or_else(|| panic!("no volume {}", mount["name"]));
    (volume, mount)
}

/// The agent's configuration as the agent on node `node-a` (10.1.0.1) reads it.
fn agent_config(helm: &Path, values: &Value) -> AgentConfig {
    let objects = render_chart(helm, values);
    let text = object(&objects, "ConfigMap", "trellis-agent")["data"]["agent.yaml"]
        .as_str()
        .expect("agent.yaml in the ConfigMap")
        .to_owned();
    let env = |name: &str| match name {
        "NODE_NAME" => Some("node-a".to_owned()),
        "HOST_IP" => Some("10.1.0.1".to_owned()),
        _ => None,
    };
    let expanded = expand_env(&text, env).expect("the downward API provides every variable");
    AgentConfig::parse(&expanded)
        .unwrap_or_else(|e| panic!("the agent refuses its config: {e}\n{text}"))
}

#[test]
fn the_agent_config_is_one_file_for_every_node_that_the_agent_accepts() {
    let Some(helm) =
        helm_gate("the_agent_config_is_one_file_for_every_node_that_the_agent_accepts")
    else {
        return;
    };
    let values = default_values();
    let config = agent_config(&helm, &values);
    assert_eq!(config.node, "node-a", "node from NODE_NAME");
    let cp = config.control_plane.as_ref().expect("live mode");
    assert_eq!(
        cp.address.to_string(),
        format!("trellis-controller.{NAMESPACE}.svc:15012")
    );
    assert_eq!(cp.ca_cert, Path::new("/var/run/trellis/root-cert.pem"));
    assert_eq!(
        cp.token_file,
        Path::new("/var/run/secrets/tokens/trellis-token")
    );
    assert_eq!(config.listen.hbone.to_string(), "10.1.0.1:15008");
    assert_eq!(config.listen.outbound.to_string(), "10.1.0.1:15001");
    assert!(config.listen.admin.ip().is_loopback(), "admin stays local");
    assert_eq!(
        config.listen.readiness.map(|a| a.to_string()).as_deref(),
        Some("10.1.0.1:15021")
    );
    assert_eq!(
        config.listen.metrics.map(|a| a.to_string()).as_deref(),
        Some("10.1.0.1:15020")
    );
    assert_eq!(
        Some(config.drain_timeout_secs),
        values["agent"]["drainTimeoutSecs"].as_u64()
    );

    // Values flow into the file.
    let config = agent_config(
        &helm,
        &with(
            with(
                values.clone(),
                "agent.excludedCidrs",
                json!(["10.96.0.1/32"]),
            ),
            "agent.unknownDestination",
            json!("deny"),
        ),
    );
    assert_eq!(config.datapath.excluded_cidrs, ["10.96.0.1/32"]);
    assert_eq!(
        config.outbound.unknown_destination,
        mesh_node::config::UnknownDestination::Deny
    );
}

#[test]
fn the_agent_daemonset_mounts_bpffs_and_the_cgroup_root_and_requests_the_checked_capabilities() {
    let Some(helm) = helm_gate(
        "the_agent_daemonset_mounts_bpffs_and_the_cgroup_root_and_requests_the_checked_capabilities",
    ) else {
        return;
    };
    let values = default_values();
    let config = agent_config(&helm, &values);
    let objects = render_chart(&helm, &values);
    let ds = object(&objects, "DaemonSet", "trellis-agent");
    let pod = &ds["spec"]["template"]["spec"];
    let agent = container(pod, "containers", "agent");

    assert_eq!(pod["hostNetwork"], true);
    assert_eq!(pod["dnsPolicy"], "ClusterFirstWithHostNet");
    assert_eq!(pod["priorityClassName"], "system-node-critical");
    assert_eq!(
        pod["automountServiceAccountToken"], false,
        "no API credentials"
    );

    // bpffs: mounted by node-init, seen by the agent, and where the agent pins.
    let bpffs = values["agent"]["bpffsPath"].as_str().expect("bpffsPath");
    assert_eq!(bpffs, "/sys/fs/bpf");
    assert!(
        config.datapath.pin_dir.starts_with(bpffs),
        "pins on the mounted bpffs"
    );
    let (volume, mount) = mount_at(pod, agent, bpffs);
    assert_eq!(volume["hostPath"]["path"], bpffs);
    assert_eq!(mount["mountPropagation"], "HostToContainer");
    let init = container(pod, "initContainers", "node-init");
    assert_eq!(init["args"], json!(["node-init", "--bpffs", bpffs]));
    let (init_volume, init_mount) = mount_at(pod, init, bpffs);
    assert_eq!(init_volume["hostPath"]["path"], bpffs);
    assert_eq!(init_mount["mountPropagation"], "Bidirectional");
    assert_eq!(
        init["securityContext"]["privileged"], true,
        "the kubelet allows Bidirectional propagation only to privileged containers"
    );

    // The host's cgroup v2 root, at the path the agent's config names.
    let (volume, _) = mount_at(
        pod,
        agent,
        &config.datapath.cgroup_root.display().to_string(),
    );
    assert_eq!(
        volume["hostPath"]["path"],
        config.datapath.cgroup_root.display().to_string()
    );

    // Exactly the capabilities the agent's pre-flight check (TRL004) requires.
    let wanted: BTreeSet<String> = CAPABILITIES
        .iter()
        .map(|(_, name)| name.trim_start_matches("CAP_").to_owned())
        .collect();
    let security = &agent["securityContext"];
    let added: BTreeSet<String> = security["capabilities"]["add"]
        .as_array()
        .expect("capabilities.add")
        .iter()
        .filter_map(|c| c.as_str().map(str::to_owned))
        .collect();
    assert_eq!(added, wanted);
    assert_eq!(security["capabilities"]["drop"], json!(["ALL"]));
    assert!(
        security["privileged"].is_null(),
        "not privileged by default"
    );

    // The kind switch: privileged instead of capabilities.
    let kind = render_chart(
        &helm,
        &with(values.clone(), "agent.privileged", json!(true)),
    );
    let kind_agent = container(
        &object(&kind, "DaemonSet", "trellis-agent")["spec"]["template"]["spec"],
        "containers",
        "agent",
    )
    .clone();
    assert_eq!(kind_agent["securityContext"]["privileged"], true);
    assert!(kind_agent["securityContext"]["capabilities"].is_null());

    // Readiness on the agent's readiness listener.
    let probe = &agent["readinessProbe"]["httpGet"];
    assert_eq!(probe["path"], "/healthz/ready");
    assert_eq!(probe["port"], 15021);
    assert_eq!(
        config.listen.readiness.map(|a| a.port()),
        Some(15021),
        "the probe hits the listener the config opens"
    );

    // The kubelet waits longer than the agent drains.
    let grace = pod["terminationGracePeriodSeconds"]
        .as_u64()
        .expect("terminationGracePeriodSeconds");
    assert!(
        grace > config.drain_timeout_secs,
        "grace {grace}s must exceed the drain deadline {}s",
        config.drain_timeout_secs
    );
    let longer = agent_config(
        &helm,
        &with(values.clone(), "agent.drainTimeoutSecs", json!(120)),
    );
    let longer_ds = render_chart(&helm, &with(values, "agent.drainTimeoutSecs", json!(120)));
    let longer_grace = object(&longer_ds, "DaemonSet", "trellis-agent")["spec"]["template"]["spec"]
        ["terminationGracePeriodSeconds"]
        .as_u64()
        .expect("grace");
    assert!(
        longer_grace > longer.drain_timeout_secs,
        "follows the value"
    );

    // Only the projected token, for the controller's audience.
    let (token, _) = mount_at(pod, agent, "/var/run/secrets/tokens");
    let source = &token["projected"]["sources"][0]["serviceAccountToken"];
    assert_eq!(source["audience"], "trellis");
    assert_eq!(source["path"], "trellis-token");
    let (root, _) = mount_at(pod, agent, "/var/run/trellis");
    assert_eq!(root["configMap"]["name"], "trellis-ca-root");
}

#[test]
fn agents_are_replaced_one_node_at_a_time_without_surge() {
    let Some(helm) = helm_gate("agents_are_replaced_one_node_at_a_time_without_surge") else {
        return;
    };
    let objects = render_chart(&helm, &default_values());
    let update = &object(&objects, "DaemonSet", "trellis-agent")["spec"]["updateStrategy"];
    assert_eq!(update["type"], "RollingUpdate");
    assert_eq!(update["rollingUpdate"]["maxUnavailable"], 1);
    assert_eq!(
        update["rollingUpdate"]["maxSurge"], 0,
        "a surged agent could not bind the ports the draining one holds"
    );
}

// ---------------------------------------------------------------------------------------------
// The controller.

#[test]
fn the_controller_config_loads_and_names_the_release_namespace() {
    let Some(helm) = helm_gate("the_controller_config_loads_and_names_the_release_namespace")
    else {
        return;
    };
    let objects = render_chart(&helm, &default_values());
    let text = object(&objects, "ConfigMap", "trellis-controller")["data"]["controller.yaml"]
        .as_str()
        .expect("controller.yaml")
        .to_owned();
    let dir = std::env::temp_dir().join(format!("trellis-chart-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    let path = dir.join("controller.yaml");
    std::fs::write(&path, &text).expect("write config");
    let loaded = ControllerConfig::load(&path);
    std::fs::remove_dir_all(&dir).expect("remove scratch dir");
    let config =
        loaded.unwrap_or_else(|e| panic!("the controller refuses its config: {e}\n{text}"));
    assert_eq!(
        config.ca.secret.as_deref(),
        Some("trellis-system/trellis-ca")
    );
    assert_eq!(
        config.ca.publish_root.as_deref(),
        Some("trellis-system/trellis-ca-root")
    );
    let review = config.auth.token_review.expect("token review");
    assert_eq!(
        review.agent_service_accounts,
        ["trellis-system/trellis-agent"]
    );
    assert_eq!(review.audiences, ["trellis"], "the agent token's audience");
    assert!(
        config
            .server_names
            .contains(&format!("trellis-controller.{NAMESPACE}.svc")),
        "the certificate names the Service agents dial"
    );
    assert!(
        !config.compatibility.istio_labels,
        "Istio's labels are left to Istio unless asked"
    );
    let with_labels = render_chart(&helm, &with(default_values(), "istio.labels", json!(true)));
    let text = object(&with_labels, "ConfigMap", "trellis-controller")["data"]["controller.yaml"]
        .as_str()
        .expect("controller.yaml");
    let config = ControllerConfig::parse(text).expect("the controller accepts its config");
    assert!(config.compatibility.istio_labels, "istio.labels=true");

    let deployment = object(&objects, "Deployment", "trellis-controller");
    assert_eq!(deployment["spec"]["replicas"], 2);
    let service = object(&objects, "Service", "trellis-controller");
    let ports: BTreeSet<u64> = service["spec"]["ports"]
        .as_array()
        .expect("ports")
        .iter()
        .filter_map(|p| p["port"].as_u64())
        .collect();
    assert!(ports.contains(&15012), "the CA and discovery APIs");
}

#[test]
fn the_controller_has_no_cluster_wide_secrets_access_and_the_agent_no_api_access() {
    let Some(helm) =
        helm_gate("the_controller_has_no_cluster_wide_secrets_access_and_the_agent_no_api_access")
    else {
        return;
    };
    let objects = render_chart(&helm, &default_values());
    let rules = |kind: &str| -> Vec<Value> {
        object(&objects, kind, "trellis-controller")["rules"]
            .as_array()
            .expect("rules")
            .clone()
    };
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    };
    for rule in rules("ClusterRole") {
        let resources = strings(&rule["resources"]);
        assert!(
            !resources.iter().any(|r| r == "secrets" || r == "*"),
            "cluster-wide {resources:?}"
        );
        assert!(!strings(&rule["verbs"]).iter().any(|v| v == "*"));
        for verb in strings(&rule["verbs"]) {
            let status = resources.iter().all(|r| r.ends_with("/status"));
            let write = ["create", "update", "patch", "delete"].contains(&verb.as_str());
            assert!(
                !write || status || resources == ["tokenreviews"],
                "cluster-wide {verb} on {resources:?}"
            );
        }
    }
    // Every kind of the chart's CRDs is readable everywhere and only its status writable
    // (the cluster-wide write check above): the controller watches policies and reports
    // whether it accepted them, and never rewrites what users wrote.
    let grants = |kind: &str, group: &str, resource: &str, verb: &str| {
        rules(kind).iter().any(|r| {
            strings(&r["apiGroups"]).contains(&group.to_owned())
                && strings(&r["resources"]).contains(&resource.to_owned())
                && strings(&r["verbs"]).contains(&verb.to_owned())
        })
    };
    let crds = committed_crds();
    assert!(!crds.is_empty(), "the chart ships CRDs");
    for (_, crd) in &crds {
        let (group, plural) = (&crd.spec.group, &crd.spec.names.plural);
        for verb in ["get", "list", "watch"] {
            assert!(
                grants("ClusterRole", group, plural, verb),
                "{verb} {plural}.{group}"
            );
        }
        assert!(
            grants("ClusterRole", group, &format!("{plural}/status"), "patch"),
            "patch {plural}/status"
        );
    }
    // The Gateway API routes (not the chart's CRDs) are read and their parents' status
    // written; the Gateways only read (another controller may own a Gateway's status).
    let gateway_api = "gateway.networking.k8s.io";
    for plural in ["httproutes", "grpcroutes"] {
        for verb in ["get", "list", "watch"] {
            assert!(
                grants("ClusterRole", gateway_api, plural, verb),
                "{verb} {plural}"
            );
        }
        assert!(
            grants(
                "ClusterRole",
                gateway_api,
                &format!("{plural}/status"),
                "patch"
            ),
            "patch {plural}/status"
        );
    }
    assert!(!grants(
        "ClusterRole",
        gateway_api,
        "gateways/status",
        "patch"
    ));
    // No leader election: status writes are idempotent, so no Lease is needed anywhere.
    assert!(
        !rules("ClusterRole")
            .iter()
            .chain(rules("Role").iter())
            .any(|r| strings(&r["resources"]).iter().any(|r| r == "leases")),
        "no Lease access"
    );
    // Secrets only in the release namespace: read the CA by name, create it once.
    let role = object(&objects, "Role", "trellis-controller");
    assert_eq!(role["metadata"]["namespace"], NAMESPACE);
    for rule in rules("Role") {
        if strings(&rule["resources"]).contains(&"secrets".to_owned()) {
            for verb in strings(&rule["verbs"]) {
                match verb.as_str() {
                    "get" => assert_eq!(strings(&rule["resourceNames"]), ["trellis-ca"]),
                    "create" => {}
                    other => panic!("secrets verb {other}"),
                }
            }
        }
    }
    // Nothing is bound to the agent's account.
    for binding in objects
        .values()
        .flatten()
        .filter(|o| o["kind"] == "RoleBinding" || o["kind"] == "ClusterRoleBinding")
    {
        for subject in binding["subjects"].as_array().into_iter().flatten() {
            assert_ne!(subject["name"], "trellis-agent", "{binding}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The CRDs: `crds/<group>.yaml`, which Helm installs before the templates and never templates.

/// One committed CRD file's documents, each as YAML data and as the API server's type.
fn committed_crds_of(group: &str) -> Vec<(Value, CustomResourceDefinition)> {
    let file = format!("crds/{group}.yaml");
    let text = read(&file);
    let docs: Vec<Value> = serde_saphyr::from_multiple(&text)
        .unwrap_or_else(|e| panic!("{file} is not valid YAML: {e}"));
    docs.into_iter()
        .map(|doc| {
            let crd = serde_json::from_value(doc.clone()).unwrap_or_else(|e| {
                panic!("{file}: not an apiextensions.k8s.io/v1 CustomResourceDefinition: {e}")
            });
            (doc, crd)
        })
        .collect()
}

/// Every committed CRD, of every group.
fn committed_crds() -> Vec<(Value, CustomResourceDefinition)> {
    crds::GROUPS
        .into_iter()
        .flat_map(committed_crds_of)
        .collect()
}

#[test]
fn the_committed_crds_are_what_the_types_generate() {
    let mut files: Vec<String> = std::fs::read_dir(chart_dir().join("crds"))
        .expect("the chart has crds/")
        .map(|entry| {
            entry
                .expect("a directory entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    files.sort();
    let mut expected_files: Vec<String> = crds::GROUPS
        .iter()
        .map(|group| format!("{group}.yaml"))
        .collect();
    expected_files.sort();
    assert_eq!(
        files, expected_files,
        "crds/ holds one file per API group, and nothing else"
    );
    for group in crds::GROUPS {
        let file = format!("crds/{group}.yaml");
        let generated = crds::yaml(group).expect("the CRDs serialise as YAML");
        let committed = read(&file);
        if committed != generated {
            let (mut old, mut new) = (committed.lines(), generated.lines());
            // One line more than either text has ends the search at the latest.
            let (line, was, now) = (1..=committed.len() + generated.len() + 1)
                .map(|n| (n, old.next(), new.next()))
                .find(|(_, was, now)| was != now)
                .expect("different texts differ on some line");
            panic!(
                "charts/trellis/{file} is not what the types generate: run `cargo xtask crds` \
                 and commit the result. First difference, line {line}:\n  \
                 committed: {was:?}\n  generated: {now:?}"
            );
        }
    }
    // The YAML means exactly the CRDs the types define (no string mangled on the way out).
    for (group, expected) in [
        (
            crds::SECURITY_GROUP,
            vec![
                AuthorizationPolicy::crd(),
                PeerAuthentication::crd(),
                RequestAuthentication::crd(),
            ],
        ),
        (crds::TRAFFIC_GROUP, vec![TrafficPolicy::crd()]),
    ] {
        let expected: Vec<Value> = expected
            .into_iter()
            .map(|crd| serde_json::to_value(crd).expect("a CRD is JSON"))
            .collect();
        let parsed: Vec<Value> = committed_crds_of(group)
            .into_iter()
            .map(|(doc, _)| doc)
            .collect();
        assert_eq!(
            parsed, expected,
            "crds/{group}.yaml, parsed, is the derived CRDs in order"
        );
    }
}

/// The optional groups' CRDs: a template each, which renders the generated CRDs only when
/// its value asks for them, with schemas the API server accepts (structural, unknown fields
/// kept so an unsupported Istio field is reported rather than pruned).
#[test]
fn istios_crds_are_generated_and_installed_only_on_request() {
    for group in crds::OPTIONAL_GROUPS {
        let file = format!("templates/crds-{group}.yaml");
        let template = read(&file);
        let generated = crds::yaml(group).expect("the CRDs serialise as YAML");
        assert!(
            template.contains(&generated),
            "charts/trellis/{file} is not what the types generate: run `cargo xtask crds` and \
             commit the result"
        );
    }
    assert_eq!(default_values()["istio"]["installCrds"], json!(false));
    let Some(helm) = helm_gate("istios_crds_are_generated_and_installed_only_on_request") else {
        return;
    };
    let off = render_chart(&helm, &default_values());
    let on = render_chart(
        &helm,
        &with(default_values(), "istio.installCrds", json!(true)),
    );
    for (group, expected) in [
        (
            crds::ISTIO_SECURITY_GROUP,
            vec![
                "authorizationpolicies.security.istio.io",
                "peerauthentications.security.istio.io",
                "requestauthentications.security.istio.io",
            ],
        ),
        (
            crds::ISTIO_NETWORKING_GROUP,
            vec![
                "virtualservices.networking.istio.io",
                "destinationrules.networking.istio.io",
            ],
        ),
    ] {
        let file = format!("crds-{group}.yaml");
        assert!(!off.contains_key(&file), "off by default: {:?}", off.keys());
        let rendered: Vec<CustomResourceDefinition> = on[&file]
            .iter()
            .map(|doc| serde_json::from_value(doc.clone()).expect("a CustomResourceDefinition"))
            .collect();
        let names: Vec<_> = rendered
            .iter()
            .map(|c| c.metadata.name.clone().unwrap_or_default())
            .collect();
        assert_eq!(names, expected);
        for doc in &on[&file] {
            let kind = doc["spec"]["names"]["kind"].as_str().unwrap_or_default();
            for (i, version) in doc["spec"]["versions"]
                .as_array()
                .expect("versions")
                .iter()
                .enumerate()
            {
                let schema = &version["schema"]["openAPIV3Schema"];
                let at = format!("{kind} {}", version["name"]);
                assert_structural(schema, &at);
                assert_preserves_unknown_fields(&schema["properties"]["spec"], &at);
                assert_eq!(version["storage"], json!(i == 0), "{at}: v1 alone stored");
            }
        }
    }
    // The controller may read them and write their status, whether or not the chart
    // installed them.
    let role = object(&off, "ClusterRole", "trellis-controller");
    let istio_rules: Vec<&Value> = role["rules"]
        .as_array()
        .expect("rules")
        .iter()
        .filter(|r| r["apiGroups"] == json!(["security.istio.io"]))
        .collect();
    assert_eq!(istio_rules.len(), 2, "{role}");
    assert_eq!(istio_rules[1]["verbs"], json!(["patch"]));
}

#[test]
fn the_crds_are_namespaced_v1_with_a_status_subresource_and_structural_schemas() {
    let crds = committed_crds();
    let kinds: BTreeSet<&str> = crds
        .iter()
        .map(|(_, c)| c.spec.names.kind.as_str())
        .collect();
    assert_eq!(
        kinds,
        BTreeSet::from([
            "AuthorizationPolicy",
            "PeerAuthentication",
            "RequestAuthentication",
            "TrafficPolicy",
        ])
    );
    for (doc, crd) in &crds {
        let kind = &crd.spec.names.kind;
        let expected_group = if kind == "TrafficPolicy" {
            crds::TRAFFIC_GROUP
        } else {
            crds::SECURITY_GROUP
        };
        assert_eq!(crd.spec.group, expected_group, "{kind}");
        assert_eq!(
            crd.metadata.name.as_deref(),
            Some(format!("{}.{}", crd.spec.names.plural, crd.spec.group).as_str()),
            "{kind}: the API server requires <plural>.<group>"
        );
        assert_eq!(crd.spec.scope, "Namespaced", "{kind}");
        let [version] = crd.spec.versions.as_slice() else {
            panic!("{kind}: exactly one version, v1");
        };
        assert_eq!(version.name, "v1", "{kind}");
        assert!(
            version.served && version.storage,
            "{kind}: v1 served and stored"
        );
        assert!(
            version
                .subresources
                .as_ref()
                .is_some_and(|s| s.status.is_some()),
            "{kind}: status subresource (status writes cannot change the spec)"
        );
        let schema = &doc["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
        assert!(schema.is_object(), "{kind}: openAPIV3Schema");
        assert_structural(schema, kind);
        assert_preserves_unknown_fields(&schema["properties"]["spec"], &format!("{kind}.spec"));
    }
}

/// The API server refuses a CRD whose schema is not structural: every field and item has a
/// type (unless it preserves unknown fields), no references, and no object with both fixed
/// properties and additional ones.
fn assert_structural(schema: &Value, at: &str) {
    for keyword in ["$ref", "$defs", "definitions"] {
        assert!(schema.get(keyword).is_none(), "{at}: {keyword}");
    }
    assert!(
        schema.get("type").is_some()
            || schema["x-kubernetes-preserve-unknown-fields"] == true
            || schema["x-kubernetes-int-or-string"] == true,
        "{at}: no type"
    );
    assert!(
        schema.get("properties").is_none() || schema.get("additionalProperties").is_none(),
        "{at}: properties and additionalProperties together"
    );
    if let Some(properties) = schema["properties"].as_object() {
        for (name, property) in properties {
            assert_structural(property, &format!("{at}.{name}"));
        }
    }
    for (keyword, suffix) in [("items", "[]"), ("additionalProperties", ".*")] {
        if let Some(child) = schema.get(keyword).filter(|c| c.is_object()) {
            assert_structural(child, &format!("{at}{suffix}"));
        }
    }
}

/// Every object with known fields keeps the unknown ones too: the API server would otherwise
/// prune a field this version does not know (a misspelt `notPorts`) before the controller sees
/// it, and the policy would be enforced broader than written instead of failing closed.
fn assert_preserves_unknown_fields(schema: &Value, at: &str) {
    if schema.get("properties").is_some() {
        assert_eq!(
            schema["x-kubernetes-preserve-unknown-fields"], true,
            "{at}: unknown fields would be pruned"
        );
    }
    if let Some(properties) = schema["properties"].as_object() {
        for (name, property) in properties {
            assert_preserves_unknown_fields(property, &format!("{at}.{name}"));
        }
    }
    for (keyword, suffix) in [("items", "[]"), ("additionalProperties", ".*")] {
        if let Some(child) = schema.get(keyword).filter(|c| c.is_object()) {
            assert_preserves_unknown_fields(child, &format!("{at}{suffix}"));
        }
    }
}

/// Validates a manifest (YAML) against the openAPIV3Schema of its kind's committed CRD.
fn validate_policy(manifest: &str) -> Result<(), String> {
    let object = yaml(manifest, "the sample manifest");
    let kind = object["kind"].as_str().expect("the sample has a kind");
    let (doc, _) = committed_crds()
        .into_iter()
        .find(|(_, crd)| crd.spec.names.kind == kind)
        .unwrap_or_else(|| panic!("no CRD for {kind}"));
    let schema = doc["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone();
    let location = format!("file:///chart/crds/{kind}.json");
    let mut schemas = boon::Schemas::new();
    let mut compiler = boon::Compiler::new();
    compiler
        .add_resource(&location, schema)
        .expect("schema location");
    let index = compiler
        .compile(&location, &mut schemas)
        .unwrap_or_else(|e| panic!("{kind}: openAPIV3Schema is not a valid JSON schema: {e:#}"));
    schemas
        .validate(&object, index)
        .map_err(|e| format!("{e:#}"))
}

/// Istio's documented examples, with only the API group changed.
const ISTIO_AUTHORIZATION_POLICY: &str = r#"
apiVersion: security.trellis.dev/v1
kind: AuthorizationPolicy
metadata:
  name: httpbin
  namespace: foo
spec:
  selector:
    matchLabels:
      app: httpbin
      version: v1
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/default/sa/sleep"]
    - source:
        namespaces: ["dev"]
        notIpBlocks: ["10.0.0.0/8"]
    to:
    - operation:
        ports: ["8080"]
        notPorts: ["9090"]
        methods: ["GET"]
    when:
    - key: request.auth.claims[iss]
      values: ["https://accounts.google.com"]
"#;

const ISTIO_PEER_AUTHENTICATION: &str = r#"
apiVersion: security.trellis.dev/v1
kind: PeerAuthentication
metadata:
  name: finance
  namespace: foo
spec:
  selector:
    matchLabels:
      app: finance
  mtls:
    mode: STRICT
  portLevelMtls:
    "8080":
      mode: DISABLE
"#;

/// Tokens of one issuer verified at a waypoint, read from a custom header as well.
const REQUEST_AUTHENTICATION: &str = r"
apiVersion: security.trellis.dev/v1
kind: RequestAuthentication
metadata:
  name: shop-tokens
  namespace: shop
spec:
  targetRefs:
  - group: gateway.networking.k8s.io
    kind: Gateway
    name: waypoint
  jwtRules:
  - issuer: https://login.shop.example
    audiences: [checkout]
    jwksUri: https://login.shop.example/.well-known/jwks.json
    fromHeaders:
    - name: x-shop-token
    forwardOriginalToken: true
";

#[test]
fn istio_style_policies_satisfy_the_crd_schemas_and_malformed_ones_do_not() {
    for (sample, name) in [
        (ISTIO_AUTHORIZATION_POLICY, "AuthorizationPolicy"),
        (ISTIO_PEER_AUTHENTICATION, "PeerAuthentication"),
        (REQUEST_AUTHENTICATION, "RequestAuthentication"),
        (
            "{apiVersion: security.trellis.dev/v1, kind: AuthorizationPolicy, \
             metadata: {name: deny-all, namespace: foo}, spec: {}}",
            "an empty ALLOW policy (Istio's allow-nothing)",
        ),
        (
            "{apiVersion: security.trellis.dev/v1, kind: AuthorizationPolicy, \
             metadata: {name: x, namespace: foo}, spec: {action: DENY, rules: [{}], \
             targetRefs: [{kind: Service, name: web}]}}",
            "targetRefs (recognised, reported unsupported by the controller)",
        ),
        (
            "{apiVersion: security.trellis.dev/v1, kind: AuthorizationPolicy, \
             metadata: {name: x, namespace: foo}, spec: {rules: [{to: [{operation: \
             {notPort: ['22']}}]}]}}",
            "a misspelt field (kept for the controller to refuse, not pruned)",
        ),
    ] {
        validate_policy(sample).unwrap_or_else(|e| panic!("{name} must be accepted: {e}"));
    }

    let with_spec = |kind: &str, spec: &str| {
        format!(
            "{{apiVersion: security.trellis.dev/v1, kind: {kind}, \
             metadata: {{name: x, namespace: foo}}, spec: {spec}}}"
        )
    };
    for (kind, spec) in [
        ("AuthorizationPolicy", "{action: ALLOWED}"),
        ("AuthorizationPolicy", "{action: deny}"),
        ("AuthorizationPolicy", "{rules: {from: []}}"),
        (
            "AuthorizationPolicy",
            "{rules: [{from: [{source: {principals: cluster.local/ns/a/sa/b}}]}]}",
        ),
        (
            "AuthorizationPolicy",
            "{rules: [{to: [{operation: {ports: [8080]}}]}]}",
        ),
        (
            "AuthorizationPolicy",
            "{selector: {matchLabels: {app: [web]}}}",
        ),
        ("PeerAuthentication", "{mtls: {mode: strict}}"),
        (
            "PeerAuthentication",
            "{portLevelMtls: {'8080': {mode: MUTUAL}}}",
        ),
        ("RequestAuthentication", "{jwtRules: {issuer: x}}"),
        (
            "RequestAuthentication",
            "{jwtRules: [{issuer: x, audiences: checkout}]}",
        ),
        (
            "RequestAuthentication",
            "{jwtRules: [{issuer: x, forwardOriginalToken: maybe}]}",
        ),
    ] {
        assert!(
            validate_policy(&with_spec(kind, spec)).is_err(),
            "{kind} with spec {spec} must be refused"
        );
    }
    let no_spec = "{apiVersion: security.trellis.dev/v1, kind: PeerAuthentication, \
                   metadata: {name: x, namespace: foo}}";
    assert!(validate_policy(no_spec).is_err(), "a policy without spec");
}

/// Every section of a TrafficPolicy, as the resilience module documents it.
const TRAFFIC_POLICY: &str = r#"
apiVersion: traffic.trellis.dev/v1
kind: TrafficPolicy
metadata:
  name: reviews-resilience
  namespace: shop
spec:
  targetRefs:
  - group: ""
    kind: Service
    name: reviews
  retries:
    attempts: 3
    perTryTimeout: 500ms
    retryOn: [5xx, connect-failure, retriable-status-codes]
    retriableStatusCodes: [409]
    budget: {percent: 20, minRetriesPerSecond: 10}
  connectionPool: {maxConnections: 100, maxPendingRequests: 64, maxRequests: 1024}
  outlierDetection: {consecutiveErrors: 5, interval: 10s, baseEjectionTime: 30s, maxEjectionPercent: 10}
  fault:
    delay: {fixedDelay: 2s, percent: 10}
    abort: {httpStatus: 503, percent: 5}
  rateLimit: {requestsPerSecond: 100, burst: 200, per: source}
"#;

#[test]
fn traffic_policies_satisfy_the_crd_schema_and_malformed_ones_do_not() {
    validate_policy(TRAFFIC_POLICY).unwrap_or_else(|e| panic!("the sample must be accepted: {e}"));
    let with_spec = |spec: &str| {
        format!(
            "{{apiVersion: traffic.trellis.dev/v1, kind: TrafficPolicy, \
             metadata: {{name: x, namespace: shop}}, spec: {spec}}}"
        )
    };
    validate_policy(&with_spec(
        "{targetRefs: [{name: reviews}], retries: {attempts: 3, perTryTimout: 1s}}",
    ))
    .unwrap_or_else(|e| {
        panic!("a misspelt field is kept for the controller to report, not pruned: {e}")
    });
    for spec in [
        "{targetRefs: [{kind: Deployment, name: reviews}]}",
        "{targetRefs: {name: reviews}}",
        "{targetRefs: [{name: reviews}], retries: {attempts: three}}",
        "{targetRefs: [{name: reviews}], retries: {attempts: 3, retryOn: [5XX]}}",
        "{targetRefs: [{name: reviews}], retries: {attempts: 3, perTryTimeout: 1 second}}",
        "{targetRefs: [{name: reviews}], rateLimit: {requestsPerSecond: 1, per: everyone}}",
    ] {
        assert!(
            validate_policy(&with_spec(spec)).is_err(),
            "TrafficPolicy with spec {spec} must be refused"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Helm itself.

/// The values files that switch on every optional part of the chart.
fn everything() -> Value {
    let mut values = default_values();
    for (path, value) in [
        ("agent.privileged", json!(true)),
        ("monitoring.podMonitor.enabled", json!(true)),
        ("monitoring.serviceMonitor.enabled", json!(true)),
        ("monitoring.waypointPodMonitor.enabled", json!(true)),
        ("istio.installCrds", json!(true)),
        ("istio.labels", json!(true)),
    ] {
        values = with(values, path, value);
    }
    values
}

/// Runs helm with `values` as a values file; its stdout, or a panic with its stderr.
fn helm_with_values(helm: &Path, args: &[&str], values: &Value) -> String {
    let dir = std::env::temp_dir().join(format!(
        "trellis-chart-values-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    // JSON is YAML: Helm reads it as a values file.
    let file = dir.join("values.json");
    std::fs::write(&file, values.to_string()).expect("write values");
    let out = std::process::Command::new(helm)
        .args(args)
        .arg(chart_dir())
        .arg("--values")
        .arg(&file)
        .output()
        .expect("cannot run helm");
    std::fs::remove_dir_all(&dir).expect("remove scratch dir");
    assert!(
        out.status.success(),
        "helm {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("helm prints UTF-8")
}

/// Every template file rendered by `helm template` with `values`, as YAML documents by the
/// template file they come from (`# Source: trellis/templates/<file>`).
fn render_chart(helm: &Path, values: &Value) -> BTreeMap<String, Vec<Value>> {
    let text = helm_with_values(
        helm,
        &["template", "trellis", "--namespace", NAMESPACE],
        values,
    );
    let mut out: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for doc in text.split("\n---\n") {
        let Some(source) = doc
            .lines()
            .find_map(|l| l.strip_prefix("# Source: trellis/templates/"))
        else {
            continue;
        };
        let file = source.trim().to_owned();
        let value = yaml(doc, &format!("{file} rendered"));
        if value.is_null() {
            continue;
        }
        out.entry(file).or_default().push(value);
    }
    assert!(!out.is_empty(), "helm template rendered nothing:\n{text}");
    out
}

#[test]
fn helm_lint_passes_strictly_in_every_mode() {
    let Some(helm) = helm_gate("helm_lint_passes_strictly_in_every_mode") else {
        return;
    };
    for values in [default_values(), everything()] {
        let out = helm_with_values(&helm, &["lint", "--strict"], &values);
        assert!(out.contains("0 chart(s) failed"), "{out}");
    }
    // Values the schema refuses make helm refuse the chart too.
    let out = std::process::Command::new(&helm)
        .args(["template", "trellis", "--namespace", NAMESPACE])
        .arg(chart_dir())
        .args(["--set", "agent.unknownDestination=drop"])
        .output()
        .expect("cannot run helm");
    assert!(
        !out.status.success(),
        "helm rendered values the schema refuses"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("unknownDestination"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn dashboards_ship_as_labelled_configmaps_and_waypoints_can_be_scraped() {
    let Some(helm) =
        helm_gate("dashboards_ship_as_labelled_configmaps_and_waypoints_can_be_scraped")
    else {
        return;
    };
    let dir = chart_dir().join("dashboards");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("dashboards/")
        .map(|e| e.expect("entry").path())
        .collect();
    files.sort();
    let values = with(
        with(everything(), "dashboards.namespace", json!("monitoring")),
        "dashboards.annotations",
        json!({"grafana_folder": "Trellis"}),
    );
    let objects = render_chart(&helm, &values);
    let maps = objects.get("dashboards.yaml").expect("dashboards rendered");
    assert_eq!(maps.len(), files.len(), "one ConfigMap per dashboard");
    for file in &files {
        let stem = file.file_stem().and_then(|s| s.to_str()).expect("name");
        let map = object(&objects, "ConfigMap", &format!("trellis-dashboard-{stem}"));
        assert_eq!(map["metadata"]["namespace"], "monitoring");
        assert_eq!(map["metadata"]["labels"]["grafana_dashboard"], "1");
        assert_eq!(map["metadata"]["annotations"]["grafana_folder"], "Trellis");
        let shipped = map["data"][format!("trellis-{stem}.json")]
            .as_str()
            .expect("the dashboard JSON");
        let shipped: Value = serde_json::from_str(shipped).expect("shipped JSON parses");
        let source: Value =
            serde_json::from_str(&std::fs::read_to_string(file).expect("read")).expect("JSON");
        assert_eq!(shipped, source, "{stem} ships as written");
        assert!(
            source["uid"]
                .as_str()
                .is_some_and(|u| u.starts_with("trellis-")),
            "{stem}: a stable uid"
        );
    }
    // Off: no ConfigMaps.
    let off = render_chart(
        &helm,
        &with(default_values(), "dashboards.enabled", json!(false)),
    );
    assert!(
        !off.contains_key("dashboards.yaml"),
        "dashboards rendered while disabled"
    );

    // Waypoints in any namespace, by the label every waypoint pod carries.
    let monitor = object(&objects, "PodMonitor", "trellis-waypoints");
    assert_eq!(monitor["spec"]["namespaceSelector"]["any"], true);
    assert_eq!(
        monitor["spec"]["selector"]["matchExpressions"][0]["key"],
        "gateway.networking.k8s.io/gateway-name"
    );
    assert_eq!(monitor["spec"]["podMetricsEndpoints"][0]["port"], "metrics");
    // Without the operator: the agents' pods carry the scrape annotations.
    let agents = object(&objects, "DaemonSet", "trellis-agent");
    let annotations = &agents["spec"]["template"]["metadata"]["annotations"];
    assert_eq!(annotations["prometheus.io/scrape"], "true");
    assert_eq!(annotations["prometheus.io/port"], "15020");

    // The cluster's name reaches the controller's telemetry.
    let named = render_chart(
        &helm,
        &with(default_values(), "controller.clusterId", json!("east-1")),
    );
    let text = object(&named, "ConfigMap", "trellis-controller")["data"]["controller.yaml"]
        .as_str()
        .expect("controller.yaml")
        .to_owned();
    let config = ControllerConfig::parse(&text).expect("the controller accepts its config");
    assert_eq!(config.cluster_id, "east-1");
}
