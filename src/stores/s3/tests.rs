//! The sans-IO S3 requests against fixed times, and the `BlobWriter` contract of
//! [`S3BlobStore`] against `FakeS3`, an in-memory bucket behind the upstream port that keeps
//! multipart uploads apart from objects as S3 does. Run natively:
//! `cargo test --lib --no-default-features --features s3 stores::s3` (or with `--features spin`).

use super::*;
use crate::core::ports::UpstreamError;
use futures_util::FutureExt;
use http::{header, Method};
use sha2::{Digest as _, Sha256};
use std::cell::RefCell;
use std::collections::BTreeMap;

const SECRET: &str = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY";
/// 2024-01-01T00:00:00Z.
const T0: u64 = 1_704_067_200_000;

fn settings() -> S3Settings {
    S3Settings {
        endpoint: "http://s3.test:9000".into(),
        bucket: "cache".into(),
        region: "us-east-1".into(),
        access_key_id: "AKIDEXAMPLE".into(),
        secret_access_key: SECRET.into(),
        path_style: true,
    }
}

fn digest_of(bytes: &[u8]) -> Digest {
    Digest::of(bytes)
}

fn now<T>(f: impl std::future::Future<Output = T>) -> T {
    f.now_or_never().expect("the fake answers at once")
}

#[test]
fn requests_are_presigned_sigv4_urls_at_the_given_time() {
    let r = S3Requests::new(&settings()).unwrap();
    let key = object_key(&digest_of(b"x"));
    let head = r.head(&key, T0).unwrap();
    let url = head.uri().to_string();
    assert_eq!(head.method(), Method::HEAD);
    assert!(
        url.starts_with(&format!("http://s3.test:9000/cache/{key}?")),
        "{url}"
    );
    for part in [
        "X-Amz-Algorithm=AWS4-HMAC-SHA256",
        "X-Amz-Credential=AKIDEXAMPLE%2F20240101%2Fus-east-1%2Fs3%2Faws4_request",
        "X-Amz-Date=20240101T000000Z",
        "X-Amz-Expires=900",
        "X-Amz-SignedHeaders=host",
    ] {
        assert!(url.contains(part), "{part} missing from {url}");
    }
    let signature = url.split("X-Amz-Signature=").nth(1).unwrap();
    assert_eq!(signature.len(), 64);
    // Deterministic for one time, different a second later; the secret never appears.
    assert_eq!(r.head(&key, T0).unwrap().uri(), head.uri());
    assert_ne!(r.head(&key, T0 + 1000).unwrap().uri(), head.uri());
    assert!(!url.contains("wJalr"));
    assert!(!format!("{:?} {:?}", settings(), r).contains("wJalr"));

    let get = r.get(&key, 10, 20, T0).unwrap();
    assert_eq!(get.headers()[header::RANGE], "bytes=10-19");
    let put = r.put(&key, Bytes::from_static(b"abc"), T0).unwrap();
    assert_eq!(put.headers()[header::CONTENT_LENGTH], "3");
    let create = r.create_multipart(&key, T0).unwrap();
    assert_eq!(create.method(), Method::POST);
    assert!(create.uri().query().unwrap().contains("uploads"));
    let part = r
        .upload_part(&key, "up1", 2, Bytes::from_static(b"p"), T0)
        .unwrap();
    let q = part.uri().query().unwrap().to_string();
    assert!(
        q.contains("partNumber=2") && q.contains("uploadId=up1"),
        "{q}"
    );
    let done = r
        .complete(&key, "up1", &["\"e1\"".into(), "\"e2\"".into()], T0)
        .unwrap();
    let body = String::from_utf8(done.body().to_vec()).unwrap();
    assert!(body.contains("<PartNumber>2</PartNumber>"), "{body}");
    assert_eq!(r.abort(&key, "up1", T0).unwrap().method(), Method::DELETE);
}

