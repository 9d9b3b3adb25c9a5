//! TLS on the one listener (https and wss), with rustls on the `ring` provider only (a
//! second provider in the tree makes rustls panic at run time). The certificate and key
//! are PEM files; on SIGHUP they are read again and new handshakes use them, while open
//! connections keep theirs. A reload that fails keeps the old certificate.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum_server::tls_rustls::RustlsConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::ServerConfig;
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("tls_cert and tls_key must be given together")]
    Half,
    #[error("cannot read the certificate {path}: {reason}")]
    Cert { path: PathBuf, reason: String },
    #[error("cannot read the private key {path}: {reason}")]
    Key { path: PathBuf, reason: String },
    #[error("the certificate and key do not make a TLS configuration: {0}")]
    Config(#[from] rustls::Error),
    #[error("cannot listen for SIGHUP: {0}")]
    Signal(std::io::Error),
}

/// TLS of a running server: its live configuration and where it comes from.
#[derive(Clone)]
pub struct Tls {
    config: RustlsConfig,
    cert: PathBuf,
    key: PathBuf,
}

impl Tls {
    /// TLS from the settings' files, or `None` when neither is set.
    pub fn from_settings(
        cert: Option<&Path>,
        key: Option<&Path>,
    ) -> Result<Option<Self>, TlsError> {
        match (cert, key) {
            (None, None) => Ok(None),
            (Some(cert), Some(key)) => {
                let config = server_config(cert, key)?;
                Ok(Some(Self {
                    config: RustlsConfig::from_config(config),
                    cert: cert.to_owned(),
                    key: key.to_owned(),
                }))
            }
            _ => Err(TlsError::Half),
        }
    }

    pub fn rustls_config(&self) -> RustlsConfig {
        self.config.clone()
    }

    /// Read the files again; new handshakes use the new certificate. On error the old
    /// one stays.
    pub async fn reload(&self) -> Result<(), TlsError> {
        let (cert, key) = (self.cert.clone(), self.key.clone());
        let config = tokio::task::spawn_blocking(move || server_config(&cert, &key))
            .await
            .map_err(|e| TlsError::Cert {
                path: self.cert.clone(),
                reason: e.to_string(),
            })??;
        self.config.reload_from_config(config);
        Ok(())
    }

    /// Listen for SIGHUP now (so that a signal that comes before the server runs is not
    /// the default, fatal one), and reload on each until `stop`.
    pub fn reload_on_sighup(&self, stop: CancellationToken) -> Result<(), TlsError> {
        let hangups = signal(SignalKind::hangup()).map_err(TlsError::Signal)?;
        tokio::spawn(reload_loop(self.clone(), hangups, stop));
        Ok(())
    }
}

/// Without TLS there is nothing to reload, but a SIGHUP (a deploy tool's generic
/// "reload") must not end the process, as the signal's default action would: it is logged.
pub fn ignore_sighup(stop: CancellationToken) -> Result<(), TlsError> {
    let mut hangups = signal(SignalKind::hangup()).map_err(TlsError::Signal)?;
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                got = hangups.recv() => match got {
                    Some(()) => tracing::info!("SIGHUP: no TLS certificate to reload; ignored"),
                    None => return,
                },
            }
        }
    });
    Ok(())
}

async fn reload_loop(tls: Tls, mut hangups: Signal, stop: CancellationToken) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            got = hangups.recv() => {
                if got.is_none() {
                    return;
                }
                match tls.reload().await {
                    Ok(()) => tracing::info!(cert = %tls.cert.display(), "SIGHUP: TLS certificate reloaded"),
                    Err(e) => tracing::error!(error = %e, "SIGHUP: TLS reload failed; keeping the old certificate"),
                }
            }
        }
    }
}

/// A rustls server configuration (ring provider, TLS 1.2 and 1.3, ALPN `http/1.1`) from PEM
/// files.
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    let cert_error = |reason: String| TlsError::Cert {
        path: cert.to_owned(),
        reason,
    };
    let certs = CertificateDer::pem_file_iter(cert)
        .map_err(|e| cert_error(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| cert_error(e.to_string()))?;
    if certs.is_empty() {
        return Err(cert_error("no CERTIFICATE block".into()));
    }
    let private_key = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsError::Key {
        path: key.to_owned(),
        reason: e.to_string(),
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, private_key)?;
    // HTTP/1.1 only: WebSockets upgrade over it, and browsers then use it for the page too.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}
