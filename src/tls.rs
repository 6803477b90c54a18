//! TLS for the agent's two ports and for its clients: the `[tls]` files (PEM) loaded and checked,
//! rustls server and client configurations built from them, and a listener that hands axum
//! connections whose TLS handshake has finished.
//!
//! Every configuration here is built with ring, the only rustls crypto provider in the tree,
//! named explicitly: nothing depends on a process-wide default provider.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use crate::config::{TlsSection, VerifyClient};

/// How long a client may take to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Handshakes in progress at once on one port; further connections wait to be accepted.
const HANDSHAKES_MAX: usize = 128;

/// Connections whose handshake finished, waiting for the HTTP server to take them.
const ACCEPTED_QUEUE: usize = 64;

/// The only crypto provider raftmgr uses.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The node's TLS, ready to use: built once when the configuration is loaded, so that every
/// problem with the files is found then.
#[derive(Debug, Clone)]
pub struct NodeTls {
    /// For the API port (`tls.api_verify_client`).
    pub api_server: Arc<ServerConfig>,
    /// For the Raft port (`tls.raft_verify_client`).
    pub raft_server: Arc<ServerConfig>,
    /// For calls to other agents and to the API: trusts only `tls.ca_file`, presents this node's
    /// certificate when asked for one.
    pub client: ClientConfig,
}

/// A problem with one of the `[tls]` files: the key that names it and what is wrong.
#[derive(Debug)]
pub struct TlsFileError {
    pub key: &'static str,
    pub message: String,
}

fn fail(key: &'static str, message: impl Into<String>) -> TlsFileError {
    TlsFileError {
        key,
        message: message.into(),
    }
}

/// Reads the section's files (relative paths are relative to `base`, the configuration's
/// folder) and builds the server and client configurations.
pub fn load(base: &Path, section: &TlsSection) -> Result<NodeTls, TlsFileError> {
    let cert_path = base.join(&section.cert_file);
    let key_path = base.join(&section.key_file);
    let ca_path = base.join(&section.ca_file);
    let chain = read_certificates("tls.cert_file", &cert_path)?;
    let key = read_key("tls.key_file", &key_path)?;
    let roots = Arc::new(read_roots("tls.ca_file", &ca_path)?);

    let server = |verify: VerifyClient, verify_key: &'static str| {
        server_config(&roots, verify, chain.clone(), key.clone_key())
            .map_err(|e| key_error(e, verify_key, &cert_path, &key_path))
    };
    let api_server = server(section.api_verify_client, "tls.api_verify_client")?;
    let raft_server = server(section.raft_verify_client, "tls.raft_verify_client")?;
    let client = client_config(roots.clone(), Some((chain.clone(), key.clone_key())))
        .map_err(|e| key_error(e, "tls.key_file", &cert_path, &key_path))?;
    check_signed_by_ca(&roots, &chain).map_err(|e| {
        fail(
            "tls.cert_file",
            format!(
                "{} is not usable with the CA in {}: {e}",
                cert_path.display(),
                ca_path.display()
            ),
        )
    })?;
    Ok(NodeTls {
        api_server,
        raft_server,
        client,
    })
}

/// Names the key at fault when rustls refuses the certificate and key: a key that does not
/// belong to the certificate, or that rustls cannot use, is `tls.key_file`'s fault; anything else
/// is about `other` (client verification).
fn key_error(e: rustls::Error, other: &'static str, cert: &Path, key: &Path) -> TlsFileError {
    match e {
        rustls::Error::InconsistentKeys(_) => fail(
            "tls.key_file",
            format!(
                "{} is not the private key of the certificate in {}",
                key.display(),
                cert.display()
            ),
        ),
        rustls::Error::General(why) => fail("tls.key_file", format!("{}: {why}", key.display())),
        e => fail(other, e.to_string()),
    }
}

/// The certificates in a PEM file, in order; at least one.
pub fn read_certificates(
    key: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsFileError> {
    let bytes = read(key, path)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| fail(key, format!("{}: not valid PEM: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(fail(
            key,
            format!(
                "{} holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
                path.display()
            ),
        ));
    }
    Ok(certs)
}

/// The private key in a PEM file (PKCS#8, PKCS#1 or SEC1).
pub fn read_key(key: &'static str, path: &Path) -> Result<PrivateKeyDer<'static>, TlsFileError> {
    let bytes = read(key, path)?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| {
        let why = match e {
            rustls::pki_types::pem::Error::NoItemsFound => {
                "holds no PEM private key (-----BEGIN PRIVATE KEY-----)".to_string()
            }
            e => format!("not a valid PEM private key: {e}"),
        };
        fail(key, format!("{} {why}", path.display()))
    })
}

/// The CA certificates in a PEM bundle, as trust anchors.
pub fn read_roots(key: &'static str, path: &Path) -> Result<RootCertStore, TlsFileError> {
    let mut roots = RootCertStore::empty();
    for cert in read_certificates(key, path)? {
        roots.add(cert).map_err(|e| {
            fail(
                key,
                format!("{}: not a usable CA certificate: {e}", path.display()),
            )
        })?;
    }
    Ok(roots)
}

fn read(key: &'static str, path: &Path) -> Result<Vec<u8>, TlsFileError> {
    std::fs::read(path).map_err(|e| fail(key, format!("cannot read {}: {e}", path.display())))
}

