//! Redaction of credentials in URLs and free text, before they reach an error or a log line.
//!
//! What is hidden:
//!
//! - in a URL: the userinfo (`user:pass@`), every query value (parameter names stay, so a
//!   pre-signed URL is still recognisable), and the fragment;
//! - in free text: every URL as above, values of known credential parameters and headers
//!   (`X-Amz-Signature=...`, `sig=...`, `Authorization: ...`; see [`CREDENTIAL_NAMES`]), and
//!   the literal values of the credential environment variables this process was started with
//!   (see [`ENV_SECRETS`]), wherever they appear.
//!
//! Errors and log lines built by `source`, `manifest`, `worker::fetch` and `worker::cache`
//! carry [`url()`]'s form of a URL, never the raw one; [`text`] is the net for messages from
//! elsewhere (a library's error, a worker's failure reason). Over-redaction is the accepted
//! failure mode: a log line with too little in it is a nuisance, one with a key is an
//! incident.
//!
//! This module owns no state but a snapshot of the environment taken on first use.

use std::sync::OnceLock;

/// What replaces a secret.
pub const REDACTED: &str = "REDACTED";

/// Parameter and header names whose values are credentials (compared case-insensitively).
pub const CREDENTIAL_NAMES: &[&str] = &[
    "x-amz-signature",
    "x-amz-credential",
    "x-amz-security-token",
    "x-goog-signature",
    "x-goog-credential",
    "sig",
    "signature",
    "token",
    "access_token",
    "id_token",
    "refresh_token",
    "password",
    "passwd",
    "secret",
    "client_secret",
    "api_key",
    "apikey",
    "api-key",
    "x-api-key",
    "authorization",
    "proxy-authorization",
    "cookie",
    "aws_secret_access_key",
    "aws_session_token",
    "azure_storage_sas_token",
    "azure_storage_key",
    "corral_token",
];

/// Environment variables whose values are never printed, wherever they show up.
pub const ENV_SECRETS: &[&str] = &[
    "AZURE_STORAGE_SAS_TOKEN",
    "AZURE_STORAGE_KEY",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "GOOGLE_OAUTH_ACCESS_TOKEN",
    "CORRAL_TOKEN",
];

/// Shorter values are not searched for literally: they would match ordinary words.
const MIN_LITERAL_SECRET: usize = 8;

/// Characters that end a URL or a credential value in free text.
fn ends_token(c: char) -> bool {
    c.is_whitespace() || matches!(c, '"' | '\'' | '<' | '>' | '`' | ')' | ']' | '}' | '\\')
}

/// `u` with its userinfo, query values and fragment replaced by [`REDACTED`]. Text that is
/// not a URL (a local path) comes back unchanged.
pub fn url(u: &str) -> String {
    let Some(sep) = u.find("://") else {
        return u.to_owned();
    };
    let (scheme, rest) = u.split_at(sep + 3);
    let mut out = String::with_capacity(u.len());
    out.push_str(scheme);
    // The authority ends at the first of `/?#`; userinfo is what precedes its last `@`.
    let auth_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(auth_end);
    match authority.rfind('@') {
        Some(at) => {
            out.push_str(REDACTED);
            out.push_str(&authority[at..]);
        }
        None => out.push_str(authority),
    }
    let (before_frag, frag) = match tail.find('#') {
        Some(i) => (&tail[..i], Some(())),
        None => (tail, None),
    };
    match before_frag.split_once('?') {
        Some((path, query)) => {
            out.push_str(path);
            out.push('?');
            out.push_str(&redact_query(query));
        }
        None => out.push_str(before_frag),
    }
    if frag.is_some() {
        out.push('#');
        out.push_str(REDACTED);
    }
    out
}

