//! The object stores' naming rules for buckets, accounts and containers.
//!
//! A bucket name becomes part of a host name (`<bucket>.s3.amazonaws.com`) or a URL path, so
//! anything outside these rules could point a worker at another host (`s3://127.0.0.1:9000#`
//! once did). Each check returns the reason a name is refused; the caller names the field.
//!
//! Rules, from each store's documentation:
//! - S3 (general purpose buckets): 3-63 characters of `a-z0-9.-`, starting and ending with a
//!   letter or digit, no `..`, not an IPv4 address, none of the reserved prefixes
//!   (`xn--`, `sthree-`, `amzn-s3-demo-`) or suffixes (`-s3alias`, `--ol-s3`, `.mrap`,
//!   `--x-s3`, `--table-s3`).
//! - Google Cloud Storage: `a-z0-9._-`, starting and ending with a letter or digit, 3-63
//!   characters (up to 222 with dots, each dot-separated part at most 63), not an IPv4
//!   address, not starting with `goog`, not containing `google` (or `g00gle`).
//! - Azure: an account is 3-24 characters of `a-z0-9`; a container 3-63 characters of
//!   `a-z0-9-`, starting with a letter or digit, every `-` between two letters or digits;
//!   `$root` and `$web` are the two special containers.

/// Why `name` is not a valid S3 bucket name, if it is not.
pub fn s3_bucket(name: &str) -> Result<(), String> {
    length(name, 3, 63)?;
    charset(name, |c| {
        c.is_ascii_lowercase() || c.is_ascii_digit() || c == '.' || c == '-'
    })?;
    alnum_ends(name)?;
    if name.contains("..") {
        return Err("two adjacent dots".into());
    }
    not_ipv4(name)?;
    for p in ["xn--", "sthree-", "amzn-s3-demo-"] {
        if name.starts_with(p) {
            return Err(format!("reserved prefix {p:?}"));
        }
    }
    for s in ["-s3alias", "--ol-s3", ".mrap", "--x-s3", "--table-s3"] {
        if name.ends_with(s) {
            return Err(format!("reserved suffix {s:?}"));
        }
    }
    Ok(())
}

/// Why `name` is not a valid Google Cloud Storage bucket name, if it is not.
pub fn gcs_bucket(name: &str) -> Result<(), String> {
    let max = if name.contains('.') { 222 } else { 63 };
    length(name, 3, max)?;
    charset(name, |c| {
        c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-' | '_')
    })?;
    alnum_ends(name)?;
    if name.split('.').any(|p| p.is_empty() || p.len() > 63) {
        return Err("each dot-separated part must be 1-63 characters".into());
    }
    not_ipv4(name)?;
    if name.starts_with("goog") || name.contains("google") || name.contains("g00gle") {
        return Err("names starting with \"goog\" or containing \"google\" are reserved".into());
    }
    Ok(())
}

/// Why `name` is not a valid Azure storage account name, if it is not.
pub fn azure_account(name: &str) -> Result<(), String> {
    length(name, 3, 24)?;
    charset(name, |c| c.is_ascii_lowercase() || c.is_ascii_digit())
}

/// Why `name` is not a valid Azure blob container name, if it is not.
pub fn azure_container(name: &str) -> Result<(), String> {
    if name == "$root" || name == "$web" {
        return Ok(());
    }
    length(name, 3, 63)?;
    charset(name, |c| {
        c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'
    })?;
    alnum_ends(name)?;
    if name.contains("--") {
        return Err("two adjacent hyphens".into());
    }
    Ok(())
}

fn length(name: &str, min: usize, max: usize) -> Result<(), String> {
    if name.len() < min || name.len() > max {
        return Err(format!(
            "must be {min}-{max} characters, not {}",
            name.len()
        ));
    }
    Ok(())
}

fn charset(name: &str, ok: impl Fn(char) -> bool) -> Result<(), String> {
    match name.chars().find(|c| !ok(*c)) {
        Some(c) => Err(format!("character {c:?} not allowed")),
        None => Ok(()),
    }
}

fn alnum_ends(name: &str) -> Result<(), String> {
    let alnum = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
    if !alnum(name.chars().next()) || !alnum(name.chars().last()) {
        return Err("must start and end with a letter or digit".into());
    }
    Ok(())
}

fn not_ipv4(name: &str) -> Result<(), String> {
    if name.parse::<std::net::Ipv4Addr>().is_ok() {
        return Err("must not be an IP address".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s3_rules() {
        for ok in ["abc", "my-bucket.models", "a1b", &"a".repeat(63)] {
            assert!(s3_bucket(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "ab",
            &"a".repeat(64),
            "My-Bucket",
            "under_score",
            "-abc",
            "abc-",
            "a..b",
            "192.168.5.4",
            "127.0.0.1:9000#",
            "xn--abc",
            "sthree-x",
            "amzn-s3-demo-x",
            "abc-s3alias",
            "abc--ol-s3",
            "abc.mrap",
            "abc--x-s3",
            "a b",
        ] {
            assert!(s3_bucket(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn gcs_rules() {
        for ok in [
            "abc",
            "my_bucket-1",
            "a.b.c",
            &format!("{}.b", "a".repeat(63)),
        ] {
            assert!(gcs_bucket(ok).is_ok(), "{ok}");
        }
        for bad in [
            "ab",
            &"a".repeat(64),
            &format!("{}.b", "a".repeat(64)),
            "Abc",
            "_abc",
            "10.0.0.1",
            "goog-models",
            "my-google-bucket",
            "a..b",
            "a:b",
        ] {
            assert!(gcs_bucket(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn azure_rules() {
        assert!(azure_account("acct01").is_ok());
        for bad in ["ab", "Acct", "my-acct", &"a".repeat(25), "a.b"] {
            assert!(azure_account(bad).is_err(), "{bad:?}");
        }
        for ok in ["models", "sd-15-x", "$root", "$web", "abc"] {
            assert!(azure_container(ok).is_ok(), "{ok}");
        }
        for bad in [
            "ab",
            "a--b",
            "-ab",
            "ab-",
            "Models",
            "a_b",
            "$logs",
            &"a".repeat(64),
        ] {
            assert!(azure_container(bad).is_err(), "{bad:?}");
        }
    }
}
