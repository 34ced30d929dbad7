//! `AzureStore`: the `PageStore` on Azure Storage page blobs (official `azure_storage_blob`
//! 1.x), with our Shared Key signing policy.

use std::collections::HashMap;
use std::future::Future;
use std::ops::Range;

use async_trait::async_trait;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use azure_core::credentials::TokenCredential;
use azure_core::http::policies::{Policy, PolicyResult};
use azure_core::http::{
    ClientOptions, Context, Request, RequestContent, RetryOptions, StatusCode, Transport, Url,
};
use azure_storage_blob::models::{
    BlobClientAcquireLeaseOptions, BlobClientBreakLeaseOptions, BlobClientCreateSnapshotOptions,
    BlobClientCreateSnapshotResultHeaders, BlobClientDeleteOptions, BlobClientDownloadOptions,
    BlobClientGetPropertiesResultHeaders, BlobClientSetMetadataOptions,
    BlobContainerClientListBlobsOptions, BlockBlobClientUploadOptions, CopyStatus,
    DeleteSnapshotsOptionType, HttpRange, LeaseState, ListBlobsIncludeItem,
    PageBlobClientClearPagesOptions, PageBlobClientCreateOptions, PageBlobClientResizeOptions,
    PageBlobClientSetSequenceNumberOptions, PageBlobClientUploadPagesOptions,
    SequenceNumberActionType,
};
use azure_storage_blob::{
    BlobClient, BlobContainerClient, BlobContainerClientOptions, PageBlobClient,
    PageBlobClientOptions,
};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::Bytes;
use futures::TryStreamExt;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::StoreError;
use crate::store::{
    Condition, Doc, ETag, Expect, LeaseId, MAX_PUT, Metadata, PageStore, Properties,
    check_blob_name, check_pages, check_size, merge_ranges,
};

/// How to authenticate to the storage account.
#[derive(Clone)]
#[non_exhaustive]
pub enum Credential {
    /// Account name and base64 account key (Shared Key; also Azurite's dev account).
    SharedKey {
        /// The account name.
        account: String,
        /// The account key, base64 as the portal shows it.
        key: String,
    },
    /// A SAS token is already in the container URL.
    Sas,
    /// An Entra ID token credential (https only), e.g. from `azure_identity`.
    Token(Arc<dyn TokenCredential>),
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credential::SharedKey { account, .. } => write!(f, "SharedKey({account}, <key>)"),
            Credential::Sas => f.write_str("Sas"),
            Credential::Token(_) => f.write_str("Token"),
        }
    }
}

#[cfg(feature = "azure_identity")]
impl Credential {
    /// The machine's managed identity (an Azure VM, App Service, AKS pod with workload
    /// identity set up as managed identity): the production credential for an agent that
    /// runs in Azure. Tokens are fetched and refreshed by `azure_identity`.
    pub fn managed_identity() -> Result<Self, StoreError> {
        let c = azure_identity::ManagedIdentityCredential::new(None).map_err(|e| {
            StoreError::Config {
                what: "managed identity",
                detail: e.to_string(),
            }
        })?;
        Ok(Credential::Token(c))
    }

    /// The Azure CLI or Azure Developer CLI sign-in of the current user (`az login`), for
    /// tools run from a workstation.
    pub fn developer_tools() -> Result<Self, StoreError> {
        let c = azure_identity::DeveloperToolsCredential::new(None).map_err(|e| {
            StoreError::Config {
                what: "developer tools credential",
                detail: e.to_string(),
            }
        })?;
        Ok(Credential::Token(c))
    }
}

/// Azurite's public, well-known development account.
pub const AZURITE_ACCOUNT: &str = "devstoreaccount1";
/// Azurite's public, well-known development key.
pub const AZURITE_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

/// An account SAS query string (service `b`, all blob permissions, http and https,
/// version 2022-11-02) signed with `key_b64`, valid until `expiry` (ISO 8601, e.g.
/// `2099-01-01T00:00:00Z`). Append it to a container URL and use [`Credential::Sas`].
pub fn account_sas(account: &str, key_b64: &str, expiry: &str) -> Result<String, StoreError> {
    let (sp, ss, srt, spr, sv) = ("racwdlup", "b", "sco", "https,http", "2022-11-02");
    let sts = format!("{account}\n{sp}\n{ss}\n{srt}\n\n{expiry}\n\n{spr}\n{sv}\n\n");
    let key = B64.decode(key_b64.trim()).map_err(|e| StoreError::Config {
        what: "account key",
        detail: format!("not base64: {e}"),
    })?;
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).map_err(|e| StoreError::Config {
        what: "account key",
        detail: e.to_string(),
    })?;
    mac.update(sts.as_bytes());
    let sig = B64.encode(mac.finalize().into_bytes());
    let enc = |s: &str| -> String {
        s.bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect()
    };
    Ok(format!(
        "sv={sv}&ss={ss}&srt={srt}&sp={sp}&se={}&spr={}&sig={}",
        enc(expiry),
        enc(spr),
        enc(&sig)
    ))
}

