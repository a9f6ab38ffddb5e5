//! `pullgate warm REF…`: pre-warms a cache with the same walk as the gateway's `distribute`
//! stage ([`crate::core::app::warm`]): the index, the chosen platforms' manifests, configs and
//! layers, each step printed as it completes.
//!
//! - With `--server URL`, it pulls through a running pullgate over HTTP (Basic credentials
//!   from `--user` and `PULLGATE_PASSWORD` when the mirror requires them).
//! - Without, it opens the local cache (`--data-dir`, `--config`, `--upstream`, as `serve`
//!   takes them) and pulls through the core in-process: for seeding a cache before it serves
//!   (the cache's metadata store admits one process, so stop a running `serve` first, or use
//!   `--server`).
//!
//! A reference that fails is reported and the others still run; the exit status is then 1.

use crate::core::app::{warm, App, WarmReport, WarmStep};
use crate::native::{offload, store, ServeOptions};
use bytes::Bytes;
use futures_util::StreamExt;
use std::cell::Cell;
use std::rc::Rc;
use std::time::Duration;

/// A blob download prints a progress line every this many bytes.
const PROGRESS_EVERY: u64 = 64 << 20;

/// What `pullgate warm` was asked.
pub struct WarmOptions {
    /// Image references: `[host/]repository[:tag][@digest]` as clients name them.
    pub images: Vec<String>,
    /// `os/arch[/variant]` to warm from an index; all when empty.
    pub platforms: Vec<String>,
    /// A running pullgate's base URL; the local cache when absent.
    pub server: Option<String>,
    /// Basic credentials for `server`: the user name (the password comes from the caller).
    pub credentials: Option<(String, String)>,
    /// The local cache's settings, as `serve` takes them.
    pub local: ServeOptions,
}

/// Runs `pullgate warm`: every image, in order; an error names the images that failed.
pub fn run(opts: WarmOptions) -> Result<(), String> {
    for p in &opts.platforms {
        let parts: Vec<&str> = p.split('/').collect();
        if !(2..=3).contains(&parts.len()) || parts.iter().any(|s| s.is_empty()) {
            return Err(format!(
                "--platform {p:?}: expected os/arch or os/arch/variant"
            ));
        }
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("starting the runtime: {e}"))?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        let mut failed = Vec::new();
        match &opts.server {
            Some(server) => {
                let remote = Remote::new(server, opts.credentials.clone())?;
                for image in &opts.images {
                    let get = |path: String, accept: Option<&'static str>| {
                        remote.get(image.clone(), path, accept)
                    };
                    let result = warm(get, image, &opts.platforms, &mut printer(image)).await;
                    finish(image, result, &mut failed);
                }
            }
            None => {
                let (app, active) = local_app(&opts.local)?;
                for image in &opts.images {
                    let result = app.warm(image, &opts.platforms, &mut printer(image)).await;
                    finish(image, result, &mut failed);
                }
                // Commits run as background tasks: let them end before the process does.
                while active.get() > 0 {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
        if failed.is_empty() {
            Ok(())
        } else {
            Err(format!("could not warm {}", failed.join(", ")))
        }
    })
}

fn finish(image: &str, result: Result<WarmReport, String>, failed: &mut Vec<String>) {
    match result {
        Ok(report) => println!("{image}: {report}"),
        Err(e) => {
            eprintln!("{image}: {e}");
            failed.push(image.to_string());
        }
    }
}

/// Prints each step of `image`'s warm on stderr.
fn printer(image: &str) -> impl FnMut(WarmStep) + '_ {
    move |step| match step {
        WarmStep::Manifest { path, bytes } => eprintln!("{image}: manifest {path} ({bytes} bytes)"),
        WarmStep::Blob {
            digest,
            bytes,
            done,
            total,
        } => eprintln!("{image}: blob {done}/{total} {digest} ({bytes} bytes)"),
    }
}

/// The local cache's core, as one `serve` worker builds it (one thread, no listener).
fn local_app(opts: &ServeOptions) -> Result<(App, Rc<Cell<usize>>), String> {
    let p = crate::native::prepare(opts)?;
    std::fs::create_dir_all(&p.data_dir)
        .map_err(|e| format!("creating {}: {e}", p.data_dir.display()))?;
    let kv = store::RedbKv::open(&p.data_dir.join("meta.redb")).map_err(|e| e.to_string())?;
    let blobs =
        store::FsBlobStore::open(&p.data_dir, p.settings.max_size).map_err(|e| e.to_string())?;
    let (ports, active) = crate::native::instance_ports(
        &p.settings,
        kv,
        blobs,
        offload::BlockingOffload::for_this_machine(),
    )?;
    Ok((App::new(p.settings, ports), active))
}

/// A running pullgate, reached over HTTP.
struct Remote {
    base: String,
    client: reqwest::Client,
    credentials: Option<(String, String)>,
}

impl Remote {
    fn new(server: &str, credentials: Option<(String, String)>) -> Result<Remote, String> {
        let base = server.trim_end_matches('/').to_string();
        let url = reqwest::Url::parse(&base).map_err(|e| format!("--server {server:?}: {e}"))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(format!(
                "--server {server:?}: expected an http or https URL"
            ));
        }
        let client = reqwest::Client::builder()
            .user_agent(crate::core::http::USER_AGENT)
            .connect_timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| e.to_string())?;
        Ok(Remote {
            base,
            client,
            credentials,
        })
    }

    /// GETs `path`: (bytes read, the body when it is small enough to be a manifest).
    async fn get(
        &self,
        image: String,
        path: String,
        accept: Option<&'static str>,
    ) -> Result<(u64, Bytes), String> {
        let mut request = self.client.get(format!("{}{path}", self.base));
        if let Some(accept) = accept {
            request = request.header(reqwest::header::ACCEPT, accept);
        }
        if let Some((user, password)) = &self.credentials {
            request = request.basic_auth(user, Some(password));
        }
        let response = request
            .send()
            .await
            .map_err(|e| format!("GET {path}: {e}"))?;
        let status = response.status();
        if status != reqwest::StatusCode::OK {
            return Err(format!("GET {path}: {status}"));
        }
        if accept.is_some() {
            let body = response
                .bytes()
                .await
                .map_err(|e| format!("GET {path}: {e}"))?;
            return Ok((body.len() as u64, body));
        }
        let mut stream = response.bytes_stream();
        let (mut n, mut next_report) = (0u64, PROGRESS_EVERY);
        while let Some(chunk) = stream.next().await {
            n += chunk.map_err(|e| format!("GET {path}: {e}"))?.len() as u64;
            if n >= next_report {
                eprintln!("{image}: … {path}: {} MiB", n >> 20);
                next_report += PROGRESS_EVERY;
            }
        }
        Ok((n, Bytes::new()))
    }
}
