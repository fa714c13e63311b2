//! The TLS side of HTTPS checks (rustls): client configurations built once per check
//! setting, and what a failed handshake means for `show lb`.
//!
//! Verification is on by default, against `ca_file` (PEM) when given, else the system's trust
//! store. The name checked is the `sni` name when set (and sent as SNI), else the backend's
//! address, which the certificate must then list as an IP SAN (rustls sends no SNI for an
//! address). `verify = false` (HAProxy `verify none`) accepts any certificate but still checks
//! the handshake's signatures, so the check still proves a working TLS server.

use std::net::{IpAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use tokio_rustls::TlsConnector;

use super::{TlsCheck, TlsFailure};

/// Why a TLS client configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    /// The CA file could not be read or holds a broken PEM block.
    #[error("CA file {path}: {reason}")]
    CaFile {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// The CA file holds no certificate rustls accepts.
    #[error("CA file {0} holds no usable certificate")]
    NoCertificates(PathBuf),
    /// The system trust store is empty or unreadable.
    #[error("no system CA certificates found (install ca-certificates, or set ca_file)")]
    NoSystemRoots,
    /// rustls refused the settings.
    #[error("TLS settings: {0}")]
    Settings(#[from] rustls::Error),
}

/// Reads a PEM file of CA certificates (what `vipgate check` and each reload do).
///
/// # Errors
/// An unreadable file, a broken PEM block, or no certificate rustls accepts.
pub fn load_ca_file(path: &Path) -> Result<RootCertStore, TlsSetupError> {
    let ca_error = |e: rustls::pki_types::pem::Error| TlsSetupError::CaFile {
        path: path.to_owned(),
        reason: e.to_string(),
    };
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(path).map_err(ca_error)? {
        // A certificate webpki cannot parse is skipped, as for the system store.
        let _ = roots.add(cert.map_err(ca_error)?);
    }
    if roots.is_empty() {
        return Err(TlsSetupError::NoCertificates(path.to_owned()));
    }
    Ok(roots)
}

/// Whether `name` can be sent as SNI and checked against a certificate (a DNS name).
#[must_use]
pub fn valid_sni(name: &str) -> bool {
    matches!(ServerName::try_from(name), Ok(ServerName::DnsName(_)))
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// The connector for one check setting.
///
/// # Errors
/// See [`TlsSetupError`].
pub fn connector(tls: &TlsCheck) -> Result<TlsConnector, TlsSetupError> {
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let config = if tls.verify {
        let roots = match &tls.ca_file {
            Some(path) => load_ca_file(path)?,
            None => system_roots()?,
        };
        builder.with_root_certificates(roots).with_no_client_auth()
    } else {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
            .with_no_client_auth()
    };
    Ok(TlsConnector::from(Arc::new(config)))
}

fn system_roots() -> Result<RootCertStore, TlsSetupError> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    roots.add_parsable_certificates(found.certs);
    if roots.is_empty() {
        return Err(TlsSetupError::NoSystemRoots);
    }
    Ok(roots)
}

/// The name a check verifies: the SNI name, else the backend's address.
#[must_use]
pub fn server_name(tls: &TlsCheck, addr: SocketAddrV4) -> ServerName<'static> {
    tls.sni
        .as_ref()
        .and_then(|n| ServerName::try_from(n.clone()).ok())
        .unwrap_or_else(|| ServerName::IpAddress(IpAddr::V4(*addr.ip()).into()))
}

/// What a failed handshake says, from the error tokio-rustls returns.
#[must_use]
pub fn handshake_failure(e: &std::io::Error) -> TlsFailure {
    let Some(rustls::Error::InvalidCertificate(why)) = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    else {
        return TlsFailure::Handshake;
    };
    match why {
        CertificateError::UnknownIssuer | CertificateError::BadSignature => TlsFailure::Untrusted,
        CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
            TlsFailure::NameMismatch
        }
        CertificateError::Expired
        | CertificateError::ExpiredContext { .. }
        | CertificateError::NotValidYet
        | CertificateError::NotValidYetContext { .. } => TlsFailure::OutOfDate,
        _ => TlsFailure::BadCertificate,
    }
}

/// `verify = false`: any certificate, but the handshake's signatures are still checked.
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