/// Page blobs in one Azure Storage container.
///
/// The SDK's own retries are off: retrying belongs to the caller's policy
/// ([`PageWriter`](crate::PageWriter) uses `lifeboat-retry`). Put Page bodies over 4 MiB
/// and misaligned ranges are refused here, before anything is sent (Azurite would accept
/// them; Azure would not).
#[derive(Clone)]
pub struct AzureStore {
    container: Arc<BlobContainerClient>,
    options: ClientOptions,
    credential: Option<Arc<dyn TokenCredential>>,
    /// Blob sizes seen, to refuse ranges past the end before sending (Azurite accepts
    /// them; Azure answers 416). Refreshed before any refusal, so a stale entry never
    /// refuses a valid write.
    sizes: Arc<std::sync::Mutex<HashMap<String, u64>>>,
}

impl AzureStore {
    /// A store for the container at `container_url` (for Azurite:
    /// `http://127.0.0.1:10000/devstoreaccount1/<container>`, no trailing slash).
    pub fn new(container_url: &str, credential: Credential) -> Result<Self, StoreError> {
        AzureStore::with_transport(container_url, credential, None)
    }

    /// [`AzureStore::new`] with the SDK's HTTP transport replaced, for example by a
    /// `reqwest::Client` that trusts a private CA (an Azure Stack endpoint, or Azurite
    /// over https with `--oauth`, where a token credential may be used).
    pub fn with_transport(
        container_url: &str,
        credential: Credential,
        transport: Option<Transport>,
    ) -> Result<Self, StoreError> {
        let url =
            Url::parse(container_url.trim_end_matches('/')).map_err(|e| StoreError::Config {
                what: "container URL",
                detail: redact(&e.to_string()),
            })?;
        let loopback = url.host_str().is_some_and(|h| {
            h == "localhost"
                || h.trim_start_matches('[')
                    .trim_end_matches(']')
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback())
        });
        if url.scheme() != "https" && !(url.scheme() == "http" && loopback) {
            return Err(StoreError::Config {
                what: "container URL",
                detail: format!(
                    "{}: use https (plain http only for an emulator on this machine)",
                    redact(url.as_str())
                ),
            });
        }
        let mut options = ClientOptions {
            retry: RetryOptions::none(),
            transport,
            ..ClientOptions::default()
        };
        let token = match credential {
            Credential::SharedKey { account, key } => {
                let key = B64.decode(key.trim()).map_err(|e| StoreError::Config {
                    what: "account key",
                    detail: format!("not base64: {e}"),
                })?;
                options
                    .per_try_policies
                    .push(Arc::new(SharedKeyPolicy { account, key }));
                None
            }
            Credential::Sas => None,
            Credential::Token(t) => Some(t),
        };
        let container = BlobContainerClient::new(
            url,
            token.clone(),
            Some(BlobContainerClientOptions {
                client_options: options.clone(),
                ..Default::default()
            }),
        )
        .map_err(|e| from_azure(e, "container"))?;
        Ok(AzureStore {
            container: Arc::new(container),
            options,
            credential: token,
            sizes: Arc::default(),
        })
    }

    /// Creates the container if it does not exist.
    pub async fn ensure_container(&self) -> Result<(), StoreError> {
        match self.container.create(None).await {
            Ok(_) => Ok(()),
            Err(e) if e.http_status() == Some(StatusCode::Conflict) => Ok(()),
            Err(e) => Err(from_azure(e, "container")),
        }
    }

    fn blob(&self, name: &str) -> BlobClient {
        self.container.blob_client(name)
    }

    fn snap(&self, name: &str, snapshot: Option<&str>) -> Result<BlobClient, StoreError> {
        let b = self.blob(name);
        match snapshot {
            Some(s) => b.with_snapshot(s).map_err(|e| from_azure(e, name)),
            None => Ok(b),
        }
    }

    fn cached_size(&self, blob: &str) -> Option<u64> {
        self.sizes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(blob)
            .copied()
    }

    fn remember_size(&self, blob: &str, size: Option<u64>) {
        let mut m = self.sizes.lock().unwrap_or_else(|p| p.into_inner());
        match size {
            Some(s) => m.insert(blob.to_owned(), s),
            None => m.remove(blob),
        };
    }

    /// Checks alignment, the body cap and the blob's end, as Azure would.
    async fn check_range(
        &self,
        blob: &str,
        offset: u64,
        len: u64,
        max: u64,
    ) -> Result<(), StoreError> {
        let size = match self.cached_size(blob) {
            Some(s) if check_pages(offset, len, s, max).is_ok() => return Ok(()),
            _ => self.properties(blob).await?.size,
        };
        check_pages(offset, len, size, max)
    }

    async fn sequence_number(&self, blob: &str) -> u64 {
        self.properties(blob).await.map_or(0, |p| p.sequence_number)
    }

    /// Maps a refusal, filling in the blob's actual sequence number when a
    /// sequence-number condition failed.
    async fn condition_error(&self, e: azure_core::Error, blob: &str, c: Condition) -> StoreError {
        match (from_azure(e, blob), c.sequence_number_eq) {
            (StoreError::ConditionFailed { .. }, Some(expected)) => StoreError::ConditionFailed {
                expected,
                found: self.sequence_number(blob).await,
            },
            (other, _) => other,
        }
    }

    /// A blob's or a snapshot's properties.
    async fn properties_of(
        &self,
        blob: &str,
        snapshot: Option<&str>,
    ) -> Result<Properties, StoreError> {
        let p = self
            .snap(blob, snapshot)?
            .get_properties(None)
            .await
            .map_err(|e| from_azure(e, blob))?;
        let err = |e| from_azure(e, blob);
        let size = p.content_length().map_err(err)?.unwrap_or(0);
        let seq = p.blob_sequence_number().map_err(err)?.unwrap_or(0);
        let metadata = p.metadata().map_err(err)?.into_iter().collect();
        let lease = match p.lease_state().map_err(err)? {
            Some(LeaseState::Leased | LeaseState::Breaking) => crate::store::LeaseState::Leased,
            Some(LeaseState::Broken) => crate::store::LeaseState::Broken,
            _ => crate::store::LeaseState::Available,
        };
        let etag = ETag(p.etag().map_err(err)?.map(String::from).unwrap_or_default());
        Ok(Properties {
            size,
            sequence_number: seq as u64,
            metadata,
            lease,
            etag,
        })
    }

    async fn list_ranges(
        &self,
        client: PageBlobClient,
        what: &str,
    ) -> Result<Vec<Range<u64>>, StoreError> {
        let mut pages = client
            .list_page_ranges(None)
            .map_err(|e| from_azure(e, what))?;
        let mut out = Vec::new();
        while let Some(page) = pages.try_next().await.map_err(|e| from_azure(e, what))? {
            let list = page.into_model().map_err(|e| from_azure(e, what))?;
            for r in list.page_ranges {
                if let (Some(s), Some(e)) = (r.start, r.end) {
                    // Azure's End is inclusive.
                    out.push(s as u64..e as u64 + 1);
                }
            }
        }
        Ok(merge_ranges(out))
    }
}

