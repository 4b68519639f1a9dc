//! Trellis against a real Kubernetes control plane: etcd, kube-apiserver (Node and RBAC
//! authorization, a service-account issuer) and kube-controller-manager, built from Go modules
//! by `.ci/kube-tools` ([`mesh_tests::cluster`]), with the testbed as the kubelet.
//!
//! The chart is rendered by the real Helm and applied with kubectl; the controller runs the
//! chart's configuration with a token of the chart's controller service account (exactly the
//! chart's grants), each agent with a token of the agent service account bound to an agent Pod
//! on its node; workload pods are Pod objects whose status the testbed writes as a kubelet
//! does, and whose cgroups are named as kubelet's systemd driver names them. Each test checks
//! its effect in the kernel (traffic and how it arrived) and in the API (objects, status), and
//! fails if the controller logged a refused (403) call.
//!
//! The control plane runs in node 0's network namespace (on its loopback), where the controller
//! runs too; the test reaches it with kubectl from there.

use std::{
    net::IpAddr,
    time::{Duration, Instant},
};

use mesh_node::{config::ControlPlaneConfig, identity::Identity};
use mesh_tests::{
    cluster::{
        Cluster, ClusterOptions, Tools,
        kubelet::{KubePod, Kubelet, PodSpec},
        tools_gate,
    },
    mesh::{
        MESH_LABEL, Mesh, MeshOptions, TRUST_DOMAIN,
        kubernetes::{CONTROLLER_HOST, RELEASE_NAMESPACE, install_chart, render_chart},
        metric_sum,
    },
    testbed::{Server, Testbed, e2e_gate},
};
use serde_json::Value;

#[path = "cluster/meshctl.rs"]
mod meshctl;
#[path = "cluster/rbac.rs"]
mod rbac;
#[path = "cluster/resilience.rs"]
mod resilience;
#[path = "cluster/waypoint.rs"]
mod waypoint;

/// The applications' namespace.
const APPS: &str = "apps";
/// Bound on waiting for the mesh to follow a change made through the API.
const CONVERGE: Duration = Duration::from_secs(45);

/// Mesh options for tests that tell a mesh connection from a direct one by the address the
/// server saw ([`Path`]): pods see the node's address for mesh connections.
fn by_node_address() -> MeshOptions {
    MeshOptions {
        source_address: mesh_node::config::SourceAddress::Node,
        ..MeshOptions::default()
    }
}

/// The tools, when the test can run here (root, bpffs, cgroup v2, the Kubernetes binaries).
fn gate(test: &str) -> Option<Tools> {
    if !e2e_gate(test) {
        return None;
    }
    tools_gate(test)
}

fn testbed(pods_per_node: usize) -> Testbed {
    Testbed::builder()
        .nodes(2)
        .pods_per_node(pods_per_node)
        .build()
        .expect("testbed")
}

/// A control plane in node 0's namespace, its state in the testbed's scratch directory.
fn cluster_on(tb: &Testbed, tools: Tools) -> Cluster {
    Cluster::start(
        tools,
        ClusterOptions {
            netns: Some(tb.node(0).netns.name().to_owned()),
            dir: Some(tb.scratch_dir().join("cluster")),
            ..ClusterOptions::default()
        },
    )
    .expect("control plane")
}

