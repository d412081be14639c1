//! PEM files and rustls configurations shared by the HTTPS endpoint (server side) and the OTLP
//! exporters (client side). Errors are one line naming the option and the file.

use std::{path::Path, sync::Arc};

use tokio_rustls::rustls::{
    self, ClientConfig, RootCertStore, ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _},
};

fn read(option: &str, path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("{option} {}: {e}", path.display()))
}

/// The certificates of a PEM file (a chain, or a CA bundle); at least one.
pub fn certificates(option: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = read(option, path)?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{option} {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{option} {} holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
            path.display()
        ));
    }
    Ok(certs)
}

/// The private key of a PEM file.
pub fn private_key(option: &str, path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    let pem = read(option, path)?;
    PrivateKeyDer::from_pem_slice(&pem)
        .map_err(|e| format!("{option} {} holds no PEM private key: {e}", path.display()))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A server configuration from a certificate chain and its key.
pub fn server_config(
    (cert_opt, cert): (&str, &Path),
    (key_opt, key): (&str, &Path),
) -> Result<Arc<ServerConfig>, String> {
    let chain = certificates(cert_opt, cert)?;
    let key_der = private_key(key_opt, key)?;
    ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .with_no_client_auth()
        .with_single_cert(chain, key_der)
        .map(Arc::new)
        .map_err(|e| {
            format!(
                "{cert_opt} {} and {key_opt} {}: {e}",
                cert.display(),
                key.display()
            )
        })
}

/// A TLS client file: the option or variable that named it (for errors) and its path.
pub type ClientFile = Option<(String, std::path::PathBuf)>;

/// A client configuration: the CA file's certificates only when one is given (as the
/// OpenTelemetry SDKs do), else the system's CA store; an optional client certificate and key
/// for mutual TLS. No ALPN: the connector adds it.
pub fn client_config(
    ca: &ClientFile,
    cert: &ClientFile,
    key: &ClientFile,
) -> Result<ClientConfig, String> {
    let mut roots = RootCertStore::empty();
    if let Some((opt, path)) = ca {
        for c in certificates(opt, path)? {
            roots
                .add(c)
                .map_err(|e| format!("{opt} {}: {e}", path.display()))?;
        }
    } else {
        let found = rustls_native_certs::load_native_certs();
        let (added, _) = roots.add_parsable_certificates(found.certs);
        if added == 0 {
            return Err(
                "no CA certificates found in the system store (install ca-certificates, or \
                 give the collector's CA with --otlp-certificate FILE)"
                    .into(),
            );
        }
    }
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .with_root_certificates(roots);
    Ok(match (cert, key) {
        (None, None) => builder.with_no_client_auth(),
        (Some((copt, _)), None) => return Err(format!("{copt} needs a client key too")),
        (None, Some((kopt, _))) => return Err(format!("{kopt} needs a client certificate too")),
        (Some((copt, cpath)), Some((kopt, kpath))) => builder
            .with_client_auth_cert(certificates(copt, cpath)?, private_key(kopt, kpath)?)
            .map_err(|e| {
                format!(
                    "{copt} {} and {kopt} {}: {e}",
                    cpath.display(),
                    kpath.display()
                )
            })?,
    })
}

/// A client configuration trusting nothing: for connectors that only ever see http:// URLs.
pub fn client_config_without_roots() -> Result<ClientConfig, String> {
    Ok(ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .with_root_certificates(RootCertStore::empty())
        .with_no_client_auth())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_option_and_file() {
        let dir = std::env::temp_dir().join(format!("tanzhen-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "not pem\n").unwrap();
        let e = certificates("--otlp-certificate", &empty).unwrap_err();
        assert!(
            e.starts_with("--otlp-certificate ") && e.contains("no PEM certificate"),
            "{e}"
        );
        let e = private_key("--tls-key", &dir.join("missing.pem")).unwrap_err();
        assert!(e.starts_with("--tls-key ") && !e.contains('\n'), "{e}");
        let cert = Some(("--otlp-client-certificate".into(), empty.clone()));
        let e = client_config(&None, &cert, &None).unwrap_err();
        assert!(e.contains("needs a client key"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
