//! A private Helm chart repository behind an internal CA (issue #12): `[[helm]] ca_file`
//! makes pullgate trust it; without it the repository's certificate is refused.

// The harness reads the real clock (bounds on waits).
#![allow(clippy::disallowed_methods)]

mod support;

use support::charts::{chart_tgz, ChartServer, Helm, HELM_VERSIONS};
use support::fixtures::sha256_digest;
use support::http::loopback_client;
use support::pullgate::Pullgate;
use support::tls_proxy::{toml_path, TestCa, TlsProxy};

/// `[[helm]] name = "private"` at `url`, with `ca_file` when given.
fn pullgate_for(url: &str, ca_file: Option<&std::path::Path>) -> Pullgate {
    let ca = ca_file
        .map(|p| format!("ca_file = {}\n", toml_path(p)))
        .unwrap_or_default();
    Pullgate::builder()
        .config(&format!(
            "[[helm]]\nname = \"private\"\nurl = \"{url}\"\n{ca}"
        ))
        .start()
}

#[test]
fn a_private_chart_repository_with_an_internal_ca_works_through_ca_file() {
    let server = ChartServer::start();
    let ca = TestCa::generate();
    let proxy = TlsProxy::start(&ca, server.url().trim_start_matches("http://"));
    let tgz = chart_tgz("app", "1.0.0", 4096);
    server.put("app-1.0.0.tgz", &tgz);
    // The index names the chart at its HTTPS address, as a private repository's would.
    let helm = Helm::new(HELM_VERSIONS[0]);
    let dir = server.dir().to_str().expect("utf-8 path").to_string();
    helm.ok(&["repo", "index", &dir, "--url", &proxy.url()]);

    let pg = pullgate_for(&proxy.url(), Some(&ca.ca_file()));
    let repo_url = format!("{}/charts/private", pg.url());
    helm.ok(&["repo", "add", "private", &repo_url]);
    let out = helm.work_dir("out");
    helm.ok(&[
        "pull",
        "private/app",
        "--version",
        "1.0.0",
        "-d",
        out.to_str().unwrap(),
    ]);
    let pulled = std::fs::read(out.join("app-1.0.0.tgz")).expect("pulled chart");
    assert_eq!(sha256_digest(&pulled), sha256_digest(&tgz));
    assert_eq!(
        server.requests("app-1.0.0.tgz"),
        1,
        "{}",
        server.log_summary()
    );
    drop(pg);

    // Without ca_file the repository's certificate is refused: no index, no chart.
    let pg = pullgate_for(&proxy.url(), None);
    let index = loopback_client()
        .get(format!("{}/charts/private/index.yaml", pg.url()))
        .send()
        .expect("GET index");
    let status = index.status().as_u16();
    let body = index.text().unwrap_or_default();
    assert!(
        status == 502 || status == 503,
        "expected the upstream to be refused, got {status}: {body}\n{}",
        pg.log_tail()
    );
    assert!(body.contains("UnknownIssuer"), "{body}");
    assert_eq!(
        server.requests("app-1.0.0.tgz"),
        1,
        "{}",
        server.log_summary()
    );
}
