//! The `l7` server against the `requests` and `grpc` clients, in one process on loopback,
//! through the same command-line parsing and dispatch as the binary.

use std::{net::SocketAddr, time::Duration};

use clap::Parser;
use serde_json::{Value, json};

use crate::{Cli, run, server};

const TIMEOUT: Duration = Duration::from_secs(10);

/// Runs `pod-app ARGS...` and returns its JSON and exit status (0, 1, or 2 for an error).
async fn pod_app(args: &[&str]) -> (Value, u8) {
    let cli = Cli::try_parse_from(std::iter::once("pod-app").chain(args.iter().copied()))
        .expect("arguments parse");
    match run(cli.command, TIMEOUT).await {
        Ok((v, true)) => (v, 0),
        Ok((v, false)) => (v, 1),
        Err(e) => (json!({"error": format!("{e:#}")}), 2),
    }
}

async fn server() -> (SocketAddr, String) {
    let addr = server::spawn_l7("srv", TIMEOUT).await.expect("l7 server");
    (addr, addr.to_string())
}

#[tokio::test]
async fn http1_requests_share_keep_alive_connections() {
    let (_, to) = server().await;
    let (v, code) = pod_app(&[
        "requests",
        "--to",
        &to,
        "--path",
        "/hello?x=1",
        "--count",
        "6",
        "--concurrency",
        "2",
        "--header",
        "X-Test: yes",
    ])
    .await;
    assert_eq!(code, 0, "{v}");
    assert_eq!(v["sent"], 6, "{v}");
    assert_eq!(v["statuses"], json!({"200": 6}), "{v}");
    assert_eq!(v["servers"], json!({"srv": 6}), "{v}");
    assert_eq!(v["errors"], 0, "{v}");
    assert_eq!(v["connections"], 2, "{v}");
    let body = &v["last"]["body"];
    assert_eq!(body["version"], "HTTP/1.1", "{v}");
    assert_eq!(body["path"], "/hello?x=1", "{v}");
    assert_eq!(body["method"], "GET", "{v}");
    assert_eq!(body["headers"]["x-test"], "yes", "{v}");
    assert_eq!(body["headers"]["host"], to.as_str(), "{v}");
    assert_eq!(body["body_bytes"], 0, "{v}");
    assert_eq!(v["last"]["headers"]["content-type"], "application/json");
}

#[tokio::test]
async fn http2_requests_share_one_connection() {
    let (_, to) = server().await;
    let (v, code) = pod_app(&[
        "requests",
        "--to",
        &to,
        "--http2",
        "--count",
        "8",
        "--concurrency",
        "4",
        "--method",
        "POST",
        "--body-bytes",
        "100K",
        "--header",
        "host: example.test",
    ])
    .await;
    assert_eq!(code, 0, "{v}");
    assert_eq!(v["statuses"], json!({"200": 8}), "{v}");
    assert_eq!(v["connections"], 1, "{v}");
    let body = &v["last"]["body"];
    assert_eq!(body["version"], "HTTP/2.0", "{v}");
    assert_eq!(body["method"], "POST", "{v}");
    assert_eq!(body["body_bytes"], 100 * 1024, "{v}");
    assert_eq!(body["authority"], "example.test", "{v}");
}

#[tokio::test]
async fn paths_pick_the_answer() {
    let (_, to) = server().await;
    let run = |path: &'static str, count: &'static str, http2: bool| {
        let to = to.clone();
        async move {
            let mut args = vec!["requests", "--to", &to, "--path", path, "--count", count];
            if http2 {
                args.push("--http2");
            }
            let (v, code) = pod_app(&args).await;
            assert_eq!(code, 0, "{v}");
            v
        }
    };
    let v = run("/status/418", "1", false).await;
    assert_eq!(v["statuses"], json!({"418": 1}), "{v}");
    let v = run("/status/204", "2", true).await;
    assert_eq!(v["statuses"], json!({"204": 2}), "{v}");
    let v = run("/status/99", "1", false).await;
    assert_eq!(v["statuses"], json!({"400": 1}), "{v}");
    assert!(v["last"]["body"]["error"].is_string(), "{v}");

    let v = run("/flaky/k/3", "2", false).await;
    assert_eq!(v["statuses"], json!({"503": 2}), "{v}");
    let v = run("/flaky/k/3", "3", true).await;
    assert_eq!(v["statuses"], json!({"503": 1, "200": 2}), "{v}");
    assert_eq!(v["last"]["body"]["attempt"], 5, "{v}");

    let started = std::time::Instant::now();
    let v = run("/delay/200", "1", false).await;
    assert_eq!(v["statuses"], json!({"200": 1}), "{v}");
    assert!(started.elapsed() >= Duration::from_millis(200));

    let v = run("/_seen", "1", false).await;
    let seen = &v["last"]["body"];
    assert_eq!(seen["requests"], 10, "{v}");
    assert_eq!(seen["paths"]["/flaky/k/3"], 5, "{v}");
    assert_eq!(seen["paths"]["/delay/200"], 1, "{v}");
    assert!(seen["paths"].get("/_seen").is_none(), "{v}");
}

#[tokio::test]
async fn transport_errors_are_counted() {
    // A port nobody listens on: bind one, note it, close it.
    let to = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").to_string()
    };
    let (v, code) = pod_app(&["requests", "--to", &to, "--count", "3"]).await;
    assert_eq!(code, 0, "{v}");
    assert_eq!(v["sent"], 3, "{v}");
    assert_eq!(v["errors"], 3, "{v}");
    assert_eq!(v["statuses"], json!({}), "{v}");
    assert!(
        v["first_error"]
            .as_str()
            .is_some_and(|e| e.contains("connecting")),
        "{v}"
    );
    assert!(v["last"].is_null(), "{v}");
}

#[tokio::test]
async fn grpc_check_and_watch() {
    let (addr, to) = server().await;
    let (v, code) = pod_app(&["grpc", "--to", &to]).await;
    assert_eq!((code, &v["check"]), (0, &json!("SERVING")), "{v}");

    let (v, code) = pod_app(&["grpc", "--to", &to, "--service", "toggle", "--watch", "4"]).await;
    assert_eq!(code, 0, "{v}");
    assert_eq!(v["watched"], 4, "{v}");
    // The status flips every 50 ms, and each message reports a flip (two flips between
    // reads would repeat a status, so only ask that both show up).
    let statuses = v["statuses"].as_array().expect("statuses");
    assert!(statuses.contains(&json!("SERVING")), "{v}");
    assert!(statuses.contains(&json!("NOT_SERVING")), "{v}");

    let (v, code) = pod_app(&["grpc", "--to", &to, "--service", "nope"]).await;
    assert_eq!(code, 2, "{v}");
    let error = v["error"].as_str().expect("error");
    assert!(error.contains("gRPC status NotFound (5)"), "{v}");

    // gRPC calls are counted by `/_seen` like any other request.
    let (v, _) = pod_app(&["requests", "--to", &addr.to_string(), "--path", "/_seen"]).await;
    assert_eq!(
        v["last"]["body"]["paths"]["/grpc.health.v1.Health/Check"], 3,
        "{v}"
    );
}