#[test]
fn virtual_host_style_puts_the_bucket_in_the_host() {
    let mut s = settings();
    s.endpoint = "https://s3.us-east-1.amazonaws.com".into();
    s.path_style = false;
    let r = S3Requests::new(&s).unwrap();
    let url = r.head("blobs/sha256/ab", T0).unwrap().uri().to_string();
    assert!(
        url.starts_with("https://cache.s3.us-east-1.amazonaws.com/blobs/sha256/ab?"),
        "{url}"
    );
}

#[test]
fn bad_settings_are_errors_and_keys_are_the_digest_hex() {
    let mut s = settings();
    s.endpoint = "not a url".into();
    assert!(S3Requests::new(&s).is_err());
    s.endpoint = "ftp://s3.test".into();
    assert!(S3Requests::new(&s).is_err());
    // Malformed digests cannot reach the store: it takes a validated `Digest`.
    let d = crate::core::registry::reference::parse_digest(&format!("sha256:{}", "0".repeat(64)))
        .unwrap();
    assert_eq!(object_key(&d), format!("blobs/sha256/{}", "0".repeat(64)));
}

#[test]
fn responses_are_parsed() {
    let created = r#"<?xml version="1.0" encoding="UTF-8"?>
<InitiateMultipartUploadResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">
<Bucket>cache</Bucket><Key>k</Key><UploadId>VXBsb2FkIElE</UploadId>
</InitiateMultipartUploadResult>"#;
    assert_eq!(parse_upload_id(created).unwrap(), "VXBsb2FkIElE");
    assert!(parse_upload_id("<Error><Code>AccessDenied</Code></Error>").is_err());
    let completed = r#"<?xml version="1.0" encoding="UTF-8"?>
<CompleteMultipartUploadResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">
<Location>x</Location><Bucket>cache</Bucket><Key>k</Key><ETag>"3858f62230ac3c915f300c664312c11f-9"</ETag>
</CompleteMultipartUploadResult>"#;
    verify_completed(completed).unwrap();
    let failed = "<Error><Code>InternalError</Code><Message>We encountered an internal error.</Message></Error>";
    assert!(verify_completed(failed).is_err());
    let mut headers = http::HeaderMap::new();
    assert!(parse_etag(&headers).is_err());
    headers.insert(header::ETAG, "\"abc\"".parse().unwrap());
    headers.insert(header::CONTENT_LENGTH, "42".parse().unwrap());
    assert_eq!(parse_etag(&headers).unwrap(), "\"abc\"");
    assert_eq!(parse_size(&headers).unwrap(), 42);
}

struct FixedClock;

impl Clock for FixedClock {
    fn now_ms(&self) -> u64 {
        T0
    }
}

/// Multipart uploads by id: the object key and the parts by number.
type Uploads = BTreeMap<String, (String, BTreeMap<u16, Bytes>)>;

/// An in-memory bucket: objects, and multipart uploads kept apart until completed.
#[derive(Default)]
struct FakeS3 {
    objects: RefCell<BTreeMap<String, Bytes>>,
    uploads: RefCell<Uploads>,
    requests: RefCell<Vec<String>>,
    next: RefCell<u32>,
}

fn reply(status: u16, headers: &[(&str, String)], body: impl Into<Bytes>) -> Response<ByteStream> {
    let body: Bytes = body.into();
    let mut b = Response::builder().status(status);
    for (k, v) in headers {
        b = b.header(*k, v);
    }
    b.body(futures_util::stream::iter([Ok(body)]).boxed_local())
        .unwrap()
}

