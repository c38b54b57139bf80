//! `haclt pki`: the cluster CA and its certificates as local files, with no monitor involved.
//!
//! A CA directory holds `ca.pem` (0644), `ca.key` (0600), `ca-bundle.pem` (the CAs daemons must
//! trust: the current one, plus the previous one while a CA rotation is under way) and
//! `index.json`, which records every certificate issued from it (name, role, SANs, lifetime and
//! the directory it was written to) so `rotate` can re-issue them unchanged.
//!
//! Invariants:
//! - Every file is written atomically by `ha-pki` (keys 0600, everything else 0644), so a crash
//!   leaves each file either old or new. A key is written before its certificate: a reader that
//!   sees the new certificate also finds the new key.
//! - `rotate` is idempotent: it only re-issues a certificate that is missing, not signed by the
//!   current CA, or due within the overlap window, and it refuses to re-issue one whose new
//!   lifetime would leave it due at once. `rotate --new-ca` creates a new CA only when the bundle
//!   trusts no older CA; otherwise the rotation already under way is finished instead.
//! - Bad input (arguments, a missing CA, a file that is not a certificate) fails with exit code
//!   64 before anything is written; anything else fails with 1.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use clap::Subcommand;
use ha_pki::{
    CLOCK_SKEW_ALLOWANCE, Ca, CaError, CertInfo, FileError, Role, Validity, merge_ca_bundle,
    read_key_file, read_public_file, write_key_file, write_public_file,
};
use serde::{Deserialize, Serialize};
use tracing::info;
use x509_parser::extensions::GeneralName;
use x509_parser::pem::Pem;

use crate::client::Failure;

/// The CA certificate.
pub const CA_CERT: &str = "ca.pem";
/// The CA private key.
pub const CA_KEY: &str = "ca.key";
/// The CAs daemons trust (point their CA file here, not at `ca.pem`).
pub const CA_BUNDLE: &str = "ca-bundle.pem";
/// The record of issued certificates.
pub const INDEX: &str = "index.json";
const INDEX_VERSION: u32 = 1;
/// Certificate names that would overwrite the CA's own files when written into the CA directory.
const RESERVED_NAMES: [&str; 2] = ["ca", "ca-bundle"];
/// Shortest lifetime accepted for a certificate or CA: anything shorter is surely a typo.
const MIN_LIFETIME: Duration = Duration::from_secs(3600);

/// `haclt pki ...` subcommands. Values are taken as text and validated here, so bad input fails
/// with the documented usage exit code (64).
#[derive(Debug, Subcommand)]
pub enum PkiCmd {
    /// Create the cluster CA in DIR (ca.pem, ca.key, ca-bundle.pem, index.json).
    Init {
        #[arg(long)]
        dir: PathBuf,
        /// The CA's common name.
        #[arg(long, default_value = "cluster-ca")]
        name: String,
        #[arg(long, default_value = "10y")]
        validity: String,
        /// Replace an existing CA (certificates it issued must then be re-issued with `rotate`).
        #[arg(long)]
        force: bool,
    },
    /// Issue NAME.pem and NAME.key (0600) signed by the CA in DIR.
    Issue {
        name: String,
        /// monitor, postgres, ejabberd, operator, or observer (read-only: `status` and
        /// `events`, for monitoring).
        #[arg(long)]
        role: String,
        /// Extra DNS name or IP address the holder serves under (repeatable).
        #[arg(long = "san")]
        sans: Vec<String>,
        #[arg(long, default_value = "1y")]
        validity: String,
        /// The CA directory.
        #[arg(long)]
        dir: PathBuf,
        /// Where to write the certificate and key (default: the CA directory).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Show a certificate: identity, role, SANs, validity, CA or not.
    Show { file: PathBuf },
    /// Re-issue the certificates due within the overlap window (or all of them with a new CA).
    Rotate {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value = "30d")]
        overlap: String,
        /// Create a new CA, trust old and new in ca-bundle.pem, re-issue every certificate.
        #[arg(long, conflicts_with = "retire_old_ca")]
        new_ca: bool,
        /// Lifetime of re-issued certificates (default: the one each was issued with).
        #[arg(long)]
        validity: Option<String>,
        /// End a CA rotation: ca-bundle.pem trusts only the current CA again.
        #[arg(long)]
        retire_old_ca: bool,
    },
}