fn poll<T>(timeout: Duration, what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// How a connection reached the server, from the peer address it saw.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
enum Path {
    /// Through HBONE: the destination agent dialled from the server node's pod gateway.
    Hbone,
    /// Straight from the client's address: not redirected.
    Direct,
    /// Refused or failed.
    Failed,
    Other,
}

/// One HTTP GET from `client` to `to`: how it arrived and which server answered.
fn get(tb: &Testbed, client: &KubePod, to: &str) -> (Path, Option<String>) {
    let out = tb
        .run(
            &client.pod,
            &["pod-app", "http-get", "--to", to],
            Duration::from_secs(15),
        )
        .expect("run pod-app");
    let Ok(reply) = out.ok_json() else {
        return (Path::Failed, None);
    };
    let server = reply["body"]["server"].as_str().map(str::to_owned);
    let peer: Option<IpAddr> = reply["body"]["peer"]
        .as_str()
        .and_then(|p| p.parse::<std::net::SocketAddr>().ok())
        .map(|a| a.ip());
    let path = match peer {
        Some(ip) if tb.nodes().iter().any(|n| IpAddr::from(n.gateway_ip4) == ip) => Path::Hbone,
        Some(ip) if ip == IpAddr::from(client.pod.ip4) => Path::Direct,
        _ => Path::Other,
    };
    (path, server)
}

/// Waits until `STEADY` requests in a row take `path`.
fn wait_path(tb: &Testbed, client: &KubePod, to: &str, path: Path, what: &str) {
    const STEADY: usize = 3;
    let mut streak = 0;
    poll(CONVERGE, what, || {
        if get(tb, client, to).0 == path {
            streak += 1;
        } else {
            streak = 0;
        }
        (streak >= STEADY).then_some(())
    });
}

/// The chart's grants are all the controller needs: a refused call would be in its log.
fn assert_no_refused_calls(mesh: &Mesh<'_>) {
    assert_no_refused_calls_since(mesh, 0);
}

/// Like [`assert_no_refused_calls`] for the controller's log lines from line `first` on.
fn assert_no_refused_calls_since(mesh: &Mesh<'_>, first: usize) {
    let log = mesh.controller_log_text();
    let refused: Vec<&str> = log
        .lines()
        .skip(first)
        .filter(|l| {
            let l = l.to_ascii_lowercase();
            l.contains("forbidden") || l.contains("\"code\":403") || l.contains(" 403 ")
        })
        .collect();
    assert!(
        refused.is_empty(),
        "the controller was refused calls the chart should grant:\n{}",
        refused.join("\n")
    );
}

fn kubectl_label(cluster: &Cluster, args: &[&str]) {
    let mut all = vec!["label", "--overwrite"];
    all.extend(args);
    cluster.kubectl(&all).expect("kubectl label");
}

// ---- the CRDs ---------------------------------------------------------------------------------

#[test]
fn the_chart_installs_on_a_real_api_server_and_its_crds_are_structural_and_explained() {
    let test = "the_chart_installs_on_a_real_api_server_and_its_crds_are_structural_and_explained";
    let Some(tools) = tools_gate(test) else {
        return;
    };
    let cluster = Cluster::start(tools, ClusterOptions::default()).expect("control plane");
    let objects = render_chart(&cluster, &[]).expect("helm template");
    install_chart(&cluster, &objects).expect("install");

    // Every CRD is established and its schema structural (a non-structural one would carry a
    // NonStructuralSchema condition, and publish no OpenAPI for explain).
    let crds: Vec<&Value> = objects
        .iter()
        .filter(|o| o["kind"] == "CustomResourceDefinition")
        .collect();
    assert!(!crds.is_empty(), "the chart ships CRDs");
    for crd in &crds {
        let name = crd["metadata"]["name"].as_str().expect("name");
        let live = cluster.get_json(&["crd", name]).expect("get crd");
        let conditions = live["status"]["conditions"].as_array().expect("conditions");
        let status = |t: &str| {
            conditions
                .iter()
                .find(|c| c["type"] == t)
                .map(|c| c["status"].as_str().unwrap_or_default().to_owned())
        };
        assert_eq!(status("Established").as_deref(), Some("True"), "{name}");
        assert_eq!(status("NamesAccepted").as_deref(), Some("True"), "{name}");
        assert_eq!(
            status("NonStructuralSchema"),
            None,
            "{name}: {conditions:?}"
        );
    }
    // An Established CRD reaches the API server's discovery and OpenAPI documents a moment
    // later: kubectl explain is retried until it finds the kind.
    let explained = poll(CONVERGE, "kubectl explain to find the new kind", || {
        cluster
            .kubectl(&["explain", "authorizationpolicies.spec.action"])
            .ok()
    });
    assert!(
        explained.contains("GROUP:") && explained.contains("security.trellis.dev"),
        "{explained}"
    );
    assert!(
        explained.contains("ALLOW"),
        "the enum is explained:\n{explained}"
    );

    // The schema is enforced by the API server: a policy with an unknown action is refused,
    // a well-formed one is stored.
    let policy = |action: &str| {
        format!(
            "apiVersion: security.trellis.dev/v1\nkind: AuthorizationPolicy\n\
             metadata: {{name: p, namespace: default}}\n\
             spec: {{action: {action}, rules: [{{from: [{{source: {{namespaces: [x]}}}}]}}]}}\n"
        )
    };
    let refused = cluster
        .apply(&policy("MAYBE"))
        .expect_err("an unknown action is refused");
    assert!(refused.to_string().contains("spec.action"), "{refused:#}");
    cluster.apply(&policy("DENY")).expect("a valid policy");

    // The workloads the tests run themselves pass the API server's validation as rendered,
    // in every mode of the values.
    for extra in [&[][..], &["--set", "agent.privileged=true"][..]] {
        let objects = render_chart(&cluster, extra).expect("helm template");
        let workloads: String = objects
            .iter()
            .filter(|o| matches!(o["kind"].as_str(), Some("DaemonSet" | "Deployment")))
            .map(|o| format!("---\n{o}\n"))
            .collect();
        cluster
            .kubectl_stdin(&["apply", "--dry-run=server", "-f", "-"], &workloads)
            .expect("the DaemonSet and Deployment are valid");
    }
}

// ---- membership -----------------------------------------------------------------------------

#[test]
fn labelling_a_namespace_with_kubectl_meshes_its_pods_and_unlabelling_takes_them_out() {
    let test = "labelling_a_namespace_with_kubectl_meshes_its_pods_and_unlabelling_takes_them_out";
    let Some(tools) = gate(test) else {
        return;
    };
    let tb = testbed(1);
    let cluster = cluster_on(&tb, tools);
    let mesh = Mesh::start_kubernetes(&tb, &cluster, &by_node_address()).expect("mesh");
    let kubelet = Kubelet::new(&cluster, &tb);
    let client = kubelet
        .run_pod(
            tb.pod(0, 0),
            &PodSpec::new(APPS, "client").deployment("client"),
        )
        .expect("client pod");
    let server = kubelet
        .run_pod(
            tb.pod(1, 0),
            &PodSpec::new(APPS, "server").deployment("server"),
        )
        .expect("server pod");
    let mut server_proc = tb
        .spawn_server(&server.pod, &["--listen", "0.0.0.0:8080=http"])
        .expect("server");
    let to = format!("{}:8080", server.pod.ip4);

    // Not in the mesh yet: straight from the client.
    assert_eq!(get(&tb, &client, &to).0, Path::Direct);

    kubectl_label(
        &cluster,
        &["namespace", APPS, &format!("{MESH_LABEL}=enabled")],
    );
    wait_path(
        &tb,
        &client,
        &to,
        Path::Hbone,
        "the labelled namespace's pods to use HBONE",
    );
    let principal = format!("spiffe://cluster.local/ns/{APPS}/sa/client");
    let metrics = mesh.metrics(1).expect("server node metrics");
    assert!(
        metric_sum(
            &metrics,
            "istio_tcp_connections_opened_total",
            &[
                ("reporter", "destination"),
                ("connection_security_policy", "mutual_tls"),
                ("source_principal", &principal),
            ],
        ) >= 1.0,
        "the server's agent saw mutual TLS from {principal}:\n{metrics}"
    );

    // The pod opt-out label takes one pod out; removing it brings it back.
    kubectl_label(
        &cluster,
        &[
            "pod",
            client.name(),
            "-n",
            APPS,
            &format!("{MESH_LABEL}=disabled"),
        ],
    );
    wait_path(
        &tb,
        &client,
        &to,
        Path::Direct,
        "the opted-out pod to leave",
    );
    kubectl_label(
        &cluster,
        &["pod", client.name(), "-n", APPS, &format!("{MESH_LABEL}-")],
    );
    wait_path(&tb, &client, &to, Path::Hbone, "the pod to come back");

    // Unlabelling the namespace takes every pod out.
    kubectl_label(&cluster, &["namespace", APPS, &format!("{MESH_LABEL}-")]);
    wait_path(
        &tb,
        &client,
        &to,
        Path::Direct,
        "the unlabelled namespace's pods to leave",
    );

    // No pod was restarted: the same processes, the same objects.
    assert!(server_proc.is_running(), "the server process kept running");
    let uid = cluster
        .kubectl(&[
            "get",
            "pod",
            server.name(),
            "-n",
            APPS,
            "-o",
            "jsonpath={.metadata.uid}",
        ])
        .expect("server pod");
    assert_eq!(uid, server.pod.uid, "the server pod is the same object");
    assert_no_refused_calls(&mesh);
}

// ---- policy -----------------------------------------------------------------------------------

/// A DENY of the client's identity at the server (Istio's shape).
fn deny_client(extra_principal: &str) -> String {
    format!(
        "apiVersion: security.trellis.dev/v1\nkind: AuthorizationPolicy\n\
         metadata: {{name: deny-client, namespace: {APPS}}}\n\
         spec:\n  selector: {{matchLabels: {{app: server}}}}\n  action: DENY\n  rules:\n\
         \x20 - from:\n    - source: {{principals: [\"cluster.local/ns/{APPS}/sa/client\", \"{extra_principal}\"]}}\n"
    )
}

/// The policy's `Accepted` condition and its metadata.generation, once the condition is there.
fn accepted(cluster: &Cluster) -> Option<(Value, u64)> {
    let policy = cluster
        .get_json(&["authorizationpolicy", "deny-client", "-n", APPS])
        .ok()?;
    let generation = policy["metadata"]["generation"].as_u64()?;
    policy["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == "Accepted")
        .map(|c| (c.clone(), generation))
}

#[test]
fn an_authorization_policy_applied_with_kubectl_is_enforced_and_reports_accepted() {
    let test = "an_authorization_policy_applied_with_kubectl_is_enforced_and_reports_accepted";
    let Some(tools) = gate(test) else {
        return;
    };
    let tb = testbed(1);
    let cluster = cluster_on(&tb, tools);
    let mesh = Mesh::start_kubernetes(&tb, &cluster, &by_node_address()).expect("mesh");
    let kubelet = Kubelet::new(&cluster, &tb);
    let client = kubelet
        .run_pod(tb.pod(0, 0), &PodSpec::new(APPS, "client"))
        .expect("client pod");
    let server = kubelet
        .run_pod(
            tb.pod(1, 0),
            &PodSpec::new(APPS, "server").label("app", "server"),
        )
        .expect("server pod");
    let _server = tb
        .spawn_server(&server.pod, &["--listen", "0.0.0.0:8080=http"])
        .expect("server");
    let to = format!("{}:8080", server.pod.ip4);
    kubectl_label(
        &cluster,
        &["namespace", APPS, &format!("{MESH_LABEL}=enabled")],
    );
    wait_path(&tb, &client, &to, Path::Hbone, "the pods to join the mesh");

    cluster
        .kubectl_stdin(
            &["apply", "-f", "-"],
            &deny_client("cluster.local/ns/x/sa/a"),
        )
        .expect("kubectl apply");
    wait_path(
        &tb,
        &client,
        &to,
        Path::Failed,
        "the policy to deny the client",
    );
    let (condition, generation) = poll(CONVERGE, "the Accepted condition", || accepted(&cluster));
    assert_eq!(condition["status"], "True", "{condition}");
    assert_eq!(condition["observedGeneration"].as_u64(), Some(generation));
    let yaml = cluster
        .kubectl(&[
            "get",
            "authorizationpolicy",
            "deny-client",
            "-n",
            APPS,
            "-o",
            "yaml",
        ])
        .expect("kubectl get -o yaml");
    assert!(yaml.contains("type: Accepted"), "{yaml}");
    assert!(
        yaml.contains(&format!("observedGeneration: {generation}")),
        "{yaml}"
    );
    // The status is written by server-side apply under the controller's own field manager.
    let managers = cluster
        .kubectl(&[
            "get",
            "authorizationpolicy",
            "deny-client",
            "-n",
            APPS,
            "--show-managed-fields",
            "-o",
            "jsonpath={.metadata.managedFields[?(@.subresource==\"status\")].operation}",
        ])
        .expect("managed fields");
    assert_eq!(
        managers.trim(),
        "Apply",
        "status written by server-side apply"
    );

    // A change of the spec is a new generation; the condition follows it.
    cluster
        .kubectl_stdin(
            &["apply", "-f", "-"],
            &deny_client("cluster.local/ns/y/sa/b"),
        )
        .expect("kubectl apply");
    poll(
        CONVERGE,
        "the condition to observe the new generation",
        || {
            accepted(&cluster)
                .filter(|(c, g)| *g > generation && c["observedGeneration"].as_u64() == Some(*g))
        },
    );

    cluster
        .kubectl(&["delete", "authorizationpolicy", "deny-client", "-n", APPS])
        .expect("kubectl delete");
    wait_path(
        &tb,
        &client,
        &to,
        Path::Hbone,
        "deleting the policy to reopen",
    );
    assert_no_refused_calls(&mesh);
}

// ---- services ---------------------------------------------------------------------------------

/// The ready endpoint addresses of Service `name`, from its EndpointSlices.
fn ready_endpoints(cluster: &Cluster, name: &str) -> Vec<String> {
    let Ok(slices) = cluster.get_json(&[
        "endpointslices",
        "-n",
        APPS,
        "-l",
        &format!("kubernetes.io/service-name={name}"),
    ]) else {
        return Vec::new();
    };
    let mut ready: Vec<String> = slices["items"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|s| s["endpoints"].as_array().cloned().unwrap_or_default())
        .filter(|e| e["conditions"]["ready"] == true)
        .filter_map(|e| e["addresses"][0].as_str().map(str::to_owned))
        .collect();
    ready.sort();
    ready
}

#[test]
fn a_services_endpoints_come_from_the_endpointslice_controller_and_follow_a_deleted_pod() {
    let test =
        "a_services_endpoints_come_from_the_endpointslice_controller_and_follow_a_deleted_pod";
    let Some(tools) = gate(test) else {
        return;
    };
    let tb = testbed(2);
    let cluster = cluster_on(&tb, tools);
    let mesh = Mesh::start_kubernetes(&tb, &cluster, &by_node_address()).expect("mesh");
    let kubelet = Kubelet::new(&cluster, &tb);
    cluster
        .apply(&format!(
            "{{\"apiVersion\":\"v1\",\"kind\":\"Namespace\",\"metadata\":{{\"name\":\"{APPS}\",\
             \"labels\":{{\"{MESH_LABEL}\":\"enabled\"}}}}}}"
        ))
        .expect("namespace");
    let client = kubelet
        .run_pod(tb.pod(0, 0), &PodSpec::new(APPS, "client"))
        .expect("client pod");
    let web: Vec<KubePod> = [tb.pod(1, 0), tb.pod(1, 1)]
        .into_iter()
        .map(|p| {
            kubelet
                .run_pod(p, &PodSpec::new(APPS, "web").deployment("web"))
                .expect("web pod")
        })
        .collect();
    let _servers: Vec<_> = web
        .iter()
        .map(|w| {
            tb.spawn_server(
                &w.pod,
                &["--listen", "0.0.0.0:8080=http", "--name", w.name()],
            )
            .expect("web server")
        })
        .collect();
    cluster
        .apply(&format!(
            "{{\"apiVersion\":\"v1\",\"kind\":\"Service\",\"metadata\":{{\"name\":\"web\",\
             \"namespace\":\"{APPS}\"}},\"spec\":{{\"selector\":{{\"app\":\"web\"}},\
             \"ports\":[{{\"name\":\"http\",\"port\":80,\"targetPort\":8080}}]}}}}"
        ))
        .expect("service");
    let vip = cluster
        .kubectl(&[
            "get",
            "service",
            "web",
            "-n",
            APPS,
            "-o",
            "jsonpath={.spec.clusterIP}",
        ])
        .expect("cluster IP");
    let to = format!("{vip}:80");

    // The EndpointSlice controller lists both Ready pods; traffic to the VIP reaches both.
    let mut both: Vec<String> = web.iter().map(|w| w.pod.ip4.to_string()).collect();
    both.sort();
    poll(CONVERGE, "both pods in the EndpointSlice", || {
        (ready_endpoints(&cluster, "web") == both).then_some(())
    });
    let mut seen = std::collections::BTreeSet::new();
    let deadline = Instant::now() + CONVERGE;
    while seen.len() < 2 {
        let last = get(&tb, &client, &to);
        if let (Path::Hbone, Some(server)) = &last {
            seen.insert(server.clone());
        }
        assert!(
            Instant::now() < deadline,
            "requests to the VIP {to} did not reach both pods through HBONE: saw {seen:?}, \
             last {last:?}\nnode 0's config: {}\nagent log:\n{}",
            mesh.config_dump(0)
                .map(|d| d["services"].to_string())
                .unwrap_or_default(),
            mesh.agent_log_text(0)
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // A pod that stops being Ready leaves the slice's ready endpoints, then the traffic.
    kubelet.set_ready(&web[1], false).expect("not ready");
    let first = vec![web[0].pod.ip4.to_string()];
    poll(
        CONVERGE,
        "the unready pod to leave the ready endpoints",
        || (ready_endpoints(&cluster, "web") == first).then_some(()),
    );
    let only_first = |what: &str| {
        let mut streak = 0;
        poll(CONVERGE, what, || {
            match get(&tb, &client, &to) {
                (Path::Hbone, Some(s)) if s == web[0].name() => streak += 1,
                _ => streak = 0,
            }
            (streak >= 5).then_some(())
        });
    };
    only_first("traffic to leave the unready pod");
    kubelet.set_ready(&web[1], true).expect("ready again");
    poll(CONVERGE, "the pod to be back", || {
        (ready_endpoints(&cluster, "web") == both).then_some(())
    });

    // A deleted pod (the kubelet's way: graceful, stopped, then gone) takes its traffic along.
    kubelet.delete_pod(&web[1]).expect("delete pod");
    poll(
        CONVERGE,
        "the deleted pod to leave the EndpointSlice",
        || (ready_endpoints(&cluster, "web") == first).then_some(()),
    );
    only_first("traffic to leave the deleted pod");
    assert_no_refused_calls(&mesh);
}

// ---- identity ---------------------------------------------------------------------------------

/// Asks the controller's CA, from node 0, for `identity` with the token in `token_file`: the
/// serial signed, or the refusal.
fn sign_from_node_0(
    mesh: &Mesh<'_>,
    tb: &Testbed,
    token_file: std::path::PathBuf,
    identity: &Identity,
) -> Result<String, String> {
    let config = ControlPlaneConfig {
        address: mesh.controller_addr().into(),
        server_name: Some(CONTROLLER_HOST.to_owned()),
        ca_cert: mesh.ca_dir.join("root-cert.pem"),
        token_file,
        root_namespace: RELEASE_NAMESPACE.into(),
    };
    mesh_tests::mesh::sign_from_node_0(tb, config, TRUST_DOMAIN, identity)
}

#[test]
fn an_agent_token_bound_to_node_0_gets_no_certificate_for_a_pod_on_node_1() {
    let test = "an_agent_token_bound_to_node_0_gets_no_certificate_for_a_pod_on_node_1";
    let Some(tools) = gate(test) else {
        return;
    };
    let tb = testbed(1);
    let cluster = cluster_on(&tb, tools);
    let mesh = Mesh::start_kubernetes(&tb, &cluster, &by_node_address()).expect("mesh");
    let kubelet = Kubelet::new(&cluster, &tb);
    kubectl_label(
        &cluster,
        &["namespace", "default", &format!("{MESH_LABEL}=enabled")],
    );
    let mine = kubelet
        .run_pod(tb.pod(0, 0), &PodSpec::new("default", "mine"))
        .expect("pod on node 0");
    let theirs = kubelet
        .run_pod(tb.pod(1, 0), &PodSpec::new("default", "theirs"))
        .expect("pod on node 1");
    let id = |account: &str| -> Identity {
        format!("spiffe://{TRUST_DOMAIN}/ns/default/sa/{account}")
            .parse()
            .expect("identity")
    };
    let (id_mine, id_theirs) = (id("mine"), id("theirs"));
    let token_file = mesh.node_token_file(0);
    // The agents see their pods first, so the refusal below is about the node, not timing.
    mesh.wait_config(1, CONVERGE, |d| {
        d.to_string().contains(&id_theirs.to_string())
    })
    .expect("node 1 holds its pod's certificate");

    let refusal = sign_from_node_0(&mesh, &tb, token_file.clone(), &id_theirs)
        .expect_err("node 0's token is refused node 1's pod");
    assert!(refusal.contains("PermissionDenied"), "{refusal}");
    let log = mesh.controller_log_text();
    assert!(
        log.lines().any(|l| l.contains("refused certificate")
            && l.contains("node-0")
            && l.contains(&id_theirs.to_string())),
        "the controller logs the refusal, naming the node and the identity:\n{log}"
    );
    sign_from_node_0(&mesh, &tb, token_file, &id_mine).expect("its own pod's identity");
    assert_eq!(mine.pod.node, 0);
    assert_eq!(theirs.pod.node, 1);

    // A token of the agent account that is bound to no pod names no node: refused.
    let unbound = tb.scratch_dir().join("unbound-token");
    std::fs::write(
        &unbound,
        cluster
            .token(RELEASE_NAMESPACE, "trellis-agent", Some("trellis"), None)
            .expect("token"),
    )
    .expect("write token");
    let refusal = sign_from_node_0(&mesh, &tb, unbound, &id_theirs).expect_err("refused");
    assert!(refusal.contains("Unauthenticated"), "{refusal}");
    // A token for another audience (the API server's own) is refused by the TokenReview.
    let other = tb.scratch_dir().join("other-audience-token");
    std::fs::write(
        &other,
        cluster
            .token(
                RELEASE_NAMESPACE,
                "trellis-agent",
                None,
                Some("trellis-agent-node-0"),
            )
            .expect("token"),
    )
    .expect("write token");
    let refusal = sign_from_node_0(&mesh, &tb, other, &id_mine).expect_err("refused");
    assert!(refusal.contains("Unauthenticated"), "{refusal}");
    assert_no_refused_calls(&mesh);
}

/// The `default` namespace meshed with `kubectl label`, a client pod on node 0 and an HTTP
/// server pod on node 1 (port 8080), once the client's connections to it cross HBONE: the
/// client, the server's process and its address.
fn meshed_client_and_server(tb: &Testbed, cluster: &Cluster) -> (KubePod, Server, String) {
    let kubelet = Kubelet::new(cluster, tb);
    kubectl_label(
        cluster,
        &["namespace", "default", &format!("{MESH_LABEL}=enabled")],
    );
    let client = kubelet
        .run_pod(tb.pod(0, 0), &PodSpec::new("default", "client"))
        .expect("client pod");
    let server = kubelet
        .run_pod(tb.pod(1, 0), &PodSpec::new("default", "server"))
        .expect("server pod");
    let process = tb
        .spawn_server(&server.pod, &["--listen", "0.0.0.0:8080=http"])
        .expect("server");
    let to = format!("{}:8080", server.pod.ip4);
    wait_path(tb, &client, &to, Path::Hbone, "the pods to join the mesh");
    (client, process, to)
}

// ---- resilience -------------------------------------------------------------------------------

#[test]
fn agents_keep_serving_while_the_api_server_restarts_and_the_controller_catches_up() {
    let test = "agents_keep_serving_while_the_api_server_restarts_and_the_controller_catches_up";
    let Some(tools) = gate(test) else {
        return;
    };
    let tb = testbed(1);
    let mut cluster = cluster_on(&tb, tools);
    let mesh = Mesh::start_kubernetes(&tb, &cluster, &by_node_address()).expect("mesh");
    let (client, _server, to) = meshed_client_and_server(&tb, &cluster);

    assert_no_refused_calls(&mesh);
    // The API server goes away: the mesh keeps serving new connections from what it has.
    cluster.stop_apiserver().expect("stop the API server");
    for _ in 0..10 {
        assert_eq!(
            get(&tb, &client, &to).0,
            Path::Hbone,
            "served during the outage"
        );
    }
    cluster.start_apiserver().expect("start the API server");
    // Until its authorizer's caches are filled, a starting API server refuses every call the
    // controller's watches make as soon as its port opens (403); from ready on, none may be.
    let ready_at = mesh.controller_log_text().lines().count();

    // The controller's watches come back (relisting as needed): a change made after the
    // restart reaches the agents.
    kubectl_label(
        &cluster,
        &["namespace", "default", &format!("{MESH_LABEL}-")],
    );
    wait_path(
        &tb,
        &client,
        &to,
        Path::Direct,
        "the change after the restart to apply",
    );
    kubectl_label(
        &cluster,
        &["namespace", "default", &format!("{MESH_LABEL}=enabled")],
    );
    wait_path(&tb, &client, &to, Path::Hbone, "and the next one");
    assert_no_refused_calls_since(&mesh, ready_at);
}
