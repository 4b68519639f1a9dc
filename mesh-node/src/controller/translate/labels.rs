//! Which labels and class the translation reads, and their precedence: Trellis's own always,
//! Istio's (`istio.io/dataplane-mode`, `istio.io/use-waypoint`, the `istio-waypoint` class)
//! only with the controller's `compatibility.istio_labels` switch, so that Trellis can run
//! beside Istio without taking its pods.
//!
//! Precedence, for membership and for the waypoint alike:
//! - On one object, a Trellis label that is present (whatever its value) decides, and the
//!   Istio label beside it is ignored: an operator who wrote a Trellis label meant Trellis's
//!   answer, and a cluster moving from Istio keeps its old labels while the new ones take
//!   over.
//! - A pod's (or Service's) own label beats its namespace's, as Trellis's labels always did.
//!
//! Membership: a namespace is in the mesh when it says so (`trellis.dev/mesh=enabled`, or
//! `istio.io/dataplane-mode=ambient`); a pod follows its namespace unless its own label says
//! otherwise: `trellis.dev/mesh=disabled` or `istio.io/dataplane-mode=none` take it out, and
//! `istio.io/dataplane-mode=ambient` brings it in even from a namespace that is not (as in
//! Istio). A pod's own `trellis.dev/mesh` of any other value says nothing (Trellis enrolls by
//! namespace), but still hides an Istio label beside it. Values are compared exactly.

use std::collections::BTreeMap;

use crate::k8s::{
    ISTIO_DATAPLANE_AMBIENT, ISTIO_DATAPLANE_MODE_LABEL, ISTIO_DATAPLANE_NONE,
    ISTIO_USE_WAYPOINT_LABEL, ISTIO_WAYPOINT_CLASS, MESH_DISABLED, MESH_ENABLED, MESH_LABEL,
    USE_WAYPOINT_LABEL, WAYPOINT_CLASS,
};

type Labels = BTreeMap<String, String>;

/// The labels the translation reads, decided once from the controller's configuration.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LabelReader {
    /// Whether Istio's labels and waypoint class are read too.
    pub istio: bool,
}

impl LabelReader {
    /// Whether a namespace with `labels` is in the mesh.
    pub fn namespace_enrolled(self, labels: Option<&Labels>) -> bool {
        let Some(labels) = labels else { return false };
        if let Some(value) = labels.get(MESH_LABEL) {
            return value == MESH_ENABLED;
        }
        self.istio_mode(labels).unwrap_or(false)
    }

    /// Whether a pod with `labels` is in the mesh, in a namespace with `namespace_labels`.
    pub fn pod_enrolled(self, labels: Option<&Labels>, namespace_labels: Option<&Labels>) -> bool {
        let own = labels.and_then(|labels| match labels.get(MESH_LABEL) {
            Some(value) => (value == MESH_DISABLED).then_some(false),
            None => self.istio_mode(labels),
        });
        own.unwrap_or_else(|| self.namespace_enrolled(namespace_labels))
    }

    /// What `istio.io/dataplane-mode` says (when read): in, out, or nothing.
    fn istio_mode(self, labels: &Labels) -> Option<bool> {
        if !self.istio {
            return None;
        }
        match labels.get(ISTIO_DATAPLANE_MODE_LABEL).map(String::as_str) {
            Some(ISTIO_DATAPLANE_AMBIENT) => Some(true),
            Some(ISTIO_DATAPLANE_NONE) => Some(false),
            _ => None,
        }
    }

    /// The waypoint one object's own labels name (`none` included), if any.
    pub fn use_waypoint(self, labels: Option<&Labels>) -> Option<String> {
        let labels = labels?;
        labels
            .get(USE_WAYPOINT_LABEL)
            .or_else(|| {
                self.istio
                    .then(|| labels.get(ISTIO_USE_WAYPOINT_LABEL))
                    .flatten()
            })
            .cloned()
    }

    /// Whether a Gateway of `class` is a waypoint.
    pub fn is_waypoint_class(self, class: Option<&str>) -> bool {
        class == Some(WAYPOINT_CLASS) || (self.istio && class == Some(ISTIO_WAYPOINT_CLASS))
    }

    /// The label names the operator may have written for a waypoint, for messages.
    pub fn use_waypoint_labels(self) -> String {
        if self.istio {
            format!("{USE_WAYPOINT_LABEL} (or {ISTIO_USE_WAYPOINT_LABEL})")
        } else {
            USE_WAYPOINT_LABEL.to_owned()
        }
    }

    /// The waypoint classes, for messages.
    pub fn waypoint_classes(self) -> String {
        if self.istio {
            format!("{WAYPOINT_CLASS} or {ISTIO_WAYPOINT_CLASS}")
        } else {
            WAYPOINT_CLASS.to_owned()
        }
    }
}

#[cfg(test)]
mod tests;
