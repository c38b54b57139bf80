//! The cluster CA: creates and reloads it, issues end-entity certificates, signs the CSRs of
//! joining nodes, and inspects certificates for rotation.
//!
//! Invariants:
//! - Every end-entity certificate carries the identity encoding of [`crate::identity`] (CN =
//!   name, one `ha://<role>/<name>` URI SAN), both server and client authentication usages (a
//!   monitor serves and calls, a PostgreSQL node serves replication and calls the monitor), and
//!   an explicit validity that ends no later than the CA's own.
//! - When signing a CSR only its public key is taken (after its self-signature proved possession
//!   of the private key) and its common name is compared with the name the caller expects; every
//!   other field (names, usages, CA flag) comes from the caller, because the CA decides what it
//!   vouches for, not the requester.
//! - Keys are ECDSA P-256 (rcgen's default through ring), serialized as PKCS#8 PEM.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rand::RngCore;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PublicKeyData,
    SanType, SerialNumber,
};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use sha2::{Digest, Sha256};
use x509_parser::certificate::X509Certificate;
use x509_parser::prelude::FromDer;

use crate::identity::{IdentityError, PeerIdentity, Role, validate_name};

/// How far back `Validity::starting_now` dates a certificate, so that a host whose clock is a
/// little behind the CA's accepts it at once.
pub const CLOCK_SKEW_ALLOWANCE: Duration = Duration::from_secs(300);

/// Errors of CA operations.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("invalid PEM: {0}")]
    Pem(String),
    #[error("invalid certificate: {0}")]
    Certificate(String),
    #[error("the CA certificate is not a CA (no basicConstraints CA flag)")]
    NotACa,
    #[error("the CA key does not match the CA certificate")]
    KeyMismatch,
    #[error("invalid validity: not_after must be later than not_before")]
    EmptyValidity,
    #[error("requested validity ends after the CA certificate expires; rotate the CA first")]
    ValidityBeyondCa,
    #[error("invalid subject alternative name {0:?}")]
    InvalidSan(String),
    #[error("the CSR is invalid or its signature does not verify: {0}")]
    InvalidCsr(rcgen::Error),
    #[error("the CSR names {found:?} but the join is for {expected:?}")]
    CsrNameMismatch { expected: String, found: String },
}

/// The period a certificate is valid for. Always explicit: nothing in this crate defaults it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    not_before: SystemTime,
    not_after: SystemTime,
}

impl Validity {
    pub fn new(not_before: SystemTime, not_after: SystemTime) -> Result<Self, CaError> {
        if not_after <= not_before {
            return Err(CaError::EmptyValidity);
        }
        Ok(Self {
            not_before,
            not_after,
        })
    }

    /// Valid from [`CLOCK_SKEW_ALLOWANCE`] ago until `lifetime` from now.
    pub fn starting_now(lifetime: Duration) -> Result<Self, CaError> {
        let now = SystemTime::now();
        Self::new(now - CLOCK_SKEW_ALLOWANCE, now + lifetime)
    }

    pub fn not_before(&self) -> SystemTime {
        self.not_before
    }

    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    fn apply(&self, params: &mut CertificateParams) {
        params.not_before = self.not_before.into();
        params.not_after = self.not_after.into();
    }
}

/// A freshly issued certificate and its private key (PEM). Write the key with
/// [`crate::write_key_file`].
#[derive(Clone)]
pub struct IssuedCert {
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for IssuedCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuedCert")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

/// The cluster certificate authority (its certificate and signing key).
pub struct Ca {
    cert_pem: String,
    not_after: SystemTime,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    rand::rng().fill_bytes(&mut bytes);
    // Positive and without a leading zero byte, so the DER INTEGER is minimal.
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    SerialNumber::from_slice(&bytes)
}

fn parse_one_cert_der(pem: &str) -> Result<CertificateDer<'static>, CaError> {
    CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|e| CaError::Pem(e.to_string()))
}

fn unix_to_system(secs: i64) -> SystemTime {
    match u64::try_from(secs) {
        Ok(s) => UNIX_EPOCH + Duration::from_secs(s),
        Err(_) => UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs()),
    }
}

