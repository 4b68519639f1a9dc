//! A certificate authority held by this process: signs workload certificates.
//!
//! The agent uses it while it has no CA service to ask; tests and the demo use it to create
//! a mesh root; the controller's CA service signs agents' certificate requests with it
//! ([`LocalCa::sign_csr`]: the private key stays on the agent). Workload certificates are ECDSA
//! P-256 with exactly one URI SAN (the SPIFFE ID) and no subject CN.

use std::{
    path::Path,
    time::{Duration, SystemTime},
};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use super::Identity;

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("cannot read CA file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("CA material is invalid ({what}): {reason}")]
    Invalid { what: &'static str, reason: String },
    #[error("cannot sign certificate for {identity}: {reason}")]
    Sign { identity: String, reason: String },
    #[error("cannot write CA file {path}: {source} (check the directory exists and is writable)")]
    Write {
        path: String,
        source: std::io::Error,
    },
    #[error("invalid certificate signing request: {0}")]
    Csr(String),
    #[error(
        "the CA private key does not match the CA certificate's public key: use the key the \
         certificate was issued for"
    )]
    KeyMismatch,
    #[error(
        "the CA certificate cannot sign certificates ({0}): use the root or intermediate CA \
         certificate, not a workload or server certificate"
    )]
    NotACa(&'static str),
    #[error("the CA certificate is outside its validity period ({0}): renew or replace the CA")]
    NotValidNow(String),
}

/// Tolerated clock skew between nodes: certificates are valid from a little before issuance.
const BACKDATE: Duration = Duration::from_mins(5);

/// A workload certificate and its private key, leaf first.
pub struct IssuedCert {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

pub struct LocalCa {
    issuer: Issuer<'static, KeyPair>,
    cert_der: CertificateDer<'static>,
    cert_pem: String,
}

impl LocalCa {
    /// Loads a CA from a PEM certificate and a PEM PKCS#8 key.
    pub fn load(cert: &Path, key: &Path) -> Result<Self, CaError> {
        let read = |p: &Path| {
            std::fs::read_to_string(p).map_err(|source| CaError::Read {
                path: p.display().to_string(),
                source,
            })
        };
        Self::from_pem(&read(cert)?, &read(key)?)
    }

