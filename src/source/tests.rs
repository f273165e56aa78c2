use super::*;

fn no_env(_: &str) -> Option<String> {
    None
}

fn http(s: &str) -> Endpoint {
    Source::parse(s).unwrap().resolve_with(&no_env).unwrap()
}

#[test]
fn object_store_urls_map_to_https() {
    assert_eq!(
        http("gs://bkt/models/sd15"),
        Endpoint::Http {
            prefix: "https://storage.googleapis.com/bkt/models/sd15".into(),
            query: String::new()
        }
    );
    assert_eq!(
        http("az://acct/cont/p/q/").locate("x"),
        "https://acct.blob.core.windows.net/cont/p/q/x"
    );
    assert_eq!(
        http("s3://my-bucket/m/sd+15").locate("a.onnx"),
        "https://my-bucket.s3.amazonaws.com/m/sd%2B15/a.onnx"
    );
    assert_eq!(
        http("https://h/x/?sig=1").locate("a b/c.onnx"),
        "https://h/x/a%20b/c.onnx?sig=1"
    );
    assert_eq!(
        Source::parse("file:///m/x").unwrap(),
        Source::Local("/m/x".into())
    );
    assert_eq!(Source::parse("/m/x").unwrap(), Source::Local("/m/x".into()));
}

#[test]
fn the_environment_picks_endpoints_and_credentials() {
    let env = |vars: &'static [(&'static str, &'static str)]| {
        move |k: &str| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    };
    let s3 = Source::parse("s3://bkt/p").unwrap();
    let e = s3
        .resolve_with(&env(&[("AWS_ENDPOINT_URL", "http://127.0.0.1:9000/")]))
        .unwrap();
    assert_eq!(e.locate("f"), "http://127.0.0.1:9000/bkt/p/f");
    let e = s3
        .resolve_with(&env(&[("AWS_REGION", "eu-west-1")]))
        .unwrap();
    assert_eq!(e.locate("f"), "https://bkt.s3.eu-west-1.amazonaws.com/p/f");
    for bad in [
        &[("AWS_REGION", "x.evil.com/#")][..],
        &[("AWS_ENDPOINT_URL", "ftp://h")][..],
        &[("AWS_ENDPOINT_URL", "http://h/?x=1")][..],
    ] {
        let vars: &'static [(&'static str, &'static str)] = bad;
        assert!(
            matches!(s3.resolve_with(&env(vars)), Err(Error::Config(_))),
            "{bad:?}"
        );
    }
    let az = Source::parse("az://acct/models/sd").unwrap();
    let e = az
        .resolve_with(&env(&[
            ("AZURE_STORAGE_SAS_TOKEN", "?sv=2022&sig=SECRETSECRET"),
            (
                "AZURE_STORAGE_BLOB_ENDPOINT",
                "http://127.0.0.1:10000/devstoreaccount1",
            ),
        ]))
        .unwrap();
    assert_eq!(
        e.locate("a.onnx"),
        "http://127.0.0.1:10000/devstoreaccount1/models/sd/a.onnx?sv=2022&sig=SECRETSECRET"
    );
    // What errors and logs get: no signature, and not in Debug either.
    assert_eq!(
        e.shown("a.onnx"),
        "http://127.0.0.1:10000/devstoreaccount1/models/sd/a.onnx?sv=REDACTED&sig=REDACTED"
    );
    assert!(!format!("{e:?}").contains("SECRET"));
}

