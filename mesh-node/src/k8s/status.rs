//! The status shape the mesh writes on its custom resources and routes: one `Accepted`
//! [`Condition`] (the fields of `metav1.Condition`) in [`PolicyStatus`]. What each condition
//! says is decided by the kind's owner (`policy::status`, `l7`).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub const ACCEPTED: &str = "Accepted";

/// The `status` of both policy kinds.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyStatus {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// A status condition (the fields of `metav1.Condition`).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    pub reason: String,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// RFC 3339; changes only when `status` does.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub last_transition_time: String,
}
