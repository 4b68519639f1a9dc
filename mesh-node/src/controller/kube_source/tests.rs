//! The Kubernetes source against a recorded API server: the same mesh as the directory source
//! for the same objects, optional kinds, and re-lists.

use std::collections::{HashMap, VecDeque};

use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::*;
use crate::controller::{
    files::{load_dir, tests::TempDir},
    translate::{TranslateSettings, Translation, translate},
};

type Req = http::Request<kube::client::Body>;
type Resp = http::Response<kube::client::Body>;
type Respond = tower_test::mock::SendResponse<Resp>;

/// What the recorded API server serves. GRPCRoute, TrafficPolicy and Istio's
/// PeerAuthentication and RequestAuthentication are not (their CRDs are "not installed"):
/// their lists get 404.
const PATHS: [(&str, &str); 11] = [
    ("/api/v1/namespaces", "NamespaceList"),
    ("/api/v1/pods", "PodList"),
    ("/api/v1/services", "ServiceList"),
    (
        "/apis/discovery.k8s.io/v1/endpointslices",
        "EndpointSliceList",
    ),
    ("/api/v1/nodes", "NodeList"),
    (
        "/apis/security.trellis.dev/v1/authorizationpolicies",
        "AuthorizationPolicyList",
    ),
    (
        "/apis/security.trellis.dev/v1/peerauthentications",
        "PeerAuthenticationList",
    ),
    (
        "/apis/security.trellis.dev/v1/requestauthentications",
        "RequestAuthenticationList",
    ),
    ("/apis/gateway.networking.k8s.io/v1/gateways", "GatewayList"),
    (
        "/apis/gateway.networking.k8s.io/v1/httproutes",
        "HTTPRouteList",
    ),
    (
        "/apis/security.istio.io/v1/authorizationpolicies",
        "AuthorizationPolicyList",
    ),
];
const ISTIO_PEER_AUTHENTICATIONS: &str = "/apis/security.istio.io/v1/peerauthentications";
const GRPCROUTES: &str = "/apis/gateway.networking.k8s.io/v1/grpcroutes";
const TRAFFIC_POLICIES: &str = "/apis/traffic.trellis.dev/v1/trafficpolicies";

fn path_of(kind: &str) -> &'static str {
    match kind {
        "Namespace" => PATHS[0].0,
        "Pod" => PATHS[1].0,
        "Service" => PATHS[2].0,
        "EndpointSlice" => PATHS[3].0,
        "Node" => PATHS[4].0,
        "AuthorizationPolicy" => PATHS[5].0,
        "PeerAuthentication" => PATHS[6].0,
        "RequestAuthentication" => PATHS[7].0,
        "Gateway" => PATHS[8].0,
        "HTTPRoute" => PATHS[9].0,
        "AuthorizationPolicy.security.istio.io" => PATHS[10].0,
        other => panic!("no path for {other}"),
    }
}

/// The collection an object is listed in: by its kind, qualified by its group for Istio's.
fn collection_of(object: &Value) -> &'static str {
    let kind = object["kind"].as_str().unwrap_or_default();
    if object["apiVersion"]
        .as_str()
        .is_some_and(|v| v.starts_with("security.istio.io/"))
    {
        path_of(&format!("{kind}.security.istio.io"))
    } else {
        path_of(kind)
    }
}

