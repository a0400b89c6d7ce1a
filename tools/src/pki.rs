//! The development PKI: the device CA, the MQTT broker's server certificate
//! and the initial (empty) CRL, made with rcgen. Generated on first run under
//! the state folder, never committed. Device certificates are issued by
//! command-api at registration (`homelink_kit::pki::DeviceCa`).

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use std::path::{Path, PathBuf};
use uuid::Uuid;

/// The files of a PKI folder.
#[derive(Debug, Clone)]
pub struct PkiDir(pub PathBuf);

impl PkiDir {
    pub fn ca_cert(&self) -> PathBuf {
        self.0.join("ca.pem")
    }
    pub fn ca_key(&self) -> PathBuf {
        self.0.join("ca.key")
    }
    pub fn server_cert(&self) -> PathBuf {
        self.0.join("server.pem")
    }
    pub fn server_key(&self) -> PathBuf {
        self.0.join("server.key")
    }
    /// The initial (empty) certificate revocation list.
    pub fn crl(&self) -> PathBuf {
        self.0.join("crl.pem")
    }
}

fn serial() -> SerialNumber {
    SerialNumber::from_slice(&Uuid::new_v4().as_bytes()[..])
}

/// Creates the CA and the server certificate unless they exist.
pub fn init(dir: &Path) -> crate::Result<PkiDir> {
    let pki = PkiDir(dir.to_owned());
    std::fs::create_dir_all(&pki.0)?;
    if !(pki.ca_cert().exists() && pki.ca_key().exists() && pki.server_cert().exists()) {
        create(&pki)?;
    }
    if !pki.crl().exists() {
        let ca = homelink_kit::pki::DeviceCa::load(&pki.ca_cert(), &pki.ca_key())?;
        std::fs::write(pki.crl(), ca.crl(&[], 1)?)?;
    }
    Ok(pki)
}

fn create(pki: &PkiDir) -> crate::Result<()> {
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.distinguished_name.push(DnType::CommonName, "HomeLink development device CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    ca.serial_number = Some(serial());
    let ca_cert = ca.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca, &ca_key);

    let server_key = KeyPair::generate()?;
    let mut server = CertificateParams::new(vec!["localhost".to_owned()])?;
    server.subject_alt_names.push(SanType::IpAddress(std::net::IpAddr::from([127, 0, 0, 1])));
    server.distinguished_name.push(DnType::CommonName, "localhost");
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    server.serial_number = Some(serial());
    let server_cert = server.signed_by(&server_key, &issuer)?;

    write_private(&pki.ca_key(), &ca_key.serialize_pem())?;
    std::fs::write(pki.ca_cert(), ca_cert.pem())?;
    write_private(&pki.server_key(), &server_key.serialize_pem())?;
    std::fs::write(pki.server_cert(), server_cert.pem())?;
    Ok(())
}

/// Development keys: readable by the owner and its group (the broker's user
/// reads the server key through the group the run command sets).
fn write_private(path: &Path, pem: &str) -> crate::Result<()> {
    std::fs::write(path, pem)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o640))?;
    }
    Ok(())
}
