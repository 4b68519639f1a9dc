//! Where the mesh's root CA lives: PEM files, or a Kubernetes Secret.
//!
//! Either way the controller loads the root if it exists and otherwise generates one and
//! persists it before signing anything, so every later start (and every other replica)
//! signs with the same root.
//!
//! With a Secret, two replicas starting together may both find it missing. Creating a
//! Secret is atomic in the API server: the loser gets `409 Conflict`, drops the root it
//! generated and loads the winner's. No leader election is needed for this.
//!
//! The trust bundle (the root certificate only, never the key) can also be published to a
//! ConfigMap that the agents' DaemonSet mounts as `control_plane.ca_cert`.

use std::collections::BTreeMap;

use k8s_openapi::{
    ByteString,
    api::core::v1::{ConfigMap, Secret},
};
use kube::{
    Api, Client,
    api::{ObjectMeta, Patch, PatchParams, PostParams},
};

use crate::{
    config::controller::ObjectRef,
    identity::{LocalCa, ca::CaError},
};

/// Secret keys, as in `kubernetes.io/tls` Secrets.
pub const SECRET_CERT: &str = "tls.crt";
pub const SECRET_KEY: &str = "tls.key";
/// The ConfigMap key holding the trust bundle.
pub const ROOT_CERT_KEY: &str = "root-cert.pem";
use crate::k8s::{FIELD_MANAGER, MANAGED_BY_LABEL};

#[derive(Debug, thiserror::Error)]
pub enum CaStoreError {
    #[error(
        "cannot read CA Secret {namespace}/{name}: {source} (check the controller's RBAC for secrets)"
    )]
    Get {
        namespace: String,
        name: String,
        source: kube::Error,
    },
    #[error(
        "cannot create CA Secret {namespace}/{name}: {source} (check the controller's RBAC for secrets)"
    )]
    Create {
        namespace: String,
        name: String,
        source: kube::Error,
    },
    #[error(
        "CA Secret {namespace}/{name} has no {key}: restore it, or delete the Secret to generate a new root"
    )]
    Missing {
        namespace: String,
        name: String,
        key: &'static str,
    },
    #[error("CA Secret {namespace}/{name}: {key} is not UTF-8 PEM")]
    NotPem {
        namespace: String,
        name: String,
        key: &'static str,
    },
    #[error("CA Secret {namespace}/{name}: {source}")]
    Ca {
        namespace: String,
        name: String,
        source: CaError,
    },
    #[error(
        "cannot publish the trust bundle to ConfigMap {namespace}/{name}: {source} (check the controller's RBAC for configmaps)"
    )]
    Publish {
        namespace: String,
        name: String,
        source: kube::Error,
    },
}

/// Loads the root from `secret`, or generates one and creates the Secret (losing a creation
/// race to another replica means loading that replica's root instead).
pub async fn load_or_create_secret(
    client: Client,
    secret: &ObjectRef,
    trust_domain: &str,
) -> Result<LocalCa, CaStoreError> {
    let api: Api<Secret> = Api::namespaced(client, &secret.namespace);
    let get_error = |source| CaStoreError::Get {
        namespace: secret.namespace.clone(),
        name: secret.name.clone(),
        source,
    };
    if let Some(existing) = api.get_opt(&secret.name).await.map_err(get_error)? {
        let ca = from_secret(secret, &existing)?;
        tracing::info!(%secret, "loaded the root CA from its Secret");
        return Ok(ca);
    }

    let ca = LocalCa::generate(trust_domain).map_err(|source| CaStoreError::Ca {
        namespace: secret.namespace.clone(),
        name: secret.name.clone(),
        source,
    })?;
    let data = BTreeMap::from([
        (
            SECRET_CERT.to_owned(),
            ByteString(ca.cert_pem().as_bytes().to_vec()),
        ),
        (SECRET_KEY.to_owned(), ByteString(ca.key_pem().into_bytes())),
    ]);
    let object = Secret {
        metadata: ObjectMeta {
            name: Some(secret.name.clone()),
            namespace: Some(secret.namespace.clone()),
            labels: Some(BTreeMap::from([(
                MANAGED_BY_LABEL.to_owned(),
                FIELD_MANAGER.to_owned(),
            )])),
            ..Default::default()
        },
        type_: Some("kubernetes.io/tls".into()),
        data: Some(data),
        ..Default::default()
    };
    match api.create(&PostParams::default(), &object).await {
        Ok(_) => {
            tracing::info!(%secret, trust_domain, "generated a new root CA and stored it in its Secret");
            Ok(ca)
        }
        Err(kube::Error::Api(status)) if status.code == 409 => {
            // Another replica created it between our read and our create: use its root.
            let existing = api.get(&secret.name).await.map_err(get_error)?;
            tracing::info!(%secret, "another controller created the root CA first; using it");
            from_secret(secret, &existing)
        }
        Err(source) => Err(CaStoreError::Create {
            namespace: secret.namespace.clone(),
            name: secret.name.clone(),
            source,
        }),
    }
}

fn from_secret(at: &ObjectRef, secret: &Secret) -> Result<LocalCa, CaStoreError> {
    let field = |key: &'static str| -> Result<&str, CaStoreError> {
        let bytes = secret
            .data
            .as_ref()
            .and_then(|d| d.get(key))
            .ok_or_else(|| CaStoreError::Missing {
                namespace: at.namespace.clone(),
                name: at.name.clone(),
                key,
            })?;
        std::str::from_utf8(&bytes.0).map_err(|_| CaStoreError::NotPem {
            namespace: at.namespace.clone(),
            name: at.name.clone(),
            key,
        })
    };
    LocalCa::from_pem(field(SECRET_CERT)?, field(SECRET_KEY)?).map_err(|source| CaStoreError::Ca {
        namespace: at.namespace.clone(),
        name: at.name.clone(),
        source,
    })
}

/// Makes `config_map` hold exactly the root certificate under [`ROOT_CERT_KEY`] (server-side
/// apply: other keys and other managers' fields are left alone).
pub async fn publish_root(
    client: Client,
    config_map: &ObjectRef,
    ca: &LocalCa,
) -> Result<(), CaStoreError> {
    let api: Api<ConfigMap> = Api::namespaced(client, &config_map.namespace);
    let object = ConfigMap {
        metadata: ObjectMeta {
            name: Some(config_map.name.clone()),
            namespace: Some(config_map.namespace.clone()),
            ..Default::default()
        },
        data: Some(BTreeMap::from([(
            ROOT_CERT_KEY.to_owned(),
            ca.cert_pem().to_owned(),
        )])),
        ..Default::default()
    };
    // Server-side apply needs apiVersion and kind in the body, which the typed object omits.
    let mut body = serde_json::to_value(&object).map_err(|e| CaStoreError::Publish {
        namespace: config_map.namespace.clone(),
        name: config_map.name.clone(),
        source: kube::Error::SerdeError(e),
    })?;
    body["apiVersion"] = "v1".into();
    body["kind"] = "ConfigMap".into();
    api.patch(
        &config_map.name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(body),
    )
    .await
    .map_err(|source| CaStoreError::Publish {
        namespace: config_map.namespace.clone(),
        name: config_map.name.clone(),
        source,
    })?;
    tracing::info!(%config_map, "published the trust bundle");
    Ok(())
}

#[cfg(test)]
mod tests;
