//! The certificates this node holds for its local workloads, one per identity, and the task
//! that keeps them.
//!
//! Readers (TLS handshakes on both sides) take a lock-free snapshot of the [`CertStore`]; its
//! only writer is the [`CertManager`], which makes the held set follow the local identities
//! of the mesh state: it fetches certificates for new local pods as soon as they appear,
//! renews at half life, keeps a certificate whose renewal fails until it actually expires
//! (retrying with backoff), and drops certificates of identities no longer on this node.
//!
//! Certificates come from an [`Issuer`]: the agent's own CA (static mode) or the controller's
//! CA service. For the latter the key pair is generated here and only a CSR leaves the agent;
//! what comes back is used only if it chains to the mesh root, carries exactly the identity
//! asked for, matches our key, and is valid now.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::Arc,
    time::{Duration, SystemTime},
};

use arc_swap::ArcSwap;
use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use futures_util::StreamExt;
use rcgen::{CertificateParams, DistinguishedName, KeyPair, PKCS_ECDSA_P256_SHA256, SanType};
use rustls::{ClientConfig, RootCertStore, crypto::CryptoProvider, sign::CertifiedKey};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, UnixTime};
use tokio::{sync::watch, time::Instant};
use tokio_util::sync::CancellationToken;

use super::{
    Identity, LocalCa,
    ca::{CaError, IssuedCert},
};
use crate::{
    api::v1::{SignRequest, certificate_authority_client::CertificateAuthorityClient},
    control_plane::channel::{BearerToken, ChannelError},
    state::MeshState,
    tls::{self, TlsError},
};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Ca(#[from] CaError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("no trust anchor given")]
    NoRoots,
}

/// Why a certificate could not be obtained for one identity.
#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    #[error(transparent)]
    Ca(#[from] CaError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Credential(#[from] ChannelError),
    #[error("cannot build a certificate request for {identity}: {reason}")]
    Request { identity: Identity, reason: String },
    #[error("certificate authority refused to sign {identity}: {code:?}: {message}")]
    Refused {
        identity: Identity,
        code: tonic::Code,
        message: String,
    },
    #[error("certificate authority did not answer for {identity} within {timeout:?}")]
    Timeout {
        identity: Identity,
        timeout: Duration,
    },
    #[error("certificate authority returned an unusable certificate for {identity}: {reason}")]
    Invalid { identity: Identity, reason: String },
    #[error("certificate authority signed {presented} when {identity} was asked for")]
    WrongIdentity {
        identity: Identity,
        presented: String,
    },
    #[error(
        "certificate for {identity} is not valid yet (is this node's clock behind the certificate authority's?)"
    )]
    NotYetValid { identity: Identity },
    #[error("certificate for {identity} does not match the key this agent generated")]
    KeyMismatch { identity: Identity },
}