impl Ca {
    /// Creates a new self-signed CA named `name` (its CN).
    pub fn create(name: &str, validity: Validity) -> Result<Self, CaError> {
        validate_name(name)?;
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        params.distinguished_name = dn;
        // Path length 0: the CA signs end-entity certificates only.
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.serial_number = Some(random_serial());
        validity.apply(&mut params);
        let cert = params.self_signed(&key)?;
        Ok(Self {
            cert_pem: cert.pem(),
            not_after: validity.not_after,
            issuer: Issuer::new(params, key),
        })
    }

    /// Loads a stored CA, checking that the certificate is a CA and that the key is its key.
    pub fn load(cert_pem: &str, key_pem: &str) -> Result<Self, CaError> {
        let der = parse_one_cert_der(cert_pem)?;
        let (_, cert) =
            X509Certificate::from_der(&der).map_err(|e| CaError::Certificate(e.to_string()))?;
        if !cert.is_ca() {
            return Err(CaError::NotACa);
        }
        let key = KeyPair::from_pem(key_pem)?;
        if key.der_bytes() != &*cert.public_key().subject_public_key.data {
            return Err(CaError::KeyMismatch);
        }
        let not_after = unix_to_system(cert.validity().not_after.timestamp());
        let issuer = Issuer::from_ca_cert_der(&der, key)?;
        Ok(Self {
            cert_pem: cert_pem.to_owned(),
            not_after,
            issuer,
        })
    }

