//! The ceiling row of `bench/run.sh`: a bare multi-threaded hyper server that answers every
//! request with one fixed manifest (same bytes and headers a registry sends), with nothing
//! else in the way: no routing, no access control, no storage. One current-thread runtime per
//! core, each accepting on a clone of one listening socket.
//!
//!     cargo run --release --example bare_manifest -- 127.0.0.1:PORT manifest.json MEDIA_TYPE

use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use std::convert::Infallible;

fn main() -> Result<(), String> {
    let args: Vec<String> = std::env::args().collect();
    let [_, listen, file, media_type] = args.as_slice() else {
        return Err("usage: bare_manifest ADDR MANIFEST_FILE MEDIA_TYPE".into());
    };
    let body = std::fs::read_to_string(file).map_err(|e| format!("{file}: {e}"))?;
    let listener = std::net::TcpListener::bind(listen).map_err(|e| e.to_string())?;
    listener.set_nonblocking(true).map_err(|e| e.to_string())?;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let listener = listener.try_clone().map_err(|e| e.to_string());
            let (body, media_type) = (body.clone(), media_type.clone());
            std::thread::spawn(move || serve(listener?, body, media_type))
        })
        .collect();
    for h in handles {
        h.join()
            .map_err(|_| "a server thread panicked".to_string())??;
    }
    Ok(())
}

fn serve(listener: std::net::TcpListener, body: String, media_type: String) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::from_std(listener).map_err(|e| e.to_string())?;
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            let (body, media_type) = (body.clone(), media_type.clone());
            let service = hyper::service::service_fn(move |_req: hyper::Request<Incoming>| {
                let resp = hyper::Response::builder()
                    .header("content-type", media_type.as_str())
                    .header("docker-content-digest", "sha256:bare")
                    .body(body.clone());
                async move { Ok::<_, Infallible>(resp.unwrap_or_default()) }
            });
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    })
}