/// Errors of `haclt pki`.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{0}")]
    Usage(String),
    #[error(
        "{}: a CA already exists; pass --force to replace it (every certificate it issued must then be re-issued)",
        .0.display()
    )]
    CaExists(PathBuf),
    #[error("no CA in {dir}: run `haclt pki init --dir {dir}` first", dir = .0.display())]
    NoCa(PathBuf),
    #[error("{}: not a certificate: {reason}", path.display())]
    NotACertificate { path: PathBuf, reason: String },
    #[error("{}: {reason}", path.display())]
    Index { path: PathBuf, reason: String },
    #[error(transparent)]
    File(#[from] FileError),
    #[error(transparent)]
    Ca(#[from] CaError),
}

impl From<PkiError> for Failure {
    fn from(e: PkiError) -> Self {
        let usage = match &e {
            PkiError::Usage(_)
            | PkiError::CaExists(_)
            | PkiError::NoCa(_)
            | PkiError::NotACertificate { .. } => true,
            PkiError::Ca(c) => matches!(
                c,
                CaError::Identity(_)
                    | CaError::InvalidSan(_)
                    | CaError::EmptyValidity
                    | CaError::ValidityBeyondCa
            ),
            PkiError::Index { .. } | PkiError::File(_) => false,
        };
        if usage {
            Failure::Usage(e.to_string())
        } else {
            Failure::Other(e.to_string())
        }
    }
}

/// Runs a `pki` subcommand at time `now` and prints its report on stdout.
pub fn run(cmd: &PkiCmd, json: bool, now: SystemTime) -> Result<(), Failure> {
    let report = match cmd {
        PkiCmd::Init {
            dir,
            name,
            validity,
            force,
        } => init(dir, name, validity, *force, now)?,
        PkiCmd::Issue {
            name,
            role,
            sans,
            validity,
            dir,
            out,
        } => issue(dir, name, role, sans, validity, out.as_deref(), now)?,
        PkiCmd::Show { file } => vec![show(file, json)?],
        PkiCmd::Rotate {
            dir,
            overlap,
            new_ca,
            validity,
            retire_old_ca,
        } => {
            let overlap = parse_duration("overlap", overlap)?;
            let validity = validity
                .as_deref()
                .map(|v| parse_lifetime("validity", v))
                .transpose()?;
            if *retire_old_ca {
                retire_old_ca_in(dir, now)?
            } else {
                rotate(dir, overlap, *new_ca, validity, now)?
            }
        }
    };
    if json && !matches!(cmd, PkiCmd::Show { .. }) {
        // `show` printed its own object; the others report what they did, line by line.
        println!("{}", serde_json::json!({ "report": report }));
    } else {
        for line in report {
            println!("{line}");
        }
    }
    Ok(())
}

fn parse_duration(flag: &str, text: &str) -> Result<Duration, PkiError> {
    humantime::parse_duration(text)
        .map_err(|e| PkiError::Usage(format!("--{flag} {text:?}: {e} (examples: 90d, 1y)")))
}

/// A certificate or CA lifetime: a duration of at least [`MIN_LIFETIME`].
pub fn parse_lifetime(flag: &str, text: &str) -> Result<Duration, PkiError> {
    let d = parse_duration(flag, text)?;
    if d < MIN_LIFETIME {
        return Err(PkiError::Usage(format!(
            "--{flag} {text:?}: shorter than the minimum of {}",
            humantime::format_duration(MIN_LIFETIME)
        )));
    }
    Ok(d)
}

pub fn parse_role(text: &str) -> Result<Role, PkiError> {
    text.parse()
        .map_err(|e: ha_pki::IdentityError| PkiError::Usage(e.to_string()))
}

/// Checks a certificate name: the node-name rules, and not a name of the CA's own files.
pub fn check_cert_name(name: &str) -> Result<(), PkiError> {
    ha_pki::identity::validate_name(name).map_err(|e| PkiError::Usage(e.to_string()))?;
    if RESERVED_NAMES.contains(&name) {
        return Err(PkiError::Usage(format!(
            "{name:?} is reserved for the CA's own files"
        )));
    }
    Ok(())
}

fn validity_from(now: SystemTime, lifetime: Duration) -> Result<Validity, PkiError> {
    Ok(Validity::new(now - CLOCK_SKEW_ALLOWANCE, now + lifetime)?)
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> PkiError + '_ {
    move |source| {
        PkiError::File(FileError::Io {
            path: path.to_owned(),
            source,
        })
    }
}

/// Creates `dir` if needed and returns its absolute, symlink-free form (recorded in the index so
/// `rotate` finds it from any working directory).
fn absolute_dir(dir: &Path) -> Result<PathBuf, PkiError> {
    std::fs::create_dir_all(dir).map_err(io_error(dir))?;
    dir.canonicalize().map_err(io_error(dir))
}

/// The record of what a CA directory issued (`index.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Index {
    pub version: u32,
    pub ca: CaRecord,
    pub certs: Vec<CertRecord>,
}

