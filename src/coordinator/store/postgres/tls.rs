//! TLS to PostgreSQL: libpq's `sslmode` and `sslrootcert`, on rustls.
//!
//! tokio-postgres parses only `sslmode=disable|prefer|require` and has no
//! `sslrootcert`, so [`take_settings`] takes both out of the URL (either
//! form) and the rest goes to tokio-postgres's parser. [`MakeRustls`] is the
//! connector every connection of the store uses (migrations, the read pool,
//! the lease session, the writer), so they all share one TLS setting.
//!
//! libpq's semantics, which operators of managed PostgreSQL know:
//!
//! | sslmode       | encrypted             | certificate checked                      |
//! |---------------|-----------------------|------------------------------------------|
//! | `disable`     | no                    | -                                        |
//! | `prefer`      | if the server offers  | chain only if `sslrootcert` is given     |
//! | `require`     | yes                   | chain only if `sslrootcert` is given     |
//! | `verify-ca`   | yes                   | chain (against `sslrootcert`)            |
//! | `verify-full` | yes                   | chain and host name                      |
//!
//! `sslrootcert=PATH` is a PEM file of CA certificates; `sslrootcert=system`
//! means the public web roots (Mozilla's, built in) and, as in libpq 16,
//! implies and requires `verify-full`. Unset, `sslmode` is `prefer` (libpq's
//! default); `PGSSLMODE` and `PGSSLROOTCERT` stand in for absent parameters.
//! Client certificates (`sslcert`, `sslkey`) are not supported.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::config::SslMode;
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect, TlsStream};

use crate::error::{Error, Result};

/// libpq's `sslmode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Mode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl Mode {
    fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "disable" => Self::Disable,
            "prefer" => Self::Prefer,
            "require" => Self::Require,
            "verify-ca" => Self::VerifyCa,
            "verify-full" => Self::VerifyFull,
            // `allow` (plaintext first) is refused: it never encrypts when
            // the server accepts plaintext, which is never what is meant.
            other => {
                return Err(Error::Config(format!(
                    "store: the PostgreSQL URL's sslmode={other:?} is not one of \
                     disable, prefer, require, verify-ca, verify-full"
                )))
            }
        })
    }

    fn as_str(self) -> &'static str {
        match self {
            Self::Disable => "disable",
            Self::Prefer => "prefer",
            Self::Require => "require",
            Self::VerifyCa => "verify-ca",
            Self::VerifyFull => "verify-full",
        }
    }
}

/// What the URL (or `PGSSLMODE`/`PGSSLROOTCERT`) asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Settings {
    pub(super) mode: Mode,
    /// A PEM file, or `system` for the built-in web roots.
    pub(super) root_cert: Option<String>,
}

/// Takes `sslmode` and `sslrootcert` out of `url` (a `postgres://` URL or
/// a `key=value` string): the URL left for tokio-postgres, and the settings.
pub(super) fn take_settings(url: &str) -> Result<(String, Settings)> {
    let (rest, found) = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        take_from_url(url)
    } else {
        take_from_key_values(url)?
    };
    let mut mode = None;
    let mut root_cert = None;
    for (k, v) in found {
        match k.as_str() {
            "sslmode" => mode = Some(Mode::parse(&v)?),
            _ => root_cert = Some(v),
        }
    }
    if mode.is_none() {
        if let Ok(m) = std::env::var("PGSSLMODE") {
            mode = Some(Mode::parse(&m)?);
        }
    }
    if root_cert.is_none() {
        root_cert = std::env::var("PGSSLROOTCERT")
            .ok()
            .filter(|r| !r.is_empty());
    }
    let system = root_cert.as_deref() == Some("system");
    let mode = match mode {
        Some(m) => m,
        None if system => Mode::VerifyFull,
        None => Mode::Prefer,
    };
    if system && mode != Mode::VerifyFull {
        return Err(Error::Config(format!(
            "store: sslmode={} may not be used with sslrootcert=system (use verify-full): \
             the public roots vouch for names, not for a private CA",
            mode.as_str()
        )));
    }
    Ok((rest, Settings { mode, root_cert }))
}

fn is_tls_key(k: &str) -> bool {
    k == "sslmode" || k == "sslrootcert"
}

