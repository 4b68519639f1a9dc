//! The Kubernetes source: the same objects as the directory source, from a live cluster.
//!
//! One `kube` watcher per kind (list, then watch; re-list when the API server says the watch
//! is too old), each with the default exponential backoff on errors, all merged into one
//! [`Store`]. Objects are stripped on the way in ([`ClusterObjects::apply`]). Nothing is
//! published until every kind has been listed once: a snapshot with pods but no namespaces
//! yet would unenroll every pod for a moment. After that, changes are published at most
//! every [`DEBOUNCE`], so a burst of events becomes one snapshot.
//!
//! The Gateway API kinds, TrafficPolicy and Istio's security kinds (`security.istio.io/v1`)
//! are watched untyped ([`DynamicObject`]) and are
//! [optional](Kind::optional): a cluster without their CRD answers their list with 404, which
//! counts as "listed, none" (so it never holds the other kinds back) and is logged once; the
//! watcher keeps retrying with its backoff, and objects flow in as soon as the CRD is
//! installed. Any other error holds publishing like for every kind.
//!
//! This layer only moves objects; every decision is in [`super::translate`].

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Debug,
    sync::Arc,
    time::Duration,
};

use futures_util::{StreamExt, stream::BoxStream};
use kube::{
    Api, Client, Resource,
    api::{ApiResource, DynamicObject, GroupVersionKind},
    runtime::{
        WatchStreamExt,
        watcher::{self, Event},
    },
};
use serde::de::DeserializeOwned;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::objects::{ClusterObjects, Kind, Object, PolicyObject, RouteKind};
use crate::{
    k8s::{GATEWAY_API_VERSION, ISTIO_SECURITY_API_VERSION},
    policy::{
        AuthorizationPolicy, PeerAuthentication, PolicyKind, RequestAuthentication, SecurityGroup,
    },
};

/// Changes are gathered this long before a snapshot is published.
pub const DEBOUNCE: Duration = Duration::from_millis(50);

type KindEvent = (Kind, Result<Event<Object>, watcher::Error>);

fn watch_kind<K>(
    client: &Client,
    kind: Kind,
    wrap: fn(K) -> Object,
) -> BoxStream<'static, KindEvent>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + 'static,
{
    watcher::watcher(Api::<K>::all(client.clone()), watcher::Config::default())
        .default_backoff()
        .map(move |event| (kind, event.map(|e| map_event(e, wrap))))
        .boxed()
}

/// Watches a kind the mesh keeps untyped (metadata and spec), by `apiVersion` and plural.
fn watch_untyped(
    client: &Client,
    kind: Kind,
    api_version: &str,
    plural: &str,
    wrap: fn(PolicyObject) -> Object,
) -> BoxStream<'static, KindEvent> {
    watch_resource(client, kind, kind.as_str(), api_version, plural, wrap)
}

/// Watches an Istio security kind at the version the API server stores and converts to
/// (`v1`, served by every Istio since 1.22 beside `v1beta1`, with the same schema).
fn watch_istio(
    client: &Client,
    kind: PolicyKind,
    wrap: fn(PolicyObject) -> Object,
) -> BoxStream<'static, KindEvent> {
    watch_resource(
        client,
        Kind::Policy(SecurityGroup::Istio, kind),
        kind.as_str(),
        ISTIO_SECURITY_API_VERSION,
        kind.plural(),
        wrap,
    )
}

fn watch_resource(
    client: &Client,
    kind: Kind,
    api_kind: &str,
    api_version: &str,
    plural: &str,
    wrap: fn(PolicyObject) -> Object,
) -> BoxStream<'static, KindEvent> {
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    let resource =
        ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, api_kind), plural);
    let api = Api::<DynamicObject>::all_with(client.clone(), &resource);
    watcher::watcher(api, watcher::Config::default())
        .default_backoff()
        .map(move |event| {
            let event = event.map(|e| {
                map_event(e, |o: DynamicObject| {
                    wrap(PolicyObject {
                        metadata: o.metadata,
                        spec: o.data.get("spec").cloned().unwrap_or_default(),
                    })
                })
            });
            (kind, event)
        })
        .boxed()
}