/// Every `name=value` keeps its name; a component without `=` may itself be the secret.
fn redact_query(q: &str) -> String {
    q.split('&')
        .map(|kv| match kv.split_once('=') {
            Some((k, "")) => format!("{k}="),
            Some((k, _)) => format!("{k}={REDACTED}"),
            None if kv.is_empty() => String::new(),
            None => REDACTED.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("&")
}

/// Redacts with a given list of literal secrets; [`text`] uses the environment's.
#[derive(Clone, Debug, Default)]
pub struct Redactor {
    literals: Vec<String>,
}

impl Redactor {
    /// Also hides these literal values (those shorter than 8 bytes are ignored).
    pub fn with_literals(literals: impl IntoIterator<Item = String>) -> Self {
        let mut literals: Vec<String> = literals
            .into_iter()
            .flat_map(|s| {
                // A SAS token is configured with or without its `?`, and is sent without.
                let bare = s.trim_start_matches('?').to_owned();
                [s, bare]
            })
            .filter(|s| s.len() >= MIN_LITERAL_SECRET)
            .collect();
        // Longest first, so that a secret containing another is replaced whole.
        literals.sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
        literals.dedup();
        Self { literals }
    }

    /// The values of [`ENV_SECRETS`] in this process's environment.
    pub fn from_env() -> Self {
        Self::with_literals(ENV_SECRETS.iter().filter_map(|k| std::env::var(k).ok()))
    }

    /// `s` with URLs, credential parameters and headers, and known literals redacted.
    pub fn text(&self, s: &str) -> String {
        let mut out = s.to_owned();
        for lit in &self.literals {
            if out.contains(lit.as_str()) {
                out = out.replace(lit.as_str(), REDACTED);
            }
        }
        let out = redact_urls(&out);
        redact_named(&out)
    }
}

/// Free text with every secret this module knows of redacted (see the module docs).
pub fn text(s: &str) -> String {
    static ENV: OnceLock<Redactor> = OnceLock::new();
    ENV.get_or_init(Redactor::from_env).text(s)
}

/// A writer that redacts every write with [`text`]: a net for log lines from code that does
/// not redact (a library's debug output). tracing-subscriber's fmt layer writes each event in
/// one call, so a URL is never split between two writes. Use it as
/// `tracing_subscriber::fmt().with_writer(redact::stderr)`. Costs one scan of each line.
#[derive(Debug)]
pub struct Redacting<W>(pub W);

impl<W: std::io::Write> std::io::Write for Redacting<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let line = String::from_utf8_lossy(buf);
        self.0.write_all(text(&line).as_bytes())?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

/// Standard error through [`Redacting`], for `with_writer`.
pub fn stderr() -> Redacting<std::io::Stderr> {
    Redacting(std::io::stderr())
}

/// Finds `scheme://` in `s` and redacts each URL up to the next delimiter.
fn redact_urls(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(sep) = rest.find("://") {
        // Walk back over the scheme: ALPHA *( ALPHA / DIGIT / "+" / "-" / "." ).
        let start = rest[..sep]
            .char_indices()
            .rev()
            .take_while(|(_, c)| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
            .last()
            .map_or(sep, |(i, _)| i);
        let mut end = rest[sep..].find(ends_token).map_or(rest.len(), |i| sep + i);
        // Punctuation that closes a sentence or a field is not part of the URL.
        while end > sep + 3 && rest[..end].ends_with([':', ';', ',', '.', '!']) {
            end -= 1;
        }
        out.push_str(&rest[..start]);
        out.push_str(&url(&rest[start..end]));
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

/// Redacts the values of `name=value` and `name: value` for the names in
/// [`CREDENTIAL_NAMES`], where `name` starts a word.
fn redact_named(s: &str) -> String {
    let lower = s.to_ascii_lowercase();
    let mut cuts: Vec<(usize, usize)> = Vec::new();
    for name in CREDENTIAL_NAMES {
        let mut from = 0;
        while let Some(i) = lower[from..].find(name) {
            let at = from + i;
            from = at + name.len();
            let word_start = lower[..at]
                .chars()
                .next_back()
                .is_none_or(|c| !(c.is_ascii_alphanumeric() || c == '_' || c == '-'));
            if !word_start {
                continue;
            }
            let after = &s[from..];
            let (value_at, header) = if after.starts_with('=') {
                (from + 1, false)
            } else if let Some(v) = after.strip_prefix(':') {
                (from + 1 + (v.len() - v.trim_start().len()), true)
            } else if let Some(v) = after.strip_prefix("\":") {
                // JSON: "token": "value"
                let v2 = v.trim_start();
                (from + 2 + (v.len() - v2.len()), false)
            } else {
                continue;
            };
            let value = &s[value_at..];
            let value = value.strip_prefix('"').map_or(value, |v| v);
            let start = s.len() - value.len();
            // A header's value runs to the end of the line (`Authorization: Bearer x`);
            // a parameter's to the next delimiter.
            let end = if header {
                value
                    .find(['\n', '\r', '"', ','])
                    .map_or(s.len(), |i| start + i)
            } else {
                value
                    .find(|c: char| ends_token(c) || matches!(c, '&' | ',' | ';'))
                    .map_or(s.len(), |i| start + i)
            };
            if end > start && !s[start..].starts_with(REDACTED) {
                cuts.push((start, end));
            }
        }
    }
    if cuts.is_empty() {
        return s.to_owned();
    }
    cuts.sort();
    let mut out = String::with_capacity(s.len());
    let mut pos = 0;
    for (a, b) in cuts {
        if b <= pos {
            continue;
        }
        let a = a.max(pos);
        out.push_str(&s[pos..a]);
        out.push_str(REDACTED);
        pos = b;
    }
    out.push_str(&s[pos..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const SIG: &str = "d3b07384d113edec49eaa6238ad5ff00";

    #[test]
    fn urls_lose_userinfo_query_values_and_fragment() {
        assert_eq!(
            url(&format!(
                "https://bkt.s3.amazonaws.com/m/unet.onnx?X-Amz-Algorithm=AWS4&X-Amz-Signature={SIG}"
            )),
            "https://bkt.s3.amazonaws.com/m/unet.onnx?X-Amz-Algorithm=REDACTED&X-Amz-Signature=REDACTED"
        );
        assert_eq!(
            url("http://alice:hunter2hunter2@h:8080/x?tok#frag"),
            "http://REDACTED@h:8080/x?REDACTED#REDACTED"
        );
        assert_eq!(url("https://h/x/y.onnx"), "https://h/x/y.onnx");
        assert_eq!(url("/models/sd15"), "/models/sd15");
        assert_eq!(url("https://h/x?a=&b"), "https://h/x?a=&REDACTED");
    }

    #[test]
    fn free_text_urls_are_redacted_in_place() {
        let msg = format!(
            "unavailable: GET \"https://h/m/a.onnx?sv=2022&sig={SIG}\": error sending request for \
             url (https://h/m/a.onnx?sv=2022&sig={SIG}) after 3 tries"
        );
        let r = text(&msg);
        assert!(!r.contains(SIG), "{r}");
        assert!(r.starts_with("unavailable: GET \"https://h/m/a.onnx?sv=REDACTED&sig=REDACTED\""));
        assert!(
            r.ends_with("?sv=REDACTED&sig=REDACTED) after 3 tries"),
            "{r}"
        );
    }

    #[test]
    fn credential_parameters_and_headers_outside_urls() {
        for (input, secret) in [
            (
                format!("token from env: sv=2022-11-02&sig={SIG}&se=2030"),
                SIG,
            ),
            (format!("X-Amz-Signature={SIG}"), SIG),
            (
                "Authorization: Bearer abc.def.ghi-jkl".to_owned(),
                "abc.def.ghi-jkl",
            ),
            (
                "request failed; authorization: Basic dXNlcjpwYXNz, retrying".to_owned(),
                "dXNlcjpwYXNz",
            ),
            ("{\"token\": \"s3cr3t-s3cr3t\"}".to_owned(), "s3cr3t-s3cr3t"),
            (
                "password=correct-horse; user=bob".to_owned(),
                "correct-horse",
            ),
        ] {
            let r = text(&input);
            assert!(!r.contains(secret), "{input:?} -> {r:?}");
            assert!(r.contains(REDACTED), "{r}");
        }
        // Words that merely contain a name are left alone.
        assert_eq!(
            text("tokens: 3, signatures checked"),
            "tokens: 3, signatures checked"
        );
        assert_eq!(
            text("model sd15 failed: HTTP 404"),
            "model sd15 failed: HTTP 404"
        );
    }

    #[test]
    fn literal_secrets_are_hidden_anywhere() {
        let r = Redactor::with_literals(["?sv=2022&sig=abcdefgh12345".to_owned(), "short".into()]);
        let out = r.text("SAS sv=2022&sig=abcdefgh12345 rejected; short stays");
        assert_eq!(out, "SAS REDACTED rejected; short stays");
    }

    #[test]
    fn redaction_is_idempotent_and_keeps_plain_text() {
        let once = text(&format!("GET https://u:p@h/x?sig={SIG}: HTTP 403"));
        assert_eq!(text(&once), once);
        assert_eq!(once, "GET https://REDACTED@h/x?sig=REDACTED: HTTP 403");
    }

    #[test]
    fn the_log_writer_redacts_whole_events() {
        use std::io::Write;
        let mut w = Redacting(Vec::new());
        let event = format!("{{\"msg\":\"GET https://h/x?X-Amz-Signature={SIG}\"}}\n");
        w.write_all(event.as_bytes()).unwrap();
        let out = String::from_utf8(w.0).unwrap();
        assert_eq!(
            out,
            "{\"msg\":\"GET https://h/x?X-Amz-Signature=REDACTED\"}\n"
        );
    }
}