/// One identity's current certificate, with everything a handshake needs ready-made.
pub struct WorkloadCert {
    pub identity: Identity,
    /// What the inbound listener presents when a client asks for this identity.
    pub server_key: Arc<CertifiedKey>,
    /// What the outbound side uses to open HBONE connections as this identity.
    pub client_config: Arc<ClientConfig>,
    /// The leaf's serial number (lowercase hex): tells apart successive certificates of one
    /// identity in the config dump and in peers' access logs.
    pub serial: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl WorkloadCert {
    /// Renewal is due at half of the lifetime.
    pub fn renew_at(&self) -> SystemTime {
        let life = self
            .not_after
            .duration_since(self.not_before)
            .unwrap_or_default();
        self.not_before + life / 2
    }
}

/// The held certificates, read by every handshake.
pub struct CertStore {
    provider: Arc<CryptoProvider>,
    roots: Arc<RootCertStore>,
    trust_domain: String,
    certs: ArcSwap<HashMap<Identity, Arc<WorkloadCert>>>,
    /// The last failure per identity still failing, for the config dump.
    failures: ArcSwap<BTreeMap<String, String>>,
    /// Bumped after every change of `certs`, so a connection can wait for a certificate that
    /// is being fetched instead of failing in the moment between enrollment and issuance.
    generation: watch::Sender<u64>,
}

impl CertStore {
    /// A store trusting `roots` (the mesh's trust bundle).
    pub fn new(
        provider: Arc<CryptoProvider>,
        roots: &[CertificateDer<'static>],
        trust_domain: &str,
    ) -> Result<Self, StoreError> {
        if roots.is_empty() {
            return Err(StoreError::NoRoots);
        }
        let mut store = RootCertStore::empty();
        for root in roots {
            store
                .add(root.clone())
                .map_err(|e| StoreError::Tls(TlsError::Roots(e)))?;
        }
        Ok(Self {
            provider,
            roots: Arc::new(store),
            trust_domain: trust_domain.into(),
            certs: ArcSwap::default(),
            failures: ArcSwap::default(),
            generation: watch::Sender::new(0),
        })
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }
    pub fn roots(&self) -> &Arc<RootCertStore> {
        &self.roots
    }
    pub fn provider(&self) -> &Arc<CryptoProvider> {
        &self.provider
    }

    /// The current certificate for `identity`, if this node holds one.
    pub fn get(&self, identity: &Identity) -> Option<Arc<WorkloadCert>> {
        self.certs.load().get(identity).cloned()
    }

    /// The certificate for `identity`, waiting up to `max` for it to be issued. Callers wait
    /// only for identities of local workloads, which the manager is fetching (a new pod's first
    /// connection may come before its certificate); anything else fails at once with `get`.
    pub async fn wait_for(&self, identity: &Identity, max: Duration) -> Option<Arc<WorkloadCert>> {
        let mut updates = self.generation.subscribe();
        let wait = async {
            loop {
                if let Some(cert) = self.get(identity) {
                    return cert;
                }
                if updates.changed().await.is_err() {
                    // Unreachable while `self` lives (it owns the sender); never spin.
                    std::future::pending::<()>().await;
                }
            }
        };
        tokio::time::timeout(max, wait).await.ok()
    }

    /// Every certificate held, for the config dump.
    pub fn snapshot(&self) -> Arc<HashMap<Identity, Arc<WorkloadCert>>> {
        self.certs.load_full()
    }

    /// Identities whose last attempt failed, with the reason.
    pub fn failures(&self) -> Arc<BTreeMap<String, String>> {
        self.failures.load_full()
    }

    /// The earliest time any held certificate is due for renewal.
    pub fn next_renewal(&self) -> Option<SystemTime> {
        self.certs.load().values().map(|c| c.renew_at()).min()
    }

    /// Turns an issued certificate into handshake material, refusing one whose certificate
    /// does not belong to its key.
    fn prepare(&self, identity: &Identity, issued: IssuedCert) -> Result<WorkloadCert, IssueError> {
        let server_key =
            tls::certified_key(&self.provider, issued.chain.clone(), issued.key.clone_key())?;
        if server_key.keys_match().is_err() {
            return Err(IssueError::KeyMismatch {
                identity: identity.clone(),
            });
        }
        let client_config = tls::client_config(
            self.provider.clone(),
            self.roots.clone(),
            &self.trust_domain,
            issued.chain,
            issued.key,
        )?;
        let serial = server_key
            .cert
            .first()
            .and_then(certificate_serial)
            .unwrap_or_default();
        Ok(WorkloadCert {
            identity: identity.clone(),
            server_key,
            client_config: Arc::new(client_config),
            serial,
            not_before: issued.not_before,
            not_after: issued.not_after,
        })
    }
}

/// A certificate's serial number as lowercase hex (`None` if it does not parse).
pub fn certificate_serial(cert: &CertificateDer<'_>) -> Option<String> {
    use x509_parser::prelude::FromDer;
    let (_, parsed) = x509_parser::certificate::X509Certificate::from_der(cert).ok()?;
    Some(
        parsed
            .raw_serial()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect(),
    )
}

/// A certificate's validity period, `(not_before, not_after)` (`None` if it does not parse;
/// times before the epoch read as the epoch).
pub fn certificate_validity(cert: &CertificateDer<'_>) -> Option<(SystemTime, SystemTime)> {
    use x509_parser::prelude::FromDer;
    let (_, parsed) = x509_parser::certificate::X509Certificate::from_der(cert).ok()?;
    let at = |t: x509_parser::time::ASN1Time| {
        SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(t.timestamp()).unwrap_or(0))
    };
    Some((
        at(parsed.validity().not_before),
        at(parsed.validity().not_after),
    ))
}

impl std::fmt::Debug for CertStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertStore")
            .field("identities", &self.certs.load().len())
            .finish_non_exhaustive()
    }
}

/// Serves the inbound listener: presents the certificate of the identity the client asked for
/// (by server name), and only to clients that speak HTTP/2.
impl rustls::server::ResolvesServerCert for CertStore {
    fn resolve(&self, hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let offers_h2 = hello
            .alpn()
            .is_some_and(|mut protos| protos.any(|p| p == tls::ALPN_H2));
        if !offers_h2 {
            tracing::debug!("refusing handshake: client did not offer ALPN h2");
            return None;
        }
        let name = hello.server_name()?;
        let identity = Identity::from_sni(name, &self.trust_domain).ok()?;
        self.get(&identity).map(|c| c.server_key.clone())
    }
}

