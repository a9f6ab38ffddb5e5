//! A small blocking client for the registry HTTP API (OCI distribution spec), used to push
//! fixtures to docker-registry and to poke pullgate directly.
//!
//! It does the bearer-token dance the way docker and containerd do: on a `401` with
//! `WWW-Authenticate: Bearer realm=..,service=..,scope=..` it asks the realm for a token with
//! HTTP Basic credentials and retries once. Redirects are not followed, so a test sees exactly
//! what the server answered.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use reqwest::blocking::{Client, RequestBuilder, Response};
use reqwest::header::{HeaderMap, ACCEPT, AUTHORIZATION, CONTENT_TYPE, LOCATION, WWW_AUTHENTICATE};
use reqwest::{Method, StatusCode};

use super::fixtures::{Blob, Image, Index, ACCEPT_ANY_MANIFEST};

/// A plain HTTP client for loopback: no proxy, no redirects, bounded time.
pub fn loopback_client() -> Client {
    Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(60))
        .build()
        .expect("build reqwest client")
}

/// [`loopback_client`] that trusts only `ca` (a PEM file) for `https://`.
pub fn client_trusting(ca: &std::path::Path) -> Client {
    let pem = std::fs::read(ca).expect("read the CA file");
    Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(60))
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(&pem).expect("a PEM CA"))
        .build()
        .expect("build reqwest client")
}

/// A completed response with its body read.
#[derive(Debug)]
pub struct Fetched {
    pub status: StatusCode,
    pub headers: HeaderMap,
    /// The body bytes received (possibly partial when `body_error` is set).
    pub body: Vec<u8>,
    /// Set when the body could not be read to the end (e.g. the server aborted the
    /// connection mid-body, as a cache must when a streamed blob fails its digest check).
    pub body_error: Option<String>,
}

impl Fetched {
    /// A header's value as text ("" when absent).
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|value| value.to_str().ok())
            .unwrap_or("")
    }

    /// The body as JSON (panics with the body when it is not JSON).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|err| {
            panic!(
                "body is not JSON ({err}): {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// The first `errors[].code` of an OCI error envelope, if the body is one.
    pub fn error_code(&self) -> Option<String> {
        let value: serde_json::Value = serde_json::from_slice(&self.body).ok()?;
        value["errors"][0]["code"].as_str().map(str::to_string)
    }

    /// Whether the status is 2xx and the whole body arrived.
    pub fn is_complete_success(&self) -> bool {
        self.status.is_success() && self.body_error.is_none()
    }

    fn read(mut response: Response) -> Self {
        use std::io::Read as _;
        let status = response.status();
        let headers = response.headers().clone();
        let mut body = Vec::new();
        let body_error = response
            .read_to_end(&mut body)
            .err()
            .map(|err| err.to_string());
        Fetched {
            status,
            headers,
            body,
            body_error,
        }
    }
}

/// A registry API client for one base URL (`http://127.0.0.1:PORT`).
pub struct RegistryClient {
    base: String,
    http: Client,
    credentials: Option<(String, String)>,
    /// Last token obtained per repository, sent preemptively like real clients do.
    tokens: Mutex<HashMap<String, String>>,
    tokens_fetched: Mutex<usize>,
}

impl RegistryClient {
    /// A client for `base` (no trailing slash); `credentials` are used only at token realms.
    pub fn new(base: &str, credentials: Option<(&str, &str)>) -> Self {
        RegistryClient {
            base: base.trim_end_matches('/').to_string(),
            http: loopback_client(),
            credentials: credentials
                .map(|(user, password)| (user.to_string(), password.to_string())),
            tokens: Mutex::new(HashMap::new()),
            tokens_fetched: Mutex::new(0),
        }
    }

    /// How many tokens this client fetched from realms.
    pub fn tokens_fetched(&self) -> usize {
        *self.tokens_fetched.lock().expect("lock")
    }

    /// One request with no authentication at all (`path` includes any query string).
    pub fn raw(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Vec<u8>,
    ) -> Fetched {
        let mut request = self
            .http
            .request(method, format!("{}{}", self.base, path))
            .body(body);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        Fetched::read(
            request
                .send()
                .unwrap_or_else(|err| panic!("request {path}: {err}")),
        )
    }

    /// `GET /v2/<repo>/manifests/<reference>` accepting every manifest type.
    pub fn get_manifest(&self, repo: &str, reference: &str) -> Fetched {
        self.send(repo, |http| {
            http.get(format!("{}/v2/{repo}/manifests/{reference}", self.base))
                .header(ACCEPT, ACCEPT_ANY_MANIFEST)
        })
    }

    /// `GET /v2/<repo>/blobs/<digest>`.
    pub fn get_blob(&self, repo: &str, digest: &str) -> Fetched {
        self.send(repo, |http| {
            http.get(format!("{}/v2/{repo}/blobs/{digest}", self.base))
        })
    }

