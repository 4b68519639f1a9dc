//! The control plane's keys and certificates, made fresh for each cluster: a CA, the API
//! server's serving certificate, the admin's client certificate (group `system:masters`), and
//! the service-account token signing key.

use std::{net::IpAddr, path::Path};

use anyhow::{Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

/// File names below the cluster's `pki/` directory.
pub const CA_CERT: &str = "ca.pem";
pub const SERVING_CERT: &str = "apiserver.pem";
pub const SERVING_KEY: &str = "apiserver-key.pem";
pub const ADMIN_CERT: &str = "admin.pem";
pub const ADMIN_KEY: &str = "admin-key.pem";
pub const SA_KEY: &str = "service-account-key.pem";
pub const SA_PUBLIC_KEY: &str = "service-account.pub";

/// Writes every file into `dir`; the serving certificate names `addresses`, `localhost` and
/// the in-cluster names of the `kubernetes` Service.
pub fn write(dir: &Path, addresses: &[IpAddr]) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let ca_key = KeyPair::generate().context("CA key")?;
    let mut ca = CertificateParams::new(Vec::<String>::new()).context("CA params")?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "trellis test cluster CA");
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca.self_signed(&ca_key).context("self-signing the CA")?;
    let issuer = Issuer::new(ca, ca_key);
    write_file(dir, CA_CERT, &ca_cert.pem())?;

    let mut serving = CertificateParams::new(vec![
        "localhost".to_owned(),
        "kubernetes".to_owned(),
        "kubernetes.default".to_owned(),
        "kubernetes.default.svc".to_owned(),
        "kubernetes.default.svc.cluster.local".to_owned(),
    ])
    .context("serving params")?;
    serving
        .subject_alt_names
        .extend(addresses.iter().map(|ip| SanType::IpAddress(*ip)));
    serving
        .distinguished_name
        .push(DnType::CommonName, "kube-apiserver");
    serving.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let key = KeyPair::generate().context("serving key")?;
    let cert = serving.signed_by(&key, &issuer).context("serving cert")?;
    write_file(dir, SERVING_CERT, &cert.pem())?;
    write_file(dir, SERVING_KEY, &key.serialize_pem())?;

    let mut admin = CertificateParams::new(Vec::<String>::new()).context("admin params")?;
    admin.distinguished_name.push(DnType::CommonName, "admin");
    admin
        .distinguished_name
        .push(DnType::OrganizationName, "system:masters");
    admin.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let key = KeyPair::generate().context("admin key")?;
    let cert = admin.signed_by(&key, &issuer).context("admin cert")?;
    write_file(dir, ADMIN_CERT, &cert.pem())?;
    write_file(dir, ADMIN_KEY, &key.serialize_pem())?;

    // ES256: the API server signs service-account tokens with the key and verifies them with
    // its public half.
    let sa = KeyPair::generate().context("service-account key")?;
    write_file(dir, SA_KEY, &sa.serialize_pem())?;
    write_file(dir, SA_PUBLIC_KEY, &sa.public_key_pem())?;
    Ok(())
}

fn write_file(dir: &Path, name: &str, contents: &str) -> Result<()> {
    use std::{io::Write, os::unix::fs::OpenOptionsExt};
    let path = dir.join(name);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("creating {}", path.display()))?;
    file.write_all(contents.as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}
