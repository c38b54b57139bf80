//! Who a certificate speaks for: a [`Role`] and a name, encoded in every end-entity certificate
//! the cluster CA issues.
//!
//! Encoding (the one place it is defined): the subject common name is the name, and exactly one
//! subject alternative name is a URI `ha://<role>/<name>` with `<role>` one of `monitor`,
//! `postgres`, `ejabberd`, `operator`. A certificate is accepted as an identity only when both
//! agree, so neither a bare CN (as PostgreSQL reads it) nor a stray URI can be misread as the
//! other. Names follow the node-name rules of `ha_proto::NodeId` (`[a-z0-9][a-z0-9._-]{0,62}`),
//! so a node's certificate name, its catalog name and its PostgreSQL `application_name` are the
//! same string.
//!
//! Invariant: a [`PeerIdentity`] can only be built from a valid role and name, so code that holds
//! one never re-validates it.

use std::fmt;
use std::str::FromStr;

use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::FromDer;

/// URI scheme of the identity subject alternative name.
pub const IDENTITY_URI_SCHEME: &str = "ha://";

/// Longest name a certificate may carry (same bound as `ha_proto::NodeId`).
pub const MAX_NAME_LEN: usize = 63;

/// Errors reading or building an identity.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("invalid name {0:?}: expected [a-z0-9][a-z0-9._-]{{0,62}}")]
    InvalidName(String),
    #[error("unknown role {0:?}: expected monitor, postgres, ejabberd or operator")]
    UnknownRole(String),
    #[error("malformed identity URI {0:?}: expected ha://<role>/<name>")]
    MalformedUri(String),
    #[error("certificate is not valid DER X.509: {0}")]
    Parse(String),
    #[error("certificate carries {0} ha:// identity URIs, expected exactly one")]
    UriCount(usize),
    #[error("certificate common name {cn:?} does not match its identity name {name:?}")]
    CommonNameMismatch { cn: String, name: String },
}

/// What a certificate holder may do. Checked against every request by the services.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    /// A monitor: serves gRPC and speaks Raft with its peers.
    Monitor,
    /// An agent driving a PostgreSQL node.
    Postgres,
    /// An agent driving an ejabberd frontend.
    Ejabberd,
    /// A person (or script) running `haclt` operator commands.
    Operator,
    /// Read-only: the cluster's status and events (monitoring, application lookups), nothing
    /// that changes it.
    Observer,
}

impl Role {
    pub const ALL: [Role; 5] = [
        Role::Monitor,
        Role::Postgres,
        Role::Ejabberd,
        Role::Operator,
        Role::Observer,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Monitor => "monitor",
            Role::Postgres => "postgres",
            Role::Ejabberd => "ejabberd",
            Role::Operator => "operator",
            Role::Observer => "observer",
        }
    }

    /// Node agents (PostgreSQL and ejabberd), the roles that report for a node.
    pub fn is_node(self) -> bool {
        matches!(self, Role::Postgres | Role::Ejabberd)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = IdentityError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| IdentityError::UnknownRole(s.to_owned()))
    }
}

/// Checks a certificate name against the node-name rules.
pub fn validate_name(name: &str) -> Result<(), IdentityError> {
    let valid_first = name
        .bytes()
        .next()
        .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    let valid_rest = name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'_' | b'.'));
    if valid_first && valid_rest && name.len() <= MAX_NAME_LEN {
        Ok(())
    } else {
        Err(IdentityError::InvalidName(name.to_owned()))
    }
}

/// The verified identity of a TLS peer (or the identity a certificate is issued for).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PeerIdentity {
    role: Role,
    name: String,
}

impl PeerIdentity {
    pub fn new(role: Role, name: impl Into<String>) -> Result<Self, IdentityError> {
        let name = name.into();
        validate_name(&name)?;
        Ok(Self { role, name })
    }

    pub fn role(&self) -> Role {
        self.role
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The `ha://<role>/<name>` URI written into the certificate.
    pub fn uri(&self) -> String {
        format!("{IDENTITY_URI_SCHEME}{}/{}", self.role, self.name)
    }

    /// Parses an `ha://<role>/<name>` URI.
    pub fn from_uri(uri: &str) -> Result<Self, IdentityError> {
        let malformed = || IdentityError::MalformedUri(uri.to_owned());
        let rest = uri
            .strip_prefix(IDENTITY_URI_SCHEME)
            .ok_or_else(malformed)?;
        let (role, name) = rest.split_once('/').ok_or_else(malformed)?;
        Self::new(role.parse()?, name)
    }

    /// Reads the identity of a DER certificate. The caller must already have verified the
    /// certificate against the cluster CA (rustls does so during the handshake): this only
    /// decodes what the CA vouched for.
    pub fn from_cert_der(der: &[u8]) -> Result<Self, IdentityError> {
        let (_, cert) =
            X509Certificate::from_der(der).map_err(|e| IdentityError::Parse(e.to_string()))?;
        Self::from_cert(&cert)
    }

    pub(crate) fn from_cert(cert: &X509Certificate<'_>) -> Result<Self, IdentityError> {
        let san = cert
            .subject_alternative_name()
            .map_err(|e| IdentityError::Parse(e.to_string()))?;
        let uris: Vec<&str> = san
            .iter()
            .flat_map(|ext| ext.value.general_names.iter())
            .filter_map(|name| match name {
                GeneralName::URI(uri) if uri.starts_with(IDENTITY_URI_SCHEME) => Some(*uri),
                _ => None,
            })
            .collect();
        let [uri] = uris.as_slice() else {
            return Err(IdentityError::UriCount(uris.len()));
        };
        let identity = Self::from_uri(uri)?;
        let cn = cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .unwrap_or_default();
        if cn != identity.name {
            return Err(IdentityError::CommonNameMismatch {
                cn: cn.to_owned(),
                name: identity.name,
            });
        }
        Ok(identity)
    }
}

impl fmt::Display for PeerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.role, self.name)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn uri_round_trips_for_every_role() {
        for role in Role::ALL {
            let id = PeerIdentity::new(role, "psql1server.domain-local_1").unwrap();
            assert_eq!(PeerIdentity::from_uri(&id.uri()).unwrap(), id);
            assert_eq!(role.as_str().parse::<Role>().unwrap(), role);
        }
    }

    #[test]
    fn malformed_uris_and_names_are_refused() {
        for bad in [
            "ha://monitor",
            "https://monitor/m1",
            "ha://admin/m1",
            "ha://monitor/",
            "ha://monitor/M1",
            "ha://monitor/m1/x",
            "ha://monitor/-m1",
        ] {
            assert!(PeerIdentity::from_uri(bad).is_err(), "{bad} accepted");
        }
        assert!(validate_name(&"a".repeat(MAX_NAME_LEN)).is_ok());
        assert!(validate_name(&"a".repeat(MAX_NAME_LEN + 1)).is_err());
        assert!(validate_name("").is_err());
    }
}