/// The current CA: its base name and generation (each `rotate --new-ca` adds one).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaRecord {
    pub name: String,
    pub generation: u32,
    pub lifetime_secs: u64,
}

/// One issued certificate, written as `out_dir/name.pem` and `out_dir/name.key`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertRecord {
    pub name: String,
    pub role: String,
    pub sans: Vec<String>,
    pub lifetime_secs: u64,
    pub out_dir: PathBuf,
}

impl CertRecord {
    pub fn cert_path(&self) -> PathBuf {
        self.out_dir.join(format!("{}.pem", self.name))
    }

    pub fn key_path(&self) -> PathBuf {
        self.out_dir.join(format!("{}.key", self.name))
    }
}

impl CaRecord {
    /// The CA's common name. Generations after the first get a suffix so old and new CA have
    /// distinct subjects while both are trusted.
    pub fn common_name(&self) -> String {
        if self.generation <= 1 {
            self.name.clone()
        } else {
            format!("{}-g{}", self.name, self.generation)
        }
    }
}

impl Index {
    pub fn new(ca: CaRecord) -> Self {
        Self {
            version: INDEX_VERSION,
            ca,
            certs: Vec::new(),
        }
    }

    /// Reads `dir/index.json`; `None` when there is none.
    pub fn load(dir: &Path) -> Result<Option<Self>, PkiError> {
        let path = dir.join(INDEX);
        if !path.exists() {
            return Ok(None);
        }
        let text = read_public_file(&path)?;
        let bad = |reason: String| PkiError::Index {
            path: path.clone(),
            reason,
        };
        let index: Index = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        if index.version != INDEX_VERSION {
            return Err(bad(format!(
                "index version {} is not supported (expected {INDEX_VERSION})",
                index.version
            )));
        }
        for cert in &index.certs {
            parse_role(&cert.role).map_err(|e| bad(e.to_string()))?;
        }
        Ok(Some(index))
    }

    /// Writes `dir/index.json` atomically.
    pub fn save(&self, dir: &Path) -> Result<(), PkiError> {
        let text = serde_json::to_string_pretty(self).map_err(|e| PkiError::Index {
            path: dir.join(INDEX),
            reason: e.to_string(),
        })?;
        write_public_file(&dir.join(INDEX), format!("{text}\n").as_bytes())?;
        Ok(())
    }

    /// Records `cert`, replacing the record of the same name in the same directory.
    pub fn record(&mut self, cert: CertRecord) {
        match self
            .certs
            .iter_mut()
            .find(|c| c.name == cert.name && c.out_dir == cert.out_dir)
        {
            Some(existing) => *existing = cert,
            None => self.certs.push(cert),
        }
    }
}

fn load_index(dir: &Path) -> Result<Index, PkiError> {
    Index::load(dir)?.ok_or_else(|| PkiError::Index {
        path: dir.join(INDEX),
        reason: "missing: this directory was not created by `haclt pki init`".into(),
    })
}

fn load_ca(dir: &Path) -> Result<Ca, PkiError> {
    let cert_path = dir.join(CA_CERT);
    if !cert_path.exists() {
        return Err(PkiError::NoCa(dir.to_owned()));
    }
    let cert = read_public_file(&cert_path)?;
    let key = read_key_file(&dir.join(CA_KEY))?;
    Ok(Ca::load(&cert, &key)?)
}