/// Whether a watch failed because the API server does not serve the kind (no CRD). A real API
/// server answers a group it does not serve with a plain-text `404 page not found`, not a
/// Status, so the code counts, not only the reason.
fn not_served(error: &watcher::Error) -> bool {
    match error {
        watcher::Error::InitialListFailed(kube::Error::Api(status))
        | watcher::Error::WatchStartFailed(kube::Error::Api(status)) => {
            status.is_not_found() || status.code == 404
        }
        _ => false,
    }
}

fn map_event<K>(event: Event<K>, wrap: impl Fn(K) -> Object) -> Event<Object> {
    match event {
        Event::Apply(o) => Event::Apply(wrap(o)),
        Event::Delete(o) => Event::Delete(wrap(o)),
        Event::Init => Event::Init,
        Event::InitApply(o) => Event::InitApply(wrap(o)),
        Event::InitDone => Event::InitDone,
    }
}

/// Watches the cluster and publishes snapshots until `shutdown`.
pub async fn run(
    client: Client,
    tx: watch::Sender<Option<Arc<ClusterObjects>>>,
    shutdown: CancellationToken,
) {
    let mut events = futures_util::stream::select_all([
        watch_kind(&client, Kind::Namespace, Object::Namespace),
        watch_kind(&client, Kind::Pod, Object::Pod),
        watch_kind(&client, Kind::Service, Object::Service),
        watch_kind(&client, Kind::EndpointSlice, Object::EndpointSlice),
        watch_kind(&client, Kind::Node, Object::Node),
        // The CRDs must be installed (the chart does): until they are, these lists fail, the
        // watcher retries with backoff and logs why, and nothing is published, so no agent
        // ever runs without the policies it should enforce.
        watch_kind(
            &client,
            Kind::Policy(SecurityGroup::Trellis, PolicyKind::Authorization),
            |o: AuthorizationPolicy| Object::policy(PolicyKind::Authorization, o.into()),
        ),
        watch_kind(
            &client,
            Kind::Policy(SecurityGroup::Trellis, PolicyKind::PeerAuthentication),
            |o: PeerAuthentication| Object::policy(PolicyKind::PeerAuthentication, o.into()),
        ),
        watch_kind(
            &client,
            Kind::Policy(SecurityGroup::Trellis, PolicyKind::RequestAuthentication),
            |o: RequestAuthentication| Object::policy(PolicyKind::RequestAuthentication, o.into()),
        ),
        // Optional (see the module docs).
        watch_istio(&client, PolicyKind::Authorization, |o| {
            Object::Policy(SecurityGroup::Istio, PolicyKind::Authorization, o)
        }),
        watch_istio(&client, PolicyKind::PeerAuthentication, |o| {
            Object::Policy(SecurityGroup::Istio, PolicyKind::PeerAuthentication, o)
        }),
        watch_istio(&client, PolicyKind::RequestAuthentication, |o| {
            Object::Policy(SecurityGroup::Istio, PolicyKind::RequestAuthentication, o)
        }),
        watch_untyped(
            &client,
            Kind::Gateway,
            GATEWAY_API_VERSION,
            "gateways",
            Object::Gateway,
        ),
        watch_untyped(
            &client,
            Kind::HttpRoute,
            RouteKind::Http.api_version(),
            RouteKind::Http.plural(),
            |o| Object::Route(RouteKind::Http, o),
        ),
        watch_untyped(
            &client,
            Kind::GrpcRoute,
            RouteKind::Grpc.api_version(),
            RouteKind::Grpc.plural(),
            |o| Object::Route(RouteKind::Grpc, o),
        ),
        watch_untyped(
            &client,
            Kind::TrafficPolicy,
            RouteKind::TrafficPolicy.api_version(),
            RouteKind::TrafficPolicy.plural(),
            |o| Object::Route(RouteKind::TrafficPolicy, o),
        ),
        watch_untyped(
            &client,
            Kind::VirtualService,
            RouteKind::VirtualService.api_version(),
            RouteKind::VirtualService.plural(),
            |o| Object::Route(RouteKind::VirtualService, o),
        ),
        watch_untyped(
            &client,
            Kind::DestinationRule,
            RouteKind::DestinationRule.api_version(),
            RouteKind::DestinationRule.plural(),
            |o| Object::Route(RouteKind::DestinationRule, o),
        ),
    ]);
    let mut store = Store::default();
    let mut publish_at: Option<tokio::time::Instant> = None;
    loop {
        let deadline = publish_at;
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = async { if let Some(at) = deadline { tokio::time::sleep_until(at).await } },
                if deadline.is_some() =>
            {
                publish_at = None;
                tx.send_replace(Some(Arc::new(store.objects.clone())));
            }
            event = events.next() => {
                let Some((kind, event)) = event else { return };
                let changed = match event {
                    Ok(event) => store.handle(kind, event),
                    Err(e) if kind.optional() && not_served(&e) => store.not_served(kind),
                    // The watcher recovers by itself (after a backoff); the store keeps the
                    // last state meanwhile.
                    Err(e) => {
                        tracing::warn!(%kind, error = %e, "watch failed; retrying with backoff");
                        false
                    }
                };
                if changed && store.synced() && publish_at.is_none() {
                    publish_at = Some(tokio::time::Instant::now() + DEBOUNCE);
                }
            }
        }
    }
}

