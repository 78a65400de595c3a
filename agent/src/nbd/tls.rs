//! TLS for the NBD server (`NBD_OPT_STARTTLS`) with rustls.
//!
//! The server configuration (certificate chain, key, optional client CA) is
//! loaded at startup and can be swapped on SIGHUP ([`Tls::reload`]);
//! connections already running keep the configuration they started with.
//! With `client_ca`, a client certificate signed by that CA is mandatory.

use std::path::Path;
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

use crate::config::{TlsConfig, TlsMode};

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file is missing or unreadable.
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

/// The listener's TLS policy and current server configuration.
#[derive(Debug)]
pub struct Tls {
    policy: proto::TlsPolicy,
    config: Option<TlsConfig>,
    server: ArcSwap<Option<Arc<ServerConfig>>>,
    client: ArcSwap<Option<Arc<rustls::ClientConfig>>>,
}

impl Tls {
    /// Loads the `nbd.tls` section (None: TLS unavailable).
    pub fn load(config: Option<&TlsConfig>) -> Result<Self, TlsError> {
        let policy = match config.map(|c| c.mode) {
            None | Some(TlsMode::Off) => proto::TlsPolicy::Unavailable,
            Some(TlsMode::Optional) => proto::TlsPolicy::Optional,
            Some(TlsMode::Required) => proto::TlsPolicy::Required,
        };
        let (server, client) = match config.filter(|c| c.mode != TlsMode::Off) {
            Some(c) => (Some(Arc::new(server_config(c)?)), client_config(c)?.map(Arc::new)),
            None => (None, None),
        };
        Ok(Self {
            policy,
            config: config.cloned(),
            server: ArcSwap::from_pointee(server),
            client: ArcSwap::from_pointee(client),
        })
    }

    /// The negotiation policy.
    pub fn policy(&self) -> proto::TlsPolicy {
        self.policy
    }

    /// An acceptor for a new connection.
    pub fn acceptor(&self) -> Option<TlsAcceptor> {
        self.server.load().as_ref().as_ref().map(|c| TlsAcceptor::from(c.clone()))
    }

    /// The client configuration for outgoing `nbds://` mirrors: trusts
    /// `client_ca` (the agents' shared CA) and presents this agent's own
    /// certificate. None without `client_ca`.
    pub fn client(&self) -> Option<Arc<rustls::ClientConfig>> {
        self.client.load().as_ref().clone()
    }

    /// Re-reads certificate, key and CA (SIGHUP); keeps the old ones on error.
    pub fn reload(&self) -> Result<(), TlsError> {
        if let Some(c) = self.config.as_ref().filter(|c| c.mode != TlsMode::Off) {
            let (server, client) = (server_config(c)?, client_config(c)?);
            self.server.store(Arc::new(Some(Arc::new(server))));
            self.client.store(Arc::new(client.map(Arc::new)));
            tracing::info!("NBD TLS certificates reloaded");
        }
        Ok(())
    }
}

fn pem_err(path: &Path) -> impl Fn(rustls_pki_types::pem::Error) -> TlsError + '_ {
    move |e| TlsError::Pem { path: path.display().to_string(), message: e.to_string() }
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(pem_err(path))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem_err(path))?;
    if certs.is_empty() {
        return Err(TlsError::Pem { path: path.display().to_string(), message: "no certificate in the file".into() });
    }
    Ok(certs)
}

/// Builds the client configuration used for outgoing mirrors.
pub fn client_config(c: &TlsConfig) -> Result<Option<rustls::ClientConfig>, TlsError> {
    let Some(ca) = &c.client_ca else { return Ok(None) };
    let mut roots = RootCertStore::empty();
    for cert in certs(ca)? {
        roots.add(cert).map_err(|e| TlsError::Config(format!("{}: {e}", ca.display())))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_root_certificates(roots)
        .with_client_auth_cert(certs(&c.cert)?, PrivateKeyDer::from_pem_file(&c.key).map_err(pem_err(&c.key))?)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    Ok(Some(config))
}

/// Builds a rustls server configuration from the config section.
pub fn server_config(c: &TlsConfig) -> Result<ServerConfig, TlsError> {
    let chain = certs(&c.cert)?;
    let key = PrivateKeyDer::from_pem_file(&c.key).map_err(pem_err(&c.key))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let builder = match &c.client_ca {
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for cert in certs(ca)? {
                roots.add(cert).map_err(|e| TlsError::Config(format!("{}: {e}", ca.display())))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| TlsError::Config(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    builder.with_single_cert(chain, key).map_err(|e| TlsError::Config(e.to_string()))
}
