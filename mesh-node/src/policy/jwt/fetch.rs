//! Key sets from `jwksUri`, fetched in the background and cached.
//!
//! [`JwksFetcher`] runs one task per URI in use. A task fetches the key set (bounded in time
//! by [`FetchSettings::timeout`] and in size by [`FetchSettings::max_body`]), keeps the last
//! good set, refreshes it every [`FetchSettings::refresh`], and after a failure retries with a
//! doubling delay from [`FetchSettings::retry`] up to the refresh interval. A failed refresh
//! keeps serving the previous keys; until the first success, tokens of that issuer are
//! refused (401), never accepted unverified. Tasks of URIs no longer in use are stopped, and
//! all of them when the last handle is dropped.
//!
//! The HTTP client ([`HttpFetch`]) speaks HTTP/1.1 over TCP, or over TLS (rustls with
//! aws-lc-rs, the platform's root certificates) for `https` URIs, and follows no redirects.

use std::{collections::HashMap, future::Future, pin::Pin, sync::Arc, time::Duration};

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use tokio::task::AbortHandle;

use super::keys::{KeySet, MAX_JWKS_BYTES};

/// Timing and size limits of key set fetches.
#[derive(Debug, Clone, Copy)]
pub struct FetchSettings {
    /// One fetch, connection included.
    pub timeout: Duration,
    /// Between successful fetches (Istio's default: 20 minutes).
    pub refresh: Duration,
    /// The first delay after a failure; doubles up to `refresh`.
    pub retry: Duration,
    /// The largest body accepted.
    pub max_body: usize,
}

impl Default for FetchSettings {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(10),
            refresh: Duration::from_mins(20),
            retry: Duration::from_secs(1),
            max_body: MAX_JWKS_BYTES,
        }
    }
}

/// Why a fetch failed.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("{0:?} is not an http or https URI with a host")]
    Uri(String),
    #[error("cannot connect to {0}: {1}")]
    Connect(String, std::io::Error),
    #[error("TLS with {0} failed: {1}")]
    Tls(String, std::io::Error),
    #[error("HTTP exchange failed: {0}")]
    Http(String),
    #[error("the server answered {0}, not 200")]
    Status(http::StatusCode),
    #[error("the key set is larger than {0} bytes")]
    TooLarge(usize),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("the body is not a usable key set: {0}")]
    Keys(#[from] super::keys::KeysError),
}

/// The future of one fetch.
pub type FetchFuture<'a> = Pin<Box<dyn Future<Output = Result<Bytes, FetchError>> + Send + 'a>>;

/// Gets the body of a key set URI; the production implementation is [`HttpFetch`].
pub trait FetchJwks: Send + Sync + 'static {
    /// The body at `uri`, at most `max_body` bytes.
    fn fetch<'a>(&'a self, uri: &'a str, max_body: usize) -> FetchFuture<'a>;
}

struct Entry {
    keys: Arc<ArcSwapOption<KeySet>>,
    task: AbortHandle,
}

struct Inner {
    client: Arc<dyn FetchJwks>,
    settings: FetchSettings,
    entries: Mutex<HashMap<String, Entry>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        let entries = self.entries.get_mut();
        for entry in entries.values() {
            entry.task.abort();
        }
    }
}

/// The key sets of `jwksUri` rules, kept fresh in the background. Cheap to clone (shared).
#[derive(Clone)]
pub struct JwksFetcher {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for JwksFetcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwksFetcher")
            .field("settings", &self.inner.settings)
            .finish_non_exhaustive()
    }
}