#[async_trait::async_trait(?Send)]
impl Upstream for FakeS3 {
    async fn send(&self, request: Request<Bytes>) -> Result<Response<ByteStream>, UpstreamError> {
        let url = url::Url::parse(&request.uri().to_string()).unwrap();
        assert!(url.query().unwrap().contains("X-Amz-Signature="));
        let key = url.path().strip_prefix("/cache/").unwrap().to_string();
        let q: BTreeMap<String, String> = url.query_pairs().into_owned().collect();
        let method = request.method().clone();
        let op = match (&method, q.contains_key("uploads"), q.get("uploadId")) {
            (&Method::POST, true, _) => "create",
            (&Method::PUT, _, Some(_)) => "part",
            (&Method::POST, _, Some(_)) => "complete",
            (&Method::DELETE, _, Some(_)) => "abort",
            (&Method::PUT, _, None) => "put",
            (&Method::GET, _, None) => "get",
            (&Method::HEAD, _, None) => "head",
            (&Method::DELETE, _, None) => "delete",
            _ => panic!("unexpected {method} {url}"),
        };
        self.requests.borrow_mut().push(op.to_string());
        if method == Method::PUT || method == Method::POST {
            assert_eq!(
                request.headers()[header::CONTENT_LENGTH],
                request.body().len().to_string()
            );
        }
        let body = request.into_body();
        Ok(match op {
            "create" => {
                let id = {
                    let mut n = self.next.borrow_mut();
                    *n += 1;
                    format!("upload-{n}")
                };
                self.uploads
                    .borrow_mut()
                    .insert(id.clone(), (key.clone(), BTreeMap::new()));
                reply(200, &[], format!(
                    "<InitiateMultipartUploadResult xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\"><Bucket>cache</Bucket><Key>{key}</Key><UploadId>{id}</UploadId></InitiateMultipartUploadResult>"
                ))
            }
            "part" => {
                let n: u16 = q["partNumber"].parse().unwrap();
                let etag = format!("\"{}\"", hex::encode(Sha256::digest(&body)));
                self.uploads
                    .borrow_mut()
                    .get_mut(&q["uploadId"])
                    .unwrap()
                    .1
                    .insert(n, body);
                reply(200, &[("etag", etag)], Bytes::new())
            }
            "complete" => {
                let (k, parts) = self.uploads.borrow_mut().remove(&q["uploadId"]).unwrap();
                let text = String::from_utf8(body.to_vec()).unwrap();
                assert_eq!(text.matches("<Part>").count(), parts.len(), "{text}");
                let mut all = Vec::new();
                for p in parts.values() {
                    all.extend_from_slice(p);
                }
                self.objects.borrow_mut().insert(k, Bytes::from(all));
                reply(200, &[], "<CompleteMultipartUploadResult xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\"><ETag>\"x-2\"</ETag></CompleteMultipartUploadResult>")
            }
            "abort" => {
                self.uploads.borrow_mut().remove(&q["uploadId"]);
                reply(204, &[], Bytes::new())
            }
            "put" => {
                self.objects.borrow_mut().insert(key, body);
                reply(200, &[("etag", "\"e\"".into())], Bytes::new())
            }
            "delete" => {
                self.objects.borrow_mut().remove(&key);
                reply(204, &[], Bytes::new())
            }
            _ => match self.objects.borrow().get(&key) {
                None => reply(404, &[], "<Error><Code>NoSuchKey</Code></Error>"),
                Some(data) if op == "head" => reply(
                    200,
                    &[("content-length", data.len().to_string())],
                    Bytes::new(),
                ),
                Some(data) => {
                    let range = request_range(&q, data.len());
                    reply(206, &[], data.slice(range))
                }
            },
        })
    }
}

thread_local! {
    static RANGE: RefCell<Option<(usize, usize)>> = const { RefCell::new(None) };
}

fn request_range(_q: &BTreeMap<String, String>, len: usize) -> std::ops::Range<usize> {
    RANGE.with(|r| r.borrow().map(|(a, b)| a..b + 1).unwrap_or(0..len))
}

fn store(part_size: usize) -> (Rc<FakeS3>, S3BlobStore) {
    let fake = Rc::new(FakeS3::default());
    let store = S3BlobStore::new(&settings(), fake.clone(), Rc::new(FixedClock))
        .unwrap()
        .with_part_size(part_size);
    (fake, store)
}

