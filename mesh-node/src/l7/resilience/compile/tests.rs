//! The `TrafficPolicy` contract: what compiles to what, and that every rejection names its
//! field.

use serde_json::{Value, json};

use super::*;
use crate::l7::resilience::crd_yaml;

fn full() -> Value {
    json!({
        "targetRefs": [{"group": "", "kind": "Service", "name": "reviews"}],
        "retries": {
            "attempts": 3,
            "perTryTimeout": "500ms",
            "retryOn": ["5xx", "gateway-error", "connect-failure", "reset", "retriable-status-codes"],
            "retriableStatusCodes": [409],
            "budget": {"percent": 20, "minRetriesPerSecond": 10}
        },
        "connectionPool": {"maxConnections": 100, "maxPendingRequests": 64, "maxRequests": 1024},
        "outlierDetection": {
            "consecutiveErrors": 5, "interval": "10s", "baseEjectionTime": "30s", "maxEjectionPercent": 50
        },
        "fault": {"delay": {"fixedDelay": "2s", "percent": 10}, "abort": {"httpStatus": 503, "percent": 5}},
        "rateLimit": {"requestsPerSecond": 100, "burst": 200, "per": "source"}
    })
}

fn compile(spec: &Value) -> Result<Resilience, TrafficPolicyError> {
    TrafficPolicy::compile("shop", "resilient", Some(4), spec)
}

/// `full()` with `value` at the JSON pointer `at` (`null` removes the field).
fn with(at: &str, value: Value) -> Value {
    let mut spec = full();
    let (parent, key) = at.rsplit_once('/').expect("a pointer with a parent");
    let object = spec
        .pointer_mut(parent)
        .and_then(Value::as_object_mut)
        .expect("the parent is an object");
    if value.is_null() {
        object.remove(key);
    } else {
        object.insert(key.into(), value);
    }
    spec
}

/// The rejection of `spec`, checked to start with `path`.
fn rejected_at(spec: &Value, path: &str) -> TrafficPolicyError {
    let error = compile(spec).expect_err("the spec is rejected");
    let message = error.to_string();
    assert!(
        message.starts_with(&format!("{path}: ")),
        "expected the message to name {path}: {message}"
    );
    assert_eq!(error.path(), path);
    error
}

#[test]
fn the_full_example_compiles_to_every_section() {
    let r = compile(&full()).expect("the example is valid");
    assert_eq!(r.id.to_string(), "shop/resilient");
    assert_eq!(r.generation, Some(4));
    assert_eq!(r.targets, ["reviews"]);

    let retries = r.retries.expect("retries");
    assert_eq!(retries.attempts, 3);
    assert_eq!(retries.per_try_timeout, Some(Duration::from_millis(500)));
    assert_eq!(
        retries.retry_on,
        RetryOn {
            server_error: true,
            gateway_error: true,
            connect_failure: true,
            reset: true,
            retriable_status_codes: true,
        }
    );
    assert_eq!(retries.retriable_status_codes, [StatusCode::CONFLICT]);
    assert_eq!(
        retries.budget,
        BudgetLimits {
            percent: 20,
            min_retries_per_second: 10
        }
    );
    assert_eq!(
        r.connection_pool,
        Some(PoolLimits {
            max_connections: Some(100),
            max_pending_requests: 64,
            max_requests: Some(1024),
        })
    );
    assert_eq!(
        r.outlier_detection,
        Some(OutlierPolicy {
            consecutive_errors: 5,
            interval: Duration::from_secs(10),
            base_ejection_time: Duration::from_secs(30),
            max_ejection_percent: 50,
        })
    );
    assert_eq!(
        r.fault,
        Some(FaultPolicy {
            delay: Some(DelayFault {
                delay: Duration::from_secs(2),
                percent: 10
            }),
            abort: Some(AbortFault {
                status: StatusCode::SERVICE_UNAVAILABLE,
                percent: 5
            }),
        })
    );
    assert_eq!(
        r.rate_limit,
        Some(RateLimitPolicy {
            requests_per_second: 100,
            burst: 200,
            per: RateLimitKey::Source,
        })
    );
}

