//! The device CA's operations the services need: issue a device certificate
//! (CN = device id) from a key generated here or from a device's CSR, and sign
//! the certificate revocation list. Built on rcgen; no hand-written ASN.1.

use rcgen::{
    CertificateParams, CertificateRevocationListParams, CertificateSigningRequestParams, DnType, ExtendedKeyUsagePurpose, Issuer,
    KeyIdMethod, KeyPair, KeyUsagePurpose, RevocationReason, RevokedCertParams, SerialNumber,
};
use std::path::Path;
use time::{Duration, OffsetDateTime};
use uuid::Uuid;

/// How long a device certificate is valid.
const DEVICE_CERT_DAYS: i64 = 3650;
/// A CRL is re-signed well before this.
const CRL_VALID_DAYS: i64 = 7;
/// Largest CSR accepted, in bytes.
pub const MAX_CSR_BYTES: usize = 8 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("the CSR is not a valid, self-signed PKCS#10 request")]
    BadCsr,
    #[error("the CSR is larger than {MAX_CSR_BYTES} bytes")]
    CsrTooLarge,
    #[error("device CA: {0}")]
    Ca(String),
}

/// A certificate issued to a device.
#[derive(Debug, Clone)]
pub struct IssuedDevice {
    pub cert_pem: String,
    /// Present when the key was generated here (no CSR).
    pub key_pem: Option<String>,
    /// The certificate's serial number, lowercase hex.
    pub serial_hex: String,
}

/// The device CA: its certificate and key.
pub struct DeviceCa {
    ca_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

fn ca_err(e: impl std::fmt::Display) -> PkiError {
    PkiError::Ca(e.to_string())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Parses a lowercase or uppercase hex serial.
pub fn serial_from_hex(s: &str) -> Option<SerialNumber> {
    // Hex digits only (ASCII), so slicing by byte index below is safe for
    // any input — it may come from the log.
    if s.is_empty() || !s.len().is_multiple_of(2) || s.len() > 40 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok()).collect();
    bytes.map(|b| SerialNumber::from_slice(&b))
}

impl DeviceCa {
    pub fn load(cert: &Path, key: &Path) -> Result<Self, PkiError> {
        let ca_pem = std::fs::read_to_string(cert).map_err(ca_err)?;
        let key = KeyPair::from_pem(&std::fs::read_to_string(key).map_err(ca_err)?).map_err(ca_err)?;
        let issuer = Issuer::from_ca_cert_pem(&ca_pem, key).map_err(ca_err)?;
        Ok(Self { ca_pem, issuer })
    }

    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// Issues the certificate of `device`: from `csr_pem` (the device keeps
    /// its key; only the public key of the request is used, its subject and
    /// extensions are replaced) or with a key generated here.
    pub fn issue(&self, device: Uuid, csr_pem: Option<&str>) -> Result<IssuedDevice, PkiError> {
        let serial: [u8; 16] = *Uuid::new_v4().as_bytes();
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(ca_err)?;
        params.distinguished_name.push(DnType::CommonName, device.to_string());
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::minutes(5);
        params.not_after = now + Duration::days(DEVICE_CERT_DAYS);
        let (cert, key_pem) = match csr_pem {
            Some(csr) => {
                if csr.len() > MAX_CSR_BYTES {
                    return Err(PkiError::CsrTooLarge);
                }
                let mut req = CertificateSigningRequestParams::from_pem(csr).map_err(|_| PkiError::BadCsr)?;
                req.params = params;
                (req.signed_by(&self.issuer).map_err(ca_err)?, None)
            }
            None => {
                let key = KeyPair::generate().map_err(ca_err)?;
                (params.signed_by(&key, &self.issuer).map_err(ca_err)?, Some(key.serialize_pem()))
            }
        };
        Ok(IssuedDevice { cert_pem: cert.pem(), key_pem, serial_hex: hex(&serial) })
    }

    /// Signs a CRL listing `revoked` serials (hex); `number` must grow with every CRL.
    pub fn crl(&self, revoked: &[String], number: u64) -> Result<String, PkiError> {
        let now = OffsetDateTime::now_utc();
        let params = CertificateRevocationListParams {
            this_update: now - Duration::minutes(5),
            next_update: now + Duration::days(CRL_VALID_DAYS),
            crl_number: SerialNumber::from(number),
            issuing_distribution_point: None,
            revoked_certs: revoked
                .iter()
                .filter_map(|s| serial_from_hex(s))
                .map(|serial_number| RevokedCertParams {
                    serial_number,
                    revocation_time: now - Duration::minutes(5),
                    reason_code: Some(RevocationReason::CessationOfOperation),
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: KeyIdMethod::Sha256,
        };
        params.signed_by(&self.issuer).map_err(ca_err)?.pem().map_err(ca_err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::PublicKeyData;

    #[test]
    fn serials_from_any_text_never_panic() {
        assert!(serial_from_hex("0a1B").is_some());
        for bad in ["", "abc", "aé1", "éé", "zz", "0x12", &"ab".repeat(21)] {
            assert!(serial_from_hex(bad).is_none(), "{bad}");
        }
    }

    fn ca(dir: &Path) -> DeviceCa {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(DnType::CommonName, "test CA");
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = p.self_signed(&key).unwrap();
        std::fs::write(dir.join("ca.pem"), cert.pem()).unwrap();
        std::fs::write(dir.join("ca.key"), key.serialize_pem()).unwrap();
        DeviceCa::load(&dir.join("ca.pem"), &dir.join("ca.key")).unwrap()
    }

    #[test]
    fn a_csr_is_signed_with_the_device_id_as_subject_and_garbage_is_refused() {
        let dir = std::env::temp_dir().join(format!("pki-{}", Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca = ca(&dir);
        let device_key = KeyPair::generate().unwrap();
        let mut req = CertificateParams::new(Vec::<String>::new()).unwrap();
        req.distinguished_name.push(DnType::CommonName, "i-am-someone-else");
        let csr = req.serialize_request(&device_key).unwrap().pem().unwrap();
        let id = Uuid::new_v4();
        let issued = ca.issue(id, Some(&csr)).unwrap();
        assert!(issued.key_pem.is_none());
        let (_, pem) = x509_parser::pem::parse_x509_pem(issued.cert_pem.as_bytes()).unwrap();
        let cert = pem.parse_x509().unwrap();
        let cn = cert.subject().iter_common_name().next().unwrap().as_str().unwrap().to_owned();
        assert_eq!(cn, id.to_string());
        assert_eq!(cert.public_key().raw, &device_key.subject_public_key_info()[..]);
        assert!(matches!(
            ca.issue(id, Some("-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----")),
            Err(PkiError::BadCsr)
        ));
        assert!(ca.crl(std::slice::from_ref(&issued.serial_hex), 1).unwrap().contains("BEGIN X509 CRL"));
        let _ = std::fs::remove_dir_all(dir);
    }
}