enum Command {
    /// What the next list of every kind returns.
    SetObjects(Vec<Value>, u64),
    /// Watch events (already JSON lines) for one collection path.
    Watch(&'static str, Vec<Value>),
    /// The next list of this path fails with a 500 (once).
    FailNextList(&'static str),
}

fn json_response(status: u16, body: &Value) -> Resp {
    http::Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(kube::client::Body::from(body.to_string().into_bytes()))
        .expect("response")
}

/// A recorded API server: answers lists from the current objects and watches from queued
/// event batches, holding watches open (unanswered) while nothing is queued.
async fn api_server(
    mut handle: tower_test::mock::Handle<Req, Resp>,
    mut commands: mpsc::UnboundedReceiver<Command>,
    lists: Arc<parking_lot::Mutex<HashMap<String, u32>>>,
) {
    let mut objects: Vec<Value> = Vec::new();
    let mut version = 1;
    let mut parked: HashMap<&'static str, Vec<Respond>> = HashMap::new();
    let mut queued: HashMap<&'static str, VecDeque<Vec<Value>>> = HashMap::new();
    let mut fail_next: BTreeSet<&'static str> = BTreeSet::new();
    let watch_body = |events: Vec<Value>| {
        let lines: String = events.iter().map(|e| format!("{e}\n")).collect();
        http::Response::builder()
            .status(200)
            .body(kube::client::Body::from(lines.into_bytes()))
            .expect("response")
    };
    loop {
        // Commands first: the test queues state before the requests that should see it.
        tokio::select! {
            biased;
            command = commands.recv() => match command {
                None => return,
                Some(Command::SetObjects(o, v)) => { objects = o; version = v; }
                Some(Command::FailNextList(path)) => { fail_next.insert(path); }
                Some(Command::Watch(path, events)) => {
                    match parked.get_mut(path).and_then(Vec::pop) {
                        Some(respond) => respond.send_response(watch_body(events)),
                        None => queued.entry(path).or_default().push_back(events),
                    }
                }
            },
            request = handle.next_request() => {
                let Some((request, respond)) = request else { return };
                let query = request.uri().query().unwrap_or_default();
                if !query.contains("watch=true") {
                    *lists
                        .lock()
                        .entry(request.uri().path().to_owned())
                        .or_default() += 1;
                }
                let Some(&(path, list_kind)) =
                    PATHS.iter().find(|(p, _)| *p == request.uri().path())
                else {
                    // What the API server answers for a resource it does not serve.
                    respond.send_response(json_response(404, &json!({
                        "kind": "Status", "apiVersion": "v1", "metadata": {},
                        "status": "Failure", "reason": "NotFound", "code": 404,
                        "message": "the server could not find the requested resource"})));
                    continue;
                };
                if query.contains("watch=true") {
                    match queued.get_mut(path).and_then(VecDeque::pop_front) {
                        Some(events) => respond.send_response(watch_body(events)),
                        None => parked.entry(path).or_default().push(respond),
                    }
                    continue;
                }
                if fail_next.remove(path) {
                    respond.send_response(json_response(500, &json!({
                        "kind": "Status", "apiVersion": "v1", "metadata": {},
                        "status": "Failure", "message": "etcd is sad", "reason": "InternalError", "code": 500})));
                    continue;
                }
                let items: Vec<&Value> = objects
                    .iter()
                    .filter(|o| collection_of(o) == path)
                    .collect();
                respond.send_response(json_response(200, &json!({
                    "kind": list_kind, "apiVersion": "v1",
                    "metadata": {"resourceVersion": version.to_string()},
                    "items": items})));
            }
        }
    }
}

/// A DENY from namespace `from`, at `generation` (also its resource version).
fn authorization_policy(generation: u64, from: &str) -> Value {
    json!({"apiVersion": "security.trellis.dev/v1", "kind": "AuthorizationPolicy",
            "metadata": {"name": "no-plain", "namespace": "shop", "generation": generation,
                         "uid": "ap-1", "resourceVersion": generation.to_string()},
            "spec": {"action": "DENY",
                     "rules": [{"from": [{"source": {"namespaces": [from]}}]}]}})
}

/// Istio's own AuthorizationPolicy, as written for Istio (`v1beta1`; listed at `v1`).
fn istio_authorization_policy(generation: u64) -> Value {
    json!({"apiVersion": "security.istio.io/v1beta1", "kind": "AuthorizationPolicy",
            "metadata": {"name": "no-plain", "namespace": "shop", "generation": generation,
                         "uid": "istio-ap-1", "resourceVersion": generation.to_string()},
            "spec": {"action": "ALLOW",
                     "rules": [{"from": [{"source": {"serviceAccounts": ["shop/web-1"]}}]}]}})
}

/// A token check at the waypoint, for `issuer`, at `generation`.
fn request_authentication(generation: u64, issuer: &str) -> Value {
    json!({"apiVersion": "security.trellis.dev/v1", "kind": "RequestAuthentication",
            "metadata": {"name": "tokens", "namespace": "shop", "generation": generation,
                         "uid": "ra-1", "resourceVersion": generation.to_string()},
            "spec": {"targetRefs": [{"group": "gateway.networking.k8s.io", "kind": "Gateway",
                                     "name": "waypoint"}],
                     "jwtRules": [{"issuer": issuer, "jwksUri": format!("{issuer}/keys")}]}})
}

fn namespace(name: &str, mesh: Option<&str>, rv: u64) -> Value {
    let labels = mesh.map_or(json!({}), |v| json!({"trellis.dev/mesh": v}));
    json!({"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": name, "labels": labels, "resourceVersion": rv.to_string(),
                         "uid": format!("ns-{name}")}})
}

fn pod(ns: &str, name: &str, node: &str, ip: &str, labels: Value, rv: u64) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": ns, "uid": format!("uid-{name}"),
                         "labels": labels, "resourceVersion": rv.to_string(),
                         "annotations": {"noise": "x".repeat(100)},
                         "managedFields": [{"manager": "kubelet", "operation": "Update"}]},
            "spec": {"serviceAccountName": name, "nodeName": node,
                     "containers": [{"name": "app", "image": "app:1"}]},
            "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}})
}