#[test]
fn absent_fields_take_the_documented_defaults() {
    let r = compile(&json!({
        "targetRefs": [{"kind": "Service", "name": "reviews"}, {"name": "reviews"}],
        "retries": {"attempts": 1},
        "connectionPool": {},
        "outlierDetection": {},
        "rateLimit": {"requestsPerSecond": 5}
    }))
    .expect("valid");
    assert_eq!(
        r.targets,
        ["reviews"],
        "kind defaults to Service; duplicates collapse"
    );
    let retries = r.retries.expect("retries");
    assert_eq!(retries.per_try_timeout, None);
    assert_eq!(
        retries.retry_on,
        RetryOn {
            connect_failure: true,
            reset: true,
            gateway_error: true,
            ..RetryOn::default()
        }
    );
    assert_eq!(retries.budget, BudgetLimits::default());
    assert_eq!(r.connection_pool, Some(PoolLimits::default()));
    assert_eq!(r.outlier_detection, Some(OutlierPolicy::default()));
    assert_eq!(
        r.rate_limit,
        Some(RateLimitPolicy {
            requests_per_second: 5,
            burst: 5,
            per: RateLimitKey::Route
        })
    );
    assert_eq!(r.fault, None);
}

#[test]
fn rejections_name_the_field() {
    let cases = [
        (
            with("/retries/attempts", json!(11)),
            "spec.retries.attempts",
        ),
        (
            with("/retries/attempts", Value::Null),
            "spec.retries.attempts",
        ),
        (
            with("/retries/attempts", json!("three")),
            "spec.retries.attempts",
        ),
        (
            with("/retries/attempts", json!(-1)),
            "spec.retries.attempts",
        ),
        (
            with("/retries/perTryTimeout", json!("0.5s")),
            "spec.retries.perTryTimeout",
        ),
        (
            with("/retries/perTryTimeout", json!("0s")),
            "spec.retries.perTryTimeout",
        ),
        (
            with("/retries/perTryTimeout", json!("2h")),
            "spec.retries.perTryTimeout",
        ),
        (
            with("/retries/retryOn", json!(["5xx", "4xx"])),
            "spec.retries.retryOn[1]",
        ),
        (with("/retries/retryOn", json!([])), "spec.retries.retryOn"),
        (
            with("/retries/retriableStatusCodes", json!([200])),
            "spec.retries.retriableStatusCodes[0]",
        ),
        (
            with("/retries/retriableStatusCodes", json!([70000])),
            "spec.retries.retriableStatusCodes[0]",
        ),
        (
            with("/retries/retriableStatusCodes", Value::Null),
            "spec.retries.retriableStatusCodes",
        ),
        (
            with("/retries/retryOn", json!(["5xx"])),
            "spec.retries.retriableStatusCodes",
        ),
        (
            with("/retries/budget/percent", json!(101)),
            "spec.retries.budget.percent",
        ),
        (
            with("/retries/budget/minRetriesPerSecond", json!(1_000_000)),
            "spec.retries.budget.minRetriesPerSecond",
        ),
        (
            with("/connectionPool/maxConnections", json!(0)),
            "spec.connectionPool.maxConnections",
        ),
        (
            with("/connectionPool/maxRequests", json!(2_000_000)),
            "spec.connectionPool.maxRequests",
        ),
        (
            with("/connectionPool/maxPendingRequests", json!(1_000_000)),
            "spec.connectionPool.maxPendingRequests",
        ),
        (
            with("/outlierDetection/consecutiveErrors", json!(0)),
            "spec.outlierDetection.consecutiveErrors",
        ),
        (
            with("/outlierDetection/interval", json!("10")),
            "spec.outlierDetection.interval",
        ),
        (
            with("/outlierDetection/baseEjectionTime", json!("1d")),
            "spec.outlierDetection.baseEjectionTime",
        ),
        (
            with("/outlierDetection/maxEjectionPercent", json!(150)),
            "spec.outlierDetection.maxEjectionPercent",
        ),
        (
            with("/fault/delay/percent", Value::Null),
            "spec.fault.delay.percent",
        ),
        (
            with("/fault/delay/percent", json!(101)),
            "spec.fault.delay.percent",
        ),
        (
            with("/fault/delay/fixedDelay", Value::Null),
            "spec.fault.delay.fixedDelay",
        ),
        (
            with("/fault/abort/httpStatus", json!(200)),
            "spec.fault.abort.httpStatus",
        ),
        (
            with("/fault/abort/httpStatus", Value::Null),
            "spec.fault.abort.httpStatus",
        ),
        (
            with("/fault/abort/percent", json!(-5)),
            "spec.fault.abort.percent",
        ),
        (with("/fault", json!({})), "spec.fault"),
        (
            with("/rateLimit/requestsPerSecond", json!(0)),
            "spec.rateLimit.requestsPerSecond",
        ),
        (
            with("/rateLimit/requestsPerSecond", Value::Null),
            "spec.rateLimit.requestsPerSecond",
        ),
        (with("/rateLimit/burst", json!(0)), "spec.rateLimit.burst"),
        (
            with("/rateLimit/per", json!("client")),
            "spec.rateLimit.per",
        ),
        (with("/targetRefs", json!([])), "spec.targetRefs"),
        (
            with(
                "/targetRefs",
                json!([{"kind": "Deployment", "name": "reviews"}]),
            ),
            "spec.targetRefs[0].kind",
        ),
        (
            with(
                "/targetRefs",
                json!([{"group": "apps", "kind": "Service", "name": "reviews"}]),
            ),
            "spec.targetRefs[0].group",
        ),
        (
            with(
                "/targetRefs",
                json!([{"kind": "Service", "name": "Reviews"}]),
            ),
            "spec.targetRefs[0].name",
        ),
        (
            with("/targetRefs", json!([{"kind": "Service", "name": ""}])),
            "spec.targetRefs[0].name",
        ),
        (with("/targetRefs", json!("reviews")), "spec.targetRefs"),
        (
            with("/targetRefs", json!([{"kind": "Service"}])),
            "spec.targetRefs[0]",
        ),
        (with("/retries", json!([3])), "spec.retries"),
    ];
    for (spec, path) in cases {
        let error = rejected_at(&spec, path);
        assert_eq!(error.reason(), "Invalid", "{error}");
    }
}

