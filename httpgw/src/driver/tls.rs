//! TLS termination: certificates and keys read from PEM files and checked (the key belongs to
//! the certificate, no one but its owner and group may read or write it), and rustls' server
//! configuration picking the certificate by SNI through [`SniTable`].

use std::io::Read as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ServerConfig, version};

use crate::sni::{MAX_NAMES_PER_CERT, SniTable};
use crate::{CertFiles, TlsConfig};

/// Largest certificate or key file read (a chain of a few certificates is a few KiB).
pub const MAX_PEM_BYTES: u64 = 1 << 20;

/// Why a certificate or its key cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// The file cannot be read, or is not a regular file.
    #[error("{}: {reason}", path.display())]
    Read {
        /// File.
        path: PathBuf,
        /// Whether it is the key file.
        key: bool,
        /// Why.
        reason: String,
    },
    /// The file is larger than [`MAX_PEM_BYTES`].
    #[error("{} is over {MAX_PEM_BYTES} bytes: not a PEM certificate or key", path.display())]
    TooLarge {
        /// File.
        path: PathBuf,
        /// Whether it is the key file.
        key: bool,
    },
    /// Others may read or write the key file.
    #[error(
        "{} has mode {mode:04o}: a key others can read (or its group write) is no secret; chmod 600 (or 640 root:ssl-cert) it",
        path.display()
    )]
    KeyMode {
        /// Key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// No `CERTIFICATE` block, or one that is not valid PEM.
    #[error("{}: {reason}", path.display())]
    BadPem {
        /// Certificate file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The first certificate is not an X.509 certificate webpki can read.
    #[error("{}: the certificate does not parse: {reason}", path.display())]
    BadCertificate {
        /// Certificate file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The key is not one rustls can sign with.
    #[error("{}: the private key is not usable: {reason}", path.display())]
    BadKey {
        /// Key file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The key is not the certificate's.
    #[error("{} is not the key of the certificate in {}", key.display(), cert.display())]
    KeyMismatch {
        /// Certificate file.
        cert: PathBuf,
        /// Key file.
        key: PathBuf,
    },
    /// The crypto provider refuses TLS 1.2 and 1.3 (a build without them).
    #[error("TLS provider: {0}")]
    Provider(String),
}

impl TlsError {
    /// Whether the problem is the key file's (else the certificate file's).
    #[must_use]
    pub fn in_key_file(&self) -> bool {
        match self {
            Self::KeyMode { .. } | Self::BadKey { .. } | Self::KeyMismatch { .. } => true,
            Self::Read { key, .. } | Self::TooLarge { key, .. } => *key,
            Self::BadPem { .. } | Self::BadCertificate { .. } | Self::Provider(_) => false,
        }
    }
}

/// A certificate chain with its key, and the DNS names SNI can select it by.
#[derive(Debug, Clone)]
pub struct LoadedCert {
    /// Chain and signing key.
    pub key: Arc<CertifiedKey>,
    /// The subjectAltName DNS names (`*.example.com` for a wildcard), at most
    /// [`MAX_NAMES_PER_CERT`].
    pub names: Vec<String>,
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn read(path: &Path, key: bool) -> Result<Vec<u8>, TlsError> {
    let failed = |reason: String| TlsError::Read {
        path: path.to_owned(),
        key,
        reason,
    };
    let meta = std::fs::metadata(path).map_err(|e| failed(e.to_string()))?;
    if !meta.is_file() {
        return Err(failed("not a regular file".into()));
    }
    let mode = meta.permissions().mode() & 0o777;
    if key && mode & 0o027 != 0 {
        return Err(TlsError::KeyMode {
            path: path.to_owned(),
            mode,
        });
    }
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_PEM_BYTES + 1).read_to_end(&mut bytes))
        .map_err(|e| failed(e.to_string()))?;
    if bytes.len() as u64 > MAX_PEM_BYTES {
        return Err(TlsError::TooLarge {
            path: path.to_owned(),
            key,
        });
    }
    Ok(bytes)
}

/// Reads and checks one certificate and its key.
///
/// # Errors
/// A [`TlsError`] naming the file at fault.
pub fn load_cert(files: &CertFiles) -> Result<LoadedCert, TlsError> {
    let cert_path = &files.cert_file;
    let key_path = &files.key_file;
    let pem = read(cert_path, false)?;
    let chain = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::BadPem {
            path: cert_path.clone(),
            reason: e.to_string(),
        })?;
    let Some(leaf) = chain.first() else {
        return Err(TlsError::BadPem {
            path: cert_path.clone(),
            reason: "no CERTIFICATE block".into(),
        });
    };
    let names = webpki::EndEntityCert::try_from(leaf)
        .map_err(|e| TlsError::BadCertificate {
            path: cert_path.clone(),
            reason: e.to_string(),
        })?
        .valid_dns_names()
        .take(MAX_NAMES_PER_CERT)
        .map(str::to_owned)
        .collect();
    let key_pem = read(key_path, true)?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| TlsError::BadKey {
        path: key_path.clone(),
        reason: e.to_string(),
    })?;
    let key = CertifiedKey::from_der(chain, key, &provider()).map_err(|e| match e {
        rustls::Error::InconsistentKeys(_) => TlsError::KeyMismatch {
            cert: cert_path.clone(),
            key: key_path.clone(),
        },
        e => TlsError::BadKey {
            path: key_path.clone(),
            reason: e.to_string(),
        },
    })?;
    Ok(LoadedCert {
        key: Arc::new(key),
        names,
    })
}

/// The certificate for each client: by SNI, else the first.
#[derive(Debug)]
struct SniResolver {
    table: SniTable,
    keys: Vec<Arc<CertifiedKey>>,
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.keys.get(self.table.pick(hello.server_name())).cloned()
    }
}

/// rustls' server configuration for `tls`: TLS 1.2 and 1.3 only, ALPN from `tls.alpn`
/// (preferred first), the certificate by SNI; and the leaf certificates (DER) it presents.
///
/// # Errors
/// The first certificate or key that cannot be used.
pub(crate) fn server_config(
    tls: &TlsConfig,
) -> Result<(Arc<ServerConfig>, Vec<Vec<u8>>), TlsError> {
    let loaded = tls
        .certs
        .iter()
        .map(load_cert)
        .collect::<Result<Vec<_>, _>>()?;
    let leaves = loaded
        .iter()
        .filter_map(|c| c.key.cert.first().map(|der| der.to_vec()))
        .collect();
    let resolver = SniResolver {
        table: SniTable::new(loaded.iter().map(|c| c.names.iter())),
        keys: loaded.into_iter().map(|c| c.key).collect(),
    };
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&version::TLS13, &version::TLS12])
        .map_err(|e| TlsError::Provider(e.to_string()))?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(resolver));
    config.alpn_protocols = tls
        .alpn
        .iter()
        .map(|a| a.as_str().as_bytes().to_vec())
        .collect();
    Ok((Arc::new(config), leaves))
}