    /// Every way a CA is loaded (the agent's static mode, the controller's files and Secret)
    /// comes through here, so a mismatched pair or a non-CA certificate is refused at start
    /// rather than signing certificates that every peer rejects.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, CaError> {
        let key = KeyPair::from_pem(key_pem).map_err(|e| CaError::Invalid {
            what: "private key",
            reason: e.to_string(),
        })?;
        let cert_der = pem_to_der(cert_pem)?;
        check_ca(&cert_der, &key)?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key).map_err(|e| CaError::Invalid {
            what: "certificate",
            reason: e.to_string(),
        })?;
        Ok(Self {
            issuer,
            cert_der,
            cert_pem: cert_pem.to_owned(),
        })
    }

    /// Creates a new self-signed root for a trust domain (valid ten years).
    pub fn generate(trust_domain: &str) -> Result<Self, CaError> {
        let invalid = |e: rcgen::Error| CaError::Invalid {
            what: "new root",
            reason: e.to_string(),
        };
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(invalid)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Trellis");
        dn.push(
            DnType::CommonName,
            format!("Trellis root CA for {trust_domain}"),
        );
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        params.not_after = now + Duration::from_hours(87600);
        let cert = params.self_signed(&key).map_err(invalid)?;
        let key_pem = key.serialize_pem();
        Self::from_pem(&cert.pem(), &key_pem)
    }

    /// The PEM key of this CA, for persisting a generated root.
    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA certificate: the trust anchor workloads verify each other against.
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// Issues a certificate for `identity`, valid for `ttl`, with a fresh P-256 key.
    pub fn issue(&self, identity: &Identity, ttl: Duration) -> Result<IssuedCert, CaError> {
        let fail = sign_error(identity);
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(fail)?;
        let (params, validity) = workload_params(identity, ttl)?;
        let cert = params.signed_by(&key, &self.issuer).map_err(fail)?;
        Ok(IssuedCert {
            chain: vec![cert.der().clone(), self.cert_der.clone()],
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            not_before: validity.0,
            not_after: validity.1,
        })
    }

    /// Loads the CA from `cert` and `key`; when neither file exists, generates a root for
    /// `trust_domain` and persists it there first (the key file is created with mode 0600 and
    /// never overwritten). One file without the other is an error: silently replacing a root
    /// would make every certificate in the mesh untrusted.
    pub fn load_or_generate(cert: &Path, key: &Path, trust_domain: &str) -> Result<Self, CaError> {
        match (cert.try_exists(), key.try_exists()) {
            (Ok(true), Ok(true)) => Self::load(cert, key),
            (Ok(false), Ok(false)) => {
                let ca = Self::generate(trust_domain)?;
                write_new(key, &ca.key_pem(), 0o600)?;
                write_new(cert, ca.cert_pem(), 0o644)?;
                tracing::info!(
                    cert = %cert.display(),
                    key = %key.display(),
                    trust_domain,
                    "generated and persisted a new root CA"
                );
                Ok(ca)
            }
            (Ok(_), Ok(_)) => Err(CaError::Invalid {
                what: "CA files",
                reason: format!(
                    "only one of {} and {} exists: restore the missing file, or remove both to generate a new root",
                    cert.display(),
                    key.display()
                ),
            }),
            (Err(source), _) => Err(CaError::Read {
                path: cert.display().to_string(),
                source,
            }),
            (_, Err(source)) => Err(CaError::Read {
                path: key.display().to_string(),
                source,
            }),
        }
    }

    /// Signs a certificate for `identity` over the public key of a PEM PKCS#10 request whose
    /// private key stays with the requester. Only the public key is taken from the request (its
    /// signature proves possession of the key); subject and extensions are ignored and the
    /// certificate is built exactly as [`LocalCa::issue`] builds one: one URI SAN, no CN. The
    /// key must be ECDSA P-256. The chain is leaf first and excludes the root.
    pub fn sign_csr(
        &self,
        csr_pem: &str,
        identity: &Identity,
        ttl: Duration,
    ) -> Result<SignedCert, CaError> {
        let csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem).map_err(|e| {
            CaError::Csr(format!(
                "cannot parse or verify the certificate request: {e}"
            ))
        })?;
        require_p256(csr_pem)?;
        let (params, validity) = workload_params(identity, ttl)?;
        let cert = params
            .signed_by(&csr.public_key, &self.issuer)
            .map_err(sign_error(identity))?;
        Ok(SignedCert {
            chain_pem: vec![cert.pem()],
            not_before: validity.0,
            not_after: validity.1,
        })
    }

    /// Issues a TLS serving certificate with a fresh P-256 key: the URI SAN of `identity` plus
    /// the DNS names and IP addresses clients dial. For the controller's own endpoint; workload
    /// certificates never carry anything but their URI SAN.
    pub fn issue_serving(
        &self,
        identity: &Identity,
        dns_names: &[String],
        ips: &[std::net::IpAddr],
        ttl: Duration,
    ) -> Result<ServingCert, CaError> {
        let fail = sign_error(identity);
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(fail)?;
        let (mut params, validity) = workload_params(identity, ttl)?;
        for name in dns_names {
            let name = name.clone().try_into().map_err(fail)?;
            params.subject_alt_names.push(SanType::DnsName(name));
        }
        params
            .subject_alt_names
            .extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
        let cert = params.signed_by(&key, &self.issuer).map_err(fail)?;
        Ok(ServingCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            not_after: validity.1,
        })
    }
}

/// A TLS serving certificate (PEM, leaf only) and its PEM PKCS#8 key.
pub struct ServingCert {
    pub cert_pem: String,
    pub key_pem: String,
    pub not_after: SystemTime,
}

/// A certificate signed for a key the requester holds.
#[derive(Clone, Debug)]
pub struct SignedCert {
    /// PEM certificates, leaf first, up to and excluding the root.
    pub chain_pem: Vec<String>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

fn sign_error(identity: &Identity) -> impl Fn(rcgen::Error) -> CaError + Copy + '_ {
    move |e| CaError::Sign {
        identity: identity.to_string(),
        reason: e.to_string(),
    }
}

/// The parameters of every workload certificate: exactly one URI SAN (the SPIFFE ID), no
/// subject, usable for both ends of mutual TLS, backdated for clock skew. Returns the validity
/// window too.
fn workload_params(
    identity: &Identity,
    ttl: Duration,
) -> Result<(CertificateParams, (SystemTime, SystemTime)), CaError> {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    let uri = identity
        .to_string()
        .try_into()
        .map_err(sign_error(identity))?;
    params.subject_alt_names = vec![SanType::URI(uri)];
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyAgreement,
    ];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    // Backdating covers clock skew with the peers that verify the certificate. It is capped
    // at a quarter of the lifetime: otherwise a short-lived certificate's validity would lie
    // mostly in the past, and renewal at half of it would be due on arrival (a renewal loop).
    let backdate = BACKDATE.min(ttl / 4);
    let now = time::OffsetDateTime::now_utc();
    // Checked: a lifetime past the end of the calendar the certificate can express must be a
    // refusal, never a panic in the signer.
    let not_after = time::Duration::try_from(ttl)
        .ok()
        .and_then(|ttl| now.checked_add(ttl))
        .ok_or_else(|| CaError::Sign {
            identity: identity.to_string(),
            reason: format!("a lifetime of {} s is out of range", ttl.as_secs()),
        })?;
    params.not_before = now - backdate;
    params.not_after = not_after;
    Ok((params, ((now - backdate).into(), not_after.into())))
}