#[test]
fn too_many_targets_are_rejected() {
    let refs: Vec<Value> = (0..=MAX_TARGETS)
        .map(|i| json!({"kind": "Service", "name": format!("s{i}")}))
        .collect();
    rejected_at(&with("/targetRefs", json!(refs)), "spec.targetRefs");
}

#[test]
fn unknown_fields_reject_the_object_as_unsupported() {
    for (spec, path) in [
        (with("/timeout", json!("1s")), "spec.timeout"),
        (with("/retries/atempts", json!(2)), "spec.retries.atempts"),
        (
            with("/retries/budget/ttl", json!("10s")),
            "spec.retries.budget.ttl",
        ),
        (
            with("/connectionPool/http2", json!(true)),
            "spec.connectionPool.http2",
        ),
        (
            with("/outlierDetection/consecutive5xx", json!(1)),
            "spec.outlierDetection.consecutive5xx",
        ),
        (
            with("/fault/delay/exponentialDelay", json!("1s")),
            "spec.fault.delay.exponentialDelay",
        ),
        (
            with("/fault/abort/grpcStatus", json!(14)),
            "spec.fault.abort.grpcStatus",
        ),
        (
            with("/rateLimit/perHost", json!(true)),
            "spec.rateLimit.perHost",
        ),
        (
            with(
                "/targetRefs",
                json!([{"kind": "Service", "name": "a", "namespace": "b"}]),
            ),
            "spec.targetRefs[0].namespace",
        ),
    ] {
        assert_eq!(rejected_at(&spec, path).reason(), "Unsupported");
    }
}

#[test]
fn metadata_and_an_absent_spec() {
    assert_eq!(
        TrafficPolicy::compile("", "p", None, &full()),
        Err(TrafficPolicyError::MissingMetadata("namespace"))
    );
    assert_eq!(
        TrafficPolicy::compile("shop", "", None, &full()),
        Err(TrafficPolicyError::MissingMetadata("name"))
    );
    rejected_at(&Value::Null, "spec.targetRefs");
    rejected_at(&json!("a string"), "spec");
}

#[test]
fn durations_follow_the_gateway_api_syntax() {
    let ms = Duration::from_millis;
    for (text, expected) in [
        ("500ms", Some(ms(500))),
        ("2s", Some(ms(2000))),
        ("1m", Some(ms(60_000))),
        ("1h", Some(ms(3_600_000))),
        ("1m30s", Some(ms(90_000))),
        ("1h1m1s1ms", Some(ms(3_661_001))),
        ("99999ms", Some(ms(99_999))),
        ("0s", Some(Duration::ZERO)),
        ("", None),
        ("1", None),
        ("s", None),
        ("1.5s", None),
        ("-1s", None),
        ("1d", None),
        ("1us", None),
        (" 1s", None),
        ("1S", None),
        ("100000ms", None),
        ("1h1m1s1ms1h", None),
        ("1m s", None),
    ] {
        assert_eq!(parse_duration(text), expected, "{text:?}");
    }
}