impl JwksFetcher {
    pub fn new(client: Arc<dyn FetchJwks>, settings: FetchSettings) -> Self {
        Self {
            inner: Arc::new(Inner {
                client,
                settings,
                entries: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// A fetcher over HTTP and HTTPS ([`HttpFetch`]).
    pub fn http(settings: FetchSettings) -> Self {
        Self::new(Arc::new(HttpFetch::new()), settings)
    }

    /// Keeps exactly `uris` fetched: starts a task for each new one, stops those of URIs not
    /// listed. Must run inside a Tokio runtime; outside one nothing is started (and tokens of
    /// those issuers are refused).
    pub fn watch(&self, uris: impl IntoIterator<Item = String>) {
        let wanted: std::collections::HashSet<String> = uris.into_iter().collect();
        let mut entries = self.inner.entries.lock();
        entries.retain(|uri, entry| {
            let keep = wanted.contains(uri);
            if !keep {
                entry.task.abort();
            }
            keep
        });
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            if wanted.iter().any(|u| !entries.contains_key(u)) {
                tracing::error!("cannot fetch JWKS URIs outside a Tokio runtime");
            }
            return;
        };
        for uri in wanted {
            if entries.contains_key(&uri) {
                continue;
            }
            let keys = Arc::new(ArcSwapOption::empty());
            let task = runtime
                .spawn(refresh(
                    self.inner.client.clone(),
                    self.inner.settings,
                    uri.clone(),
                    keys.clone(),
                ))
                .abort_handle();
            entries.insert(uri, Entry { keys, task });
        }
    }

    /// The last key set fetched from `uri`, if any fetch succeeded yet.
    pub fn keys(&self, uri: &str) -> Option<Arc<KeySet>> {
        let entries = self.inner.entries.lock();
        entries.get(uri).and_then(|e| e.keys.load_full())
    }
}

/// One URI's task: fetch, keep, wait, forever (until aborted).
async fn refresh(
    client: Arc<dyn FetchJwks>,
    settings: FetchSettings,
    uri: String,
    keys: Arc<ArcSwapOption<KeySet>>,
) {
    let mut retry = settings.retry;
    loop {
        let fetched = tokio::time::timeout(settings.timeout, client.fetch(&uri, settings.max_body))
            .await
            .unwrap_or(Err(FetchError::Timeout(settings.timeout)))
            .and_then(|body| Ok(KeySet::parse(&body)?));
        let delay = match fetched {
            Ok(set) => {
                tracing::debug!(%uri, keys = set.len(), "JWKS fetched");
                keys.store(Some(Arc::new(set)));
                retry = settings.retry;
                settings.refresh
            }
            Err(error) => {
                tracing::warn!(%uri, %error, retry_in = ?retry, "JWKS fetch failed; keeping the previous keys");
                let delay = retry;
                retry = (retry * 2).min(settings.refresh);
                delay
            }
        };
        tokio::time::sleep(delay).await;
    }
}

/// Fetches key sets over HTTP/1.1, with TLS for `https` (platform roots, aws-lc-rs).
pub struct HttpFetch {
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl Default for HttpFetch {
    fn default() -> Self {
        Self::new()
    }
}

impl HttpFetch {
    /// Loads the platform's root certificates once; if none can be loaded, `https` URIs
    /// fail (and say so) while `http` ones work.
    pub fn new() -> Self {
        let mut roots = rustls::RootCertStore::empty();
        let native = rustls_native_certs::load_native_certs();
        for error in &native.errors {
            tracing::warn!(%error, "cannot load a platform root certificate for JWKS fetches");
        }
        let (added, _ignored) = roots.add_parsable_certificates(native.certs);
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let tls = (added > 0)
            .then(|| {
                rustls::ClientConfig::builder_with_provider(provider)
                    .with_safe_default_protocol_versions()
                    .ok()
            })
            .flatten()
            .map(|builder| {
                let mut config = builder.with_root_certificates(roots).with_no_client_auth();
                config.alpn_protocols = vec![b"http/1.1".to_vec()];
                Arc::new(config)
            });
        Self { tls }
    }

    async fn get(&self, uri: &str, max_body: usize) -> Result<Bytes, FetchError> {
        let parsed: http::Uri = uri.parse().map_err(|_| FetchError::Uri(uri.into()))?;
        let https = match parsed.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err(FetchError::Uri(uri.into())),
        };
        let host = parsed
            .host()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| FetchError::Uri(uri.into()))?;
        let port = parsed.port_u16().unwrap_or(if https { 443 } else { 80 });
        // An IPv6 literal comes bracketed in the URI.
        let dial_host = host.trim_start_matches('[').trim_end_matches(']');
        let address = format!("{host}:{port}");
        let tcp = tokio::net::TcpStream::connect((dial_host, port))
            .await
            .map_err(|e| FetchError::Connect(address.clone(), e))?;
        if !https {
            return exchange(TokioIo::new(tcp), &parsed, max_body).await;
        }
        let Some(tls) = &self.tls else {
            return Err(FetchError::Tls(
                address,
                std::io::Error::other("no platform root certificates could be loaded"),
            ));
        };
        let name = rustls_pki_types::ServerName::try_from(dial_host.to_owned())
            .map_err(|_| FetchError::Uri(uri.into()))?;
        let stream = tokio_rustls::TlsConnector::from(tls.clone())
            .connect(name, tcp)
            .await
            .map_err(|e| FetchError::Tls(address, e))?;
        exchange(TokioIo::new(stream), &parsed, max_body).await
    }
}

impl FetchJwks for HttpFetch {
    fn fetch<'a>(&'a self, uri: &'a str, max_body: usize) -> FetchFuture<'a> {
        Box::pin(self.get(uri, max_body))
    }
}

/// Aborts the connection task when the exchange ends or is dropped (on timeout).
struct AbortOnDrop(AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// One GET over an established connection; the body is read up to `max_body` bytes.
async fn exchange<I>(io: I, uri: &http::Uri, max_body: usize) -> Result<Bytes, FetchError>
where
    I: hyper::rt::Read + hyper::rt::Write + Send + Unpin + 'static,
{
    let http = |e: hyper::Error| FetchError::Http(e.to_string());
    let (mut sender, connection) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(http)?;
    let _connection = AbortOnDrop(tokio::spawn(connection).abort_handle());
    let authority = uri
        .authority()
        .map(http::uri::Authority::as_str)
        .unwrap_or_default();
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let request = http::Request::get(path)
        .header(http::header::HOST, authority)
        .header(http::header::ACCEPT, "application/json")
        .body(Empty::<Bytes>::new())
        .map_err(|e| FetchError::Http(e.to_string()))?;
    let response = sender.send_request(request).await.map_err(http)?;
    if response.status() != http::StatusCode::OK {
        return Err(FetchError::Status(response.status()));
    }
    let declared = response
        .headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > max_body as u64) {
        return Err(FetchError::TooLarge(max_body));
    }
    let body = Limited::new(response.into_body(), max_body)
        .collect()
        .await
        .map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                FetchError::TooLarge(max_body)
            } else {
                FetchError::Http(e.to_string())
            }
        })?;
    Ok(body.to_bytes())
}
