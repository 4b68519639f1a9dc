//! A waypoint on the real API server: the Gateway and an HTTPRoute applied with kubectl, the
//! route's `status.parents` written by the controller through the API, and the route obeyed
//! by the waypoint, which proves its identity with a bound service-account token.

use std::net::SocketAddr;

use mesh_tests::{
    cluster::{
        gateway_api,
        kubelet::{KubePod, Kubelet, PodSpec},
    },
    mesh::{
        MESH_LABEL, Mesh, metric_sum,
        waypoint::{GATEWAY_NAME_LABEL, USE_WAYPOINT_LABEL},
    },
    testbed::{RequestsOpts, Testbed},
};
use serde_json::{Value, json};

use super::{APPS, CONVERGE, assert_no_refused_calls, cluster_on, gate, poll, testbed};

const WAYPOINT: &str = "waypoint";
const PORT: u16 = 80;
const TARGET_PORT: u16 = 8080;

/// Service `name` on port 80 over the pods labelled `selector`; its cluster IP and port.
fn service(cluster: &mesh_tests::cluster::Cluster, name: &str, selector: Value) -> SocketAddr {
    cluster
        .apply(
            &json!({
                "apiVersion": "v1", "kind": "Service",
                "metadata": {"name": name, "namespace": APPS},
                "spec": {"selector": selector, "ports": [
                    {"name": "http", "port": PORT, "targetPort": TARGET_PORT},
                ]},
            })
            .to_string(),
        )
        .expect("service");
    let vip = cluster
        .kubectl(&[
            "get",
            "service",
            name,
            "-n",
            APPS,
            "-o",
            "jsonpath={.spec.clusterIP}",
        ])
        .expect("cluster IP");
    SocketAddr::new(vip.trim().parse().expect("a cluster IP"), PORT)
}

/// `count` GETs of `/` from `client` to `to` with `headers`: how many each server answered.
fn answers(tb: &Testbed, client: &KubePod, to: SocketAddr, headers: &[&str]) -> Value {
    tb.requests(
        &client.pod,
        to,
        &RequestsOpts {
            count: 10,
            headers: headers.iter().map(|h| (*h).to_owned()).collect(),
            ..Default::default()
        },
    )
    .unwrap_or_else(|e| panic!("requests to {to}: {e:#}"))
}

/// The route's `status.parents` entries written by the waypoints' controller.
fn our_parents(route: &Value) -> Vec<Value> {
    route["status"]["parents"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["controllerName"] == "trellis.dev/waypoint")
        .cloned()
        .collect()
}

fn condition<'a>(parent: &'a Value, kind: &str) -> Option<&'a Value> {
    parent["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == kind)
}