/// `pki init`.
pub fn init(
    dir: &Path,
    name: &str,
    validity: &str,
    force: bool,
    now: SystemTime,
) -> Result<Vec<String>, PkiError> {
    let lifetime = parse_lifetime("validity", validity)?;
    ha_pki::identity::validate_name(name).map_err(|e| PkiError::Usage(e.to_string()))?;
    let dir = absolute_dir(dir)?;
    if (dir.join(CA_CERT).exists() || dir.join(CA_KEY).exists()) && !force {
        return Err(PkiError::CaExists(dir));
    }
    let record = CaRecord {
        name: name.to_owned(),
        generation: 1,
        lifetime_secs: lifetime.as_secs(),
    };
    let ca = Ca::create(&record.common_name(), validity_from(now, lifetime)?)?;
    // Certificates issued by a replaced CA stay listed, so `rotate` re-issues them.
    let mut index = Index::load(&dir)?.unwrap_or_else(|| Index::new(record.clone()));
    index.ca = record;
    write_key_file(&dir.join(CA_KEY), ca.key_pem().as_bytes())?;
    write_public_file(&dir.join(CA_CERT), ca.cert_pem().as_bytes())?;
    write_public_file(&dir.join(CA_BUNDLE), ca.cert_pem().as_bytes())?;
    index.save(&dir)?;
    info!(dir = %dir.display(), name, force, "created CA");
    let mut report = vec![format!(
        "created CA {name} in {}: {CA_CERT}, {CA_KEY} (0600), {CA_BUNDLE}; expires {}",
        dir.display(),
        rfc3339(now + lifetime)
    )];
    if !index.certs.is_empty() {
        report.push(format!(
            "{} certificates were issued by the replaced CA: run `haclt pki rotate --dir {}` to re-issue them",
            index.certs.len(),
            dir.display()
        ));
    }
    Ok(report)
}

/// `pki issue`.
pub fn issue(
    dir: &Path,
    name: &str,
    role: &str,
    sans: &[String],
    validity: &str,
    out: Option<&Path>,
    now: SystemTime,
) -> Result<Vec<String>, PkiError> {
    let role = parse_role(role)?;
    check_cert_name(name)?;
    let lifetime = parse_lifetime("validity", validity)?;
    let ca = load_ca(dir)?;
    let dir = absolute_dir(dir)?;
    let mut index = load_index(&dir)?;
    let record = CertRecord {
        name: name.to_owned(),
        role: role.as_str().to_owned(),
        sans: sans.to_vec(),
        lifetime_secs: lifetime.as_secs(),
        out_dir: absolute_dir(out.unwrap_or(&dir))?,
    };
    let expires = write_cert(&ca, &record, role, now)?;
    index.record(record.clone());
    index.save(&dir)?;
    Ok(vec![format!(
        "wrote {} and {} (0600) for {role}/{name}; expires {}",
        record.cert_path().display(),
        record.key_path().display(),
        rfc3339(expires)
    )])
}

/// Issues the certificate `record` describes and writes it (key first); returns its expiry.
fn write_cert(
    ca: &Ca,
    record: &CertRecord,
    role: Role,
    now: SystemTime,
) -> Result<SystemTime, PkiError> {
    let validity = validity_from(now, Duration::from_secs(record.lifetime_secs))?;
    let issued = ca.issue(&record.name, role, &record.sans, validity)?;
    write_key_file(&record.key_path(), issued.key_pem.as_bytes())?;
    write_public_file(&record.cert_path(), issued.cert_pem.as_bytes())?;
    info!(name = %record.name, role = %role, out = %record.out_dir.display(), "wrote certificate");
    Ok(validity.not_after())
}

/// What `pki show --json` prints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertSummary {
    pub file: PathBuf,
    pub subject: String,
    pub issuer: String,
    /// Hexadecimal, as `openssl x509 -serial` prints it.
    pub serial: String,
    pub is_ca: bool,
    /// `None` for a CA certificate.
    pub role: Option<String>,
    pub name: Option<String>,
    /// `DNS:..`, `IP:..` and `URI:..` entries.
    pub sans: Vec<String>,
    pub not_before: String,
    pub not_after: String,
}

fn parse_pem(path: &Path, text: &str) -> Result<Pem, PkiError> {
    let not_cert = |reason: String| PkiError::NotACertificate {
        path: path.to_owned(),
        reason,
    };
    let (_, pem) = x509_parser::pem::parse_x509_pem(text.as_bytes())
        .map_err(|e| not_cert(format!("invalid PEM: {e}")))?;
    if pem.label != "CERTIFICATE" {
        return Err(not_cert(format!("PEM block is a {}", pem.label)));
    }
    Ok(pem)
}