fn node(name: &str, ip: &str, zone: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "resourceVersion": "1",
                         "labels": {"topology.kubernetes.io/zone": zone, "kubernetes.io/os": "linux"}},
            "status": {"addresses": [{"type": "InternalIP", "address": ip},
                                     {"type": "Hostname", "address": name}]}})
}

fn service() -> Value {
    json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "web", "namespace": "shop", "resourceVersion": "1"},
            "spec": {"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"],
                     "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}]}})
}

fn slice(pods: &[(&str, &str, &str)], rv: u64) -> Value {
    let endpoints: Vec<Value> = pods
            .iter()
            .map(|(name, ip, node)| json!({"addresses": [ip], "conditions": {"ready": true},
                "nodeName": node,
                "targetRef": {"kind": "Pod", "namespace": "shop", "name": name, "uid": format!("uid-{name}")}}))
            .collect();
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "web-abc", "namespace": "shop", "resourceVersion": rv.to_string(),
                         "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": endpoints})
}

fn waypoint_gateway() -> Value {
    json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
            "metadata": {"name": "waypoint", "namespace": "shop", "resourceVersion": "1",
                         "generation": 1, "uid": "gw-1"},
            "spec": {"gatewayClassName": "trellis-waypoint",
                     "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]},
            "status": {"conditions": [{"type": "Programmed", "status": "True"}]}})
}

fn http_route(generation: u64, port: u64) -> Value {
    json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
            "metadata": {"name": "web", "namespace": "shop", "generation": generation,
                         "resourceVersion": generation.to_string(), "uid": "route-1"},
            "spec": {"parentRefs": [{"name": "waypoint"}],
                     "rules": [{"backendRefs": [{"name": "web", "port": port}]}]}})
}

fn settings() -> TranslateSettings {
    TranslateSettings {
        trust_domain: "cluster.local".into(),
        hbone_port: 15008,
        cluster_id: "Kubernetes".into(),
        istio_labels: false,
    }
}

/// The same objects written as a manifest directory and loaded by the directory source.
fn through_files(objects: &[Value]) -> (ClusterObjects, Translation) {
    let dir = TempDir::new("kube-equiv");
    let yaml: Vec<String> = objects
        .iter()
        .map(|o| serde_saphyr::to_string(o).expect("yaml"))
        .collect();
    dir.write("cluster.yaml", &yaml.join("---\n"));
    let loaded = load_dir(&dir.0).expect("load");
    assert_eq!(loaded.errors, vec![]);
    let translation = translate(&loaded.objects, &settings());
    (loaded.objects, translation)
}

