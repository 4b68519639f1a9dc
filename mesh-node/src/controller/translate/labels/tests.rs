//! Every combination of Trellis and Istio labels on a namespace and a pod, with the switch on
//! and off, checked against the rules of the module docs one by one.

use super::*;

const TRELLIS_NS: [Option<&str>; 4] = [None, Some("enabled"), Some("disabled"), Some("Enabled")];
const TRELLIS_POD: [Option<&str>; 4] = [None, Some("enabled"), Some("disabled"), Some("Disabled")];
const ISTIO_MODE: [Option<&str>; 4] = [None, Some("ambient"), Some("none"), Some("Ambient")];

fn labels(trellis: Option<&str>, istio: Option<&str>) -> Labels {
    let mut l = Labels::new();
    if let Some(v) = trellis {
        l.insert(MESH_LABEL.into(), v.into());
    }
    if let Some(v) = istio {
        l.insert(ISTIO_DATAPLANE_MODE_LABEL.into(), v.into());
    }
    l
}

/// Calls `f(ns_trellis, ns_istio, pod_trellis, pod_istio)` for every combination.
fn every(mut f: impl FnMut(Option<&str>, Option<&str>, Option<&str>, Option<&str>)) {
    for nt in TRELLIS_NS {
        for ni in ISTIO_MODE {
            for pt in TRELLIS_POD {
                for pi in ISTIO_MODE {
                    f(nt, ni, pt, pi);
                }
            }
        }
    }
}

fn enrolled(
    reader: LabelReader,
    nt: Option<&str>,
    ni: Option<&str>,
    pt: Option<&str>,
    pi: Option<&str>,
) -> bool {
    reader.pod_enrolled(Some(&labels(pt, pi)), Some(&labels(nt, ni)))
}

const OFF: LabelReader = LabelReader { istio: false };
const ON: LabelReader = LabelReader { istio: true };

#[test]
fn switched_off_only_trellis_labels_count() {
    every(|nt, ni, pt, pi| {
        let expected = nt == Some("enabled") && pt != Some("disabled");
        assert_eq!(
            enrolled(OFF, nt, ni, pt, pi),
            expected,
            "ns {nt:?}/{ni:?} pod {pt:?}/{pi:?}"
        );
        assert_eq!(
            OFF.namespace_enrolled(Some(&labels(nt, ni))),
            nt == Some("enabled")
        );
    });
}

#[test]
fn switched_on_istio_labels_alone_follow_istio() {
    for ni in ISTIO_MODE {
        for pi in ISTIO_MODE {
            let expected = match pi {
                Some("ambient") => true,
                Some("none") => false,
                _ => ni == Some("ambient"),
            };
            assert_eq!(
                enrolled(ON, None, ni, None, pi),
                expected,
                "ns {ni:?} pod {pi:?}"
            );
        }
        assert_eq!(
            ON.namespace_enrolled(Some(&labels(None, ni))),
            ni == Some("ambient"),
            "exact values only"
        );
    }
}

#[test]
fn switched_on_a_trellis_label_hides_the_istio_label_on_the_same_object() {
    every(|nt, ni, pt, pi| {
        let got = enrolled(ON, nt, ni, pt, pi);
        if nt.is_some() {
            assert_eq!(
                got,
                enrolled(ON, nt, None, pt, pi),
                "ns {nt:?}/{ni:?} pod {pt:?}/{pi:?}"
            );
        }
        if pt.is_some() {
            assert_eq!(
                got,
                enrolled(ON, nt, ni, pt, None),
                "ns {nt:?}/{ni:?} pod {pt:?}/{pi:?}"
            );
        }
    });
}

#[test]
fn switched_on_the_pods_own_word_beats_its_namespaces() {
    every(|nt, ni, pt, pi| {
        let got = enrolled(ON, nt, ni, pt, pi);
        let namespace = ON.namespace_enrolled(Some(&labels(nt, ni)));
        let expected = match (pt, pi) {
            (Some("disabled"), _) => false,
            (Some(_), _) => namespace,
            (None, Some("ambient")) => true,
            (None, Some("none")) => false,
            (None, _) => namespace,
        };
        assert_eq!(got, expected, "ns {nt:?}/{ni:?} pod {pt:?}/{pi:?}");
    });
}

#[test]
fn an_object_without_labels_is_out() {
    for reader in [ON, OFF] {
        assert!(!reader.namespace_enrolled(None));
        assert!(!reader.pod_enrolled(None, None));
        assert_eq!(reader.use_waypoint(None), None);
    }
}

#[test]
fn use_waypoint_every_combination() {
    let values = [None, Some("wp"), Some("none"), Some("other")];
    for trellis in values {
        for istio in values {
            let mut l = Labels::new();
            if let Some(v) = trellis {
                l.insert(USE_WAYPOINT_LABEL.into(), v.into());
            }
            if let Some(v) = istio {
                l.insert(ISTIO_USE_WAYPOINT_LABEL.into(), v.into());
            }
            let on = ON.use_waypoint(Some(&l));
            let off = OFF.use_waypoint(Some(&l));
            assert_eq!(off.as_deref(), trellis, "off: only Trellis's label");
            assert_eq!(
                on.as_deref(),
                trellis.or(istio),
                "on: Trellis's, else Istio's"
            );
        }
    }
}

#[test]
fn the_istio_class_is_a_waypoint_only_when_switched_on() {
    assert!(OFF.is_waypoint_class(Some(WAYPOINT_CLASS)));
    assert!(ON.is_waypoint_class(Some(WAYPOINT_CLASS)));
    assert!(!OFF.is_waypoint_class(Some(ISTIO_WAYPOINT_CLASS)));
    assert!(ON.is_waypoint_class(Some(ISTIO_WAYPOINT_CLASS)));
    for reader in [ON, OFF] {
        assert!(!reader.is_waypoint_class(None));
        assert!(!reader.is_waypoint_class(Some("istio")));
        assert!(!reader.is_waypoint_class(Some("Istio-Waypoint")));
    }
}