/// `postgres://...?a=b&sslmode=require`: the query pairs named by
/// [`is_tls_key`] are removed (values percent-decoded), the rest kept as
/// written.
fn take_from_url(url: &str) -> (String, Vec<(String, String)>) {
    let Some((base, query)) = url.split_once('?') else {
        return (url.to_owned(), Vec::new());
    };
    let mut kept = Vec::new();
    let mut found = Vec::new();
    for pair in query.split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let k = percent_decode(k);
        if is_tls_key(&k) {
            found.push((k, percent_decode(v)));
        } else {
            kept.push(pair);
        }
    }
    let rest = if kept.is_empty() {
        base.to_owned()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    (rest, found)
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `host=db sslmode=require password='a b'`: libpq's grammar (values bare
/// or single-quoted, backslash escapes); the pairs named by [`is_tls_key`]
/// are cut out of the text, the rest kept as written.
fn take_from_key_values(s: &str) -> Result<(String, Vec<(String, String)>)> {
    let b = s.as_bytes();
    let mut i = 0;
    let mut rest = String::new();
    let mut found = Vec::new();
    let space = |c: u8| c.is_ascii_whitespace();
    loop {
        while i < b.len() && space(b[i]) {
            i += 1;
        }
        if i == b.len() {
            break;
        }
        let start = i;
        while i < b.len() && b[i] != b'=' && !space(b[i]) {
            i += 1;
        }
        let key = &s[start..i];
        while i < b.len() && space(b[i]) {
            i += 1;
        }
        if i == b.len() || b[i] != b'=' {
            // Never echo the text: it may hold a password.
            return Err(Error::Config(
                "store: the PostgreSQL URL does not parse: a key=value pair lacks its `=`".into(),
            ));
        }
        i += 1;
        while i < b.len() && space(b[i]) {
            i += 1;
        }
        let mut value = Vec::new();
        let quoted = i < b.len() && b[i] == b'\'';
        if quoted {
            i += 1;
        }
        loop {
            if i == b.len() {
                if quoted {
                    return Err(Error::Config(format!(
                        "store: the PostgreSQL URL does not parse: the value of `{key}` \
                         has no closing quote"
                    )));
                }
                break;
            }
            match b[i] {
                b'\'' if quoted => {
                    i += 1;
                    break;
                }
                c if !quoted && space(c) => break,
                b'\\' if i + 1 < b.len() => {
                    value.push(b[i + 1]);
                    i += 2;
                }
                c => {
                    value.push(c);
                    i += 1;
                }
            }
        }
        if is_tls_key(key) {
            found.push((key.to_owned(), String::from_utf8_lossy(&value).into_owned()));
        } else {
            rest.push_str(&s[start..i]);
            rest.push(' ');
        }
    }
    Ok((rest.trim_end().to_owned(), found))
}

/// The driver's `SslMode` for `mode`, and the connector that carries out
/// the rest (the certificate checks tokio-postgres knows nothing of).
pub(super) fn connector(s: &Settings) -> Result<(SslMode, MakeRustls)> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let roots = match s.root_cert.as_deref() {
        None => None,
        Some("system") => Some(RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        }),
        Some(path) => Some(load_roots(path)?),
    };
    let check = match (s.mode, roots) {
        (Mode::Disable, _) => {
            return Ok((SslMode::Disable, MakeRustls { tls: None }));
        }
        (Mode::VerifyCa | Mode::VerifyFull, None) => {
            return Err(Error::Config(format!(
                "store: sslmode={} needs sslrootcert=PATH in the PostgreSQL URL (a PEM file of \
                 the CA that signed the server's certificate; `system` for the public roots)",
                s.mode.as_str()
            )))
        }
        (_, None) => Check::Encrypt,
        (Mode::VerifyFull, Some(r)) => Check::ChainAndName(r),
        // libpq: a root certificate makes prefer and require check the chain.
        (_, Some(r)) => Check::Chain(r),
    };
    let verifier = Arc::new(Verifier::new(check, provider.clone())?);
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Internal(format!("store: TLS: {e}")))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    let ssl_mode = if s.mode == Mode::Prefer {
        SslMode::Prefer
    } else {
        SslMode::Require
    };
    Ok((
        ssl_mode,
        MakeRustls {
            tls: Some(Arc::new(Tls {
                config: Arc::new(config),
                mode: s.mode,
                root_cert: s.root_cert.clone().unwrap_or_default(),
            })),
        },
    ))
}