/// A signing pair is usable only if the key is the certificate's, the certificate is a CA
/// (basicConstraints CA=true) allowed to sign certificates (keyCertSign, when key usage is
/// restricted at all), and it is valid now: otherwise peers reject everything it signs.
fn check_ca(cert_der: &CertificateDer<'_>, key: &KeyPair) -> Result<(), CaError> {
    use x509_parser::prelude::FromDer;
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(cert_der).map_err(|e| {
        CaError::Invalid {
            what: "certificate",
            reason: format!("not an X.509 certificate: {e}"),
        }
    })?;
    if cert.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
        return Err(CaError::KeyMismatch);
    }
    if !cert.is_ca() {
        return Err(CaError::NotACa("basicConstraints does not say CA=true"));
    }
    match cert.key_usage() {
        Ok(Some(usage)) if !usage.value.key_cert_sign() => {
            return Err(CaError::NotACa("key usage lacks keyCertSign"));
        }
        Ok(_) => {}
        Err(e) => {
            return Err(CaError::Invalid {
                what: "certificate",
                reason: format!("unreadable key usage extension: {e}"),
            });
        }
    }
    let validity = cert.validity();
    if !validity.is_valid() {
        return Err(CaError::NotValidNow(format!(
            "valid from {} to {}",
            validity.not_before, validity.not_after
        )));
    }
    Ok(())
}

/// The mesh only uses ECDSA P-256 keys; the request's signature algorithm alone does not say
/// which curve its key is on, so the subject public key info is checked.
fn require_p256(csr_pem: &str) -> Result<(), CaError> {
    use rustls_pki_types::{CertificateSigningRequestDer, pem::PemObject};
    use x509_parser::{
        certification_request::X509CertificationRequest,
        oid_registry::{OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY},
        prelude::FromDer,
    };
    let der = CertificateSigningRequestDer::from_pem_slice(csr_pem.as_bytes())
        .map_err(|e| CaError::Csr(format!("not a PEM certificate request: {e}")))?;
    let (_, csr) = X509CertificationRequest::from_der(der.as_ref())
        .map_err(|e| CaError::Csr(format!("unparseable certificate request: {e}")))?;
    let spki = &csr.certification_request_info.subject_pki;
    let curve = spki
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.as_oid().ok());
    if spki.algorithm.algorithm == OID_KEY_TYPE_EC_PUBLIC_KEY && curve == Some(OID_EC_P256) {
        Ok(())
    } else {
        Err(CaError::Csr(
            "the request's key is not ECDSA P-256: generate a P-256 key".into(),
        ))
    }
}

