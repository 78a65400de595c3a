//! TLS for the NBD server (`NBD_OPT_STARTTLS`) with rustls.
//!
//! The server configuration (certificate chain, key, optional client CA) is
//! loaded at startup and can be swapped on SIGHUP ([`Tls::reload`]);
//! connections already running keep the configuration they started with.
//! With `client_ca`, a client certificate signed by that CA is mandatory.

use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::ServerConfig;
use tokio_rustls::TlsAcceptor;

use crate::config::{TlsConfig, TlsMode};

pub use crate::tls::TlsError;

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

/// Builds the client configuration used for outgoing mirrors: trusts
/// `client_ca` and presents this agent's certificate. None without `client_ca`.
pub fn client_config(c: &TlsConfig) -> Result<Option<rustls::ClientConfig>, TlsError> {
    let Some(ca) = &c.client_ca else { return Ok(None) };
    crate::tls::client_config(crate::tls::roots(Some(ca))?, Some((&c.cert, &c.key))).map(Some)
}

/// Builds a rustls server configuration from the config section (with
/// `client_ca`, client certificates are mandatory).
pub fn server_config(c: &TlsConfig) -> Result<ServerConfig, TlsError> {
    let clients = c.client_ca.as_deref().map_or(crate::tls::ClientAuth::None, crate::tls::ClientAuth::Required);
    crate::tls::server_config(&c.cert, &c.key, clients)
}