    /// Uploads a blob monolithically: `POST /v2/<repo>/blobs/uploads/`, then `PUT` of the
    /// whole body to the returned location with `?digest=`.
    pub fn push_blob(&self, repo: &str, blob: &Blob) {
        let started = self.send(repo, |http| {
            http.post(format!("{}/v2/{repo}/blobs/uploads/", self.base))
        });
        assert_eq!(
            started.status,
            StatusCode::ACCEPTED,
            "start upload to {repo}: {}",
            String::from_utf8_lossy(&started.body)
        );
        let location = started.header(LOCATION.as_str()).to_string();
        let location = if location.starts_with('/') {
            format!("{}{location}", self.base)
        } else {
            location
        };
        let separator = if location.contains('?') { '&' } else { '?' };
        let url = format!("{location}{separator}digest={}", blob.digest);
        let finished = self.send(repo, |http| {
            http.put(&url)
                .header(CONTENT_TYPE, "application/octet-stream")
                .body(blob.bytes.clone())
        });
        assert_eq!(
            finished.status,
            StatusCode::CREATED,
            "finish upload of {} to {repo}: {}",
            blob.digest,
            String::from_utf8_lossy(&finished.body)
        );
    }

    /// `PUT /v2/<repo>/manifests/<reference>` with the manifest's own media type.
    pub fn push_manifest(&self, repo: &str, reference: &str, manifest: &Blob) {
        let response = self.send(repo, |http| {
            http.put(format!("{}/v2/{repo}/manifests/{reference}", self.base))
                .header(CONTENT_TYPE, manifest.media_type.as_str())
                .body(manifest.bytes.clone())
        });
        assert_eq!(
            response.status,
            StatusCode::CREATED,
            "push manifest {repo}:{reference}: {}",
            String::from_utf8_lossy(&response.body)
        );
        assert_eq!(
            response.header("docker-content-digest"),
            manifest.digest,
            "registry computed another digest"
        );
    }

    /// Pushes an image's blobs, then its manifest under `tag`.
    pub fn push_image(&self, repo: &str, tag: &str, image: &Image) {
        for blob in image.blobs() {
            self.push_blob(repo, blob);
        }
        self.push_manifest(repo, tag, &image.manifest);
    }

    /// Pushes every child image (by digest), then the index under `tag`.
    pub fn push_index(&self, repo: &str, tag: &str, index: &Index) {
        for child in &index.children {
            for blob in child.blobs() {
                self.push_blob(repo, blob);
            }
            self.push_manifest(repo, &child.manifest.digest, &child.manifest);
        }
        self.push_manifest(repo, tag, &index.index);
    }

    /// Sends the request built by `build`, doing the token dance once on a Bearer 401.
    fn send(&self, repo: &str, build: impl Fn(&Client) -> RequestBuilder) -> Fetched {
        let cached = self.tokens.lock().expect("lock").get(repo).cloned();
        let with_token = |token: &Option<String>| match token {
            Some(token) => build(&self.http).header(AUTHORIZATION, format!("Bearer {token}")),
            None => build(&self.http),
        };
        let first = with_token(&cached)
            .send()
            .unwrap_or_else(|err| panic!("request for {repo}: {err}"));
        if first.status() != StatusCode::UNAUTHORIZED {
            return Fetched::read(first);
        }
        let challenge = first
            .headers()
            .get(WWW_AUTHENTICATE)
            .and_then(|value| value.to_str().ok())
            .unwrap_or("")
            .to_string();
        let Some(params) = parse_bearer_challenge(&challenge) else {
            return Fetched::read(first);
        };
        let token = self.fetch_token(&params);
        self.tokens
            .lock()
            .expect("lock")
            .insert(repo.to_string(), token.clone());
        Fetched::read(
            with_token(&Some(token))
                .send()
                .unwrap_or_else(|err| panic!("retry for {repo}: {err}")),
        )
    }

    fn fetch_token(&self, challenge: &HashMap<String, String>) -> String {
        let realm = challenge.get("realm").expect("challenge without realm");
        let mut query: Vec<(&str, &str)> = Vec::new();
        if let Some(service) = challenge.get("service") {
            query.push(("service", service));
        }
        if let Some(scope) = challenge.get("scope") {
            query.push(("scope", scope));
        }
        let mut request = self.http.get(realm).query(&query);
        if let Some((user, password)) = &self.credentials {
            request = request.basic_auth(user, Some(password));
        }
        let response = Fetched::read(
            request
                .send()
                .unwrap_or_else(|err| panic!("token request to {realm}: {err}")),
        );
        assert!(
            response.status.is_success(),
            "token realm answered {}: {}",
            response.status,
            String::from_utf8_lossy(&response.body)
        );
        *self.tokens_fetched.lock().expect("lock") += 1;
        let body = response.json();
        body["token"]
            .as_str()
            .or(body["access_token"].as_str())
            .expect("token in realm response")
            .to_string()
    }
}

/// `Bearer realm="…",service="…",scope="…"` → its parameters; `None` for other schemes.
pub fn parse_bearer_challenge(header: &str) -> Option<HashMap<String, String>> {
    let rest = header
        .strip_prefix("Bearer ")
        .or_else(|| header.strip_prefix("bearer "))?;
    let mut params = HashMap::new();
    let mut remaining = rest.trim();
    while !remaining.is_empty() {
        let (key, after_key) = remaining.split_once('=')?;
        let after_key = after_key.trim_start();
        let (value, after_value) = if let Some(quoted) = after_key.strip_prefix('"') {
            let end = quoted.find('"')?;
            (&quoted[..end], &quoted[end + 1..])
        } else {
            let end = after_key.find(',').unwrap_or(after_key.len());
            (&after_key[..end], &after_key[end..])
        };
        params.insert(key.trim().to_ascii_lowercase(), value.to_string());
        remaining = after_value
            .trim_start()
            .trim_start_matches(',')
            .trim_start();
    }
    Some(params)
}