/// Creates `path` (and its directory) with `mode`, failing if it already exists so that two
/// controllers starting at once cannot overwrite each other's root.
fn write_new(path: &Path, contents: &str, mode: u32) -> Result<(), CaError> {
    use std::{io::Write, os::unix::fs::OpenOptionsExt};
    let fail = |source| CaError::Write {
        path: path.display().to_string(),
        source,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(fail)?;
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(fail)?;
    file.write_all(contents.as_bytes()).map_err(fail)?;
    file.sync_all().map_err(fail)
}

fn pem_to_der(pem: &str) -> Result<CertificateDer<'static>, CaError> {
    use rustls_pki_types::pem::PemObject;
    CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|e| CaError::Invalid {
        what: "certificate PEM",
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(tag: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("trellis-ca-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn load_or_generate_creates_once_then_loads() {
        let dir = temp_dir("persist");
        let (cert, key) = (dir.join("ca.pem"), dir.join("ca-key.pem"));
        let first = LocalCa::load_or_generate(&cert, &key, "cluster.local").expect("generated");
        let second = LocalCa::load_or_generate(&cert, &key, "cluster.local").expect("loaded");
        assert_eq!(first.cert_pem(), second.cert_pem());
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&key).expect("key").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);

        std::fs::remove_file(&key).expect("remove key");
        let err = LocalCa::load_or_generate(&cert, &key, "cluster.local")
            .err()
            .expect("half a CA is refused");
        assert!(err.to_string().contains("only one of"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_short_lived_certificate_is_not_due_for_renewal_on_arrival() {
        let ca = LocalCa::generate("cluster.local").expect("ca");
        let id = Identity::new("cluster.local", "shop", "web").expect("id");
        let now = SystemTime::now();
        let issued = ca.issue(&id, Duration::from_secs(20)).expect("issued");
        let life = issued
            .not_after
            .duration_since(issued.not_before)
            .expect("positive life");
        assert!(
            life <= Duration::from_secs(26),
            "backdated by at most a quarter: {life:?}"
        );
        assert!(
            issued.not_before + life / 2 > now,
            "half life is still ahead"
        );
        // Long-lived certificates keep the full five minutes of skew tolerance.
        let day = ca.issue(&id, Duration::from_hours(24)).expect("issued");
        let life = day.not_after.duration_since(day.not_before).expect("life");
        assert_eq!(life.as_secs(), 24 * 3600 + 300);
    }

    #[test]
    fn a_pair_that_cannot_sign_is_refused() {
        let root = LocalCa::generate("cluster.local").expect("root");
        let other = LocalCa::generate("cluster.local").expect("other");
        assert!(LocalCa::from_pem(root.cert_pem(), &root.key_pem()).is_ok());
        assert!(matches!(
            LocalCa::from_pem(root.cert_pem(), &other.key_pem()),
            Err(CaError::KeyMismatch)
        ));
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("key");
        let leaf = CertificateParams::new(vec!["leaf.example".into()])
            .expect("params")
            .self_signed(&key)
            .expect("leaf");
        assert!(matches!(
            LocalCa::from_pem(&leaf.pem(), &key.serialize_pem()),
            Err(CaError::NotACa(_))
        ));
        let mut expired = CertificateParams::default();
        expired.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        expired.not_before = time::OffsetDateTime::now_utc() - Duration::from_hours(2);
        expired.not_after = time::OffsetDateTime::now_utc() - Duration::from_hours(1);
        let expired = expired.self_signed(&key).expect("expired");
        assert!(matches!(
            LocalCa::from_pem(&expired.pem(), &key.serialize_pem()),
            Err(CaError::NotValidNow(_))
        ));
    }

    #[test]
    fn a_lifetime_beyond_the_calendar_is_an_error_not_a_panic() {
        let ca = LocalCa::generate("cluster.local").expect("ca");
        let id = Identity::new("cluster.local", "shop", "web").expect("id");
        assert!(matches!(
            ca.issue(&id, Duration::from_secs(u64::MAX)),
            Err(CaError::Sign { .. })
        ));
        assert!(matches!(
            ca.issue(&id, Duration::from_hours(1_752_000)),
            Ok(_) | Err(CaError::Sign { .. })
        ));
    }

    #[test]
    fn sign_csr_takes_only_the_public_key() {
        let ca = LocalCa::generate("cluster.local").expect("ca");
        let id = Identity::new("cluster.local", "shop", "web").expect("id");
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("key");
        let mut params = CertificateParams::new(vec!["admin.example.com".into()]).expect("params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, "root");
        let csr = params
            .serialize_request(&key)
            .expect("csr")
            .pem()
            .expect("pem");
        let signed = ca
            .sign_csr(&csr, &id, Duration::from_hours(1))
            .expect("signed");
        assert_eq!(signed.chain_pem.len(), 1);

        use rustls_pki_types::pem::PemObject;
        use x509_parser::prelude::FromDer;
        let der = CertificateDer::from_pem_slice(signed.chain_pem[0].as_bytes()).expect("pem");
        let (_, cert) = x509_parser::certificate::X509Certificate::from_der(&der).expect("der");
        assert!(!cert.is_ca(), "the request cannot make itself a CA");
        assert_eq!(
            cert.subject().iter().count(),
            0,
            "no subject from the request"
        );
        let csr_der =
            rustls_pki_types::CertificateSigningRequestDer::from_pem_slice(csr.as_bytes())
                .expect("csr pem");
        let (_, req) = x509_parser::certification_request::X509CertificationRequest::from_der(
            csr_der.as_ref(),
        )
        .expect("csr der");
        assert_eq!(
            cert.public_key().raw,
            req.certification_request_info.subject_pki.raw
        );
        assert_eq!(crate::tls::identity_of(&der).expect("id"), id);

        let p384 = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).expect("key");
        let csr = CertificateParams::default()
            .serialize_request(&p384)
            .expect("csr")
            .pem()
            .expect("pem");
        assert!(matches!(
            ca.sign_csr(&csr, &id, Duration::from_hours(1)),
            Err(CaError::Csr(_))
        ));
    }
}