/// Where workload certificates come from.
pub enum Issuer {
    /// Static mode: the agent signs with a CA it holds.
    Local(LocalCa),
    /// The controller's CA service.
    Remote(RemoteCa),
}

impl Issuer {
    async fn issue(&self, identity: &Identity, ttl: Duration) -> Result<IssuedCert, IssueError> {
        match self {
            Issuer::Local(ca) => Ok(ca.issue(identity, ttl)?),
            Issuer::Remote(ca) => ca.issue(identity, ttl).await,
        }
    }
}

/// The controller's `CertificateAuthority` service.
pub struct RemoteCa {
    client: CertificateAuthorityClient<tonic::transport::Channel>,
    token: BearerToken,
    roots: Arc<RootCertStore>,
    provider: Arc<CryptoProvider>,
    timeout: Duration,
}

/// How long one signing request may take, connection included.
const SIGN_TIMEOUT: Duration = Duration::from_secs(10);

impl RemoteCa {
    /// Signs through `channel`, proving the node with `token`; results must chain to `roots`.
    pub fn new(
        channel: tonic::transport::Channel,
        token: BearerToken,
        roots: Arc<RootCertStore>,
        provider: Arc<CryptoProvider>,
    ) -> Self {
        Self {
            client: CertificateAuthorityClient::new(channel),
            token,
            roots,
            provider,
            timeout: SIGN_TIMEOUT,
        }
    }

    /// Generates a key pair, sends only its CSR, and verifies what comes back.
    async fn issue(&self, identity: &Identity, ttl: Duration) -> Result<IssuedCert, IssueError> {
        let request_error = |e: rcgen::Error| IssueError::Request {
            identity: identity.clone(),
            reason: e.to_string(),
        };
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(request_error)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(
            identity.to_string().try_into().map_err(request_error)?,
        )];
        let csr_pem = params
            .serialize_request(&key)
            .and_then(|csr| csr.pem())
            .map_err(request_error)?;
        let mut request = tonic::Request::new(SignRequest {
            csr_pem,
            identity: identity.to_string(),
            ttl_secs: ttl.as_secs(),
        });
        request.set_timeout(self.timeout);
        self.token.authorize(&mut request).await?;
        let mut client = self.client.clone();
        let response = tokio::time::timeout(self.timeout, client.sign(request))
            .await
            .map_err(|_| IssueError::Timeout {
                identity: identity.clone(),
                timeout: self.timeout,
            })?
            .map_err(|status| IssueError::Refused {
                identity: identity.clone(),
                code: status.code(),
                message: status.message().to_owned(),
            })?
            .into_inner();
        let chain = parse_chain(identity, &response.chain_pem)?;
        let (not_before, not_after) = verify_issued(
            identity,
            &chain,
            &self.roots,
            &self.provider,
            UnixTime::now(),
        )?;
        Ok(IssuedCert {
            chain,
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            not_before,
            not_after,
        })
    }
}

fn parse_chain(
    identity: &Identity,
    pems: &[String],
) -> Result<Vec<CertificateDer<'static>>, IssueError> {
    use rustls_pki_types::pem::PemObject;
    let invalid = |reason: String| IssueError::Invalid {
        identity: identity.clone(),
        reason,
    };
    let mut chain = Vec::new();
    for pem in pems {
        for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
            chain.push(cert.map_err(|e| invalid(format!("bad PEM: {e}")))?);
        }
    }
    if chain.is_empty() {
        return Err(invalid("empty chain".into()));
    }
    Ok(chain)
}

/// Checks a returned chain (leaf first) before it is used: it chains to the mesh roots at
/// `now`, and the leaf names exactly `identity`. Returns the leaf's validity.
fn verify_issued(
    identity: &Identity,
    chain: &[CertificateDer<'static>],
    roots: &RootCertStore,
    provider: &CryptoProvider,
    now: UnixTime,
) -> Result<(SystemTime, SystemTime), IssueError> {
    use rustls::{CertificateError, Error as RustlsError};
    let invalid = |reason: String| IssueError::Invalid {
        identity: identity.clone(),
        reason,
    };
    let (leaf, intermediates) = chain
        .split_first()
        .ok_or_else(|| invalid("empty chain".into()))?;
    let parsed = rustls::server::ParsedCertificate::try_from(leaf)
        .map_err(|e| invalid(format!("unparseable leaf: {e}")))?;
    match rustls::client::verify_server_cert_signed_by_trust_anchor(
        &parsed,
        roots,
        intermediates,
        now,
        provider.signature_verification_algorithms.all,
    ) {
        Ok(()) => {}
        Err(RustlsError::InvalidCertificate(
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. },
        )) => {
            return Err(IssueError::NotYetValid {
                identity: identity.clone(),
            });
        }
        Err(e) => return Err(invalid(format!("does not chain to the mesh root: {e}"))),
    }
    let presented = tls::identity_of(leaf).map_err(|e| IssueError::WrongIdentity {
        identity: identity.clone(),
        presented: e.to_string(),
    })?;
    if &presented != identity {
        return Err(IssueError::WrongIdentity {
            identity: identity.clone(),
            presented: presented.to_string(),
        });
    }
    certificate_validity(leaf).ok_or_else(|| invalid("unparseable leaf validity".into()))
}