fn bytes(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn read_all(store: &S3BlobStore, digest: &Digest, start: u64, end: u64) -> Vec<u8> {
    RANGE.with(|r| *r.borrow_mut() = Some((start as usize, end as usize - 1)));
    let mut s = now(store.read(digest, start, end))
        .unwrap()
        .expect("stored");
    let mut out = Vec::new();
    while let Some(c) = now(s.next()) {
        out.extend_from_slice(&c.unwrap());
    }
    RANGE.with(|r| *r.borrow_mut() = None);
    out
}

fn write(store: &S3BlobStore, digest: &Digest, data: &[u8]) -> Box<dyn BlobWriter> {
    let mut w = now(store.create(digest, Some(data.len() as u64))).unwrap();
    for chunk in data.chunks(700) {
        now(w.write(vec![Bytes::copy_from_slice(chunk)])).unwrap();
    }
    w
}

#[test]
fn a_blob_within_one_part_is_put_once_after_verification() {
    let (fake, store) = store(1024);
    let data = bytes(1000, 1);
    let digest = digest_of(&data);
    let w = write(&store, &digest, &data);
    assert!(
        fake.requests.borrow().is_empty(),
        "nothing is sent before commit"
    );
    assert_eq!(now(store.stat(&digest)).unwrap(), None);
    now(w.commit()).unwrap();
    assert_eq!(*fake.requests.borrow(), ["head", "put"]);
    assert_eq!(now(store.stat(&digest)).unwrap(), Some(1000));
    assert_eq!(read_all(&store, &digest, 0, 1000), data);
    assert_eq!(read_all(&store, &digest, 100, 200), data[100..200]);
}

#[test]
fn a_larger_blob_goes_up_in_parts_and_appears_only_on_commit() {
    let (fake, store) = store(1024);
    let data = bytes(3 * 1024 + 500, 2);
    let digest = digest_of(&data);
    let w = write(&store, &digest, &data);
    assert_eq!(fake.uploads.borrow().len(), 1);
    assert!(fake.objects.borrow().is_empty());
    assert_eq!(now(store.stat(&digest)).unwrap(), None);
    now(w.commit()).unwrap();
    let ops = fake.requests.borrow().clone();
    assert_eq!(ops.iter().filter(|o| *o == "part").count(), 4, "{ops:?}");
    assert!(fake.uploads.borrow().is_empty());
    assert_eq!(read_all(&store, &digest, 0, data.len() as u64), data);
    assert_eq!(read_all(&store, &digest, 1000, 2100), data[1000..2100]);
    assert!(now(store.delete(&digest)).unwrap());
    assert!(!now(store.delete(&digest)).unwrap());
    assert_eq!(now(store.stat(&digest)).unwrap(), None);
}

#[test]
fn a_mismatch_stores_nothing_and_aborts_the_upload() {
    for size in [500, 5000] {
        let (fake, store) = store(1024);
        let data = bytes(size, 3);
        let claimed = digest_of(b"something else");
        let w = write(&store, &claimed, &data);
        match now(w.commit()) {
            Err(CommitError::DigestMismatch { actual }) => {
                assert_eq!(actual, digest_of(&data).to_string())
            }
            other => panic!("{other:?}"),
        }
        assert!(fake.objects.borrow().is_empty(), "size {size}");
        assert!(fake.uploads.borrow().is_empty(), "size {size}");
        assert!(!fake
            .requests
            .borrow()
            .iter()
            .any(|o| o == "put" || o == "complete"));
    }
}

#[test]
fn an_aborted_writer_leaves_no_upload() {
    let (fake, store) = store(1024);
    let data = bytes(4000, 4);
    let w = write(&store, &digest_of(&data), &data);
    assert_eq!(fake.uploads.borrow().len(), 1);
    now(w.abort());
    assert!(fake.uploads.borrow().is_empty());
    assert!(fake.objects.borrow().is_empty());
    assert!(w_tail_is_none(&store));
}

fn w_tail_is_none(store: &S3BlobStore) -> bool {
    now(store.create(&digest_of(b""), None))
        .unwrap()
        .tail()
        .is_none()
}

#[test]
fn an_empty_blob_is_stored_and_read() {
    let (_fake, store) = store(1024);
    let digest = digest_of(b"");
    now(now(store.create(&digest, Some(0))).unwrap().commit()).unwrap();
    assert_eq!(now(store.stat(&digest)).unwrap(), Some(0));
    let mut s = now(store.read(&digest, 0, 0)).unwrap().unwrap();
    assert!(now(s.next()).is_none());
}
