//! The certificate a handshake presents, swappable at rotation.

use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::SignatureScheme;
use rustls::client::ResolvesClientCert;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use crate::identity::Credentials;

/// Hands the current [`Credentials`] to every new handshake, client or
/// server side. [`CredentialResolver::store`] swaps them atomically: the
/// configs are not rebuilt and established connections, which have
/// finished their handshake, are not touched.
#[derive(Debug)]
pub struct CredentialResolver {
    current: ArcSwap<Credentials>,
}

impl CredentialResolver {
    /// A resolver presenting `initial` until the next [`store`](Self::store).
    pub fn new(initial: Credentials) -> Self {
        Self {
            current: ArcSwap::from_pointee(initial),
        }
    }

    /// Replaces the credentials used by future handshakes.
    pub fn store(&self, credentials: Credentials) {
        self.current.store(Arc::new(credentials));
    }

    /// The credentials future handshakes will present.
    pub fn current(&self) -> Arc<Credentials> {
        self.current.load_full()
    }

    fn certified_key(&self) -> Arc<CertifiedKey> {
        self.current.load().certified_key().clone()
    }
}

impl ResolvesServerCert for CredentialResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        // One identity per workload: no choice by SNI.
        Some(self.certified_key())
    }
}

impl ResolvesClientCert for CredentialResolver {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        // rustls checks the key against the offered schemes itself and
        // fails the handshake if none fits.
        Some(self.certified_key())
    }

    fn has_certs(&self) -> bool {
        true
    }
}
