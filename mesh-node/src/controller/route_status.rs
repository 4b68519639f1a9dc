//! Reports how the waypoints take each HTTPRoute and GRPCRoute: in the controller's log (both
//! sources) and, with the Kubernetes source, in the route's `status.parents`, one entry per
//! parent the waypoints serve (`controllerName: trellis.dev/waypoint`, conditions `Accepted`
//! and `ResolvedRefs`; see [`crate::l7::route::status`]). The entries are the ones
//! [`super::translate`] derived with the waypoints' own route conversion.
//!
//! **Why a read before each write.** The Gateway API declares `status.parents` an atomic list
//! (`+listType=atomic`): the API server keeps it as one value with one owner, so a server-side
//! apply of only this controller's entries would replace the whole list and delete the
//! entries of every other controller serving the same route (a route may name a waypoint and
//! another implementation's Gateway). So each write reads the route, keeps the other
//! controllers' entries (and the transition times of our conditions whose status holds), and
//! applies the whole list with server-side apply (field manager [`FIELD_MANAGER`]) and the
//! route's `resourceVersion` as a precondition: if anyone wrote in between, the API server
//! answers 409 Conflict and the write is retried later on a fresh read, never over their
//! entry. A route whose status already holds exactly these entries is not written, so a
//! restarted controller rewrites nothing.
//!
//! A route's entries are written when they change (and once when the controller first sees
//! the route, to remove entries a previous run left for parents it no longer serves); failed
//! writes are retried on a timer.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

use kube::{
    Api, Client,
    api::{ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams},
};
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::{
    Published,
    policy_status::{FIELD_MANAGER, RETRY},
};
use crate::{
    k8s::{GATEWAY_API_VERSION, gateway::ParentReference},
    l7::route::{ParentStatus, RouteId, RouteKind, RouteStatus},
    policy::status::rfc3339,
};

/// Follows the published state until `stop`; `client` is `None` with the directory source.
pub async fn run(
    client: Option<Client>,
    mut state: watch::Receiver<Option<Arc<Published>>>,
    stop: CancellationToken,
) {
    // Each route's entries as last derived (and logged), without transition times.
    let mut reported: BTreeMap<RouteId, Vec<ParentStatus>> = BTreeMap::new();
    // Routes whose entries are still to be written to the API server.
    let mut unwritten: BTreeSet<RouteId> = BTreeSet::new();
    loop {
        let published = state.borrow_and_update().clone();
        if let Some(published) = published {
            let current = &published.translation.route_status;
            reported.retain(|id, _| current.contains_key(id));
            unwritten.retain(|id| current.contains_key(id));
            for (id, parents) in current {
                if reported.get(id) == Some(parents) {
                    continue;
                }
                log(id, parents);
                reported.insert(id.clone(), parents.clone());
                if client.is_some() {
                    unwritten.insert(id.clone());
                }
            }
        }
        if let Some(client) = &client {
            let mut failed = BTreeSet::new();
            for id in std::mem::take(&mut unwritten) {
                let Some(parents) = reported.get(&id) else {
                    continue;
                };
                if let Err(e) = write(client, &id, parents).await {
                    tracing::warn!(route = %id, error = %e, "cannot write the route status; retrying");
                    failed.insert(id);
                }
            }
            unwritten = failed;
        }
        let retry = async {
            if unwritten.is_empty() {
                std::future::pending::<()>().await;
            }
            tokio::time::sleep(RETRY).await;
        };
        tokio::select! {
            () = stop.cancelled() => return,
            () = retry => {}
            changed = state.changed() => if changed.is_err() { return },
        }
    }
}

/// `Gateway shop/waypoint`, `Service shop/web:8080`: a parent reference for log lines.
fn describe(parent: &ParentReference, route_namespace: &str) -> String {
    let kind = parent.kind.as_deref().unwrap_or("Gateway");
    let namespace = parent.namespace.as_deref().unwrap_or(route_namespace);
    let mut out = format!("{kind} {namespace}/{}", parent.name);
    if let Some(section) = &parent.section_name {
        out.push('/');
        out.push_str(section);
    }
    if let Some(port) = parent.port {
        out.push_str(&format!(":{port}"));
    }
    out
}

fn log(id: &RouteId, parents: &[ParentStatus]) {
    if parents.is_empty() {
        tracing::debug!(route = %id, "no parent of this route is served by a waypoint");
    }
    for parent in parents {
        let name = describe(&parent.parent_ref, &id.namespace);
        let problems: Vec<_> = parent
            .conditions
            .iter()
            .filter(|c| c.status != "True")
            .collect();
        let generation = parent
            .conditions
            .first()
            .and_then(|c| c.observed_generation);
        if problems.is_empty() {
            tracing::info!(route = %id, parent = %name, ?generation, "route accepted");
        }
        for c in problems {
            tracing::warn!(
                route = %id, parent = %name, ?generation,
                condition = %c.type_, reason = %c.reason, message = %c.message,
                "route not served as written"
            );
        }
    }
}

fn api(client: &Client, id: &RouteId) -> Api<DynamicObject> {
    let (group, version) = GATEWAY_API_VERSION
        .split_once('/')
        .unwrap_or(("", GATEWAY_API_VERSION));
    let plural = match id.kind {
        RouteKind::Http => "httproutes",
        RouteKind::Grpc => "grpcroutes",
        // Reported by `policy_status` (one `Accepted` condition), never here.
        RouteKind::Virtual => "virtualservices",
    };
    let resource = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk(group, version, id.kind.as_str()),
        plural,
    );
    Api::namespaced_with(client.clone(), &id.namespace, &resource)
}

/// The `parents` of a route's `status` (`[]` when it has none).
fn parents_of(status: Option<&Value>) -> Value {
    status
        .and_then(|s| s.get("parents"))
        .cloned()
        .unwrap_or_else(|| json!([]))
}

/// Reads the route and applies its `status` with `parents` as our entries, unless it already
/// says exactly that. A route that no longer exists needs nothing.
async fn write(client: &Client, id: &RouteId, parents: &[ParentStatus]) -> Result<(), kube::Error> {
    let api = api(client, id);
    let Some(route) = api.get_opt(&id.name).await? else {
        return Ok(());
    };
    let previous = route.data.get("status");
    let now = rfc3339(time::OffsetDateTime::now_utc());
    let status = RouteStatus {
        parents: parents.to_vec(),
    }
    .to_status_json(previous, &now);
    if parents_of(previous) == parents_of(Some(&status)) {
        return Ok(());
    }
    let patch = json!({
        "apiVersion": GATEWAY_API_VERSION,
        "kind": id.kind.as_str(),
        "metadata": {
            "name": id.name,
            "namespace": id.namespace,
            // A precondition: the list is replaced whole, so it must be the one just read.
            "resourceVersion": route.metadata.resource_version,
        },
        "status": status,
    });
    let params = PatchParams::apply(FIELD_MANAGER).force();
    api.patch_status(&id.name, &params, &Patch::Apply(&patch))
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests;