/// Waits for the kube source to publish exactly what the directory source makes of
/// `objects`.
async fn expect_same_as_files(
    rx: &mut watch::Receiver<Option<Arc<ClusterObjects>>>,
    objects: &[Value],
    what: &str,
) {
    let (want_objects, want) = through_files(objects);
    let mut last = None;
    let waited = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Some(got) = rx.borrow_and_update().clone() {
                let translation = translate(&got, &settings());
                if translation == want {
                    assert_eq!(*got, want_objects, "{what}: objects differ");
                    return;
                }
                last = Some(translation);
            }
            rx.changed().await.expect("source alive");
        }
    })
    .await;
    assert!(
        waited.is_ok(),
        "{what}: kube source never matched the files.\nwant {want:#?}\nlast {last:#?}"
    );
}

#[tokio::test]
async fn recorded_api_server_gives_the_same_mesh_as_files() {
    let (service_mock, handle) = tower_test::mock::pair::<Req, Resp>();
    let client = Client::new(service_mock, "default");
    let (commands, command_rx) = mpsc::unbounded_channel();
    let list_counts = Arc::new(parking_lot::Mutex::new(HashMap::new()));
    let server = tokio::spawn(api_server(handle, command_rx, list_counts.clone()));

    // 1. Initial lists; the first nodes list fails, and nothing may be published before
    //    the retry (after a backoff) succeeds.
    let state1 = vec![
        namespace("shop", Some("enabled"), 1),
        namespace("plain", None, 1),
        node("node-a", "192.168.0.1", "z1"),
        node("node-b", "192.168.0.2", "z2"),
        pod(
            "shop",
            "web-1",
            "node-a",
            "10.0.0.1",
            json!({"app": "web"}),
            1,
        ),
        pod(
            "shop",
            "web-2",
            "node-b",
            "10.0.1.1",
            json!({"app": "web"}),
            1,
        ),
        pod("plain", "api", "node-a", "10.0.0.2", json!({}), 1),
        service(),
        slice(
            &[
                ("web-1", "10.0.0.1", "node-a"),
                ("web-2", "10.0.1.1", "node-b"),
            ],
            1,
        ),
        authorization_policy(2, "plain"),
        istio_authorization_policy(3),
        request_authentication(1, "https://a.example"),
        waypoint_gateway(),
        pod(
            "shop",
            "waypoint-1",
            "node-b",
            "10.0.1.9",
            json!({"gateway.networking.k8s.io/gateway-name": "waypoint"}),
            1,
        ),
        http_route(1, 80),
    ];
    commands
        .send(Command::FailNextList(path_of("Node")))
        .expect("server");
    commands
        .send(Command::SetObjects(state1.clone(), 1))
        .expect("server");
    let (tx, mut rx) = watch::channel(None);
    let shutdown = CancellationToken::new();
    let source = tokio::spawn(run(client, tx, shutdown.clone()));
    expect_same_as_files(&mut rx, &state1, "initial list").await;
    {
        let counts = list_counts.lock();
        assert_eq!(
            counts.get(path_of("Node")),
            Some(&2),
            "published only after the failed nodes list was retried"
        );
        for missing in [GRPCROUTES, TRAFFIC_POLICIES, ISTIO_PEER_AUTHENTICATIONS] {
            assert!(
                counts.get(missing).is_some_and(|n| *n >= 1),
                "{missing} was asked for, answered 404, and did not hold publishing back"
            );
        }
    }
    let got = rx.borrow().clone().expect("published");
    let t = translate(&got, &settings());
    assert!(t.resources.contains_key("waypoint/shop/waypoint"));
    assert!(t.resources.contains_key("route/HTTPRoute/shop/web"));
    assert!(
        t.resources
            .contains_key("policy/RequestAuthentication/shop/tokens")
    );
    // Istio's policy of the same name is a second object, in its own group.
    assert!(
        t.resources
            .contains_key("policy/AuthorizationPolicy/shop/no-plain")
    );
    assert!(
        t.resources
            .contains_key("policy/AuthorizationPolicy.security.istio.io/shop/no-plain")
    );

    // 2. Watch events: a pod added, a namespace relabelled into the mesh, a pod opting
    //    out, a pod deleted, the slice updated.
    let web3 = pod(
        "shop",
        "web-3",
        "node-b",
        "10.0.1.2",
        json!({"app": "web"}),
        5,
    );
    let web2_out = pod(
        "shop",
        "web-2",
        "node-b",
        "10.0.1.1",
        json!({"app": "web", "trellis.dev/mesh": "disabled"}),
        6,
    );
    let api_gone = pod("plain", "api", "node-a", "10.0.0.2", json!({}), 7);
    let plain_on = namespace("plain", Some("enabled"), 8);
    let slice2 = slice(
        &[
            ("web-1", "10.0.0.1", "node-a"),
            ("web-3", "10.0.1.2", "node-b"),
        ],
        9,
    );
    commands
        .send(Command::Watch(
            path_of("Pod"),
            vec![
                json!({"type": "ADDED", "object": web3}),
                json!({"type": "MODIFIED", "object": web2_out}),
                json!({"type": "DELETED", "object": api_gone}),
            ],
        ))
        .expect("server");
    commands
        .send(Command::Watch(
            path_of("Namespace"),
            vec![json!({"type": "MODIFIED", "object": plain_on})],
        ))
        .expect("server");
    commands
        .send(Command::Watch(
            path_of("EndpointSlice"),
            vec![json!({"type": "MODIFIED", "object": slice2})],
        ))
        .expect("server");
    commands
        .send(Command::Watch(
            path_of("AuthorizationPolicy"),
            vec![json!({"type": "MODIFIED", "object": authorization_policy(3, "legacy")})],
        ))
        .expect("server");
    commands
            .send(Command::Watch(
                path_of("RequestAuthentication"),
                vec![json!({"type": "MODIFIED", "object": request_authentication(2, "https://b.example")})],
            ))
            .expect("server");
    commands
        .send(Command::Watch(
            path_of("HTTPRoute"),
            vec![json!({"type": "MODIFIED", "object": http_route(2, 8080)})],
        ))
        .expect("server");
    commands
        .send(Command::Watch(
            path_of("AuthorizationPolicy.security.istio.io"),
            vec![json!({"type": "MODIFIED", "object": istio_authorization_policy(4)})],
        ))
        .expect("server");
    let state2 = vec![
        namespace("shop", Some("enabled"), 1),
        namespace("plain", Some("enabled"), 8),
        node("node-a", "192.168.0.1", "z1"),
        node("node-b", "192.168.0.2", "z2"),
        pod(
            "shop",
            "web-1",
            "node-a",
            "10.0.0.1",
            json!({"app": "web"}),
            1,
        ),
        pod(
            "shop",
            "web-2",
            "node-b",
            "10.0.1.1",
            json!({"app": "web", "trellis.dev/mesh": "disabled"}),
            6,
        ),
        pod(
            "shop",
            "web-3",
            "node-b",
            "10.0.1.2",
            json!({"app": "web"}),
            5,
        ),
        service(),
        slice(
            &[
                ("web-1", "10.0.0.1", "node-a"),
                ("web-3", "10.0.1.2", "node-b"),
            ],
            9,
        ),
        authorization_policy(3, "legacy"),
        istio_authorization_policy(4),
        request_authentication(2, "https://b.example"),
        waypoint_gateway(),
        pod(
            "shop",
            "waypoint-1",
            "node-b",
            "10.0.1.9",
            json!({"gateway.networking.k8s.io/gateway-name": "waypoint"}),
            1,
        ),
        http_route(2, 8080),
    ];
    expect_same_as_files(&mut rx, &state2, "watch events").await;

    // 3. The pod watch expires (410 Gone): the source re-lists pods, missing web-3 (deleted
    //    while the watch was down) and finding web-4. Other kinds are untouched.
    let mut state3 = state2.clone();
    state3.retain(|o| o["metadata"]["name"] != "web-3");
    state3.push(pod("plain", "web-4", "node-a", "10.0.0.4", json!({}), 12));
    commands
        .send(Command::SetObjects(state3.clone(), 12))
        .expect("server");
    commands
        .send(Command::Watch(
            path_of("Pod"),
            vec![json!({"type": "ERROR", "object": {
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": "too old resource version: 5 (12)", "reason": "Expired", "code": 410}})],
        ))
        .expect("server");
    expect_same_as_files(&mut rx, &state3, "re-list after a watch error").await;
    // The mesh now lists web-4 and an endpoint of the slice points at a pod that is gone.
    let got = rx.borrow().clone().expect("published");
    let t = translate(&got, &settings());
    assert!(t.resources.contains_key("workload/uid-web-4"));
    assert!(!t.resources.contains_key("workload/uid-web-3"));

    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), source)
        .await
        .expect("source stops")
        .expect("no panic");
    drop(commands);
    let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
}

#[test]
fn an_optional_kind_not_served_counts_as_listed_and_empty() {
    let mut store = Store::default();
    for kind in Kind::ALL.into_iter().filter(|k| *k != Kind::HttpRoute) {
        store.handle(kind, Event::Init);
        store.handle(kind, Event::InitDone);
    }
    assert!(!store.synced(), "HTTPRoutes not listed yet");
    assert!(store.not_served(Kind::HttpRoute), "first answer: a change");
    assert!(store.synced(), "a missing CRD does not hold the mesh back");
    assert!(
        !store.not_served(Kind::HttpRoute),
        "the same answer again changes nothing"
    );

    // The CRD is installed: routes flow in.
    let route = Object::Route(
        RouteKind::Http,
        PolicyObject::untyped(&http_route(1, 80)).expect("route"),
    );
    store.handle(Kind::HttpRoute, Event::Init);
    store.handle(Kind::HttpRoute, Event::InitApply(route));
    assert!(store.handle(Kind::HttpRoute, Event::InitDone));
    assert_eq!(store.objects.http_routes.len(), 1);
    // And removed again: they are gone with it.
    assert!(store.not_served(Kind::HttpRoute));
    assert!(store.objects.http_routes.is_empty());
}

#[test]
fn a_plain_text_404_for_an_unserved_group_means_not_served() {
    // What kube makes of the API server's `404 page not found` for a group with no CRD.
    let status = kube::core::Status::failure("404 page not found", "Failed to parse error data")
        .with_code(404);
    let error = watcher::Error::InitialListFailed(kube::Error::Api(Box::new(status)));
    assert!(not_served(&error));
    let forbidden = kube::core::Status::failure("forbidden", "Forbidden").with_code(403);
    let error = watcher::Error::InitialListFailed(kube::Error::Api(Box::new(forbidden)));
    assert!(!not_served(&error));
}

#[test]
fn a_relist_replaces_only_its_kind() {
    let mut store = Store::default();
    let ns = |name: &str| {
        Object::Namespace(serde_json::from_value(namespace(name, None, 1)).expect("ns"))
    };
    for kind in Kind::ALL {
        store.handle(kind, Event::Init);
        if kind == Kind::Namespace {
            store.handle(kind, Event::InitApply(ns("a")));
        }
        assert!(!store.synced());
        store.handle(kind, Event::InitDone);
    }
    assert!(store.synced());
    store.handle(Kind::Namespace, Event::Init);
    store.handle(Kind::Namespace, Event::InitApply(ns("b")));
    // Until the re-list is done, the old contents stay.
    assert!(store.objects.namespaces.contains_key("a"));
    assert!(store.handle(Kind::Namespace, Event::InitDone));
    assert_eq!(
        store.objects.namespaces.keys().collect::<Vec<_>>(),
        vec!["b"]
    );
}
