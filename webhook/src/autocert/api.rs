//! The Kubernetes calls of self-managed certificates: the Secret (read, create, replace under
//! optimistic concurrency) and the `caBundle` of the webhook's own configuration.

use base64::Engine;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::json;

use super::bundle::Bundle;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("reading Secret {0}")]
    ReadSecret(String, #[source] kube::Error),
    #[error("writing Secret {0}")]
    WriteSecret(String, #[source] kube::Error),
    #[error("reading MutatingWebhookConfiguration {0}")]
    ReadWebhook(String, #[source] kube::Error),
    #[error("patching the caBundle of MutatingWebhookConfiguration {0}")]
    PatchWebhook(String, #[source] kube::Error),
    #[error("MutatingWebhookConfiguration {0} has no uid")]
    NoUid(String),
}

/// A Secret as read: its bundle (when complete) and the version to replace it at.
#[derive(Debug, Clone)]
pub struct StoredSecret {
    pub bundle: Option<Bundle>,
    pub resource_version: Option<String>,
}

/// How a write ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Write {
    Done,
    /// Someone else wrote first (another replica): read again and go with theirs.
    Lost,
}

pub struct CertApi {
    secrets: Api<Secret>,
    webhooks: Api<MutatingWebhookConfiguration>,
    secret_name: String,
    webhook_name: String,
}

fn is_status(error: &kube::Error, code: u16) -> bool {
    matches!(error, kube::Error::Api(status) if status.code == code)
}

impl CertApi {
    pub fn new(client: Client, namespace: &str, secret_name: &str, webhook_name: &str) -> Self {
        Self {
            secrets: Api::namespaced(client.clone(), namespace),
            webhooks: Api::all(client),
            secret_name: secret_name.to_string(),
            webhook_name: webhook_name.to_string(),
        }
    }

    pub async fn read_secret(&self) -> Result<Option<StoredSecret>, ApiError> {
        let secret = self
            .secrets
            .get_opt(&self.secret_name)
            .await
            .map_err(|e| ApiError::ReadSecret(self.secret_name.clone(), e))?;
        Ok(secret.map(|s| StoredSecret {
            bundle: s.data.as_ref().and_then(Bundle::from_data),
            resource_version: s.metadata.resource_version,
        }))
    }

    /// Writes `bundle`: creates the Secret when `current` is `None`, else replaces the version
    /// read. Either fails as [`Write::Lost`] when another writer got there first.
    pub async fn write_secret(
        &self,
        bundle: &Bundle,
        current: Option<&StoredSecret>,
    ) -> Result<Write, ApiError> {
        let owner = self.owner().await?;
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(self.secret_name.clone()),
                resource_version: current.and_then(|c| c.resource_version.clone()),
                labels: Some(
                    [(
                        "app.kubernetes.io/managed-by".to_string(),
                        "fanout-webhook".to_string(),
                    )]
                    .into(),
                ),
                // Owned by the webhook configuration, so uninstalling the chart removes it.
                owner_references: Some(vec![owner]),
                ..Default::default()
            },
            type_: Some("kubernetes.io/tls".into()),
            data: Some(bundle.to_data()),
            ..Default::default()
        };
        let result = match current {
            None => self.secrets.create(&PostParams::default(), &secret).await,
            Some(_) => {
                self.secrets
                    .replace(&self.secret_name, &PostParams::default(), &secret)
                    .await
            }
        };
        match result {
            Ok(_) => Ok(Write::Done),
            // 409: AlreadyExists on create, Conflict on a stale resourceVersion.
            Err(e) if is_status(&e, 409) => Ok(Write::Lost),
            Err(e) => Err(ApiError::WriteSecret(self.secret_name.clone(), e)),
        }
    }

    async fn owner(&self) -> Result<OwnerReference, ApiError> {
        let webhook = self.read_webhook().await?;
        Ok(OwnerReference {
            api_version: "admissionregistration.k8s.io/v1".into(),
            kind: "MutatingWebhookConfiguration".into(),
            name: self.webhook_name.clone(),
            uid: webhook
                .metadata
                .uid
                .ok_or_else(|| ApiError::NoUid(self.webhook_name.clone()))?,
            ..Default::default()
        })
    }

    async fn read_webhook(&self) -> Result<MutatingWebhookConfiguration, ApiError> {
        self.webhooks
            .get(&self.webhook_name)
            .await
            .map_err(|e| ApiError::ReadWebhook(self.webhook_name.clone(), e))
    }

    /// Sets the `caBundle` of every webhook in the configuration to `ca_pem`; `Ok(false)` when
    /// all already had it (nothing written).
    pub async fn sync_ca_bundle(&self, ca_pem: &str) -> Result<bool, ApiError> {
        let configuration = self.read_webhook().await?;
        let patch = ca_bundle_patch(&configuration, ca_pem);
        if patch.0.is_empty() {
            return Ok(false);
        }
        self.webhooks
            .patch(
                &self.webhook_name,
                &PatchParams::default(),
                &Patch::Json::<()>(patch),
            )
            .await
            .map_err(|e| ApiError::PatchWebhook(self.webhook_name.clone(), e))?;
        Ok(true)
    }
}

/// A JSON patch that sets `caBundle` where it differs from `ca_pem`. Each change first tests
/// the webhook's name at its index, so a configuration changed meanwhile (a `helm upgrade`
/// reordering webhooks) fails the patch instead of being written at the wrong place.
pub fn ca_bundle_patch(
    configuration: &MutatingWebhookConfiguration,
    ca_pem: &str,
) -> json_patch::Patch {
    let wanted = ca_pem.as_bytes();
    let mut operations = Vec::new();
    for (index, webhook) in configuration.webhooks.iter().flatten().enumerate() {
        if webhook
            .client_config
            .ca_bundle
            .as_ref()
            .map(|b| b.0.as_slice())
            == Some(wanted)
        {
            continue;
        }
        operations.push(
            json!({"op": "test", "path": format!("/webhooks/{index}/name"), "value": webhook.name}),
        );
        operations.push(json!({
            "op": "add",
            "path": format!("/webhooks/{index}/clientConfig/caBundle"),
            "value": base64::engine::general_purpose::STANDARD.encode(wanted),
        }));
    }
    serde_json::from_value(serde_json::Value::Array(operations))
        .expect("patch operations are well formed")
}