fn load_roots(path: &str) -> Result<RootCertStore> {
    let pem = std::fs::read(path).map_err(|e| {
        Error::Config(format!(
            "store: sslrootcert={path}: cannot read the CA file: {e}"
        ))
    })?;
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| {
            Error::Config(format!("store: sslrootcert={path}: not a PEM file: {e}"))
        })?;
        roots.add(cert).map_err(|e| {
            Error::Config(format!(
                "store: sslrootcert={path}: a certificate is not a usable CA certificate: {e}"
            ))
        })?;
    }
    if roots.is_empty() {
        return Err(Error::Config(format!(
            "store: sslrootcert={path} holds no PEM certificate (-----BEGIN CERTIFICATE-----)"
        )));
    }
    Ok(roots)
}

/// What is checked of the server's certificate.
enum Check {
    /// Nothing (libpq's `require` without a root certificate): encrypted
    /// against eavesdroppers, not against an impostor.
    Encrypt,
    Chain(RootCertStore),
    ChainAndName(RootCertStore),
}

/// The certificate check of [`Check`]; the handshake's signatures are
/// always verified.
#[derive(Debug)]
struct Verifier {
    /// None: accept any certificate.
    webpki: Option<Arc<WebPkiServerVerifier>>,
    check_name: bool,
    provider: Arc<CryptoProvider>,
}

impl Verifier {
    fn new(check: Check, provider: Arc<CryptoProvider>) -> Result<Self> {
        let (roots, check_name) = match check {
            Check::Encrypt => {
                return Ok(Self {
                    webpki: None,
                    check_name: false,
                    provider,
                })
            }
            Check::Chain(r) => (r, false),
            Check::ChainAndName(r) => (r, true),
        };
        let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .build()
            .map_err(|e| Error::Config(format!("store: sslrootcert: {e}")))?;
        Ok(Self {
            webpki: Some(webpki),
            check_name,
            provider,
        })
    }
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        let Some(webpki) = &self.webpki else {
            return Ok(ServerCertVerified::assertion());
        };
        match webpki.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
            // webpki checks the name last, after the chain: a name error
            // means the chain is good, which is all verify-ca asks.
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) if !self.check_name => Ok(ServerCertVerified::assertion()),
            r => r,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
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
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
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

struct Tls {
    config: Arc<ClientConfig>,
    mode: Mode,
    /// For messages.
    root_cert: String,
}

/// tokio-postgres's `MakeTlsConnect` on rustls; cheap to clone.
#[derive(Clone)]
pub(super) struct MakeRustls {
    /// None under `sslmode=disable`.
    tls: Option<Arc<Tls>>,
}

impl<S> MakeTlsConnect<S> for MakeRustls
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type TlsConnect = RustlsConnect;
    type Error = TlsError;

    fn make_tls_connect(&mut self, host: &str) -> std::result::Result<RustlsConnect, TlsError> {
        // tokio-postgres makes a connector before it looks at the mode.
        let Some(tls) = self.tls.clone() else {
            return Ok(RustlsConnect {
                tls: None,
                name: ServerName::IpAddress(std::net::Ipv4Addr::UNSPECIFIED.into()),
                host: host.to_owned(),
            });
        };
        let name = match ServerName::try_from(host) {
            Ok(n) if !host.is_empty() => n.to_owned(),
            _ if tls.mode == Mode::VerifyFull => {
                return Err(TlsError(format!(
                    "sslmode=verify-full needs a host name to check the certificate against, \
                     and the URL's host is {host:?}"
                )))
            }
            // No name to check (only `hostaddr`): none is sent either.
            _ => ServerName::IpAddress(std::net::Ipv4Addr::UNSPECIFIED.into()),
        };
        Ok(RustlsConnect {
            tls: Some(tls),
            name,
            host: host.to_owned(),
        })
    }
}

pub(super) struct RustlsConnect {
    /// None under `sslmode=disable`, where the driver never connects it.
    tls: Option<Arc<Tls>>,
    name: ServerName<'static>,
    host: String,
}

impl<S> TlsConnect<S> for RustlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type Error = TlsError;
    type Future =
        Pin<Box<dyn Future<Output = std::result::Result<RustlsStream<S>, TlsError>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move {
            let Some(tls) = self.tls else {
                return Err(TlsError("TLS asked for under sslmode=disable".into()));
            };
            let connector = tokio_rustls::TlsConnector::from(tls.config.clone());
            match connector.connect(self.name, stream).await {
                Ok(s) => Ok(RustlsStream(s)),
                Err(e) => Err(TlsError(describe(&e, &tls, &self.host))),
            }
        })
    }
}