/// Per-identity retry state after a failed attempt.
struct Retry {
    backoff: ExponentialBackoff,
    next_attempt: Instant,
    failures: u32,
    last_error: String,
}

/// How many certificates are requested at once.
const CONCURRENT_REQUESTS: usize = 8;

/// The only writer of a [`CertStore`]: issues, renews, retries and drops.
pub struct CertManager {
    store: Arc<CertStore>,
    issuer: Issuer,
    ttl: Duration,
    retries: HashMap<Identity, Retry>,
    backoff: ExponentialBuilder,
}

impl CertManager {
    pub fn new(store: Arc<CertStore>, issuer: Issuer, ttl: Duration) -> Self {
        Self {
            store,
            issuer,
            ttl,
            retries: HashMap::new(),
            backoff: ExponentialBuilder::default()
                .with_min_delay(Duration::from_secs(1))
                .with_max_delay(Duration::from_mins(1))
                .with_jitter()
                .without_max_times(),
        }
    }

    /// Shortens the retry delays (tests).
    pub fn with_backoff(mut self, min: Duration, max: Duration) -> Self {
        self.backoff = self.backoff.with_min_delay(min).with_max_delay(max);
        self
    }

    /// Makes the held set follow `wanted`: requests what is missing or due for renewal (and
    /// not waiting for a retry), keeps what is still valid, drops the rest. Returns the
    /// failures of this round.
    pub async fn reconcile(&mut self, wanted: &HashSet<Identity>) -> Vec<(Identity, IssueError)> {
        self.retries.retain(|id, _| wanted.contains(id));
        let now = SystemTime::now();
        let clock = Instant::now();
        let current = self.store.snapshot();
        let due: Vec<Identity> = wanted
            .iter()
            .filter(|id| current.get(*id).is_none_or(|c| c.renew_at() <= now))
            .filter(|id| {
                self.retries
                    .get(*id)
                    .is_none_or(|r| r.next_attempt <= clock)
            })
            .cloned()
            .collect();

        let (issuer, store, ttl) = (&self.issuer, &self.store, self.ttl);
        let results: Vec<(Identity, Result<WorkloadCert, IssueError>)> =
            futures_util::stream::iter(due)
                .map(|identity| async move {
                    let result = match issuer.issue(&identity, ttl).await {
                        Ok(issued) => store.prepare(&identity, issued),
                        Err(e) => Err(e),
                    };
                    (identity, result)
                })
                .buffer_unordered(CONCURRENT_REQUESTS)
                .collect()
                .await;

        let mut fresh = HashMap::new();
        let mut failed = Vec::new();
        for (identity, result) in results {
            match result {
                Ok(cert) => {
                    tracing::info!(%identity, serial = %cert.serial, not_after = ?cert.not_after, "workload certificate issued");
                    self.retries.remove(&identity);
                    fresh.insert(identity, Arc::new(cert));
                }
                Err(e) => {
                    self.schedule_retry(&identity, &e, current.get(&identity));
                    failed.push((identity, e));
                }
            }
        }

        let mut next = HashMap::with_capacity(wanted.len());
        for identity in wanted {
            if let Some(cert) = fresh.remove(identity) {
                next.insert(identity.clone(), cert);
            } else if let Some(cert) = current.get(identity) {
                if cert.not_after > now {
                    next.insert(identity.clone(), cert.clone());
                } else {
                    tracing::error!(%identity, "workload certificate expired and could not be renewed; connections as this identity now fail");
                }
            }
        }
        for identity in current.keys().filter(|id| !wanted.contains(*id)) {
            tracing::info!(%identity, "dropping certificate: no local workload has this identity");
        }
        self.store.certs.store(Arc::new(next));
        self.store
            .generation
            .send_modify(|g| *g = g.wrapping_add(1));
        let failures: BTreeMap<String, String> = self
            .retries
            .iter()
            .map(|(id, r)| (id.to_string(), r.last_error.clone()))
            .collect();
        self.store.failures.store(Arc::new(failures));
        failed
    }

