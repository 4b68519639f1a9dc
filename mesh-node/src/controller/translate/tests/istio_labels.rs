//! Istio's labels and waypoint class through the whole translation, switched on and off: the
//! rules themselves are in `labels/tests.rs`, these prove every reader uses them (pods,
//! Services, namespaces' waypoint checks, Gateways).

use super::{
    waypoint::{gateway, rejections, service, service_waypoint, waypoint_of, waypoint_pod},
    *,
};
use crate::k8s::{ISTIO_DATAPLANE_MODE_LABEL, ISTIO_USE_WAYPOINT_LABEL, ISTIO_WAYPOINT_CLASS};

fn with_istio(on: bool) -> TranslateSettings {
    TranslateSettings {
        istio_labels: on,
        ..settings()
    }
}

/// A namespace `ambient` enrolled by Istio's labels alone, its waypoint of Istio's class named
/// by Istio's label; a Trellis namespace whose pods carry Istio labels.
fn objects() -> ClusterObjects {
    let mut o = base();
    apply(
        &mut o,
        serde_json::json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "ambient",
            "labels": {ISTIO_DATAPLANE_MODE_LABEL: "ambient", ISTIO_USE_WAYPOINT_LABEL: "wp"}}}),
    );
    apply(&mut o, gateway("ambient", "wp", ISTIO_WAYPOINT_CLASS));
    apply(
        &mut o,
        waypoint_pod("ambient", "wp-0", "wp", "wp", "node-a", "10.1.0.100"),
    );
    apply(
        &mut o,
        pod("ambient", "web", Some("node-a"), Some("10.1.0.1")),
    );
    let mut out = pod("ambient", "out", Some("node-a"), Some("10.1.0.2"));
    out["metadata"]["labels"][ISTIO_DATAPLANE_MODE_LABEL] = "none".into();
    apply(&mut o, out);
    // Trellis's label wins on the same pod: `none` from Istio does not take it out.
    let mut both = pod("ambient", "both", Some("node-a"), Some("10.1.0.3"));
    both["metadata"]["labels"][ISTIO_DATAPLANE_MODE_LABEL] = "none".into();
    both["metadata"]["labels"][MESH_LABEL] = "enabled".into();
    apply(&mut o, both);
    apply(&mut o, service("ambient", "web", serde_json::json!({})));
    apply(
        &mut o,
        service(
            "ambient",
            "direct",
            serde_json::json!({ISTIO_USE_WAYPOINT_LABEL: NO_WAYPOINT}),
        ),
    );
    // A pod enrolled on its own, in a namespace that is not.
    let mut lone = pod("plain", "lone", Some("node-b"), Some("10.0.1.9"));
    lone["metadata"]["labels"][ISTIO_DATAPLANE_MODE_LABEL] = "ambient".into();
    apply(&mut o, lone);
    o
}

#[test]
fn switched_on_istios_labels_enroll_and_choose_waypoints() {
    let t = translate(&objects(), &with_istio(true));
    let enrolled = |uid: &str| workload(&t, uid).map(|w| w.enrolled);
    assert_eq!(enrolled("uid-ambient-web"), Some(true));
    assert_eq!(
        enrolled("uid-ambient-out"),
        Some(false),
        "dataplane-mode=none"
    );
    assert_eq!(
        enrolled("uid-ambient-both"),
        Some(true),
        "Trellis's label wins"
    );
    assert_eq!(
        enrolled("uid-plain-lone"),
        Some(true),
        "a pod's own ambient"
    );
    assert_eq!(
        enrolled("uid-ambient-wp-0"),
        Some(false),
        "a waypoint's pod"
    );

    assert!(
        waypoint_of(&t, "ambient", "wp").is_some(),
        "istio-waypoint is a waypoint"
    );
    let waypoint = |uid: &str| workload(&t, uid).map(|w| w.waypoint.clone());
    assert_eq!(waypoint("uid-ambient-web").as_deref(), Some("ambient/wp"));
    assert_eq!(
        service_waypoint(&t, "ambient", "web").as_deref(),
        Some("ambient/wp")
    );
    assert_eq!(
        service_waypoint(&t, "ambient", "direct").as_deref(),
        Some(""),
        "istio.io/use-waypoint=none"
    );
    assert!(rejections(&t).is_empty(), "{:?}", t.rejected);
}

#[test]
fn switched_off_istios_labels_and_class_are_left_to_istio() {
    let t = translate(&objects(), &with_istio(false));
    for uid in [
        "uid-ambient-web",
        "uid-ambient-out",
        "uid-ambient-both",
        "uid-plain-lone",
    ] {
        assert_eq!(workload(&t, uid).map(|w| w.enrolled), Some(false), "{uid}");
    }
    assert!(
        waypoint_of(&t, "ambient", "wp").is_none(),
        "Istio's Gateway"
    );
    assert_eq!(service_waypoint(&t, "ambient", "web").as_deref(), Some(""));
    assert!(rejections(&t).is_empty(), "{:?}", t.rejected);
}

#[test]
fn a_missing_waypoint_names_both_labels_when_both_are_read() {
    let mut o = objects();
    o.remove(crate::controller::objects::Kind::Gateway, "ambient/wp");
    let t = translate(&o, &with_istio(true));
    let reason = &rejections(&t)["Namespace ambient"];
    assert!(
        reason.contains(ISTIO_USE_WAYPOINT_LABEL) && reason.contains(ISTIO_WAYPOINT_CLASS),
        "{reason}"
    );
    assert_eq!(
        workload(&t, "uid-ambient-web")
            .map(|w| w.waypoint.clone())
            .as_deref(),
        Some(""),
        "traffic goes directly"
    );
}