#[test]
fn the_accepted_condition_reports_the_field() {
    let ok = condition(&compile(&full()), Some(4));
    assert_eq!(
        (ok.type_.as_str(), ok.status.as_str(), ok.reason.as_str()),
        ("Accepted", "True", "Accepted")
    );
    assert_eq!(ok.observed_generation, Some(4));
    let bad = condition(&compile(&with("/retries/attempts", json!(50))), Some(5));
    assert_eq!(
        (bad.status.as_str(), bad.reason.as_str()),
        ("False", "Invalid")
    );
    assert!(
        bad.message
            .starts_with("rejected: spec.retries.attempts: 50 is out of range (0 to 10)"),
        "{}",
        bad.message
    );
    assert_eq!(bad.observed_generation, Some(5));
}

#[test]
fn the_generated_crd_describes_the_resource() {
    let yaml = crd_yaml().expect("the CRD serialises");
    assert!(yaml.starts_with("---\n"));
    let crd: Value = serde_saphyr::from_str(yaml.trim_start_matches("---\n")).expect("YAML");
    assert_eq!(crd["kind"], "CustomResourceDefinition");
    assert_eq!(
        crd["metadata"]["name"],
        "trafficpolicies.traffic.trellis.dev"
    );
    assert_eq!(crd["spec"]["scope"], "Namespaced");
    assert_eq!(crd["spec"]["names"]["kind"], "TrafficPolicy");
    let version = &crd["spec"]["versions"][0];
    assert_eq!(version["name"], "v1");
    assert_eq!(version["subresources"]["status"], json!({}));
    let schema = &version["schema"]["openAPIV3Schema"]["properties"];
    let spec = &schema["spec"];
    assert_eq!(spec["x-kubernetes-preserve-unknown-fields"], true);
    let props = &spec["properties"];
    for (section, fields) in [
        (
            "retries",
            &[
                "attempts",
                "perTryTimeout",
                "retryOn",
                "retriableStatusCodes",
                "budget",
            ][..],
        ),
        (
            "connectionPool",
            &["maxConnections", "maxPendingRequests", "maxRequests"],
        ),
        (
            "outlierDetection",
            &[
                "consecutiveErrors",
                "interval",
                "baseEjectionTime",
                "maxEjectionPercent",
            ],
        ),
        ("fault", &["delay", "abort"]),
        ("rateLimit", &["requestsPerSecond", "burst", "per"]),
    ] {
        for field in fields {
            assert!(
                props[section]["properties"][field].is_object(),
                "spec.{section}.{field} is in the schema"
            );
        }
    }
    let target = &props["targetRefs"]["items"];
    for field in ["group", "kind", "name"] {
        assert!(
            target["properties"][field].is_object(),
            "targetRefs[].{field}"
        );
    }
    assert_eq!(target["required"], json!(["name"]));
    // The API server refuses a CRD whose default is not one of the field's enum values.
    let kind = &target["properties"]["kind"];
    assert_eq!(
        (&kind["default"], &kind["enum"]),
        (&json!("Service"), &json!(["Service"]))
    );
    assert_eq!(
        props["retries"]["properties"]["budget"]["properties"]["minRetriesPerSecond"]["type"],
        "integer"
    );
    assert_eq!(
        props["fault"]["properties"]["abort"]["properties"]["httpStatus"]["type"],
        "integer"
    );
    assert_eq!(
        props["rateLimit"]["properties"]["per"]["enum"],
        json!(["route", "source"])
    );
    assert_eq!(
        props["retries"]["properties"]["retryOn"]["items"]["enum"],
        json!([
            "5xx",
            "gateway-error",
            "connect-failure",
            "reset",
            "retriable-status-codes"
        ])
    );
    let pattern = &props["outlierDetection"]["properties"]["interval"]["pattern"];
    assert!(
        pattern.is_string(),
        "durations carry their syntax: {pattern}"
    );
    assert!(
        schema["status"]["properties"]["conditions"].is_object(),
        "status.conditions"
    );
}
