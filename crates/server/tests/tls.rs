//! https and wss on the one listener, with certificates made here (rcgen): a wss client
//! trusting the test CA chats; SIGHUP swaps the certificate for new connections while an
//! open connection stays up; a bad file on reload keeps the old certificate.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::{spawn_with, Backend, Client, TestApp};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::Connector;

/// A test CA, and leaf certificates it signs for localhost and 127.0.0.1.
struct Ca {
    issuer: Issuer<'static, KeyPair>,
    der: CertificateDer<'static>,
}

impl Ca {
    fn new() -> Self {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "wschat test CA");
        let cert = params.self_signed(&key).unwrap();
        Self {
            issuer: Issuer::new(params, key),
            der: cert.der().clone(),
        }
    }

    /// A leaf certificate named `name`: (certificate PEM, key PEM, certificate DER).
    fn leaf(&self, name: &str) -> (String, String, CertificateDer<'static>) {
        let key = KeyPair::generate().unwrap();
        let mut params =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem(), cert.der().clone())
    }

    fn client_config(&self) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.der.clone()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        Arc::new(
            rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth(),
        )
    }
}

fn write_pair(dir: &Path, cert: &str, key: &str) {
    std::fs::write(dir.join("cert.pem"), cert).unwrap();
    std::fs::write(dir.join("key.pem"), key).unwrap();
}

async fn tls_app(ca: &Ca, f: impl FnOnce(&mut wschat_server::Settings)) -> TestApp {
    let (mut settings, dir) = common::fresh(Backend::Sqlite).await;
    let (cert, key, _) = ca.leaf("first");
    write_pair(dir.path(), &cert, &key);
    settings.tls_cert = Some(dir.path().join("cert.pem"));
    settings.tls_key = Some(dir.path().join("key.pem"));
    f(&mut settings);
    spawn_with(settings, dir).await
}

/// A TLS connection to the app; the certificate it was shown, and the stream.
async fn tls_connect(
    app: &TestApp,
    config: Arc<rustls::ClientConfig>,
) -> (
    CertificateDer<'static>,
    tokio_rustls::client::TlsStream<TcpStream>,
) {
    let tcp = TcpStream::connect(app.addr).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(config);
    let name = ServerName::try_from("localhost").unwrap();
    let stream = connector.connect(name, tcp).await.unwrap();
    let shown = stream.get_ref().1.peer_certificates().unwrap()[0].clone();
    (shown, stream)
}

async fn wss(app: &TestApp, config: Arc<rustls::ClientConfig>, key: &str) -> Client {
    let url = format!("wss://localhost:{}/ws?session_key={key}", app.addr.port());
    let (ws, _) = tokio_tungstenite::connect_async_tls_with_config(
        url,
        None,
        false,
        Some(Connector::Rustls(config)),
    )
    .await
    .expect("wss connects");
    let mut c = Client { ws };
    assert_eq!(c.recv().await["type"], "hello");
    c
}

fn sighup() {
    let status = std::process::Command::new("kill")
        .args(["-HUP", &std::process::id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

#[tokio::test]
async fn wss_and_https_serve_and_sighup_swaps_the_certificate_without_dropping_connections() {
    let ca = Ca::new();
    let config = ca.client_config();
    let app = tls_app(&ca, |_| {}).await;
    let key = app.session("secure", None).await;

    // https: the page's endpoints answer over TLS, with the first certificate.
    let (first_cert, mut https) = tls_connect(&app, config.clone()).await;
    https
        .write_all(b"GET /livez HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut response = String::new();
    https
        .read_to_string(&mut response)
        .await
        .unwrap_or_default();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");

    // wss: chat.
    let mut old = wss(&app, config.clone(), &key).await;
    old.join("tls", None).await;
    assert_eq!(old.say("tls", "over tls", "1").await["seq"], 1);
    // Plain ws on the TLS port does not work.
    assert!(tokio_tungstenite::connect_async(format!(
        "ws://127.0.0.1:{}/ws?session_key={key}",
        app.addr.port()
    ))
    .await
    .is_err());

    // New files, SIGHUP: new connections get the new certificate.
    let (cert, key_pem, second_der) = ca.leaf("second");
    assert_ne!(second_der, first_cert);
    write_pair(app.dir.path(), &cert, &key_pem);
    sighup();
    let mut shown = first_cert.clone();
    for _ in 0..50 {
        shown = tls_connect(&app, config.clone()).await.0;
        if shown == second_der {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        shown, second_der,
        "the new certificate is served after SIGHUP"
    );
    // The connection opened before the reload is still up and still chats.
    assert_eq!(old.say("tls", "still here", "2").await["seq"], 2);
    let mut new = wss(&app, config.clone(), &key).await;
    assert_eq!(new.join("tls", Some(2)).await, 2);
    new.say("tls", "from the new one", "3").await;
    let seen = old.recv_until("message").await;
    assert_eq!(seen["text"], "still here");
    let seen = old.recv_until("message").await;
    assert_eq!(seen["text"], "from the new one");

    // A reload from bad files keeps the current certificate.
    std::fs::write(app.dir.path().join("cert.pem"), "not a certificate").unwrap();
    sighup();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(tls_connect(&app, config.clone()).await.0, second_der);
    assert_eq!(old.say("tls", "after a bad reload", "4").await["seq"], 4);
    app.stop().await;
}

#[tokio::test]
async fn a_tls_client_that_never_finishes_its_handshake_is_closed() {
    let ca = Ca::new();
    let app = tls_app(&ca, |s| s.handshake_timeout_secs = 1).await;
    let mut silent = TcpStream::connect(app.addr).await.unwrap();
    let started = std::time::Instant::now();
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(5), silent.read(&mut buf)).await;
    assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "{read:?}");
    assert!(started.elapsed() < Duration::from_secs(3));
    app.stop().await;
}

#[tokio::test]
async fn bad_tls_settings_stop_the_start() {
    let ca = Ca::new();
    let (cert, key, _) = ca.leaf("x");
    let (mut settings, dir) = common::fresh(Backend::Sqlite).await;
    write_pair(dir.path(), &cert, &key);
    settings.tls_cert = Some(dir.path().join("cert.pem"));
    let half = wschat_server::Application::build(settings.clone()).await;
    assert!(half.err().unwrap().to_string().contains("together"));
    settings.tls_key = Some(dir.path().join("missing.pem"));
    let missing = wschat_server::Application::build(settings.clone()).await;
    assert!(missing.err().unwrap().to_string().contains("missing.pem"));
    // A key that is not the certificate's.
    let (_, other_key, _) = ca.leaf("y");
    std::fs::write(dir.path().join("other.pem"), other_key).unwrap();
    settings.tls_key = Some(dir.path().join("other.pem"));
    assert!(wschat_server::Application::build(settings).await.is_err());
}