    /// Loads the CA whose key is `key_pem` from a bundle of CA certificates (old and new during
    /// a rotation): the first certificate the key matches.
    pub fn load_from_bundle(bundle_pem: &str, key_pem: &str) -> Result<Self, CaError> {
        let mut last = CaError::Pem("the bundle holds no certificate".into());
        for der in CertificateDer::pem_slice_iter(bundle_pem.as_bytes()) {
            let der = der.map_err(|e| CaError::Pem(e.to_string()))?;
            match Self::load(&pem_encode_cert(&der), key_pem) {
                Ok(ca) => return Ok(ca),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// When the CA certificate expires: nothing it signs may outlive it.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// The CA private key, to be written with [`crate::write_key_file`].
    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// Issues a certificate and a new key for `name` in `role`. `sans` are extra DNS names or IP
    /// addresses the holder serves under (the name itself is added as a DNS name when it is one).
    pub fn issue(
        &self,
        name: &str,
        role: Role,
        sans: &[String],
        validity: Validity,
    ) -> Result<IssuedCert, CaError> {
        let key = KeyPair::generate()?;
        let params = self.end_entity_params(&PeerIdentity::new(role, name)?, sans, validity)?;
        let cert = params.signed_by(&key, &self.issuer)?;
        tracing::info!(name, role = %role, "issued certificate");
        Ok(IssuedCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Signs a joining node's CSR. The CSR's common name must be `expected_name`; the
    /// certificate's names, role and validity come from the arguments.
    pub fn sign_csr(
        &self,
        csr_pem: &str,
        role: Role,
        expected_name: &str,
        sans: &[String],
        validity: Validity,
    ) -> Result<String, CaError> {
        let identity = PeerIdentity::new(role, expected_name)?;
        // from_pem verifies the CSR's self-signature: proof the requester holds the key.
        let csr =
            CertificateSigningRequestParams::from_pem(csr_pem).map_err(CaError::InvalidCsr)?;
        let found = csr
            .params
            .distinguished_name
            .get(&DnType::CommonName)
            .and_then(dn_value_text)
            .unwrap_or_default();
        if found != expected_name {
            tracing::warn!(
                expected = expected_name,
                found,
                "refused CSR: name mismatch"
            );
            return Err(CaError::CsrNameMismatch {
                expected: expected_name.to_owned(),
                found,
            });
        }
        let params = self.end_entity_params(&identity, sans, validity)?;
        let cert = params.signed_by(&csr.public_key, &self.issuer)?;
        tracing::info!(name = expected_name, role = %role, "signed CSR");
        Ok(cert.pem())
    }

    fn end_entity_params(
        &self,
        identity: &PeerIdentity,
        sans: &[String],
        validity: Validity,
    ) -> Result<CertificateParams, CaError> {
        if validity.not_after > self.not_after {
            return Err(CaError::ValidityBeyondCa);
        }
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, identity.name());
        params.distinguished_name = dn;
        params.subject_alt_names = end_entity_sans(identity, sans)?;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(random_serial());
        validity.apply(&mut params);
        Ok(params)
    }
}

/// Text of a DN value, whatever its string type.
fn dn_value_text(value: &rcgen::DnValue) -> Option<String> {
    match value {
        rcgen::DnValue::Utf8String(s) => Some(s.clone()),
        rcgen::DnValue::PrintableString(s) => Some(s.as_str().to_owned()),
        rcgen::DnValue::Ia5String(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

fn end_entity_sans(identity: &PeerIdentity, extra: &[String]) -> Result<Vec<SanType>, CaError> {
    let uri = identity.uri();
    let mut sans = vec![SanType::URI(
        uri.as_str()
            .try_into()
            .map_err(|_| CaError::InvalidSan(uri.clone()))?,
    )];
    let name_is_dns = !identity.name().contains('_');
    let names = name_is_dns
        .then(|| identity.name().to_owned())
        .into_iter()
        .chain(extra.iter().cloned());
    for san in names {
        let entry = match san.parse::<std::net::IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) if is_dns_name(&san) => SanType::DnsName(
                san.as_str()
                    .try_into()
                    .map_err(|_| CaError::InvalidSan(san.clone()))?,
            ),
            Err(_) => return Err(CaError::InvalidSan(san)),
        };
        if !sans.contains(&entry) {
            sans.push(entry);
        }
    }
    Ok(sans)
}

fn is_dns_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// Generates a key and a CSR whose common name is `name`, for a joining node. Returns
/// `(csr_pem, key_pem)`; the key never leaves the node.
pub fn generate_csr(name: &str) -> Result<(String, String), CaError> {
    let key = KeyPair::generate()?.serialize_pem();
    Ok((csr_for_key(name, &key)?, key))
}

/// A CSR whose common name is `name` for the key `key_pem` a node already holds: a join that
/// is retried (its first answer lost) asks again for the same key, so the monitor can tell the
/// retry from another joiner presenting a used token.
pub fn csr_for_key(name: &str, key_pem: &str) -> Result<String, CaError> {
    validate_name(name)?;
    let key = KeyPair::from_pem(key_pem)?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    params.distinguished_name = dn;
    Ok(params.serialize_request(&key)?.pem()?)
}

/// The serial number of a DER certificate as lowercase hex of its DER bytes: how revoked
/// certificates are named in the catalog and in the CRL.
pub fn serial_hex(der: &[u8]) -> Result<String, CaError> {
    let (_, cert) =
        X509Certificate::from_der(der).map_err(|e| CaError::Certificate(e.to_string()))?;
    Ok(hex::encode(cert.raw_serial()))
}

/// What rotation needs to know about a certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    pub is_ca: bool,
    /// The `ha://` identity; `None` for a CA certificate.
    pub identity: Option<PeerIdentity>,
    /// The serial number, lowercase hex of its DER bytes ([`serial_hex`]).
    pub serial: String,
    /// SHA-256 of the subject public key info (DER), lowercase hex: which key the certificate
    /// is for.
    pub public_key_sha256: String,
}

impl CertInfo {
    /// Inspects the first certificate of a PEM file.
    pub fn from_pem(pem: &str) -> Result<Self, CaError> {
        Self::from_der(&parse_one_cert_der(pem)?)
    }

    fn from_der(der: &[u8]) -> Result<Self, CaError> {
        let (_, cert) =
            X509Certificate::from_der(der).map_err(|e| CaError::Certificate(e.to_string()))?;
        let is_ca = cert.is_ca();
        Ok(Self {
            serial: hex::encode(cert.raw_serial()),
            public_key_sha256: hex::encode(Sha256::digest(cert.public_key().raw)),
            not_before: unix_to_system(cert.validity().not_before.timestamp()),
            not_after: unix_to_system(cert.validity().not_after.timestamp()),
            is_ca,
            identity: if is_ca {
                None
            } else {
                Some(PeerIdentity::from_cert(&cert)?)
            },
        })
    }

    /// Whether the certificate should be replaced now: it expires within `overlap` (the window
    /// during which old and new are both valid, so every daemon has time to reload).
    pub fn due_for_rotation(&self, now: SystemTime, overlap: Duration) -> bool {
        self.not_after <= now + overlap
    }
}

/// Builds a CA bundle from PEM inputs (an existing bundle, a new CA, ...): every certificate once,
/// in input order, expired ones dropped. During CA rotation the bundle holds the old and the new
/// CA; to retire the old CA, build the bundle from the new one only.
pub fn merge_ca_bundle(pems: &[&str], now: SystemTime) -> Result<String, CaError> {
    let mut seen: Vec<CertificateDer<'static>> = Vec::new();
    let mut out = String::new();
    for pem in pems {
        for der in CertificateDer::pem_slice_iter(pem.as_bytes()) {
            let der = der.map_err(|e| CaError::Pem(e.to_string()))?;
            let info = CertInfo::from_der(&der)?;
            if !info.is_ca {
                return Err(CaError::NotACa);
            }
            if info.not_after <= now || seen.contains(&der) {
                continue;
            }
            out.push_str(&pem_encode_cert(&der));
            seen.push(der);
        }
    }
    Ok(out)
}

fn pem_encode_cert(der: &[u8]) -> String {
    use base64::Engine as _;
    let body = base64::engine::general_purpose::STANDARD.encode(der);
    let mut pem = String::from("-----BEGIN CERTIFICATE-----\n");
    // RFC 7468: 64 characters a line. Base64 output is ASCII, so byte chunks are characters.
    for line in body.as_bytes().chunks(64) {
        pem.push_str(&String::from_utf8_lossy(line));
        pem.push('\n');
    }
    pem.push_str("-----END CERTIFICATE-----\n");
    pem
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const DAY: Duration = Duration::from_secs(86_400);

    fn ca() -> Ca {
        Ca::create("cluster-ca", Validity::starting_now(10 * DAY).unwrap()).unwrap()
    }

    #[test]
    fn issued_certificates_carry_the_identity_and_requested_names() {
        let ca = ca();
        let sans = [
            "192.168.1.10".to_owned(),
            "psql1server.domain.local".to_owned(),
        ];
        let issued = ca
            .issue(
                "psql1server",
                Role::Postgres,
                &sans,
                Validity::starting_now(DAY).unwrap(),
            )
            .unwrap();
        let info = CertInfo::from_pem(&issued.cert_pem).unwrap();
        assert!(!info.is_ca);
        assert_eq!(
            info.identity,
            Some(PeerIdentity::new(Role::Postgres, "psql1server").unwrap())
        );
        let der = parse_one_cert_der(&issued.cert_pem).unwrap();
        let (_, cert) = X509Certificate::from_der(&der).unwrap();
        let names: Vec<String> = cert
            .subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names
            .iter()
            .map(|n| n.to_string())
            .collect();
        for expected in [
            "URI(ha://postgres/psql1server)",
            "DNSName(psql1server)",
            "DNSName(psql1server.domain.local)",
            // 192.168.1.10, as x509-parser prints an address.
            "IPAddress(c0:a8:01:0a)",
        ] {
            assert!(
                names.iter().any(|n| n == expected),
                "{expected} not in {names:?}"
            );
        }
        assert!(CertInfo::from_pem(ca.cert_pem()).unwrap().is_ca);
    }

    #[test]
    fn the_ca_matching_the_key_is_found_in_a_rotation_bundle() {
        let old = ca();
        let new = Ca::create("cluster-ca-2", Validity::starting_now(10 * DAY).unwrap()).unwrap();
        let bundle = merge_ca_bundle(&[old.cert_pem(), new.cert_pem()], SystemTime::now()).unwrap();
        let found = Ca::load_from_bundle(&bundle, &new.key_pem()).unwrap();
        assert_eq!(
            CertInfo::from_pem(found.cert_pem()).unwrap(),
            CertInfo::from_pem(new.cert_pem()).unwrap()
        );
        let stranger = ca();
        assert!(matches!(
            Ca::load_from_bundle(&bundle, &stranger.key_pem()),
            Err(CaError::KeyMismatch)
        ));
    }

    #[test]
    fn a_stored_ca_reloads_and_keeps_issuing_under_the_same_name() {
        let ca = ca();
        let loaded = Ca::load(ca.cert_pem(), &ca.key_pem()).unwrap();
        let issued = loaded
            .issue(
                "m1",
                Role::Monitor,
                &[],
                Validity::starting_now(DAY).unwrap(),
            )
            .unwrap();
        let der = parse_one_cert_der(&issued.cert_pem).unwrap();
        let (_, cert) = X509Certificate::from_der(&der).unwrap();
        let ca_der = parse_one_cert_der(ca.cert_pem()).unwrap();
        let (_, ca_cert) = X509Certificate::from_der(&ca_der).unwrap();
        assert_eq!(cert.issuer(), ca_cert.subject());
        cert.verify_signature(Some(ca_cert.public_key())).unwrap();
    }

    #[test]
    fn loading_refuses_a_foreign_key_or_a_leaf_certificate() {
        let ca = ca();
        let other = Ca::create("other", Validity::starting_now(DAY).unwrap()).unwrap();
        assert!(matches!(
            Ca::load(ca.cert_pem(), &other.key_pem()),
            Err(CaError::KeyMismatch)
        ));
        let leaf = ca
            .issue(
                "m1",
                Role::Monitor,
                &[],
                Validity::starting_now(DAY).unwrap(),
            )
            .unwrap();
        assert!(matches!(
            Ca::load(&leaf.cert_pem, &leaf.key_pem),
            Err(CaError::NotACa)
        ));
        assert!(Ca::load("not pem", &ca.key_pem()).is_err());
    }

    #[test]
    fn validity_is_explicit_and_bounded_by_the_ca() {
        let ca = ca();
        let now = SystemTime::now();
        assert!(matches!(
            Validity::new(now, now),
            Err(CaError::EmptyValidity)
        ));
        let too_long = Validity::starting_now(20 * DAY).unwrap();
        assert!(matches!(
            ca.issue("m1", Role::Monitor, &[], too_long),
            Err(CaError::ValidityBeyondCa)
        ));
        let v = Validity::new(now - DAY, now + DAY).unwrap();
        let info =
            CertInfo::from_pem(&ca.issue("m1", Role::Monitor, &[], v).unwrap().cert_pem).unwrap();
        // X.509 keeps whole seconds.
        let secs = |t: SystemTime| t.duration_since(UNIX_EPOCH).unwrap().as_secs();
        assert_eq!(secs(info.not_before), secs(now - DAY));
        assert_eq!(secs(info.not_after), secs(now + DAY));
        assert!(!info.due_for_rotation(now, Duration::from_secs(3600)));
        assert!(info.due_for_rotation(now, 2 * DAY));
    }

    #[test]
    fn bad_names_and_sans_are_refused() {
        let ca = ca();
        let v = Validity::starting_now(DAY).unwrap();
        assert!(ca.issue("Bad Name", Role::Operator, &[], v).is_err());
        for san in ["", "bad name", "-x.example", "a..b"] {
            assert!(
                matches!(
                    ca.issue("m1", Role::Monitor, &[san.to_owned()], v),
                    Err(CaError::InvalidSan(_))
                ),
                "{san:?} accepted"
            );
        }
        // An underscore is fine in a name but not in a DNS name: the SAN is left out.
        let issued = ca.issue("node_1", Role::Postgres, &[], v).unwrap();
        assert_eq!(
            CertInfo::from_pem(&issued.cert_pem).unwrap().identity,
            Some(PeerIdentity::new(Role::Postgres, "node_1").unwrap())
        );
    }

    #[test]
    fn the_bundle_merges_deduplicates_and_drops_expired_cas() {
        let now = SystemTime::now();
        let old = ca();
        let new = Ca::create("cluster-ca-2", Validity::starting_now(DAY).unwrap()).unwrap();
        let dead = Ca::create("dead", Validity::new(now - 2 * DAY, now - DAY).unwrap()).unwrap();
        let bundle = merge_ca_bundle(&[old.cert_pem(), new.cert_pem()], now).unwrap();
        let again = merge_ca_bundle(&[&bundle, new.cert_pem(), dead.cert_pem()], now).unwrap();
        assert_eq!(bundle, again);
        let ders: Vec<_> = CertificateDer::pem_slice_iter(again.as_bytes())
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(
            ders,
            vec![
                parse_one_cert_der(old.cert_pem()).unwrap(),
                parse_one_cert_der(new.cert_pem()).unwrap()
            ]
        );
        let leaf = old
            .issue(
                "m1",
                Role::Monitor,
                &[],
                Validity::starting_now(DAY).unwrap(),
            )
            .unwrap();
        assert!(matches!(
            merge_ca_bundle(&[&leaf.cert_pem], now),
            Err(CaError::NotACa)
        ));
    }
}