fn general_name_text(name: &GeneralName<'_>) -> String {
    match name {
        GeneralName::DNSName(n) => format!("DNS:{n}"),
        GeneralName::URI(u) => format!("URI:{u}"),
        GeneralName::IPAddress(bytes) => {
            let ip = <[u8; 4]>::try_from(*bytes)
                .map(IpAddr::from)
                .or_else(|_| <[u8; 16]>::try_from(*bytes).map(IpAddr::from));
            match ip {
                Ok(ip) => format!("IP:{ip}"),
                Err(_) => name.to_string(),
            }
        }
        other => other.to_string(),
    }
}

/// Reads the first certificate of `file`.
pub fn summarize(file: &Path) -> Result<CertSummary, PkiError> {
    let text = read_public_file(file)?;
    let pem = parse_pem(file, &text)?;
    let not_cert = |reason: String| PkiError::NotACertificate {
        path: file.to_owned(),
        reason,
    };
    let cert = pem.parse_x509().map_err(|e| not_cert(e.to_string()))?;
    let info = CertInfo::from_pem(&text).map_err(|e| not_cert(e.to_string()))?;
    let sans = cert
        .subject_alternative_name()
        .map_err(|e| not_cert(e.to_string()))?
        .map(|ext| {
            ext.value
                .general_names
                .iter()
                .map(general_name_text)
                .collect()
        })
        .unwrap_or_default();
    Ok(CertSummary {
        file: file.to_owned(),
        subject: cert.subject().to_string(),
        issuer: cert.issuer().to_string(),
        serial: cert.raw_serial_as_string().replace(':', ""),
        is_ca: info.is_ca,
        role: info.identity.as_ref().map(|i| i.role().to_string()),
        name: info.identity.as_ref().map(|i| i.name().to_owned()),
        sans,
        not_before: rfc3339(info.not_before),
        not_after: rfc3339(info.not_after),
    })
}

/// `pki show`.
pub fn show(file: &Path, json: bool) -> Result<String, PkiError> {
    let s = summarize(file)?;
    if json {
        return Ok(serde_json::to_string_pretty(&s)
            .expect("a summary of strings, booleans and paths always serializes"));
    }
    let identity = match (&s.role, &s.name) {
        (Some(role), Some(name)) => format!("{role}/{name}"),
        _ => "none".to_owned(),
    };
    Ok(format!(
        "file:       {}\nsubject:    {}\nissuer:     {}\nserial:     {}\nCA:         {}\nidentity:   {identity}\nSANs:       {}\nnot before: {}\nnot after:  {}",
        s.file.display(),
        s.subject,
        s.issuer,
        s.serial,
        if s.is_ca { "yes" } else { "no" },
        if s.sans.is_empty() {
            "none".to_owned()
        } else {
            s.sans.join(", ")
        },
        s.not_before,
        s.not_after
    ))
}

/// Whether the certificate in `cert_path` carries a valid signature of `ca_pem`'s key.
fn signed_by(cert_path: &Path, cert_text: &str, ca_pem: &str) -> Result<bool, PkiError> {
    let cert_pem = parse_pem(cert_path, cert_text)?;
    let cert = cert_pem
        .parse_x509()
        .map_err(|e| PkiError::NotACertificate {
            path: cert_path.to_owned(),
            reason: e.to_string(),
        })?;
    let ca_path = Path::new(CA_CERT);
    let ca_pem = parse_pem(ca_path, ca_pem)?;
    let ca = ca_pem.parse_x509().map_err(|e| PkiError::NotACertificate {
        path: ca_path.to_owned(),
        reason: e.to_string(),
    })?;
    Ok(cert.verify_signature(Some(ca.public_key())).is_ok())
}

/// Why a certificate is re-issued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reason {
    Missing,
    PreviousCa,
    Due,
}

impl Reason {
    fn text(self) -> &'static str {
        match self {
            Reason::Missing => "its files are missing",
            Reason::PreviousCa => "it was signed by a previous CA",
            Reason::Due => "it expires within the overlap window",
        }
    }
}

