//! `/metrics` through the core's ports (issue #12): the exposition parses (names, labels, a
//! `# TYPE` for every family, cumulative histogram buckets), requests observed by a host show
//! up with their labels and durations, and a failing gateway delivery is counted under the
//! gateway's own metric, never as an upstream error.

#[path = "support/exposition.rs"]
mod exposition;

use bytes::Bytes;
use futures_util::StreamExt;
use hmac::{Hmac, Mac};
use http::{Request, StatusCode};
use pullgate::core::app::App;
use pullgate::core::body::{Body, RequestInfo};
use pullgate::core::config::{parse_config, ConfigError, Secret, SecretResolver};
use pullgate::core::ports::Ports;
use pullgate::testing::{DroppedDeferred, FakeTarget, ManualClock, MemBlobStore, MemKv};
use serde_json::json;
use sha2::Sha256;
use std::rc::Rc;

const HOOK_SECRET: &str = "hook-secret";

struct Secrets;
impl SecretResolver for Secrets {
    fn resolve(&self, r: &str) -> Result<Secret, ConfigError> {
        match r {
            "env:HOOK" => Ok(Secret::new(HOOK_SECRET.into())),
            _ => Err(ConfigError(format!("{r} unset"))),
        }
    }
}

fn app() -> (App, Rc<FakeTarget>) {
    let config = parse_config(
        r#"
        builtin_upstreams = false
        [[upstream]]
        host = "up.test"
        url = "http://up.test"
        default = true

        [gateway]
        max_attempts = 2
        run_secret = "env:HOOK"

        [[webhook]]
        name = "app"
        provider = "github"
        secret = "env:HOOK"

        [[target]]
        name = "ci"
        kind = "http"
        url = "http://ci.test/hook"
        secret = "env:HOOK"

        [chain]
        stages = ["build"]

        [[rule]]
        webhook = "app"
        on = ["push"]
        branches = ["main"]
        stage = "build"
        target = "ci"
        "#,
    )
    .unwrap();
    let settings = config.resolve(&Secrets).unwrap();
    let targets = Rc::new(FakeTarget::default());
    let ports = Ports {
        upstream: targets.clone(),
        kv: Rc::new(MemKv::default()),
        blobs: Rc::new(MemBlobStore::default()),
        clock: Rc::new(ManualClock::at(1_700_000_000_000)),
        deferred: Rc::new(DroppedDeferred),
        offload: Rc::new(pullgate::core::ports::InlineOffload),
    };
    (App::new(settings, ports), targets)
}

fn run<F: std::future::Future<Output = ()>>(f: F) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(f);
}

async fn metrics_text(app: &App) -> String {
    let resp = app
        .handle(&Request::get("/metrics").body(()).unwrap())
        .await;
    assert_eq!(resp.status(), StatusCode::OK);
    match resp.into_body() {
        Body::Bytes(b) => String::from_utf8(b.to_vec()).unwrap(),
        other => panic!("{other:?}"),
    }
}

async fn push(app: &App) -> StatusCode {
    let body = json!({
        "ref": "refs/heads/main",
        "before": format!("{:040x}", 0),
        "after": format!("{:040x}", 1),
        "repository": { "clone_url": "https://github.com/acme/app.git" },
        "pusher": { "name": "ana" },
    })
    .to_string()
    .into_bytes();
    let mut mac = Hmac::<Sha256>::new_from_slice(HOOK_SECRET.as_bytes()).unwrap();
    mac.update(&body);
    let sig = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
    let req = Request::post("/hooks/app")
        .header("x-github-event", "push")
        .header("x-github-delivery", "d-1")
        .header("x-hub-signature-256", sig)
        .body(())
        .unwrap();
    let stream = futures_util::stream::iter([Ok(Bytes::from(body))]).boxed_local();
    app.handle_with_body(&req, stream).await.status()
}

#[test]
fn a_failing_gateway_delivery_counts_as_a_gateway_retry_not_an_upstream_error() {
    run(async {
        let (app, targets) = app();
        targets.answer("ci.test", 503);
        assert_eq!(push(&app).await, StatusCode::ACCEPTED);
        let report = app.pump_outbox().await;
        assert_eq!((report.attempted, report.retrying), (1, 1), "{report:?}");
        assert_eq!(targets.count("ci.test"), 1);

        let m = exposition::parse(&metrics_text(&app).await).unwrap();
        let retries = m.of("pullgate_gateway_deliveries_total");
        let retry = retries
            .iter()
            .find(|s| s.label("outcome") == Some("retry"))
            .expect("a retry series");
        assert_eq!(retry.value, 1.0);
        assert_eq!(m.total("pullgate_gateway_requests_total"), 1.0);
        assert_eq!(m.total("pullgate_upstream_errors_total"), 0.0);
        assert_eq!(m.total("pullgate_upstream_requests_total"), 0.0);
    });
}

#[test]
fn the_exposition_parses_with_labels_and_cumulative_histograms() {
    run(async {
        let (app, _) = app();
        // A host observes what it answered (the native host does so at the end of a body).
        let info = RequestInfo {
            route: "manifest",
            upstream: Some("up.test".into()),
            ..RequestInfo::none()
        };
        let m = app.metrics();
        for seconds in [0.0002, 0.003, 0.003, 0.7, 45.0] {
            m.observe("GET", info.route, info.upstream.as_deref(), 200, seconds);
        }
        m.observe("HEAD", "blob", Some("up.test"), 404, 0.01);
        m.observe("GET", "-", None, 404, 0.001);

        let text = metrics_text(&app).await;
        let e = exposition::parse(&text).unwrap_or_else(|err| panic!("{err}\n{text}"));
        let requests = e.of("pullgate_requests_total");
        let manifest = requests
            .iter()
            .find(|s| s.label("route") == Some("manifest"))
            .unwrap_or_else(|| panic!("{text}"));
        assert_eq!(manifest.label("method"), Some("GET"));
        assert_eq!(manifest.label("status"), Some("200"));
        assert_eq!(manifest.label("upstream"), Some("up.test"));
        assert_eq!(manifest.value, 5.0);
        assert!(requests
            .iter()
            .any(|s| s.label("upstream") == Some("-") && s.label("status") == Some("404")));
        assert_eq!(
            e.types
                .get("pullgate_request_duration_seconds")
                .map(String::as_str),
            Some("histogram")
        );
        let count = e
            .of("pullgate_request_duration_seconds_count")
            .into_iter()
            .find(|s| s.label("route") == Some("manifest"))
            .unwrap();
        assert_eq!(count.value, 5.0);
        let build = e.of("pullgate_build_info");
        assert_eq!(build.len(), 1);
        assert_eq!(build[0].label("version"), Some(env!("CARGO_PKG_VERSION")));
        assert_eq!(e.total("pullgate_fills_in_flight"), 0.0);
        // The checker itself rejects what it must.
        assert!(exposition::parse(
            "# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\nh_count 1\n"
        )
        .is_err());
        assert!(exposition::parse("x 1\n").is_err());
        assert!(exposition::parse(
            "# TYPE x counter\nx{a=\"1\"} 1\n# TYPE y counter\ny 1\nx{a=\"2\"} 1\n"
        )
        .is_err());
        assert!(exposition::parse("# TYPE x counter\nx{a=\"1} 1\n").is_err());
    });
}
