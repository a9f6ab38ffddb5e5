//! A minimal Docker registry token server (the `auth.token.realm` of a docker-registry) on
//! loopback, for testing an upstream that requires the bearer-token dance.
//!
//! It checks HTTP Basic credentials (one user/password known to the test), grants every
//! action asked for in `scope=repository:<name>:<actions>`, and counts the requests so a
//! test can assert that tokens are reused. Tokens are JWTs signed ES256 with a fresh P-256
//! key whose self-signed certificate travels in the `x5c` header.
//!
//! How docker-registry 2.8 accepts them (`registry/auth/token/token.go`): with `x5c` present
//! it verifies the leaf certificate against the `rootcertbundle` pool (a self-signed leaf
//! that is itself in the bundle is a valid chain), then checks the signature (raw r||s, as
//! JWS ES256 requires), `iss` against `issuer`, `aud` against `service` (a string), and
//! `nbf <= now <= exp` with no leeway, then the `access` claim against the request.
//!
//! Both `GET realm?service=&scope=` (Basic auth) and the OAuth2 `POST` form
//! (`grant_type=password`) are answered.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
use serde_json::json;

/// Lifetime of issued tokens, reported as `expires_in`.
pub const TOKEN_LIFETIME_SECS: u64 = 300;

/// What the token server knows and has seen; shared with its accept thread.
struct State {
    issuer: String,
    service: String,
    username: String,
    password: String,
    signer: EcdsaKeyPair,
    cert_der_base64: String,
    requests: AtomicUsize,
    issued: AtomicUsize,
    scopes: Mutex<Vec<String>>,
}

/// A running token server; stops when dropped.
pub struct TokenServer {
    port: u16,
    root_cert_pem: String,
    state: Arc<State>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl TokenServer {
    /// Starts a token server on a free loopback port issuing tokens for `service`, signed as
    /// `issuer`, to the one user `username`/`password`.
    pub fn start(issuer: &str, service: &str, username: &str, password: &str) -> Self {
        let key_pair = rcgen::KeyPair::generate().expect("generate P-256 key");
        let params = rcgen::CertificateParams::new(vec!["pullgate-test-token-issuer".to_string()])
            .expect("cert params");
        let cert = params
            .self_signed(&key_pair)
            .expect("self-sign certificate");
        let signer = EcdsaKeyPair::from_pkcs8(
            &ECDSA_P256_SHA256_FIXED_SIGNING,
            &key_pair.serialize_der(),
            &SystemRandom::new(),
        )
        .expect("load signing key into ring");
        let state = Arc::new(State {
            issuer: issuer.into(),
            service: service.into(),
            username: username.into(),
            password: password.into(),
            signer,
            cert_der_base64: STANDARD.encode(cert.der()),
            requests: AtomicUsize::new(0),
            issued: AtomicUsize::new(0),
            scopes: Mutex::new(Vec::new()),
        });
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind token server");
        let port = listener.local_addr().expect("local addr").port();
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (state, stop) = (state.clone(), stop.clone());
            std::thread::spawn(move || {
                for stream in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    if let Ok(stream) = stream {
                        let state = state.clone();
                        std::thread::spawn(move || serve_connection(&state, stream));
                    }
                }
            })
        };
        TokenServer {
            port,
            root_cert_pem: cert.pem(),
            state,
            stop,
            thread: Some(thread),
        }
    }

    /// `127.0.0.1:PORT`: the realm's host and port, as an upstream's `auth_hosts` lists it
    /// (a realm on another port than its registry is outside the credential trust boundary
    /// unless listed).
    pub fn authority(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The realm URL to put in the registry's config.
    pub fn realm(&self) -> String {
        format!("http://127.0.0.1:{}/token", self.port)
    }

    /// PEM of the signing certificate, for the registry's `rootcertbundle`.
    pub fn root_cert_pem(&self) -> &str {
        &self.root_cert_pem
    }

    /// Requests received at the realm, answered or refused.
    pub fn requests(&self) -> usize {
        self.state.requests.load(Ordering::SeqCst)
    }

    /// Tokens issued (requests with the right credentials).
    pub fn tokens_issued(&self) -> usize {
        self.state.issued.load(Ordering::SeqCst)
    }

    /// Every scope asked for so far, in order.
    pub fn scopes_requested(&self) -> Vec<String> {
        self.state.scopes.lock().expect("scopes lock").clone()
    }
}

