//! The blob-store contract, run against every backend: staged bytes are readable while they
//! are written, nothing is visible before commit, a commit whose bytes do not hash to the
//! digest stores nothing, and a committed blob reads back by range.

use bytes::Bytes;
use futures_util::StreamExt;
use pullgate::core::ports::{BlobStore, CommitError};
use pullgate::core::reference::Digest;
use pullgate::native::store::FsBlobStore;
use pullgate::testing::MemBlobStore;

async fn read_all(store: &dyn BlobStore, digest: &str, start: u64, end: u64) -> Vec<u8> {
    let mut s = store
        .read(digest, start, end)
        .await
        .unwrap()
        .expect("stored");
    let mut out = Vec::new();
    while let Some(c) = s.next().await {
        out.extend_from_slice(&c.unwrap());
    }
    out
}

async fn contract(store: &dyn BlobStore) {
    let data: Vec<u8> = (0..1_000_000u32).map(|i| (i * 7 % 256) as u8).collect();
    let digest = Digest::of(&data);
    let d = digest.as_str();
    let halves = [
        Bytes::copy_from_slice(&data[..400_000]),
        Bytes::copy_from_slice(&data[400_000..]),
    ];

    // A mismatch stores nothing.
    let mut w = store.create(d).await.unwrap();
    w.write(vec![Bytes::from_static(b"not the blob")])
        .await
        .unwrap();
    assert!(matches!(
        w.commit().await,
        Err(CommitError::DigestMismatch { .. })
    ));
    assert_eq!(store.stat(d).await.unwrap(), None);

    // Staged bytes are readable while written, invisible until commit.
    let mut w = store.create(d).await.unwrap();
    let tail = w.tail().expect("this backend reads writes in progress");
    w.write(vec![halves[0].clone()]).await.unwrap();
    assert_eq!(
        &tail.read_at(1000, 100).await.unwrap()[..],
        &data[1000..1100]
    );
    assert_eq!(store.stat(d).await.unwrap(), None);
    w.write(vec![halves[1].clone()]).await.unwrap();
    w.commit().await.unwrap();
    // The tail stays readable after commit (readers that joined late).
    assert_eq!(
        &tail.read_at(999_990, 10).await.unwrap()[..],
        &data[999_990..]
    );
    assert_eq!(store.stat(d).await.unwrap(), Some(1_000_000));
    assert_eq!(read_all(store, d, 0, 1_000_000).await, data);
    assert_eq!(
        read_all(store, d, 123_456, 654_321).await,
        &data[123_456..654_321]
    );

    // An aborted write leaves nothing.
    let other = Digest::of(b"abc");
    let mut w = store.create(other.as_str()).await.unwrap();
    w.write(vec![Bytes::from_static(b"abc")]).await.unwrap();
    w.abort().await;
    assert_eq!(store.stat(other.as_str()).await.unwrap(), None);
    assert!(store.read(other.as_str(), 0, 3).await.unwrap().is_none());
}

fn run<F: std::future::Future<Output = ()>>(f: F) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    tokio::task::LocalSet::new().block_on(&rt, f);
}

#[test]
fn mem_blob_store_keeps_the_contract() {
    run(contract(&MemBlobStore::default()));
}

#[test]
fn fs_blob_store_keeps_the_contract_and_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    run(async {
        let store = FsBlobStore::open(dir.path(), 1 << 30).unwrap();
        contract(&store).await;
        assert_eq!(store.total_bytes(), 1_000_000);
    });
    // Reopened: the blob is still there, and staged leftovers are gone.
    std::fs::write(dir.path().join("tmp").join("leftover"), b"x").unwrap();
    let store = FsBlobStore::open(dir.path(), 1 << 30).unwrap();
    assert_eq!(store.total_bytes(), 1_000_000);
    assert!(!dir.path().join("tmp").join("leftover").exists());
}

#[test]
fn fs_blob_store_evicts_over_its_cap() {
    let dir = tempfile::tempdir().unwrap();
    run(async {
        let store = FsBlobStore::open(dir.path(), 2500).unwrap();
        for i in 0..5u8 {
            let data = vec![i; 1000];
            let d = Digest::of(&data);
            let mut w = store.create(d.as_str()).await.unwrap();
            w.write(vec![Bytes::from(data)]).await.unwrap();
            w.commit().await.unwrap();
            // Eviction runs on the blocking pool; give it a bounded chance to finish.
            for _ in 0..200 {
                if store.total_bytes() <= 2500 {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
        }
        assert!(store.total_bytes() <= 2500, "{}", store.total_bytes());
        // The newest blob survives.
        let newest = Digest::of(&[4u8; 1000]);
        assert_eq!(store.stat(newest.as_str()).await.unwrap(), Some(1000));
    });
}

async fn kv_contract(kv: &dyn pullgate::core::ports::KvStore) {
    for k in ["outbox/2", "outbox/1", "outboy/1", "outbox/3", "other"] {
        kv.put(k, k.as_bytes()).await.unwrap();
    }
    assert_eq!(kv.get("outbox/1").await.unwrap().unwrap(), b"outbox/1");
    assert_eq!(
        kv.list("outbox/", 10).await.unwrap(),
        ["outbox/1", "outbox/2", "outbox/3"]
    );
    assert_eq!(
        kv.list("outbox/", 2).await.unwrap(),
        ["outbox/1", "outbox/2"]
    );
    kv.delete("outbox/2").await.unwrap();
    kv.delete("absent").await.unwrap();
    assert_eq!(
        kv.list("outbox/", 10).await.unwrap(),
        ["outbox/1", "outbox/3"]
    );
    assert_eq!(kv.get("outbox/2").await.unwrap(), None);
}

#[test]
fn kv_stores_keep_the_contract() {
    let dir = tempfile::tempdir().unwrap();
    run(async {
        kv_contract(&pullgate::testing::MemKv::default()).await;
        kv_contract(&pullgate::native::store::RedbKv::open(&dir.path().join("m.redb")).unwrap())
            .await;
    });
}
