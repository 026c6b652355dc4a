//! Secrets (SDS): the proxy asks for one, `ROOTCA`, the mesh's trust
//! bundle. Its own certificate never travels over xDS: the proxy makes its
//! key and has a CSR signed (see `identity`).

use std::sync::Arc;

use remora_xds_proto::pb::envoy::config::core::v3::{DataSource, data_source};
use remora_xds_proto::pb::envoy::extensions::transport_sockets::tls::v3::{Secret, secret};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

use super::{Invalid, Result};

/// The name of the secret holding the mesh's root certificates.
pub const ROOTCA: &str = "ROOTCA";

/// What the proxy keeps of a secret.
#[derive(Debug)]
pub(super) struct SecretSpec {
    /// PEM root certificates, checked to hold at least one.
    pub(super) roots_pem: Arc<str>,
}

pub(super) fn compile(secret: &Secret) -> Result<SecretSpec> {
    let context = match &secret.r#type {
        Some(secret::Type::ValidationContext(context)) => context,
        Some(_) => {
            return Err(Invalid::new(
                "type",
                "must be validation_context (the proxy asks only for trust bundles)",
            ));
        }
        None => return Err(Invalid::new("validation_context", "is missing")),
    };
    let pem = match &context.trusted_ca {
        Some(source) => inline_text(source).map_err(|e| e.within("validation_context."))?,
        None => return Err(Invalid::new("validation_context.trusted_ca", "is missing")),
    };
    let roots = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Invalid::new("validation_context.trusted_ca", format!("bad PEM: {e}")))?;
    if roots.is_empty() {
        return Err(Invalid::new(
            "validation_context.trusted_ca",
            "holds no CERTIFICATE block",
        ));
    }
    Ok(SecretSpec {
        roots_pem: pem.into(),
    })
}

fn inline_text(source: &DataSource) -> Result<String> {
    match &source.specifier {
        Some(data_source::Specifier::InlineBytes(b)) => String::from_utf8(b.clone())
            .map_err(|_| Invalid::new("trusted_ca.inline_bytes", "is not UTF-8 PEM")),
        Some(data_source::Specifier::InlineString(s)) => Ok(s.clone()),
        Some(_) => Err(Invalid::new(
            "trusted_ca",
            "must be inline (inline_bytes or inline_string); the proxy reads no files from xDS",
        )),
        None => Err(Invalid::new("trusted_ca", "is empty")),
    }
}
