//! rustls material from PEM files, for every TLS endpoint of the agent: the
//! NBD server and its outgoing `nbds://` mirrors ([`crate::nbd::tls`]), the
//! control API over TCP ([`crate::api::access`]) and the control client
//! ([`crate::api::client`]). One error type says which file was wrong.

use std::path::Path;
use std::sync::Arc;

use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file is missing, unreadable or holds nothing usable.
    #[error("Cannot read {path}: {message}")]
    Pem {
        /// File.
        path: String,
        /// What went wrong.
        message: String,
    },
    /// rustls refused the material.
    #[error("Invalid TLS setup: {0}")]
    Config(String),
}

fn pem_err(path: &Path) -> impl Fn(rustls_pki_types::pem::Error) -> TlsError + '_ {
    move |e| TlsError::Pem { path: path.display().to_string(), message: e.to_string() }
}

fn config_err(e: impl std::fmt::Display) -> TlsError {
    TlsError::Config(e.to_string())
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The certificates of a PEM file (at least one).
pub fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(pem_err(path))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem_err(path))?;
    if certs.is_empty() {
        return Err(TlsError::Pem { path: path.display().to_string(), message: "no certificate in the file".into() });
    }
    Ok(certs)
}

/// The private key of a PEM file.
pub fn key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(pem_err(path))
}

/// Trust roots: the CA file's certificates, or without one the platform's
/// store (`SSL_CERT_FILE` / `SSL_CERT_DIR` first, then the system's bundle).
pub fn roots(ca: Option<&Path>) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    match ca {
        Some(ca) => {
            for cert in certs(ca)? {
                roots.add(cert).map_err(|e| TlsError::Config(format!("{}: {e}", ca.display())))?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            let (added, _unparsable) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                let why: Vec<String> = found.errors.iter().map(ToString::to_string).collect();
                return Err(TlsError::Config(format!(
                    "no CA certificates in the system store ({}); name a CA file (--ca-cert)",
                    if why.is_empty() { "it is empty".to_owned() } else { why.join("; ") }
                )));
            }
        }
    }
    Ok(roots)
}

/// How a server treats client certificates.
#[derive(Debug, Clone, Copy)]
pub enum ClientAuth<'a> {
    /// None asked for.
    None,
    /// Certificates signed by this CA are required.
    Required(&'a Path),
    /// Certificates signed by this CA are verified when presented (another
    /// credential can stand in for them).
    Optional(&'a Path),
}

/// A server configuration: certificate chain, key, client certificates.
pub fn server_config(cert: &Path, key_file: &Path, clients: ClientAuth<'_>) -> Result<ServerConfig, TlsError> {
    let (chain, key) = (certs(cert)?, key(key_file)?);
    let builder =
        ServerConfig::builder_with_provider(provider()).with_safe_default_protocol_versions().map_err(config_err)?;
    let builder = match clients {
        ClientAuth::None => builder.with_no_client_auth(),
        ClientAuth::Required(ca) | ClientAuth::Optional(ca) => {
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots(Some(ca))?), provider());
            let verifier =
                if matches!(clients, ClientAuth::Optional(_)) { verifier.allow_unauthenticated() } else { verifier };
            builder.with_client_cert_verifier(verifier.build().map_err(config_err)?)
        }
    };
    builder
        .with_single_cert(chain, key)
        .map_err(|e| TlsError::Config(format!("{} with {}: {e}", cert.display(), key_file.display())))
}

/// A client configuration: trust roots, and the certificate and key to
/// present, if any.
pub fn client_config(roots: RootCertStore, identity: Option<(&Path, &Path)>) -> Result<ClientConfig, TlsError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(config_err)?
        .with_root_certificates(roots);
    match identity {
        Some((cert, key_file)) => builder
            .with_client_auth_cert(certs(cert)?, key(key_file)?)
            .map_err(|e| TlsError::Config(format!("{} with {}: {e}", cert.display(), key_file.display()))),
        None => Ok(builder.with_no_client_auth()),
    }
}