/// `None` when the certificate can stay; otherwise why it must be re-issued.
fn rotation_reason(
    record: &CertRecord,
    ca_pem: &str,
    now: SystemTime,
    overlap: Duration,
) -> Result<Option<Reason>, PkiError> {
    let path = record.cert_path();
    if !path.exists() || !record.key_path().exists() {
        return Ok(Some(Reason::Missing));
    }
    let text = read_public_file(&path)?;
    if !signed_by(&path, &text, ca_pem)? {
        return Ok(Some(Reason::PreviousCa));
    }
    let info = CertInfo::from_pem(&text).map_err(|e| PkiError::NotACertificate {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    Ok(info.due_for_rotation(now, overlap).then_some(Reason::Due))
}

/// Whether `bundle` trusts a CA other than `ca_pem` that has not expired.
fn bundle_trusts_another_ca(bundle: &str, ca_pem: &str, now: SystemTime) -> Result<bool, CaError> {
    Ok(merge_ca_bundle(&[bundle, ca_pem], now)? != merge_ca_bundle(&[ca_pem], now)?)
}

/// `pki rotate` (without `--retire-old-ca`).
pub fn rotate(
    dir: &Path,
    overlap: Duration,
    new_ca: bool,
    validity: Option<Duration>,
    now: SystemTime,
) -> Result<Vec<String>, PkiError> {
    let mut ca = load_ca(dir)?;
    let dir = absolute_dir(dir)?;
    let mut index = load_index(&dir)?;
    let mut report = Vec::new();

    // Everything re-issued is checked against the overlap first, so a rotation that could not
    // finish (or would be due again at once) changes nothing.
    let lifetime_of =
        |record: &CertRecord| validity.unwrap_or(Duration::from_secs(record.lifetime_secs));
    for record in &index.certs {
        let lifetime = lifetime_of(record);
        if lifetime <= overlap {
            return Err(PkiError::Usage(format!(
                "{}: a lifetime of {} is not longer than the overlap of {}, so the re-issued certificate would be due at once; pass a longer --validity or a shorter --overlap",
                record.name,
                humantime::format_duration(lifetime),
                humantime::format_duration(overlap)
            )));
        }
    }

    if new_ca {
        let bundle_path = dir.join(CA_BUNDLE);
        let bundle = if bundle_path.exists() {
            read_public_file(&bundle_path)?
        } else {
            String::new()
        };
        if bundle_trusts_another_ca(&bundle, ca.cert_pem(), now)? {
            info!(dir = %dir.display(), "CA rotation already under way: finishing it");
            report.push(format!(
                "a CA rotation is already under way ({CA_BUNDLE} still trusts the previous CA): finishing it instead of creating another CA; run `haclt pki rotate --dir {} --retire-old-ca` once every daemon has reloaded",
                dir.display()
            ));
        } else {
            let generation = index
                .ca
                .generation
                .checked_add(1)
                .ok_or_else(|| PkiError::Index {
                    path: dir.join(INDEX),
                    reason: "CA generation overflows".into(),
                })?;
            let record = CaRecord {
                generation,
                ..index.ca.clone()
            };
            let lifetime = Duration::from_secs(record.lifetime_secs);
            let next = Ca::create(&record.common_name(), validity_from(now, lifetime)?)?;
            let merged = merge_ca_bundle(&[ca.cert_pem(), next.cert_pem()], now)?;
            // The bundle first: daemons trust the new CA before anything signed by it appears.
            write_public_file(&bundle_path, merged.as_bytes())?;
            write_key_file(&dir.join(CA_KEY), next.key_pem().as_bytes())?;
            write_public_file(&dir.join(CA_CERT), next.cert_pem().as_bytes())?;
            index.ca = record;
            index.save(&dir)?;
            info!(dir = %dir.display(), ca = %index.ca.common_name(), "created new CA");
            report.push(format!(
                "created CA {} (expires {}); {CA_BUNDLE} trusts it and the previous CA",
                index.ca.common_name(),
                rfc3339(now + lifetime)
            ));
            ca = next;
        }
    }

    let mut reissued = 0;
    for i in 0..index.certs.len() {
        let record = index.certs[i].clone();
        let role = parse_role(&record.role)?;
        match rotation_reason(&record, ca.cert_pem(), now, overlap)? {
            None => {
                info!(name = %record.name, role = %role, "certificate not due");
            }
            Some(reason) => {
                let record = CertRecord {
                    lifetime_secs: lifetime_of(&record).as_secs(),
                    ..record
                };
                info!(name = %record.name, role = %role, reason = reason.text(), "re-issuing");
                let expires = write_cert(&ca, &record, role, now)?;
                report.push(format!(
                    "re-issued {} ({role}) in {}: {}; expires {}",
                    record.name,
                    record.out_dir.display(),
                    reason.text(),
                    rfc3339(expires)
                ));
                index.certs[i] = record;
                // Saved after each certificate, so an interrupted rotation resumes where it was.
                index.save(&dir)?;
                reissued += 1;
            }
        }
    }
    report.push(format!(
        "{reissued} of {} certificates re-issued",
        index.certs.len()
    ));
    Ok(report)
}

/// `pki rotate --retire-old-ca`: once every certificate is signed by the current CA, the bundle
/// trusts only it.
pub fn retire_old_ca_in(dir: &Path, now: SystemTime) -> Result<Vec<String>, PkiError> {
    let ca = load_ca(dir)?;
    let dir = absolute_dir(dir)?;
    let index = load_index(&dir)?;
    let mut stale = Vec::new();
    for record in &index.certs {
        // Expiry does not matter here, only who signed it.
        if let Some(Reason::Missing | Reason::PreviousCa) =
            rotation_reason(record, ca.cert_pem(), now, Duration::ZERO)?
        {
            stale.push(record.name.as_str());
        }
    }
    if !stale.is_empty() {
        return Err(PkiError::Usage(format!(
            "not signed by the current CA yet: {}; run `haclt pki rotate --dir {}` first",
            stale.join(", "),
            dir.display()
        )));
    }
    write_public_file(
        &dir.join(CA_BUNDLE),
        merge_ca_bundle(&[ca.cert_pem()], now)?.as_bytes(),
    )?;
    info!(dir = %dir.display(), "retired the previous CA");
    Ok(vec![format!(
        "{CA_BUNDLE} now trusts only {}",
        index.ca.common_name()
    )])
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    const DAY: Duration = Duration::from_secs(86_400);

    fn usage(r: Result<impl std::fmt::Debug, PkiError>) -> String {
        match r {
            Err(e @ PkiError::Usage(_)) => e.to_string(),
            other => panic!("expected a usage error, got {other:?}"),
        }
    }

    #[test]
    fn arguments_are_validated() {
        assert_eq!(
            parse_lifetime("validity", "1y").unwrap().as_secs(),
            31_557_600
        );
        assert!(usage(parse_lifetime("validity", "forever")).contains("--validity"));
        assert!(usage(parse_lifetime("validity", "10m")).contains("minimum"));
        assert_eq!(parse_role("ejabberd").unwrap(), Role::Ejabberd);
        assert!(usage(parse_role("admin")).contains("unknown role"));
        assert!(usage(check_cert_name("Bad Name")).contains("invalid name"));
        assert!(usage(check_cert_name("ca")).contains("reserved"));
        check_cert_name("psql1server").unwrap();
        // Every usage error maps to exit code 64, file errors to 1.
        assert_eq!(
            Failure::from(PkiError::NoCa(PathBuf::from("/x"))).exit_code(),
            64
        );
        assert_eq!(
            Failure::from(PkiError::Ca(CaError::InvalidSan("a b".into()))).exit_code(),
            64
        );
        assert_eq!(
            Failure::from(PkiError::Ca(CaError::KeyMismatch)).exit_code(),
            1
        );
    }

    #[test]
    fn bad_input_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let ca_dir = dir.path().join("ca");
        let now = SystemTime::now();
        usage(init(&ca_dir, "Cluster CA", "10y", false, now));
        assert!(!ca_dir.join(CA_CERT).exists());
        init(&ca_dir, "cluster-ca", "10y", false, now).unwrap();
        let before = std::fs::read(ca_dir.join(INDEX)).unwrap();
        let bad_san = issue(&ca_dir, "m1", "monitor", &["a b".into()], "1y", None, now);
        assert!(matches!(bad_san, Err(PkiError::Ca(CaError::InvalidSan(_)))));
        // Longer than the CA lives.
        let too_long = issue(&ca_dir, "m1", "monitor", &[], "20y", None, now);
        assert!(matches!(
            too_long,
            Err(PkiError::Ca(CaError::ValidityBeyondCa))
        ));
        assert!(!ca_dir.join("m1.pem").exists() && !ca_dir.join("m1.key").exists());
        assert_eq!(std::fs::read(ca_dir.join(INDEX)).unwrap(), before);
    }

    fn record(name: &str, out: &str) -> CertRecord {
        CertRecord {
            name: name.into(),
            role: "postgres".into(),
            sans: vec!["10.0.0.1".into()],
            lifetime_secs: 3600,
            out_dir: PathBuf::from(out),
        }
    }

    #[test]
    fn index_round_trips_and_replaces_by_name_and_directory() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(Index::load(dir.path()).unwrap(), None);
        let mut index = Index::new(CaRecord {
            name: "cluster-ca".into(),
            generation: 1,
            lifetime_secs: 10,
        });
        index.record(record("a", "/x"));
        index.record(record("a", "/y"));
        index.record(CertRecord {
            lifetime_secs: 7200,
            ..record("a", "/x")
        });
        assert_eq!(index.certs.len(), 2);
        assert_eq!(index.certs[0].lifetime_secs, 7200);
        index.save(dir.path()).unwrap();
        assert_eq!(Index::load(dir.path()).unwrap(), Some(index.clone()));
        // Written atomically: no temporary file is left, and it is public (0644).
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        let mode = std::fs::metadata(dir.path().join(INDEX))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077 & !0o044, 0);
        assert_eq!(index.certs[1].cert_path(), PathBuf::from("/y/a.pem"));
        assert_eq!(index.certs[1].key_path(), PathBuf::from("/y/a.key"));
        assert_eq!(index.ca.common_name(), "cluster-ca");
        assert_eq!(
            CaRecord {
                generation: 3,
                ..index.ca.clone()
            }
            .common_name(),
            "cluster-ca-g3"
        );
    }

    #[test]
    fn corrupt_or_foreign_index_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(INDEX);
        let valid = serde_json::to_value(Index::new(CaRecord {
            name: "c".into(),
            generation: 1,
            lifetime_secs: 1,
        }))
        .unwrap();
        let mut cases = Vec::new();
        let mut v = valid.clone();
        v["version"] = 2.into();
        cases.push((v.to_string(), "version 2"));
        let mut v = valid.clone();
        v["extra"] = true.into();
        cases.push((v.to_string(), "unknown field"));
        let mut v = valid;
        v["certs"] = serde_json::json!([record("a", "/x")]);
        v["certs"][0]["role"] = "admin".into();
        cases.push((v.to_string(), "unknown role"));
        cases.push(("{".into(), "EOF"));
        for (text, expected) in cases {
            std::fs::write(&path, text).unwrap();
            match Index::load(dir.path()) {
                Err(e @ PkiError::Index { .. }) => {
                    assert!(e.to_string().contains(expected), "{e}")
                }
                other => panic!("expected an index error, got {other:?}"),
            }
        }
    }

    #[test]
    fn rotation_follows_the_clock_and_is_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let now = SystemTime::now();
        init(dir.path(), "cluster-ca", "10y", false, now).unwrap();
        issue(dir.path(), "short", "postgres", &[], "60d", None, now).unwrap();
        issue(dir.path(), "long", "monitor", &[], "1y", None, now).unwrap();
        let read = |n: &str| std::fs::read(dir.path().join(format!("{n}.pem"))).unwrap();
        let (short, long) = (read("short"), read("long"));
        // 45 days later only the 60-day certificate is within 30 days of expiry.
        let later = now + 45 * DAY;
        let report = rotate(dir.path(), 30 * DAY, false, None, later).unwrap();
        assert_eq!(report.last().unwrap(), "1 of 2 certificates re-issued");
        assert_ne!(read("short"), short);
        assert_eq!(read("long"), long);
        let again = rotate(dir.path(), 30 * DAY, false, None, later).unwrap();
        assert_eq!(again, vec!["0 of 2 certificates re-issued".to_owned()]);
        // A lifetime within the overlap would rotate forever: refused, nothing written.
        let short = read("short");
        usage(rotate(dir.path(), 90 * DAY, false, None, later));
        assert_eq!(read("short"), short);
        // After the CA is replaced, the old CA cannot be retired before every certificate is
        // re-issued by the new one.
        init(dir.path(), "cluster-ca", "10y", true, later).unwrap();
        let refused = usage(retire_old_ca_in(dir.path(), later));
        assert!(refused.contains("short, long"), "{refused}");
        rotate(dir.path(), 30 * DAY, false, None, later).unwrap();
        retire_old_ca_in(dir.path(), later).unwrap();
    }
}