/// A handshake failure in words an operator acts on.
fn describe(e: &io::Error, tls: &Tls, host: &str) -> String {
    let root = &tls.root_cert;
    let Some(rustls::Error::InvalidCertificate(c)) =
        e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>())
    else {
        return format!("TLS handshake with {host:?} failed: {e}");
    };
    match c {
        CertificateError::UnknownIssuer => format!(
            "the server's certificate is not trusted: no CA in sslrootcert={root} signed it \
             (unknown issuer)"
        ),
        CertificateError::NotValidForNameContext { presented, .. } => format!(
            "host name mismatch: the server's certificate is not valid for {host:?} \
             (it names {}; sslmode=verify-full checks the name, verify-ca does not)",
            presented.join(", ")
        ),
        CertificateError::NotValidForName => format!(
            "host name mismatch: the server's certificate is not valid for {host:?} \
             (sslmode=verify-full checks the name, verify-ca does not)"
        ),
        CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
            "the server's certificate has expired".into()
        }
        CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
            "the server's certificate is not valid yet (check this host's clock)".into()
        }
        other => format!("the server's certificate is refused: {other:?}"),
    }
}

/// Why a TLS connection failed; never holds the URL.
#[derive(Debug)]
pub(super) struct TlsError(String);

impl std::fmt::Display for TlsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TlsError {}

/// A TLS session to the server (a newtype: tokio-postgres's `TlsStream`
/// trait and tokio-rustls's stream are both foreign).
pub(super) struct RustlsStream<S>(tokio_rustls::client::TlsStream<S>);

impl<S: AsyncRead + AsyncWrite + Unpin> TlsStream for RustlsStream<S> {
    fn channel_binding(&self) -> ChannelBinding {
        ChannelBinding::none()
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for RustlsStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for RustlsStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(url: &str) -> (String, Settings) {
        take_settings(url).unwrap()
    }

    #[test]
    fn url_form_loses_only_the_tls_parameters() {
        let (rest, s) = settings(
            "postgres://u:p%3Fw@db:5432/corral?application_name=x&sslmode=verify-full\
             &sslrootcert=%2Fetc%2Fca.pem&connect_timeout=3",
        );
        assert_eq!(
            rest,
            "postgres://u:p%3Fw@db:5432/corral?application_name=x&connect_timeout=3"
        );
        assert_eq!(s.mode, Mode::VerifyFull);
        assert_eq!(s.root_cert.as_deref(), Some("/etc/ca.pem"));
        let (rest, s) = settings("postgresql://db/corral?sslmode=require");
        assert_eq!(rest, "postgresql://db/corral");
        assert_eq!(s.mode, Mode::Require);
    }

    #[test]
    fn key_value_form_loses_only_the_tls_parameters() {
        let (rest, s) = settings(
            "host=db sslmode = 'verify-ca' password='a b\\'c' sslrootcert=/tmp/my\\ ca.pem user=u",
        );
        assert_eq!(rest, "host=db password='a b\\'c' user=u");
        assert_eq!(s.mode, Mode::VerifyCa);
        assert_eq!(s.root_cert.as_deref(), Some("/tmp/my ca.pem"));
        rest.parse::<tokio_postgres::Config>().unwrap();
    }

    #[test]
    fn defaults_and_refusals_follow_libpq() {
        // Unset: prefer (assumes PGSSLMODE is not set for the test run).
        if std::env::var_os("PGSSLMODE").is_none() && std::env::var_os("PGSSLROOTCERT").is_none() {
            assert_eq!(settings("postgres://db/x").1.mode, Mode::Prefer);
            assert_eq!(
                settings("postgres://db/x?sslrootcert=system").1.mode,
                Mode::VerifyFull
            );
        }
        let e = take_settings("postgres://db/x?sslmode=require&sslrootcert=system")
            .unwrap_err()
            .to_string();
        assert!(e.contains("verify-full"), "{e}");
        let e = take_settings("postgres://db/x?sslmode=allow")
            .unwrap_err()
            .to_string();
        assert!(e.contains("sslmode=\"allow\""), "{e}");
        let e = take_settings("host=db password='unterminated")
            .unwrap_err()
            .to_string();
        assert!(!e.contains("unterminated"), "{e}");
        let e = connector(&Settings {
            mode: Mode::VerifyFull,
            root_cert: None,
        })
        .err()
        .unwrap()
        .to_string();
        assert!(e.contains("needs sslrootcert"), "{e}");
        let e = connector(&Settings {
            mode: Mode::Require,
            root_cert: Some("/nonexistent/ca.pem".into()),
        })
        .err()
        .unwrap()
        .to_string();
        assert!(
            e.contains("/nonexistent/ca.pem") && e.contains("cannot read"),
            "{e}"
        );
    }
}