/// The objects as the watchers report them; pure, so the event handling is testable alone.
#[derive(Debug, Default)]
pub struct Store {
    pub objects: ClusterObjects,
    /// Kinds being (re-)listed: their new contents, swapped in whole when the list is done.
    relisting: BTreeMap<Kind, ClusterObjects>,
    listed: BTreeSet<Kind>,
    /// Optional kinds the API server does not serve (reported once until it does).
    missing: BTreeSet<Kind>,
}

impl Store {
    /// Applies one event; returns whether the published objects changed.
    pub fn handle(&mut self, kind: Kind, event: Event<Object>) -> bool {
        match event {
            Event::Init => {
                self.relisting.insert(kind, ClusterObjects::default());
                false
            }
            Event::InitApply(object) => {
                let buffer = self.relisting.entry(kind).or_default();
                if let Err(e) = buffer.apply(object) {
                    tracing::warn!(error = %e, "ignoring object");
                }
                false
            }
            Event::InitDone => {
                let mut listed = self.relisting.remove(&kind).unwrap_or_default();
                self.objects.replace_kind(kind, &mut listed);
                let first = self.listed.insert(kind);
                let was_missing = self.missing.remove(&kind);
                if first || was_missing {
                    tracing::info!(%kind, "listed");
                } else {
                    // After a watch the API server expired (410 Gone) or a lost connection:
                    // the kind's objects were replaced by a fresh list.
                    tracing::info!(%kind, objects = self.objects.count(kind), "relisted");
                }
                true
            }
            Event::Apply(object) => {
                if let Err(e) = self.objects.apply(object) {
                    tracing::warn!(error = %e, "ignoring object");
                }
                true
            }
            Event::Delete(object) => {
                self.objects.delete(&object);
                true
            }
        }
    }

    /// An optional kind is not served (its CRD is not installed, or was removed): there are
    /// none of it. Returns whether the published objects changed.
    pub fn not_served(&mut self, kind: Kind) -> bool {
        if self.missing.insert(kind) {
            tracing::warn!(
                %kind,
                "the API server does not serve this kind (is its CRD installed?): the mesh runs without any; retrying with backoff"
            );
        } else {
            tracing::debug!(%kind, "still not served");
        }
        self.relisting.remove(&kind);
        let had_objects = self.objects.count(kind) > 0;
        self.objects
            .replace_kind(kind, &mut ClusterObjects::default());
        self.listed.insert(kind) || had_objects
    }

    /// Whether every kind has been listed at least once (or found not served, if optional).
    pub fn synced(&self) -> bool {
        Kind::ALL.iter().all(|k| self.listed.contains(k))
    }
}

#[cfg(test)]
mod tests;