impl Drop for TokenServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// One request per connection (`Connection: close`), which every client copes with.
fn serve_connection(state: &State, stream: TcpStream) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let mut reader = BufReader::new(match stream.try_clone() {
        Ok(clone) => clone,
        Err(_) => return,
    });
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).is_err() || request_line.is_empty() {
        return;
    }
    let mut headers = HashMap::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).is_err() {
            return;
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            headers.insert(name.trim().to_ascii_lowercase(), value.trim().to_string());
        }
    }
    let mut body = vec![
        0;
        headers
            .get("content-length")
            .and_then(|len| len.parse().ok())
            .unwrap_or(0)
    ];
    if reader.read_exact(&mut body).is_err() {
        return;
    }
    let mut parts = request_line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (status, response_body) = handle(state, method, target, &headers, &body);
    let reason = match status {
        200 => "OK",
        401 => "Unauthorized",
        404 => "Not Found",
        _ => "Bad Request",
    };
    let mut stream = stream;
    let _ = write!(
        stream,
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{response_body}",
        response_body.len()
    );
    let _ = stream.flush();
}

fn handle(
    state: &State,
    method: &str,
    target: &str,
    headers: &HashMap<String, String>,
    body: &[u8],
) -> (u16, String) {
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    if path != "/token" {
        return (404, r#"{"error":"not found"}"#.into());
    }
    state.requests.fetch_add(1, Ordering::SeqCst);
    let mut params = parse_form(query);
    let basic = headers
        .get("authorization")
        .and_then(|value| parse_basic(value));
    let credentials = if method == "POST" {
        let form = parse_form(&String::from_utf8_lossy(body));
        let from_form = form
            .get("username")
            .zip(form.get("password"))
            .map(|(u, p)| (u[0].clone(), p[0].clone()));
        params.extend(form);
        from_form.or(basic)
    } else {
        basic
    };
    match credentials {
        Some((user, password)) if user == state.username && password == state.password => {}
        _ => {
            return (
                401,
                r#"{"errors":[{"code":"UNAUTHORIZED","message":"bad or missing credentials"}]}"#
                    .into(),
            )
        }
    }
    if params.get("service").map(|s| s[0].as_str()) != Some(state.service.as_str()) {
        return (400, r#"{"error":"unknown service"}"#.into());
    }
    let scopes = params.get("scope").cloned().unwrap_or_default();
    state
        .scopes
        .lock()
        .expect("scopes lock")
        .extend(scopes.iter().cloned());
    let token = sign_token(state, &scopes);
    state.issued.fetch_add(1, Ordering::SeqCst);
    let body = json!({ "token": token, "access_token": token, "expires_in": TOKEN_LIFETIME_SECS });
    (200, body.to_string())
}

/// A JWT granting every requested action on every requested repository.
fn sign_token(state: &State, scopes: &[String]) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs();
    // Scopes may be space-separated within one parameter as well as repeated.
    let access: Vec<_> = scopes
        .iter()
        .flat_map(|scope| scope.split(' '))
        .filter_map(|scope| {
            let mut parts = scope.splitn(3, ':');
            let (kind, name, actions) = (parts.next()?, parts.next()?, parts.next()?);
            Some(json!({ "type": kind, "name": name, "actions": actions.split(',').collect::<Vec<_>>() }))
        })
        .collect();
    let header = json!({ "typ": "JWT", "alg": "ES256", "x5c": [state.cert_der_base64] });
    let claims = json!({
        "iss": state.issuer,
        "sub": state.username,
        "aud": state.service,
        "exp": now + TOKEN_LIFETIME_SECS,
        // The registry allows no clock leeway; back-date a little.
        "nbf": now - 10,
        "iat": now,
        "jti": format!("{now}-{}", state.issued.load(Ordering::SeqCst)),
        "access": access,
    });
    let signing_input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let signature = state
        .signer
        .sign(&SystemRandom::new(), signing_input.as_bytes())
        .expect("sign token");
    format!(
        "{signing_input}.{}",
        URL_SAFE_NO_PAD.encode(signature.as_ref())
    )
}

fn parse_basic(value: &str) -> Option<(String, String)> {
    let encoded = value
        .strip_prefix("Basic ")
        .or_else(|| value.strip_prefix("basic "))?;
    let decoded = String::from_utf8(STANDARD.decode(encoded.trim()).ok()?).ok()?;
    let (user, password) = decoded.split_once(':')?;
    Some((user.to_string(), password.to_string()))
}

/// `a=1&b=2&a=3` → {a: [1, 3], b: [2]}, percent- and plus-decoded.
fn parse_form(input: &str) -> HashMap<String, Vec<String>> {
    let mut out: HashMap<String, Vec<String>> = HashMap::new();
    for pair in input.split('&').filter(|pair| !pair.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        out.entry(percent_decode(key))
            .or_default()
            .push(percent_decode(value));
    }
    out
}

fn percent_decode(input: &str) -> String {
    let bytes = input.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'%' && i + 2 < bytes.len())
            .then(|| std::str::from_utf8(&bytes[i + 1..i + 3]).ok())
            .flatten()
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match (bytes[i], escaped) {
            (_, Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (b'+', None) => {
                out.push(b' ');
                i += 1;
            }
            (byte, None) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}