#[test]
fn the_grammar_refuses_what_would_fail_later() {
    for (bad, why) in [
        ("", "empty"),
        ("ftp://h/x", "unsupported scheme"),
        ("gopher://h/x", "unsupported scheme"),
        ("s3:///x", "bucket"),
        ("s3://127.0.0.1:9000#/x", "fragment"),
        ("s3://127.0.0.1/x", "IP address"),
        ("s3://My_Bucket/x", "bucket"),
        ("s3://user:pw@bkt/x", "credentials"),
        ("s3://bkt/x?sig=1", "query"),
        ("s3://bkt/a//b", "empty segment"),
        ("s3://bkt/a/../b", "`..`"),
        ("gs://goog-x/m", "reserved"),
        ("az://acct", "expected az://"),
        ("az://Acct/cont/x", "account"),
        ("az://acct/a--b/x", "container"),
        ("https://h/x#frag", "fragment"),
        ("https://h/a/../b", "`..`"),
        ("https://h/a b", "whitespace"),
        ("https:///x", "host"),
        ("http://h/x\n", "control"),
        ("file://host/x", "absolute path"),
        ("file:///a/../etc", "`..`"),
        ("file:///m?x=1", "query"),
        ("models/sd15", "absolute path"),
        ("localhost:8080/x", "absolute path"),
    ] {
        match Source::parse(bad) {
            Err(
                e @ Error::InvalidArgument {
                    field: "source", ..
                },
            ) => {
                assert!(e.to_string().contains(why), "{bad:?}: {e}")
            }
            other => panic!("{bad:?} gave {other:?}"),
        }
    }
    assert!(Source::parse(&format!("/{}", "a".repeat(MAX_SOURCE_BYTES))).is_err());
    // Accepted: userinfo and a query on http(s) (basic auth, pre-signed URLs), ports, `+`.
    for ok in [
        "https://u:p@h:8443/x?X-Amz-Signature=1",
        "http://127.0.0.1:9/m",
        "HTTPS://h/x",
        "s3://bkt",
        "az://acct/$root/x",
        "/m/with space/#1",
    ] {
        Source::parse(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
    }
}

#[test]
fn parse_errors_do_not_echo_credentials() {
    let e = Source::parse("https://u:hunter2hunter2@h/a/../b?sig=SECRETSECRET").unwrap_err();
    let msg = e.to_string();
    assert!(
        !msg.contains("hunter2") && !msg.contains("SECRETSECRET"),
        "{msg}"
    );
    let shown = Source::parse("https://h/x?sig=SECRETSECRET").unwrap();
    assert!(!format!("{shown} {shown:?}").contains("SECRETSECRET"));
}

#[test]
fn local_sources_follow_the_policy() {
    let local = Source::parse("/models/sd15").unwrap();
    let remote = Source::parse("https://h/x").unwrap();
    assert!(remote.check_local_policy(None, false).is_ok());
    assert!(local.check_local_policy(None, true).is_ok());
    assert!(matches!(
        local.check_local_policy(None, false),
        Err(Error::PermissionDenied(_))
    ));
    assert!(local
        .check_local_policy(Some(Path::new("/models")), false)
        .is_ok());
    for root in ["/model", "/srv", "/models/sd1"] {
        let e = local
            .check_local_policy(Some(Path::new(root)), false)
            .unwrap_err();
        assert!(e.to_string().contains("outside the allowed root"), "{e}");
    }
}

#[test]
fn command_lines_may_name_relative_directories() {
    let d = tempfile::tempdir().unwrap();
    std::fs::create_dir(d.path().join("sd15")).unwrap();
    // Relative to a directory we name, not the process's (tests share it).
    let rel = d.path().join("sd15/../sd15");
    let abs = absolute_if_local(rel.to_str().unwrap()).unwrap();
    assert_eq!(abs, rel.to_str().unwrap(), "absolute input is left alone");
    for same in ["s3://bkt/x", "https://h/x", "/abs", ""] {
        assert_eq!(absolute_if_local(same).unwrap(), same);
    }
    // Tests run in the package root.
    let here = Path::new(env!("CARGO_MANIFEST_DIR"))
        .canonicalize()
        .unwrap();
    assert_eq!(
        absolute_if_local("src/../src/source").unwrap(),
        here.join("src/source").to_str().unwrap()
    );
    assert!(matches!(
        absolute_if_local("no-such-dir-here/x"),
        Err(Error::Io { .. })
    ));
}