impl std::fmt::Debug for AzureStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AzureStore")
            .field("container", &self.container.url().as_str())
            .finish_non_exhaustive()
    }
}

fn from_azure(e: azure_core::Error, what: &str) -> StoreError {
    use azure_core::error::ErrorKind;
    match e.kind() {
        ErrorKind::HttpResponse {
            status,
            error_code,
            raw_response,
        } => {
            let status = u16::from(*status);
            let code = error_code.clone().unwrap_or_default();
            let blob = what.to_owned();
            match (status, code.as_str()) {
                (404, _) => StoreError::NotFound { what: blob },
                (
                    409 | 412,
                    "LeaseIdMissing"
                    | "LeaseIdMismatchWithBlobOperation"
                    | "LeaseIdMismatchWithLeaseOperation"
                    | "LeaseAlreadyPresent"
                    | "LeaseLost",
                ) => StoreError::Leased { blob },
                (
                    409 | 412,
                    "LeaseNotPresentWithBlobOperation" | "LeaseNotPresentWithLeaseOperation",
                ) => StoreError::NotLeased { blob },
                (412, "ConditionNotMet") => StoreError::Changed { blob },
                (409, "BlobAlreadyExists") => StoreError::AlreadyExists { blob },
                // Recoverable (sent again), unlike other 400s; the caller fills in the CRC.
                (400, "Crc64Mismatch") => StoreError::ChecksumMismatch {
                    sent: 0,
                    actual: None,
                },
                // The caller fills in the numbers it knows.
                (412, "SequenceNumberConditionNotMet") => StoreError::ConditionFailed {
                    expected: 0,
                    found: 0,
                },
                _ => StoreError::Http {
                    status,
                    message: format!("{what}: {code}{}", hint(status, &code)),
                    // Throttling (503 ServerBusy) says when to come back.
                    retry_after: raw_response
                        .as_ref()
                        .and_then(|r| {
                            r.headers()
                                .get_optional_str(&azure_core::http::headers::RETRY_AFTER)
                        })
                        .and_then(lifeboat_retry::parse_retry_after),
                },
            }
        }
        ErrorKind::Connection | ErrorKind::Io => {
            let text = redact(&with_causes(&e));
            StoreError::Unreachable {
                host: host_of(&text).unwrap_or_else(|| what.to_owned()),
                why: crate::error::Unreachable::from_text(&text),
                detail: innermost(&e),
            }
        }
        _ => StoreError::Client(redact(&format!("{what}: {}", with_causes(&e)))),
    }
}

