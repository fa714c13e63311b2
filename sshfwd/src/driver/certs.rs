//! OpenSSH certificates on disk and on the wire: loading `-cert.pub` files, and turning a
//! certificate whose CA signature checks out into the [`CertFacts`] the pure policy in
//! [`crate::cert`] judges.

use std::path::Path;

use russh::keys::Certificate;
use russh::keys::ssh_key::certificate::CertType;

use crate::cert::{CertFacts, CertKind};
use crate::error::SshFwdError;

/// Largest certificate file read (an OpenSSH certificate line is a few KiB at most).
const MAX_CERT_FILE: u64 = 64 * 1024;

/// Seconds since the epoch, for the validity window (the driver reads the clock; the policy
/// in `crate::cert` takes the time as a parameter).
#[allow(clippy::disallowed_methods)]
pub(crate) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Reads an OpenSSH certificate file (`ssh-ed25519-cert-v01@openssh.com AAAA... comment`).
///
/// # Errors
/// Unreadable, too large, or not a certificate.
pub(crate) fn load_certificate(path: &Path) -> Result<Certificate, SshFwdError> {
    let bad = |why: String| SshFwdError::Identity {
        path: path.to_path_buf(),
        why,
    };
    let meta = std::fs::metadata(path).map_err(|error| SshFwdError::File {
        path: path.to_path_buf(),
        error,
    })?;
    if meta.len() > MAX_CERT_FILE {
        return Err(bad(format!(
            "certificate file larger than {MAX_CERT_FILE} bytes"
        )));
    }
    let text = std::fs::read_to_string(path).map_err(|error| SshFwdError::File {
        path: path.to_path_buf(),
        error,
    })?;
    Certificate::from_openssh(text.trim()).map_err(|e| bad(format!("not a certificate: {e}")))
}

/// The fields the policy needs. Call only after [`Certificate::verify_signature`] passed.
pub(crate) fn facts(cert: &Certificate) -> CertFacts {
    CertFacts {
        kind: match cert.cert_type() {
            CertType::Host => CertKind::Host,
            CertType::User => CertKind::User,
        },
        key_id: cert.key_id().to_string(),
        principals: cert.valid_principals().to_vec(),
        valid_after: cert.valid_after(),
        valid_before: cert.valid_before(),
        critical_options: cert
            .critical_options()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        extensions: cert.extensions().keys().cloned().collect(),
    }
}

/// The CA key's wire blob (what known_hosts and authorized_keys lines hold).
pub(crate) fn ca_blob(cert: &Certificate) -> Vec<u8> {
    use russh::keys::PublicKeyBase64;
    russh::keys::PublicKey::new(cert.signature_key().clone(), "").public_key_bytes()
}