    fn schedule_retry(
        &mut self,
        identity: &Identity,
        error: &IssueError,
        held: Option<&Arc<WorkloadCert>>,
    ) {
        let builder = self.backoff;
        let retry = self
            .retries
            .entry(identity.clone())
            .or_insert_with(|| Retry {
                backoff: builder.build(),
                next_attempt: Instant::now(),
                failures: 0,
                last_error: String::new(),
            });
        retry.failures += 1;
        retry.last_error = error.to_string();
        // A certificate that is not valid yet means the clocks disagree: ask again at once,
        // since a later request may land inside its validity, but only once; after that, back
        // off like any other failure.
        let delay = if matches!(error, IssueError::NotYetValid { .. }) && retry.failures == 1 {
            Duration::ZERO
        } else {
            retry.backoff.next().unwrap_or(Duration::from_mins(1))
        };
        retry.next_attempt = Instant::now() + delay;
        match held {
            Some(cert) => {
                tracing::warn!(%identity, error = %error, retry_in_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX), valid_until = ?cert.not_after, "certificate renewal failed; keeping the current certificate");
            }
            None => {
                tracing::warn!(%identity, error = %error, retry_in_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX), "cannot obtain a workload certificate");
            }
        }
    }

    /// When [`CertManager::reconcile`] next has something to do: a retry, a renewal, or an
    /// expiry to act on.
    pub fn next_wake(&self) -> Option<Instant> {
        let now = SystemTime::now();
        let clock = Instant::now();
        let at = |t: SystemTime| clock + t.duration_since(now).unwrap_or_default();
        let held = self.store.snapshot();
        let mut wake: Option<Instant> = None;
        let mut consider = |t: Instant| wake = Some(wake.map_or(t, |w| w.min(t)));
        for (identity, cert) in held.iter() {
            consider(at(cert.not_after));
            if !self.retries.contains_key(identity) {
                consider(at(cert.renew_at()));
            }
        }
        for retry in self.retries.values() {
            consider(retry.next_attempt);
        }
        wake
    }

    /// Follows the local identities of every new state until `shutdown`. `None` (no state
    /// yet) holds nothing back and changes nothing.
    /// `prefetched` fires once the first state's certificates were requested (issued or
    /// failed), which the agent's readiness waits for.
    pub async fn run(
        self,
        states: watch::Receiver<Option<Arc<MeshState>>>,
        prefetched: tokio::sync::oneshot::Sender<()>,
        shutdown: CancellationToken,
    ) {
        self.follow(
            states,
            |s| s.as_ref().map(|s| s.local_identities()),
            (prefetched, Prefetched::Requested),
            shutdown,
        )
        .await;
    }

    /// Keeps the certificates of `wanted(state)` for every new state until `shutdown` (a
    /// waypoint wants its one identity whatever the state). `prefetched` fires once, when
    /// the first wanted set is as far as its [`Prefetched`] says.
    pub async fn follow<S>(
        mut self,
        mut states: watch::Receiver<S>,
        wanted: impl Fn(&S) -> Option<HashSet<Identity>>,
        (prefetched, when): (tokio::sync::oneshot::Sender<()>, Prefetched),
        shutdown: CancellationToken,
    ) {
        let mut states_open = true;
        let mut prefetched = Some(prefetched);
        loop {
            let wanted = wanted(&states.borrow_and_update());
            if let Some(wanted) = wanted {
                self.reconcile(&wanted).await;
                let done = match when {
                    Prefetched::Requested => true,
                    Prefetched::Held => {
                        let held = self.store.snapshot();
                        wanted.iter().all(|identity| held.contains_key(identity))
                    }
                };
                if done && let Some(prefetched) = prefetched.take() {
                    let _ = prefetched.send(());
                }
            }
            let wake = self.next_wake();
            tokio::select! {
                () = shutdown.cancelled() => return,
                changed = states.changed(), if states_open => states_open = changed.is_ok(),
                () = sleep_until(wake) => {}
            }
        }
    }
}

/// When [`CertManager::follow`] reports the first certificates as prefetched.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Prefetched {
    /// Every wanted certificate was requested, issued or not: an agent serves the workloads
    /// it holds certificates for while it retries the others.
    Requested,
    /// Every wanted certificate is held: a waypoint with no certificate can serve nothing.
    Held,
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
