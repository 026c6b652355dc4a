//! Certificate verification for SPIFFE identities, both directions.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::verify_server_cert_signed_by_trust_anchor;
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::server::ParsedCertificate;
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, Error, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use super::{
    PeerIdentityError, TlsError, TrustBundle, provider, server_name_matches, spiffe_id_of,
};
use crate::identity::SpiffeId;

/// Verifies peers by SPIFFE ID: the chain must lead to a root of the trust
/// bundle (webpki, with the ring provider's algorithms; no DNS name check),
/// and the leaf must carry exactly one URI SAN, a valid SPIFFE ID in the
/// bundle's trust domain. As a server-certificate verifier it also requires
/// the ID to be the one the connection's [`ServerName`] encodes (see
/// [`super::server_name_for`]).
///
/// Failures are rustls errors [`super::HandshakeFailure::of`] classifies:
/// `UnknownIssuer`, `Expired*`, `NotValidYet*`, `NotValidForNameContext`
/// (identity mismatch) and `Other(PeerIdentityError)` (bad SAN, or wrong
/// trust domain).
#[derive(Debug)]
pub struct SpiffeVerifier {
    bundle: TrustBundle,
    provider: Arc<CryptoProvider>,
    /// Chain building for client certificates (clientAuth EKU checks).
    client_chain: Arc<dyn ClientCertVerifier>,
}

impl SpiffeVerifier {
    /// A verifier for peers of `bundle`'s trust domain.
    pub fn new(bundle: TrustBundle) -> Result<Self, TlsError> {
        let provider = provider();
        let client_chain =
            WebPkiClientVerifier::builder_with_provider(bundle.roots().clone(), provider.clone())
                .build()?;
        Ok(Self {
            bundle,
            provider,
            client_chain,
        })
    }

    /// The leaf's SPIFFE ID, if it is in our trust domain.
    fn check_leaf(&self, leaf: &CertificateDer<'_>) -> Result<SpiffeId, Error> {
        let id = spiffe_id_of(leaf).map_err(identity_error)?;
        if id.trust_domain() != self.bundle.trust_domain() {
            return Err(identity_error(PeerIdentityError::WrongTrustDomain {
                expected: self.bundle.trust_domain().clone(),
                presented: id,
            }));
        }
        Ok(id)
    }
}

fn identity_error(error: PeerIdentityError) -> Error {
    Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(error))))
}

impl ServerCertVerifier for SpiffeVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let parsed = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &parsed,
            self.bundle.roots(),
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        let id = self.check_leaf(end_entity)?;
        if !server_name_matches(server_name, &id) {
            return Err(Error::InvalidCertificate(
                CertificateError::NotValidForNameContext {
                    expected: server_name.to_owned(),
                    presented: vec![id.to_string()],
                },
            ));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

impl ClientCertVerifier for SpiffeVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // Our clients have one certificate; hints would only leak the CA.
        &[]
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        self.client_chain
            .verify_client_cert(end_entity, intermediates, now)?;
        self.check_leaf(end_entity)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