#[test]
fn a_waypoint_obeys_an_httproute_applied_with_kubectl_and_the_route_reports_its_parent() {
    let test =
        "a_waypoint_obeys_an_httproute_applied_with_kubectl_and_the_route_reports_its_parent";
    let Some(tools) = gate(test) else {
        return;
    };
    let tb = testbed(2);
    let cluster = cluster_on(&tb, tools);
    // The Gateway API is the cluster's, installed before the mesh (as on kind).
    cluster
        .apply(&gateway_api::crds())
        .expect("Gateway API CRDs");
    cluster
        .kubectl(&[
            "wait",
            "--for=condition=Established",
            "crd/gateways.gateway.networking.k8s.io",
            "crd/httproutes.gateway.networking.k8s.io",
            "--timeout=60s",
        ])
        .expect("CRDs established");
    let mesh = Mesh::start_kubernetes(&tb, &cluster, &super::by_node_address()).expect("mesh");
    let kubelet = Kubelet::new(&cluster, &tb);
    cluster
        .apply(
            &json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {
                "name": APPS,
                "labels": {MESH_LABEL: "enabled", USE_WAYPOINT_LABEL: WAYPOINT},
            }})
            .to_string(),
        )
        .expect("namespace");

    let client = kubelet
        .run_pod(tb.pod(0, 0), &PodSpec::new(APPS, "client"))
        .expect("client pod");
    let waypoint_pod = kubelet
        .run_pod(
            tb.pod(0, 1),
            &PodSpec::new(APPS, WAYPOINT).label(GATEWAY_NAME_LABEL, WAYPOINT),
        )
        .expect("waypoint pod");
    let web: Vec<KubePod> = [("v1", tb.pod(1, 0)), ("v2", tb.pod(1, 1))]
        .into_iter()
        .map(|(version, pod)| {
            kubelet
                .run_pod(
                    pod,
                    &PodSpec::new(APPS, "web")
                        .label("app", "web")
                        .label("version", version),
                )
                .expect("web pod")
        })
        .collect();
    let _servers: Vec<_> = web
        .iter()
        .map(|w| {
            tb.spawn_server(
                &w.pod,
                &[
                    // The waypoint pools its connections: keep them for the whole test.
                    "--timeout-ms",
                    "600000",
                    "--listen",
                    &format!("0.0.0.0:{TARGET_PORT}=l7"),
                    "--name",
                    w.name(),
                ],
            )
            .expect("web server")
        })
        .collect();
    let to = service(&cluster, "web", json!({"app": "web"}));
    service(&cluster, "web-v1", json!({"app": "web", "version": "v1"}));
    service(&cluster, "web-v2", json!({"app": "web", "version": "v2"}));

    let waypoint = mesh
        .start_kube_waypoint(&cluster, WAYPOINT, &waypoint_pod, WAYPOINT)
        .expect("waypoint starts with its bound token");
    mesh.wait_config(0, CONVERGE, |dump| {
        dump["services"].as_array().is_some_and(|services| {
            services.iter().any(|s| {
                s["name"] == "web"
                    && s["waypoint"] == format!("{APPS}/{WAYPOINT}")
                    && s["endpoints"].as_array().map(Vec::len) == Some(2)
            })
        })
    })
    .expect("the Service goes through the waypoint in node 0's config");

    let route = format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\n\
         metadata: {{name: web, namespace: {APPS}}}\n\
         spec:\n\
         \x20 parentRefs: [{{group: \"\", kind: Service, name: web, port: {PORT}}}]\n\
         \x20 rules:\n\
         \x20 - matches: [{{headers: [{{name: x-version, value: v2}}]}}]\n\
         \x20   backendRefs: [{{name: web-v2, port: {PORT}}}]\n\
         \x20 - backendRefs: [{{name: web-v1, port: {PORT}}}]\n"
    );
    cluster
        .kubectl_stdin(&["apply", "-f", "-"], &route)
        .expect("kubectl apply the route");
    waypoint
        .wait_programmed(&[&format!("HTTPRoute {APPS}/web")], &[], CONVERGE)
        .expect("the waypoint holds the route");

    // The route decides: without the header every answer comes from v1, with it from v2,
    // although the Service itself spans both pods.
    let plain = answers(&tb, &client, to, &[]);
    assert_eq!(plain["servers"][web[0].name()], 10, "{plain}");
    let by_header = answers(&tb, &client, to, &["x-version: v2"]);
    assert_eq!(by_header["servers"][web[1].name()], 10, "{by_header}");
    let metrics = waypoint.metrics().expect("waypoint metrics");
    assert!(
        metric_sum(
            &metrics,
            "istio_requests_total",
            &[
                ("reporter", "waypoint"),
                ("destination_service_name", "web-v2")
            ],
        ) >= 10.0,
        "the waypoint served the routed requests:\n{metrics}"
    );

    // The controller wrote the route's status through the API: one parent, the Service,
    // Accepted and ResolvedRefs, for the route's current generation.
    let (route_object, parent) = poll(CONVERGE, "the route's status.parents", || {
        let route = cluster.get_json(&["httproute", "web", "-n", APPS]).ok()?;
        let parents = our_parents(&route);
        let done = parents.len() == 1
            && ["Accepted", "ResolvedRefs"]
                .iter()
                .all(|kind| condition(&parents[0], kind).is_some_and(|c| c["status"] == "True"));
        done.then(|| (route.clone(), parents[0].clone()))
    });
    assert_eq!(parent["parentRef"]["kind"], "Service", "{parent}");
    assert_eq!(parent["parentRef"]["name"], "web", "{parent}");
    let generation = route_object["metadata"]["generation"].as_u64();
    assert!(generation.is_some(), "{route_object}");
    assert_eq!(
        condition(&parent, "Accepted").and_then(|c| c["observedGeneration"].as_u64()),
        generation,
        "{parent}"
    );
    let yaml = cluster
        .kubectl(&["get", "httproute", "web", "-n", APPS, "-o", "yaml"])
        .expect("kubectl get -o yaml");
    assert!(
        yaml.contains("controllerName: trellis.dev/waypoint") && yaml.contains("type: Accepted"),
        "{yaml}"
    );
    assert_no_refused_calls(&mesh);
}