/// The host and port of the URL a request error names (`... for url (http://h:p/...)`).
fn host_of(text: &str) -> Option<String> {
    let url = text.split("url (").nth(1)?;
    let rest = url.split_once("://")?.1;
    let end = rest.find(['/', '?', ')']).unwrap_or(rest.len());
    Some(rest[..end].to_owned())
}

/// The last cause of an error's chain: what the network stack said.
fn innermost(e: &dyn std::error::Error) -> String {
    let mut last = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        last = c.to_string();
        cause = c.source();
    }
    redact(&last)
}

/// What to check, for the refusals a user can fix.
fn hint(status: u16, code: &str) -> &'static str {
    match (status, code) {
        (403, _) => {
            " (the storage account refused the request: check the account name and key, or \
             the SAS's permissions and expiry)"
        }
        (400, "OutOfRangeInput" | "InvalidResourceName" | "InvalidUri") => {
            " (check the container URL: a container name is 3 to 63 lowercase letters, \
             digits and single hyphens)"
        }
        _ => "",
    }
}

/// An error's message followed by those of its causes that add something ("failed to
/// execute request: error sending request: tcp connect error: Connection refused").
fn with_causes(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cause = c.source();
    }
    out
}

/// A message with every SAS signature (`sig=...`) blanked: a signature is a secret.
pub(crate) fn redact(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find("sig=") {
        out.push_str(&rest[..i + 4]);
        out.push_str("REDACTED");
        rest = &rest[i + 4..];
        let end = rest
            .find(|c: char| c == '&' || c == '"' || c == '\'' || c.is_whitespace())
            .unwrap_or(rest.len());
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

fn to_hash(md: &Metadata) -> HashMap<String, String> {
    md.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

fn lease_id(c: Condition) -> Option<String> {
    c.lease.map(|l| l.to_string())
}

#[async_trait]
impl PageStore for AzureStore {
    async fn create(
        &self,
        blob: &str,
        size: u64,
        seq: u64,
        md: &Metadata,
    ) -> Result<(), StoreError> {
        check_blob_name(blob)?;
        check_size(size)?;
        let opts = PageBlobClientCreateOptions {
            blob_sequence_number: Some(seq as i64),
            metadata: Some(to_hash(md)),
            if_none_match: Some("*".into()),
            ..Default::default()
        };
        match self
            .blob(blob)
            .page_blob_client()
            .create(size, Some(opts))
            .await
        {
            Ok(_) => {
                self.remember_size(blob, Some(size));
                Ok(())
            }
            Err(e) if e.http_status() == Some(StatusCode::Conflict) => {
                Err(StoreError::AlreadyExists {
                    blob: blob.to_owned(),
                })
            }
            Err(e) => Err(from_azure(e, blob)),
        }
    }

    async fn properties(&self, blob: &str) -> Result<Properties, StoreError> {
        let p = self.properties_of(blob, None).await?;
        self.remember_size(blob, Some(p.size));
        Ok(p)
    }

    async fn snapshot_properties(
        &self,
        blob: &str,
        snapshot: &str,
    ) -> Result<Properties, StoreError> {
        self.properties_of(blob, Some(snapshot)).await
    }

    async fn write_pages(
        &self,
        blob: &str,
        offset: u64,
        data: Bytes,
        crc64: Option<u64>,
        c: Condition,
    ) -> Result<(), StoreError> {
        let len = data.len() as u64;
        self.check_range(blob, offset, len, MAX_PUT).await?;
        let opts = PageBlobClientUploadPagesOptions {
            transactional_content_crc64: crc64.map(|c| c.to_le_bytes().to_vec()),
            if_sequence_number_equal_to: c.sequence_number_eq.map(|s| s as i64),
            lease_id: lease_id(c),
            ..Default::default()
        };
        let page = self.blob(blob).page_blob_client();
        match page
            .upload_pages(
                RequestContent::from(data.to_vec()),
                len,
                HttpRange::new(offset, len),
                Some(opts),
            )
            .await
        {
            Ok(_) => Ok(()),
            Err(e) => Err(match self.condition_error(e, blob, c).await {
                StoreError::ChecksumMismatch { actual, .. } => StoreError::ChecksumMismatch {
                    sent: crc64.unwrap_or_default(),
                    actual,
                },
                e => e,
            }),
        }
    }

    async fn clear_pages(
        &self,
        blob: &str,
        offset: u64,
        len: u64,
        c: Condition,
    ) -> Result<(), StoreError> {
        self.check_range(blob, offset, len, u64::MAX).await?;
        let opts = PageBlobClientClearPagesOptions {
            if_sequence_number_equal_to: c.sequence_number_eq.map(|s| s as i64),
            lease_id: lease_id(c),
            ..Default::default()
        };
        match self
            .blob(blob)
            .page_blob_client()
            .clear_pages(HttpRange::new(offset, len), Some(opts))
            .await
        {
            Ok(_) => Ok(()),
            Err(e) => Err(self.condition_error(e, blob, c).await),
        }
    }

    async fn read(
        &self,
        blob: &str,
        snapshot: Option<&str>,
        offset: u64,
        len: u64,
    ) -> Result<Bytes, StoreError> {
        let mut buf = vec![0u8; len as usize];
        if len == 0 {
            return Ok(Bytes::new());
        }
        let client = self.snap(blob, snapshot)?;
        let opts = BlobClientDownloadOptions {
            range: Some(HttpRange::new(offset, len)),
            ..Default::default()
        };
        match client.download_into(&mut buf, Some(opts)).await {
            Ok(r) if r.len as u64 == len => Ok(Bytes::from(buf)),
            Ok(r) => Err(StoreError::OutOfRange {
                offset,
                len,
                size: offset + r.len as u64,
            }),
            Err(e) if e.http_status() == Some(StatusCode::RequestedRangeNotSatisfiable) => {
                let size = self.properties(blob).await.map_or(0, |p| p.size);
                Err(StoreError::OutOfRange { offset, len, size })
            }
            Err(e) => Err(from_azure(e, blob)),
        }
    }

    async fn page_ranges(
        &self,
        blob: &str,
        snapshot: Option<&str>,
    ) -> Result<Vec<Range<u64>>, StoreError> {
        let client = self.snap(blob, snapshot)?.page_blob_client();
        self.list_ranges(client, blob).await
    }

    async fn diff_ranges(
        &self,
        blob: &str,
        snapshot: Option<&str>,
        prev: &str,
    ) -> Result<Vec<Range<u64>>, StoreError> {
        // azure_storage_blob 1.1 has no prevsnapshot option: put it in the client URL.
        let mut url = self.snap(blob, snapshot)?.url().clone();
        url.query_pairs_mut().append_pair("prevsnapshot", prev);
        let client = PageBlobClient::new(
            url,
            self.credential.clone(),
            Some(PageBlobClientOptions {
                client_options: self.options.clone(),
                ..Default::default()
            }),
        )
        .map_err(|e| from_azure(e, blob))?;
        self.list_ranges(client, blob).await
    }

    async fn snapshot(&self, blob: &str, c: Condition) -> Result<String, StoreError> {
        let opts = BlobClientCreateSnapshotOptions {
            lease_id: lease_id(c),
            ..Default::default()
        };
        let r = self
            .blob(blob)
            .create_snapshot(Some(opts))
            .await
            .map_err(|e| from_azure(e, blob))?;
        r.snapshot()
            .map_err(|e| from_azure(e, blob))?
            .ok_or_else(|| StoreError::Protocol("a snapshot response without x-ms-snapshot".into()))
    }

    async fn snapshots(&self, blob: &str) -> Result<Vec<String>, StoreError> {
        let opts = BlobContainerClientListBlobsOptions {
            prefix: Some(blob.to_owned()),
            include: Some(vec![ListBlobsIncludeItem::Snapshots]),
            ..Default::default()
        };
        let mut items = self
            .container
            .list_blobs(Some(opts))
            .map_err(|e| from_azure(e, blob))?;
        let mut out = Vec::new();
        while let Some(item) = items.try_next().await.map_err(|e| from_azure(e, blob))? {
            if item.name.as_deref() == Some(blob)
                && let Some(s) = item.snapshot
            {
                out.push(s);
            }
        }
        // Snapshot ids are timestamps: their order is creation order.
        out.sort();
        Ok(out)
    }

    async fn delete_snapshot(&self, blob: &str, snapshot: &str) -> Result<(), StoreError> {
        self.snap(blob, Some(snapshot))?
            .delete(None)
            .await
            .map(|_| ())
            .map_err(|e| from_azure(e, &format!("{blob}@{snapshot}")))
    }

    async fn copy_snapshot(
        &self,
        blob: &str,
        snapshot: &str,
        dest: &str,
    ) -> Result<(), StoreError> {
        check_blob_name(dest)?;
        let source = self.snap(blob, Some(snapshot))?.url().clone();
        self.blob(dest)
            .start_copy_from_url(source.to_string(), None)
            .await
            .map_err(|e| from_azure(e, dest))?;
        // Same-account copies of page blobs complete before the call returns on Azurite;
        // on Azure, wait for x-ms-copy-status to leave "pending". A failed or aborted copy
        // is an error, never a silently empty disk.
        for _ in 0..600 {
            let p = self
                .blob(dest)
                .get_properties(None)
                .await
                .map_err(|e| from_azure(e, dest))?;
            let status = p.copy_status().map_err(|e| from_azure(e, dest))?;
            let why = p
                .copy_status_description()
                .ok()
                .flatten()
                .unwrap_or_default();
            let what = format!("copy of {blob}@{snapshot} to {dest}");
            if copy_done(status, &why, &what)? {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(StoreError::Client(format!("copy to {dest} still pending")))
    }

    async fn set_sequence_number(
        &self,
        blob: &str,
        seq: u64,
        c: Condition,
    ) -> Result<(), StoreError> {
        // Set Sequence Number takes no sequence-number condition: read the number and the
        // blob's entity tag, and make the update conditional on that tag (no write can
        // slip in between).
        let mut if_match = None;
        if let Some(expected) = c.sequence_number_eq {
            let p = self.properties(blob).await?;
            if p.sequence_number != expected {
                return Err(StoreError::ConditionFailed {
                    expected,
                    found: p.sequence_number,
                });
            }
            if_match = Some(p.etag.0.into());
        }
        let opts = PageBlobClientSetSequenceNumberOptions {
            blob_sequence_number: Some(seq as i64),
            lease_id: lease_id(c),
            if_match,
            ..Default::default()
        };
        match self
            .blob(blob)
            .page_blob_client()
            .set_sequence_number(SequenceNumberActionType::Update, Some(opts))
            .await
        {
            Ok(_) => Ok(()),
            Err(e) => match (from_azure(e, blob), c.sequence_number_eq) {
                (StoreError::Changed { .. }, Some(expected)) => Err(StoreError::ConditionFailed {
                    expected,
                    found: self.sequence_number(blob).await,
                }),
                (other, _) => Err(other),
            },
        }
    }

    async fn set_metadata(
        &self,
        blob: &str,
        md: &Metadata,
        c: Condition,
    ) -> Result<(), StoreError> {
        let opts = BlobClientSetMetadataOptions {
            lease_id: lease_id(c),
            ..Default::default()
        };
        self.blob(blob)
            .set_metadata(&to_hash(md), Some(opts))
            .await
            .map(|_| ())
            .map_err(|e| from_azure(e, blob))
    }

    async fn resize(&self, blob: &str, size: u64, c: Condition) -> Result<(), StoreError> {
        check_size(size)?;
        let opts = PageBlobClientResizeOptions {
            lease_id: lease_id(c),
            ..Default::default()
        };
        self.blob(blob)
            .page_blob_client()
            .resize(size, Some(opts))
            .await
            .map(|_| self.remember_size(blob, Some(size)))
            .map_err(|e| from_azure(e, blob))
    }

    async fn delete(&self, blob: &str, c: Condition) -> Result<(), StoreError> {
        let opts = BlobClientDeleteOptions {
            delete_snapshots: Some(DeleteSnapshotsOptionType::Include),
            lease_id: lease_id(c),
            ..Default::default()
        };
        self.remember_size(blob, None);
        self.blob(blob)
            .delete(Some(opts))
            .await
            .map(|_| ())
            .map_err(|e| from_azure(e, blob))
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        let opts = BlobContainerClientListBlobsOptions {
            prefix: Some(prefix.to_owned()),
            ..Default::default()
        };
        let mut items = self
            .container
            .list_blobs(Some(opts))
            .map_err(|e| from_azure(e, prefix))?;
        let mut out = Vec::new();
        while let Some(item) = items.try_next().await.map_err(|e| from_azure(e, prefix))? {
            if item.snapshot.is_none()
                && let Some(name) = item.name
            {
                out.push(name);
            }
        }
        out.sort();
        out.dedup();
        Ok(out)
    }

    async fn acquire_lease(&self, blob: &str, lease: LeaseId) -> Result<(), StoreError> {
        let opts = BlobClientAcquireLeaseOptions {
            proposed_lease_id: Some(lease.to_string()),
            ..Default::default()
        };
        self.blob(blob)
            .acquire_lease(-1, Some(opts))
            .await
            .map(|_| ())
            .map_err(|e| from_azure(e, blob))
    }

    async fn break_lease(&self, blob: &str) -> Result<(), StoreError> {
        let opts = BlobClientBreakLeaseOptions {
            break_period: Some(0),
            ..Default::default()
        };
        match self.blob(blob).break_lease(Some(opts)).await {
            Ok(_) => Ok(()),
            Err(e) => match from_azure(e, blob) {
                StoreError::NotLeased { .. } => Ok(()),
                other => Err(other),
            },
        }
    }

    async fn release_lease(&self, blob: &str, lease: LeaseId) -> Result<(), StoreError> {
        self.blob(blob)
            .release_lease(lease.to_string(), None)
            .await
            .map(|_| ())
            .map_err(|e| from_azure(e, blob))
    }

    async fn get_doc(&self, name: &str) -> Result<Option<Doc>, StoreError> {
        check_blob_name(name)?;
        let r = match self.blob(name).download(None).await {
            Ok(r) => r,
            Err(e) => {
                return match from_azure(e, name) {
                    StoreError::NotFound { .. } => Ok(None),
                    other => Err(other),
                };
            }
        };
        let etag = r
            .properties
            .etag
            .clone()
            .map(String::from)
            .unwrap_or_default();
        let data = r.body.collect().await.map_err(|e| from_azure(e, name))?;
        Ok(Some(Doc {
            data,
            etag: ETag(etag),
        }))
    }

    async fn put_doc(
        &self,
        name: &str,
        data: Bytes,
        expect: Expect,
        lease: Option<LeaseId>,
    ) -> Result<ETag, StoreError> {
        check_blob_name(name)?;
        let mut opts = BlockBlobClientUploadOptions {
            lease_id: lease.map(|l| l.to_string()),
            ..Default::default()
        };
        match &expect {
            Expect::Absent => opts.if_none_match = Some("*".into()),
            Expect::Version(v) => opts.if_match = Some(v.0.clone().into()),
        }
        match self
            .blob(name)
            .upload(RequestContent::from(data.to_vec()), Some(opts))
            .await
        {
            Ok(r) => Ok(ETag(r.etag.map(String::from).unwrap_or_default())),
            Err(e) => Err(match from_azure(e, name) {
                StoreError::AlreadyExists { .. } => StoreError::Changed {
                    blob: name.to_owned(),
                },
                other => other,
            }),
        }
    }
}

/// Signs every try with the account key (Azure's Shared Key scheme). Runs last among the
/// per-try policies, so it sees every header the SDK set.
#[derive(Debug)]
struct SharedKeyPolicy {
    account: String,
    key: Vec<u8>,
}

impl SharedKeyPolicy {
    fn string_to_sign(&self, req: &Request) -> String {
        let h: std::collections::BTreeMap<String, String> = req
            .headers()
            .iter()
            .map(|(k, v)| (k.as_str().to_ascii_lowercase(), v.as_str().to_owned()))
            .collect();
        let g = |k: &str| h.get(k).cloned().unwrap_or_default();
        let mut len = h
            .get("content-length")
            .cloned()
            .unwrap_or_else(|| req.body().len().map(|l| l.to_string()).unwrap_or_default());
        if len == "0" {
            len.clear();
        }
        let mut s = [
            req.method().as_str().to_owned(),
            g("content-encoding"),
            g("content-language"),
            len,
            g("content-md5"),
            g("content-type"),
            String::new(),
            g("if-modified-since"),
            g("if-match"),
            g("if-none-match"),
            g("if-unmodified-since"),
            g("range"),
        ]
        .join("\n");
        s.push('\n');
        for (k, v) in h.iter().filter(|(k, _)| k.starts_with("x-ms-")) {
            s.push_str(&format!("{k}:{}\n", v.trim()));
        }
        s.push_str(&format!("/{}{}", self.account, req.url().path()));
        let mut q: std::collections::BTreeMap<String, Vec<String>> = Default::default();
        for (k, v) in req.url().query_pairs() {
            q.entry(k.to_ascii_lowercase())
                .or_default()
                .push(v.into_owned());
        }
        for (k, mut vs) in q {
            vs.sort();
            s.push_str(&format!("\n{k}:{}", vs.join(",")));
        }
        s
    }
}

impl Policy for SharedKeyPolicy {
    fn send<'a, 'b, 'c, 'd, 'at>(
        &'a self,
        ctx: &'b Context<'_>,
        request: &'c mut Request,
        next: &'d [Arc<dyn Policy>],
    ) -> Pin<Box<dyn Future<Output = PolicyResult> + Send + 'at>>
    where
        'a: 'at,
        'b: 'at,
        'c: 'at,
        'd: 'at,
        Self: 'at,
    {
        Box::pin(async move {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            request.insert_header("x-ms-date", rfc1123(now));
            let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).map_err(|e| {
                azure_core::Error::with_message(
                    azure_core::error::ErrorKind::Credential,
                    e.to_string(),
                )
            })?;
            mac.update(self.string_to_sign(request).as_bytes());
            let sig = B64.encode(mac.finalize().into_bytes());
            request.insert_header("authorization", format!("SharedKey {}:{sig}", self.account));
            next[0].send(ctx, request, &next[1..]).await
        })
    }
}

/// `Sun, 06 Nov 1994 08:49:37 GMT` for a Unix time.
fn rfc1123(unix: u64) -> String {
    const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let days = (unix / 86_400) as i64;
    let secs = unix % 86_400;
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{}, {:02} {} {} {:02}:{:02}:{:02} GMT",
        DAYS[(days.rem_euclid(7)) as usize],
        d,
        MONTHS[(m - 1) as usize],
        y,
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// Whether a copy is done (`false`: still pending); a failed or aborted copy is an error,
/// never a silently empty disk.
fn copy_done(status: Option<CopyStatus>, why: &str, what: &str) -> Result<bool, StoreError> {
    match status {
        Some(CopyStatus::Pending) => Ok(false),
        Some(CopyStatus::Success) | None => Ok(true),
        Some(other) => Err(StoreError::Http {
            status: 500,
            message: format!("{what} {other:?}: {why}"),
            retry_after: None,
        }),
    }
}

#[cfg(test)]
mod tests {
    use azure_storage_blob::models::CopyStatus;

    #[test]
    fn a_failed_or_aborted_copy_is_an_error() {
        let done = |s| super::copy_done(s, "why", "copy");
        assert!(!done(Some(CopyStatus::Pending)).unwrap());
        assert!(done(Some(CopyStatus::Success)).unwrap());
        assert!(done(None).unwrap());
        for bad in [CopyStatus::Failed, CopyStatus::Aborted] {
            let e = done(Some(bad)).unwrap_err().to_string();
            assert!(e.contains("copy") && e.contains("why"), "{e}");
        }
    }

    #[test]
    fn signatures_are_redacted() {
        assert_eq!(
            super::redact("GET https://a/c?sv=1&sig=AB%2Fcd&se=2 failed: sig=xyz"),
            "GET https://a/c?sv=1&sig=REDACTED&se=2 failed: sig=REDACTED"
        );
        assert_eq!(super::redact("no secret"), "no secret");
    }

    #[test]
    fn rfc1123_dates() {
        assert_eq!(super::rfc1123(0), "Thu, 01 Jan 1970 00:00:00 GMT");
        assert_eq!(super::rfc1123(784_111_777), "Sun, 06 Nov 1994 08:49:37 GMT");
        assert_eq!(
            super::rfc1123(1_795_824_000),
            "Sat, 28 Nov 2026 00:00:00 GMT"
        );
        assert_eq!(super::rfc1123(951_782_400), "Tue, 29 Feb 2000 00:00:00 GMT");
    }
}
