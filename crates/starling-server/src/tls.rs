//! HTTPS served by the server itself (`server.tls_cert` and `server.tls_key`, or `starling
//! serve --tls-cert FILE --tls-key FILE`): the certificate chain and its private key, read
//! from PEM files at start into a rustls [`ServerConfig`] with `ring` as the crypto provider.
//! The serving loop (`net.rs`) runs each connection's handshake under its header timeout.
//! Without these settings the server speaks plain HTTP, as it should behind a proxy that
//! terminates TLS (Heroku).

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::ServerConfig;

/// The rustls configuration serving `cert` (a PEM chain, the server's own certificate first)
/// with the private key in `key` (PEM: PKCS#8, PKCS#1 or SEC1). Fails, naming the file and
/// the problem, when a file cannot be read, holds no certificate or key, or the key is not
/// the certificate's.
pub(crate) fn server_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, String> {
    let (cert_name, key_name) = (cert.display(), key.display());
    let chain = CertificateDer::pem_slice_iter(&read(cert, "certificate")?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("the certificate file {cert_name} is not valid PEM: {e}"))?;
    if chain.is_empty() {
        return Err(format!(
            "the certificate file {cert_name} holds no PEM certificate \
             (-----BEGIN CERTIFICATE-----)"
        ));
    }
    let private =
        PrivateKeyDer::from_pem_slice(&read(key, "private key")?).map_err(|e| match e {
            pem::Error::NoItemsFound => {
                format!("the key file {key_name} holds no PEM private key (PKCS#8, PKCS#1 or SEC1)")
            }
            e => format!("the key file {key_name} is not valid PEM: {e}"),
        })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS versions: {e}"))?
        .with_no_client_auth()
        .with_single_cert(chain, private)
        .map_err(|e| match e {
            rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch) => format!(
                "the private key in {key_name} does not belong to the certificate in \
                 {cert_name} (their public keys differ)"
            ),
            e => format!(
                "cannot serve the certificate in {cert_name} with the key in {key_name}: {e}"
            ),
        })?;
    // HTTP/1.1 is all the serving loop speaks.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

fn read(path: &Path, what: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cannot read the {what} file {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    fn self_signed() -> (String, String) {
        let c = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        (c.cert.pem(), c.signing_key.serialize_pem())
    }

    fn error(cert: &Path, key: &Path) -> String {
        server_config(cert, key).unwrap_err()
    }

    #[test]
    fn a_certificate_and_its_key_load() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = self_signed();
        let c = server_config(
            &write(dir.path(), "cert.pem", &cert),
            &write(dir.path(), "key.pem", &key),
        )
        .unwrap();
        assert_eq!(c.alpn_protocols, vec![b"http/1.1".to_vec()]);
    }

    #[test]
    fn bad_files_are_named_with_their_problem() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = self_signed();
        let (_, other_key) = self_signed();
        let cert = write(dir.path(), "cert.pem", &cert);
        let key = write(dir.path(), "key.pem", &key);
        let missing = dir.path().join("missing.pem");
        let garbage = write(dir.path(), "garbage.pem", "not a certificate\n");
        let broken = write(
            dir.path(),
            "broken.pem",
            "-----BEGIN CERTIFICATE-----\nMIIB\n",
        );
        let other_key = write(dir.path(), "other-key.pem", &other_key);

        let e = error(&missing, &key);
        assert!(
            e.contains("cannot read the certificate file") && e.contains("missing.pem"),
            "{e}"
        );
        let e = error(&cert, &missing);
        assert!(e.contains("cannot read the private key file"), "{e}");
        let e = error(&garbage, &key);
        assert!(e.contains("garbage.pem holds no PEM certificate"), "{e}");
        let e = error(&broken, &key);
        assert!(e.contains("broken.pem is not valid PEM"), "{e}");
        let e = error(&cert, &garbage);
        assert!(e.contains("garbage.pem holds no PEM private key"), "{e}");
        // A certificate where the key should be is no key either.
        let e = error(&cert, &cert);
        assert!(e.contains("cert.pem holds no PEM private key"), "{e}");
        let e = error(&cert, &other_key);
        assert!(
            e.contains("other-key.pem does not belong to the certificate in")
                && e.contains("cert.pem"),
            "{e}"
        );
    }
}