fn server_config(
    roots: &Arc<RootCertStore>,
    verify: VerifyClient,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<Arc<ServerConfig>, rustls::Error> {
    let builder =
        ServerConfig::builder_with_provider(provider()).with_safe_default_protocol_versions()?;
    let builder = match verify {
        VerifyClient::None => builder.with_no_client_auth(),
        VerifyClient::Optional | VerifyClient::Required => {
            let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider());
            let verifier = if verify == VerifyClient::Optional {
                verifier.allow_unauthenticated()
            } else {
                verifier
            };
            let verifier = verifier
                .build()
                .map_err(|e| rustls::Error::Other(rustls::OtherError(Arc::new(e))))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_single_cert(chain, key)?;
    // axum serves HTTP/1.1.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// A client configuration that trusts only `roots` and presents `identity` when asked.
pub fn client_config(
    roots: Arc<RootCertStore>,
    identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
) -> Result<ClientConfig, rustls::Error> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    let mut config = match identity {
        Some((chain, key)) => builder.with_client_auth_cert(chain, key)?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// The node's certificate must chain to the CA and be valid now, since peers check it against
/// the same CA when this node calls them: finding out at start beats a cluster that cannot talk.
fn check_signed_by_ca(
    roots: &Arc<RootCertStore>,
    chain: &[CertificateDer<'static>],
) -> Result<(), rustls::Error> {
    let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
        .build()
        .map_err(|e| rustls::Error::Other(rustls::OtherError(Arc::new(e))))?;
    let (end_entity, intermediates) = chain.split_first().expect("read_certificates: not empty");
    verifier.verify_client_cert(end_entity, intermediates, UnixTime::now())?;
    Ok(())
}

/// The CLI's TLS: a CA bundle to trust (else the built-in web roots) and, when the API
/// requires client certificates, a certificate and key to present.
pub fn cli_client_config(
    ca_file: Option<&PathBuf>,
    identity: Option<(&PathBuf, &PathBuf)>,
) -> anyhow::Result<Option<ClientConfig>> {
    let Some(ca_file) = ca_file else {
        anyhow::ensure!(
            identity.is_none(),
            "--cert-file and --key-file need --ca-file (the CA that signed the agent's certificate)"
        );
        return Ok(None);
    };
    let as_anyhow = |e: TlsFileError| anyhow::anyhow!("{}", e.message);
    let roots = Arc::new(read_roots("--ca-file", ca_file).map_err(as_anyhow)?);
    let identity = match identity {
        None => None,
        Some((cert, key)) => Some((
            read_certificates("--cert-file", cert).map_err(as_anyhow)?,
            read_key("--key-file", key).map_err(as_anyhow)?,
        )),
    };
    Ok(Some(client_config(roots, identity)?))
}

/// A listener for `axum::serve` that yields connections after their TLS handshake. Handshakes
/// run in their own tasks (with a deadline), so a client that connects and says nothing holds
/// up no one; a failed handshake (plain HTTP, an unknown or missing client certificate) is
/// logged and the connection closed before any request is read.
pub struct TlsListener {
    local_addr: SocketAddr,
    accepted: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    accept_task: tokio::task::JoinHandle<()>,
}

impl TlsListener {
    /// Serves `tcp` with `config`; `port` names the port in logs (`api`, `raft`).
    pub fn new(
        tcp: TcpListener,
        config: Arc<ServerConfig>,
        port: &'static str,
    ) -> io::Result<TlsListener> {
        let local_addr = tcp.local_addr()?;
        let (tx, accepted) = mpsc::channel(ACCEPTED_QUEUE);
        let accept_task = tokio::spawn(accept_loop(tcp, TlsAcceptor::from(config), tx, port));
        Ok(TlsListener {
            local_addr,
            accepted,
            accept_task,
        })
    }
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        self.accept_task.abort();
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.accepted.recv().await {
            Some(connection) => connection,
            // The accept loop only ends when this listener is dropped.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(self.local_addr)
    }
}

async fn accept_loop(
    tcp: TcpListener,
    acceptor: TlsAcceptor,
    accepted: mpsc::Sender<(TlsStream<TcpStream>, SocketAddr)>,
    port: &'static str,
) {
    let handshakes = Arc::new(Semaphore::new(HANDSHAKES_MAX));
    loop {
        let permit = handshakes
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        let (stream, peer) = match tcp.accept().await {
            Ok(connection) => connection,
            Err(e) => {
                // As axum does: a connection that went away is nothing; anything else (out of
                // file descriptors) calls for a pause before trying again.
                if !matches!(
                    e.kind(),
                    io::ErrorKind::ConnectionRefused
                        | io::ErrorKind::ConnectionAborted
                        | io::ErrorKind::ConnectionReset
                ) {
                    tracing::warn!("{port} port: accepting a connection: {e}");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let acceptor = acceptor.clone();
        let accepted = accepted.clone();
        tokio::spawn(async move {
            let _permit = permit;
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => {
                    let _ = accepted.send((tls, peer)).await;
                }
                Ok(Err(e)) => {
                    tracing::warn!("{port} port: refused a TLS connection from {peer}: {e}")
                }
                Err(_) => tracing::warn!(
                    "{port} port: closed a connection from {peer}: no TLS handshake within \
                     {HANDSHAKE_TIMEOUT:?}"
                ),
            }
        });
    }
}
